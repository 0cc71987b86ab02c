"""Image files in and out: 8-bit RGB, gray, 16-bit gray, float images; alpha is dropped; the EXIF orientation is
applied, as every viewer does. Images above Pillow's decompression-bomb limit are refused before they are
decoded."""
import numpy as np
import torch

PEAKS = {torch.uint8: 255, torch.uint16: 65535}     # integer pixels -> [0, 1]
GRAY_MODES = {"1": np.uint8, "L": np.uint8, "LA": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
              "I;16L": np.uint16, "I": np.uint16, "F": np.float32}


def pixel_count(n):
    """A number of pixels in the unit that fits: "3.1 megapixels", "5000 pixels"."""
    return f"{n / 1e6:.1f} megapixels" if n >= 1e6 else f"{n} pixels"


def read_pixels(path, max_pixels=None):
    """-> (1, C, H, W) as stored, turned as its EXIF orientation says: uint8, uint16 for 16-bit grayscale, float32
    in [0, 1] for float images; C = 1 for grayscale (with or without alpha), 3 otherwise (alpha is dropped).
    Images above Pillow's decompression-bomb limit (twice Image.MAX_IMAGE_PIXELS, where Pillow itself raises; none
    when it is None), or above `max_pixels` when given, are refused with one ValueError. A file that cannot be
    read raises one OSError that names it. 16-bit RGB is read as 8 bits (Pillow has no 16-bit RGB mode)."""
    import warnings

    from PIL import Image, ImageOps
    limit = max_pixels
    if limit is None and Image.MAX_IMAGE_PIXELS is not None:          # None: the user turned Pillow's guard off
        limit = 2 * Image.MAX_IMAGE_PIXELS
    guard = "set by --max-image-pixels" if max_pixels is not None else \
        "of Pillow's guard against decompression bombs; raise it with --max-image-pixels if you trust the file"
    try:
        with warnings.catch_warnings(), Image.open(path) as opened:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)       # the limit is checked here
            if limit is not None and opened.width * opened.height > limit:
                raise ValueError(f"{path} has {opened.width}x{opened.height} pixels, more than the limit of "
                                 f"{pixel_count(limit)} {guard}")
            if is_rgb16(opened):
                print(f"note: {path} has 16 bits per channel; it is read as 8-bit RGB (Pillow reads no 16-bit "
                      f"RGB; 16-bit gray keeps its depth)")
            turned = opened.getexif().get(0x0112, 1) not in (0, 1)          # EXIF orientation: 1 is upright
            image = ImageOps.exif_transpose(opened) if turned else opened   # as viewers show it (a copy if turned)
            if image.mode in GRAY_MODES:
                dtype = GRAY_MODES[image.mode]
                image = image.convert("L") if image.mode in ("1", "LA") else image
                array = np.array(image)                              # one writable copy, then Pillow's goes
                array = np.clip(array, 0, 65535).astype(dtype) if dtype == np.uint16 else \
                    np.clip(array, 0, 1).astype(dtype) if dtype == np.float32 else array
            else:
                array = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: {error}; raise the limit with --max-image-pixels if you trust the file") from error
    except (OSError, SyntaxError) as error:        # Pillow's truncated, unidentified and broken files
        if isinstance(error, FileNotFoundError):
            raise FileNotFoundError(f"no such image: {path}") from None
        raise OSError(f"{path} cannot be read as an image ({error})") from None
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def is_rgb16(image):
    """Is this open PNG stored with 16 bits per colour channel (which Pillow decodes to 8)?"""
    return image.format == "PNG" and image.mode in ("RGB", "RGBA") and \
        any(str(tile.args if isinstance(tile.args, str) else tile.args[0]).endswith(";16B") for tile in image.tile
            if tile.args)


def image_extensions():
    """The file extensions of the image formats Pillow can write."""
    from PIL import Image
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def to_unit(x):
    """Pixels as stored (uint8, uint16, float) -> float32 in [0, 1]."""
    return x.float() / PEAKS[x.dtype] if x.dtype in PEAKS else x.float()


def to_pixels(x, gray, dtype):
    """Decoded floats (B, 3, H, W) -> the image, on their device: clamped to [0, 1], a gray image the mean of the
    three channels (B, 1, H, W), as the integers of `dtype` (uint8, uint16) or as floats (any other dtype)."""
    x = x.clamp(0, 1)
    x = x.mean(1, keepdim=True) if gray else x
    return ((x * PEAKS[dtype]).round().to(dtype) if dtype in PEAKS else x).contiguous()


def as_rgb(x):
    """(1, 1 or 3, H, W) -> (1, 3, H, W): gray repeated in the three channels (a view)."""
    return x.expand(1, 3, *x.shape[-2:]) if x.shape[1] == 1 else x


def read_image(path):
    """-> (1, C, H, W) float32 in [0, 1] (see read_pixels); 16-bit values keep their precision (x / 65535)."""
    return to_unit(read_pixels(path))


def write_image(x, path):
    """(1, C, H, W) uint8, uint16 (16-bit grayscale PNG) or float in [0, 1] (written as 8 bits) -> an image file."""
    from PIL import Image
    x = x if x.dtype in PEAKS else to_pixels(x, False, torch.uint8)
    array = x[0].permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
