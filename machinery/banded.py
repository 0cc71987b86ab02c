"""TACO's compress and decompress for an image larger than one piece (taco.py codes the others): the same steps
with g_a, h_a, h_s and g_s over blocks, each within a memory budget (the geometry and the runner: bands.py), into
the same bytes. Only the latents y and z are whole. The networks give what they give in one piece: exactly, for
the integer networks; to float rounding for the transforms, which the tests hold to the same files.

The one global step is the Extractor's attention: its softmax runs over every position of the 1/8-resolution
features. A large image gives those positions block by block to an online softmax (Milakov and Gimelshein
2018) -- a running maximum and running sums, the same sums in another order -- before the bands that read the
refreshed text."""
import math

import torch

from entropy import quantize, to_cpu
from machinery import bands, container, devices, integer
from machinery.images import to_pixels

DEFAULT_MEMORY = 1 << 29       # bytes of working memory the hyperprior's bands may use (codec.py --memory)


def analysis_layers(g_a):
    """g_a's layers in the order x meets them: taco.AnalysisTransform's stages with the adapter between them, or
    ELIC's one Sequential."""
    if hasattr(g_a, "analysis_transform"):
        return list(g_a.analysis_transform)
    s = g_a.stages
    if not g_a.text_adapter:
        return list(s)
    return [s[0], s[1], g_a.inject_quarter, s[2], g_a.extract_eighth, g_a.inject_eighth, s[3]]


def run_analysis(layers, x, text, padding, refreshed=None):
    """x through g_a's layers in order: Injectors read the text, the Extractor refreshes it from x -- or, for a
    block of a large image, hands over the text `refreshed` beforehand from every position."""
    for layer in layers:
        kind = type(layer).__name__
        if kind == "Injector":
            x = layer(x, text, padding)
        elif kind == "Extractor":
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
        """-> the refreshed text (B, T, D), as Extractor.forward ends."""
        attended = self.weighted / self.total                                   # (B, heads, T, d)
        return self.text + self.extractor.cross_attn.out_proj(attended.transpose(1, 2).flatten(2))


def compress(model, x, image, text, memory, progress=None):
    """TACO.compress's steps for a large image (image: container.describe(x)), each network in bands."""
    latents = devices.latent_device(model)
    y = analysis(model, bands.Pixels(x, image, model.device), *text, memory, progress, latents)   # (1, M, h, w)
    z = apply(model.h_a, y, model.config.N, memory, model.device)
    z_bytes = model.entropy_bottleneck.compress(z)
    z_hat = quantize(z, "dequantize", model.entropy_bottleneck.medians.view(1, -1, 1, 1)).to(latents)  # as taco
    fingerprint = container.fingerprint(model)
    nets = integer.networks(model, fingerprint)
    y_bytes, decisions = model.encode_y_in_bands(y, z_hat, nets, memory, progress)
    return container.pack(fingerprint, image, decisions, z_bytes, y_bytes)


def decompress(model, info, fingerprint, dtype, memory, progress=None):
    """TACO.decompress's steps for a large image (info: container.unpack's): y_hat, then g_s in bands."""
    return synthesis(model.g_s, decode_latents(model, info, fingerprint, memory, progress), info, dtype, memory,
                     progress)


