"""Claims about train.py: the joint loss trains the codec only, runs resume exactly, data loads or fails clearly."""
import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from helpers import TINY, TINY_CLIP
from PIL import Image

import data
import taco
import train
from machinery import checkpoints, clip_text, elic, metrics, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Runs that do not check the end of a run skip its JPEG sweep and explain.png (the demo test keeps them).
TINY_RUN = ["--N", "16", "--M", "24", "--clip-model", TINY_CLIP, "--clip-pretrained", "random", "--crop", "64",
            "--batch-size", "2", "--log-every", "1", "--no-final-report"]


@pytest.fixture(scope="module")
def towers():
    """Random-weight stand-ins with the real architectures: tiny CLIP, AlexNet LPIPS (frozen: the loss's tests
    share them)."""
    torch.manual_seed(0)
    clip = clip_text.load_clip(TINY_CLIP, "random")
    lpips = metrics.LPIPS(torchvision.models.alexnet(weights=None).state_dict(), metrics.lpips_linear_weights())
    return clip_text.TextEncoder(TINY_CLIP, "random", clip=clip), clip.visual, lpips


def tiny_model(encoder):
    torch.manual_seed(0)
    return taco.TACO(taco.TacoConfig(**TINY)).attach_text_encoder(encoder)


def photo_batch(n=4, size=64):
    import skimage.data
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255
    return torch.stack([image[:, 100 + 40 * i:100 + 40 * i + size, 150:150 + size] for i in range(n)])


def test_every_loss_term_reaches_the_codec_and_none_reaches_the_frozen_towers(towers):
    encoder, visual, lpips = towers
    model = tiny_model(encoder).train()
    x, captions = photo_batch(), ["an astronaut"] * 2 + ["a flag", "a helmet"]
    for term in ("bpp", "mse", "lpips", "joint"):
        model.zero_grad()
        criterion = train.JointLoss(0.01, 1.0, 1.0, lpips, visual)
        features, padding, embedding = encoder(captions)
        _, terms = criterion(model(x, (features, padding)), x, embedding)
        terms[term].backward()
        codec_grads = [p.grad for n, p in model.named_parameters() if n.startswith("g_a.stages.0")]
        assert all(g is not None and g.abs().sum() > 0 for g in codec_grads), term
        towers = list(visual.parameters()) + list(lpips.parameters()) + list(encoder.parameters())
        assert all(p.grad is None for p in towers), term


@pytest.mark.core
def test_the_loss_is_rate_plus_weighted_mse_lpips_and_joint_term_each_by_its_formula(towers):
    """loss = bpp + lambda * 255^2 * MSE + k_P * LPIPS + k_J * J, each term computed here from its definition."""
    encoder, visual, lpips = towers
    lmbda, k_p, k_j = 0.013, 3.5, 0.0025
    criterion = train.JointLoss(lmbda, k_p, k_j, lpips, visual)
    torch.manual_seed(2)
    x, x_hat, text = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.randn(2, 64)
    likelihoods = {"y": torch.rand(2, 24, 4, 4) * 0.9 + 0.05, "z": torch.rand(2, 16, 1, 1) * 0.9 + 0.05}
    with torch.no_grad():
        loss, terms = criterion({"x_hat": x_hat, "likelihoods": likelihoods}, x, text)
        bits = sum(-np.log2(v.double().numpy()).sum() for v in likelihoods.values())
        bpp = bits / (2 * 64 * 64)
        mse = ((x_hat.double() - x.double()) ** 2).mean().item()
        perceptual = lpips(x_hat, x).mean().item()                        # the LPIPS network (tested in test_eval)
        joint = criterion.joint_term(x_hat, x, text).item()              # its formula: the test below
    assert np.isclose(terms["bpp"].item(), bpp, rtol=1e-5)
    assert np.isclose(terms["mse"].item(), mse, rtol=1e-5)
    assert np.isclose(terms["psnr"].item(), 10 * np.log10(1 / mse), rtol=1e-5)
    assert np.isclose(loss.item(), bpp + lmbda * 255 ** 2 * mse + k_p * perceptual + k_j * joint, rtol=1e-5)


@pytest.mark.core
def test_joint_term_is_infonce_plus_embedding_distance(towers):
    """Against a computation written here: symmetric cross-entropy on the cosine logits, plus 40 * norm."""
    _, visual, _ = towers
    criterion = train.JointLoss(0.01, 1.0, 1.0, None, visual)
    torch.manual_seed(1)
    x, x_hat, text = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64), torch.randn(3, 64)
    with torch.no_grad():
        e_hat = visual(metrics.clip_preprocess(x_hat))
        e = visual(metrics.clip_preprocess(x))
        e_hat, e, t = (v / v.norm(dim=1, keepdim=True) for v in (e_hat, e, text))
        logits = (t @ e_hat.T).numpy() / 0.07
        rows = -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(1)))
        cols = -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(0)))
        expected = (rows + cols) / 2 + 40 * np.sqrt(((e_hat - e) ** 2).sum().item())
        assert np.isclose(criterion.joint_term(x_hat, x, text).item(), expected, rtol=1e-4)


