"""Weights -> figures: metrics, rate-distortion evaluation with real files, baselines, BD-rate, plots.

    python eval.py --checkpoint runs/demo/best.pt --images kodak/ --captions kodak_captions.json
"""
import argparse
import dataclasses
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
    """A torchvision state dict from a local file, or from torchvision's download cache (network on first use)."""
    try:
        if path:
            return torch.load(path, map_location="cpu", weights_only=True)
        return weights.get_state_dict(progress=False)
    except Exception as error:
        raise taco.WeightsUnavailable(
            f"could not load {what} weights ({type(error).__name__}): run once with network access (torchvision "
            f"caches {os.path.basename(weights.url)} under ~/.cache/torch/hub/checkpoints) or pass that file as "
            f"{flag}") from error


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


def cmmd(a, b, sigma=10.0, scale=1000.0):
    """CMMD (Jayasumana et al. 2024) as its reference code computes it (google-research cmmd/distance.py):
    MMD^2 with a Gaussian kernel between two sets of L2-normalized CLIP image embeddings, by the biased
    (minimum-variance) estimator that keeps each kernel matrix's diagonal, times 1000."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    kernel_mean = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / (2 * sigma ** 2)).mean()
    return float(scale * (kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)))


def fid(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017):
    ||mu_a - mu_b||^2 + tr C_a + tr C_b - 2 tr (C_a C_b)^(1/2). With C = F F^T, the last trace is the sum of
    the singular values of F_a^T F_b: no matrix square root, and small when there are few samples."""
    a, b = a.double().numpy(), b.double().numpy()
    fa, fb = _covariance_factor(a), _covariance_factor(b)
    trace_root = np.linalg.svd(fa.T @ fb, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (fa ** 2).sum() + (fb ** 2).sum() - 2 * trace_root)


def _covariance_factor(x):
    """F with F F^T = cov(x): the scaled, centered samples (D, N) when N <= D, else from an eigendecomposition."""
    if len(x) <= x.shape[1]:
        return ((x - x.mean(0)) / np.sqrt(len(x) - 1)).T
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
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


# ----------------------------------------------------------------------------------------------------------
# Evaluating checkpoints on a folder of images
# ----------------------------------------------------------------------------------------------------------
REFERENCE = {   # published Kodak figures: the released TACO files measured by a third party, CompressAI's
    # Minnen 2018 model zoo results, and the ELIC paper (He et al., CVPR 2022, Kodak)
    "TACO (released, Kodak)": [(0.183, 28.79), (0.226, 30.09), (0.322, 31.88), (0.450, 33.66), (0.566, 34.89)],
    "Minnen 2018 mean-scale (CompressAI, Kodak)": [(0.124, 27.70), (0.307, 31.13), (0.662, 34.97)],
    "ELIC (paper, Kodak)": [(0.124, 29.11), (0.197, 30.70), (0.334, 32.78), (0.491, 34.58), (0.704, 36.49)],
}


# What a report holds per image (cmmd and fid: per set only), in the order printed and written to results.csv.
METRIC_KEYS = ("bpp", "bpp_estimate", "psnr", "ms_ssim", "lpips_standard", "lpips_reference", "clip_score", "cmmd",
               "fid", "encode_s", "decode_s")


