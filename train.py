"""Data -> weights: train TACO with its joint image-text loss (Lee et al., ICML 2024), on a laptop, one
GPU or several.

    python train.py                                   # built-in demo: scikit-image photos, a few CPU minutes
    python train.py --data coco --root /data/coco     # the GDN hyperprior on MS-COCO captions
    torchrun --nproc_per_node 4 train.py --backbone elic --data coco --root /data/coco --lmbda 0.004 \
        --val-root /data/kodak --val-captions kodak_ofa.json      # the paper's model and recipe (docs/training.md)

    loss = lambda * 255^2 * MSE(x_hat, x) + bpp + k_P * LPIPS(x_hat, x) + k_J * J(x_hat, x, caption)
    J    = InfoNCE(CLIP text t, CLIP image e_hat of x_hat) + 40 * ||e_hat - e||_2
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
import taco
from machinery import captioner, checkpoints, clip_text, devices, files, metrics, training


def option(default, help):
    """A TrainConfig field and its --flag's help, in one place."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = option("demo", "demo (built-in photos), coco (--root), or folder (--root + --captions)")
    root: str = option("", "coco: folder with train2014/ and annotations/; folder: the images")
    coco_split: str = option("train2014", "coco: the training split (train2017 holds most of val2014, the images "
                                          "that COCO-30k evaluates: a warning says so)")
    captions: str = option("", "folder data: JSON {file: caption(s)} or JSONL {\"file\", \"caption(s)\"}, or "
                               "'auto': every image captioned once by --captioner (kept in --out)")
    captioner_pretrained: str = option(captioner.DEFAULT_PRETRAINED, "for --captions auto: the captioner's "
                                       "weights (open_clip tag, local file, or 'random')")
    captioner: str = option(captioner.DEFAULT_MODEL, "for --captions auto: the open_clip CoCa model that writes "
                                                     "them, or local-dir:<folder>")     # (after: it hides the module)
    val_root: str = option("", "held-out images (e.g. Kodak) for real-bitstream validation")
    val_captions: str = option("", "captions of the held-out images (JSON or JSONL)")
    crop: int = option(256, "random crop size for training")
    flip: bool = option(False, "mirror half of the crops left to right (the reference does not)")
    # model (TacoConfig)
    backbone: str = option("hyperprior", "hyperprior (GDN mean-scale) or elic (the paper's model, at N=192, "
                                         "M=320 unless --N / --M are given)")
    init_from: str = option("", "start from these weights: ours, a released lambda_*.pth.tar, or CompressAI's "
                                "mbt2018-mean (a new text adapter starts fresh)")
    N: int = option(128, "transform channels")
    M: int = option(192, "latent channels")
    text_adapter: bool = option(True, "CLIP text adapter in g_a")
    clip_model: str = option("ViT-B-32-quickgelu", "open_clip model name (OpenAI's ViT-B/32 needs the -quickgelu "
                                                   "variant), or local-dir:<folder> with an open_clip_config.json")
    clip_pretrained: str = option("openai", "open_clip tag, local weights file, or 'random'")
    mask_padding: bool = option(False, "mask padding tokens in the adapter's attention")
    # loss
    lmbda: float = option(0.004, "rate-distortion trade-off lambda (released: 0.0008, 0.0016, 0.004, 0.009, "
                                 "0.015)")
    k_p: float = option(3.5, "LPIPS weight k_P (reference README; its parser default was 1.0)")
    k_j: float = option(0.0025, "joint image-text weight k_J (reference README; its parser default 0.005)")
    lpips_input: str = option("reference", "reference ([0,1] fed to LPIPS, as the paper) or standard ([-1,1])")
    alexnet_weights: str = option("", "local torchvision AlexNet weights file for LPIPS")
    allow_missing_weights: bool = option(False, "train without LPIPS / J when their weights cannot be loaded")
    # optimization (reference: 50 epochs at batch 8 per GPU, lr x0.1 at epochs 45 and 48)
    epochs: int = option(50, "passes over the (image, caption) pairs (if no --steps)")
    steps: int = option(0, "total optimizer steps (0: from --epochs)")
    batch_size: int = option(8, "images per step and per process")
    lr: float = option(1e-4, "Adam learning rate of the codec")
    aux_lr: float = option(1e-3, "Adam learning rate of the factorized prior's quantiles")
    clip_grad: float = option(1.0, "gradient norm clip (0 or less: no clipping, as the reference)")
    schedule: str = option("steps", "learning rate: steps (the reference's: x0.1 at 90%% and 96%% of the run) or "
                                    "cosine (a warm-up, lr held to 30%%, then a cosine decay to 2%% of it)")
    warmup: int = option(0, "cosine: steps of linear warm-up from 0")
    seed: int = option(100, "seed of weights, data order, crops and noise")
    # machinery
    out: str = option("runs/taco", "folder for checkpoints, log.jsonl, curves.png and explain.png")
    val_every: int = option(5000, "validate with real bitstreams (and checkpoint) every this many steps")
    log_every: int = option(50, "steps between log.jsonl rows")
    workers: int = option(4, "data loader processes")
    bf16: bool = option(False, "bf16 autocast on GPU (default: fp32, TF32 in cuDNN convolutions only, PyTorch's "
                               "defaults as the reference ran; coding always runs in plain fp32)")
    channels_last: bool = option(True, "channels-last memory format on GPU")
    compile: bool = option(False, "torch.compile the model")
    resume: bool = option(False, "continue the run in --out from latest.pt")
    stop_at: int = option(0, "stop at this step with a checkpoint (e.g. a job time limit); continue with --resume")
    final_report: bool = option(True, "at the end of a run with held-out images: the JPEG comparison (a quality "
                                      "sweep per image) and explain.png (--no-final-report skips both)")


