"""Bits <-> integers: a range coder and the two entropy models of a hyperprior codec.

Read me first -- the traps this file is built around:
  1. Encoder and decoder must make *bit-identical* decisions. Every quantity the coder sees is an integer
     (CDF tables with 16-bit precision, integer state), and the tables are frozen by `update()` after
     training: recomputing them from floats on the decoder side could drift by one unit and derail decoding.
  2. Every symbol needs a non-zero frequency, or it cannot be coded. `pmf_to_quantized_cdf` guarantees it.
  3. Tables cover a finite range. The last symbol of each table is an *escape*: values outside the range
     are coded as the escape followed by their exact value in bypass (uniform) bits, so any int32 survives.
  4. A range coder's low end can overflow ("carry") after bytes were already written. We keep the carry in
     the output buffer and propagate it backwards through 0xFF bytes -- simple, and it cannot run past the
     first byte because the coded interval never leaves [0, 1).
  5. The decoder must terminate on garbage. It decodes exactly as many symbols as asked and reads zeros past
     the end of the data. It cannot tell garbage from data in general: almost any byte string decodes to some
     symbols. What detects a damaged file is the container's CRC-32 (taco.py); the coder raises only where
     garbage shows for sure: a position in the rounding slack above the table, an escape length no int32 needs,
     a value outside int32.

The coder is plain Python over numpy arrays, compiled by numba. Set NUMBA_DISABLE_JIT=1 to step through it.

Entropy models: Balle et al. 2018, "Variational image compression with a scale hyperprior" (ICLR):
`EntropyBottleneck` is its non-parametric factorized density (for z), `GaussianConditional` its
discretized Gaussian (for y, with means as in Minnen et al. 2018).
"""
import copy
import math

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISION = 16                      # CDF tables sum to 2**16
STATE_BITS = 56                     # the coder's low end lives in [0, 2**56), one carry bit above
TOP = 1 << STATE_BITS
STATE_MASK = TOP - 1
BOTTOM = 1 << (STATE_BITS - 8)      # renormalize while range <= 2**48, so range >> 16 >= 2**32 > 0
HEAD_BYTES = STATE_BITS // 8        # the decoder primes its state with 7 bytes
LENGTH_BITS = 6                     # an escaped value's bit length is sent in 6 bypass bits
MAX_RAW_BITS = 34                   # |v - offset| < 2**33 for int32 v and offsets, so raw < 2**34
BYPASS_CHUNK = 16                   # raw bits go out 16 at a time
TABLE_BUFFERS = ("_quantized_cdf", "_cdf_length", "_offset")   # sized by update(), so any size loads


# ----------------------------------------------------------------------------------------------------------
# The range coder. The state is an interval [low, low + rng) inside [0, 2**56); coding a symbol of frequency
# `freq` starting at `start` (out of 2**precision) narrows it to its share. When the interval is small
# (rng <= 2**48) its top byte is settled and is shifted out -- the renormalization.
# ----------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _grow(out, pos):
    """Return `out`, doubled in size when fewer than 64 bytes are left after `pos`."""
    if pos + 64 <= out.size:
        return out
    bigger = np.zeros(2 * out.size + 64, dtype=np.uint8)
    bigger[:pos] = out[:pos]
    return bigger


@numba.njit(cache=True)
def _add_carry(out, pos):
    """Add 1 to the number written in out[:pos]: 0xFF bytes roll over to 0x00 and pass the carry up."""
    i = pos - 1
    while out[i] == 0xFF:
        out[i] = 0
        i -= 1
    out[i] += 1


@numba.njit(cache=True)
def _encode_interval(low, rng, out, pos, start, freq, precision):
    """Narrow [low, low + rng) to [start, start + freq) / 2**precision and shift out settled bytes."""
    r = rng >> precision
    low += r * start
    rng = r * freq
    if low >= TOP:                  # the sum overflowed into bytes already written
        low -= TOP
        _add_carry(out, pos)
    while rng <= BOTTOM:
        out[pos] = low >> (STATE_BITS - 8)
        pos += 1
        low = (low << 8) & STATE_MASK
        rng <<= 8
    return low, rng, pos


