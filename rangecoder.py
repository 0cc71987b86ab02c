"""Bits <-> integers: a range coder over integer CDF tables (built by tables.py).

Read me first -- the traps this file is built around:
  1. Encoder and decoder must make *bit-identical* decisions. Every quantity the coder sees is an integer
     (CDF tables with 16-bit precision, integer state). The tables are computed from float weights by
     `update()` (entropy.py) on whichever machine codes -- the decoder's included -- and that is safe only
     because tables.py computes them from correctly rounded float64 operations in a fixed order, so every
     machine gets the same integers; built with ordinary float32 kernels they could differ by one unit between
     two CPUs and derail decoding.
  2. Every symbol needs a non-zero frequency, or it cannot be coded. `tables.pmf_to_quantized_cdf` guarantees it.
  3. Tables cover a finite range. The last symbol of each table is an *escape*: values outside the range
     are coded as the escape followed by their exact value in bypass (uniform) bits, so any int32 survives.
  4. A range coder's low end can overflow ("carry") after bytes were already written. We keep the carry in
     the output buffer and propagate it backwards through 0xFF bytes -- simple, and it cannot run past the
     first byte because the coded interval never leaves [0, 1).
  5. The decoder must terminate on garbage. It decodes exactly as many symbols as asked and reads zeros past
     the end of the data. It cannot tell garbage from data in general: almost any byte string decodes to some
     symbols. What detects a damaged file is the container's CRC-32 (container.py); the coder raises only where
     garbage shows for sure: a position in the rounding slack above the table, an escape length no int32 needs,
     a value outside int32.

A worked example: one table (index 0) over the symbols 0, 1, 2, with frequencies 1/2, 1/4 and 16383/65536, and the
escape (1/65536). Three symbols become one byte:

    >>> import numpy as np
    >>> cdfs = np.array([[0, 32768, 49152, 65535, 65536]], dtype=np.int32)     # (tables, entries)
    >>> lengths, offsets, indexes = np.array([5]), np.array([0]), np.zeros(3, dtype=np.int32)
    >>> data = encode_symbols(np.array([0, 1, 2], dtype=np.int32), indexes, cdfs, lengths, offsets)
    >>> data
    b'X'
    >>> decode_symbols(data, indexes, cdfs, lengths, offsets)
    array([0, 1, 2], dtype=int32)

The interval [0, 1) narrows to [0, 1/2) for the 0, to [1/4, 3/8) for the 1, to [11/32, 11/32 + 16383/2**19) for
the 2; the shortest byte string whose value lies inside (the decoder reads zeros past the end) is 0x58, 88/256 =
11/32: the byte 'X', for 5.0001 bits of information.

A second example shows the two hard parts, renormalization and the carry. One table over 0 (256/65536), 1
(65024/65536: almost sure) and 2 (255/65536: 8 bits of information), and the escape:

    >>> cdfs = np.array([[0, 256, 65280, 65535, 65536]], dtype=np.int32)
    >>> indexes = np.zeros(5, dtype=np.int32)
    >>> data = encode_symbols(np.array([2, 1, 2, 2, 2], dtype=np.int32), indexes, cdfs, lengths, offsets)
    >>> data.hex()
    'fffe0002'
    >>> decode_symbols(data, indexes, cdfs, lengths, offsets)
    array([2, 1, 2, 2, 2], dtype=int32)

  2  narrows [low, low + rng) to its top 1/257; rng falls to 2**48 or below, so low's top byte can no longer
     change (short of a carry) and is shifted out: ff.
  1  costs 0.011 bits: the interval barely narrows, no byte.
  2  8 more bits: fd leaves (ff fd).
  2  8 more bits: ff leaves (ff fd ff), and low now sits just under the top of the 56-bit window.
  2  adding this symbol's start to low passes 2**56: the extra unit belongs to the bytes already written, and
     ff fd ff + 1 = ff fe 00 -- the trailing ff rolls over to 00 and the carry stops at fd (`_add_carry`).
     Then 01 leaves (ff fe 00 01).
  end  the flush writes the shortest value inside the last interval; here that is low rounded up to the next
     multiple of 2**56, one more carry and no byte: ff fe 00 02, four bytes for 32.0 bits of information.

One stream may be written and read in several calls (`SymbolEncoder`, `SymbolDecoder`): a large image is coded
band by band, and ELIC's later tables depend on values decoded earlier. The coder is plain Python over numpy
arrays, compiled by numba. Set NUMBA_DISABLE_JIT=1 to step through it.
"""
import numba
import numpy as np

PRECISION = 16                      # CDF tables sum to 2**16
STATE_BITS = 56                     # the coder's low end lives in [0, 2**56), one carry bit above
TOP = 1 << STATE_BITS
STATE_MASK = TOP - 1
BOTTOM = 1 << (STATE_BITS - 8)      # renormalize while range <= 2**48, so range >> 16 >= 2**32 > 0
HEAD_BYTES = STATE_BITS // 8        # the decoder primes its position (code) with the first 7 bytes
LENGTH_BITS = 6                     # an escaped value's bit length is sent in 6 bypass bits
MAX_RAW_BITS = 34                   # |v - offset| < 2**33 for int32 v and offsets, so raw < 2**34
BYPASS_CHUNK = 16                   # raw bits go out 16 at a time


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


# ----------------------------------------------------------------------------------------------------------
# Values outside a table: the escape symbol, then the value in bypass bits (trap 3)
# ----------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _zigzag(s, escape):
    """An escaped value s (below 0, or escape and above) -> a non-negative integer, the sign in its lowest bit."""
    return -2 * s - 1 if s < 0 else 2 * (s - escape)


@numba.njit(cache=True)
def _unzigzag(raw, escape):
    return -((raw + 1) >> 1) if raw & 1 else (raw >> 1) + escape


