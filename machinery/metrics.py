"""Metrics on images and sets of images, each matched to the implementation users compare with: PSNR,
MS-SSIM (pytorch_msssim), LPIPS (the lpips package), CLIP preprocessing (CLIP's own), CMMD (its paper's code),
FID and KID (torch-fidelity), BD-rate, and a model's parameters and multiply-accumulates (the classical codecs
are in baselines.py).
Tensors are (B, 3, H, W) in [0, 1]."""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import taco
from machinery import clip_text
from machinery.images import to_pixels

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


def bits(likelihoods, dim=None):
    """-sum log2 p: the code length in bits that a model's likelihoods give (its own estimate of the file), in
    their dtype; a dict of them ({"y": ..., "z": ...}) gives the sum of its terms. Summed over everything, or over
    `dim`; a tensor, which train.py's rate term differentiates."""
    if isinstance(likelihoods, dict):
        return sum(bits(likelihood, dim) for likelihood in likelihoods.values())
    information = -torch.log2(likelihoods)
    return information.sum() if dim is None else information.sum(dim)


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


def cached_weights(url, path, what, flag, library):
    """The path of a weights file: `path` if given, else the torch hub cache's copy of `url` (where torchvision and
    torch-fidelity keep theirs), fetched into it on first use; checked to load with weights_only=True. Fetched here
    rather than by the library's loader, which announces "Downloading: ..." before it tries: offline a reader
    would believe a download under way, then read that it failed."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        if not path and not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(os.path.basename(cached))          # the file names its hash
            torch.hub.download_url_to_file(url, cached, digest and digest.group(1), progress=False)
        torch.load(path or cached, map_location="cpu", weights_only=True)        # tensors only, or refuse
        return path or cached
    except Exception as error:
        raise clip_text.WeightsUnavailable(
            f"could not load {what} weights ({type(error).__name__}): run once with network access ({library} "
            f"caches the file as {cached}; docs/downloads.md) or pass that file as {flag}") from error


def load_lpips(convention="standard", alexnet_weights=None):
    """LPIPS with ImageNet AlexNet weights (torchvision's) and the calibrated linear layers shipped inside the
    `lpips` package."""
    import torchvision
    path = cached_weights(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url, alexnet_weights, "AlexNet (LPIPS)",
                          "--alexnet-weights", "torchvision")
    alexnet_state = torch.load(path, map_location="cpu", weights_only=True)
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


def set_features(x, x_hat, inception, clip, clip_model, caption):
    """What the set metrics need of one image, x and x_hat (1, 3, H, W): FID/KID's Inception features (whole
    images, or --fid-patches' patches of both at the same positions) and CMMD's CLIP embeddings of both; with CLIP,
    also x_hat's CLIP score against `caption`, which shares the embedding. -> ({"clip_score": ...} or {},
    {name: 1-d array}); a tower that is None adds nothing."""
    scores, features = {}, {}
    if inception is not None:
        cut = patches if inception.patches else (lambda t: t)
        for side, t in (("x", x), ("x_hat", x_hat)):
            features[f"{inception.protocol}_{side}"] = fid_features(inception, cut(t)).numpy().ravel()
    if clip is not None:
        e_hat = clip.encode_image(clip_preprocess(x_hat))
        similarity = F.cosine_similarity(e_hat, caption_embedding(clip, clip_model, caption))
        scores["clip_score"] = float(100 * similarity.clamp_min(0))
        features["clip_x"] = clip.encode_image(clip_preprocess(x))[0].cpu().numpy()
        features["clip_x_hat"] = e_hat[0].cpu().numpy()
    return scores, features


def caption_embedding(clip, clip_model, caption):
    """CLIP's text embedding of `caption`, tokenized by the tokenizer of the CLIP the checkpoint names."""
    tokens = clip_text.tokenizer(clip_model)([caption])
    return clip.encode_text(tokens.to(next(clip.parameters()).device))


def psnr_at_bpp(curve, bpp):
    """PSNR of a [(bpp, psnr)] curve at `bpp`, linearly interpolated; None outside the curve's range."""
    rates, quality = zip(*curve)
    if not rates[0] <= bpp <= rates[-1]:
        return None
    return float(np.interp(bpp, rates, quality))


def mean_gap(xa, ya, xb, yb):
    """Bjontegaard's mean of fit_b - fit_a, cubic fits of y over x, over the range of x that both curves cover."""
    fit_a, fit_b = np.polyfit(xa, ya, 3), np.polyfit(xb, yb, 3)
    low, high = max(min(xa), min(xb)), min(max(xa), max(xb))
    integral = lambda fit: np.polyval(np.polyint(fit), high) - np.polyval(np.polyint(fit), low)   # noqa: E731
    return (integral(fit_b) - integral(fit_a)) / (high - low)


