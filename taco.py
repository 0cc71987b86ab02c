"""Pixels <-> bits: the TACO codec (Lee et al., "Neural Image Compression with Text-guided Encoding for both
Pixel-level and Perceptual Fidelity", ICML 2024) on a GDN mean-scale hyperprior.

    image (H, W) --pad to 64--> x --g_a(x, caption tokens)--> y --h_a--> z
    z --EntropyBottleneck--> z_bytes;  h_s(z_hat) --> scales, means;  y --GaussianConditional--> y_bytes
    file = header + z_bytes + y_bytes + CRC-32 of all of it (machinery/container.py)

The caption enters only the encoder, through the text adapter inside g_a; the decoder rebuilds the image
from the file alone. TACO.compress and decompress are these steps, in one piece; an image larger than the memory
budget runs the same steps over bands (machinery/banded.py), into the same bytes. Backbone: Balle et al. 2017
(GDN), Balle et al. 2018 and Minnen et al. 2018 (mean-scale hyperprior). The paper's exact ELIC model subclasses
TACO in machinery/elic.py; the command line is codec.py.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from entropy import EntropyBottleneck, GaussianConditional, lower_bound, quantize
from machinery import banded, container, devices, integer
from machinery.clip_text import TextEncoder
from machinery.images import as_rgb, to_pixels, to_unit


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
    backbone: str = "hyperprior"     # "elic": the paper's exact model (machinery/elic.py), N=192, M=320
    slices: tuple = (16, 16, 32, 64, 192)  # elic only: the uneven channel slices of y


# ----------------------------------------------------------------------------------------------------------
# GDN and the convolutions of the transforms
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
    """y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2); the inverse (IGDN) multiplies instead. beta starts at 1
    and stays above 1e-6, gamma starts at 0.1 I (Balle et al. 2017)."""

    def __init__(self, channels, inverse=False):
        super().__init__()
        self.inverse = inverse
        self.beta = NonNegative(torch.ones(channels), minimum=1e-6)
        self.gamma = NonNegative(0.1 * torch.eye(channels))

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


# ----------------------------------------------------------------------------------------------------------
# The text adapter (the paper, section 3.2): Injector (text -> image) and Extractor (image -> text)
# ----------------------------------------------------------------------------------------------------------
class Injector(nn.Module):
    """Text -> image: image tokens query the projected caption tokens.
    out = LN(image) + gamma * Attn(LN(image), LN(W t), LN(W t)), gamma per channel, initialised to 0
    (the residual starts from the *normalized* image, as in the reference)."""

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
    out = LN(t) + Attn(LN(t), LN(W image), LN(W image)), Attn = softmax(q k^T / sqrt(d)) v per head.

    The weights are nn.MultiheadAttention's; its softmax is written out because it runs over every image position:
    a large image sums the same exponentials over blocks of positions (machinery/banded.py, from `queries` and
    `keys_values`), and one formula for both keeps their float rounding the same."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.image_feature_dim_proj = nn.Linear(dim, text_dim)
        nn.init.kaiming_normal_(self.image_feature_dim_proj.weight)
        self.image_norm, self.text_norm = nn.LayerNorm(text_dim), nn.LayerNorm(text_dim)
        self.cross_attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)

    def forward(self, x, text):
        text, q = self.queries(text)                                            # (B, T, D), (B, heads, T, d)
        k, v = self.keys_values(x)                                              # 2 x (B, heads, H*W, d)
        logits = q @ k.transpose(-1, -2)                                        # (B, heads, T, H*W)
        p = torch.exp(logits - logits.amax(-1, keepdim=True))                   # softmax = p / sum(p)
        attended = (p @ v) / p.sum(-1, keepdim=True)                            # (B, heads, T, d)
        return text + self.cross_attn.out_proj(attended.transpose(1, 2).flatten(2))   # (B, T, D)

    def queries(self, text):
        """-> LN(t) (B, T, D), and its queries scaled by 1/sqrt(d) (B, heads, T, d)."""
        text = self.text_norm(text)
        q = F.linear(text, self.cross_attn.in_proj_weight.chunk(3)[0], self.cross_attn.in_proj_bias.chunk(3)[0])
        q = split_heads(q, self.cross_attn.num_heads)
        return text, q * q.shape[-1] ** -0.5

    def keys_values(self, x):
        """x (B, C, H, W) -> the keys and values of its positions, 2 x (B, heads, H*W, d)."""
        image = self.image_norm(self.image_feature_dim_proj(to_tokens(x)))      # (B, H*W, D)
        _, w_k, w_v = self.cross_attn.in_proj_weight.chunk(3)
        _, b_k, b_v = self.cross_attn.in_proj_bias.chunk(3)
        heads = self.cross_attn.num_heads
        return split_heads(F.linear(image, w_k, b_k), heads), split_heads(F.linear(image, w_v, b_v), heads)


def split_heads(t, heads):
    B, L, D = t.shape
    return t.view(B, L, heads, -1).transpose(1, 2)                             # (B, heads, L, D/heads)


# ----------------------------------------------------------------------------------------------------------
# The four transforms
# ----------------------------------------------------------------------------------------------------------
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

    def forward(self, x, text=None, padding=None):
        x = self.stages[1](self.stages[0](x))                                   # (B, N, H/4, W/4)
        if self.text_adapter:
            x = self.inject_quarter(x, text, padding)
        x = self.stages[2](x)                                                   # (B, N, H/8, W/8)
        if self.text_adapter:
            text = self.extract_eighth(x, text)                                 # (B, T, D)
            x = self.inject_eighth(x, text, padding)
        return self.stages[3](x)                                                # (B, M, H/16, W/16)


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


def raster(t):
    """(B, C, rows, w) -> (B, rows, C, w): y is coded row by row, each row all channels, left to right."""
    return t.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# The model: forward for training, compress / decompress for coding
# ----------------------------------------------------------------------------------------------------------
class TACO(nn.Module):
    """forward(x, text) for training; compress(x, caption) -> bytes and decompress(bytes) -> x_hat for coding.
    `text` is a list of captions (needs a text encoder, see `attach_text_encoder`) or precomputed
    (features (B, T, D), padding (B, T)) from one."""

    default_memory = banded.DEFAULT_MEMORY     # the bands' budget when none is given (elic.py: 4x)

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
        """x (B, 3, H, W) in [0, 1], H and W multiples of 64 -> {"x_hat", "likelihoods": {"y", "z"}}."""
        x = x if self.training else coding_layout(x)     # eval: coding's layout, so x_hat is decompress's exactly
        y = self.g_a(x, *self.read_text(text, x.device))                       # (B, M, H/16, W/16)
        z = self.h_a(y)                                                         # (B, N, H/64, W/64)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        # in eval mode the entropy parameters come from the integer networks, exactly as coding computes them
        nets = self.float_networks() if self.training else integer.estimate_networks(self, x.device)
        y_hat, y_likelihoods = self.y_model(y, nets.h_s(z_hat), nets)
        y_hat = y_hat.to(x.dtype)
        x_hat = self.g_s(y_hat if self.training else coding_layout(y_hat))     # (B, 3, H, W)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # The networks that give the entropy parameters: as trained (float), and in exact integer arithmetic for
    # coding (Balle et al. 2019), so that a file decodes to the same symbols on every machine.
    def float_networks(self):
        return SimpleNamespace(h_s=self.h_s)

    def integer_networks(self):
        return SimpleNamespace(h_s=integer.IntegerNetwork(self.h_s))

    # How y is modelled and coded given the hyperprior's output h_s(z_hat); elic.py overrides these.
    def y_model(self, y, hyper, nets):
        """y, h_s(z_hat) (B, 2M, h, w) -> y_hat, likelihoods: a Gaussian with the hyperprior's scales and means."""
        scales, means = hyper.chunk(2, dim=1)                                   # 2 x (B, M, h, w)
        return self.gaussian_conditional(y, scales, means)

    def encode_y(self, y, hyper, nets):
        """y (1, M, h, w), h_s(z_hat) -> y's bytes and the check of the coding decisions (the tables chosen).
        Coding order: row by row of y, each row all channels, left to right, so that a large image can code band
        by band of rows into the same stream (machinery/banded.py)."""
        scales, means = hyper.chunk(2, dim=1)                                   # 2 x (1, M, h, w)
        indexes = self.gaussian_conditional.build_indexes(scales)               # (1, M, h, w): a table each
        y_bytes = self.gaussian_conditional.compress(raster(y), raster(indexes), raster(means))
        return y_bytes, container.decisions_crc(raster(indexes))

    def decode_y(self, y_bytes, hyper, nets, decisions):
        """The mirror of encode_y -> y_hat (1, M, h, w) in float64, on the integer networks' grid. The tables
        chosen are checked against the encoder's before a symbol is decoded."""
        scales, means = hyper.chunk(2, dim=1)
        indexes = self.gaussian_conditional.build_indexes(scales)
        container.check_decisions(container.decisions_crc(raster(indexes)), decisions)
        return raster(self.gaussian_conditional.decompress(y_bytes, raster(indexes), raster(means)))

    # The same two steps over bands of rows, for an image larger than one piece (machinery/banded.py)
    def encode_y_in_bands(self, y, z_hat, nets, memory, progress=None):
        return banded.encode_y(self, y, z_hat, nets, memory, progress)

    def decode_y_in_bands(self, y_bytes, z_hat, nets, decisions, memory, progress=None):
        return banded.decode_y(self, y_bytes, z_hat, nets, decisions, memory, progress)

    def update(self):
        """Freeze the integer coding tables (after training, before coding)."""
        self.entropy_bottleneck.update()
        self.gaussian_conditional.update()
        return self

    @property
    def device(self):
        return next(self.parameters()).device

    def fits(self, image, memory):
        """Does an image (container.describe's or unpack's) code in one piece within `memory` bytes? 4 N bytes per
        pixel: N float32 channels at 1/4 of the pixels, 4 copies at once (bands.bytes_per_output, without a halo)."""
        return 4 * self.config.N * image.padded[0] * image.padded[1] <= memory

    @torch.no_grad()
    @devices.deterministic_gpu()
    def compress(self, x, caption="", memory=None, progress=None):
        """x (1, C, H, W): floats in [0, 1] or 8- or 16-bit integers (C = 1, 3 or 4; alpha is dropped), a caption
        (or its CLIP token features (1, T, D)) -> the bytes of a .taco file, within about `memory` bytes of
        working memory (default: default_memory); progress(stage, done, total) hears of each band."""
        memory, image = memory or self.default_memory, container.describe(x)   # size, depth; refused if too large
        text = self.read_text(caption if isinstance(caption, torch.Tensor) else [caption], self.device)
        if not self.fits(image, memory):   # a large image: the same steps over bands, same bytes
            return banded.compress(self, x, image, text, memory, progress)
        x = coding_layout(pad_to_64(as_rgb(to_unit(x[:, :3].to(self.device)))))   # (1, 3, H', W'), no alpha
        y = self.g_a(x, *text)                                                  # (1, M, H'/16, W'/16)
        z = self.h_a(y)                                                         # (1, N, H'/64, W'/64)
        z_bytes = self.entropy_bottleneck.compress(z)
        z_hat = quantize(z, "dequantize", self.entropy_bottleneck.medians.view(1, -1, 1, 1))   # the decoder's
        fingerprint = container.fingerprint(self)            # the header names the model that can decode it
        nets = integer.networks(self, fingerprint)           # exact integers, so every machine picks the same tables
        latents = devices.latent_device(self)    # float64 for the integers: the model's device, or the CPU (MPS)
        hyper = nets.h_s(z_hat.to(latents))                                     # (1, 2M, H'/16, W'/16)
        y_bytes, decisions = self.encode_y(y.to(latents), hyper, nets)
        return container.pack(fingerprint, image, decisions, z_bytes, y_bytes)

    @torch.no_grad()
    @devices.deterministic_gpu()
    def decompress(self, data, dtype=torch.float32, memory=None, max_pixels=container.MAX_PIXELS, progress=None):
        """bytes of a .taco file -> x_hat (1, 1 or 3, H, W) on the CPU: floats in [0, 1], or the integers of
        `dtype` (torch.uint8, torch.uint16; None: the source's own depth, 8 or 16 bits). No caption needed.
        A declared size above max_pixels is refused before anything is allocated."""
        memory, fingerprint = memory or self.default_memory, container.fingerprint(self)
        info = container.unpack(data, fingerprint, max_pixels)   # every check of the file, before decoding
        dtype = dtype or (torch.uint16 if info.bits == 16 else torch.uint8)
        if not self.fits(info, memory):     # a large image: the same steps over bands
            return banded.decompress(self, info, fingerprint, dtype, memory, progress)
        with container.decoding_errors():
            z_size = (1, self.config.N, info.padded[0] // 64, info.padded[1] // 64)
            z_hat = self.entropy_bottleneck.decompress(info.z_bytes, z_size)
            nets = integer.networks(self, fingerprint)
            hyper = nets.h_s(z_hat.to(devices.latent_device(self)))            # (1, 2M, H'/16, W'/16)
            y_hat = self.decode_y(info.y_bytes, hyper, nets, info.decisions)    # (1, M, H'/16, W'/16)
        x_hat = self.g_s(coding_layout(y_hat.to(self.device, torch.float32)))  # (1, 3, H', W')
        return to_pixels(x_hat[..., :info.height, :info.width], info.gray, dtype).cpu()   # (1, 1 or 3, H, W)


def coding_layout(x):
    """Channels-last, where oneDNN's (CPU) and cuDNN's convolutions run faster; coding and an eval-mode forward
    share it, so that they compute the same floats."""
    return x.contiguous(memory_format=torch.channels_last)
