"""One picture of what the codec does with one image: where the bits go, what the caption changed, and where the
text adapter's queries look. TACO's claim made visible: the caption steers the encoder's bit allocation, the
decoder never sees it.

    python eval.py --explain photo.png --caption "a red barn in the snow" --checkpoint runs/demo/best.pt

Rows of the figure: (1) original, decoded, error, bits map; (2) the same image coded with an empty caption and
the differences it makes; (3) for the caption's most attended words, the first Injector's attention. An image
wider than 4:1 or taller than 1:2 is shown through its costliest window of that shape, so the figure stays
readable and bounded (at most 1280 x 2200 pixels as PNG). Any format matplotlib writes (PNG, JPEG, PDF, SVG, ...);
the file appears only once complete.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import taco
from machinery import captioner, checkpoints, clip_text, container, devices, files, metrics
from machinery.images import read_pixels, to_unit


def injectors(model):
    """The model's Injectors, in the order g_a runs them (the first sees the finest resolution)."""
    return [m for m in model.g_a.modules() if isinstance(m, taco.Injector)]


@torch.no_grad()
def analyse(model, x, caption):
    """x (1, C, H, W) in [0, 1], a caption -> what the figure shows, from one forward pass (in eval mode: the
    integer entropy parameters, as coded) and one real compress/decompress."""
    model.eval()
    H, W = x.shape[-2:]
    metrics.check_one_piece(H, W, "the image to explain")
    x = x[:, :3].expand(1, 3, H, W).to(next(model.parameters()).device)
    padded = taco.pad_to_64(x)                                                  # (1, 3, H', W')
    adapter = model.config.text_adapter
    for injector in injectors(model):
        injector.record_attention = True
    try:
        likelihoods = model(padded, [caption] if adapter else None)["likelihoods"]
        attention = injectors(model)[0].attention[0].cpu() if adapter else None   # (h, w, T)
    finally:
        for injector in injectors(model):
            injector.record_attention, injector.attention = False, None
    data = model.compress(x, caption)
    x_hat = model.decompress(data).to(x.device)           # decoded images come back to the host
    bits_y = metrics.bits(likelihoods["y"][0].double(), dim=0).cpu()           # (H'/16, W'/16)
    bits_z = float(metrics.bits(likelihoods["z"].double()))
    result = {"x": x.cpu(), "x_hat": x_hat.cpu(), "bits_y": bits_y, "bits_z": bits_z, "bytes": len(data),
              "bpp": 8 * len(data) / (H * W), "psnr": float(metrics.psnr(x_hat, x)), "caption": caption}
    if adapter:
        ids, _ = model.text_encoder.tokenize([caption])
        result["attention"] = attention                                         # sums to 1 over the T tokens
        result["tokens"] = [model.text_encoder.tokenizer.decode([int(t)]).strip() for t in ids[0]]
    return result


def word_attention(result, top=3):
    """The caption's most attended words (not the start, end or padding tokens): [(word, share, map (h, w))]."""
    tokens, attention = result["tokens"], result["attention"]
    words = [i for i, t in enumerate(tokens) if t and "<" not in t]            # <start_of_text>, <end_of_text>
    share = attention.mean((0, 1))                                              # (T,) mean over image positions
    ranked = sorted(words, key=lambda i: -float(share[i]))[:top]
    return [(tokens[i], float(share[i]), attention[:, :, i]) for i in ranked]


def upsample(map_, factor, H, W):
    """A map of the padded image at 1/factor resolution -> pixel resolution, cropped to the image (H, W)."""
    big = F.interpolate(map_[None, None].float(), scale_factor=factor, mode="nearest")[0, 0]
    return big[:H, :W].numpy()


HEADER_BITS = 8 * (container.HEADER.size + container.CHECKSUM.size)   # what a file holds beside the streams
WIDEST, TALLEST = 4, 2          # width:height and height:width shown whole; beyond, a window of that shape


