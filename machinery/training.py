"""What a training run needs beyond the loop (train.py): the frozen towers with their offline stand-ins, the
training data, resume checks, DDP, validation on real bitstreams, the curves and the end-of-run report."""
import dataclasses
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import data
from machinery import baselines, captioner, checkpoints, clip_text, explain, files, metrics
from machinery.images import read_pixels


def build_towers(cfg, say):
    """The frozen pretrained networks: CLIP (text for the adapter, image for J) and LPIPS. What cannot load
    stops the run, or -- when allowed -- is replaced by a stand-in or dropped, and said so up front."""
    clip, text_pretrained = None, cfg.clip_pretrained
    if cfg.text_adapter or cfg.k_j > 0:
        try:
            clip = clip_text.load_clip(cfg.clip_model, cfg.clip_pretrained)
        except clip_text.WeightsUnavailable as error:
            if not cfg.allow_missing_weights:
                raise SystemExit(f"error: {error}; or pass --allow-missing-weights to train without it")
            adapter = "the adapter reads a randomly initialised text tower (captions still differ, but carry no " \
                "learned meaning) and " if cfg.text_adapter else ""
            say(f"STAND-IN: CLIP {cfg.clip_model} weights unavailable; {adapter}the joint image-text term J is dropped")
            clip, text_pretrained = clip_text.load_clip(cfg.clip_model, "random"), "random"
    clip_visual = clip.visual if clip is not None and text_pretrained != "random" and cfg.k_j > 0 else None
    encoder = None               # captions are read for the adapter, or for J's text embeddings, or both
    if cfg.text_adapter or clip_visual is not None:
        encoder = clip_text.TextEncoder(cfg.clip_model, text_pretrained, clip=clip)
    lpips = None
    if cfg.k_p > 0:
        try:
            lpips = metrics.load_lpips(cfg.lpips_input, cfg.alexnet_weights or None)
        except clip_text.WeightsUnavailable as error:
            if not cfg.allow_missing_weights:
                raise SystemExit(f"error: {error}; or pass --allow-missing-weights to train without it")
            say("STAND-IN: AlexNet weights for LPIPS unavailable; the LPIPS term is dropped (an MSE-only "
                "codec plus rate: expect higher PSNR per bit and worse LPIPS than TACO)")
    return encoder, clip_visual, lpips, text_pretrained


@torch.no_grad()
def validate(model, items, lpips=None):
    """Real compress/decompress of every held-out image -> per-image and mean bpp, PSNR, LPIPS."""
    model.eval().update()
    rows = []
    for source, captions in items:
        x = data.load_rgb(source)[None]                                         # (1, 3, H, W)
        H, W = x.shape[-2:]
        coded = model.compress(x, captions[0])
        x_hat = model.decompress(coded).cpu()
        row = {"bpp": 8 * len(coded) / (H * W), "psnr": float(metrics.psnr(x_hat, x))}
        if lpips is not None:
            device = next(lpips.parameters()).device
            row["lpips"] = float(lpips(x_hat.to(device), x.to(device)))
        rows.append(row)
    model.train()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return mean, rows


def log_validation(step, mean, rows, items, log, progress):
    """A validation's row in log.jsonl (the mean and each image's, for rd.png) and its line under the progress bar."""
    per_image = {source.split(":")[-1]: row for (source, _), row in zip(items, rows)}
    log.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in mean.items()}, "val_images": per_image}) + "\n")
    progress.write(f"step {step}: held-out real bpp {mean['bpp']:.3f}, PSNR {mean['psnr']:.2f} dB"
                   + (f", LPIPS {mean['lpips']:.4f}" if "lpips" in mean else ""))


def interrupted(out):
    """What Ctrl-C leaves, in one line: the step latest.pt holds, and how to go on."""
    latest = os.path.join(out, "latest.pt")
    where = f"{latest} holds step {torch.load(latest, weights_only=True, mmap=True)['step']}" \
        if os.path.isfile(latest) else "no checkpoint was written yet"
    return f"interrupted: {where}; the same command with --resume continues from it"