# `python train.py` with no --data: a run that does real work in a few CPU minutes, offline. Chosen on photos it
# neither trains on nor reports (docs/training.md, "The demo's recipe"): a low rate, where JPEG is weakest; small
# batches, which learn more per CPU-second here than large ones; lr held, then a long cosine decay; mirrored crops.
DEMO = dict(data="demo", crop=128, flip=True, N=64, M=96, steps=3100, batch_size=4, lr=1e-3, schedule="cosine",
            warmup=100, lmbda=0.0035, val_every=400, log_every=20, workers=0, out="runs/demo",
            allow_missing_weights=True)

# --backbone elic: the paper's widths (its slices [16, 16, 32, 64, 192] add up to M = 320).
PAPER_ELIC = dict(N=192, M=320)

# ----------------------------------------------------------------------------------------------------------
# The joint loss
# ----------------------------------------------------------------------------------------------------------
class JointLoss(nn.Module):
    """lambda*255^2*MSE + bpp + k_P*LPIPS + k_J*(InfoNCE(t, e_hat) + 40*||e_hat - e||_2), the norm taken once
    over the whole batch (Frobenius, as the reference's torch.norm), not per image. A term whose network is None
    is skipped (and reported as absent). The towers are frozen."""

    def __init__(self, lmbda, k_p, k_j, lpips=None, clip_visual=None):
        super().__init__()
        self.lmbda, self.k_p, self.k_j = lmbda, k_p, k_j
        self.lpips, self.clip_visual = lpips, clip_visual
        for tower in (lpips, clip_visual):
            if tower is not None:
                tower.requires_grad_(False).eval()

    def joint_term(self, x_hat, x, text_embedding):
        e_hat = F.normalize(self.clip_visual(metrics.clip_preprocess(x_hat)), dim=-1)    # (B, E)
        with torch.no_grad():
            e = F.normalize(self.clip_visual(metrics.clip_preprocess(x)), dim=-1)
        t = F.normalize(text_embedding, dim=-1)
        logits = 1 / 0.07 * t @ e_hat.T                                          # (B, B), pairs on the diagonal
        labels = torch.arange(len(x), device=x.device)
        info_nce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return info_nce + 40 * torch.linalg.norm(e_hat - e)                     # one norm over the batch (B, E)

    def terms(self, text_embedding=True):
        """Names of the terms this loss computes (with caption embeddings when `text_embedding`)."""
        return (["rate", "MSE"] + (["LPIPS"] if self.lpips is not None else [])
                + (["joint image-text"] if self.clip_visual is not None and text_embedding else []))

    def forward(self, out, x, text_embedding=None):
        B, _, H, W = x.shape
        x_hat = out["x_hat"].float()
        bits = sum(-torch.log2(p).sum() for p in out["likelihoods"].values())   # -sum log2 p over y and z
        terms = {"bpp": bits / (B * H * W), "mse": F.mse_loss(x_hat, x)}
        loss = terms["bpp"] + self.lmbda * 255 ** 2 * terms["mse"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(x_hat, x).mean()
            loss = loss + self.k_p * terms["lpips"]
        if self.clip_visual is not None and text_embedding is not None:
            terms["joint"] = self.joint_term(x_hat, x, text_embedding)
            loss = loss + self.k_j * terms["joint"]
        terms["psnr"] = metrics.psnr_of_mse(terms["mse"].detach())
        return loss, terms


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def make_optimizers(model, cfg):
    """Adam for the codec, a separate Adam for the factorized prior's quantiles (the reference's aux optimizer).
    The codec's lr: x 0.1 at 90% and 96% of the steps (the reference's epochs 45 and 48 of 50), or --schedule
    cosine (the demo's: a short run gains most from a long, smooth decay)."""
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if not n.endswith("quantiles")], cfg.lr)
    aux_optimizer = torch.optim.Adam([model.entropy_bottleneck.quantiles], cfg.aux_lr)
    if cfg.schedule == "steps":
        milestones = [int(0.9 * cfg.steps), int(0.96 * cfg.steps)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(cosine, steps=cfg.steps,
                                                                                   warmup=cfg.warmup))
    return optimizer, aux_optimizer, scheduler


