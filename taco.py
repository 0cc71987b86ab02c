"""Pixels <-> bits: the TACO codec (Lee et al., ICML 2024) on a GDN mean-scale hyperprior.

    image (H, W) --pad to 64--> x --g_a(x, caption tokens)--> y --h_a--> z
    z --EntropyBottleneck--> z_bytes;  h_s(z_hat) --> scales, means;  y --GaussianConditional--> y_bytes
    file = header (magic, version, model fingerprint, H, W, check of the decoder's decisions)
           + z_bytes + y_bytes + CRC-32

The caption enters only the encoder, through the text adapter inside g_a; the decoder rebuilds the image
from the file alone. Backbone: Balle et al. 2017 (GDN), Balle et al. 2018 and Minnen et al. 2018 (mean-scale
hyperprior). Checkpoints and the compress/decompress command line: codec.py.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import bands
from clip_text import TextEncoder
from container import MAX_PIXELS, BitstreamError, check_decisions, decisions_crc, pack, unpack
from entropy import EntropyBottleneck, GaussianConditional, lower_bound, quantize, to_cpu
from integer import IntegerNetwork
from rangecoder import SymbolDecoder, SymbolEncoder


@dataclass
class TacoConfig:
    N: int = 128                     # channels of the transforms and of z
    M: int = 192                     # channels of y
    text_adapter: bool = True        # False: the plain mean-scale hyperprior, the baseline to compare with
    clip_model: str = "ViT-B-32-quickgelu"  # open_clip name (OpenAI's CLIP uses QuickGELU) or local-dir:<folder>
    clip_pretrained: str = "openai"  # open_clip weights tag, a local weights file, or "random"
    text_tokens: int = 38            # captions are cut or padded to this many tokens, as in the reference
    text_dim: int = 512              # width of the CLIP text tower's token features
    heads: int = 8                   # attention heads in the adapter
    mask_padding: bool = False       # the reference lets the adapter attend to padding tokens too
    backbone: str = "hyperprior"     # "elic": the paper's exact model (elic.py), N=192, M=320
    slices: tuple = (16, 16, 32, 64, 192)  # elic only: the uneven channel slices of y


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
class NonNegative(nn.Module):
    """Store v as sqrt(v + pedestal) and bound it below, so v >= minimum while gradients stay alive near 0
    (Balle et al. 2017, appendix)."""

    pedestal = 2 ** -36

    def __init__(self, init, minimum=0.0):
        super().__init__()
        self.bound = (minimum + self.pedestal) ** 0.5
        self.param = nn.Parameter(torch.sqrt(torch.clamp(init + self.pedestal, min=self.pedestal)))

    def forward(self):
        return lower_bound(self.param, self.bound) ** 2 - self.pedestal


class GDN(nn.Module):
    """y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2); the inverse (IGDN) multiplies instead."""

    per_position = True              # mixes channels, never positions: it adds no halo (bands.py)

    def __init__(self, channels, inverse=False, beta_min=1e-6, gamma_init=0.1):
        super().__init__()
        self.inverse = inverse
        self.beta = NonNegative(torch.ones(channels), minimum=beta_min)
        self.gamma = NonNegative(gamma_init * torch.eye(channels))

    def forward(self, x):
        C = x.shape[1]
        norm = F.conv2d(x * x, self.gamma().view(C, C, 1, 1), self.beta())      # (B, C, H, W)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def pad_to_64(x):
    """(B, C, H, W) -> (B, C, H', W'), H' and W' the next multiples of 64, edges replicated (cropped back later)."""
    H, W = x.shape[-2:]
    return F.pad(x, (0, -W % 64, 0, -H % 64), mode="replicate")


def conv(cin, cout, kernel=5, stride=2):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin, cout, kernel=5, stride=2):
    return nn.ConvTranspose2d(cin, cout, kernel, stride, padding=kernel // 2, output_padding=stride - 1)


def to_tokens(x):
    return x.flatten(2).transpose(1, 2)                                         # (B, H*W, C)


class Injector(nn.Module):
    """Text -> image: image tokens query the projected caption tokens.
    out = LN(image) + gamma * Attn(LN(image), LN(W t), LN(W t)), gamma per channel, initialised to 0
    (the residual starts from the *normalized* image, as in the reference)."""

    per_position = True              # each image position queries the caption alone: no halo (bands.py)

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.text_feature_dim_proj = nn.Linear(text_dim, dim)
        nn.init.kaiming_normal_(self.text_feature_dim_proj.weight)               # as the reference
        self.image_norm, self.text_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.record_attention, self.attention = False, None     # explain.py reads where the queries look

    def forward(self, x, text, padding=None):
        B, C, H, W = x.shape
        image = self.image_norm(to_tokens(x))                                   # (B, H*W, C)
        text = self.text_norm(self.text_feature_dim_proj(text))                 # (B, T, C)
        attended, weights = self.cross_attn(image, text, text, key_padding_mask=padding,
                                            need_weights=self.record_attention)   # weights (B, H*W, T)
        if self.record_attention:
            self.attention = weights.detach().view(B, H, W, -1)                 # averaged over heads
        return (image + self.gamma * attended).transpose(1, 2).reshape(B, C, H, W)


class Extractor(nn.Module):
    """Image -> text: caption tokens query the projected image tokens, refreshing the text stream.
    out = LN(t) + Attn(LN(t), LN(W image), LN(W image)).

    The attention's softmax runs over every image position, so a large image gives its positions block by
    block: `start`, `attend` for each block, `finish`, with a running maximum and running sums (the online
    softmax of Milakov and Gimelshein 2018) -- the same sums in another order. `forward` is one block."""

    per_position = True              # x passes through unchanged; the text it returns needs every position

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.image_feature_dim_proj = nn.Linear(dim, text_dim)
        nn.init.kaiming_normal_(self.image_feature_dim_proj.weight)
        self.image_norm, self.text_norm = nn.LayerNorm(text_dim), nn.LayerNorm(text_dim)
        self.cross_attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)

    def forward(self, x, text):
        return self.finish(self.attend(self.start(text), x))

    def heads(self, t):
        B, L, D = t.shape
        return t.view(B, L, self.cross_attn.num_heads, -1).transpose(1, 2)     # (B, heads, L, D/heads)

    def start(self, text):
        text = self.text_norm(text)                                             # (B, T, D)
        w_q = self.cross_attn.in_proj_weight.chunk(3)[0]
        b_q = self.cross_attn.in_proj_bias.chunk(3)[0]
        q = self.heads(F.linear(text, w_q, b_q))                                # (B, heads, T, d)
        B, h, T, d = q.shape
        running = dict(maximum=q.new_full((B, h, T, 1), -math.inf), total=q.new_zeros(B, h, T, 1),
                       weighted=q.new_zeros(B, h, T, d))
        return text, q * d ** -0.5, running

    def attend(self, state, x):
        """Add the image positions of the block x (B, C, h, w) to the softmax's sums."""
        text, q, running = state
        image = self.image_norm(self.image_feature_dim_proj(to_tokens(x)))      # (B, h*w, D)
        _, w_k, w_v = self.cross_attn.in_proj_weight.chunk(3)
        _, b_k, b_v = self.cross_attn.in_proj_bias.chunk(3)
        k, v = self.heads(F.linear(image, w_k, b_k)), self.heads(F.linear(image, w_v, b_v))  # (B, heads, h*w, d)
        logits = q @ k.transpose(-1, -2)                                        # (B, heads, T, h*w)
        maximum = torch.maximum(running["maximum"], logits.amax(-1, keepdim=True))
        rescale, p = torch.exp(running["maximum"] - maximum), torch.exp(logits - maximum)
        running = dict(maximum=maximum, total=running["total"] * rescale + p.sum(-1, keepdim=True),
                       weighted=running["weighted"] * rescale + p @ v)
        return text, q, running

    def finish(self, state):
        text, _, running = state
        attended = (running["weighted"] / running["total"]).transpose(1, 2).flatten(2)  # (B, T, D)
        return text + self.cross_attn.out_proj(attended)