def rd_score(mean, cfg):
    """Validation objective on real bits, to keep the best checkpoint."""
    return mean["bpp"] + cfg.lmbda * 255 ** 2 * 10 ** (-mean["psnr"] / 10) + cfg.k_p * mean.get("lpips", 0)


BASELINES = {"JPEG": "JPEG", "WEBP": "WebP"}                    # Pillow's format name: the name people know


def compare_with_baselines(items, rows):
    """The demo's last lesson, a line per held-out photo: its real bpp and PSNR beside JPEG's and WebP's PSNR at
    that bpp, each interpolated over the codec's Pillow quality sweep and never extrapolated. -> the curves."""
    curves = {source: {codec: baselines.baseline_curve(data.load_rgb(source)[None], codec) for codec in BASELINES}
              for source, _ in items}
    print(f"{'held-out image':16s} {'bpp':>6s} {'PSNR':>9s}"
          + "".join(f" {name + ' at that bpp':>17s}" for name in BASELINES.values()))
    for (source, _), row in zip(items, rows):
        line = f"{source.split(':')[-1][:16]:16s} {row['bpp']:6.3f} {row['psnr']:6.2f} dB"
        for curve in curves[source].values():
            at = metrics.psnr_at_bpp(curve, row["bpp"])
            outside = "below its range" if row["bpp"] < curve[0][0] else "above its range"
            line += f" {at:14.2f} dB" if at is not None else f" {outside:>17s}"
        print(line)
        smallest = curves[source]["JPEG"][0]
        if row["bpp"] < smallest[0]:
            verdict = "smaller and better than" if row["psnr"] > smallest[1] else "smaller but worse than"
            print(f"{'':16s} {verdict} JPEG's smallest file ({smallest[0]:.3f} bpp, {smallest[1]:.2f} dB)")
    return curves


