"""Weights -> figures: metrics, rate-distortion evaluation with real files, baselines, BD-rate, plots.

    python eval.py --checkpoint runs/demo/best.pt --images kodak/ --captions kodak_captions.json
"""
import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import taco

# ----------------------------------------------------------------------------------------------------------
# Metrics on (B, 3, H, W) tensors in [0, 1]
# ----------------------------------------------------------------------------------------------------------
def psnr(x_hat, x):
    """10 log10(1 / MSE) per image, over all channels (RGB PSNR)."""
    mse = ((x_hat - x) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def _gaussian_window(size=11, sigma=1.5):
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def _ssim_terms(x, y, window):
    """Mean SSIM and mean contrast-structure term per image (Wang et al. 2004; K1=0.01, K2=0.03, range 1)."""
    C = x.shape[1]
    w = window.to(x).expand(C, 1, *window.shape)
    blur = lambda t: F.conv2d(t, w, groups=C)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x_hat, x, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    """Multi-scale SSIM (Wang et al. 2003): contrast-structure at 5 scales, luminance at the coarsest.
    Images smaller than 11 * 2**4 pixels use a window shrunk to fit the coarsest scale."""
    x_hat, x = x_hat.double(), x.double()
    levels = len(weights)
    size = min(11, min(x.shape[-2:]) // 2 ** (levels - 1))
    window = _gaussian_window(size - (1 - size % 2), 1.5 * size / 11).double()
    value = 1.0
    for level, weight in enumerate(weights):
        ssim, cs = _ssim_terms(x_hat, x, window)
        term = ssim if level == levels - 1 else cs
        value = value * term.clamp_min(0) ** weight
        x_hat, x = F.avg_pool2d(x_hat, 2), F.avg_pool2d(x, 2)
    return value.float()


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) on AlexNet: unit-normalize the features at 5 ReLUs, weight their squared
    differences per channel with the calibrated linear layers, average over space, sum over layers.
    `convention`: "standard" maps [0, 1] inputs to [-1, 1] as LPIPS expects; "reference" feeds [0, 1] as
    the TACO reference code did (its published LPIPS values use that scale)."""

    taps = (1, 4, 7, 9, 11)                                                      # relu1 .. relu5
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def __init__(self, alexnet_state, linear_state, convention="standard"):
        super().__init__()
        import torchvision
        self.features = torchvision.models.alexnet(weights=None).features[:12]
        self.features.load_state_dict({k[len("features."):]: v for k, v in alexnet_state.items()
                                       if k.startswith("features.") and int(k.split(".")[1]) < 12})
        widths = (64, 192, 384, 256, 256)
        self.lins = nn.ParameterList([nn.Parameter(linear_state[f"lin{i}.model.1.weight"].view(1, w, 1, 1))
                                      for i, w in enumerate(widths)])
        self.convention = convention
        self.requires_grad_(False).eval()

    def forward(self, x_hat, x):
        """-> LPIPS per image (B,)."""
        if self.convention == "standard":
            x_hat, x = 2 * x_hat - 1, 2 * x - 1
        a, b = ((t - self.shift.to(t)) / self.scale.to(t) for t in (x_hat, x))
        total, layer = 0, 0
        for i, module in enumerate(self.features):
            a, b = module(a), module(b)
            if i in self.taps:
                na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((na - nb) ** 2 * self.lins[layer]).sum(1).mean((1, 2))
                layer += 1
        return total


def load_lpips(convention="standard", alexnet_weights=None):
    """LPIPS with ImageNet AlexNet weights (torchvision's, from a local file or its download cache) and the
    calibrated linear layers shipped inside the `lpips` package."""
    import torchvision
    try:
        if alexnet_weights:
            alexnet_state = torch.load(alexnet_weights, map_location="cpu", weights_only=True)
        else:
            alexnet_state = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as error:
        raise taco.WeightsUnavailable(
            f"could not load AlexNet weights for LPIPS ({type(error).__name__}): run once with network "
            f"access (torchvision caches alexnet-owt-7be5be79.pth under ~/.cache/torch/hub/checkpoints) or "
            f"pass that file as --alexnet-weights") from error
    return LPIPS(alexnet_state, lpips_linear_weights(), convention)


def lpips_linear_weights():
    import lpips
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Classical baselines through Pillow
# ----------------------------------------------------------------------------------------------------------
def pillow_codec(x, codec, quality):
    """(1, 3, H, W) in [0, 1] -> (bpp from the real bytes, decoded image)."""
    from PIL import Image
    array = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=codec, quality=quality)
    H, W = array.shape[:2]
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255
    return 8 * buffer.tell() / (H * W), torch.from_numpy(decoded).permute(2, 0, 1)[None]


def baseline_curve(x, codec="JPEG", qualities=range(5, 100, 5)):
    """[(bpp, psnr)] over a quality sweep, sorted by bpp."""
    points = []
    for q in qualities:
        bpp, decoded = pillow_codec(x, codec, q)
        points.append((bpp, float(psnr(decoded, x))))
    return sorted(points)


def psnr_at_bpp(curve, bpp):
    """PSNR of a [(bpp, psnr)] curve at `bpp`, linearly interpolated; None outside the curve's range."""
    rates, quality = zip(*curve)
    if not rates[0] <= bpp <= rates[-1]:
        return None
    return float(np.interp(bpp, rates, quality))
