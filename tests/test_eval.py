"""Claims about eval.py: metrics agree with independent computations, reports use the real file size."""
import json

import numpy as np
import pytest
import torch
import torchvision
from helpers import TINY
from PIL import Image
from skimage.metrics import structural_similarity

import eval as evaluation
import taco
from machinery import baselines, checkpoints, images, metrics, report


def pair(seed=0, size=(2, 3, 96, 112)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*size, generator=g)
    return (x + 0.05 * torch.randn(*size, generator=g)).clamp(0, 1), x


def test_psnr_follows_its_formula():
    x_hat, x = pair()
    mse = ((x_hat.numpy() - x.numpy()) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(metrics.psnr(x_hat, x).numpy(), 10 * np.log10(1 / mse), rtol=1e-5)


def test_single_scale_ssim_matches_scikit_image():
    x_hat, x = pair(size=(1, 3, 64, 80))
    ours, _ = metrics._ssim_terms(x_hat.double(), x.double(), metrics._gaussian_window().double())
    reference = structural_similarity(x_hat[0].numpy(), x[0].numpy(), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0, channel_axis=0)
    assert np.isclose(float(ours.mean()), reference, atol=1e-6)


@pytest.mark.parametrize("size", [(192, 224), (427, 640), (333, 201)], ids=["even", "odd COCO", "odd"])
def test_ms_ssim_matches_pytorch_msssim_on_even_and_odd_sizes(size):
    """pytorch_msssim is what the reference reported MS-SSIM with; its figures are the ones users compare."""
    import skimage.data
    from pytorch_msssim import ms_ssim as published
    photo = torch.from_numpy(skimage.data.astronaut()[:size[0], :size[1]].copy()).permute(2, 0, 1)[None] / 255
    photo = torch.nn.functional.interpolate(photo, size=size, mode="bilinear") if photo.shape[-2:] != size \
        else photo
    g = torch.Generator().manual_seed(1)
    noisy = (photo + 0.08 * torch.randn(photo.shape, generator=g)).clamp(0, 1)
    expected = published(noisy, photo, data_range=1.0, size_average=False)
    assert torch.allclose(metrics.ms_ssim(noisy, photo), expected, atol=1e-4)
    assert np.isclose(float(metrics.ms_ssim(photo, photo)), 1.0, atol=1e-6)


def test_lpips_matches_the_lpips_package_with_the_same_weights():
    import lpips as lpips_package
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    ours = metrics.LPIPS(alexnet, metrics.lpips_linear_weights(), "standard")
    reference = lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    features = {k[len("features."):]: v for k, v in alexnet.items() if k.startswith("features.")}
    for sl in reference.net.children():
        sl.load_state_dict({k: v for k, v in features.items() if k.split(".")[0] in dict(sl.named_children())})
    x_hat, x = pair(size=(2, 3, 64, 64))
    assert torch.allclose(ours(x_hat, x), reference(x_hat, x, normalize=True).flatten(), atol=1e-6)
    ours.convention = "reference"                  # [0, 1] fed as is, like the TACO reference code
    assert torch.allclose(ours(x_hat, x), reference(x_hat, x, normalize=False).flatten(), atol=1e-6)


def test_bd_rate_and_bd_psnr_on_curves_with_a_known_answer():
    anchor = [(0.1, 27.0), (0.2, 29.5), (0.4, 32.0), (0.8, 34.8)]
    cheaper = [(r * 0.8, p) for r, p in anchor]               # same quality for 20% fewer bits
    better = [(r, p + 0.5) for r, p in anchor]                # same bits, +0.5 dB
    assert np.isclose(metrics.bd_rate(anchor, cheaper), -20.0, atol=1e-6)
    assert np.isclose(metrics.bd_psnr(anchor, better), 0.5, atol=1e-6)
    assert np.isclose(metrics.bd_rate(anchor, anchor), 0.0, atol=1e-9)


def test_cmmd_matches_the_reference_codes_biased_estimator():
    """google-research cmmd/distance.py: k(x, y) = exp(-gamma (|x|^2 + |y|^2 - 2 x.y)), gamma = 1 / (2 sigma^2),
    sigma 10, MMD^2 = mean K_xx + mean K_yy - 2 mean K_xy over whole matrices (diagonals kept), times 1000."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g) + 0.5
    x = (a / a.norm(dim=1, keepdim=True)).double().numpy()
    y = (b / b.norm(dim=1, keepdim=True)).double().numpy()
    gamma = 1 / (2 * 10.0 ** 2)
    sq_x, sq_y = np.diag(x @ x.T), np.diag(y @ y.T)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + sq_x[:, None] + sq_x[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + sq_x[:, None] + sq_y[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + sq_y[:, None] + sq_y[None, :])))
    assert np.isclose(metrics.cmmd(a, b), 1000 * (k_xx + k_yy - 2 * k_xy), rtol=1e-6)
    assert np.isclose(metrics.cmmd(a, b, block=2), 1000 * (k_xx + k_yy - 2 * k_xy), rtol=1e-6)   # in blocks
    assert metrics.cmmd(a, a) == pytest.approx(0, abs=1e-9)


def test_clip_preprocessing_matches_open_clips_own_transform():
    """open_clip's eval transform (PIL bicubic resize of the short side to 224, center crop, normalize) on a
    photo: ours, differentiable on tensors, agrees to better than 50 dB."""
    import open_clip
    import skimage.data
    photo = skimage.data.coffee()                                               # 400 x 600
    expected = open_clip.image_transform(224, is_train=False)(Image.fromarray(photo))[None]
    ours = metrics.clip_preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)
    error = ((ours - expected) * metrics.CLIP_STD) ** 2                          # back on the [0, 1] scale
    assert 10 * np.log10(1 / float(error.mean())) > 50


@pytest.mark.parametrize("samples", [(50, 60), (3, 5)])          # more samples than dimensions, and fewer
def test_fid_matches_the_frechet_formula_computed_by_eigenvalues(samples):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(samples[0], 4, generator=g)
    b = torch.randn(samples[1], 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5]) + 0.3
    an, bn = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    trace_root = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()   # tr((Ca Cb)^1/2)
    expected = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * trace_root
    assert np.isclose(metrics.fid(a, b), expected, rtol=1e-6, atol=1e-9)
    assert abs(metrics.fid(a, a)) < 1e-6


def test_complexity_counts_match_the_layer_formulas():
    model = taco.TACO(taco.TacoConfig(**{**TINY, "text_adapter": False}))
    N, M, size = 16, 24, 256
    convs = [  # (in, out, kernel, output pixels) of g_a, h_a, h_s (convs) ...
        (3, N, 5, (size // 2) ** 2), (N, N, 5, (size // 4) ** 2), (N, N, 5, (size // 8) ** 2),
        (N, M, 5, (size // 16) ** 2), (M, N, 3, (size // 16) ** 2), (N, N, 5, (size // 32) ** 2),
        (N, N, 5, (size // 64) ** 2), (M * 3 // 2, 2 * M, 3, (size // 16) ** 2)]
    deconvs = [  # ... and (in, out, kernel, input pixels) of the transposed ones in g_s and h_s
        (M, N, 5, (size // 16) ** 2), (N, N, 5, (size // 8) ** 2), (N, N, 5, (size // 4) ** 2),
        (N, 3, 5, (size // 2) ** 2), (N, M, 5, (size // 64) ** 2), (M, M * 3 // 2, 5, (size // 32) ** 2)]
    gdns = 2 * sum(N * N * (size // 2 ** k) ** 2 for k in (1, 2, 3))
    expected = sum(i * o * k * k * p for i, o, k, p in convs + deconvs) + gdns
    counted = metrics.complexity(model, size)
    assert counted["macs_per_pixel"] == expected / size ** 2
    assert counted["params"] == sum(p.numel() for p in model.parameters()) and counted["adapter_params"] == 0
    config = taco.TacoConfig(**TINY)
    T, D, quarter, eighth = config.text_tokens, config.text_dim, (size // 4) ** 2, (size // 8) ** 2
    injectors = sum(T * D * N + 2 * P * N * N + 2 * T * N * N + 2 * P * T * N for P in (quarter, eighth))
    extractor = eighth * N * D + 2 * eighth * D * D + 2 * T * D * D + 2 * T * eighth * D   # the last: out_proj
    with_text = metrics.complexity(taco.TACO(config), size)
    assert with_text["adapter_params"] > 0
    assert with_text["macs_per_pixel"] == (expected + injectors + extractor) / size ** 2


def test_report_bpp_is_the_real_file_size_and_outputs_are_written(weights_folder, alexnet_weights, tmp_path):
    """conftest's three photos, caption file, tiny checkpoint and AlexNet weights. The other parts of a report are
    tested where they are the claim: FID and KID in test_fid.py, the caption modes of --ablation in
    test_ablation.py."""
    folder, out = weights_folder, tmp_path / "out"
    evaluation.main(["--checkpoint", str(folder / "tiny.pt"), "--images", str(folder / "images"), "--captions",
                     str(folder / "captions.json"), "--baselines", "JPEG,WEBP", "--reference",
                     "--alexnet-weights", alexnet_weights, "--out", str(out)])
    report = json.loads((out / "results.json").read_text())
    entry = report["checkpoints"][str(folder / "tiny.pt")]
    model, _ = checkpoints.load_checkpoint(str(folder / "tiny.pt"))
    model.attach_text_encoder()
    captions = {"coffee.png": "a cup of coffee", "cat.png": "a cat", "rocket.png": "a rocket"}
    for row in entry["given"]["per_image"]:
        x = images.read_image(str(folder / "images" / row["image"]))
        size = len(model.compress(x, captions[row["image"]]))
        assert row["bytes"] == size and row["bpp"] == 8 * size / (x.shape[-1] * x.shape[-2])
        assert {"psnr", "ms_ssim", "lpips_standard", "lpips_reference", "clip_score", "bpp_estimate"} <= set(row)
    assert {"cmmd", "lpips_standard", "lpips_reference"} <= set(entry["given"]["mean"])
    assert set(report["baselines"]) == {"JPEG", "WEBP"}
    for curve in report["baselines"].values():                       # timed as ours: wall time, same process
        assert all(c["encode_s"] > 0 and c["decode_s"] > 0 and c["bpp"] > 0 for c in curve)
    rows = (out / "results.csv").read_text().splitlines()
    assert any(r.startswith("JPEG (Pillow),quality 50,mean of 3") for r in rows)
    assert (out / "rd.png").stat().st_size > 10_000 and (out / "results.csv").exists()


def offline(url, *args, **kwargs):
    raise OSError(f"no network: {url}")


def test_offline_eval_says_once_what_is_missing_and_compares_with_jpeg_in_sentences(weights_folder, tmp_path, capfd,
                                                                                   monkeypatch):
    """No network and an empty download cache: one note per missing tower, never torchvision's "Downloading"
    line; the comparison with JPEG is a sentence per rate point, not a Python dict."""
    folder = weights_folder
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    evaluation.main(["--checkpoint", str(folder / "tiny.pt"), "--images", str(folder / "images"), "--captions",
                     str(folder / "captions.json"), "--baselines", "JPEG", "--fid-patches", "--out",
                     str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err and "No pretrained weights loaded" not in out + err
    assert out.count("note: LPIPS skipped") == 1 and out.count("note: FID and KID skipped") == 1
    assert "run once with network access" in out and "--alexnet-weights" in out and "--fid-weights" in out
    assert "weights-inception-2015-12-05-6726825d.pth" in out and "docs/downloads.md" in out
    comparison = [line for line in out.splitlines() if line.startswith("JPEG at ")]
    assert len(comparison) == 1 and "{" not in out
    report_bpp = json.loads((tmp_path / "out" / "results.json").read_text())["checkpoints"][str(folder / "tiny.pt")]
    assert f"JPEG at {report_bpp['given']['mean']['bpp']:.3f} bpp: " in comparison[0]


def test_bd_rate_is_printed_with_its_sign_spelled_out():
    """Our curve is JPEG's with 10% fewer bits at every PSNR: BD-rate -10.0%, said as fewer bits."""
    jpeg = [{"bpp": r, "psnr": p} for r, p in [(0.2, 26.0), (0.4, 29.0), (0.8, 32.5), (1.6, 36.0), (3.2, 39.0)]]
    ours = [(0.9 * c["bpp"], c["psnr"]) for c in jpeg[:4]]
    bd = report.bjontegaard({"TACO (ours)": ours}, {"JPEG": jpeg})
    assert np.isclose(bd["TACO (ours) vs JPEG"]["bd_rate_percent"], -10.0, atol=0.5)
    line, = report.comparison_lines({"TACO (ours)": ours}, bd)
    assert line.startswith("TACO (ours) vs JPEG: BD-rate -10.") and "fewer bits for the same PSNR" in line
    assert "higher PSNR at the same rate" in line


def test_bad_inputs_stop_with_a_clear_message(weights_folder, tmp_path):
    folder = weights_folder
    common = ["--images", str(folder / "images"), "--out", str(tmp_path), "--baselines", ""]
    with pytest.raises(SystemExit, match="image folder not found"):
        evaluation.main(["--checkpoint", str(folder / "tiny.pt"), "--images", str(tmp_path / "none")])
    (tmp_path / "partial.json").write_text(json.dumps({"coffee.png": "a cup"}))
    with pytest.raises(SystemExit, match="no caption for 2 image"):
        evaluation.main(["--checkpoint", str(folder / "tiny.pt"), "--captions", str(tmp_path / "partial.json")]
                     + common)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        evaluation.main(["--checkpoint", str(tmp_path / "bad.pt"), "--captions", str(folder / "captions.json")]
                     + common)


def test_pillow_baseline_bpp_is_the_encoded_size():
    x = pair(size=(1, 3, 48, 64))[1]
    bpp, decoded, _, _ = baselines.pillow_codec(x, "JPEG", 50)
    import io
    buffer = io.BytesIO()
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=50)
    assert bpp == 8 * len(buffer.getvalue()) / (48 * 64) and decoded.shape == x.shape