def plot_demo_rd(model, items, curves, log_path, png_path):
    """rd.png: for each held-out photo, JPEG's and WebP's rate-distortion curves with the learned codec's real
    point at every validation step (it crosses JPEG's curve as training goes on), and a crop of the photo as
    decoded beside JPEG's at the quality whose bpp is nearest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r for r in files.read_jsonl(log_path) if "val_images" in r]
    figure, axes = plt.subplots(len(items), 2, figsize=(13, 4.6 * len(items)), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 1.5]})
    for (source, captions), (rd, crops) in zip(items, axes):
        name = source.split(":")[-1]
        for codec, curve in curves[source].items():
            rd.plot(*zip(*curve), ".-", label=f"{BASELINES[codec]} (Pillow, quality 5-95)",
                    color="C0" if codec == "JPEG" else "C2")
        points = [(r["step"], r["val_images"][name]) for r in steps if name in r["val_images"]]
        if points:
            rd.plot([p["bpp"] for _, p in points], [p["psnr"] for _, p in points], "-", color="C3", alpha=0.4)
            marks = rd.scatter([p["bpp"] for _, p in points], [p["psnr"] for _, p in points], c=[s for s, _ in points],
                               cmap="autumn_r", zorder=3, edgecolors="k", label="learned codec, real file")
            figure.colorbar(marks, ax=rd, label="training step")
        learned = points[-1][1] if points else None
        last = max(learned["bpp"] if learned else 0, 0.1)
        rd.set_xlim(0, 2.5 * last)
        psnrs = [p for b, p in curves[source]["WEBP"] if b <= 2.5 * last] + [p["psnr"] for _, p in points]
        rd.set_ylim(min(psnrs + [curves[source]["JPEG"][0][1]]) - 1, max(psnrs) + 1)
        rd.set_xlabel("bits per pixel (real files)"), rd.set_ylabel("PSNR (dB)"), rd.grid(alpha=0.3)
        rd.set_title(f"{name}: held out, never trained on"), rd.legend(loc="lower right", fontsize=8)
        x = data.load_rgb(source)[None]
        coded = model.eval().compress(x, captions[0])
        x_hat, bpp = model.decompress(coded), 8 * len(coded) / (x.shape[-2] * x.shape[-1])      # (1, 3, H, W)
        quality, jpeg_bpp, jpeg, _, _ = min(baselines.pillow_sweep(x, "JPEG"), key=lambda q: abs(q[1] - bpp))
        size = min(x.shape[-2:]) // 2
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        windows = [im[0, :, top:top + size, left:left + size].permute(1, 2, 0).clamp(0, 1).numpy()
                   for im in (x, x_hat, jpeg)]                                  # original | learned | JPEG
        crops.imshow(np.concatenate(windows, axis=1))
        crops.set_title(f"original | learned codec {bpp:.3f} bpp, {float(metrics.psnr(x_hat, x)):.2f} dB | "
                        f"JPEG q{quality} {jpeg_bpp:.3f} bpp, {float(metrics.psnr(jpeg, x)):.2f} dB", fontsize=9)
        crops.axis("off")
    figure.tight_layout()
    figure.savefig(png_path, dpi=90)
    plt.close(figure)


def start_from(model, path, say):
    """--init-from: every weight of the checkpoint at `path` (ours, a released TACO file or CompressAI's
    mbt2018-mean) into `model`; a text adapter the checkpoint lacks keeps the fresh model's initialisation
    (gammas 0). Anything else that differs -- backbone, N, M, an adapter the model lacks -- stops the run."""
    source, _ = checkpoints.load_checkpoint(path)
    c, s = model.config, source.config
    if (s.backbone, s.N, s.M) != (c.backbone, c.N, c.M):
        raise SystemExit(f"error: {path} is a {s.backbone} model with N={s.N}, M={s.M}; pass the same --backbone, "
                         f"--N and --M")
    weights, ours = source.state_dict(), model.state_dict()
    fresh = [k for k in ours if k not in weights]
    if any(k not in ours for k in weights) or not all(k.startswith(("g_a.inject_", "g_a.extract_")) for k in fresh):
        raise SystemExit(f"error: {path} does not fit this model (its text adapter differs: pass --text-adapter "
                         f"or --no-text-adapter as it was trained)")
    model.load_state_dict(weights, strict=False)
    say(f"starting from {path}: {len(weights)} tensors from {path}" +
        (f"; the text adapter initialised ({len(fresh)} tensors, gammas 0)" if fresh else ""))


def check_data_flags(cfg):
    """--data and what it needs, before any weights are looked for: one line naming what is wrong."""
    if cfg.data not in ("demo", "coco", "folder"):
        raise SystemExit(f"error: unknown --data {cfg.data!r} (demo, coco or folder)")
    if cfg.data in ("coco", "folder") and not cfg.root:
        raise SystemExit(f"error: --data {cfg.data} needs --root, the folder of its images")
    if cfg.data == "folder" and not cfg.captions:
        raise SystemExit("error: --data folder needs --captions: a caption file, or 'auto'")
    if cfg.val_root and not cfg.val_captions:
        raise SystemExit("error: --val-root needs --val-captions, the held-out images' caption file")


def training_data(cfg, rank=0, world=1, device="cpu"):
    if cfg.data == "demo":
        return data.demo_items(data.DEMO_PHOTOS), data.demo_items(data.DEMO_HELD_OUT)
    if cfg.data == "coco":
        if cfg.coco_split != "train2014" and rank == 0:
            print(f"warning: COCO {cfg.coco_split} overlaps val2014, whose images the COCO-30k evaluation codes: "
                  f"a model trained on it is tested there on images it has seen", file=sys.stderr)
        train_items = data.coco_items(cfg.root, cfg.crop, cfg.coco_split)
    elif cfg.data == "folder":
        captions = cfg.captions       # 'auto': every image of --root captioned once, each rank its share, logged
        if captions == "auto":        # in --out and reused by a resumed run
            table = captioner.caption_images(cfg.root, data.image_files(cfg.root), read_pixels, cfg.out,
                                             cfg.captioner, cfg.captioner_pretrained, device, rank, world)
            captions = {image: [caption] for image, caption in table.items()}
        train_items = data.folder_items(cfg.root, captions, cfg.crop)
    else:
        raise SystemExit(f"error: unknown --data {cfg.data!r} (demo, coco or folder)")
    val_items = data.folder_items(cfg.val_root, cfg.val_captions, 1) if cfg.val_root else []
    return data.caption_pairs(train_items), val_items


# Settings that shape the optimization: a resumed run must use the ones it was started with.
RESUME_MUST_MATCH = ("data", "root", "crop", "flip", "lmbda", "k_p", "k_j", "lpips_input", "steps", "batch_size",
                     "lr", "aux_lr", "clip_grad", "schedule", "warmup", "seed")


def check_resumable(checkpoint, config, cfg, path):
    """Stop with a message naming the first setting that differs from the interrupted run's."""
    if checkpoint.get("format", 1) != checkpoints.CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} was written in an older checkpoint format; start a new run from it "
                         f"with --init-from {path} instead of --resume")
    if checkpoint["config"] != dataclasses.asdict(config):
        raise SystemExit(f"error: {path} was trained with another model config: {checkpoint['config']}")
    flags = {key: "--" + key.replace("_", "-") for key in RESUME_MUST_MATCH}
    earlier = {flags[key]: value for key, value in checkpoint.get("train_config", {}).items() if key in flags}
    files.check_resumed(earlier, {flags[key]: getattr(cfg, key) for key in flags}, f"{path} was trained")


