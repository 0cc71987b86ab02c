"""Metrics on images and sets of images, each matched to the implementation users compare with: PSNR,
MS-SSIM (pytorch_msssim), LPIPS (the lpips package), CLIP preprocessing (CLIP's own), CMMD (its paper's code),
FID, BD-rate, the Pillow baselines, and a model's parameters and multiply-accumulates.
Tensors are (B, 3, H, W) in [0, 1]."""
import io
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import taco
from machinery import clip_text

# The per-image figures (the forward pass's likelihoods, MS-SSIM, LPIPS, explain.png) run in one piece, unlike
# compress and decompress: above this size they refuse rather than exhaust the memory.
ONE_PIECE_PIXELS = 1 << 24           # about 16.8 megapixels (4096 x 4096)


def check_one_piece(H, W, what):
    if H * W > ONE_PIECE_PIXELS:
        raise ValueError(f"{what}: {W}x{H} pixels, more than the {ONE_PIECE_PIXELS / 1e6:.1f} megapixels that "
                         f"per-image metrics and figures handle in one piece; downsample it first (codec.py "
                         f"compresses any size in bands)")


# ----------------------------------------------------------------------------------------------------------
# Metrics on (B, 3, H, W) tensors in [0, 1]
# ----------------------------------------------------------------------------------------------------------
def psnr(x_hat, x):
    """PSNR per image, over all channels (RGB PSNR)."""
    return psnr_of_mse(((x_hat - x) ** 2).flatten(1).mean(1))