def window(bits):
    """bits (H, W) per pixel -> the rows and columns the figure shows: all of them, or for an extreme aspect
    ratio the WIDEST:1 (1:TALLEST) window that holds the most bits (a 64 x 4000 strip drawn whole is a line)."""
    H, W = bits.shape
    spans = [slice(0, H), slice(0, W)]
    for axis, n in ((1, WIDEST * H), (0, TALLEST * W)):
        if bits.shape[axis] > n:
            sums = np.concatenate([[0], np.cumsum(bits.sum(1 - axis), dtype=np.float64)])
            start = int(np.argmax(sums[n:] - sums[:-n]))
            spans[axis] = slice(start, start + n)
    return tuple(spans)


def check_output(path):
    """Refuse a figure format matplotlib cannot write, before anything is computed or touched."""
    from matplotlib.figure import Figure
    kind = os.path.splitext(path)[1][1:].lower()
    supported = Figure().canvas.get_supported_filetypes()
    if kind not in supported:
        raise ValueError(f"{path}: matplotlib cannot write '.{kind}' figures; name the file with one of "
                         f"{', '.join('.' + k for k in sorted(supported))}")
    return kind


def save(fig, path):
    """Write the figure atomically (files.write_atomically): a failure leaves no partial file and whatever `path`
    held before. PNGs get 256 colours (a figure: a few hundred kB smaller)."""
    kind = check_output(path)

    def write(temporary):
        fig.savefig(temporary, dpi=80, format=kind)
        if kind == "png":
            with Image.open(temporary) as drawn:
                drawn.convert("RGB").quantize(256).save(temporary, format="PNG", optimize=True)
    files.write_atomically(path, write)


def show(fig, ax, picture, title, **style):
    drawn = ax.imshow(picture, **style)
    ax.set_title(title, fontsize=9)
    if picture.ndim == 2:
        fig.colorbar(drawn, ax=ax, fraction=0.03)