def test_the_joint_loss_falls_by_more_than_half_in_fifteen_steps(towers):
    encoder, visual, lpips = towers
    model = tiny_model(encoder).train()
    criterion = train.JointLoss(0.01, 1.0, 0.01, lpips, visual)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "quantiles" not in n], lr=3e-3)
    x, captions = photo_batch(), ["an astronaut"] * 4
    features, padding, embedding = encoder(captions)
    losses = []
    for _ in range(15):
        torch.manual_seed(len(losses))
        loss, _ = criterion(model(x, (features, padding)), x, embedding)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def run_train(args, tmp_path, name, data=()):
    """train.py's run in `tmp_path / name` on the demo's photos, or on `data` (conftest's small_data)."""
    cfg = train.parse_args(TINY_RUN + list(data) + ["--out", str(tmp_path / name)] + args)
    train.train(cfg)
    return checkpoints.load_checkpoint(str(tmp_path / name / "latest.pt"))


@pytest.mark.core
@pytest.mark.usefixtures("no_curves")
def test_resume_after_interruption_continues_exactly(tmp_path, capsys, small_data):
    """Stopped mid-epoch (6 images, 2 per step: step 5 is the middle of the second epoch), in the third epoch
    after the resume, with validation on both sides of the stop (steps 4 and 8); the demo's cosine schedule and
    mirrored crops, whose state a resume must carry too."""
    common = ["--steps", "8", "--val-every", "4", "--schedule", "cosine", "--warmup", "2", "--flip"]
    straight, _ = run_train(common, tmp_path, "straight", small_data)
    run_train(common + ["--stop-at", "5"], tmp_path, "interrupted", small_data)
    resumed, checkpoint = run_train(common + ["--resume"], tmp_path, "interrupted", small_data)
    validated = [row["step"] for row in map(json.loads, open(tmp_path / "interrupted" / "log.jsonl"))
                 if "val_bpp" in row]
    assert validated == [4, 5, 8] and checkpoint["step"] == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_without_the_adapter_ends_without_speaking_of_a_caption(tmp_path, capsys, small_data):
    run_train(["--no-text-adapter", "--steps", "1", "--final-report"], tmp_path, "plain", small_data)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("explain.png: where the bits of val-0.png go")