def psnr_of_mse(mse):
    """10 log10(1 / MSE), for images in [0, 1]."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def _gaussian_window(size=11, sigma=1.5):
    """The 1-D Gaussian; the 2-D SSIM window is its outer product, applied as two 1-D passes."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float32) - size // 2) ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _blur(t, g):
    """Gaussian filter of every channel without padding ('valid'): rows, then columns."""
    C = t.shape[1]
    t = F.conv2d(t, g.to(t).view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(t, g.to(t).view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)


def _ssim_terms(x, y, g):
    """Mean SSIM and mean contrast-structure per image and channel (B, C) (Wang et al. 2004; K1=0.01,
    K2=0.03, range 1)."""
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x, var_y = _blur(x * x, g) - mu_x ** 2, _blur(y * y, g) - mu_y ** 2
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ms_ssim(x_hat, x, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    """Multi-scale SSIM (Wang et al. 2003) as pytorch_msssim computes it (the implementation the reference
    reports with): per channel, contrast-structure at 4 scales and SSIM at the 5th, each clipped at 0, their
    weighted product averaged over channels; odd sizes are zero-padded before each 2x2 average pooling.
    Images smaller than 11 * 2**4 pixels (which pytorch_msssim refuses) use a window shrunk to fit."""
    x_hat, x = x_hat.float(), x.float()
    levels = len(weights)
    size = min(11, min(x.shape[-2:]) // 2 ** (levels - 1))
    g = _gaussian_window(size - (1 - size % 2), 1.5 * size / 11)
    terms = []
    for level in range(levels):
        ssim, cs = _ssim_terms(x_hat, x, g)                                     # (B, C) each
        terms.append(F.relu(ssim if level == levels - 1 else cs))
        padding = [s % 2 for s in x.shape[-2:]]
        x_hat, x = F.avg_pool2d(x_hat, 2, padding=padding), F.avg_pool2d(x, 2, padding=padding)
    weights = torch.tensor(weights).view(-1, 1, 1)
    return torch.prod(torch.stack(terms) ** weights, dim=0).mean(1)           # (B,)


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


def torchvision_state(weights, path, what, flag):
    """A torchvision state dict from a local file, or from torchvision's download cache, fetched into it on first
    use. Fetched here rather than by torchvision's loader, which announces "Downloading: ..." before it tries:
    offline a reader would believe a download under way, then read that it failed."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        if path:
            return torch.load(path, map_location="cpu", weights_only=True)
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(os.path.basename(cached))          # torchvision names the hash
            torch.hub.download_url_to_file(weights.url, cached, digest and digest.group(1), progress=False)
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as error:
        raise clip_text.WeightsUnavailable(
            f"could not load {what} weights ({type(error).__name__}): run once with network access (torchvision "
            f"caches the file as {cached}) or pass that file as {flag}") from error


def load_lpips(convention="standard", alexnet_weights=None):
    """LPIPS with ImageNet AlexNet weights (torchvision's) and the calibrated linear layers shipped inside the
    `lpips` package."""
    import torchvision
    alexnet_state = torchvision_state(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, alexnet_weights,
                                      "AlexNet (LPIPS)", "--alexnet-weights")
    return LPIPS(alexnet_state, lpips_linear_weights(), convention)


def lpips_linear_weights():
    import lpips
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def clip_preprocess(x, size=224):
    """CLIP's resize (short side to 224, bicubic, antialiased as PIL's) + center crop + normalization,
    differentiable."""
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    x = F.interpolate(x, size=(max(size, round(H * scale)), max(size, round(W * scale))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return (x - CLIP_MEAN.to(x)) / CLIP_STD.to(x)


# ----------------------------------------------------------------------------------------------------------
# Classical baselines through Pillow
# ----------------------------------------------------------------------------------------------------------
def pillow_codec(x, codec, quality):
    """(1, 3, H, W) in [0, 1] -> bpp from the real bytes, decoded image, encode and decode wall time (s)."""
    from PIL import Image
    array = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    image, buffer = Image.fromarray(array), io.BytesIO()
    start = time.perf_counter()
    image.save(buffer, format=codec, quality=quality)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    with Image.open(io.BytesIO(buffer.getvalue())) as coded:
        decoded = np.asarray(coded.convert("RGB"), dtype=np.float32) / 255
    decode = time.perf_counter() - start
    H, W = array.shape[:2]
    return 8 * buffer.tell() / (H * W), torch.from_numpy(decoded).permute(2, 0, 1)[None], encode, decode


def baseline_curve(x, codec="JPEG", qualities=range(5, 100, 5)):
    """[(bpp, psnr)] over a quality sweep, sorted by bpp."""
    points = []
    for q in qualities:
        bpp, decoded, _, _ = pillow_codec(x, codec, q)
        points.append((bpp, float(psnr(decoded, x))))
    return sorted(points)


def psnr_at_bpp(curve, bpp):
    """PSNR of a [(bpp, psnr)] curve at `bpp`, linearly interpolated; None outside the curve's range."""
    rates, quality = zip(*curve)
    if not rates[0] <= bpp <= rates[-1]:
        return None
    return float(np.interp(bpp, rates, quality))


def bd_rate(curve_a, curve_b):
    """Bjontegaard delta rate (%) of curve b against curve a: average bitrate change at equal PSNR, from
    cubic fits of log-rate over PSNR, integrated over the PSNR range both curves cover. Negative: b saves."""
    (ra, pa), (rb, pb) = zip(*curve_a), zip(*curve_b)
    fit_a, fit_b = np.polyfit(pa, np.log(ra), 3), np.polyfit(pb, np.log(rb), 3)
    low, high = max(min(pa), min(pb)), min(max(pa), max(pb))
    integral = lambda fit: np.polyval(np.polyint(fit), high) - np.polyval(np.polyint(fit), low)
    return float((np.exp((integral(fit_b) - integral(fit_a)) / (high - low)) - 1) * 100)


def bd_psnr(curve_a, curve_b):
    """Bjontegaard delta PSNR (dB) of curve b against curve a, at equal log-rate."""
    (ra, pa), (rb, pb) = zip(*curve_a), zip(*curve_b)
    fit_a, fit_b = np.polyfit(np.log(ra), pa, 3), np.polyfit(np.log(rb), pb, 3)
    low, high = max(np.log(min(ra)), np.log(min(rb))), min(np.log(max(ra)), np.log(max(rb)))
    integral = lambda fit: np.polyval(np.polyint(fit), high) - np.polyval(np.polyint(fit), low)
    return float((integral(fit_b) - integral(fit_a)) / (high - low))


def cmmd(a, b, sigma=10.0, scale=1000.0, block=2048):
    """CMMD (Jayasumana et al. 2024) as its reference code computes it (google-research cmmd/distance.py):
    MMD^2 with a Gaussian kernel between two sets of L2-normalized CLIP image embeddings, by the biased
    (minimum-variance) estimator that keeps each kernel matrix's diagonal, times 1000. The kernel matrices are
    summed block by block (block x block entries at a time): 30k images per side need no 30k x 30k matrix."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)

    def kernel_mean(u, v):
        total = 0.0
        for i in range(0, len(u), block):
            for j in range(0, len(v), block):
                total += float(torch.exp(-torch.cdist(u[i:i + block], v[j:j + block]) ** 2 / (2 * sigma ** 2)).sum())
        return total / (len(u) * len(v))
    return float(scale * (kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)))


def fid(a, b, block=4096):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017):
    ||mu_a - mu_b||^2 + tr C_a + tr C_b - 2 tr (C_a C_b)^(1/2). With C = F F^T, the last trace is the sum of
    the singular values of F_a^T F_b: no matrix square root, and small when there are few samples. Means and
    covariances are accumulated over blocks of rows in float64 (nothing larger than the features is held)."""
    mean_a, mean_b = _mean(a, block), _mean(b, block)
    fa, fb = _covariance_factor(a, mean_a, block), _covariance_factor(b, mean_b, block)
    trace_root = np.linalg.svd(fa.T @ fb, compute_uv=False).sum()
    return float(((mean_a - mean_b) ** 2).sum() + (fa ** 2).sum() + (fb ** 2).sum() - 2 * trace_root)


def _mean(x, block):
    return sum(np.asarray(x[i:i + block], dtype=np.float64).sum(0) for i in range(0, len(x), block)) / len(x)


def _covariance_factor(x, mean, block):
    """F with F F^T = cov(x): the scaled, centered samples (D, N) when N <= D, else from an eigendecomposition
    of the covariance, summed over blocks of centered rows."""
    if len(x) <= x.shape[1]:
        return ((np.asarray(x, dtype=np.float64) - mean) / np.sqrt(len(x) - 1)).T
    covariance = np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, len(x), block):
        centered = np.asarray(x[i:i + block], dtype=np.float64) - mean
        covariance += centered.T @ centered
    values, vectors = np.linalg.eigh(covariance / (len(x) - 1))
    return vectors * np.sqrt(np.clip(values, 0, None))


def load_inception(weights=None):
    """torchvision's Inception-v3 (ImageNet) without its classifier: 2048-d pool features for FID. These are
    not the TF-Inception weights of the original FID, so compare its FID only with FID computed the same way."""
    import torchvision
    state = torchvision_state(torchvision.models.Inception_V3_Weights.IMAGENET1K_V1, weights, "Inception-v3 (FID)",
                              "--inception-weights")
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    model.load_state_dict(state)
    model.fc = nn.Identity()
    return model.requires_grad_(False).eval()


def inception_features(model, x):
    """(B, 3, H, W) in [0, 1] -> (B, 2048), at 299x299 with ImageNet normalization."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).to(x)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).to(x)
    return model((x - mean) / std)


def complexity(model, size=256):
    """Parameters (and the text adapter's share) and multiply-accumulates per pixel of the encoder and
    decoder paths, counted by hooks on a size x size forward pass."""
    counts = {"macs": 0}

    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Conv2d):
            counts["macs"] += out.numel() * module.in_channels * math.prod(module.kernel_size) // module.groups
        elif isinstance(module, nn.ConvTranspose2d):
            counts["macs"] += inputs[0].numel() * module.out_channels * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            counts["macs"] += out.numel() * module.in_features
        elif isinstance(module, nn.MultiheadAttention):
            q, k = inputs[0], inputs[1]
            d = module.embed_dim
            counts["macs"] += 2 * q.numel() * d + 2 * k.numel() * d + 2 * q.shape[1] * k.numel()
        elif isinstance(module, taco.GDN):
            counts["macs"] += out.numel() * out.shape[1]
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention, taco.GDN))]
    config, device = model.config, next(model.parameters()).device
    text = (torch.zeros(1, config.text_tokens, config.text_dim, device=device),
            torch.zeros(1, config.text_tokens, dtype=bool, device=device))
    training = model.training
    with torch.no_grad():              # train mode: the float entropy networks, whose hooks count (the integer
        model.train()(torch.rand(1, 3, size, size, device=device), text)     # ones do the same products)
    model.train(training)
    for h in handles:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for m in model.modules() if isinstance(m, (taco.Injector, taco.Extractor))
                  for p in m.parameters())
    return {"params": params, "adapter_params": adapter, "macs_per_pixel": counts["macs"] / size ** 2}
