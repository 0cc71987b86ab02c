"""Claims about FID and KID: eval.py's figures are torch-fidelity's own on the same images and the same network
weights (random here: nothing is downloaded), KID follows its estimator, the patches are FID/256's."""
import argparse
import json
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, natural_image, tiny_model

import eval as evaluation
import taco
from machinery import checkpoints, images, metrics


def random_fid_weights(path, seed=0):
    """torch-fidelity's Inception with random weights, saved as the file --fid-weights takes. Its constructor
    insists on loading weights, so that load is skipped while it is built; Kaiming-normal convolutions keep the
    features away from 0 (the default init shrinks them to ~1e-8 over 90-odd layers)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception
    torch.manual_seed(seed)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three small images, a tiny codec, eval.py with whole-image FID on them (asked for: fewer than 2048) and the
    decoded images saved as PNG."""
    root = tmp_path_factory.mktemp("fid")
    (root / "images").mkdir()
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        images.write_image(natural_image(64, 64, seed), str(root / "images" / name))
    checkpoints.save_checkpoint(str(root / "codec.pt"), tiny_model(text_adapter=False))
    weights = random_fid_weights(str(root / "inception.pth"))
    evaluation.main(["--checkpoint", str(root / "codec.pt"), "--images", str(root / "images"), "--baselines", "",
                     "--fid-weights", weights, "--fid-few-images", "--save-reconstructions", "--out",
                     str(root / "out")])
    entry = json.loads((root / "out" / "results.json").read_text())["checkpoints"][str(root / "codec.pt")]
    return root, weights, entry["given"]["mean"]


def test_eval_fid_and_kid_are_torch_fidelitys_own_on_the_same_images(run):
    """torch-fidelity reads the two folders of PNGs itself (the originals, the decoded images eval.py wrote):
    its FID and KID equal eval.py's."""
    import torch_fidelity
    root, weights, mean = run
    reference = torch_fidelity.calculate_metrics(
        input1=str(root / "images"), input2=str(root / "out" / "codec"), fid=True, kid=True, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights, kid_subset_size=3,
        cache=False, save_cpu_ram=True, verbose=False)
    assert mean["fid"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)
    assert mean["kid"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-6, abs=1e-12)
    assert mean["kid_std"] == pytest.approx(reference["kernel_inception_distance_std"], abs=1e-12)
    assert mean["kid_subset_size"] == 3 and mean["fid_protocol"].startswith("whole images, 3 from 3 images")
    assert mean["fid"] > 0


def test_kid_is_the_unbiased_cubic_kernel_mmd_over_seeded_subsets():
    """The estimator written out here: per subset (numpy's RandomState(2020), as torch-fidelity draws them),
    k(x, y) = (x.y / d + 1)^3, MMD^2 = off-diagonal means of K_aa and K_bb minus twice the mean of K_ab."""
    g = np.random.default_rng(0)
    a, b = g.normal(size=(9, 6)).astype(np.float32), (g.normal(size=(8, 6)) + 0.3).astype(np.float32)
    rng, values = np.random.RandomState(2020), []
    for _ in range(7):
        x, y = a[rng.choice(9, 4, replace=False)], b[rng.choice(8, 4, replace=False)]
        k = lambda u, v: (u @ v.T / 6 + 1) ** 3
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (4 * 3) - 2 * kxy.mean())
    got = metrics.kid(a, b, subset_size=4, subsets=7)
    assert got["kid"] == pytest.approx(np.mean(values), rel=1e-5)
    assert got["kid_std"] == pytest.approx(np.std(values), rel=1e-4)
    assert metrics.kid(a, b)["kid_subset_size"] == 8                       # fewer than 1000: the set's own size


def test_patches_are_the_grid_and_the_half_shifted_grid_at_the_same_positions():
    """As MS-ILLM's update_patch_fid cuts them (F.unfold with stride 256, then from (128, 128)); 600x700 gives
    a 2x2 grid and a 1x2 shifted one. Patches of an image and of its copy + 1 line up one for one."""
    x = torch.rand(1, 3, 600, 700)
    unfold = lambda t: F.unfold(t, kernel_size=256, stride=256).permute(0, 2, 1).reshape(-1, 3, 256, 256)
    expected = torch.cat([unfold(x), unfold(x[:, :, 128:, 128:])])
    got = metrics.patches(x)
    assert got.shape == (6, 3, 256, 256) and torch.equal(got, expected)
    assert torch.equal(metrics.patches(x + 1), got + 1)
    assert len(metrics.patches(torch.rand(1, 3, 300, 700))) == 2          # under 1.5 x 256 tall: no shifted grid
    assert len(metrics.patches(torch.rand(1, 3, 200, 700))) == 0


def test_whole_image_fid_on_few_images_is_refused_in_one_line(tmp_path, capsys):
    """Fewer images than the 2048 feature dimensions: not loaded, one line naming both ways out."""
    args = argparse.Namespace(alexnet_weights=str(tmp_path / "none.pth"), clip_pretrained=None, device="cpu",
                              images_count=24, fid_patches=False, fid_few_images=False, fid_weights=None)
    *_, inception = evaluation.load_towers(args, taco.TacoConfig(**TINY))
    lines = [line for line in capsys.readouterr().out.splitlines() if "FID" in line]
    assert inception is None and len(lines) == 1
    assert lines[0] == ("note: FID and KID skipped: 24 images, fewer than the 2048 dimensions of the Inception "
                        "features that whole-image FID needs; pass --fid-patches (FID/256 of HiFiC and MS-ILLM) or "
                        "--fid-few-images")
