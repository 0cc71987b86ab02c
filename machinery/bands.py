"""Bands: a network over a large image piece by piece, exactly as in one piece.

Why. g_a and g_s hold 128-320 channels at half and quarter resolution: run in one piece, a 24-megapixel photo
needs ~13 GB. Only the latents (y and z, 1/256 of the pixels each) and the 8-bit image need to be whole; every
network runs over blocks of its output -- bands of rows, cut into columns when a row alone is too wide.

Exact halos. An output element of a convolution depends on a fixed window of its input. Traced back through
the layers, the windows give for a block of output positions the block of input that it needs: its halo.
Per dimension, for output positions [lo, hi):
    Conv2d (kernel k, stride s, padding p)       input [lo*s - p, (hi - 1)*s - p + k)
    ConvTranspose2d (k, s, p): o = i*s - p + t   input [ceil((lo + p - k + 1) / s), floor((hi - 1 + p) / s) + 1)
    per-position layers                          [lo, hi): activations, GDN (it mixes channels, not positions),
                                                 the Injector (each position queries the caption alone), the
                                                 Extractor (x passes through it unchanged)
    x + f(x) (residual and attention blocks)     the union of f's window and [lo, hi)
    a chain of layers                            the rules applied from the last layer back to the first
Running the network on that input block and keeping the wanted outputs gives what the whole input gives when
  - the block starts at a multiple of the network's total stride, so that its stride grids are the whole's, and
  - a window that leaves the input is cut at the input's edge, where the layers pad exactly as in one piece.
Every kept output then sees exactly the inputs it sees in one piece: the block's own cut edges, padded with
zeros where the whole has values, lie outside the window of every kept output. In exact arithmetic (the
integer networks) bands equal the whole bit for bit; in float32 they agree to rounding, as a matrix product of
another size may sum in another order.

The one global operation is the Extractor's attention, whose softmax runs over every position: banded.py feeds
it all positions block by block (an online softmax) before the bands that need its result.
"""
import ctypes
import ctypes.util
import math
from fractions import Fraction

import torch
import torch.nn as nn

from machinery.images import to_unit
from machinery.integer import IntegerConv, IntegerNetwork

# The layers that mix channels, never positions: activations, GDN, the Injector (each position queries the caption
# alone), the Extractor (x passes through it unchanged). By class name: the models import this package.
PER_POSITION = {"ReLU", "LeakyReLU", "Sigmoid", "Identity", "IntegerReLU", "IntegerLeakyReLU", "GDN", "Injector",
                "Extractor"}
# x + f(x) blocks (elic.py): the attributes holding their branches f, whose window is the block's
RESIDUAL_BRANCHES = {"ResidualBottleneck": ("branch",), "ResidualUnit": ("conv",),
                     "AttentionBlock": ("conv_a", "conv_b")}
WORKING_COPIES = 4       # a layer's input, output and up to two temporaries (GDN's x*x and norm) live at once


def convolution(layer, dim):
    """(kernel, stride, padding, transposed) of a Conv2d, ConvTranspose2d or IntegerConv along `dim`; else None."""
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return (layer.kernel_size[dim], layer.stride[dim], layer.padding[dim],
                isinstance(layer, nn.ConvTranspose2d))
    if isinstance(layer, IntegerConv):
        return layer.weight.shape[2 + dim], layer.stride[dim], layer.padding[dim], layer.transposed
    return None


def chain(layer):
    """The layers that x passes through in order, or None for a layer that is not a chain."""
    if isinstance(layer, (list, nn.Sequential)):
        return list(layer)
    if isinstance(layer, IntegerNetwork):
        return layer.layers
    return None


def branches(layer):
    """The residual branches of an x + f(x) block, as modules; () for any other layer."""
    return [getattr(layer, name) for name in RESIDUAL_BRANCHES.get(type(layer).__name__, ())]