@numba.njit(cache=True)
def _decode_target(code, rng, precision):
    """The value in [0, 2**precision) that the decoder's position `code` points at."""
    r = rng >> precision
    value = code // r
    if value >= (1 << precision):   # only the rounding slack above r * 2**precision: no encoder goes there
        raise ValueError("corrupted stream: the decoder left the coded interval")
    return value


@numba.njit(cache=True)
def _decode_interval(code, rng, data, pos, start, freq, precision):
    """The decoder's twin of `_encode_interval`: remove [start, start + freq) and read settled bytes."""
    r = rng >> precision
    code -= r * start
    rng = r * freq
    while rng <= BOTTOM:
        byte = data[pos] if pos < data.size else 0       # past the end the stream reads as zeros
        code = (code << 8) | byte
        pos += 1
        rng <<= 8
    return code, rng, pos           # 0 <= code < rng still holds: the symbol was chosen so that it does


@numba.njit(cache=True)
def _encode(symbols, indexes, cdfs, cdf_lengths, offsets):
    out = np.zeros(64 + symbols.size // 2, dtype=np.uint8)
    low, rng, pos = np.int64(0), np.int64(TOP), 0
    for i in range(symbols.size):
        out = _grow(out, pos)
        k = indexes[i]
        cdf = cdfs[k]
        escape = cdf_lengths[k] - 2                   # symbols 0 .. escape-1 are regular
        s = np.int64(symbols[i]) - offsets[k]
        if 0 <= s < escape:
            low, rng, pos = _encode_interval(low, rng, out, pos, cdf[s], cdf[s + 1] - cdf[s], PRECISION)
            continue
        low, rng, pos = _encode_interval(low, rng, out, pos, cdf[escape], cdf[escape + 1] - cdf[escape],
                                         PRECISION)
        raw = -2 * s - 1 if s < 0 else 2 * (s - escape)   # zig-zag: sign into the lowest bit
        n_bits = 0
        while (raw >> n_bits) > 0:
            n_bits += 1
        low, rng, pos = _encode_interval(low, rng, out, pos, n_bits, 1, LENGTH_BITS)
        while n_bits > 0:
            chunk = min(BYPASS_CHUNK, n_bits)
            n_bits -= chunk
            bits = (raw >> n_bits) & ((1 << chunk) - 1)
            low, rng, pos = _encode_interval(low, rng, out, pos, bits, 1, chunk)
    # Flush: the decoder reads zeros past the end, so write the shortest prefix of a value in
    # [low, low + rng) whose remaining bytes are zero: low rounded up to a multiple of 2**(56 - 8 n).
    out = _grow(out, pos)
    n_bytes = 0
    unit = np.int64(TOP)
    value = (low + unit - 1) // unit * unit
    while value >= low + rng:
        n_bytes += 1
        unit >>= 8
        value = (low + unit - 1) // unit * unit
    if value >= TOP:                # rounding up carried
        value -= TOP
        _add_carry(out, pos)
    for j in range(n_bytes):
        out[pos] = (value >> (STATE_BITS - 8 - 8 * j)) & 0xFF
        pos += 1
    return out[:pos]


@numba.njit(cache=True)
def _decoder_start(data):
    """The decoder's state (code, rng, pos) after priming it with the first 7 bytes."""
    code = np.int64(0)
    for pos in range(HEAD_BYTES):
        code = (code << 8) | (data[pos] if pos < data.size else 0)
    return np.array([code, TOP, HEAD_BYTES], dtype=np.int64)


@numba.njit(cache=True)
def _decode(data, state, indexes, cdfs, cdf_lengths, offsets):
    """Decode len(indexes) values, continuing from `state` and leaving it where this call stopped."""
    symbols = np.empty(indexes.size, dtype=np.int32)
    code, rng, pos = state[0], state[1], state[2]
    for i in range(indexes.size):
        k = indexes[i]
        cdf = cdfs[k]
        escape = cdf_lengths[k] - 2
        target = _decode_target(code, rng, PRECISION)
        lo, hi = 0, escape + 1      # binary search: the s with cdf[s] <= target < cdf[s + 1]
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cdf[mid] <= target:
                lo = mid
            else:
                hi = mid
        s = np.int64(lo)
        code, rng, pos = _decode_interval(code, rng, data, pos, cdf[s], cdf[s + 1] - cdf[s], PRECISION)
        if s == escape:
            n_bits = _decode_target(code, rng, LENGTH_BITS)
            code, rng, pos = _decode_interval(code, rng, data, pos, n_bits, 1, LENGTH_BITS)
            if n_bits > MAX_RAW_BITS:
                raise ValueError("corrupted stream: impossible escape length")
            raw = np.int64(0)
            while n_bits > 0:
                chunk = min(BYPASS_CHUNK, n_bits)
                n_bits -= chunk
                bits = _decode_target(code, rng, chunk)
                code, rng, pos = _decode_interval(code, rng, data, pos, bits, 1, chunk)
                raw = (raw << chunk) | bits
            s = -((raw + 1) >> 1) if raw & 1 else (raw >> 1) + escape
        value = s + offsets[k]
        if value < -(1 << 31) or value >= (1 << 31):
            raise ValueError("corrupted stream: decoded value outside int32")
        symbols[i] = value
    state[0], state[1], state[2] = code, rng, pos
    return symbols


def check_cdfs(cdfs, cdf_lengths, offsets):
    """Raise ValueError unless every row is a CDF the coder can use (see the module docstring)."""
    cdfs, cdf_lengths, offsets = np.asarray(cdfs), np.asarray(cdf_lengths), np.asarray(offsets)
    if cdfs.ndim != 2 or cdf_lengths.shape != (cdfs.shape[0],) or offsets.shape != (cdfs.shape[0],):
        raise ValueError(f"cdf tables need shapes (K, L), (K,), (K,); got {cdfs.shape}, "
                         f"{cdf_lengths.shape}, {offsets.shape}")
    if np.any(cdf_lengths < 2) or np.any(cdf_lengths > cdfs.shape[1]):
        raise ValueError(f"cdf lengths must lie in [2, {cdfs.shape[1]}]")
    rows = np.arange(cdfs.shape[0])
    if np.any(cdfs[:, 0] != 0) or np.any(cdfs[rows, cdf_lengths - 1] != 1 << PRECISION):
        raise ValueError(f"every cdf must start at 0 and end at {1 << PRECISION}")
    inside = np.arange(1, cdfs.shape[1])[None, :] < cdf_lengths[:, None]
    if np.any((np.diff(cdfs.astype(np.int64), axis=1) <= 0) & inside):
        raise ValueError("cdfs must be strictly increasing: every symbol needs a non-zero frequency")


def _coder_arrays(indexes, cdfs, cdf_lengths, offsets):
    check_cdfs(cdfs, cdf_lengths, offsets)
    indexes = np.ascontiguousarray(indexes, dtype=np.int32).ravel()
    if indexes.size and (indexes.min() < 0 or indexes.max() >= len(cdfs)):
        raise ValueError(f"indexes must lie in [0, {len(cdfs)})")
    return (indexes, np.ascontiguousarray(cdfs, dtype=np.int32), np.ascontiguousarray(cdf_lengths, np.int32),
            np.ascontiguousarray(offsets, dtype=np.int64))


def encode_symbols(symbols, indexes, cdfs, cdf_lengths, offsets):
    """Code int32 `symbols[i]` with the table row `indexes[i]`; return the bytes."""
    indexes, cdfs, cdf_lengths, offsets = _coder_arrays(indexes, cdfs, cdf_lengths, offsets)
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
    if symbols.size != indexes.size:
        raise ValueError(f"{symbols.size} symbols but {indexes.size} indexes")
    return _encode(symbols, indexes, cdfs, cdf_lengths, offsets).tobytes()


def decode_symbols(data, indexes, cdfs, cdf_lengths, offsets):
    """Decode `len(indexes)` int32 values from `data` (the inverse of `encode_symbols`)."""
    return SymbolDecoder(data).decode(indexes, cdfs, cdf_lengths, offsets)


class SymbolDecoder:
    """One stream decoded in several calls, for models whose later tables depend on values decoded earlier
    (the checkerboard and channel contexts of elic.py). The calls must ask for the symbols in the order in
    which they were encoded, with the same indexes."""

    def __init__(self, data):
        self.data = np.frombuffer(bytes(data), dtype=np.uint8)
        self.state = _decoder_start(self.data)

    def decode(self, indexes, cdfs, cdf_lengths, offsets):
        indexes, cdfs, cdf_lengths, offsets = _coder_arrays(indexes, cdfs, cdf_lengths, offsets)
        return _decode(self.data, self.state, indexes, cdfs, cdf_lengths, offsets)


def sample_from_tables(rng, cdfs, cdf_lengths, offsets, indexes):
    """Draw one value per index from that row's own quantized distribution (escape excluded), and the ideal
    code length of them all in bits, -sum log2(freq / 2**16): what tests and benchmarks hold the coder to."""
    values, bits = np.empty(len(indexes), dtype=np.int32), 0.0
    for k in np.unique(indexes):
        where = np.flatnonzero(indexes == k)
        freqs = np.diff(cdfs[k, :cdf_lengths[k]]).astype(np.float64)[:-1]   # regular symbols only
        s = rng.choice(len(freqs), size=len(where), p=freqs / freqs.sum())
        values[where] = s + offsets[k]
        bits -= np.log2(freqs[s] / (1 << PRECISION)).sum()
    return values, bits


def pmf_to_quantized_cdf(pmf, tail_mass, precision=PRECISION):
    """Turn a float pmf plus the mass of its tails into an int32 CDF of length len(pmf) + 2.

    The tail mass becomes the escape symbol. Every symbol gets a frequency >= 1 and the total is exactly
    2**precision. Rounding leaves an excess (or a shortfall); it is settled one unit at a time where a unit
    costs the fewest bits: taking one from frequency f of a symbol with probability p costs p*log2(f/(f-1)) bits
    per coded symbol on average, giving one gains p*log2((f+1)/f). (Taking whole symbols down to frequency 1
    would cost far more at wide scales, where thousands of tail symbols each claim their minimum unit.)
    """
    pmf = np.append(np.clip(np.asarray(pmf, dtype=np.float64), 0, None), max(float(tail_mass), 0.0))
    total = 1 << precision
    if len(pmf) > total or not np.isfinite(pmf).all() or pmf.sum() <= 0:
        raise ValueError("pmf must be finite, non-zero, and shorter than 2**precision")
    p = pmf / pmf.sum()
    freqs = np.maximum(1, np.round(p * total)).astype(np.int64)
    excess = int(freqs.sum()) - total
    while excess != 0:      # each round moves one unit on each of the cheapest half: close to one at a time
        if excess > 0:
            cost = np.full(len(p), np.inf)
            can = freqs > 1
            cost[can] = p[can] * np.log2(freqs[can] / (freqs[can] - 1))
            n = max(1, min(excess, int(can.sum())) // 2)
            freqs[np.argsort(cost, kind="stable")[:n]] -= 1
            excess -= n
        else:
            gain = p * np.log2((freqs + 1) / freqs)
            n = max(1, min(-excess, len(p)) // 2)
            freqs[np.argsort(-gain, kind="stable")[:n]] += 1
            excess += n
    return np.concatenate([[0], np.cumsum(freqs)]).astype(np.int32)


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
    a detached CPU copy. Everything the coder reads passes through here, inside the entropy models."""
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
    """

    def __init__(self, channels, tail_mass=1e-9, init_scale=10.0, filters=(3, 3, 3, 3)):
        super().__init__()
        self.tail_mass = tail_mass
        widths = (1,) + tuple(filters) + (1,)
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
        """Freeze integer CDF tables, one per channel, over [q_low, q_high] around the median. The density is
        evaluated once for all channels, each on its own grid (padded to the longest), on a CPU copy."""
        density = copy.deepcopy(self).cpu()
        medians = density.quantiles[:, 0, 1]                                # (C,)
        lows = torch.ceil(medians - density.quantiles[:, 0, 0]).clamp_min(0).long()
        highs = torch.ceil(density.quantiles[:, 0, 2] - medians).clamp_min(0).long()
        steps = torch.arange(int((lows + highs).max()) + 1)[None, :] - lows[:, None]      # (C, L)
        v = (medians[:, None] + steps.to(medians.dtype))[:, None, :]        # (C, 1, L), v = median + k
        pmf = density._likelihood(v)[:, 0]                                  # (C, L)
        lower = density._logits_cumulative(v[:, :, :1] - 0.5)[:, 0, 0]      # below each channel's first bin
        last = (medians + highs.to(medians.dtype)).view(-1, 1, 1)
        upper = density._logits_cumulative(last + 0.5)[:, 0, 0]             # above each channel's last bin
        tails = torch.sigmoid(lower) + torch.sigmoid(-upper)
        cdfs = [pmf_to_quantized_cdf(pmf[c, :lows[c] + highs[c] + 1].double().numpy(), float(tails[c]))
                for c in range(len(medians))]
        self._set_tables(cdfs, (-lows).tolist())

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

    Coding uses a fixed, log-spaced table of scales; each element codes with the first table scale >= its own
    (slightly wider than needed, never narrower, so rare values do not blow up the rate).
    """

    def __init__(self, scale_table=None, scale_bound=0.11, likelihood_bound=1e-9, tail_mass=1e-9):
        super().__init__()
        if scale_table is None:
            scale_table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
        self.register_buffer("scale_table", torch.as_tensor(scale_table, dtype=torch.float32))
        self.scale_bound, self.likelihood_bound, self.tail_mass = scale_bound, likelihood_bound, tail_mass

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
        """Freeze one integer CDF per table scale, covering +-(tail bound * scale)."""
        tail_bound = -torch.special.ndtri(torch.tensor(self.tail_mass / 2, dtype=torch.float64))
        cdfs, offsets = [], []
        for s in to_cpu(self.scale_table).double():
            half = int(torch.ceil(s * tail_bound))
            v = torch.arange(-half, half + 1, dtype=torch.float64)
            pmf = _standard_normal_cdf((0.5 - v.abs()) / s) - _standard_normal_cdf((-0.5 - v.abs()) / s)
            tail = 2 * _standard_normal_cdf(torch.tensor(-half - 0.5, dtype=torch.float64) / s)
            cdfs.append(pmf_to_quantized_cdf(pmf.numpy(), float(tail)))
            offsets.append(-half)
        self._set_tables(cdfs, offsets)

    def build_indexes(self, scales):
        """scales (any device) -> int32 CPU tensor: index of the first table entry >= the (bounded) scale.
        The comparison runs in float64, where both the table and scales on the integer grid are exact."""
        scales = to_cpu(scales).double().contiguous().clamp_min(self.scale_bound)
        idx = torch.bucketize(scales, to_cpu(self.scale_table).double())
        return idx.clamp_max(len(self.scale_table) - 1).to(torch.int32)

    def compress(self, y, indexes, means=None):
        """y, means (B, M, h, w) on any device, indexes from build_indexes -> bytes."""
        symbols = quantize(to_cpu(y), "symbols", None if means is None else to_cpu(means))
        return encode_symbols(symbols.numpy(), indexes.numpy(), *self.tables())

    def decompress(self, data, indexes, means=None):
        """bytes, indexes (B, M, h, w), means -> y_hat, with the means' device and precision."""
        symbols = torch.from_numpy(decode_symbols(data, indexes.numpy(), *self.tables())).view(indexes.shape)
        return symbols.float() if means is None else symbols.to(means) + means
