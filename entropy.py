"""The two entropy models of a hyperprior codec, and quantization: Balle et al. 2018, "Variational image
compression with a scale hyperprior" (ICLR). `EntropyBottleneck` is its non-parametric factorized density (for
z), `GaussianConditional` its discretized Gaussian (for y, with means as in Minnen et al. 2018). Each freezes
integer CDF tables with `update()` after training and codes with them through the range coder (rangecoder.py).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import tables
from rangecoder import decode_symbols, encode_symbols

TABLE_BUFFERS = ("_quantized_cdf", "_cdf_length", "_offset")   # sized by update(), so any size loads


# ----------------------------------------------------------------------------------------------------------
# Torch side: quantization and the two entropy models.
# ----------------------------------------------------------------------------------------------------------
def quantize(x, mode, means=None):
    """noise: x + U(-1/2, 1/2) (training proxy); ste: round with a straight-through gradient;
    dequantize: round(x - means) + means; symbols: round(x - means) as int32."""
    if mode == "noise":
        return x + torch.empty_like(x).uniform_(-0.5, 0.5)
    centered = x if means is None else x - means
    if mode == "symbols":
        return torch.round(centered).to(torch.int32)
    rounded = torch.round(centered)
    if mode == "ste":
        rounded = centered + (rounded - centered).detach()
    elif mode != "dequantize":
        raise ValueError(f"unknown quantization mode {mode!r}")
    return rounded if means is None else rounded + means


class LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows where it would push x back above the bound."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= ctx.bound) | (grad < 0)).to(grad.dtype), None


def lower_bound(x, bound):
    return LowerBound.apply(x, bound)


def to_cpu(t):
    """The one crossing from the model's device (CPU, GPU, ...) to the coder's world of numpy and integers:
    a detached CPU copy. Everything the coder reads passes through here (the entropy models, and the code that
    hands them symbols: machinery/banded.py, elic.py, container.py)."""
    return t.detach().to("cpu", copy=True)


class _CodingTables(nn.Module):
    """Frozen integer tables shared by both entropy models; saved in the state dict with the weights.
    (Buffer and parameter names follow Balle's and CompressAI's, so the reference's checkpoints load.)"""

    def __init__(self):
        super().__init__()
        self.register_buffer("_quantized_cdf", torch.zeros(0, 0, dtype=torch.int32))
        self.register_buffer("_cdf_length", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("_offset", torch.zeros(0, dtype=torch.int32))

    def _set_tables(self, cdfs, offsets):
        width = max(len(c) for c in cdfs)
        table = np.zeros((len(cdfs), width), dtype=np.int32)
        for k, c in enumerate(cdfs):
            table[k, :len(c)] = c
        device = self._offset.device                                        # tables live with the module
        self._quantized_cdf = torch.from_numpy(table).to(device)
        self._cdf_length = torch.tensor([len(c) for c in cdfs], dtype=torch.int32, device=device)
        self._offset = torch.tensor(offsets, dtype=torch.int32, device=device)

    def tables(self):
        """(cdfs, cdf_lengths, offsets) as numpy arrays, for the coder."""
        if self._cdf_length.numel() == 0:
            raise RuntimeError(f"{type(self).__name__} has no coding tables: call update() after training")
        return to_cpu(self._quantized_cdf).numpy(), to_cpu(self._cdf_length).numpy(), to_cpu(self._offset).numpy()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in TABLE_BUFFERS:                                  # tables change size with update()
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self._offset.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EntropyBottleneck(_CodingTables):
    """Balle et al. 2018 (appendix 6.1): a learned, non-parametric density per channel.

    The CDF of channel c is c(x) = sigmoid(f_K(...f_1(x))), each f_k an affine map with softplus-positive
    weights plus a tanh nonlinearity, so c is monotonic. Likelihood of an integer bin: c(v + 1/2) - c(v - 1/2).
    The coding range per channel comes from learned quantiles (tail_mass/2, median, 1 - tail_mass/2), fitted
    by `aux_loss()` with their own optimizer -- cheap at training time, and it leaves the main loss untouched.
    Four hidden layers of 3 filters, initialised so that the density starts about as wide as +-10 (Balle's).
    """

    TAIL_MASS, INIT_SCALE, FILTERS = 1e-9, 10.0, (3, 3, 3, 3)

    def __init__(self, channels):
        super().__init__()
        tail_mass, init_scale = self.TAIL_MASS, self.INIT_SCALE
        widths = (1,) + self.FILTERS + (1,)
        scale = init_scale ** (1 / (len(widths) - 1))
        self.layers = len(widths) - 1
        for i in range(self.layers):
            init = math.log(math.expm1(1 / scale / widths[i + 1]))
            matrix = torch.full((channels, widths[i + 1], widths[i]), init)
            self.register_parameter(f"_matrix{i}", nn.Parameter(matrix))
            self.register_parameter(f"_bias{i}", nn.Parameter(torch.rand(channels, widths[i + 1], 1) - 0.5))
            if i < self.layers - 1:
                self.register_parameter(f"_factor{i}", nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1, 1))
        target = math.log(2 / tail_mass - 1)
        self.register_buffer("target", torch.tensor([-target, 0.0, target]))

    def _logits_cumulative(self, x, detach=False):
        """x (C, 1, N) -> logit of the CDF (C, 1, N)."""
        maybe_detach = (lambda p: p.detach()) if detach else (lambda p: p)
        for i in range(self.layers):
            matrix, bias = maybe_detach(getattr(self, f"_matrix{i}")), maybe_detach(getattr(self, f"_bias{i}"))
            x = torch.matmul(F.softplus(matrix), x) + bias                     # (C, width_i+1, N)
            if i < self.layers - 1:
                x = x + torch.tanh(maybe_detach(getattr(self, f"_factor{i}"))) * torch.tanh(x)
        return x

    def _likelihood(self, v):
        """v (C, 1, N) -> P(bin around v), computed on the side where sigmoids are not saturated."""
        lower = self._logits_cumulative(v - 0.5)
        upper = self._logits_cumulative(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))

    @property
    def medians(self):
        return self.quantiles[:, 0, 1].detach()                            # (C,)

    def forward(self, z):
        """z (B, C, H, W) -> z_hat for the decoder, likelihoods (B, C, H, W)."""
        z = z.float()                           # likelihoods need float32, even under bf16 autocast
        B, C, H, W = z.shape
        medians = self.medians.view(1, C, 1, 1)
        z_tilde = quantize(z, "noise") if self.training else quantize(z, "dequantize", medians)
        v = z_tilde.permute(1, 0, 2, 3).reshape(C, 1, -1)                  # (C, 1, B*H*W)
        with torch.autocast(z.device.type, enabled=False):
            likelihoods = self._likelihood(v).reshape(C, B, H, W).permute(1, 0, 2, 3)
        z_hat = quantize(z, "ste", medians) if self.training else z_tilde
        return z_hat, lower_bound(likelihoods, 1e-9)

    def aux_loss(self):
        """Pull the quantiles to where the CDF's logits hit their targets (the density itself is frozen)."""
        return (self._logits_cumulative(self.quantiles, detach=True) - self.target).abs().sum()

    @torch.no_grad()
    def update(self):
        """Freeze integer CDF tables, one per channel, over [q_low, q_high] around the median. Computed in
        float64 from exactly rounded operations (tables.py), so every machine builds the same integers."""
        weights = lambda name, n: [to_cpu(getattr(self, f"_{name}{i}")).double().numpy() for i in range(n)]
        cdfs, offsets = tables.factorized_cdfs(weights("matrix", self.layers), weights("bias", self.layers),
                                               weights("factor", self.layers - 1),
                                               to_cpu(self.quantiles)[:, 0].double().numpy())
        self._set_tables(cdfs, offsets)

    def compress(self, z):
        """z (B, C, H, W) -> bytes. Values are rounded around the channel medians."""
        medians = to_cpu(self.medians).view(1, -1, 1, 1)
        symbols = quantize(to_cpu(z), "symbols", medians)
        indexes = np.broadcast_to(np.arange(z.shape[1], dtype=np.int32).reshape(1, -1, 1, 1), symbols.shape)
        return encode_symbols(symbols.numpy(), indexes, *self.tables())

    def decompress(self, data, shape):
        """bytes, (B, C, H, W) -> z_hat, the dequantized values, on the module's device."""
        B, C, H, W = shape
        indexes = np.broadcast_to(np.arange(C, dtype=np.int32).reshape(1, C, 1, 1), shape)
        symbols = torch.from_numpy(decode_symbols(data, indexes, *self.tables())).view(shape)
        z_hat = symbols.float() + to_cpu(self.medians).view(1, -1, 1, 1)
        return z_hat.to(self.quantiles.device)


