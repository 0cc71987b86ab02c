"""The classical codecs that learned ones are measured against, each on the same images and from its real bytes:
Pillow's JPEG, WebP and AVIF, and with their plugins HEVC intra (BPG's codec, through pillow-heif's x265) and
JPEG XL (pillow-jxl-plugin), each swept over its quality range."""
import io
import time

import numpy as np
import torch

from machinery import metrics
from machinery.images import to_pixels

# HEIC is HEVC intra through x265 (pillow-heif's libheif), set up as close to BPG as the library allows: 4:4:4,
# constant QP (x265's qp, swept from 51 down), preset slow, tune ssim; one still image is one intra frame.
HEVC_CHROMA, HEVC_SETTINGS = 444, {"preset": "slow", "tune": "ssim"}
PLUGINS = {"HEIC": ("pillow_heif", "pillow-heif"), "JXL": ("pillow_jxl", "pillow-jxl-plugin")}


def baseline_missing(codec):
    """Why this Pillow cannot sweep `codec` (what to install), or None."""
    from PIL import features
    if codec in PLUGINS:
        module, package = PLUGINS[codec]
        try:
            plugin = __import__(module)
        except ImportError:
            return f"{codec} needs {package} (pip install {package})"
        if codec == "HEIC":
            plugin.register_heif_opener()
        return None
    return None if features.check(codec.lower().replace("jpeg", "jpg")) else f"this Pillow has no {codec} support"


def pillow_codec(x, codec, quality):
    """(1, 3, H, W) in [0, 1] -> bpp from the real bytes, decoded image, encode and decode wall time (s). HEIC's
    `quality` is x265's QP, and its bytes are the HEVC stream alone (hevc_stream_bytes)."""
    from PIL import Image
    array = to_pixels(x, False, torch.uint8)[0].permute(1, 2, 0).numpy()
    image, buffer = Image.fromarray(array), io.BytesIO()
    settings = {"quality": quality, **({"effort": 7} if codec == "JXL" else {})}    # JPEG XL's default effort
    if codec == "HEIC":
        settings = {"chroma": HEVC_CHROMA, "enc_params": {"x265:qp": str(quality), **HEVC_SETTINGS}}
    start = time.perf_counter()
    image.save(buffer, format="HEIF" if codec == "HEIC" else codec, **settings)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    with Image.open(io.BytesIO(buffer.getvalue())) as coded:
        decoded = np.asarray(coded.convert("RGB"), dtype=np.float32) / 255
    decode = time.perf_counter() - start
    H, W = array.shape[:2]
    size = hevc_stream_bytes(buffer.getvalue()) if codec == "HEIC" else buffer.tell()
    return 8 * size / (H * W), torch.from_numpy(decoded).permute(2, 0, 1)[None], encode, decode


def boxes(data, start=0, end=None):
    """ISO base media file boxes (HEIF's container): -> {type: [payload, ...]} of the boxes in data[start:end]."""
    found, end = {}, len(data) if end is None else end
    while start + 8 <= end:
        size, kind = int.from_bytes(data[start:start + 4], "big"), data[start + 4:start + 8].decode("latin-1")
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[start + 8:start + 16], "big"), 16
        size = size or end - start
        found.setdefault(kind, []).append(data[start + header:start + size])
        start += size
    return found


def hevc_stream_bytes(heif):
    """The bytes of the HEVC stream in a HEIF file, as BPG counts its own: the coded image (the mdat payload) and
    its parameter sets (VPS, SPS, PPS, in hvcC); the HEIF boxes around them are left out."""
    top = boxes(heif)
    meta = top["meta"][0]
    properties = boxes(boxes(boxes(meta, 4)["iprp"][0])["ipco"][0])      # meta is a full box: 4 bytes of flags
    hvcc = properties["hvcC"][0]
    parameter_sets, at = 0, 23                                            # 22 bytes of profile, then the arrays
    for _ in range(hvcc[22]):
        count = int.from_bytes(hvcc[at + 1:at + 3], "big")
        at += 3
        for _ in range(count):
            length = int.from_bytes(hvcc[at:at + 2], "big")
            parameter_sets += length
            at += 2 + length
    return sum(len(payload) for payload in top["mdat"]) + parameter_sets


QUALITIES = range(5, 100, 5)         # the Pillow baselines' quality sweep
SWEEPS = {"HEIC": range(51, 15, -3)}    # HEVC: x265's QP, coarsest first (bpp rising as the others')


def pillow_sweep(x, codec):
    """-> (quality, bpp, decoded image, encode s, decode s) of `codec` at each quality of the sweep, one at a time."""
    for quality in SWEEPS.get(codec, QUALITIES):
        yield (quality, *pillow_codec(x, codec, quality))


def baseline_curve(x, codec="JPEG"):
    """A Pillow codec's [(bpp, psnr)] over the quality sweep, sorted by bpp."""
    return sorted((bpp, float(metrics.psnr(decoded, x))) for _, bpp, decoded, _, _ in pillow_sweep(x, codec))