def prepare_out(cfg, rank):
    """Never overwrite a run; resume only one that exists."""
    latest = os.path.join(cfg.out, "latest.pt")
    try:
        if rank == 0:
            files.refuse_overwrite(cfg.out, cfg.resume, earlier=("latest.pt",), message=f"{cfg.out} already holds "
                                   f"a run; pass --resume to continue it, or choose another --out")
    except FileExistsError as error:
        raise SystemExit(f"error: {error}")
    if cfg.resume and not os.path.exists(latest):
        raise SystemExit(f"error: nothing to resume: {latest} does not exist")
    os.makedirs(cfg.out, exist_ok=True)


def plot_log(log_path, png_path):
    """Training curves (loss terms) and held-out real bpp / PSNR, for a person to look at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = files.read_jsonl(log_path)                     # a row a kill cut off is not plotted
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpp" in r]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("loss", "bpp", "psnr")):
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], label="train batch")
        if val_rows:
            ax.plot([r["step"] for r in val_rows], [r.get(f"val_{key}", np.nan) for r in val_rows], "o-",
                    label="held-out, real bits")
        ax.set_xlabel("step"), ax.set_title(key), ax.legend()
        ax.set_yscale("log" if key == "loss" else "linear")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def wrap(model, cfg, device, world):
    """DDP across processes (the quantiles have their own optimizer and are averaged by hand), then compile."""
    net = model
    if world > 1:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ["entropy_bottleneck.quantiles"])
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    return torch.compile(net) if cfg.compile else net


def finish(model, cfg, val_items, val_rows, lpips):
    """Rank 0, after the loop: the curves; at the end of a run with held-out images (unless --no-final-report),
    the comparison with JPEG and WebP at equal bpp, its picture (rd.png), and where the first one's bits go
    (explain.png)."""
    plot_log(os.path.join(cfg.out, "log.jsonl"), os.path.join(cfg.out, "curves.png"))
    print(f"checkpoints in {cfg.out}/ (latest.pt" + (", best.pt)" if val_items else ")"))
    if val_rows and cfg.final_report:
        curves = compare_with_baselines(val_items, val_rows)
        plot_demo_rd(model, val_items, curves, os.path.join(cfg.out, "log.jsonl"), os.path.join(cfg.out, "rd.png"))
        print(f"{cfg.out}/rd.png: the learned codec's point at each validation step beside JPEG's and WebP's curves")
        source, captions = val_items[0]
        figure = os.path.join(cfg.out, "explain.png")
        explain.explain(model.eval(), data.load_rgb(source)[None], captions[0], figure, lpips)
        name = os.path.basename(source.split(":")[-1])
        print(f"{figure}: where the bits of {name} go" + (" and what its caption changed" if cfg.text_adapter
                                                           else ""))
