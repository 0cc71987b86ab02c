"""TACO's networks over a large image in bands (the geometry and the runner: bands.py). Only the latents y and
z are whole; g_a, h_a, h_s and g_s run over blocks, each within a memory budget, and give what they give in one
piece (exactly, for the integer networks; to float rounding for the transforms). A small image is one block.

The one global step is the Extractor's attention: its softmax runs over every position of the 1/8-resolution
features. A large image gives those positions block by block to an online softmax (Milakov and Gimelshein
2018) -- a running maximum and running sums, the same sums in another order -- before the bands that read the
refreshed text."""
import math

import torch

from machinery import bands
from machinery.images import PEAKS

DEFAULT_MEMORY = 1 << 29       # bytes of working memory the hyperprior's bands may use (codec.py --memory)


def stage(progress, name):
    """progress(name, done, total) as a callback of (done, total), or None."""
    return None if progress is None else lambda done, total: progress(name, done, total)


def run_analysis(layers, x, text, padding, refreshed=None):
    """x through g_a's layers in order: Injectors read the text, the Extractor refreshes it from x -- or, for a
    block of a large image, hands over the text `refreshed` beforehand from every position."""
    for layer in layers:
        if getattr(layer, "reads_text", False):
            x = layer(x, text, padding)
        elif getattr(layer, "refreshes_text", False):
            text = layer(x, text) if refreshed is None else refreshed
        else:
            x = layer(x)
    return x


class OnlineExtractor:
    """The Extractor's attention over blocks of image positions: start(text), attend(block) for each block,
    finish() -> the refreshed text. With one block it is the Extractor's own forward."""

    def __init__(self, extractor, text):
        self.extractor = extractor
        self.text, q = extractor.queries(text)                                 # (B, T, D), (B, heads, T, d)
        B, h, T, d = q.shape
        self.q = q
        self.maximum = q.new_full((B, h, T, 1), -math.inf)
        self.total, self.weighted = q.new_zeros(B, h, T, 1), q.new_zeros(B, h, T, d)

    def attend(self, x):
        """Add the image positions of the block x (B, C, h, w) to the softmax's sums."""
        k, v = self.extractor.keys_values(x)                                   # (B, heads, h*w, d)
        logits = self.q @ k.transpose(-1, -2)                                   # (B, heads, T, h*w)
        maximum = torch.maximum(self.maximum, logits.amax(-1, keepdim=True))
        rescale, p = torch.exp(self.maximum - maximum), torch.exp(logits - maximum)
        self.total = self.total * rescale + p.sum(-1, keepdim=True)
        self.weighted = self.weighted * rescale + p @ v
        self.maximum = maximum

    def finish(self):
        return self.extractor.output(self.text, self.weighted / self.total)


def analysis(model, image, text, padding, memory, progress=None, device=None):
    """y = g_a(x, text) over blocks of y, x read from `image` (bands.Pixels) block by block; on `device`. With a
    text adapter and several blocks, the Extractor first sees every position (one sweep over the 1/8 features),
    then the blocks run with the refreshed text: the same y as in one piece."""
    layers = model.g_a.spatial_chain()
    size = image.padded
    y_size = bands.output_size(layers, size)
    extra = bands.halo(layers, 0), bands.halo(layers, 1)
    if len(bands.blocks(*y_size, memory / bands.bytes_per_output(layers), 1, extra)) == 1:
        y = model.g_a(bands.channels_last(image.read(slice(0, size[0]), slice(0, size[1]))), text, padding)
        return y.to(device)
    extractor = next((layer for layer in layers if getattr(layer, "refreshes_text", False)), None)
    refreshed = None
    if extractor is not None:
        front = layers[:layers.index(extractor)]
        online = OnlineExtractor(extractor, text)
        bands.run(front, image.read, size, bands.output_size(front, size), memory,
                  lambda rows, columns, features: online.attend(features),
                  compute=lambda x: run_analysis(front, x, text, padding), progress=stage(progress, "text"))
        refreshed = online.finish()
    y = torch.empty(1, model.config.M, *y_size, device=device)
    bands.run(layers, image.read, size, y_size, memory, bands.into(y),
              compute=lambda x: run_analysis(layers, x, text, padding, refreshed), progress=stage(progress, "g_a"))
    return y


