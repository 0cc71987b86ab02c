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
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_text import TextEncoder
from container import MAX_PIXELS, BitstreamError, check_decisions, decisions_crc, pack, unpack
from entropy import EntropyBottleneck, GaussianConditional, lower_bound, to_cpu
from integer import IntegerNetwork


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
    out = LN(t) + Attn(LN(t), LN(W image), LN(W image))."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.image_feature_dim_proj = nn.Linear(dim, text_dim)
        nn.init.kaiming_normal_(self.image_feature_dim_proj.weight)
        self.image_norm, self.text_norm = nn.LayerNorm(text_dim), nn.LayerNorm(text_dim)
        self.cross_attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)

    def forward(self, x, text):
        image = self.image_norm(self.image_feature_dim_proj(to_tokens(x)))      # (B, H*W, D)
        text = self.text_norm(text)                                             # (B, T, D)
        return text + self.cross_attn(text, image, image, need_weights=False)[0]


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
            text = self.extract_eighth(x, text)
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


class TACO(nn.Module):
    """forward(x, text) for training; compress(x, caption) -> bytes and decompress(bytes) -> x_hat for coding.
    `text` is a list of captions (needs a text encoder, see `attach_text_encoder`) or precomputed
    (features (B, T, D), padding (B, T)) from one."""

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
        In eval mode the entropy parameters come from the integer networks, exactly as the decoder's."""
        y = self.g_a(x, *self.read_text(text, x.device))                        # (B, M, H/16, W/16)
        z = self.h_a(y)                                                         # (B, N, H/64, W/64)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        nets = self.float_networks() if self.training else self.integer_networks()
        y_hat, y_likelihoods = self.y_model(y, nets.h_s(z_hat), nets)
        return {"x_hat": self.g_s(y_hat.to(x.dtype)), "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # The networks that give the entropy parameters: as trained (float), and in exact integer arithmetic for
    # coding (integer.py), so that a file decodes to the same symbols on every machine. elic.py adds its own.
    def float_networks(self):
        return SimpleNamespace(h_s=self.h_s)

    def integer_networks(self):
        """Converted from the float weights by exact operations, once per set of weights."""
        return self.cached("integer_networks", lambda: SimpleNamespace(h_s=IntegerNetwork(self.h_s)))

    # How y is modelled and coded given the hyperprior's output; elic.py overrides these three.
    def y_model(self, y, hyper, nets):
        """y, h_s(z_hat) (B, 2M, h, w) -> y_hat, likelihoods: a Gaussian with the hyperprior's scales and means."""
        scales, means = hyper.chunk(2, dim=1)                                   # 2 x (B, M, h, w)
        return self.gaussian_conditional(y, scales, means)

    def encode_y(self, y, hyper, nets):
        """-> y's bytes, CRC-32 of the coding decisions (the table index of every symbol, in coding order)."""
        scales, means = hyper.chunk(2, dim=1)
        indexes = self.gaussian_conditional.build_indexes(scales)
        return self.gaussian_conditional.compress(y, indexes, means), decisions_crc(indexes)

    def decode_y(self, data, hyper, nets, expected_crc):
        """-> y_hat, after checking that this machine chose the encoder's tables (decoding with others would
        give garbage); elic.py can only check at the end, as its later tables depend on decoded values."""
        scales, means = hyper.chunk(2, dim=1)
        indexes = self.gaussian_conditional.build_indexes(scales)
        check_decisions(decisions_crc(indexes), expected_crc)
        return self.gaussian_conditional.decompress(data, indexes, means)

    def update(self):
        """Freeze the integer coding tables (after training, before coding)."""
        self.entropy_bottleneck.update()
        self.gaussian_conditional.update()
        return self

    def cached(self, name, build):
        """build(), computed again only when a weight, buffer or table changed (in place, replaced or moved)."""
        key = [(k, t.data_ptr(), t._version, t.shape) for k, t in self.state_dict(keep_vars=True).items()]
        cache = self.__dict__.setdefault("_cache", {})
        if cache.get(name, (None,))[0] != key:
            cache[name] = (key, build())
        return cache[name][1]

    def fingerprint(self):
        """8 bytes that identify the config and every weight and table: files name the model that wrote them."""
        def digest():
            h = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
            for name, tensor in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(to_cpu(tensor).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            return h.digest()[:8]
        return self.cached("fingerprint", digest)

    @torch.no_grad()
    @deterministic_gpu()
    def compress(self, x, caption=""):
        """x (1, C, H, W) in [0, 1] (C = 1, 3 or 4; alpha is dropped), a caption (or its CLIP token features
        (1, T, D)) -> the bytes of a .taco file."""
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3, 4):
            raise ValueError(f"compress takes one image of shape (1, 1|3|4, H, W), got {tuple(x.shape)}")
        gray, (H, W) = x.shape[1] == 1, x.shape[-2:]
        if H * W > MAX_PIXELS or max(H, W) > 0xFFFF:
            raise ValueError(f"image of {W}x{H} pixels is larger than this format allows")
        x = pad_to_64(x[:, :3].expand(1, 3, H, W).to(next(self.parameters()).device))  # (1, 3, H', W')
        text = caption if isinstance(caption, torch.Tensor) else [caption]
        y = self.g_a(x, *self.read_text(text, x.device))                        # (1, M, H'/16, W'/16)
        z = self.h_a(y)                                                         # (1, N, H'/64, W'/64)
        z_bytes = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_bytes, z.shape)           # as the decoder will see it
        nets = self.integer_networks()
        y_bytes, crc = self.encode_y(y, nets.h_s(z_hat), nets)
        return pack(self.fingerprint(), H, W, gray, crc, z_bytes, y_bytes)

    @torch.no_grad()
    @deterministic_gpu()
    def decompress(self, data):
        """bytes of a .taco file -> x_hat (1, 1 or 3, H, W) in [0, 1]. No caption needed."""
        y_hat, (H, W, gray) = self.decode_latents(data)
        x_hat = self.g_s(y_hat.float()).clamp(0, 1)[:, :, :H, :W]              # (1, 3, H, W)
        return x_hat.mean(1, keepdim=True) if gray else x_hat

    @torch.no_grad()
    @deterministic_gpu()
    def decode_latents(self, data):
        """bytes -> y_hat (1, M, H'/16, W'/16), identical on every machine, and the image's (H, W, grayscale)."""
        H, W, gray, crc, z_bytes, y_bytes = unpack(data, self.fingerprint())
        Hp, Wp = -(-H // 64) * 64, -(-W // 64) * 64
        nets = self.integer_networks()
        try:
            z_hat = self.entropy_bottleneck.decompress(z_bytes, (1, self.config.N, Hp // 64, Wp // 64))
            y_hat = self.decode_y(y_bytes, nets.h_s(z_hat), nets, crc)         # (1, M, H'/16, W'/16)
        except ValueError as error:
            if isinstance(error, BitstreamError):
                raise
            raise BitstreamError(f"the file's checksum is intact, yet decoding failed ({error}): this machine's "
                                 f"arithmetic differs from the encoder's, or the file is forged") from error
        return y_hat, (H, W, gray)


