"""Checkpoints and the command line: load a model (ours, or a released TACO file), read and write images, and
compress / decompress files.

    python codec.py compress photo.png --caption "a red barn in the snow" --checkpoint runs/demo/best.pt
    python codec.py decompress photo.taco --checkpoint runs/demo/best.pt
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

import bands
import captioner
import container
import elic
import taco
from clip_text import TextEncoder, WeightsUnavailable
from container import BitstreamError
from entropy import TABLE_BUFFERS


CHECKPOINT_FORMAT = 2      # 2: h_s gives (scales, means), as CompressAI and elic.py; 1 gave (means, scales)


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is not ours, or does not fit its own config."""


def save_checkpoint(path, model, **extra):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
               "format": CHECKPOINT_FORMAT, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """-> (TACO in eval mode, the whole checkpoint dict). Ours ({"config", "state_dict", ...}) or a released
    lambda_*.pth.tar of the reference ({"state_dict", optimizer states, epoch})."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "config" not in checkpoint:
        return load_released(path, checkpoint).to(device).eval(), checkpoint
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a TACO checkpoint (no config and state_dict)")
    try:
        model = build_model(taco.TacoConfig(**checkpoint["config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an unknown config: {error}") from error
    state = checkpoint["state_dict"]
    if checkpoint.get("format", 1) == 1 and model.config.backbone == "hyperprior":
        state = dict(state)                     # format 1 put the means first in h_s's output: swap the halves
        for key in ("h_s.4.weight", "h_s.4.bias"):
            state[key] = torch.cat(state[key].chunk(2, dim=0)[::-1])
    load_weights(model, state, path)
    return model.to(device).eval(), checkpoint


def load_released(path, checkpoint):
    """A released TACO file -> ElicTACO. The files are saved from the training model, before any update():
    CompressAI's coding tables are empty and the scale table may be too (the reference builds
    GaussianConditional(None)); either way our update() rebuilds them. Every other key must match exactly, in
    any of CompressAI's naming generations (elic.released_key)."""
    state = {elic.released_key(k): v for k, v in checkpoint["state_dict"].items()}
    state = {k: v for k, v in state.items() if k is not None}
    if state.get("gaussian_conditional.scale_table", torch.ones(1)).numel() == 0:
        del state["gaussian_conditional.scale_table"]                   # never filled: keep our (equal) table
    model = elic.ElicTACO(elic.OFFICIAL)
    load_weights(model, state, path, rebuilt=TABLE_BUFFERS + ("gaussian_conditional.scale_table",))
    return model.update()


def load_weights(model, state, path, rebuilt=()):
    """load_state_dict, strict, with an error that names the first missing, unexpected or misshapen key.
    Keys ending with one of `rebuilt` may be absent: the caller rebuilds them (coding tables, by update())."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(rebuilt)]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (the model needs {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and not k.endswith(TABLE_BUFFERS) and state[k].shape != v.shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            raise CheckpointError(f"{path} does not fit this model: {len(keys)} {problem} key(s), first {keys[0]}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} is damaged: {broken[0]} holds NaN or infinite values")
    model.load_state_dict(state, strict=not rebuilt)          # the keys were checked above


def build_model(config):
    """The codec a config describes: the GDN mean-scale hyperprior (taco.py) or the paper's ELIC (elic.py)."""
    if config.backbone == "elic":
        return elic.ElicTACO(config)
    if config.backbone != "hyperprior":
        raise ValueError(f"unknown backbone {config.backbone!r} (hyperprior or elic)")
    return taco.TACO(config)


# ----------------------------------------------------------------------------------------------------------
# Command line: python codec.py compress | decompress
# ----------------------------------------------------------------------------------------------------------
GRAY_MODES = {"1": np.uint8, "L": np.uint8, "LA": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
              "I;16L": np.uint16, "I": np.uint16, "F": np.float32}


def read_pixels(path, max_pixels=None):
    """-> (1, C, H, W) as stored: uint8, uint16 for 16-bit grayscale, float32 in [0, 1] for float images; C = 1
    for grayscale (with or without alpha), 3 otherwise (alpha is dropped). Images above Pillow's decompression-
    bomb limit (twice Image.MAX_IMAGE_PIXELS, where Pillow itself raises), or above `max_pixels` when given, are
    refused with one ValueError."""
    import warnings
    from PIL import Image
    limit = 2 * Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)       # the limit is checked here
            if limit is not None and image.width * image.height > limit:
                raise ValueError(f"{path} has {image.width}x{image.height} pixels, more than the limit of "
                                 f"{limit / 1e6:.0f} megapixels (Pillow's guard against decompression bombs); "
                                 f"raise it with --max-image-pixels if you trust the file")
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
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def to_unit(x):
    """Pixels as stored (uint8, uint16, float) -> float32 in [0, 1]."""
    return x.float() / bands.PEAKS[x.dtype] if x.dtype in bands.PEAKS else x.float()


def as_rgb(x):
    """(1, 1 or 3, H, W) -> (1, 3, H, W): gray repeated in the three channels (a view)."""
    return x.expand(1, 3, *x.shape[-2:]) if x.shape[1] == 1 else x


def read_image(path):
    """-> (1, C, H, W) float32 in [0, 1] (see read_pixels); 16-bit values keep their precision (x / 65535)."""
    return to_unit(read_pixels(path))