def _standard_normal_cdf(x):
    return 0.5 * torch.erfc(-x / math.sqrt(2))


class GaussianConditional(_CodingTables):
    """y ~ N(means, scales^2) convolved with U(-1/2, 1/2): P(v) = Phi((v - mu + 1/2)/s) - Phi((v - mu - 1/2)/s).

    Coding uses a fixed, log-spaced table of 64 scales from 0.11 to 256; each element codes with the table scale
    nearest its own in log s (at most half a step, 6%, off; CompressAI's first scale >= s is up to a whole step
    wider). Scales are bounded below by 0.11 and likelihoods by 1e-9; the tables cover all but 1e-9 of the mass.
    """

    scale_bound, likelihood_bound, tail_mass = 0.11, 1e-9, 1e-9

    def __init__(self):
        super().__init__()
        scale_table = torch.from_numpy(tables.scale_table(0.11, 256, 64))     # the same on every CPU
        self.register_buffer("scale_table", scale_table.to(torch.float32))

    def likelihood(self, y_hat, scales, means=None):
        v = torch.abs(y_hat if means is None else y_hat - means)           # symmetric: evaluate on -|v|
        scales = lower_bound(scales, self.scale_bound)
        upper = _standard_normal_cdf((0.5 - v) / scales)
        lower = _standard_normal_cdf((-0.5 - v) / scales)
        return lower_bound(upper - lower, self.likelihood_bound)

    def forward(self, y, scales, means=None):
        """y, scales, means (B, M, h, w) -> y_hat for the decoder, likelihoods of the training proxy.
        In eval mode y_hat = round(y - means) + means is computed in the means' precision, as the coder does
        (float64 on the integer networks' grid), so it equals the decoder's y_hat exactly."""
        if self.training:
            y, scales = y.float(), scales.float()  # likelihoods need float32, even under bf16 autocast
            means = None if means is None else means.float()
            y_tilde, y_hat = quantize(y, "noise"), quantize(y, "ste", means)
        else:
            y_tilde = y_hat = quantize(y if means is None else y.to(means.dtype), "dequantize", means)
        with torch.autocast(y.device.type, enabled=False):
            return y_hat, self.likelihood(y_tilde.float(), scales.float(), None if means is None else means.float())

    @torch.no_grad()
    def update(self):
        """Freeze one integer CDF per table scale, covering +-(tail bound * scale); built the same on every
        machine (tables.py)."""
        cdfs, offsets = tables.gaussian_cdfs(to_cpu(self.scale_table).double().numpy(), self.tail_mass)
        self._set_tables(cdfs, offsets)

    def build_indexes(self, scales):
        """scales (any device) -> int32 CPU tensor: the index of the table scale nearest in log s, i.e. the
        number of geometric midpoints sqrt(s_i s_(i+1)) at or below s (a tie takes the wider table). Midpoints
        and scales on the integer grid are exact in float64, so every machine makes the same choice."""
        scales = to_cpu(scales).double().contiguous().clamp_min(self.scale_bound)
        levels = to_cpu(self.scale_table).double()          # float32 levels: their products are exact in float64,
        midpoints = torch.from_numpy(np.sqrt(levels[:-1].numpy() * levels[1:].numpy()))  # and IEEE rounds sqrt
        return torch.bucketize(scales, midpoints, right=True).to(torch.int32)

    def compress(self, y, indexes, means=None):
        """y, means on any device, int32 indexes from build_indexes (all of one shape, in coding order) -> bytes."""
        symbols = quantize(to_cpu(y), "symbols", None if means is None else to_cpu(means))
        return encode_symbols(symbols.numpy(), indexes.numpy(), *self.tables())

    def decompress(self, data, indexes, means=None):
        """bytes, indexes, means (of one shape) -> y_hat, with the means' device and precision."""
        symbols = torch.from_numpy(decode_symbols(data, indexes.numpy(), *self.tables())).view(indexes.shape)
        return symbols.float() if means is None else symbols.to(means) + means
