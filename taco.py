"""Pixels <-> bits: the TACO codec (Lee et al., ICML 2024) on a GDN mean-scale hyperprior.

    image (H, W) --pad to 64--> x --g_a(x, caption tokens)--> y --h_a--> z
    z --EntropyBottleneck--> z_bytes;  h_s(z_hat) --> scales, means;  y --GaussianConditional--> y_bytes
    file = header (magic, version, model fingerprint, H, W, check of the decoder's decisions)
           + z_bytes + y_bytes + CRC-32

The caption enters only the encoder, through the text adapter inside g_a; the decoder rebuilds the image
from the file alone. Backbone: Balle et al. 2017 (GDN), Balle et al. 2018 and Minnen et al. 2018 (mean-scale
hyperprior). Run `python taco.py --help` for the compress/decompress CLI.
"""
import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import struct
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from entropy import TABLE_BUFFERS, EntropyBottleneck, GaussianConditional, lower_bound, to_cpu
from integer import IntegerNetwork

# A random CLIP of the ViT-B-32 family, small enough for tests on a laptop (same tokenizer, random weights).
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=224, layers=1, width=64, patch_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


@dataclass
class TacoConfig:
    N: int = 128                     # channels of the transforms and of z
    M: int = 192                     # channels of y
    text_adapter: bool = True        # False: the plain mean-scale hyperprior, the baseline to compare with
    clip_model: str = "ViT-B-32-quickgelu"  # open_clip name ("tiny": random, for tests); OpenAI's CLIP uses QuickGELU
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
# The CLIP text tower (frozen, from open_clip)
# ----------------------------------------------------------------------------------------------------------
class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (no network, no local file)."""


@contextlib.contextmanager
def hub_offline_unless_reachable(timeout=3.0):
    """Without network, make the Hugging Face hub read its local cache at once instead of retrying for a
    minute: the weights still load when they were downloaded before."""
    from huggingface_hub import constants
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    saved = constants.HF_HUB_OFFLINE
    if not saved:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_clip(name, pretrained):
    """An open_clip CLIP model: `pretrained` is a tag ("openai"), a local weights file, or "random"."""
    import open_clip
    if name == "tiny" and pretrained != "random":
        raise ValueError('the "tiny" CLIP exists only with random weights (clip_pretrained="random")')
    if pretrained == "random":             # seeded: the same stand-in in every process, for train and compress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if name == "tiny":
                return open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
            return open_clip.create_model(name, pretrained=None)
    tag_gelu = open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu")
    if tag_gelu is not None and tag_gelu != bool((open_clip.get_model_config(name) or {}).get("quick_gelu")):
        fix = f"{name}-quickgelu" if tag_gelu else name.removesuffix("-quickgelu")
        raise ValueError(f"open_clip's {name} uses another GELU than the '{pretrained}' weights were trained "
                         f"with: use {fix}")
    try:
        with hub_offline_unless_reachable():
            return open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    except Exception as error:
        raise WeightsUnavailable(
            f"could not load CLIP {name} weights '{pretrained}' ({type(error).__name__}). Either run once "
            f"with network access (open_clip caches them under ~/.cache/huggingface), or pass a local "
            f"weights file (open_clip_pytorch_model.bin) as --clip-pretrained") from error


class TextEncoder(nn.Module):
    """Captions -> CLIP token features (B, T, D) after the final LayerNorm, their padding mask (B, T), and
    the pooled, projected embedding (B, E) used by the loss. Tokenized as the reference did: start token,
    caption (cut to T - 2 tokens), end token, padded to T with the end token; the padding is masked inside
    the text transformer. Frozen; the features of the last `cache_size` captions are kept for reuse."""

    def __init__(self, name="ViT-B-32-quickgelu", pretrained="openai", tokens=38, clip=None, cache_size=1024):
        super().__init__()
        import open_clip
        clip = clip if clip is not None else load_clip(name, pretrained)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32" if name == "tiny" else name)
        self.token_embedding, self.transformer = clip.token_embedding, clip.transformer
        self.positional_embedding, self.ln_final = clip.positional_embedding, clip.ln_final
        self.text_projection = clip.text_projection
        self.tokens, self.width = tokens, clip.ln_final.normalized_shape[0]
        self.requires_grad_(False).eval()
        self.cache, self.cache_size = collections.OrderedDict(), cache_size

    def tokenize(self, captions):
        """-> token ids (B, T) and padding mask (B, T), True where a position is padding."""
        T = self.tokens
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        raw = self.tokenizer(list(captions))                                    # (B, 77), zero-padded
        ids = torch.full((len(captions), T), eot, dtype=torch.long)
        lengths = []
        for i, row in enumerate(raw):
            end = int((row == eot).nonzero()[0])                # the end token; open_clip zero-pads after it
            body = row[1:end][:T - 2]                                           # caption tokens only
            ids[i, 0], ids[i, 1:1 + len(body)] = sot, body
            lengths.append(len(body) + 2)
        padding = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
        return ids, padding

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)   # float32 features: they are cached and reused outside autocast
    def encode(self, ids, padding):
        B, T = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:T]          # (B, T, D)
        causal = torch.full((T, T), float("-inf")).triu(1)
        mask = causal + torch.zeros(B, 1, T).masked_fill(padding[:, None, :].cpu(), float("-inf"))  # (B, T, T)
        heads = self.transformer.resblocks[0].attn.num_heads
        x = self.ln_final(self.transformer(x, attn_mask=mask.repeat_interleave(heads, 0).to(x)))
        pooled = x[torch.arange(B), (~padding).sum(1) - 1]                      # the end token, (B, D)
        proj = self.text_projection
        return x, pooled @ proj if isinstance(proj, torch.Tensor) else proj(pooled)

    def forward(self, captions):
        """list of str -> features (B, T, D), padding (B, T), embedding (B, E)."""
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            ids, padding = self.tokenize(missing)
            features, embedding = self.encode(ids.to(self.ln_final.weight.device), padding)
            for i, caption in enumerate(missing):
                self.cache[caption] = (features[i], padding[i], embedding[i])
        rows = [self.cache[c] for c in captions]
        for caption in captions:                        # least recently used captions leave first
            self.cache.move_to_end(caption)
        while len(self.cache) > max(self.cache_size, len(captions)):
            self.cache.popitem(last=False)
        features, padding, embedding = zip(*rows)
        return torch.stack(features), torch.stack(padding), torch.stack(embedding)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
class BitstreamError(ValueError):
    """A file that this model cannot decode: not ours, truncated, corrupted, or written by another model."""


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
        key = [(name, t.data_ptr(), t._version, t.shape) for name, t in self.state_dict(keep_vars=True).items()]
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


def decisions_crc(indexes, crc=0):
    """CRC-32 of table indexes (int32, little-endian), continuing from `crc`."""
    return zlib.crc32(np.ascontiguousarray(indexes.numpy(), dtype="<i4").tobytes(), crc)


def check_decisions(crc, expected):
    if crc != expected:
        raise BitstreamError("this machine's arithmetic differs from the encoder's: it would decode the file with "
                             "other coding tables than it was written with (decisions check mismatch)")


# ----------------------------------------------------------------------------------------------------------
# The file container: every check happens before anything large is allocated.
# ----------------------------------------------------------------------------------------------------------
MAGIC, VERSION = b"TACO", 2
HEADER = struct.Struct(">4sB8sHHBIII")    # magic, version, fingerprint, H, W, grayscale, decisions, len(z), len(y)
CHECKSUM = struct.Struct(">I")
MAX_PIXELS = 1 << 28


def pack(fingerprint, H, W, gray, decisions, z_bytes, y_bytes):
    body = HEADER.pack(MAGIC, VERSION, fingerprint, H, W, int(gray), decisions, len(z_bytes), len(y_bytes))
    body += z_bytes + y_bytes
    return body + CHECKSUM.pack(zlib.crc32(body))


def unpack(data, fingerprint):
    """-> H, W, grayscale, CRC of the coding decisions, z_bytes, y_bytes; raises BitstreamError with the reason."""
    if len(data) < 5 or data[:4] != MAGIC:
        raise BitstreamError("not a TACO file (no TACO header)")
    if data[4] != VERSION:
        raise BitstreamError(f"TACO format version {data[4]}; this code reads version {VERSION}")
    if len(data) < HEADER.size + CHECKSUM.size:
        raise BitstreamError(f"truncated file: {len(data)} bytes, shorter than the header")
    magic, version, written_by, H, W, gray, decisions, z_len, y_len = HEADER.unpack_from(data)
    if HEADER.size + z_len + y_len + CHECKSUM.size != len(data):
        raise BitstreamError(f"truncated or padded file: the header announces "
                             f"{HEADER.size + z_len + y_len + CHECKSUM.size} bytes, the file has {len(data)}")
    if CHECKSUM.unpack_from(data, len(data) - CHECKSUM.size)[0] != zlib.crc32(data[:-CHECKSUM.size]):
        raise BitstreamError("corrupted file: checksum mismatch")
    if written_by != fingerprint:
        raise BitstreamError(f"file written by another model (fingerprint {written_by.hex()}); this checkpoint "
                             f"is {fingerprint.hex()}: decode with the checkpoint that wrote it")
    if H == 0 or W == 0 or H * W > MAX_PIXELS or gray > 1:
        raise BitstreamError(f"corrupted header: impossible image size {W}x{H}")
    z_bytes = data[HEADER.size:HEADER.size + z_len]
    return H, W, bool(gray), decisions, z_bytes, data[HEADER.size + z_len:len(data) - CHECKSUM.size]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the config, the weights (tables included) and training metadata, in one file.
# ----------------------------------------------------------------------------------------------------------
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
    """-> (TACO in eval mode, the whole checkpoint dict)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "config" not in checkpoint:
        from elic import load_official                   # a released lambda_*.pth.tar of the reference
        return load_official(path, device, checkpoint), checkpoint
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a TACO checkpoint (no config and state_dict)")
    try:
        model = build_model(TacoConfig(**checkpoint["config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an unknown config: {error}") from error
    state = checkpoint["state_dict"]
    if checkpoint.get("format", 1) == 1 and model.config.backbone == "hyperprior":
        state = dict(state)                     # format 1 put the means first in h_s's output: swap the halves
        for key in ("h_s.4.weight", "h_s.4.bias"):
            state[key] = torch.cat(state[key].chunk(2, dim=0)[::-1])
    load_weights(model, state, path)
    return model.to(device).eval(), checkpoint


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
    model.load_state_dict(state, strict=not rebuilt)          # the keys were checked above


def build_model(config):
    """The codec a config describes: the GDN hyperprior of this file, or the paper's ELIC (elic.py, which
    builds on this file and is imported only when asked for)."""
    if config.backbone == "elic":
        from elic import ElicTACO
        return ElicTACO(config)
    if config.backbone != "hyperprior":
        raise ValueError(f"unknown backbone {config.backbone!r} (hyperprior or elic)")
    return TACO(config)


# ----------------------------------------------------------------------------------------------------------
# Command line: python taco.py compress | decompress
# ----------------------------------------------------------------------------------------------------------
GRAY_MODES = {"1": 255, "L": 255, "LA": 255, "I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1}


def read_image(path):
    """-> (1, C, H, W) float in [0, 1]; C = 1 for grayscale (8 or 16 bits, with or without alpha), 3 otherwise.
    Alpha is dropped; 16-bit values keep their precision (x / 65535)."""
    from PIL import Image
    with Image.open(path) as image:
        if image.mode in GRAY_MODES:
            peak = GRAY_MODES[image.mode]
            if image.mode in ("1", "LA"):
                image = image.convert("L")
            array = np.clip(np.asarray(image, dtype=np.float32), 0, peak) / peak
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def write_image(x, path):
    from PIL import Image
    array = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


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
    model, _ = load_checkpoint(args.checkpoint)
    if model.config.text_adapter:
        if args.caption is None and args.caption_file is None:
            raise ValueError("this model reads a caption: give --caption or --caption-file "
                             "(--caption '' codes without one)")
        if args.caption_file is not None:
            with open(args.caption_file, encoding="utf-8") as f:
                args.caption = f.read().strip()
        clip = args.clip_pretrained or model.config.clip_pretrained
        model.attach_text_encoder(TextEncoder(model.config.clip_model, clip, model.config.text_tokens))
    x = read_image(args.image)
    output = args.output or os.path.splitext(args.image)[0] + ".taco"
    start = time.perf_counter()
    data = model.compress(x, args.caption or "")
    seconds = time.perf_counter() - start
    write_output(output, args.force, lambda p: open(p, "wb").write(data))
    H, W = x.shape[-2:]
    print(f"{output}: {len(data)} bytes, {8 * len(data) / (H * W):.4f} bpp ({W}x{H}), {seconds:.2f} s")


def command_decompress(args):
    model, _ = load_checkpoint(args.checkpoint)
    with open(args.file, "rb") as f:
        data = f.read()
    output = args.output or os.path.splitext(args.file)[0] + "_decoded.png"
    start = time.perf_counter()
    x_hat = model.decompress(data)
    seconds = time.perf_counter() - start
    write_output(output, args.force, lambda p: write_image(x_hat, p))
    print(f"{output}: {x_hat.shape[-1]}x{x_hat.shape[-2]}, {seconds:.2f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="TACO: compress an image with its caption; decompress "
                                                 "without it.", epilog="Errors exit with status 1.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="image (+ caption) -> .taco file")
    c.add_argument("image", help="input image (PNG, JPEG, ...; grayscale and RGBA are accepted)")
    c.add_argument("--caption", help="the caption that guides the encoder (not stored in the file)")
    c.add_argument("--caption-file", help="read the caption from this UTF-8 text file instead")
    c.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    c.add_argument("--clip-pretrained", help="CLIP weights: a local file or open_clip tag "
                                             "(default: the one the checkpoint was trained with)")
    c.add_argument("-o", "--output", help="output file (default: the image's name with .taco)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(run=command_compress)
    d = sub.add_parser("decompress", help=".taco file -> PNG image (no caption needed)")
    d.add_argument("file", help="a .taco file")
    d.add_argument("--checkpoint", required=True, help="the checkpoint that wrote the file")
    d.add_argument("-o", "--output", help="output image (default: <file>_decoded.png)")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.set_defaults(run=command_decompress)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (BitstreamError, CheckpointError, WeightsUnavailable, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