class AnalysisTransform(nn.Module):
    """g_a: four [conv 5x5 stride 2, GDN] stages, no GDN after the last; the text adapter sits after
    stage 2 (1/4 resolution: Injector) and stage 3 (1/8: Extractor, then Injector)."""

    def __init__(self, config):
        super().__init__()
        N, M = config.N, config.M
        self.stages = nn.ModuleList([nn.Sequential(conv(3, N), GDN(N)), nn.Sequential(conv(N, N), GDN(N)),
                                     nn.Sequential(conv(N, N), GDN(N)), conv(N, M)])
        self.text_adapter = config.text_adapter
        if config.text_adapter:
            self.inject_quarter = Injector(N, config.text_dim, config.heads)
            self.extract_eighth = Extractor(N, config.text_dim, config.heads)
            self.inject_eighth = Injector(N, config.text_dim, config.heads)

    def spatial_chain(self):
        """The layers in the order x meets them (what bands.py and run_analysis walk)."""
        s = self.stages
        if not self.text_adapter:
            return [s[0], s[1], s[2], s[3]]
        return [s[0], s[1], self.inject_quarter, s[2], self.extract_eighth, self.inject_eighth, s[3]]

    def forward(self, x, text=None, padding=None):
        return run_analysis(self.spatial_chain(), x, text, padding)             # (B, M, H/16, W/16)


