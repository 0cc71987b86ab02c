"""The .taco file: a header (magic, version, the writing model's fingerprint, image size, a check of the
decoder's decisions, stream lengths), the z and y streams, and a CRC-32 of all of it. Every check happens
before anything large is allocated, and every failure is one BitstreamError that says why."""
import struct
import zlib
from types import SimpleNamespace

import numpy as np


class BitstreamError(ValueError):
    """A file that this model cannot decode: not ours, truncated, corrupted, or written by another model."""


# Version 3: y coded row by row (bands), flags carry the bit depth. 4: the fingerprint covers what the decoder
# reads, and the coding tables are built the same on every machine (tables.py).
MAGIC, VERSION = b"TACO", 4
HEADER = struct.Struct(">4sB8sHHBIII")    # magic, version, fingerprint, H, W, flags, decisions, len(z), len(y)
CHECKSUM = struct.Struct(">I")
GRAY, SIXTEEN_BITS = 1, 2                 # flags
FORMAT_PIXELS = 1 << 28                   # the largest image the format describes
MAX_PIXELS = 1 << 27                      # the largest one decoded by default (about 134 megapixels)


def pack(fingerprint, H, W, gray, bits, decisions, z_bytes, y_bytes):
    flags = (GRAY if gray else 0) | (SIXTEEN_BITS if bits == 16 else 0)
    header = HEADER.pack(MAGIC, VERSION, fingerprint, H, W, flags, decisions, len(z_bytes), len(y_bytes))
    crc = zlib.crc32(y_bytes, zlib.crc32(z_bytes, zlib.crc32(header)))
    return b"".join([header, z_bytes, y_bytes, CHECKSUM.pack(crc)])          # one copy of the streams


def unpack(data, fingerprint, max_pixels=MAX_PIXELS):
    """-> height, width, gray, bits, decisions (the CRC of the coding decisions), z_bytes, y_bytes; raises
    BitstreamError with the reason. A size above max_pixels is refused here, before anything is allocated."""
    if len(data) < 5 or data[:4] != MAGIC:
        raise BitstreamError("not a TACO file (no TACO header)")
    if data[4] != VERSION:
        raise BitstreamError(f"TACO format version {data[4]}; this code reads version {VERSION}")
    if len(data) < HEADER.size + CHECKSUM.size:
        raise BitstreamError(f"truncated file: {len(data)} bytes, shorter than the header")
    magic, version, written_by, H, W, flags, decisions, z_len, y_len = HEADER.unpack_from(data)
    if HEADER.size + z_len + y_len + CHECKSUM.size != len(data):
        raise BitstreamError(f"truncated or padded file: the header announces "
                             f"{HEADER.size + z_len + y_len + CHECKSUM.size} bytes, the file has {len(data)}")
    view = memoryview(data)              # the streams are read in place: a file costs its own size, once
    if CHECKSUM.unpack_from(data, len(data) - CHECKSUM.size)[0] != zlib.crc32(view[:-CHECKSUM.size]):
        raise BitstreamError("corrupted file: checksum mismatch")
    if written_by != fingerprint:
        raise BitstreamError(f"file written by another model (fingerprint {written_by.hex()}); this checkpoint "
                             f"is {fingerprint.hex()}: decode with the checkpoint that wrote it")
    if H == 0 or W == 0 or H * W > FORMAT_PIXELS or flags > GRAY | SIXTEEN_BITS:
        raise BitstreamError(f"corrupted header: impossible image size {W}x{H} or flags {flags}")
    if H * W > max_pixels:
        raise BitstreamError(f"the file declares {W}x{H} = {H * W / 1e6:.0f} megapixels, more than the limit of "
                             f"{max_pixels / 1e6:.0f} (raise it with --max-pixels if you trust the file)")
    z_end = HEADER.size + z_len
    return SimpleNamespace(height=H, width=W, gray=bool(flags & GRAY), bits=16 if flags & SIXTEEN_BITS else 8,
                           decisions=decisions, z_bytes=view[HEADER.size:z_end],
                           y_bytes=view[z_end:len(data) - CHECKSUM.size])


def decisions_crc(indexes, crc=0):
    """CRC-32 of table indexes (int32, little-endian), continuing from `crc`."""
    return zlib.crc32(np.ascontiguousarray(indexes.numpy(), dtype="<i4").tobytes(), crc)


def check_decisions(crc, expected):
    if crc != expected:
        raise BitstreamError("this machine's arithmetic differs from the encoder's: it would decode the file with "
                             "other coding tables than it was written with (decisions check mismatch)")
