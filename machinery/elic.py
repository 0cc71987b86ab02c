"""The paper's exact model: TACO on the ELIC backbone (He et al., CVPR 2022), able to load the released
checkpoints (lambda_{0.0008,...,0.015}.pth.tar) of the reference implementation.

What changes from taco.py's hyperprior (the text adapter, the entropy coder and the file format are reused):
  - g_a / g_s: 5x5 stride-2 convolutions with three residual bottleneck blocks per stage and two simplified
    attention blocks (Cheng et al. 2020); Injector / Extractor / Injector sit at the reference's indexes 8, 14, 15.
  - y is coded in uneven channel slices [16, 16, 32, 64, 192], each in two checkerboard passes: the anchors
    (row + column odd) from the hyperprior and the slices before it (channel context), then the non-anchors
    with the decoded anchors as well (local context). Everything the decoder needs for a pass is decoded
    before it, so one stream holds all passes, decoded in several calls (entropy.SymbolDecoder).
Module names reproduce the reference's state-dict keys, which is how checkpoints.load_released loads the released
files.
"""
from collections import OrderedDict
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import taco
from entropy import quantize, to_cpu
from machinery import banded, bands, container
from machinery.integer import FRACTION_BITS, IntegerNetwork
from taco import Extractor, Injector, conv, deconv

ANCHOR, NONANCHOR = "anchor", "non-anchor"


def checkerboard(kind, height, width, device=None, top=0):
    """(height, width) bool: anchors where row + column is odd (the reference's layout), the rest otherwise;
    `top`: the first row's index in y, for a band of rows."""
    rows = torch.arange(top, top + height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    odd = (rows + columns) % 2 == 1
    return odd if kind == ANCHOR else ~odd


def reads_anchors(dy, dx):
    """The local context's taps that matter: its input is zero except at the anchors and its outputs are used
    at the non-anchors only, which see anchors at the offsets (dy, dx) with dy + dx odd (12 of a 5x5 kernel's
    25 taps); the integer local context computes those alone (its outputs at the anchors are then not the
    convolution's, and unused)."""
    return (dy + dx) % 2 == 1


def conv1x1(cin, cout):
    return nn.Conv2d(cin, cout, 1)


def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)


