"""What several test files share: tiny configs of both backbones, a photo-like image made here, tiny models."""
import os

import torch
import torch.nn.functional as F

import taco
from machinery import checkpoints, clip_text

# A CLIP of the ViT-B-32 family small enough for a laptop (its tokenizer, 64-wide towers, random weights),
# given to open_clip as a model folder.
TINY_CLIP = "local-dir:" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_clip")
# Both backbones at toy widths, with that CLIP.
TINY = dict(N=16, M=24, clip_model=TINY_CLIP, clip_pretrained="random", text_dim=64)
TINY_ELIC = dict(N=32, M=40, backbone="elic", clip_model=TINY_CLIP, clip_pretrained="random", text_dim=64,
                 slices=(4, 4, 8, 8, 16))


def natural_image(H, W, seed=0):
    """A smooth image with some texture: something like a photo, made here."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(H // 16, 2), max(W // 16, 2), generator=g)
    smooth = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.randn(1, 3, H, W, generator=g)).clamp(0, 1)


def tiny_model(encoder=None, gammas=True, seed=0, config=TINY, **overrides):
    """A coding-ready model (eval mode, tables frozen) with a text encoder; `gammas`: the adapter's gammas drawn
    at random, as after training (at 0, as initialised, the caption changes nothing)."""
    torch.manual_seed(seed)
    model = checkpoints.build_model(taco.TacoConfig(**{**config, **overrides})).eval()
    if model.config.text_adapter:
        model.attach_text_encoder(encoder or clip_text.TextEncoder(TINY_CLIP, "random"))
        if gammas:
            for module in model.modules():
                if isinstance(module, taco.Injector):
                    module.gamma.data.normal_()
    return model.update()
