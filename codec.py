"""The command line: compress an image with its caption into a .taco file, decompress it without one.

    python codec.py compress photo.png --caption "a red barn in the snow" --checkpoint runs/demo/best.pt
    python codec.py decompress photo.taco --checkpoint runs/demo/best.pt
    python codec.py info photo.taco                 # the file laid open: header, z's and y's bytes, checksum
"""
import argparse
import os
import sys
import time
from pathlib import Path

from machinery import banded, captioner, container, devices, elic, files
from machinery.checkpoints import CheckpointError, load_checkpoint
from machinery.clip_text import TextEncoder, WeightsUnavailable
from machinery.container import BitstreamError
from machinery.images import image_extensions, read_pixels, write_image


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


def command_compress(args):
    output = args.output or os.path.splitext(args.image)[0] + ".taco"
    check_before_work(args, output)                               # before anything is read or computed
    if args.caption_file is not None:
        args.caption = read_caption_file(args.caption_file)
    x = read_pixels(args.image, args.max_image_pixels)
    model, _ = load_checkpoint(args.checkpoint, args.device)
    if model.config.text_adapter:
        if args.caption is None:
            raise ValueError("this model reads a caption: give --caption or --caption-file "
                             "(--caption '' codes without one)")
        if args.caption == "auto":                      # written by CoCa; costs nothing in the file
            args.caption = captioner.auto_caption(args, x)
        clip = args.clip_pretrained or model.config.clip_pretrained
        if clip == "random":
            print("STAND-IN: this checkpoint's CLIP text tower has random weights (it was trained without the "
                  "pretrained ones): the caption reaches the encoder as a fixed code of its words, with no learned "
                  "meaning")
        model.attach_text_encoder(TextEncoder(model.config.clip_model, clip, model.config.text_tokens))
    start, progress = time.perf_counter(), Progress()
    data = model.compress(x, args.caption or "", memory=args.memory and args.memory * 2 ** 20,
                          progress=progress)
    progress.close()
    seconds = time.perf_counter() - start
    files.write_atomically(output, lambda path: Path(path).write_bytes(data))
    H, W = x.shape[-2:]
    print(f"{output}: {len(data)} bytes, {8 * len(data) / (H * W):.4f} bpp ({W}x{H}), {seconds:.2f} s")


def command_decompress(args):
    output = args.output or os.path.splitext(args.file)[0] + "_decoded.png"
    check_before_work(args, output, image_extensions())
    if os.path.splitext(output)[1].lower() in LOSSY:
        print(f"note: {output} is a lossy format: the decoded image is re-encoded, and changes again "
              f"(.png keeps it exact)")
    model, _ = load_checkpoint(args.checkpoint, args.device)
    with open(args.file, "rb") as f:
        data = f.read()
    start, progress = time.perf_counter(), Progress()
    x_hat = model.decompress(data, dtype=None, memory=args.memory and args.memory * 2 ** 20,
                             max_pixels=args.max_pixels, progress=progress)
    progress.close()
    seconds = time.perf_counter() - start
    files.write_atomically(output, lambda path: write_image(x_hat, path))
    print(f"{output}: {x_hat.shape[-1]}x{x_hat.shape[-2]}, {seconds:.2f} s")


def command_info(args):
    """A .taco file laid open without a checkpoint: the header's fields, z's and y's bytes, the checksum."""
    with open(args.file, "rb") as f:
        data = f.read()
    info = container.unpack(data, None, container.FORMAT_PIXELS)          # every check decompress makes first
    H, W = info.height, info.width
    bpp = lambda n: 8 * n / (H * W)                                      # noqa: E731
    print(f"{args.file}: TACO format {container.VERSION}, {len(data)} bytes, {bpp(len(data)):.4f} bpp")
    rows = [("image", f"{W}x{H}, {'gray' if info.gray else 'RGB'}, {info.bits} bits (coded padded to "
                      f"{info.padded[1]}x{info.padded[0]})"),
            ("model", f"fingerprint {info.written_by.hex()}: decode with the checkpoint it names"),
            ("header", f"{container.HEADER.size} bytes (magic, version, fingerprint, size, flags, the decisions' "
                       f"check {info.decisions:08x}, the streams' lengths)"),
            ("z", f"{len(info.z_bytes)} bytes ({bpp(len(info.z_bytes)):.4f} bpp): the hyperprior's side information"),
            ("y", f"{len(info.y_bytes)} bytes ({bpp(len(info.y_bytes)):.4f} bpp): the image's latent"),
            ("checksum", f"{container.CHECKSUM.size} bytes (CRC-32 of all the rest: it matches)")]
    for name, text in rows:
        print(f"  {name:9s} {text}")


LOSSY = {".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif", ".heic", ".jp2", ".j2k", ".jpx"}


def check_before_work(args, output, extensions=None):
    """What can be checked before a model is loaded or a pixel coded, each failure in one line naming it."""
    devices.check_device(args.device)
    files.check_output(output, extensions)
    files.refuse_overwrite(output, args.force)


def read_caption_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError:
        raise ValueError(f"caption file {path} is not UTF-8 text; save it as UTF-8") from None


def positive(text):
    """argparse type: an integer above 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, not {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description="TACO: compress an image with its caption; decompress "
                                                 "without it.", epilog="Errors exit with status 1.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="image (+ caption) -> .taco file")
    c.add_argument("image", help="input image (PNG, JPEG, ...; grayscale and RGBA are accepted)")
    given = c.add_mutually_exclusive_group()
    given.add_argument("--caption", help="the caption that guides the encoder (not stored in the file); 'auto': "
                                         "written by a captioner (CoCa, --captioner), and printed")
    given.add_argument("--caption-file", help="read the caption from this UTF-8 text file instead")
    c.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py, a released "
                                                       "lambda_*.pth.tar or CompressAI's mbt2018-mean file")
    captioner.add_arguments(c)
    c.add_argument("--clip-pretrained", help="CLIP weights: a local file or open_clip tag "
                                             "(default: the one the checkpoint was trained with)")
    c.add_argument("--max-image-pixels", type=int, help="refuse input images above this many pixels (default: "
                                                        "Pillow's decompression-bomb limit, about 179 million; the "
                                                        f"format holds up to {container.FORMAT_PIXELS})")
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
    d.add_argument("-o", "--output", help="output image, its format from the extension (default: "
                                          "<file>_decoded.png; 16-bit gray sources give 16-bit PNGs; a lossy format "
                                          "re-encodes, and says so)")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.set_defaults(run=command_decompress)
    i = sub.add_parser("info", help=".taco file -> its layout, without a checkpoint: header fields, z's and y's "
                                    "bytes, the checksum")
    i.add_argument("file", help="a .taco file")
    i.set_defaults(run=command_info)
    for command in (c, d):
        command.add_argument("--device", default="cpu", help="where the networks run: cpu, cuda, cuda:1, ... (the "
                                                             "entropy coder always runs on the CPU)")
        command.add_argument("--memory", type=positive,
                             help=f"working memory for the networks in MiB: large images run in bands of about this "
                                  f"size, with the same result (default {banded.DEFAULT_MEMORY // 2 ** 20} for the "
                                  f"hyperprior, {elic.ElicTACO.default_memory // 2 ** 20} for ELIC); the image and "
                                  f"the latents come on top (docs/speed.md measures them per pixel)")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (BitstreamError, CheckpointError, WeightsUnavailable, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