def figure(model, with_caption, empty, path, lpips=None, stand_in=None, source=None):
    """Write the three-row figure for one image coded with and without its caption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, H, W = with_caption["x"], *with_caption["x"].shape[-2:]
    bits = upsample(with_caption["bits_y"], 16, H, W) / 256                   # a y element covers 16x16 pixels
    rows, columns = window(bits)
    h, w = rows.stop - rows.start, columns.stop - columns.start
    image = lambda t: t[0, :, rows, columns].permute(1, 2, 0).clamp(0, 1).numpy()     # noqa: E731
    plane = lambda a: a[rows, columns]                                                 # noqa: E731
    grid = 3 if "attention" in with_caption else 2
    fig, axes = plt.subplots(grid, 4, figsize=(16, grid * (4 * h / w + 0.7) + 0.8), squeeze=False)
    if (h, w) != (H, W):
        fig.suptitle(f"rows {rows.start}-{rows.stop}, columns {columns.start}-{columns.stop} of the {H}x{W} image "
                     f"(the window with the most bits); the figures in the titles are for the whole image")
    for ax in axes.flat:
        ax.axis("off")

    estimate = with_caption["bits_y"].sum() + with_caption["bits_z"]
    overhead = 8 * with_caption["bytes"] - HEADER_BITS - float(estimate)
    show(fig, axes[0, 0], image(x), "original")
    show(fig, axes[0, 1], image(with_caption["x_hat"]),
         f"decoded: {with_caption['bpp']:.3f} bpp (file), {with_caption['psnr']:.2f} dB")
    show(fig, axes[0, 2], plane((with_caption["x_hat"] - x).abs().mean(1)[0].numpy()), "|error|, mean over RGB",
         cmap="magma")
    show(fig, axes[0, 3], plane(bits),
         f"bits per pixel of y: {with_caption['bits_y'].sum() / (H * W):.3f} bpp; "
         f"z {with_caption['bits_z'] / (H * W):.3f} bpp\n"
         f"file = these + header {HEADER_BITS} bits + coder and tables {overhead:+.0f} bits", cmap="viridis")

    delta_bits = plane(upsample(with_caption["bits_y"] - empty["bits_y"], 16, H, W) / 256)
    limit = max(float(np.abs(delta_bits).max()), 1e-9)
    show(fig, axes[1, 0], image(empty["x_hat"]), f"empty caption: {empty['bpp']:.3f} bpp, {empty['psnr']:.2f} dB")
    show(fig, axes[1, 1], delta_bits, "bits per pixel: with caption - without", cmap="coolwarm", vmin=-limit,
         vmax=limit)
    show(fig, axes[1, 2], plane((with_caption["x_hat"] - empty["x_hat"]).abs().mean(1)[0].numpy()),
         "|decoded with caption - without|", cmap="magma")
    lines = [f"caption: \"{with_caption['caption'][:60]}\"" + (f"\n({source})" if source else ""),
             f"bpp {with_caption['bpp'] - empty['bpp']:+.4f}, PSNR {with_caption['psnr'] - empty['psnr']:+.3f} dB"]
    if not model.config.text_adapter:
        lines = ["this model has no text adapter:", "the caption changes nothing"]
    elif lpips is not None:
        device = next(lpips.parameters()).device
        scores = [float(lpips(r["x_hat"].to(device), x.to(device))) for r in (with_caption, empty)]
        lines.append(f"LPIPS {scores[0]:.4f} vs {scores[1]:.4f} ({scores[0] - scores[1]:+.4f})")
    else:
        lines.append("LPIPS: no AlexNet weights here")
    if stand_in:
        lines.append(stand_in)
    axes[1, 3].text(0, 0.5, "\n".join(lines), fontsize=9, va="center")

    if grid == 3:
        for ax, (word, share, attention) in zip(axes[2], word_attention(with_caption)):
            ax.imshow(image(x))
            ax.imshow(plane(upsample(attention, 4, H, W)), cmap="inferno", alpha=0.6)
            ax.set_title(f"'{word}': {100 * share:.1f}% of the attention", fontsize=9)
        axes[2, 3].text(0, 0.5, "first Injector (1/4 resolution):\nwhere image queries look at each word,\n"
                        "weights averaged over heads\n(they sum to 1 over the caption's tokens,\n"
                        "padding included as in the reference)", fontsize=9, va="center")
    fig.tight_layout()
    try:
        save(fig, path)
    finally:
        plt.close(fig)


def explain(model, x, caption, path, lpips=None, source=None):
    """Code `x` with its caption and with an empty one; write the figure to `path`; return both analyses.
    `source`: where the caption came from (the captioner), named in the figure."""
    check_output(path)
    with_caption, empty = analyse(model, x, caption), analyse(model, x, "")
    stand_in = None
    if model.config.text_adapter and model.config.clip_pretrained == "random":
        stand_in = "STAND-IN: random CLIP text tower (no weights here):\nwords carry no learned meaning"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure(model, with_caption, empty, path, lpips, stand_in, source)
    return with_caption, empty


def from_command_line(args):
    """eval.py --explain: the figure of explain.py for one image and the first checkpoint."""
    try:
        devices.check_device(args.device)
        files.check_output(args.output)
        files.refuse_overwrite(args.output, args.force)
        check_output(args.output)
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if not os.path.isfile(args.explain):
        raise SystemExit(f"error: no such image: {args.explain}")
    try:
        model, _ = checkpoints.load_checkpoint(args.checkpoint[0], args.device)
    except checkpoints.CheckpointError as error:
        raise SystemExit(f"error: {error}")
    config = model.config
    if config.text_adapter and args.caption is None:
        raise SystemExit("error: this model reads a caption: give --caption (--caption '' explains the empty one)")
    if config.text_adapter:
        pretrained = args.clip_pretrained or config.clip_pretrained
        encoder = clip_text.TextEncoder(config.clip_model, pretrained, config.text_tokens)
        model.attach_text_encoder(encoder.to(args.device))
    try:
        lpips = metrics.load_lpips("reference", args.alexnet_weights).to(args.device)
    except clip_text.WeightsUnavailable:
        lpips = None
    pixels, source = read_pixels(args.explain), None
    if args.caption == "auto" and config.text_adapter:
        args.caption = captioner.auto_caption(args, pixels)
        source = f"written by {args.captioner} ({args.captioner_pretrained})"
    with_caption, empty = explain(model, to_unit(pixels), args.caption or "", args.output, lpips, source)
    print(f"{args.output}: {with_caption['bpp']:.4f} bpp, {with_caption['psnr']:.2f} dB with the caption; "
          f"{empty['bpp']:.4f} bpp, {empty['psnr']:.2f} dB without")
