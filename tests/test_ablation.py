"""Claims about eval.py --ablation: every caption mode is scored against the image's own caption, and the
verdict's intervals are the paired t intervals over the images."""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLIP, natural_image, tiny_model
from scipy import stats

import eval as evaluation
from machinery import checkpoints, clip_text, images, metrics

CAPTIONS = {"a.png": "a red square", "b.png": "two green dogs", "c.png": "a blue sky over the sea"}


def offline(url, *args, **kwargs):
    raise OSError(f"no network: {url}")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, encoder):
    """Three small images with captions; a codec that ignores the caption (gammas 0, as initialised) and one
    that reads it (gammas drawn at random); --ablation run on both, offline (no LPIPS, no FID)."""
    root = tmp_path_factory.mktemp("ablation")
    (root / "images").mkdir()
    for seed, name in enumerate(CAPTIONS):
        images.write_image(natural_image(64, 64, seed), str(root / "images" / name))
    (root / "captions.json").write_text(json.dumps(CAPTIONS))
    for name, gammas in (("ignores.pt", False), ("reads.pt", True)):
        checkpoints.save_checkpoint(str(root / name), tiny_model(encoder, gammas=gammas, seed=1))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TORCH_HOME", str(root / "empty-cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    try:
        evaluation.main(["--checkpoint", str(root / "ignores.pt"), str(root / "reads.pt"), "--images",
                         str(root / "images"), "--captions", str(root / "captions.json"), "--ablation",
                         "--baselines", "", "--out", str(root / "out")])
    finally:
        monkeypatch.undo()
    report = json.loads((root / "out" / "results.json").read_text())
    return root, report


def clip_score_by_hand(clip, x_hat, caption):
    """100 max(cos, 0) between CLIP's embeddings of the decoded image and of the caption (open_clip's own
    tokenizer for the tiny CLIP)."""
    tokens = open_clip.get_tokenizer(TINY_CLIP)([caption])
    with torch.no_grad():
        e_image = clip.encode_image(metrics.clip_preprocess(x_hat))
        e_text = clip.encode_text(tokens)
    return float(100 * F.cosine_similarity(e_image, e_text).clamp_min(0))


def decoder(path):
    model, _ = checkpoints.load_checkpoint(str(path))
    model.attach_text_encoder(clip_text.TextEncoder(TINY_CLIP, "random"))
    return lambda x, caption: images.as_rgb(model.decompress(model.compress(x, caption)))


def test_every_mode_is_scored_against_the_images_own_caption(ablation):
    """A codec that ignores the caption decodes the same image in all three modes, so the three CLIP scores are
    equal, and equal to the score computed here against the image's own caption. A codec that reads it: each
    mode's score is that of its own decoded image, still against the image's own caption."""
    root, report = ablation
    clip = clip_text.load_clip(TINY_CLIP, "random").eval()
    for checkpoint, runs in (("ignores.pt", ("given",)), ("reads.pt", ("empty", "shuffled"))):
        entry, code = report["checkpoints"][str(root / checkpoint)], decoder(root / checkpoint)
        for run in ("given", "empty", "shuffled"):
            for row in entry[run]["per_image"]:
                own = CAPTIONS[row["image"]]
                assert row["scored_against"] == own
                assert row["caption"] == {"given": own, "empty": ""}.get(run, row["caption"]) != \
                    (own if run == "shuffled" else None)
                if run in runs:                     # scored by hand: the decoded image against its own caption
                    x_hat = code(images.read_image(str(root / "images" / row["image"])), row["caption"])
                    assert row["clip_score"] == pytest.approx(clip_score_by_hand(clip, x_hat, own), abs=1e-4)
    ignores = report["checkpoints"][str(root / "ignores.pt")]
    for given, empty, shuffled in zip(*(ignores[run]["per_image"] for run in ("given", "empty", "shuffled"))):
        assert given["clip_score"] == empty["clip_score"] == shuffled["clip_score"]
        assert given["bytes"] == empty["bytes"] == shuffled["bytes"]
    reads = report["checkpoints"][str(root / "reads.pt")]
    assert any(g["clip_score"] != e["clip_score"] for g, e in zip(reads["given"]["per_image"],
                                                                  reads["empty"]["per_image"]))


def test_the_verdict_is_the_paired_t_interval_over_the_images(ablation, capsys):
    root, report = ablation
    entry = report["checkpoints"][str(root / "reads.pt")]
    given = {r["image"]: r for r in entry["given"]["per_image"]}
    for other in ("empty", "shuffled"):
        for key, name in (("bpp", "bpp_percent"), ("psnr", "psnr"), ("clip_score", "clip_score")):
            rows = entry[other]["per_image"]
            if key == "bpp":
                d = np.array([100 * (given[r["image"]]["bpp"] - r["bpp"]) / r["bpp"] for r in rows])
            else:
                d = np.array([given[r["image"]][key] - r[key] for r in rows])
            half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
            got = entry["verdict"][f"given_minus_{other}"][name]
            assert np.isclose(got["mean"], d.mean(), rtol=1e-12, atol=1e-12)
            assert np.isclose(got["low"], d.mean() - half, rtol=1e-9, atol=1e-12)
            assert np.isclose(got["high"], d.mean() + half, rtol=1e-9, atol=1e-12)
            assert got["excludes_zero"] == (not d.mean() - half <= 0 <= d.mean() + half)
    assert "against an empty caption: bpp" in entry["verdict"]["sentence"]
    ignores = report["checkpoints"][str(root / "ignores.pt")]["verdict"]
    assert ignores["given_minus_empty"]["clip_score"]["mean"] == 0          # nothing changed, nothing claimed
    assert ignores["given_minus_empty"]["clip_score"]["excludes_zero"] is False


def test_open_clips_stand_in_notes_are_dropped_where_the_towers_are_built():
    """open_clip's "No pretrained weights loaded ... initialized randomly" (and "no CLIP weights found" for a
    model folder) repeat the project's own STAND-IN note: load_clip drops them, and only them, while it builds."""
    import logging
    records, root = [], logging.getLogger()
    handler = logging.Handler()
    handler.emit = records.append
    root.addHandler(handler)
    try:
        clip_text.load_clip(TINY_CLIP, "random")
        logging.warning("a warning of someone else's")
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a warning of someone else's"]
    assert not root.filters