def decode_latents(model, info, fingerprint, memory, progress=None):
    """-> y_hat (1, M, H'/16, W'/16), h_s over bands of rows of y: identical to one piece, on every machine."""
    with container.decoding_errors():
        z_hat = model.entropy_bottleneck.decompress(info.z_bytes, (1, model.config.N, info.padded[0] // 64,
                                                                   info.padded[1] // 64))
        nets = integer.networks(model, fingerprint)
        return model.decode_y_in_bands(info.y_bytes, z_hat.to(devices.latent_device(model)), nets,
                                       info.decisions, memory, progress)


def analysis(model, image, text, padding, memory, progress=None, device=None):
    """y = g_a(x, text) over blocks of y, x read from `image` (bands.Pixels) block by block; on `device`. With a
    text adapter, the Extractor first sees every position (one sweep over the 1/8 features), then the blocks run
    with the refreshed text: the same y as in one piece."""
    layers = analysis_layers(model.g_a)
    size = image.padded
    y_size = bands.output_size(layers, size)
    extractor = next((layer for layer in layers if type(layer).__name__ == "Extractor"), None)
    refreshed = None
    if extractor is not None:
        front = layers[:layers.index(extractor)]
        online = OnlineExtractor(extractor, text)
        bands.run(front, image.read, size, bands.output_size(front, size), memory,
                  lambda rows, columns, features: online.attend(features),
                  compute=lambda x: run_analysis(front, x, text, padding), progress=progress, stage="text")
        refreshed = online.finish()
    y = torch.empty(1, model.config.M, *y_size, device=device)
    bands.run(layers, image.read, size, y_size, memory, bands.into(y),
              compute=lambda x: run_analysis(layers, x, text, padding, refreshed), progress=progress, stage="g_a")
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


def hyperprior_rows(h_s, z_hat, channels, memory, progress=None):
    """(rows, h_s(z_hat) at those rows of y (1, 2M, rows, w), all columns) for each band of rows of y, in coding
    order."""
    height, width = bands.output_size(h_s, z_hat.shape[-2:])
    read = lambda r, c: z_hat[..., r, c]                                        # noqa: E731
    for rows in bands.each(latent_bands(h_s, height, width, channels, memory), "coding", progress):
        yield rows, bands.run_block(h_s, read, z_hat.shape[-2:], (rows.start, rows.stop), (0, width))


def encode_y(model, y, z_hat, nets, memory, progress=None):
    """TACO.encode_y band by band of rows of y: the same stream, one band's h_s output at a time."""
    encoder = container.CheckedEncoder(model.gaussian_conditional.tables())
    for rows, hyper in hyperprior_rows(nets.h_s, z_hat, model.config.M, memory, progress):
        scales, means = hyper.chunk(2, dim=1)                                   # 2 x (1, M, rows, w)
        indexes = model.gaussian_conditional.build_indexes(scales)
        symbols = quantize(to_cpu(y[:, :, rows]), "symbols", to_cpu(means))
        encoder.encode(raster(symbols), raster(indexes))                        # (1, rows, M, w)
    return encoder.finish()


def decode_y(model, y_bytes, z_hat, nets, decisions, memory, progress=None):
    """TACO.decode_y band by band of rows of y -> y_hat (1, M, h, w) in float64."""
    decoder = container.CheckedDecoder(y_bytes, model.gaussian_conditional.tables(), decisions)
    h, w = bands.output_size(nets.h_s, z_hat.shape[-2:])
    y_hat = torch.empty(1, model.config.M, h, w, dtype=torch.float64, device=z_hat.device)
    for rows, hyper in hyperprior_rows(nets.h_s, z_hat, model.config.M, memory, progress):
        scales, means = hyper.chunk(2, dim=1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        symbols = decoder.decode(raster(indexes))                               # (1, rows, M, w)
        y_hat[:, :, rows] = raster(symbols).to(means) + means
    decoder.finish()
    return y_hat


def raster(t):
    """(1, C, rows, w) -> (1, rows, C, w): the coding order, as taco.raster."""
    return t.transpose(1, 2)


def synthesis(g_s, y_hat, info, dtype, memory, progress=None):
    """x_hat = g_s(y_hat), cropped to the image (info: container.unpack's) -> (1, 1 or 3, H, W) on the CPU, in
    `dtype` (floats in [0, 1], or 8- or 16-bit integers). g_s runs in bands, each written into the image as it
    finishes; a gray image is the mean of the three channels."""
    out = torch.empty(1, 1 if info.gray else 3, info.height, info.width, dtype=dtype)
    device = next(g_s.parameters()).device

    def write(rows, columns, x_hat):                     # a block of the padded image: keep what is inside
        h, w = min(rows.stop, info.height) - rows.start, min(columns.stop, info.width) - columns.start
        if h <= 0 or w <= 0:
            return
        rows, columns = slice(rows.start, rows.start + h), slice(columns.start, columns.start + w)
        out[..., rows, columns] = to_pixels(x_hat[..., :h, :w], info.gray, dtype).cpu()
    read = lambda rows, columns: y_hat[..., rows, columns].float().to(device)   # noqa: E731
    size = bands.output_size(g_s, y_hat.shape[-2:])                             # (H', W'): one band is one piece
    bands.run(g_s, read, y_hat.shape[-2:], size, memory, write, unit=16, progress=progress, stage="g_s")
    return out