@pytest.mark.usefixtures("no_curves")
def test_existing_run_is_not_overwritten_without_resume(tmp_path, small_data):
    run_train(["--steps", "1", "--val-root", ""], tmp_path, "run", small_data)            # no held-out images
    before = (tmp_path / "run" / "latest.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        run_train(["--steps", "1"], tmp_path, "run", small_data)
    assert (tmp_path / "run" / "latest.pt").read_bytes() == before


def offline(url, *args, **kwargs):
    raise OSError(f"no network: {url}")


def test_builtin_demo_runs_end_to_end_offline_names_its_stand_ins_once_and_compares_with_jpeg_and_webp(
        tmp_path, capfd, monkeypatch):
    """The demo's photos, the whole end of a run (validation, the JPEG and WebP comparison and its picture rd.png,
    explain.png), with no network
    and an empty download cache: the AlexNet stand-in said once, before training starts, never a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    model, checkpoint = run_train(["--steps", "2", "--final-report"], tmp_path, "demo")      # validated at the end
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err
    assert out.count("STAND-IN: AlexNet") == 1 and out.index("STAND-IN: AlexNet") < out.index("training on")
    assert "JPEG at that bpp" in out and "WebP at that bpp" in out and "coffee" in out and "chelsea" in out
    for name in ("latest.pt", "best.pt", "log.jsonl", "curves.png", "explain.png", "rd.png"):
        assert (tmp_path / "demo" / name).exists(), name
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "log.jsonl")]
    assert {"bpp", "mse", "psnr", "loss", "aux"} <= set(rows[0]) and any("val_bpp" in r for r in rows)
    assert set(rows[-1]["val_images"]) == {"coffee", "chelsea"}                     # rd.png's points
    assert checkpoint["train_config"]["steps"] == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_torchrun_and_gloo_write_one_checkpoint(tmp_path, small_data):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *TINY_RUN,
               *small_data, "--steps", "3", "--val-every", "100", "--out", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["best.pt", "curves.png", "latest.pt", "log.jsonl"]
    model, checkpoint = checkpoints.load_checkpoint(str(tmp_path / "ddp" / "latest.pt"))
    assert checkpoint["step"] == 3


def write_photo(path, size):
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_coco_format_loads_with_every_caption_and_size_filter(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    sizes = {1: (300, 400), 2: (100, 400), 3: (256, 256)}
    for i, (h, w) in sizes.items():
        write_photo(tmp_path / "train2014" / f"COCO_{i}.jpg", (h, w))
    meta = {"images": [{"id": i, "file_name": f"COCO_{i}.jpg", "height": h, "width": w}
                       for i, (h, w) in sizes.items()],
            "annotations": [{"id": 7, "image_id": 1, "caption": "a dog"},
                            {"id": 9, "image_id": 1, "caption": "a brown dog "},
                            {"id": 8, "image_id": 2, "caption": "too small"},
                            {"id": 5, "image_id": 3, "caption": "a square"}]}
    (tmp_path / "annotations" / "captions_train2014.json").write_text(json.dumps(meta))
    items = data.coco_items(str(tmp_path), 256)
    assert sorted((os.path.basename(p), c) for p, c in items) == [
        ("COCO_1.jpg", ["a dog", "a brown dog"]), ("COCO_3.jpg", ["a square"])]
    crop, caption = data.CropDataset(items, 256)[(0, 123)]
    assert crop.shape == (3, 256, 256) and caption in ("a dog", "a brown dog")


@pytest.mark.parametrize("style", ["json", "jsonl"])
def test_folder_format_skips_and_counts_bad_images(tmp_path, capsys, style):
    write_photo(tmp_path / "good.png", (80, 90))
    write_photo(tmp_path / "small.png", (30, 90))
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    captions = {"good.png": ["a", "b"], "small.png": "c", "broken.jpg": "d", "absent.png": "e"}
    if style == "json":
        (tmp_path / "captions.json").write_text(json.dumps(captions))
    else:
        (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file": k, "caption": v})
                                                           for k, v in captions.items()))
    items = data.folder_items(str(tmp_path), str(tmp_path / f"captions.{style}"), 64)
    assert [(os.path.basename(p), c) for p, c in items] == [("good.png", ["a", "b"])]
    out = capsys.readouterr().out
    assert "1 captions naming no file" in out and "1 unreadable" in out and "1 smaller than 64" in out


def test_missing_caption_file_or_folder_stops_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="caption file not found"):
        data.folder_items(str(tmp_path), str(tmp_path / "nope.json"), 64)
    with pytest.raises(SystemExit, match="image folder not found"):
        data.folder_items(str(tmp_path / "nope"), str(tmp_path / "nope.json"), 64)
    with pytest.raises(SystemExit, match="no annotations"):
        data.coco_items(str(tmp_path), 256)


def test_missing_pretrained_weights_stop_the_run_unless_allowed(tmp_path):
    cfg = train.parse_args(["--data", "folder", "--N", "16", "--M", "24", "--out", str(tmp_path / "x")])
    assert not cfg.allow_missing_weights
    with pytest.raises(SystemExit, match="--allow-missing-weights"):
        training.build_towers(cfg, print)


def test_batches_give_each_rank_its_own_share_and_restart_where_they_left_off():
    full = data.batches(10, 2, 0, 1, seed=5, start_step=0)
    first_six = [next(full) for _ in range(6)]
    restarted = data.batches(10, 2, 0, 1, seed=5, start_step=4)
    assert [next(restarted) for _ in range(2)] == first_six[4:]
    rank0, rank1 = next(data.batches(10, 2, 0, 2, 5, 0)), next(data.batches(10, 2, 1, 2, 5, 0))
    assert not {i for i, _ in rank0} & {i for i, _ in rank1}


@pytest.mark.usefixtures("no_curves")
def test_training_starts_from_a_released_checkpoint_with_the_elic_backbone(tmp_path, capsys, monkeypatch,
                                                                           small_data):
    """A file in the released layout at toy widths (test_elic.SMALL: train.py has no flag for ELIC's slices, so
    the config it builds takes them here); every one of its tensors starts the run."""
    from test_elic import SMALL, fake_release, reference_shapes, released_config
    path = str(tmp_path / "lambda_0.004.pth.tar")
    state = fake_release(path, reference_shapes(**SMALL))
    monkeypatch.setattr(elic, "OFFICIAL", released_config(state))
    monkeypatch.setattr(taco, "TacoConfig", functools.partial(taco.TacoConfig, slices=SMALL["slices"]))
    model, checkpoint = run_train(["--backbone", "elic", "--N", str(SMALL["N"]), "--M", str(SMALL["M"]),
                                   "--init-from", path, "--steps", "1", "--val-every", "100", "--batch-size", "1",
                                   "--lr", "0", "--val-root", ""], tmp_path, "finetune", small_data)
    weights = model.state_dict()
    assert f"starting from {path}: {len(weights)} tensors from" in capsys.readouterr().out
    assert model.config.backbone == "elic" and model.config.slices == SMALL["slices"] and checkpoint["step"] == 1
    for key in ("g_a.analysis_transform.8.gamma", "channel_context.4.fushion.4.bias", "h_s.increase.4.weight"):
        assert torch.equal(weights[key], state["module." + key]), key                 # lr 0: still the file's


def test_the_cosine_schedule_warms_up_holds_then_decays_to_2_percent():
    factors = [train.cosine(step, steps=100, warmup=10) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])        # linear warm-up
    assert factors[10:31] == [1.0] * 21                                              # held to 30% of the run
    assert factors[65] == pytest.approx(0.02 + 0.98 * (1 + np.cos(np.pi * 35 / 70)) / 2)   # half-way down: 0.51
    assert factors[99] == pytest.approx(0.02, abs=1e-3) and all(np.diff(factors[30:]) <= 0)


def test_a_flipped_crop_is_the_same_crop_mirrored(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    items = [(str(tmp_path / "a.png"), ["a"])]
    plain, flipping = data.CropDataset(items, 32), data.CropDataset(items, 32, flip=True)
    mirrored = [torch.equal(flipping[(0, s)][0], plain[(0, s)][0].flip(-1)) for s in range(40)]
    same = [torch.equal(flipping[(0, s)][0], plain[(0, s)][0]) for s in range(40)]
    assert all(m or s for m, s in zip(mirrored, same)) and 10 < sum(mirrored) < 30


def test_backbone_elic_alone_is_the_papers_model_with_the_references_parameter_count():
    cfg = train.parse_args(["--backbone", "elic", "--data", "coco", "--root", "R"])
    model = checkpoints.build_model(train.model_config(cfg, "random", 512))
    assert (cfg.N, cfg.M) == (192, 320)
    assert sum(p.numel() for p in model.parameters()) == 38_579_275            # effl-lab/TACO's, adapter included
    assert (train.parse_args(["--backbone", "elic", "--N", "8", "--M", "320"]).N, train.parse_args([]).N) == (8, 64)


def test_clip_grad_0_turns_clipping_off_and_the_weights_still_change(towers):
    encoder, _, _ = towers
    model = tiny_model(encoder).train()
    cfg = train.TrainConfig(steps=10, lr=1e-3, clip_grad=0)
    optimizers = train.make_optimizers(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = photo_batch(2)
    loss, _ = train.JointLoss(0.01, 0, 0)(model(x, encoder(["a", "b"])[:2]), x)
    train.optimization_step(model, optimizers, loss, cfg.clip_grad, world=1)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("g_s") for n in changed) and any(n.startswith("g_a") for n in changed)


def write_coco(root, split, n=2):
    (root / split).mkdir()
    (root / "annotations").mkdir(exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 300, "height": 300} for i in range(n)]
    captions = [{"id": 5 * i + j, "image_id": i, "caption": f"caption {i}.{j}"} for i in range(n) for j in range(5)]
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                            "annotations": captions}))


def test_coco_split_is_train2014_unless_asked_and_another_warns_once_of_the_val2014_overlap(tmp_path, capsys):
    write_coco(tmp_path, "train2017")
    with pytest.raises(SystemExit, match="captions_train2014.json"):         # never falls back to train2017
        training.training_data(train.parse_args(["--data", "coco", "--root", str(tmp_path)]))
    items, _ = training.training_data(train.parse_args(["--data", "coco", "--root", str(tmp_path),
                                                        "--coco-split", "train2017"]))
    assert {os.path.dirname(p) for p, _ in items} == {str(tmp_path / "train2017")}
    assert capsys.readouterr().err.count("overlaps val2014") == 1
    write_coco(tmp_path, "train2014", n=3)
    items, _ = training.training_data(train.parse_args(["--data", "coco", "--root", str(tmp_path)]))
    assert len(items) == 15 and "overlaps" not in capsys.readouterr().err


def test_an_epoch_is_a_pass_over_image_caption_pairs_as_in_the_reference(tmp_path):
    write_coco(tmp_path, "train2014", n=3)
    captions = [f"caption {i}.{j}" for i in range(3) for j in range(5)]
    cfg = train.parse_args(["--data", "coco", "--root", str(tmp_path), "--batch-size", "3", "--epochs", "2"])
    items, _ = training.training_data(cfg)
    assert sorted(c for _, (c,) in items) == captions                                  # 15 pairs, not 3 images
    assert 2 * data.steps_per_epoch(len(items), cfg.batch_size) == 10
