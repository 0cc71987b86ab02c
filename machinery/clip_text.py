"""The frozen CLIP text tower (open_clip) that turns captions into the token features the text adapter reads.
Only the encoder needs it: decoding never loads CLIP. open_clip is imported where a tower is built, so a
decoder never pays for importing it."""
import collections
import contextlib
import functools
import logging
import os
import socket
import urllib.parse

import torch
import torch.nn as nn


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (no network, no local file)."""


def reachable(url):
    """Does the host of `url` accept a connection (HTTPS) within 3 seconds? With TACO_OFFLINE=1 in the
    environment (the tests set it): no, without trying."""
    if os.environ.get("TACO_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((urllib.parse.urlparse(url).hostname, 443), timeout=3.0).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Without network, make the Hugging Face hub read its local cache at once instead of retrying for a
    minute: the weights still load when they were downloaded before."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    if not saved and not reachable(constants.ENDPOINT):
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# open_clip's own notes that a tower has no pretrained weights ("No pretrained weights loaded ... Model initialized
# randomly", "... no CLIP weights found in ..."): a random tower is asked for on purpose here, and the caller says
# so once in the project's own words (STAND-IN, note: ...).
STAND_IN_NOTES = ("No pretrained weights loaded", "initialized partially", "no CLIP weights found")


@contextlib.contextmanager
def _quiet_stand_in_notes():
    """open_clip logs through the root logger (logging.warning), which installs a stderr handler on first use;
    a NullHandler for the duration keeps that from happening, and a filter drops its stand-in notes."""
    quiet = lambda record: not any(phrase in record.getMessage() for phrase in STAND_IN_NOTES)   # noqa: E731
    root, null = logging.getLogger(), logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(null)
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if added:
            root.removeHandler(null)


@functools.lru_cache(maxsize=8)
def tokenizer(name):
    """open_clip's tokenizer for the CLIP `name` (a model folder may name its own)."""
    import open_clip
    return open_clip.get_tokenizer(name)


@_quiet_stand_in_notes()
def load_clip(name, pretrained, what="CLIP", option="--clip-pretrained (in Python: TacoConfig(clip_pretrained=...); "
                                                   "'random' for an untrained stand-in tower)"):
    """An open_clip model (CLIP, or CoCa for captioner.py): `name` is open_clip's (or "local-dir:<folder>" with an
    open_clip_config.json); `pretrained` is a tag ("openai"), a local weights file, or "random". Weights that
    cannot be had raise WeightsUnavailable, whose message names `what` and the `option` that takes a file.
    The one place the towers are built: open_clip's notes that repeat a stand-in note are dropped here."""
    import open_clip
    if pretrained == "random":             # seeded: the same stand-in in every process, for train and compress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return open_clip.create_model(name, pretrained=None)
    tag_gelu = open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu")
    if tag_gelu is not None and tag_gelu != bool((open_clip.get_model_config(name) or {}).get("quick_gelu")):
        fix = f"{name}-quickgelu" if tag_gelu else name.removesuffix("-quickgelu")
        raise ValueError(f"open_clip's {name} uses another GELU than the '{pretrained}' weights were trained "
                         f"with: use {fix}")
    if name.startswith("local-dir:") and os.path.isfile(pretrained):  # open_clip reads only the folder's own weights
        model = open_clip.create_model(name, pretrained=None)
        open_clip.load_checkpoint(model, pretrained)
        return model
    try:
        with hub_offline_unless_reachable():
            if not os.path.isfile(pretrained):           # fetch (or find cached) first: fails before the build
                from open_clip.pretrained import download_pretrained
                download_pretrained(open_clip.get_pretrained_cfg(name, pretrained))
            return open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    except Exception as error:
        raise WeightsUnavailable(
            f"could not load {what} {name} weights '{pretrained}' ({type(error).__name__}). Either run once "
            f"with network access (open_clip caches them under ~/.cache/huggingface), or pass a local "
            f"weights file (open_clip_pytorch_model.bin) as {option}") from error


class TextEncoder(nn.Module):
    """Captions -> CLIP token features (B, T, D) after the final LayerNorm, their padding mask (B, T), and
    the pooled, projected embedding (B, E) used by the loss. Tokenized as the reference did: start token,
    caption (cut to T - 2 tokens), end token, padded to T with the end token; the padding is masked inside
    the text transformer. Frozen; the features of the last `cache_size` captions are kept for reuse."""

    def __init__(self, name="ViT-B-32-quickgelu", pretrained="openai", tokens=38, clip=None, cache_size=1024):
        super().__init__()
        clip = clip if clip is not None else load_clip(name, pretrained)
        self.tokenizer = tokenizer(name)
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
        for caption in sorted({c for c in captions if c not in self.cache}):
            # one caption at a time: in a batch, matrix products of another size may round the last bit
            # differently, and the cached features would depend on which batch first met the caption (a run
            # resumed from a checkpoint, with an empty cache, would then drift from an uninterrupted one)
            ids, padding = self.tokenize([caption])
            features, embedding = self.encode(ids.to(self.ln_final.weight.device), padding)
            self.cache[caption] = (features[0], padding[0], embedding[0])
        rows = [self.cache[c] for c in captions]
        for caption in captions:                        # least recently used captions leave first
            self.cache.move_to_end(caption)
        while len(self.cache) > max(self.cache_size, len(captions)):
            self.cache.popitem(last=False)
        features, padding, embedding = zip(*rows)
        return torch.stack(features), torch.stack(padding), torch.stack(embedding)