def bd_rate(curve_a, curve_b):
    """Bjontegaard delta rate (%) of curve b against curve a: average bitrate change at equal PSNR, from
    cubic fits of log-rate over PSNR. Negative: b saves."""
    (ra, pa), (rb, pb) = zip(*curve_a), zip(*curve_b)
    return float((np.exp(mean_gap(pa, np.log(ra), pb, np.log(rb))) - 1) * 100)


def bd_psnr(curve_a, curve_b):
    """Bjontegaard delta PSNR (dB) of curve b against curve a, at equal log-rate."""
    (ra, pa), (rb, pb) = zip(*curve_a), zip(*curve_b)
    return float(mean_gap(np.log(ra), pa, np.log(rb), pb))


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


# FID and KID as torch-fidelity computes them: the TF-Inception network of the original FID
# (pt_inception-2015-12-05, converted to PyTorch) and its pool3 features (2048-d), fed uint8 images that it
# resizes to 299x299 itself (bilinear, as TensorFlow 1.x did) -- exactly what a torch-fidelity (or torchmetrics)
# user gets, so the figures sit beside the literature's.
FID_FEATURES = 2048
KID_SUBSET_SIZE, KID_SUBSETS = 1000, 100          # torch-fidelity's defaults, the standard of Binkowski et al. 2018
PATCH = 256                                        # the patch protocol's size (HiFiC, MS-ILLM: FID/256)


def load_fid_inception(weights=None):
    """torch-fidelity's Inception feature extractor, its pool3 (2048-d) output. `weights`: a local file (--fid-
    weights); else torch-fidelity's own cache (the torch hub cache), fetched into it on first use."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    path = cached_weights(URL_INCEPTION_V3, weights, "TF-Inception (FID, KID)", "--fid-weights", "torch-fidelity")
    # checked above with weights_only=True: torch-fidelity then loads the same file its own way
    return FeatureExtractorInceptionV3("inception-v3-compat", [str(FID_FEATURES)], feature_extractor_weights_path=path)


def fid_features(model, x, batch=32):
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool3 features: rounded to 8 bits, as the images torch-fidelity reads
    from files (and as eval.py writes decoded images), then its own resize and scaling. `batch` at a time."""
    device = next(model.parameters()).device
    x = to_pixels(x, False, torch.uint8)
    return torch.cat([torch.zeros(0, FID_FEATURES)]                     # an image smaller than a patch: none
                     + [model(x[i:i + batch].to(device))[0].cpu() for i in range(0, len(x), batch)])


def patches(x, size=PATCH):
    """The FID/256 patches of HiFiC (Mentzer et al. 2020) as MS-ILLM's code cuts them (NeuralCompression
    update_patch_fid): the non-overlapping size x size grid from the top-left corner, then, for images at least
    1.5 size on both sides, the same grid shifted by size / 2 in both directions; (P, 3, size, size). Cut from
    the original and from the decoded image alike, the i-th patches of both lie at the same position."""
    H, W = x.shape[-2:]
    corners = [(r, c) for r in range(0, H - size + 1, size) for c in range(0, W - size + 1, size)]
    if H >= 1.5 * size and W >= 1.5 * size:
        half = size // 2
        corners += [(r, c) for r in range(half, H - size + 1, size) for c in range(half, W - size + 1, size)]
    if not corners:
        return x.new_zeros(0, x.shape[1], size, size)
    return torch.cat([x[:, :, r:r + size, c:c + size] for r, c in corners])


def fid(a, b):
    """Frechet distance (Heusel et al. 2017) between two feature sets (N, D), by torch-fidelity's own statistics
    and formula (float64 covariances; the trace of the square root from the eigenvalues of C_a C_b). At 30k x
    2048 this holds the two float32 sets and one float64 copy at a time (python bench.py sets)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    stats = [fid_features_to_statistics(torch.as_tensor(np.asarray(t, dtype=np.float32))) for t in (a, b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kid(a, b, subset_size=KID_SUBSET_SIZE, subsets=KID_SUBSETS):
    """Kernel Inception Distance (Binkowski et al. 2018) by torch-fidelity: the unbiased MMD^2 with the cubic
    polynomial kernel over `subsets` random subsets of `subset_size` per side (its seed), their mean and standard
    deviation. Sets smaller than `subset_size` use their own size (then every subset is the whole set and the
    spread is 0): -> {"kid", "kid_std", "kid_subset_size"}."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    size = min(subset_size, len(a), len(b))
    out = kid_features_to_metric(*(torch.as_tensor(np.asarray(t, dtype=np.float32)) for t in (a, b)),
                                 kid_subset_size=size, kid_subsets=subsets, verbose=False)
    return {"kid": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subset_size": size}


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
        elif isinstance(module, taco.Extractor):     # its attention, written out: keys, values, queries, softmax
            (x, text), D = inputs, module.cross_attn.embed_dim      # (its Linear layers count themselves)
            P, T = x.shape[-2] * x.shape[-1], text.shape[1]
            counts["macs"] += (2 * P + T) * D * D + 2 * T * P * D
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(
        m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention, taco.GDN, taco.Extractor))]
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