def cosine(step, steps, warmup, hold=0.3, floor=0.02):
    """The lr's factor at `step`: a linear warm-up, 1 until `hold` of the run, then half a cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - hold * steps, 0) / ((1 - hold) * steps), 1)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def model_config(cfg, text_pretrained, text_dim):
    """The architecture a run trains (saved in its checkpoints)."""
    return taco.TacoConfig(N=cfg.N, M=cfg.M, text_adapter=cfg.text_adapter, clip_model=cfg.clip_model,
                           clip_pretrained=text_pretrained, mask_padding=cfg.mask_padding, text_dim=text_dim,
                           backbone=cfg.backbone)


def build_model(cfg, config, device, say):
    """The codec on its device: built, initialised (--init-from), moved, then -- nanoGPT's order -- its
    optimizers built and, when resuming, loaded, so that their state lands on the parameters' device."""
    torch.manual_seed(cfg.seed)
    model = checkpoints.build_model(config)
    if cfg.init_from and not cfg.resume:
        training.start_from(model, cfg.init_from, say)      # e.g. a pretrained hyperprior: the adapter starts fresh
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(model, cfg)
    step, best = 0, float("inf")
    if cfg.resume:
        latest = os.path.join(cfg.out, "latest.pt")
        checkpoint = torch.load(latest, map_location="cpu", weights_only=True)     # copied onto the device below
        training.check_resumable(checkpoint, config, cfg, latest)
        checkpoints.load_weights(model, checkpoint["state_dict"], latest)     # a missing key is named
        for optimizer, key in zip(optimizers, ("optimizer", "aux_optimizer", "scheduler")):
            optimizer.load_state_dict(checkpoint[key])
        step, best = checkpoint["step"], checkpoint["best"]
        say(f"resuming {latest} at step {step}")
    return model, optimizers, step, best


def checkpoint_and_validate(model, cfg, step, best, optimizers, val_items, lpips, log, progress):
    """Rank 0: validate on real bitstreams (keeping best.pt), then write latest.pt. -> best, per-image rows."""
    rows = None
    if val_items:
        mean, rows = training.validate(model, val_items, lpips)
        training.log_validation(step, mean, rows, val_items, log, progress)     # log.jsonl row, one line shown
        if training.rd_score(mean, cfg) < best:
            best = training.rd_score(mean, cfg)
            checkpoints.save_checkpoint(os.path.join(cfg.out, "best.pt"), model, step=step, val=mean,
                                        train_config=dataclasses.asdict(cfg))
    else:
        model.update()
    optimizer, aux_optimizer, scheduler = optimizers
    checkpoints.save_checkpoint(os.path.join(cfg.out, "latest.pt"), model, step=step, best=best,
                                train_config=dataclasses.asdict(cfg), optimizer=optimizer.state_dict(),
                                aux_optimizer=aux_optimizer.state_dict(), scheduler=scheduler.state_dict())
    return best, rows