def bottleneck_branch(N):
    return nn.Sequential(conv1x1(N, N // 2), nn.ReLU(), conv3x3(N // 2, N // 2), nn.ReLU(), conv1x1(N // 2, N))


class ResidualBottleneck(nn.Module):
    """x + branch(x), the branch squeezing to N/2 channels (ELIC)."""

    def __init__(self, N):
        super().__init__()
        self.branch = bottleneck_branch(N)

    def forward(self, x):
        return x + self.branch(x)


class ResidualUnit(nn.Module):
    def __init__(self, N):
        super().__init__()
        self.conv = bottleneck_branch(N)

    def forward(self, x):
        return F.relu(x + self.conv(x))


class AttentionBlock(nn.Module):
    """Cheng et al. 2020's simplified attention: x + trunk(x) * sigmoid(mask(x)), no non-local part."""

    def __init__(self, N):
        super().__init__()
        self.conv_a = nn.Sequential(ResidualUnit(N), ResidualUnit(N), ResidualUnit(N))
        self.conv_b = nn.Sequential(ResidualUnit(N), ResidualUnit(N), ResidualUnit(N), conv1x1(N, N))

    def forward(self, x):
        return x + self.conv_a(x) * torch.sigmoid(self.conv_b(x))


def stage(cin, N):
    """A stride-2 convolution followed by three residual bottleneck blocks."""
    return [conv(cin, N), ResidualBottleneck(N), ResidualBottleneck(N), ResidualBottleneck(N)]


class ElicAnalysis(nn.Module):
    def __init__(self, config):
        super().__init__()
        N, M, D, heads = config.N, config.M, config.text_dim, config.heads
        self.analysis_transform = nn.Sequential(
            *stage(3, N), *stage(N, N), Injector(N, D, heads), AttentionBlock(N),          # 0-9, 1/4
            *stage(N, N), Extractor(N, D, heads), Injector(N, D, heads),                  # 10-15, 1/8
            conv(N, M), AttentionBlock(M))                                               # 16-17, 1/16

    def forward(self, x, text, padding=None):
        return banded.run_analysis(self.analysis_transform, x, text, padding)  # (B, M, H/16, W/16)


# The other networks are Sequentials named as the reference's modules, so that its state-dict keys load as they are
def named(name, *layers):
    return nn.Sequential(OrderedDict([(name, nn.Sequential(*layers))]))


def synthesis(N, M):
    blocks = lambda: [ResidualBottleneck(N), ResidualBottleneck(N), ResidualBottleneck(N)]   # noqa: E731
    return named("synthesis_transform", AttentionBlock(M), deconv(M, N), *blocks(), deconv(N, N), AttentionBlock(N),
                 *blocks(), deconv(N, N), *blocks(), deconv(N, 3))                # (B, 3, H, W)


def hyper_analysis(N, M):
    return named("reduction", conv3x3(M, N), nn.ReLU(), conv(N, N), nn.ReLU(), conv(N, N))   # (B, N, H/64, W/64)


def hyper_synthesis(N, M):
    return named("increase", deconv(N, M), nn.ReLU(), deconv(M, M * 3 // 2), nn.ReLU(),
                 deconv(M * 3 // 2, 2 * M, kernel=3, stride=1))                 # (B, 2M, H/16, W/16)


def channel_context(cin, cout):
    """Slices decoded so far -> 2C context channels for the next slice ("fushion" (sic): the reference's key)."""
    return named("fushion", nn.Conv2d(cin, 224, 5, padding=2), nn.ReLU(), nn.Conv2d(224, 128, 5, padding=2),
                 nn.ReLU(), nn.Conv2d(128, cout, 5, padding=2))


def entropy_parameters(cin, cout):
    """Context and hyperprior features -> (scales, means) of one slice and pass, by 1x1 convolutions."""
    return named("fusion", conv1x1(cin, cout * 5 // 3), nn.ReLU(), conv1x1(cout * 5 // 3, cout * 4 // 3), nn.ReLU(),
                 conv1x1(cout * 4 // 3, cout))


class ElicTACO(taco.TACO):
    """TACO as released: ELIC transforms, text adapter, checkerboard + channel-context entropy model."""

    default_memory = 4 * banded.DEFAULT_MEMORY   # its transforms' halos are 16 rows of y (hyperprior: 3)

    def __init__(self, config):
        if not config.text_adapter:
            raise ValueError("the ELIC backbone is the paper's TACO and always has its text adapter")
        super().__init__(config)
        M, slices = config.M, config.slices
        if sum(slices) != M:
            raise ValueError(f"slices {slices} must add up to M = {M}")
        self.local_context = nn.ModuleList(nn.Conv2d(c, 2 * c, 5, padding=2) for c in slices)
        self.channel_context = nn.ModuleList(channel_context(sum(slices[:i]), 2 * c) if i else None
                                             for i, c in enumerate(slices))
        self.entropy_parameters_anchor = nn.ModuleList(
            entropy_parameters(2 * M + (2 * c if i else 0), 2 * c) for i, c in enumerate(slices))
        self.entropy_parameters_nonanchor = nn.ModuleList(
            entropy_parameters(2 * M + (4 * c if i else 2 * c), 2 * c) for i, c in enumerate(slices))

    def transforms(self, config):
        N, M = config.N, config.M
        return ElicAnalysis(config), synthesis(N, M), hyper_analysis(N, M), hyper_synthesis(N, M)

    def float_networks(self):
        return SimpleNamespace(h_s=self.h_s, channel_context=self.channel_context, local_context=self.local_context,
                               anchor=self.entropy_parameters_anchor, nonanchor=self.entropy_parameters_nonanchor)

    def integer_networks(self):
        """h_s and every context and parameter network in exact integers: their inputs are decoded values,
        so the whole chain must agree on every machine (integer.py)."""
        return SimpleNamespace(
            h_s=IntegerNetwork(self.h_s.increase),
            channel_context=[IntegerNetwork(m.fushion) if m is not None else None for m in self.channel_context],
            local_context=[IntegerNetwork(m, keep=reads_anchors) for m in self.local_context],
            anchor=[IntegerNetwork(m.fusion) for m in self.entropy_parameters_anchor],
            nonanchor=[IntegerNetwork(m.fusion) for m in self.entropy_parameters_nonanchor])

    def checkerboard_passes(self, hyper, code, nets):
        """Both checkerboard passes of every slice, in coding order. `code(i, pass, scales, means)` returns
        that pass's values of slice i (zeros elsewhere). forward, compress and decompress all run this one
        loop, so encoder and decoder visit the symbols in the same order by construction."""
        y_hat_slices = []
        for i in range(len(self.config.slices)):
            context = [nets.channel_context[i](torch.cat(y_hat_slices, dim=1))] if i else []
            scales, means = nets.anchor[i](torch.cat(context + [hyper], dim=1)).chunk(2, 1)
            anchor = code(i, ANCHOR, scales, means)                             # (B, C_i, h, w)
            local = [nets.local_context[i](anchor)]
            features = torch.cat(local + context + [hyper], dim=1)
            scales, means = nets.nonanchor[i](features).chunk(2, 1)
            y_hat_slices.append(anchor + code(i, NONANCHOR, scales, means))
        return torch.cat(y_hat_slices, dim=1)                                   # (B, M, h, w)

    def y_model(self, y, hyper, nets):
        slices = y.split(self.config.slices, dim=1)
        likelihoods = [torch.ones_like(s) for s in slices]

        def code(i, kind, scales, means):
            mask = checkerboard(kind, *y.shape[-2:], device=y.device)
            y_hat, slice_likelihoods = self.gaussian_conditional(slices[i], scales, means)
            likelihoods[i] = torch.where(mask, slice_likelihoods, likelihoods[i])
            return y_hat * mask
        y_hat = self.checkerboard_passes(hyper, code, nets)
        return y_hat, torch.cat(likelihoods, dim=1)

    def coding_passes(self, y_hat, hyper, nets, code, memory=None, progress=None):
        """The passes of checkerboard_passes in the same order, for compress and decompress, from h_s(z_hat) on the
        integer grid (`hyper`: float64 as h_s gives it, or int32 as hyper_in_bands keeps it; the passes read int32,
        exact). code(i, kind, rows, scales, means) codes that pass's symbols in a band of rows (row by row, each row all
        channels of the slice, left to right) and writes their values into y_hat (1, M, h, w), from which the contexts
        read: int32 on the integer networks' grid (the means are on it, so y_hat is too), exact in half the bytes of
        float64. The parameter networks (1x1 convolutions) run at the pass's positions only, gathered (`gather`), where
        the float path computes every position and keeps half; so scales and means come gathered. Each slice's channel
        context at the non-anchor positions is kept from its anchor pass to its second pass. memory None: every pass in
        one band of all rows, each network over its whole input; else bands of rows within `memory`
        (machinery/banded.py)."""
        hyper = hyper if hyper.dtype == torch.int32 else to_grid(hyper)         # (1, 2M, h, w), int32
        h, w = y_hat.shape[-2:]
        whole = slice(0, h), slice(0, w)

        def networks(i, kind):                          # what the pass runs, the widest sizing its bands
            return [nets.h_s] + ([nets.channel_context[i]] if i and kind == ANCHOR else []) + \
                ([nets.local_context[i]] if kind == NONANCHOR else [])

        def row_bands(i, kind):
            if memory is None:
                return [whole[0]]
            return banded.latent_bands(max(networks(i, kind), key=bands.bytes_per_output), h, w, self.config.M, memory)

        def run(network, read, rows):                  # network(input) at the rows `rows` of y, all columns
            if memory is None:
                return network(read(*whole))
            return bands.run_block(network, read, (h, w), (rows.start, rows.stop), (0, w))
        starts = [sum(self.config.slices[:i]) for i in range(len(self.config.slices) + 1)]
        work = [(i, kind, rows) for i in range(len(self.config.slices)) for kind in (ANCHOR, NONANCHOR)
                for rows in row_bands(i, kind)]                                 # every pass's bands, in order
        for i, kind, rows in work if memory is None else bands.each(work, "coding", progress):
            own, top = slice(starts[i], starts[i + 1]), rows.start
            if i and kind == ANCHOR and top == 0:   # the channel context, from the anchor pass to the second
                later = torch.zeros(1, 2 * self.config.slices[i], h, (w + 1) // 2, dtype=torch.int32,
                                    device=y_hat.device)
            anchors = lambda r, c: from_grid(y_hat[:, own, r, c]) * checkerboard(  # noqa: E731
                ANCHOR, r.stop - r.start, w, device=y_hat.device, top=r.start)[:, c]
            features = [from_grid(gather(hyper[:, :, rows], kind, top))]
            if i and kind == ANCHOR:
                read = lambda r, c: from_grid(y_hat[:, :starts[i], r, c])  # noqa: E731
                context = run(nets.channel_context[i], read, rows)
                later[:, :, rows] = gather(to_grid(context), NONANCHOR, top)
                features.insert(0, gather(context, ANCHOR, top))
            elif i:
                features.insert(0, from_grid(later[:, :, rows]))
            if kind == NONANCHOR:
                local = run(nets.local_context[i], anchors, rows)
                features.insert(0, gather(local, NONANCHOR, top))
            parameters = (nets.anchor if kind == ANCHOR else nets.nonanchor)[i]
            scales, means = parameters(torch.cat(features, dim=1)).chunk(2, 1)   # 2 x (1, C_i, rows, ~w/2)
            code(own, kind, rows, scales, means)

    def hyper_in_bands(self, z_hat, nets, memory):
        """h_s(z_hat) on the integer grid, int32 (1, 2M, h, w), computed over bands of rows of y."""
        h, w = bands.output_size(nets.h_s, z_hat.shape[-2:])
        hyper = torch.empty(1, 2 * self.config.M, h, w, dtype=torch.int32, device=z_hat.device)
        for rows, rows_hyper in banded.hyperprior_rows(nets.h_s, z_hat, self.config.M, memory):
            hyper[:, :, rows] = to_grid(rows_hyper)
        return hyper

    def encode_y(self, y, hyper, nets, memory=None, progress=None):
        """Consumes y (float32): y and y_hat share its buffer. A position holds y until it is coded, then y_hat
        (int32 on the grid, the same 4 bytes); the contexts read coded positions only, through the int32 view.
        hyper: h_s(z_hat) (float64, on the grid), or int32 on the grid (hyper_in_bands)."""
        if y.dtype != torch.float32:
            raise TypeError(f"encode_y takes y as g_a gives it, float32, not {y.dtype}")
        encoder = container.CheckedEncoder(self.gaussian_conditional.tables())
        y_hat = y.view(torch.int32)

        def code(own, kind, rows, scales, means):
            values = gather(y[:, own, rows], kind, rows.start).double()         # (1, C_i, rows, ~w/2)
            where = in_raster(to_cpu(gathered(kind, rows, y.shape[-1])), values.shape)
            indexes = taco.raster(self.gaussian_conditional.build_indexes(scales))[where]
            symbols = taco.raster(quantize(to_cpu(values), "symbols", to_cpu(means)))[where]
            encoder.encode(symbols, indexes)
            scatter(to_grid(quantize(values, "dequantize", means)), kind, rows.start, y_hat[:, own, rows])
        self.coding_passes(y_hat, hyper, nets, code, memory, progress)
        return encoder.finish()

    def decode_y(self, y_bytes, hyper, nets, decisions, memory=None, progress=None):
        decoder = container.CheckedDecoder(y_bytes, self.gaussian_conditional.tables(), decisions)
        h, w = hyper.shape[-2:]
        y_hat = torch.zeros(1, self.config.M, h, w, dtype=torch.int32, device=hyper.device)

        def code(own, kind, rows, scales, means):
            where = in_raster(to_cpu(gathered(kind, rows, w)), scales.shape)
            indexes = taco.raster(self.gaussian_conditional.build_indexes(scales))[where]
            values = torch.zeros(taco.raster(scales).shape, dtype=torch.float64)
            values[where] = decoder.decode(indexes).double()
            scatter(to_grid(taco.raster(values).to(means) + means), kind, rows.start, y_hat[:, own, rows])
        self.coding_passes(y_hat, hyper, nets, code, memory, progress)
        decoder.finish()
        return from_grid(y_hat)

    def encode_y_in_bands(self, y, z_hat, nets, memory, progress=None):
        return self.encode_y(y, self.hyper_in_bands(z_hat, nets, memory), nets, memory, progress)

    def decode_y_in_bands(self, y_bytes, z_hat, nets, decisions, memory, progress=None):
        return self.decode_y(y_bytes, self.hyper_in_bands(z_hat, nets, memory), nets, decisions, memory, progress)


def in_raster(mask, shape):
    """A band's mask (rows, n) as a selection of its raster order (1, rows, C, n) for tensors of `shape`
    (1, C, rows, n)."""
    B, C, rows, n = shape
    return mask[None, :, None, :].expand(B, rows, C, n)


def first_column(kind, row):
    """The column of the first position of `kind` in row `row` of y (anchors: row + column odd)."""
    return (row + 1) % 2 if kind == ANCHOR else row % 2


def gather(values, kind, top):
    """(1, C, rows, w) -> (1, C, rows, ceil(w/2)): each row's values at the positions of `kind`, left to right,
    zero-padded where a row has fewer; `top` is the first row's index in y."""
    kept = values.new_zeros(*values.shape[:3], (values.shape[3] + 1) // 2)
    for column in (0, 1):
        first = (column - first_column(kind, top)) % 2          # the band's rows whose positions start there
        part = values[:, :, first::2, column::2]
        kept[:, :, first::2, :part.shape[3]] = part
    return kept


def scatter(kept, kind, top, out):
    """The inverse of gather(): writes kept (1, C, rows, ceil(w/2)) into the positions of `kind` of out
    (1, C, rows, w), in place; the other positions keep their values."""
    for column in (0, 1):
        first = (column - first_column(kind, top)) % 2
        part = out[:, :, first::2, column::2]
        part[...] = kept[:, :, first::2, :part.shape[3]]


def gathered(kind, rows, width):
    """(rows, ceil(w/2)) bool: which entries of gather()'s output are positions of `kind` (not padding)."""
    lengths = torch.tensor([(width - first_column(kind, r) + 1) // 2 for r in range(rows.start, rows.stop)])
    return torch.arange((width + 1) // 2)[None, :] < lengths[:, None]


def to_grid(values):
    """Values on the integer networks' grid (float64, at 2**-16) -> the exact integers, int32. Their outputs are
    within +-8192; y_hat = symbol + mean saturates at +-32768, which only a forged file's symbols reach (the
    contexts clamp their inputs to +-8192 in any case, integer.to_fixed)."""
    limit = 2.0 ** 31 - 1
    return torch.round(values * 2.0 ** FRACTION_BITS).clamp(-limit, limit).to(torch.int32)


def from_grid(integers):
    return integers.double() * 2.0 ** -FRACTION_BITS


# The released checkpoints' configuration (machinery/checkpoints.py loads them)
OFFICIAL = taco.TacoConfig(N=192, M=320, backbone="elic", text_adapter=True, clip_model="ViT-B-32-quickgelu",
                           clip_pretrained="openai", text_tokens=38, text_dim=512, heads=8)