def run_analysis(layers, x, text, padding, refreshed=None):
    """x through g_a's layers: Injectors read the text, the Extractor refreshes it from x -- or hands over the
    text `refreshed` beforehand from every position (how a large image runs in bands: TACO.analysis)."""
    for layer in layers:
        if isinstance(layer, Injector):
            x = layer(x, text, padding)
        elif isinstance(layer, Extractor):
            text = layer(x, text) if refreshed is None else refreshed
        else:
            x = layer(x)
    return x


def synthesis_transform(N, M):
    """g_s: the mirror of g_a with transposed convolutions and IGDN."""
    return nn.Sequential(deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
                         deconv(N, N), GDN(N, inverse=True), deconv(N, 3))


def hyper_analysis(N, M):
    return nn.Sequential(conv(M, N, 3, 1), nn.LeakyReLU(), conv(N, N), nn.LeakyReLU(), conv(N, N))


def hyper_synthesis(N, M):
    """h_s ends with 2M channels: the scales and the means of y (CompressAI's order)."""
    return nn.Sequential(deconv(N, M), nn.LeakyReLU(), deconv(M, M * 3 // 2), nn.LeakyReLU(),
                         conv(M * 3 // 2, 2 * M, 3, 1))


# ----------------------------------------------------------------------------------------------------------
# Coding order and progress
# ----------------------------------------------------------------------------------------------------------
DEFAULT_MEMORY = 1 << 29       # bytes of working memory the hyperprior's bands may use (codec.py --memory)


def raster(t):
    """(B, C, rows, w) -> (B, rows, C, w): y is coded row by row, each row all channels, left to right."""
    return t.transpose(1, 2)


def stage(progress, name):
    """progress(name, done, total) as a callback of (done, total), or None."""
    return None if progress is None else lambda done, total: progress(name, done, total)


def report(progress, name, done, total):
    if progress is not None:
        progress(name, done, total)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic_gpu():
    """Coding runs in plain fp32 with deterministic cuDNN algorithms (as the reference): cuDNN may otherwise
    pick another convolution algorithm from call to call, and TF32 (which training may enable) rounds
    matmul inputs to 10 mantissa bits, so the encoder's and the decoder's float paths would drift further."""
    flags = (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "allow_tf32", False), \
        (torch.backends.cuda.matmul, "allow_tf32", False)
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def has_float64(device):
    """False on devices without float64 (Apple's MPS refuses to create it)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
        return True
    except (TypeError, RuntimeError):
        return False


ENCODER_ONLY = ("g_a.", "h_a.")     # state-dict prefixes of what only the encoder runs: not in the fingerprint


class TACO(nn.Module):
    """forward(x, text) for training; compress(x, caption) -> bytes and decompress(bytes) -> x_hat for coding.
    `text` is a list of captions (needs a text encoder, see `attach_text_encoder`) or precomputed
    (features (B, T, D), padding (B, T)) from one."""

    default_memory = DEFAULT_MEMORY  # the bands' budget when none is given (elic.py: 4x, for its wider halos)

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or TacoConfig()
        self.g_a, self.g_s, self.h_a, self.h_s = self.transforms(config)
        self.entropy_bottleneck = EntropyBottleneck(config.N)
        self.gaussian_conditional = GaussianConditional()
        self.__dict__["text_encoder"] = None      # not a submodule: its weights come from open_clip

    def transforms(self, config):
        """g_a, g_s, h_a, h_s of the GDN mean-scale hyperprior (elic.py builds the paper's instead)."""
        N, M = config.N, config.M
        return AnalysisTransform(config), synthesis_transform(N, M), hyper_analysis(N, M), hyper_synthesis(N, M)

    def attach_text_encoder(self, encoder=None):
        """Give the model its caption reader (built from the config when not given)."""
        if encoder is None:
            c = self.config
            encoder = TextEncoder(c.clip_model, c.clip_pretrained, c.text_tokens)
        if encoder.width != self.config.text_dim or encoder.tokens != self.config.text_tokens:
            raise ValueError(f"text encoder gives {encoder.tokens} x {encoder.width} features; this model "
                             f"reads {self.config.text_tokens} x {self.config.text_dim}")
        self.__dict__["text_encoder"] = encoder
        return self

    def read_text(self, text, device):
        """captions, precomputed features (B, T, D), or (features, padding) -> features, padding mask or None."""
        if not self.config.text_adapter:
            return None, None
        if text is None:
            raise ValueError("this model has a text adapter: pass captions, or their CLIP token features, as text")
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            if self.text_encoder is None:
                raise RuntimeError("this model reads captions: call attach_text_encoder() first")
            features, padding, _ = self.text_encoder(list(text))
        elif isinstance(text, torch.Tensor):
            features, padding = text, None
        else:
            features, padding = text
        if padding is None or not self.config.mask_padding:
            return features.to(device), None
        return features.to(device), padding.to(device)

    def forward(self, x, text=None):
        """x (B, 3, H, W) in [0, 1], H and W multiples of 64 -> {"x_hat", "likelihoods": {"y", "z"}}.
        In eval mode the entropy parameters come from the integer networks and the transforms see the blocks'
        layout (bands.channels_last), exactly as in compress and decompress. (Training leaves the layout to
        train.py.)"""
        layout = (lambda t: t) if self.training else bands.channels_last       # noqa: E731
        y = self.g_a(layout(x), *self.read_text(text, x.device))               # (B, M, H/16, W/16)
        z = self.h_a(y)                                                         # (B, N, H/64, W/64)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        exact = not self.training and has_float64(x.device)      # no float64 (MPS): the float estimate
        nets = self.integer_networks() if exact else self.float_networks()
        y_hat, y_likelihoods = self.y_model(y, nets.h_s(z_hat), nets)
        x_hat = self.g_s(layout(y_hat.to(x.dtype)))
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # The networks that give the entropy parameters: as trained (float), and in exact integer arithmetic for
    # coding (integer.py), so that a file decodes to the same symbols on every machine. elic.py adds its own.
    def float_networks(self):
        return SimpleNamespace(h_s=self.h_s)

    def integer_networks(self, fingerprint=None):
        """Converted from the float weights by exact operations, once per set of weights."""
        return self.for_these_weights("integer_networks", lambda: SimpleNamespace(h_s=IntegerNetwork(self.h_s)),
                                      fingerprint)

    # How y is modelled and coded given the hyperprior's output; elic.py overrides these three.
    def y_model(self, y, hyper, nets):
        """y, h_s(z_hat) (B, 2M, h, w) -> y_hat, likelihoods: a Gaussian with the hyperprior's scales and means."""
        scales, means = hyper.chunk(2, dim=1)                                   # 2 x (B, M, h, w)
        return self.gaussian_conditional(y, scales, means)

    def encode_y(self, y, z_hat, nets, memory, progress=None):
        """-> y's bytes, CRC-32 of the coding decisions (the table index of every symbol, in coding order).
        Coding order: row by row of y, each row all channels, left to right -- so that h_s runs over bands
        of rows and any band size codes the same stream."""
        encoder, crc, tables = SymbolEncoder(), 0, self.gaussian_conditional.tables()
        bands_of_rows = self.latent_bands(nets.h_s, *y.shape[-2:], memory)
        for done, rows in enumerate(bands_of_rows):
            scales, means = self.hyper_rows(nets.h_s, z_hat, rows).chunk(2, dim=1)   # 2 x (1, M, rows, w)
            indexes = self.gaussian_conditional.build_indexes(scales)
            symbols = quantize(to_cpu(y[:, :, rows]), "symbols", to_cpu(means))
            encoder.encode(raster(symbols).numpy(), raster(indexes).numpy(), *tables)
            crc = decisions_crc(raster(indexes), crc)
            bands.release_memory(len(bands_of_rows))
            report(progress, "coding", done + 1, len(bands_of_rows))
        return encoder.finish(), crc

    def decode_y(self, data, z_hat, nets, expected_crc, memory, progress=None):
        """-> y_hat (1, M, h, w) in float64, checked at the end against the encoder's decisions: a machine
        whose tables differed would have decoded garbage."""
        decoder, crc, tables = SymbolDecoder(data), 0, self.gaussian_conditional.tables()
        h, w = bands.output_size(nets.h_s, z_hat.shape[-2:])
        y_hat = torch.empty(1, self.config.M, h, w, dtype=torch.float64, device=z_hat.device)
        bands_of_rows = self.latent_bands(nets.h_s, h, w, memory)
        for done, rows in enumerate(bands_of_rows):
            scales, means = self.hyper_rows(nets.h_s, z_hat, rows).chunk(2, dim=1)
            indexes = self.gaussian_conditional.build_indexes(scales)
            crc = decisions_crc(raster(indexes), crc)
            symbols = torch.from_numpy(decoder.decode(raster(indexes).numpy(), *tables))
            y_hat[:, :, rows] = raster(symbols.view(raster(indexes).shape)).to(means) + means
            bands.release_memory(len(bands_of_rows))
            report(progress, "coding", done + 1, len(bands_of_rows))
        check_decisions(crc, expected_crc)
        return y_hat

    def update(self):
        """Freeze the integer coding tables (after training, before coding)."""
        self.entropy_bottleneck.update()
        self.gaussian_conditional.update()
        return self

    def for_these_weights(self, name, build, fingerprint=None):
        """build(), computed again whenever a weight, buffer or table differs from when it was built. Keyed by
        the fingerprint, a hash of their bytes: no way of changing them (in place, through .data, by a fused
        optimizer, on another device) goes unseen, so a file can never be written with stale integer networks.
        A caller that has just hashed the weights passes that `fingerprint` (hashing costs a pass over them)."""
        key = fingerprint or self.fingerprint()
        cache = self.__dict__.setdefault("_cache", {})
        if cache.get(name, (None,))[0] != key:
            cache[name] = (key, build())
        return cache[name][1]

    def fingerprint(self):
        """8 bytes that identify what a decoder needs: the config and every weight and table except those of the
        encoder-only transforms (g_a with its text adapter, h_a), so files name the decoder that reads them. The
        tables are the same integers on every machine (tables.py), and so is this hash. Hashed afresh on every
        call (a few milliseconds per 10 MB of weights)."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if not name.startswith(ENCODER_ONLY):
                h.update(name.encode())
                h.update(to_cpu(tensor).contiguous().view(-1).view(torch.uint8).numpy())    # hashed in place
        return h.digest()[:8]

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def latent_device(self):
        """Where the latents and the integer networks live: the model's device, or the CPU on a device without
        float64 (Apple's MPS), since the integer arithmetic needs float64's exact integers."""
        return self.device if has_float64(self.device) else torch.device("cpu")

    @torch.no_grad()
    @deterministic_gpu()
    def compress(self, x, caption="", memory=None, progress=None):
        """x (1, C, H, W): floats in [0, 1] or 8- or 16-bit integers (C = 1, 3 or 4; alpha is dropped), a caption
        (or its CLIP token features (1, T, D)) -> the bytes of a .taco file. The networks run in bands within
        about `memory` bytes (bands.py; default: default_memory); progress(stage, done, total) hears of each
        finished band."""
        memory = memory or self.default_memory
        image = bands.Pixels(x, self.device)
        text = caption if isinstance(caption, torch.Tensor) else [caption]
        y = self.analysis(image, *self.read_text(text, self.device), memory, progress)   # (1, M, H'/16, W'/16)
        z = torch.empty(1, self.config.N, *bands.output_size(self.h_a, y.shape[-2:]), device=self.device)
        read = lambda rows, columns: y[..., rows, columns].float().to(self.device)       # noqa: E731
        bands.run(self.h_a, read, y.shape[-2:], z.shape[-2:], memory, bands.into(z))   # z: (1, N, H'/64, W'/64)
        z_bytes = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_bytes, z.shape).to(self.latent_device)   # as decoded
        fingerprint = self.fingerprint()
        y_bytes, crc = self.encode_y(y, z_hat, self.integer_networks(fingerprint), memory, progress)
        H, W = image.height, image.width
        return pack(fingerprint, H, W, image.channels == 1, image.bits, crc, z_bytes, y_bytes)

    @torch.no_grad()
    @deterministic_gpu()
    def decompress(self, data, dtype=torch.float32, memory=None, max_pixels=MAX_PIXELS, progress=None):
        """bytes of a .taco file -> x_hat (1, 1 or 3, H, W) on the CPU: floats in [0, 1], or the integers of
        `dtype` (torch.uint8, torch.uint16; None: the source's own depth, 8 or 16 bits). No caption needed.
        g_s runs in bands, each written into the image as it finishes."""
        memory = memory or self.default_memory
        y_hat, info = self.decode_latents(data, memory, max_pixels, progress)
        dtype = dtype or (torch.uint16 if info.bits == 16 else torch.uint8)
        out = torch.empty(1, 1 if info.gray else 3, info.height, info.width, dtype=dtype)
        peak = bands.PEAKS.get(dtype)

        def write(rows, columns, x_hat):                     # a block of the padded image: keep what is inside
            h, w = min(rows.stop, info.height) - rows.start, min(columns.stop, info.width) - columns.start
            if h <= 0 or w <= 0:
                return
            rows, columns = slice(rows.start, rows.start + h), slice(columns.start, columns.start + w)
            x_hat = x_hat[..., :h, :w].clamp(0, 1)
            x_hat = x_hat.mean(1, keepdim=True) if info.gray else x_hat
            out[..., rows, columns] = (x_hat * peak).round().to(dtype).cpu() if peak else x_hat.cpu()
        read = lambda rows, columns: y_hat[..., rows, columns].float().to(self.device)   # noqa: E731
        size = bands.output_size(self.g_s, y_hat.shape[-2:])                   # (H', W'): one band is one piece
        bands.run(self.g_s, read, y_hat.shape[-2:], size, memory, write, unit=16, progress=stage(progress, "g_s"))
        return out

    @torch.no_grad()
    @deterministic_gpu()
    def decode_latents(self, data, memory=None, max_pixels=MAX_PIXELS, progress=None):
        """bytes -> y_hat (1, M, H'/16, W'/16), identical on every machine, and the image's height, width,
        grayscale and bit depth. A declared size above max_pixels is refused before anything is allocated."""
        fingerprint, memory = self.fingerprint(), memory or self.default_memory
        info = unpack(data, fingerprint, max_pixels)
        Hp, Wp = -(-info.height // 64) * 64, -(-info.width // 64) * 64
        try:
            z_hat = self.entropy_bottleneck.decompress(info.z_bytes, (1, self.config.N, Hp // 64, Wp // 64))
            z_hat = z_hat.to(self.latent_device)
            y_hat = self.decode_y(info.y_bytes, z_hat, self.integer_networks(fingerprint), info.decisions, memory,
                                  progress)
        except ValueError as error:
            if isinstance(error, BitstreamError):
                raise
            raise BitstreamError(f"the file's checksum is intact, yet decoding failed ({error}): this machine's "
                                 f"arithmetic differs from the encoder's, or the file is forged") from error
        return y_hat, info

    # ------------------------------------------------------------------------------------------------------
    # Large images: every network runs in bands (bands.py); only the latents y and z are whole.
    # ------------------------------------------------------------------------------------------------------
    def analysis(self, image, text, padding, memory, progress):
        """g_a over blocks of y; one block is the one-piece g_a. With a text adapter and several blocks, the
        Extractor first sees every position (one sweep over the 1/8 features, online softmax), then the blocks
        run with the refreshed text: the same y as in one piece."""
        layers = self.g_a.spatial_chain()
        size = image.padded
        y_size = bands.output_size(layers, size)
        extra = bands.halo(layers, 0), bands.halo(layers, 1)
        if len(bands.blocks(*y_size, memory / bands.bytes_per_output(layers), 1, extra)) == 1:
            y = self.g_a(bands.channels_last(image.read(slice(0, size[0]), slice(0, size[1]))), text, padding)
            return y.to(self.latent_device)
        extractor = next((layer for layer in layers if isinstance(layer, Extractor)), None)
        refreshed = None
        if extractor is not None:
            front = layers[:layers.index(extractor)]
            state = [extractor.start(text)]

            def attend(rows, columns, features):
                state[0] = extractor.attend(state[0], features)
            bands.run(front, image.read, size, bands.output_size(front, size), memory, attend,
                      compute=lambda x: run_analysis(front, x, text, padding), progress=stage(progress, "text"))
            refreshed = extractor.finish(state[0])
        y = torch.empty(1, self.config.M, *y_size, device=self.latent_device)
        bands.run(layers, image.read, size, y_size, memory, bands.into(y),
                  compute=lambda x: run_analysis(layers, x, text, padding, refreshed),
                  progress=stage(progress, "g_a"))
        return y

    def latent_bands(self, network, height, width, memory):
        """Bands of whole rows of y (the coding order is row by row), each within about `memory` bytes: the work
        per position of `network` (h_s, or the widest context network), its halo included, plus about 64 bytes
        per channel for what the coder handles (y, symbols, indexes, scales and means in float64, copies)."""
        per_position = bands.bytes_per_output(network) + 64 * self.config.M
        rows = max(1, int(memory / per_position / (width + bands.halo(network, 1)) - bands.halo(network, 0)))
        return [slice(r, min(r + rows, height)) for r in range(0, height, rows)]

    def hyper_rows(self, h_s, z_hat, rows):
        """h_s(z_hat) for the rows `rows` of y only, all columns: (1, 2M, rows, w)."""
        read = lambda r, c: z_hat[..., r, c]                                    # noqa: E731
        w = bands.output_size(h_s, z_hat.shape[-2:])[1]
        return bands.run_block(h_s, read, z_hat.shape[-2:], (rows.start, rows.stop), (0, w))