def train(cfg):
    # setup: devices, towers, data, model and optimizers (in that order)
    rank, world, device = devices.join_ranks("cuda" if torch.cuda.is_available() else "cpu")
    say = print if rank == 0 else (lambda *a, **k: None)
    training.check_data_flags(cfg)                 # before any weights are looked for
    training.prepare_out(cfg, rank)
    on_gpu = device.type == "cuda"
    # PyTorch's defaults, which the reference never changed: TF32 convolutions, full fp32 matmuls (coding turns
    # TF32 off everywhere, machinery/devices.py)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    encoder, clip_visual, lpips, text_pretrained = training.build_towers(cfg, say)
    train_items, val_items = training.training_data(cfg, rank, world, device)
    config = model_config(cfg, text_pretrained, encoder.width if encoder else 512)
    if not cfg.steps:
        cfg.steps = cfg.epochs * data.steps_per_epoch(len(train_items), cfg.batch_size * world)
    model, optimizers, step, best = build_model(cfg, config, device, say)
    if encoder is not None:
        encoder.to(device)
        if cfg.text_adapter:
            model.attach_text_encoder(encoder)
    criterion = JointLoss(cfg.lmbda, cfg.k_p, cfg.k_j, lpips, clip_visual).to(device)
    net = training.wrap(model, cfg, device, world)      # DDP across processes, then torch.compile
    loader = DataLoader(data.CropDataset(train_items, cfg.crop, cfg.flip), collate_fn=data.collate,
                        batch_sampler=data.batches(len(train_items), cfg.batch_size, rank, world, cfg.seed, step),
                        num_workers=cfg.workers, pin_memory=on_gpu, persistent_workers=False)
    precision = "bf16 autocast" if on_gpu and cfg.bf16 else "fp32" + (" (TF32 convolutions)" if on_gpu else "")
    say(f"training on {device} x{world} in {precision}: {len(train_items)} images, {len(val_items)} held out, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M codec parameters, "
        f"loss terms: {', '.join(criterion.terms(text_embedding=encoder is not None))}")
    from tqdm import tqdm
    progress = tqdm(total=cfg.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    if rank == 0:                                  # a row that a kill cut off ends where the resumed run goes on
        files.cut_unfinished_line(os.path.join(cfg.out, "log.jsonl"))
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    model.train()
    started, images_seen, val_rows = time.perf_counter(), 0, None

    # the loop: one batch -> loss -> two optimizer steps -> log -> (validate and) checkpoint
    for x, captions in loader:
        if step >= cfg.steps:
            break
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)    # quantization noise, resumable
        x = x.to(device, non_blocking=True)
        if on_gpu and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu and cfg.bf16):
            features, padding, embedding = encoder(captions) if encoder is not None else (None, None, None)
            out = net(x, (features, padding) if cfg.text_adapter else None)
            loss, terms = criterion(out, x, embedding)
        aux_loss = optimization_step(model, optimizers, loss, cfg.clip_grad, world)
        step += 1
        images_seen += len(x) * world
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}", bpp=f"{terms['bpp'].item():.3f}",
                             psnr=f"{terms['psnr'].item():.2f}")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            row = {"step": step, "loss": loss.item(), "aux": aux_loss.item(), "lr": optimizers[2].get_last_lr()[0],
                   "images_per_s": images_seen / (time.perf_counter() - started),
                   **{k: v.item() for k, v in terms.items()}}
            log.write(json.dumps(row) + "\n")
            log.flush()
        if step % cfg.val_every == 0 or step in (cfg.steps, cfg.stop_at):
            if rank == 0:
                best, val_rows = checkpoint_and_validate(model, cfg, step, best, optimizers, val_items, lpips,
                                                         log, progress)
            devices.barrier()                      # the other ranks wait for rank 0's checkpoint
        if step == cfg.stop_at:
            break
    progress.close()
    if rank == 0:
        log.close()
        training.finish(model, cfg, val_items, val_rows if step == cfg.steps else None, lpips)   # plots, report
    if world > 1:
        dist.destroy_process_group()


def optimization_step(model, optimizers, loss, clip_grad, world):
    """The codec's step (gradient clipped) and the quantiles' own step on the aux loss; -> the aux loss."""
    optimizer, aux_optimizer, scheduler = optimizers
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:                               # 0 turns clipping off, as in the reference
        nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], clip_grad)
    optimizer.step()
    scheduler.step()
    aux_loss = model.entropy_bottleneck.aux_loss()
    aux_optimizer.zero_grad(set_to_none=True)
    aux_loss.backward()
    if world > 1:                                   # the quantiles are outside DDP: average their gradient here
        quantiles = model.entropy_bottleneck.quantiles
        dist.all_reduce(quantiles.grad)
        quantiles.grad /= world
    aux_optimizer.step()
    return aux_loss


def parse_args(argv=None):
    """Every TrainConfig field is a flag; without --data, the DEMO preset applies first. --backbone elic is the
    paper's model: N=192, M=320 (and its slices) unless --N / --M say otherwise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for setting in dataclasses.fields(TrainConfig):
        flag = "--" + setting.name.replace("_", "-")
        text = setting.metadata["help"] + f" (default {setting.default!r}" + \
            (f"; demo {DEMO[setting.name]!r})" if setting.name in DEMO else ")")
        if isinstance(setting.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=type(setting.default), default=None, help=text)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = DEMO if given.get("data", "demo") == "demo" else {}
    if given.get("backbone") == "elic":
        preset = {**{k: v for k, v in preset.items() if k not in ("N", "M")}, **PAPER_ELIC}
    cfg = TrainConfig(**{**preset, **given})
    if cfg.schedule not in ("steps", "cosine"):
        parser.error(f"--schedule {cfg.schedule!r}: steps or cosine")
    return cfg


if __name__ == "__main__":
    cfg = parse_args()
    try:
        train(cfg)
    except (checkpoints.CheckpointError, clip_text.WeightsUnavailable, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(training.interrupted(cfg.out))                     # one line: where --resume would continue