def window(layer, lo, hi, dim):
    """Output positions [lo, hi) of `layer` along `dim` -> the input positions [lo', hi') they depend on
    (not cut at the input's edges)."""
    if (conv := convolution(layer, dim)) is not None:
        k, s, p, transposed = conv
        if transposed:
            return -(-(lo + p - k + 1) // s), (hi - 1 + p) // s + 1
        return lo * s - p, (hi - 1) * s - p + k
    if (parts := chain(layer)) is not None:
        for part in reversed(parts):
            lo, hi = window(part, lo, hi, dim)
        return lo, hi
    if type(layer).__name__ in PER_POSITION:
        return lo, hi
    if spans := [window(branch, lo, hi, dim) for branch in branches(layer)]:   # x + f(x): the union of windows
        return min([lo] + [a for a, _ in spans]), max([hi] + [b for _, b in spans])
    raise TypeError(f"no halo rule for {type(layer).__name__}: it cannot run in bands")


def grid(layer, dim):
    """(scale, alignment) along `dim`: output positions per input position (a Fraction), and the multiple at
    which an input block must start so that every strided layer inside sees its own grid."""
    if (conv := convolution(layer, dim)) is not None:
        _, s, _, transposed = conv
        return (Fraction(s), 1) if transposed else (Fraction(1, s), s)
    if (parts := chain(layer)) is not None:
        scale, alignment = Fraction(1), 1
        for part in parts:
            part_scale, part_alignment = grid(part, dim)
            # the part's input starts at start * scale, which must be a multiple of part_alignment
            alignment = math.lcm(alignment, (Fraction(part_alignment) / scale).numerator)
            scale *= part_scale
        return scale, alignment
    if parts := branches(layer):
        alignment = 1
        for branch in parts:
            branch_scale, branch_alignment = grid(branch, dim)
            assert branch_scale == 1, "a residual branch keeps the resolution"
            alignment = math.lcm(alignment, branch_alignment)
        return Fraction(1), alignment
    window(layer, 0, 1, dim)                                    # raises for a layer without a rule
    return Fraction(1), 1


def input_block(layer, lo, hi, size, dim):
    """-> (start, stop, offset): run `layer` on input positions [start, stop) of an input of `size`, and output
    position `lo` is at `offset` in the result."""
    first, last = window(layer, lo, hi, dim)
    scale, alignment = grid(layer, dim)
    start = max(first, 0) // alignment * alignment
    return start, min(last, size), lo - int(start * scale)


def run_block(layer, read, size, rows, columns, compute=None):
    """Output block rows x columns ((start, stop) each) of layer(whole input), from its input block alone.
    read(rows, columns) gives the input block (..., rows, columns) for two slices inside `size` (height,
    width); compute(input) runs the network (default: layer itself, which also gives the geometry)."""
    (r0, r1), (c0, c1) = rows, columns
    rs, re, ro = input_block(layer, r0, r1, size[0], 0)
    cs, ce, co = input_block(layer, c0, c1, size[1], 1)
    out = (compute or layer)(channels_last(read(slice(rs, re), slice(cs, ce))))
    return out[..., ro:ro + r1 - r0, co:co + c1 - c0]


def channels_last(x):
    """A block of float features in the channels-last layout, as taco.coding_layout lays out a whole image, so that
    a block computes the floats of one piece. The integer networks (float64 matrix products) lay out their own."""
    if x.dim() == 4 and x.is_floating_point() and x.dtype != torch.float64 and x.device.type in ("cpu", "cuda"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def output_size(layer, size):
    """(height, width) of layer's output for an input of `size`, from the layers' own size formulas."""
    return tuple(output_length(layer, n, dim) for dim, n in enumerate(size))


def output_length(layer, n, dim):
    if (conv := convolution(layer, dim)) is not None:
        k, s, p, transposed = conv
        return (n - 1) * s - 2 * p + k + layer.output_padding[dim] if transposed else (n + 2 * p - k) // s + 1
    for part in chain(layer) or []:
        n = output_length(part, n, dim)
    return n


def run(layer, read, size, out_size, memory, write, compute=None, unit=1, progress=None, stage=None):
    """layer(whole input) over blocks of its output, each within about `memory` bytes of work (its halo included):
    write(rows, columns, block) receives each block as it finishes, progress(stage, done, total) hears of it."""
    tiles = blocks(*out_size, memory / bytes_per_output(layer), unit, (halo(layer, 0), halo(layer, 1)))
    for rows, columns in each(tiles, stage, progress):
        write(slice(*rows), slice(*columns), run_block(layer, read, size, rows, columns, compute))


def each(pieces, stage, progress=None):
    """The pieces of a banded computation one at a time, each followed by the memory handed back and a word to
    progress(stage, done, total): every band loop's steps."""
    for done, piece in enumerate(pieces):
        yield piece
        release_memory(len(pieces))
        if progress is not None:
            progress(stage, done + 1, len(pieces))


def halo(layer, dim):
    """How many more output positions a block computes than it keeps (both sides together, away from the edges):
    the block's input window, seen at the output's resolution."""
    scale, alignment = grid(layer, dim)
    start = 1 << 20                                             # far from the edges, a multiple of any stride
    first, last = window(layer, start, start + alignment, dim)
    return max(0, math.ceil((last - first) * scale) - alignment)


class Pixels:
    """The image that g_a reads, (1, C, H, W): floats in [0, 1] or 8- or 16-bit integers. Blocks come out as
    (1, 3, rows, columns) float32 in [0, 1] on `device`, padded to multiples of 64 by repeating the last row and
    column (as pad_to_64) and converted block by block: the float image never exists whole."""

    def __init__(self, x, image, device):
        """x, and container.describe(x)'s view of it."""
        self.x, self.device, self.channels = x, device, 1 if image.gray else 3
        self.height, self.width = image.height, image.width
        self.padded = image.padded

    def read(self, rows, columns):
        r = torch.arange(rows.start, rows.stop, device=self.x.device).clamp_max(self.height - 1)
        c = torch.arange(columns.start, columns.stop, device=self.x.device).clamp_max(self.width - 1)
        block = self.x[:, :self.channels].index_select(2, r).index_select(3, c).to(self.device)
        block = to_unit(block)
        return block.expand(1, 3, *block.shape[-2:])                            # (1, 3, rows, columns)


_libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_memory(blocks):
    """Hand the freed buffers of a finished band (one of `blocks`) back to the system. glibc keeps freed blocks
    below its (self-raising) mmap threshold in the heap, fragmented, so a process's footprint would creep up with
    the number of bands; malloc_trim returns them. A no-op for a computation in one piece (nothing to creep;
    the trim costs ~10 ms) and where the C library has no malloc_trim (macOS, Windows)."""
    if blocks > 1 and _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def into(out):
    """A `write` for run(): blocks go into the tensor `out` (which may live on another device)."""
    def write(rows, columns, block):
        out[..., rows, columns] = block.to(out.device)
    return write


def blocks(height, width, area, unit=1, extra=(0, 0)):
    """Cover an output of height x width with blocks of at most `area` positions counting `extra` (the halo's
    rows, columns) around each, in raster order: bands of whole rows while a square of `area` is wider than the
    image, square-ish tiles otherwise (a square has the least halo for its area). Blocks are at least unit x unit."""
    round_down = lambda n: max(unit, int(n) // unit * unit)                     # noqa: E731
    tile_w = min(width, round_down(math.sqrt(max(area, 1)) - extra[1]))
    tile_h = round_down(area / (tile_w + extra[1]) - extra[0])
    return [((r, min(r + tile_h, height)), (c, min(c + tile_w, width)))
            for r in range(0, height, tile_h) for c in range(0, width, tile_w)]


def bytes_per_output(layer):
    """Working memory per output position of `layer`, from its widest layer: the values held per output position
    (channels x positions per output position) times WORKING_COPIES; an integer layer also holds a zero-padded
    copy of its input, all in float64."""
    widest, final_scale = 0.0, grid(layer, 0)[0]

    def visit(part, scale):                  # scale: positions of part's input per input position
        nonlocal widest
        if (conv := convolution(part, 0)) is not None:
            k, s, _, transposed = conv
            out_scale = scale * (s if transposed else Fraction(1, s))
            density = float((out_scale / final_scale) ** 2)                 # part's outputs per final output
            if isinstance(part, IntegerConv):                             # float64, and a padded input copy
                cout, cin = part.weight.shape[:2][::-1] if transposed else part.weight.shape[:2]
                widest = max(widest, density * 8 * (cin / s ** 2 + cout * WORKING_COPIES))
            else:
                widest = max(widest, density * part.out_channels * 4 * WORKING_COPIES)   # float32
            return out_scale
        if (parts := chain(part)) is not None:
            for p in parts:
                scale = visit(p, scale)
            return scale
        for branch in branches(part):
            visit(branch, scale)
        return scale
    visit(layer, Fraction(1))
    return max(widest, 1.0)