def write_image(x, path):
    """(1, C, H, W) uint8, uint16 (16-bit grayscale PNG) or float in [0, 1] (written as 8 bits) -> an image file."""
    from PIL import Image
    if x.dtype not in (torch.uint8, torch.uint16):
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    array = x[0].permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


class Progress:
    """progress(stage, done, total) for the models' compress / decompress: one tqdm bar per stage, shown only
    when the image takes more than two seconds."""

    def __init__(self):
        self.bar = None

    def __call__(self, stage, done, total):
        from tqdm import tqdm
        if self.bar is None or self.bar.desc != stage:
            self.close()
            self.bar = tqdm(total=total, desc=stage, unit="band", delay=2, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_output(path, force, write):
    """Refuse to overwrite unless forced; write next to the target, then move into place."""
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def command_compress(args):
    x = read_pixels(args.image, args.max_image_pixels)
    model, _ = load_checkpoint(args.checkpoint, args.device)
    if model.config.text_adapter:
        if args.caption is None and args.caption_file is None:
            raise ValueError("this model reads a caption: give --caption or --caption-file "
                             "(--caption '' codes without one)")
        if args.caption_file is not None:
            with open(args.caption_file, encoding="utf-8") as f:
                args.caption = f.read().strip()
        if args.caption == "auto":                      # written by CoCa; costs nothing in the file
            args.caption = captioner.Captioner(args.captioner, args.captioner_pretrained, args.device)(x)
            print(f"caption: {args.caption}")
        clip = args.clip_pretrained or model.config.clip_pretrained
        model.attach_text_encoder(TextEncoder(model.config.clip_model, clip, model.config.text_tokens))
    output = args.output or os.path.splitext(args.image)[0] + ".taco"
    start, progress = time.perf_counter(), Progress()
    data = model.compress(x, args.caption or "", memory=args.memory and args.memory * 2 ** 20,
                          progress=progress)
    progress.close()
    seconds = time.perf_counter() - start
    write_output(output, args.force, lambda p: open(p, "wb").write(data))
    H, W = x.shape[-2:]
    print(f"{output}: {len(data)} bytes, {8 * len(data) / (H * W):.4f} bpp ({W}x{H}), {seconds:.2f} s")


def command_decompress(args):
    model, _ = load_checkpoint(args.checkpoint, args.device)
    with open(args.file, "rb") as f:
        data = f.read()
    output = args.output or os.path.splitext(args.file)[0] + "_decoded.png"
    start, progress = time.perf_counter(), Progress()
    x_hat = model.decompress(data, dtype=None, memory=args.memory and args.memory * 2 ** 20,
                             max_pixels=args.max_pixels, progress=progress)
    progress.close()
    seconds = time.perf_counter() - start
    write_output(output, args.force, lambda p: write_image(x_hat, p))
    print(f"{output}: {x_hat.shape[-1]}x{x_hat.shape[-2]}, {seconds:.2f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="TACO: compress an image with its caption; decompress "
                                                 "without it.", epilog="Errors exit with status 1.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="image (+ caption) -> .taco file")
    c.add_argument("image", help="input image (PNG, JPEG, ...; grayscale and RGBA are accepted)")
    c.add_argument("--caption", help="the caption that guides the encoder (not stored in the file); 'auto': "
                                     "written by a captioner (CoCa, --captioner), and printed")
    c.add_argument("--caption-file", help="read the caption from this UTF-8 text file instead")
    c.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    captioner.add_arguments(c)
    c.add_argument("--clip-pretrained", help="CLIP weights: a local file or open_clip tag "
                                             "(default: the one the checkpoint was trained with)")
    c.add_argument("--max-image-pixels", type=int, help="refuse input images above this many pixels (default: "
                                                        "Pillow's decompression-bomb limit, about 179 million)")
    c.add_argument("-o", "--output", help="output file (default: the image's name with .taco)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(run=command_compress)
    d = sub.add_parser("decompress", help=".taco file -> PNG image (no caption needed)")
    d.add_argument("file", help="a .taco file")
    d.add_argument("--checkpoint", required=True, help="the checkpoint that wrote the file")
    d.add_argument("--max-pixels", type=int, default=container.MAX_PIXELS,
                   help=f"refuse files that declare more pixels than this, before decoding anything (default "
                        f"{container.MAX_PIXELS}, about {container.MAX_PIXELS / 1e6:.0f} megapixels; the format "
                        f"allows {container.FORMAT_PIXELS})")
    d.add_argument("-o", "--output", help="output image (default: <file>_decoded.png; 16-bit sources give "
                                          "16-bit PNGs)")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.set_defaults(run=command_decompress)
    for command in (c, d):
        command.add_argument("--device", default="cpu", help="where the networks run: cpu, cuda, cuda:1, ... (the "
                                                             "entropy coder always runs on the CPU)")
        command.add_argument("--memory", type=int,
                             help=f"working memory for the networks in MiB: large images run in bands of about this "
                                  f"size, with the same result (default {taco.DEFAULT_MEMORY // 2 ** 20} for the "
                                  f"hyperprior, {elic.ElicTACO.default_memory // 2 ** 20} for ELIC); the image and "
                                  f"the latents come on top (about 9-23 bytes per pixel)")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (BitstreamError, CheckpointError, WeightsUnavailable, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