def list_images(folder):
    if not os.path.isdir(folder):
        raise SystemExit(f"error: image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    if not names:
        raise SystemExit(f"error: no images in {folder}")
    return names


def read_captions(path):
    """JSON {file: caption or [captions]} or JSONL lines {"file": ..., "caption" or "captions": ...}."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: caption file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            table = {r["file"]: r.get("captions", r.get("caption")) for r in rows}
        else:
            table = json.loads(text)
    except (ValueError, KeyError) as error:
        raise SystemExit(f"error: {path} is not a caption file ({error})")
    return {k: [v] if isinstance(v, str) else list(v) for k, v in table.items()}


def captions_for(names, path, allow_missing):
    if not path:
        if allow_missing:
            return {n: "" for n in names}
        raise SystemExit("error: --captions is required (or --allow-missing-captions to code with empty ones)")
    table = {k: v[0] if v else "" for k, v in read_captions(path).items()}     # the first caption of each
    missing = [n for n in names if n not in table and os.path.splitext(n)[0] not in table]
    if missing and not allow_missing:
        raise SystemExit(f"error: no caption for {len(missing)} image(s), e.g. {missing[0]} "
                         f"(--allow-missing-captions codes them with an empty caption)")
    return {n: table.get(n, table.get(os.path.splitext(n)[0], "")) for n in names}


def as_rgb(x):
    return x.expand(1, 3, *x.shape[-2:]) if x.shape[1] == 1 else x


@torch.no_grad()
def evaluate(model, images, captions, lpips_models, clip, inception, folder, save_dir=None):
    """Real compress/decompress of every image -> per-image rows."""
    from tqdm import tqdm
    rows, device = [], next(model.parameters()).device
    for name in tqdm(images, desc="images", leave=False):
        x = taco.read_image(os.path.join(folder, name)).to(device)
        H, W = x.shape[-2:]
        start = time.perf_counter()
        data = model.compress(x, captions[name])
        encode = time.perf_counter() - start
        start = time.perf_counter()
        x_hat = model.decompress(data)
        decode = time.perf_counter() - start
        padded = taco.pad_to_64(as_rgb(x))
        likelihoods = model(padded, [captions[name]] if model.config.text_adapter else None)["likelihoods"]
        x, x_hat = as_rgb(x), as_rgb(x_hat)
        row = {"image": name, "caption": captions[name], "bytes": len(data), "bpp": 8 * len(data) / (H * W),
               "bpp_estimate": sum(float(-torch.log2(l).sum()) for l in likelihoods.values()) / (H * W),
               "psnr": float(psnr(x_hat, x)), "ms_ssim": float(ms_ssim(x_hat, x)),
               "encode_s": encode, "decode_s": decode}
        for convention, lpips in lpips_models.items():
            row[f"lpips_{convention}"] = float(lpips(x_hat, x))
        if inception is not None:
            row["_inception"] = tuple(inception_features(inception, t)[0].cpu() for t in (x, x_hat))
        if clip is not None:
            e_hat = clip.encode_image(clip_preprocess(x_hat))
            row["clip_score"] = float(100 * F.cosine_similarity(e_hat, clip_text(clip, captions[name])).clamp_min(0))
            row["_embeddings"] = (clip.encode_image(clip_preprocess(x))[0].cpu(), e_hat[0].cpu())
        if save_dir:
            taco.write_image(x_hat, os.path.join(save_dir, os.path.splitext(name)[0] + ".png"))
        rows.append(row)
    return rows


def clip_text(clip, caption):
    import open_clip
    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")([caption])
    return clip.encode_text(tokens.to(next(clip.parameters()).device))


def summarize(rows):
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if "_embeddings" in rows[0] and len(rows) > 1:
        originals, reconstructions = (torch.stack(t) for t in zip(*(r["_embeddings"] for r in rows)))
        mean["cmmd"] = cmmd(originals, reconstructions)
    if "_inception" in rows[0] and len(rows) > 1:
        originals, reconstructions = (torch.stack(t) for t in zip(*(r["_inception"] for r in rows)))
        mean["fid"] = fid(originals, reconstructions)
    return mean


def shuffled(captions, seed=0):
    """Every image gets another image's caption: walk a random order, each taking its successor's."""
    names = list(captions)
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[order[i]]: captions[names[order[(i + 1) % len(names)]]] for i in range(len(names))}


def baseline_curves(folder, images, codecs):
    """For each Pillow codec, one row per quality setting: bpp, PSNR, MS-SSIM, and encode / decode wall time in
    this process (as ours is timed), each the mean over the images."""
    from PIL import features
    curves = {}
    for codec in codecs:
        if not features.check(codec.lower().replace("jpeg", "jpg")):
            print(f"note: this Pillow has no {codec} support; skipped")
            continue
        per_quality = {}
        for name in images:
            x = as_rgb(taco.read_image(os.path.join(folder, name)))
            for q in range(5, 100, 5):
                bpp, decoded, encode, decode = pillow_codec(x, codec, q)
                per_quality.setdefault(q, []).append((bpp, float(psnr(decoded, x)), float(ms_ssim(decoded, x)),
                                                      encode, decode))
        curves[codec] = [{"quality": q, **dict(zip(BASELINE_KEYS, map(float, np.mean(v, axis=0))))}
                         for q, v in sorted(per_quality.items())]
    return curves


BASELINE_KEYS = ("bpp", "psnr", "ms_ssim", "encode_s", "decode_s")


def plot(results, curves, png, reference):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots(figsize=(7, 5))
    for label, points in results.items():
        bpp, quality = zip(*sorted(points))
        ax.plot(bpp, quality, "o-", linewidth=2, label=label)
    for codec, curve in curves.items():
        ax.plot([c["bpp"] for c in curve], [c["psnr"] for c in curve], "--", label=f"{codec} (Pillow)")
    for label, points in (REFERENCE.items() if reference else []):
        ax.plot(*zip(*points), ":x", label=label)
    ax.set_xlabel("bits per pixel (real file size)"), ax.set_ylabel("PSNR (dB, RGB)")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def load_towers(args, config):
    """LPIPS in both conventions and a CLIP model for the CLIP score; what cannot load is skipped, said once."""
    lpips = {}
    try:
        for convention in ("standard", "reference"):
            lpips[convention] = load_lpips(convention, args.alexnet_weights).to(args.device)
    except taco.WeightsUnavailable as error:
        print(f"note: LPIPS skipped: {error}")
    clip, pretrained = None, args.clip_pretrained or config.clip_pretrained
    try:
        clip = taco.load_clip(config.clip_model, pretrained).eval().to(args.device)
        if pretrained == "random":
            print("note: CLIP has random weights: the CLIP score and CMMD below carry no meaning")
    except taco.WeightsUnavailable as error:
        print(f"note: CLIP score and CMMD skipped, and captions cannot be read: {error}")
    inception = None
    try:
        inception = load_inception(args.inception_weights).to(args.device)
    except taco.WeightsUnavailable as error:
        print(f"note: FID skipped: {error}")
    return lpips, clip, pretrained, inception


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoints (rate points)")
    parser.add_argument("--images", required=True, help="folder of images (Kodak, CLIC, COCO val, ...)")
    parser.add_argument("--captions", help="JSON {file name: caption or [captions]} (the first is used)")
    parser.add_argument("--allow-missing-captions", action="store_true", help="code images without a caption "
                        "with the empty caption instead of stopping")
    parser.add_argument("--ablation", action="store_true", help="also run with empty and with shuffled captions")
    parser.add_argument("--baselines", default="JPEG,WEBP,AVIF", help="Pillow codecs to sweep ('' for none)")
    parser.add_argument("--reference", action="store_true", help="overlay published Kodak numbers (released TACO "
                        "checkpoints, CompressAI's Minnen 2018, ELIC) on the plot")
    parser.add_argument("--clip-pretrained", help="CLIP weights (tag or file) if not the checkpoint's")
    parser.add_argument("--alexnet-weights", help="torchvision AlexNet weights file for LPIPS")
    parser.add_argument("--inception-weights", help="torchvision Inception-v3 weights file for FID (needs many "
                        "images to mean anything: thousands, as COCO-30k)")
    parser.add_argument("--save-reconstructions", action="store_true", help="write decoded PNGs (e.g. for "
                        "TF-Inception FID with an external tool) under --out/<checkpoint name>/")
    parser.add_argument("--out", default="results", help="folder for results.json, results.csv, rd.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the networks run (entropy coding is always on the CPU)")
    args = parser.parse_args(argv)

    images = list_images(args.images)
    os.makedirs(args.out, exist_ok=True)
    report, curves_by_label = {"images": args.images, "checkpoints": {}}, {}
    for path in args.checkpoint:
        try:
            model, _ = taco.load_checkpoint(path, args.device)
        except taco.CheckpointError as error:
            raise SystemExit(f"error: {error}")
        lpips, clip, pretrained, inception = load_towers(args, model.config)
        text_model = model.config.text_adapter
        if text_model:
            if clip is None:
                raise SystemExit(f"error: {path} reads captions but its CLIP text tower cannot be loaded")
            model.attach_text_encoder(taco.TextEncoder(model.config.clip_model, pretrained,
                                                       model.config.text_tokens, clip=clip))
        captions = captions_for(images, args.captions, args.allow_missing_captions or not text_model)
        save_dir = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0]) \
            if args.save_reconstructions else None
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        runs = {"given": captions}
        if args.ablation and text_model:
            runs.update(empty={n: "" for n in images}, shuffled=shuffled(captions))
        entry = {"config": dataclasses.asdict(model.config), "complexity": complexity(model)}
        for run, caps in runs.items():
            rows = evaluate(model, images, caps, lpips, clip, inception, args.images,
                            save_dir if run == "given" else None)
            entry[run] = {"mean": summarize(rows), "per_image": [{k: v for k, v in r.items()
                                                                  if not k.startswith("_")} for r in rows]}
        report["checkpoints"][path] = entry
        label = "TACO (ours)" if text_model else "hyperprior (ours)"
        mean = entry["given"]["mean"]
        curves_by_label.setdefault(label, []).append((mean["bpp"], mean["psnr"]))
        print_entry(path, entry)

    codecs = [c.strip().upper() for c in args.baselines.split(",") if c.strip()]
    report["baselines"] = baseline_curves(args.images, images, codecs)
    report["bd"] = {}
    for label, points in curves_by_label.items():
        for codec, curve in report["baselines"].items():
            if len(points) >= 4:
                anchor = [(c["bpp"], c["psnr"]) for c in curve]
                report["bd"][f"{label} vs {codec}"] = {"bd_rate_percent": bd_rate(anchor, sorted(points)),
                                                       "bd_psnr_db": bd_psnr(anchor, sorted(points))}
            else:
                psnrs = [psnr_at_bpp([(c["bpp"], c["psnr"]) for c in curve], b) for b, _ in points]
                report["bd"][f"{label} vs {codec}"] = {"psnr_of_baseline_at_our_bpp": psnrs}
    for name, value in report["bd"].items():
        print(f"{name}: {value}")
    for codec, curve in report["baselines"].items():
        print(f"{codec} (Pillow), mean over images and qualities: encode {np.mean([c['encode_s'] for c in curve]):.4f}"
              f" s, decode {np.mean([c['decode_s'] for c in curve]):.4f} s per image (ours: encode_s / decode_s above)")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_csv(report, os.path.join(args.out, "results.csv"))
    plot(curves_by_label, report["baselines"], os.path.join(args.out, "rd.png"), args.reference)
    print(f"wrote {args.out}/results.json, results.csv, rd.png")


def print_entry(path, entry):
    c = entry["complexity"]
    print(f"{path}: {c['params'] / 1e6:.2f} M parameters ({c['adapter_params'] / 1e6:.2f} M text adapter), "
          f"{c['macs_per_pixel'] / 1e3:.1f} kMAC/pixel")
    keys = METRIC_KEYS
    print("  " + f"{'captions':10s}" + "".join(f"{k:>16s}" for k in keys))
    for run in ("given", "empty", "shuffled"):
        if run in entry:
            mean = entry[run]["mean"]
            print("  " + f"{run:10s}" + "".join(f"{mean[k]:16.4f}" if k in mean else f"{'-':>16s}" for k in keys))


def write_csv(report, path):
    """One row per image and caption run of every checkpoint, then one per quality of every Pillow codec
    (means over the images, in the 'image' column 'mean of N')."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "captions", "image", *METRIC_KEYS])
        for ckpt, entry in report["checkpoints"].items():
            for run in ("given", "empty", "shuffled"):
                for row in entry.get(run, {}).get("per_image", []):
                    writer.writerow([ckpt, run, row["image"]] + [row.get(k, "") for k in METRIC_KEYS])
        images = len(next(iter(report["checkpoints"].values()))["given"]["per_image"]) if report["checkpoints"] else 0
        for codec, curve in report["baselines"].items():
            for c in curve:
                writer.writerow([f"{codec} (Pillow)", f"quality {c['quality']}", f"mean of {images}"]
                                + [c.get(k, "") for k in METRIC_KEYS])


if __name__ == "__main__":
    try:
        main()
    except (taco.CheckpointError, taco.WeightsUnavailable, taco.BitstreamError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
