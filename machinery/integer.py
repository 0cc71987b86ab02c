"""Exact integer inference for the networks whose outputs choose coding tables and means (Balle, Johnston and
Minnen 2019, "Integer networks for data compression with latent-variable models", ICLR).

Why. The decoder recomputes the entropy parameters (h_s; for ELIC also the context networks) from what it has
decoded. In floating point the result depends on the order of the additions -- thread count, oneDNN on or off,
another CPU, a GPU, another library build -- and a last-bit difference can move a scale across a table
boundary: the decoder then reads with another CDF and every symbol after it is garbage. In integers there is
no order to depend on.

How. After training, each Conv2d / ConvTranspose2d of such a network is converted once, from its float32
weights, by exact operations only (so every machine converts to the same integers):
  activations  a = round(x * 2**FRACTION_BITS), clamped to |a| <= ACTIVATION_LIMIT
  weights      w_c = round(w * 2**s_c) per output channel c, bias b_c = round(b * 2**(FRACTION_BITS + s_c))
  accumulator  sum(a * w_c) + b_c, at scale 2**(FRACTION_BITS + s_c), requantized to a by a shift with rounding
The shift s_c is the largest one with ACTIVATION_LIMIT * sum|w_c| + |b_c| < EXACT_LIMIT: then every product and
every partial sum of every output is an integer below 2**52 in magnitude, whatever the order of summation, so
float64 -- which holds such integers exactly -- computes it exactly on any BLAS and any device. Convolutions
run as sums of matrix products (one per kernel tap): plain multiply-adds, never Winograd or FFT.
ReLU is max(a, 0); LeakyReLU's slope becomes a multiply by an integer and a shift.

Read `integer_conv` first: the whole computation over a whole small image, in a few lines, which can be checked
against the float convolution. `IntegerConv` converts a layer, and its `__call__` is the engine that coding runs:
the same integers, computed tap by tap, so that bands of a large image (bands.py) need no k*k copies of their
input and ELIC's checkerboard skips the taps it knows read zeros (tests/test_integer.py holds it to the definition).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import container, devices

FRACTION_BITS = 16               # activations carry 16 fractional bits: a resolution of 1/65536
ACTIVATION_LIMIT = 2.0 ** 29     # |a| <= 2**29: values within +-8192 at that resolution
EXACT_LIMIT = 2.0 ** 52          # every accumulator stays below this, so float64 holds it exactly
MAX_SHIFT = 40                   # weight precision is capped (a channel of zeros would allow any shift)
SLOPE_BITS = 16                  # LeakyReLU's slope as an integer over 2**16 (0.01 -> 655 / 65536)


def to_fixed(x):
    """Real values -> integers at 2**FRACTION_BITS (held in float64), clamped to the activation range."""
    return torch.round(x.double() * 2.0 ** FRACTION_BITS).clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)


def powers_of_two(exponents):
    """Exact 2**e for each integer e (math.ldexp is exact by definition; a float pow need not be)."""
    return torch.tensor([math.ldexp(1.0, int(e)) for e in exponents], dtype=torch.float64)


def integer_conv(layer, a):
    """The definition, over a whole image: a (B, Cin, H, W) integers at 2**FRACTION_BITS -> the integers at
    2**FRACTION_BITS that the IntegerConv `layer` gives. Every product and partial sum is an integer below 2**52
    (the shifts see to it), so float64 holds each exactly and torch's own convolution, summing in any order, is
    exact -- run without cuDNN, whose algorithms may transform the inputs (FFT, Winograd) and round. Checked
    against the float layer: integer_conv(IntegerConv(conv), to_fixed(x)) * 2**-FRACTION_BITS is conv(x) to
    within the rounding of x and of the weights."""
    convolve = F.conv_transpose2d if layer.transposed else F.conv2d
    extra = {"output_padding": layer.output_padding} if layer.transposed else {}
    with torch.backends.cudnn.flags(enabled=False):
        total = convolve(a.double(), layer.weight.to(a.device), layer.bias.to(a.device), layer.stride, layer.padding,
                         **extra)                                              # (B, Cout, H', W')
    down = layer.down.to(a.device).view(1, -1, 1, 1)                           # 2**-s_c: back to 2**FRACTION_BITS
    return total.mul_(down).add_(0.5).floor_().clamp_(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)   # round half up, exact


class IntegerConv:
    """A Conv2d or ConvTranspose2d in integers: per-output-channel weight shifts, exact float64 accumulation."""

    def __init__(self, conv, keep=None):
        """keep(dy, dx) -> False drops the taps that read input (u + dy, v + dx) for output (u, v): for a
        caller that knows those inputs are zero at every output it uses (default: keep all)."""
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or \
                (not self.transposed and conv.stride != (1, 1)):
            raise TypeError("integer convolutions are dense, undilated, zero-padded and (unless transposed) of "
                            f"stride 1: {conv}")
        self.stride, self.padding = conv.stride, conv.padding
        self.output_padding = conv.output_padding if self.transposed else (0, 0)
        weight = conv.weight.detach().to("cpu", torch.float64)                # exact: float32 -> float64
        if not torch.isfinite(weight).all() or (conv.bias is not None and not torch.isfinite(conv.bias).all()):
            raise ValueError("a network that chooses coding tables has NaN or infinite weights")
        out_channels = weight.shape[1] if self.transposed else weight.shape[0]
        bias = torch.zeros(out_channels, dtype=torch.float64) if conv.bias is None else \
            conv.bias.detach().to("cpu", torch.float64)
        per_output = weight.transpose(0, 1) if self.transposed else weight      # (Cout, Cin, k, k)
        shifts = self.largest_exact_shifts(per_output.flatten(1), bias)        # (Cout,)
        weight = torch.round(per_output * powers_of_two(shifts).view(-1, 1, 1, 1))
        self.taps = weight.permute(2, 3, 1, 0).contiguous()                    # (k, k, Cin, Cout)
        self.bias = torch.round(bias * powers_of_two(shifts + FRACTION_BITS))
        self.down = powers_of_two(-shifts)                                      # accumulator -> activation
        self.shifts, self.on_device = shifts, {}
        # Along each dimension, output position u (of phase q: u = s*m + q) reads input m + d through tap t,
        # for each (d, t) of its phase: d = t - p for a convolution (one phase), and for a transposed one
        # (u = s*i + t - p) the taps with s | q + p - t, at d = (q + p - t) / s.
        offsets = [[[((q + p - t) // s, t) for t in range(k) if (q + p - t) % s == 0] for q in range(s)]
                   if self.transposed else [[(t - p, t) for t in range(k)]]
                   for k, s, p in zip(weight.shape[2:], self.stride, self.padding)]
        self.phase_stride = self.stride if self.transposed else (1, 1)
        self.phases = [(py, px, [(dy, dx, ty, tx) for dy, ty in offsets[0][py] for dx, tx in offsets[1][px]
                                 if keep is None or keep(dy, dx)])
                       for py in range(self.phase_stride[0]) for px in range(self.phase_stride[1])]
        reads = [(dy, dx) for *_, phase in self.phases for dy, dx, _, _ in phase] or [(0, 0)]
        self.reach = [(min(d), max(d)) for d in zip(*reads)]                  # input offsets read, per dimension

    @property
    def weight(self):
        """The integer weights in the layout of the layer converted: (Cout, Cin, k, k), or (Cin, Cout, k, k) for a
        transposed one (a view of the taps)."""
        return self.taps.permute(2, 3, 0, 1) if self.transposed else self.taps.permute(3, 2, 0, 1)

    @staticmethod
    def largest_exact_shifts(weight, bias):
        """weight (Cout, K), bias (Cout,) -> for each c the largest s <= MAX_SHIFT with
        ACTIVATION_LIMIT * sum|round(w * 2**s)| + |round(b * 2**(FRACTION_BITS + s))| < EXACT_LIMIT, checked in
        exact arithmetic. The left side never decreases as s grows (|round(2y)| >= |round(y)|), so searching
        down from any start above the answer finds the same s on every machine; a float log2 picks the start."""
        magnitude = ACTIVATION_LIMIT * weight.abs().sum(1) + bias.abs() * 2.0 ** FRACTION_BITS
        start = torch.floor(torch.log2(EXACT_LIMIT / magnitude.clamp_min(1e-300))) + 2
        shifts = start.clamp(max=MAX_SHIFT).long()

        def exact(s):
            w = torch.round(weight * powers_of_two(s)[:, None]).abs().sum(1)   # integers: exact sums
            b = torch.round(bias * powers_of_two(s + FRACTION_BITS)).abs()
            return ACTIVATION_LIMIT * w + b < EXACT_LIMIT
        while not (ok := exact(shifts)).all():
            shifts = torch.where(ok, shifts, shifts - 1)
        return shifts

    def __call__(self, a):
        """a (B, Cin, H, W) integers -> (B, Cout, H', W') integers, both at 2**FRACTION_BITS: integer_conv's result.

        A k x k convolution is k*k shifted matrix products, summed: out[u, v] += x[u + dy, v + dx] @ w[dy, dx].
        With x channels-last and zero-padded, row-major (padded rows, padded width Wp, Cin), the inputs of tap
        (dy, dx) for all outputs are one contiguous run of rows of that matrix (the outputs computed on the
        padded width too, whose extra columns are dropped): no k*k copies of the input, as unfold would make.
        A transposed convolution with stride s is s*s such convolutions, one per phase of its output."""
        if a.device not in self.on_device:          # copied once per device, not on every call
            self.on_device[a.device] = (self.taps.to(a.device), self.bias.to(a.device), self.down.to(a.device))
        taps, bias, down = self.on_device[a.device]
        B, Cin, H, W = a.shape
        H_out, W_out = (self.output_length(n, dim) for dim, n in enumerate((H, W)))
        (lowest_dy, highest_dy), (lowest_dx, highest_dx) = self.reach
        top, left = max(0, -lowest_dy), max(0, -lowest_dx)
        Wp = left + max(W, W_out + highest_dx)
        Hp = top + max(H, H_out + highest_dy) + 1              # one more row: the last tap's run stays inside
        padded = a.new_zeros(B, Hp, Wp, Cin)
        padded[:, top:top + H, left:left + W] = a.permute(0, 2, 3, 1)
        flat = padded.view(B, Hp * Wp, Cin)
        out = a.new_empty(B, H_out, W_out, bias.shape[0])                      # channels-last
        sy, sx = self.phase_stride
        for py, px, phase in self.phases:
            rows, columns = len(range(py, H_out, sy)), len(range(px, W_out, sx))
            for b in range(B):
                total = bias.expand(rows * Wp, -1).clone()                     # at 2**(FRACTION_BITS + s_c)
                for dy, dx, ty, tx in phase:
                    start = (top + dy) * Wp + left + dx
                    total.addmm_(flat[b, start:start + rows * Wp], taps[ty, tx])   # exact: integers < 2**52
                out[b, py::sy, px::sx] = total.view(rows, Wp, -1)[:, :columns]
        out.mul_(down).add_(0.5).floor_().clamp_(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)  # as integer_conv rounds
        return out.permute(0, 3, 1, 2)                                          # (B, Cout, H', W')

    def output_length(self, n, dim):
        k, s, p = self.weight.shape[2 + dim], self.stride[dim], self.padding[dim]
        return (n - 1) * s - 2 * p + k + self.output_padding[dim] if self.transposed else n + 2 * p - k + 1


class IntegerLeakyReLU:
    def __init__(self, slope):
        self.slope = round(slope * 2 ** SLOPE_BITS)                             # 0.01 -> 655

    def __call__(self, a):
        return torch.where(a < 0, torch.floor(a * self.slope * 2.0 ** -SLOPE_BITS), a)


class IntegerReLU:
    def __call__(self, a):
        return a.clamp_min(0)


class IntegerNetwork:
    """A float network of convolutions, ReLUs and LeakyReLUs, run in exact integer arithmetic. A drop-in for it
    at coding time: real values in (rounded onto the 2**-FRACTION_BITS grid), real values out (on the grid)."""

    def __init__(self, network, keep=None):
        """keep: the taps that the first convolution computes (IntegerConv): what the caller knows of the
        network's input."""
        layers = list(network) if isinstance(network, nn.Sequential) else [network]
        self.layers = []
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                self.layers.append(IntegerConv(layer, None if self.layers else keep))
            elif isinstance(layer, nn.ReLU):
                self.layers.append(IntegerReLU())
            elif isinstance(layer, nn.LeakyReLU):
                self.layers.append(IntegerLeakyReLU(layer.negative_slope))
            else:
                raise TypeError(f"no integer version of {type(layer).__name__}")

    def __call__(self, x):
        a = to_fixed(x)
        for layer in self.layers:
            a = layer(a)
        return a * 2.0 ** -FRACTION_BITS                                        # real values, float64, exact


def networks(model, fingerprint=None):
    """model.integer_networks() (h_s, and ELIC's context networks), converted again whenever a weight, buffer or
    table differs from when they were converted. Keyed by the fingerprint, a hash of their bytes: no way of
    changing them (in place, through .data, by a fused optimizer, on another device) goes unseen, so a file can
    never be written with stale integer networks. A caller that has just hashed the weights passes that
    `fingerprint` (hashing costs a pass over them)."""
    key = fingerprint or container.fingerprint(model)
    cached = model.__dict__.get("_integer_networks")
    if cached is None or cached[0] != key:
        model.__dict__["_integer_networks"] = cached = (key, model.integer_networks())
    return cached[1]


def estimate_networks(model, device):
    """The networks an eval-mode forward uses: the integer ones, as coding does, or the float ones on a device
    without float64 (Apple's MPS), where the integers cannot be exact."""
    return networks(model) if devices.has_float64(device) else model.float_networks()
