"""The .taco file: a header (magic, version, the writing model's fingerprint, image size, a check of the
decoder's decisions, stream lengths), the z and y streams, and a CRC-32 of all of it. Every check happens
before anything large is allocated, and every failure is one BitstreamError that says why."""
import contextlib
import dataclasses
import hashlib
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import torch

from entropy import to_cpu
from rangecoder import SymbolDecoder, SymbolEncoder


class BitstreamError(ValueError):
    """A file that this model cannot decode: not ours, truncated, corrupted, or written by another model."""


# Version 5: each symbol of y codes with the table scale nearest its own in log s (version 4 took the first scale
# >= s: the same decoded image in about 4% more bytes). Older versions are refused with their version.
MAGIC, VERSION = b"TACO", 5
HEADER = struct.Struct(">4sB8sHHBIII")    # magic, version, fingerprint, H, W, flags, decisions, len(z), len(y)
CHECKSUM = struct.Struct(">I")
GRAY, SIXTEEN_BITS = 1, 2                 # flags
FORMAT_PIXELS = 1 << 28                   # the largest image the format describes
MAX_PIXELS = 1 << 27                      # the largest one decoded by default (about 134 megapixels)


ENCODER_ONLY = ("g_a.", "h_a.")     # state-dict prefixes of what only the encoder runs: not in the fingerprint


def fingerprint(model):
    """8 bytes that identify what a decoder needs: the config and every weight and table except those of the
    encoder-only transforms (g_a with its text adapter, h_a), so files name the decoder that reads them. The
    tables are the same integers on every machine (tables.py), and so is this hash. Hashed afresh on every
    call (a few milliseconds per 10 MB of weights)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(ENCODER_ONLY):
            h.update(name.encode())
            h.update(to_cpu(tensor).contiguous().view(-1).view(torch.uint8).numpy())    # hashed in place
    return h.digest()[:8]


def describe(x):
    """The header's view of an image to compress, (1, C, H, W) floats or 8- or 16-bit integers (C = 1, 3 or 4):
    height, width, gray, bits, and the padded size the codec codes (multiples of 64). An image of another shape,
    or larger than the format holds, is refused."""
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"compress takes one image of shape (1, 1|3|4, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H * W > FORMAT_PIXELS or max(H, W) > 0xFFFF:
        raise ValueError(f"image of {W}x{H} pixels is larger than this format allows ({FORMAT_PIXELS} pixels, "
                         f"65535 a side)")
    return SimpleNamespace(height=H, width=W, gray=x.shape[1] == 1, bits=16 if x.dtype == torch.uint16 else 8,
                           padded=(-(-H // 64) * 64, -(-W // 64) * 64))           # the codec pads to 64


def pack(fingerprint, image, decisions, z_bytes, y_bytes):
    """The file's bytes: the header (image: describe()'s), the streams, a CRC-32 of all of it."""
    H, W, gray, bits = image.height, image.width, image.gray, image.bits
    flags = (GRAY if gray else 0) | (SIXTEEN_BITS if bits == 16 else 0)
    header = HEADER.pack(MAGIC, VERSION, fingerprint, H, W, flags, decisions, len(z_bytes), len(y_bytes))
    crc = zlib.crc32(y_bytes, zlib.crc32(z_bytes, zlib.crc32(header)))
    return b"".join([header, z_bytes, y_bytes, CHECKSUM.pack(crc)])          # one copy of the streams


def unpack(data, fingerprint, max_pixels=MAX_PIXELS):
    """-> height, width, gray, bits, padded (height and width rounded up to 64, as describe()), decisions (the CRC of
    the coding decisions), z_bytes, y_bytes, written_by (the writer's fingerprint); raises BitstreamError with the
    reason. A size above max_pixels is refused here, before anything is allocated. fingerprint None: any model's
    file (codec.py info reads files without a checkpoint)."""
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
    if fingerprint is not None and written_by != fingerprint:
        raise BitstreamError(f"file written by another model (fingerprint {written_by.hex()}); this checkpoint "
                             f"is {fingerprint.hex()}: decode with the checkpoint that wrote it")
    if H == 0 or W == 0 or H * W > FORMAT_PIXELS or flags > GRAY | SIXTEEN_BITS:
        raise BitstreamError(f"corrupted header: impossible image size {W}x{H} or flags {flags}")
    if H * W > max_pixels:
        raise BitstreamError(f"the file declares {W}x{H} = {H * W / 1e6:.0f} megapixels, more than the limit of "
                             f"{max_pixels / 1e6:.0f} (raise it with --max-pixels if you trust the file)")
    z_end = HEADER.size + z_len
    return SimpleNamespace(height=H, width=W, gray=bool(flags & GRAY), bits=16 if flags & SIXTEEN_BITS else 8,
                           padded=(-(-H // 64) * 64, -(-W // 64) * 64), decisions=decisions, written_by=written_by,
                           z_bytes=view[HEADER.size:z_end], y_bytes=view[z_end:len(data) - CHECKSUM.size])


class CheckedEncoder:
    """The range coder's encoder, keeping a CRC-32 of every table index it is given (the coding decisions):
    the header carries it, so that a decoder whose arithmetic chose other tables says so instead of decoding
    garbage."""

    def __init__(self, tables):
        self.encoder, self.tables, self.crc = SymbolEncoder(), tables, 0

    def encode(self, symbols, indexes):
        """symbols, indexes: int32 CPU tensors of one shape, in coding order."""
        self.encoder.encode(symbols.numpy(), indexes.numpy(), *self.tables)
        self.crc = decisions_crc(indexes, self.crc)

    def finish(self):
        """-> the stream's bytes, the CRC of the decisions."""
        return self.encoder.finish(), self.crc


class CheckedDecoder:
    """The decoder's side: decode(indexes) -> symbols, and finish() checks the decisions against the header."""

    def __init__(self, data, tables, expected):
        self.decoder, self.tables, self.crc, self.expected = SymbolDecoder(data), tables, 0, expected

    def decode(self, indexes):
        self.crc = decisions_crc(indexes, self.crc)
        return torch.from_numpy(self.decoder.decode(indexes.numpy(), *self.tables)).view(indexes.shape)

    def finish(self):
        check_decisions(self.crc, self.expected)


@contextlib.contextmanager
def decoding_errors():
    """A failure while decoding a file whose checksum was intact becomes one BitstreamError that says why."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, BitstreamError):
            raise
        raise BitstreamError(f"the file's checksum is intact, yet decoding failed ({error}): this machine's "
                             f"arithmetic differs from the encoder's, or the file is forged") from error


def decisions_crc(indexes, crc=0):
    """CRC-32 of table indexes (int32, little-endian), continuing from `crc`."""
    return zlib.crc32(np.ascontiguousarray(indexes.numpy(), dtype="<i4").tobytes(), crc)


def check_decisions(crc, expected):
    if crc != expected:
        raise BitstreamError("this machine's arithmetic differs from the encoder's, or the file was altered: it "
                             "would decode the file with other coding tables than it was written with (decisions "
                             "check mismatch)")