def apply(network, x, channels, memory, device):
    """network(x) over blocks of its output, x whole (a latent, read block by block onto `device`)."""
    out = torch.empty(1, channels, *bands.output_size(network, x.shape[-2:]), device=device)
    read = lambda rows, columns: x[..., rows, columns].float().to(device)      # noqa: E731
    bands.run(network, read, x.shape[-2:], out.shape[-2:], memory, bands.into(out))
    return out


def latent_bands(network, height, width, channels, memory):
    """Bands of whole rows of y (the coding order is row by row), each within about `memory` bytes: the work
    per position of `network` (h_s, or the widest context network), its halo included, plus about 64 bytes
    per channel of y for what the coder handles (y, symbols, indexes, scales and means in float64, copies)."""
    per_position = bands.bytes_per_output(network) + 64 * channels
    rows = max(1, int(memory / per_position / (width + bands.halo(network, 1)) - bands.halo(network, 0)))
    return [slice(r, min(r + rows, height)) for r in range(0, height, rows)]


def hyper_rows(h_s, z_hat, rows):
    """h_s(z_hat) for the rows `rows` of y only, all columns: (1, 2M, rows, w)."""
    read = lambda r, c: z_hat[..., r, c]                                        # noqa: E731
    w = bands.output_size(h_s, z_hat.shape[-2:])[1]
    return bands.run_block(h_s, read, z_hat.shape[-2:], (rows.start, rows.stop), (0, w))


def in_bands(network, height, width, channels, memory, progress=None):
    """The bands of rows of latent_bands(), one at a time, each followed by the memory handed back and a word
    to `progress`."""
    bands_of_rows = latent_bands(network, height, width, channels, memory)
    for done, rows in enumerate(bands_of_rows):
        yield rows
        bands.release_memory(len(bands_of_rows))
        if progress is not None:
            progress("coding", done + 1, len(bands_of_rows))


def hyperprior_rows(h_s, z_hat, channels, memory, progress=None):
    """(rows, h_s(z_hat) at those rows of y (1, 2M, rows, w)) for each band of rows of y, in coding order."""
    height, width = bands.output_size(h_s, z_hat.shape[-2:])
    for rows in in_bands(h_s, height, width, channels, memory, progress):
        yield rows, hyper_rows(h_s, z_hat, rows)


def synthesis(g_s, y_hat, info, dtype, memory, progress=None):
    """x_hat = g_s(y_hat), cropped to the image (info: container.unpack's) -> (1, 1 or 3, H, W) on the CPU, in
    `dtype` (floats in [0, 1], or 8- or 16-bit integers). g_s runs in bands, each written into the image as it
    finishes; a gray image is the mean of the three channels."""
    out = torch.empty(1, 1 if info.gray else 3, info.height, info.width, dtype=dtype)
    peak = PEAKS.get(dtype)
    device = next(g_s.parameters()).device

    def write(rows, columns, x_hat):                     # a block of the padded image: keep what is inside
        h, w = min(rows.stop, info.height) - rows.start, min(columns.stop, info.width) - columns.start
        if h <= 0 or w <= 0:
            return
        rows, columns = slice(rows.start, rows.start + h), slice(columns.start, columns.start + w)
        x_hat = x_hat[..., :h, :w].clamp(0, 1)
        x_hat = x_hat.mean(1, keepdim=True) if info.gray else x_hat
        out[..., rows, columns] = (x_hat * peak).round().to(dtype).cpu() if peak else x_hat.cpu()
    read = lambda rows, columns: y_hat[..., rows, columns].float().to(device)   # noqa: E731
    size = bands.output_size(g_s, y_hat.shape[-2:])                             # (H', W'): one band is one piece
    bands.run(g_s, read, y_hat.shape[-2:], size, memory, write, unit=16, progress=stage(progress, "g_s"))
    return out