@numba.njit(cache=True)
def _encode_bypass(low, rng, out, pos, raw):
    """raw's bit length in LENGTH_BITS uniform bits, then its bits, BYPASS_CHUNK at a time, most significant first."""
    n_bits = 0
    while (raw >> n_bits) > 0:
        n_bits += 1
    low, rng, pos = _encode_interval(low, rng, out, pos, n_bits, 1, LENGTH_BITS)
    while n_bits > 0:
        chunk = min(BYPASS_CHUNK, n_bits)
        n_bits -= chunk
        bits = (raw >> n_bits) & ((1 << chunk) - 1)
        low, rng, pos = _encode_interval(low, rng, out, pos, bits, 1, chunk)
    return low, rng, pos


@numba.njit(cache=True)
def _decode_bypass(code, rng, data, pos):
    """The twin of `_encode_bypass` -> raw, code, rng, pos."""
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
    return raw, code, rng, pos


# ----------------------------------------------------------------------------------------------------------
# Symbols: one interval each (the textbook's loop), an escaped value's bits after its escape
# ----------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _encode(symbols, indexes, cdfs, cdf_lengths, offsets, state, out):
    """Code symbols[i] with table indexes[i], continuing from `state` (low, rng, pos) and leaving it where this
    call stopped; returns the output buffer (grown when needed)."""
    low, rng, pos = state[0], state[1], state[2]
    for i in range(symbols.size):
        out = _grow(out, pos)
        k = indexes[i]
        cdf, escape = cdfs[k], cdf_lengths[k] - 2          # symbols 0 .. escape-1 are regular
        s = np.int64(symbols[i]) - offsets[k]
        t = s if 0 <= s < escape else escape                  # the symbol, or the escape
        low, rng, pos = _encode_interval(low, rng, out, pos, cdf[t], cdf[t + 1] - cdf[t], PRECISION)
        if t == escape:
            low, rng, pos = _encode_bypass(low, rng, out, pos, _zigzag(s, escape))
    state[0], state[1], state[2] = low, rng, pos
    return out


@numba.njit(cache=True)
def _flush(state, out):
    """End the stream. The decoder reads zeros past the end, so write the shortest prefix of a value in
    [low, low + rng) whose remaining bytes are zero: low rounded up to a multiple of 2**(56 - 8 n)."""
    low, rng, pos = state[0], state[1], state[2]
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
def _find(cdf, escape, target):
    """Binary search: the symbol s (an escape included) with cdf[s] <= target < cdf[s + 1]."""
    lo, hi = 0, escape + 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if cdf[mid] <= target:
            lo = mid
        else:
            hi = mid
    return np.int64(lo)


@numba.njit(cache=True)
def _decode(data, state, indexes, cdfs, cdf_lengths, offsets):
    """Decode len(indexes) values, continuing from `state` and leaving it where this call stopped."""
    symbols = np.empty(indexes.size, dtype=np.int32)
    code, rng, pos = state[0], state[1], state[2]
    for i in range(indexes.size):
        k = indexes[i]
        cdf, escape = cdfs[k], cdf_lengths[k] - 2
        s = _find(cdf, escape, _decode_target(code, rng, PRECISION))
        code, rng, pos = _decode_interval(code, rng, data, pos, cdf[s], cdf[s + 1] - cdf[s], PRECISION)
        if s == escape:
            raw, code, rng, pos = _decode_bypass(code, rng, data, pos)
            s = _unzigzag(raw, escape)
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
    encoder = SymbolEncoder()
    encoder.encode(symbols, indexes, cdfs, cdf_lengths, offsets)
    return encoder.finish()


def decode_symbols(data, indexes, cdfs, cdf_lengths, offsets):
    """Decode `len(indexes)` int32 values from `data` (the inverse of `encode_symbols`)."""
    return SymbolDecoder(data).decode(indexes, cdfs, cdf_lengths, offsets)


class SymbolEncoder:
    """One stream written in several calls (a large image band by band); `finish()` returns its bytes. The
    bytes equal those of one `encode_symbols` call over all the symbols in the same order."""

    def __init__(self):
        self.state = np.array([0, TOP, 0], dtype=np.int64)          # low, rng, bytes written
        self.out = np.zeros(64, dtype=np.uint8)

    def encode(self, symbols, indexes, cdfs, cdf_lengths, offsets):
        indexes, cdfs, cdf_lengths, offsets = _coder_arrays(indexes, cdfs, cdf_lengths, offsets)
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
        if symbols.size != indexes.size:
            raise ValueError(f"{symbols.size} symbols but {indexes.size} indexes")
        self.out = _encode(symbols, indexes, cdfs, cdf_lengths, offsets, self.state, self.out)

    def finish(self):
        return _flush(self.state, self.out).tobytes()


class SymbolDecoder:
    """One stream decoded in several calls: for a large image band by band, and for models whose later tables
    depend on values decoded earlier (the checkerboard and channel contexts of elic.py). The calls must ask for
    the symbols in the order in which they were encoded, with the same indexes."""

    def __init__(self, data):
        self.data = np.frombuffer(memoryview(data).toreadonly(), dtype=np.uint8)   # no copy, one numba type
        head = self.data[:HEAD_BYTES].tobytes().ljust(HEAD_BYTES, b"\0")         # zeros past the end
        self.state = np.array([int.from_bytes(head, "big"), TOP, HEAD_BYTES], dtype=np.int64)   # code, rng, pos

    def decode(self, indexes, cdfs, cdf_lengths, offsets):
        indexes, cdfs, cdf_lengths, offsets = _coder_arrays(indexes, cdfs, cdf_lengths, offsets)
        return _decode(self.data, self.state, indexes, cdfs, cdf_lengths, offsets)

