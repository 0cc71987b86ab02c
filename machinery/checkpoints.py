"""Checkpoints: ours ({"config", "state_dict", ...}, written atomically) and the reference TACO's released
files (lambda_*.pth.tar: a bare training state, loaded into the ELIC backbone with its coding tables rebuilt).
Every load is strict: a missing, unexpected, misshapen or non-finite tensor is one CheckpointError naming it."""
import dataclasses
import os

import torch

import taco
from entropy import TABLE_BUFFERS
from machinery import elic

CHECKPOINT_FORMAT = 2      # 2: h_s gives (scales, means), as CompressAI and elic.py; 1 gave (means, scales)


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is not ours, or does not fit its own config."""


def save_checkpoint(path, model, **extra):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
               "format": CHECKPOINT_FORMAT, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """-> (TACO in eval mode, the whole checkpoint dict). Ours ({"config", "state_dict", ...}) or a released
    lambda_*.pth.tar of the reference ({"state_dict", optimizer states, epoch})."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "config" not in checkpoint:
        return load_released(path, checkpoint).to(device).eval(), checkpoint
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a TACO checkpoint (no config and state_dict)")
    try:
        model = build_model(taco.TacoConfig(**checkpoint["config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an unknown config: {error}") from error
    state = checkpoint["state_dict"]
    if checkpoint.get("format", 1) == 1 and model.config.backbone == "hyperprior":
        state = dict(state)                     # format 1 put the means first in h_s's output: swap the halves
        for key in ("h_s.4.weight", "h_s.4.bias"):
            state[key] = torch.cat(state[key].chunk(2, dim=0)[::-1])
    load_weights(model, state, path)
    return model.to(device).eval(), checkpoint


def load_released(path, checkpoint):
    """A released TACO file -> ElicTACO. The files are saved from the training model, before any update():
    CompressAI's coding tables are empty and the scale table may be too (the reference builds
    GaussianConditional(None)); either way our update() rebuilds them. Every other key must match exactly, in
    any of CompressAI's naming generations (released_key)."""
    state = {released_key(k): v for k, v in checkpoint["state_dict"].items()}
    state = {k: v for k, v in state.items() if k is not None}
    if state.get("gaussian_conditional.scale_table", torch.ones(1)).numel() == 0:
        del state["gaussian_conditional.scale_table"]                   # never filled: keep our (equal) table
    model = elic.ElicTACO(elic.OFFICIAL)
    load_weights(model, state, path, rebuilt=TABLE_BUFFERS + ("gaussian_conditional.scale_table",))
    return model.update()


def load_weights(model, state, path, rebuilt=()):
    """load_state_dict, strict, with an error that names the first missing, unexpected or misshapen key.
    Keys ending with one of `rebuilt` may be absent: the caller rebuilds them (coding tables, by update())."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(rebuilt)]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (the model needs {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and not k.endswith(TABLE_BUFFERS) and state[k].shape != v.shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            raise CheckpointError(f"{path} does not fit this model: {len(keys)} {problem} key(s), first {keys[0]}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} is damaged: {broken[0]} holds NaN or infinite values")
    model.load_state_dict(state, strict=not rebuilt)          # the keys were checked above


def build_model(config):
    """The codec a config describes: the GDN mean-scale hyperprior (taco.py) or the paper's ELIC (elic.py)."""
    if config.backbone == "elic":
        return elic.ElicTACO(config)
    if config.backbone != "hyperprior":
        raise ValueError(f"unknown backbone {config.backbone!r} (hyperprior or elic)")
    return taco.TACO(config)


# ----------------------------------------------------------------------------------------------------------
# The released checkpoints' names (load_released loads them)
# ----------------------------------------------------------------------------------------------------------
# CompressAI stores its constant bounds as buffers; here they are plain numbers (scale 0.11, likelihood 1e-9).
COMPRESSAI_CONSTANTS = ("entropy_bottleneck.likelihood_lower_bound.bound",
                        "gaussian_conditional.likelihood_lower_bound.bound",
                        "gaussian_conditional.lower_bound_scale.bound", "gaussian_conditional.scale_bound")
# The factorized prior's parameters in every CompressAI generation -> ours (CompressAI <= 1.2.6's own names).
BOTTLENECK_NAMES = {"matrices.": "_matrix", "biases.": "_bias", "factors.": "_factor",      # CompressAI >= 1.2.7
                    "_matrices.": "_matrix", "_biases.": "_bias", "_factors.": "_factor"}  # its zoo's oldest files


def released_key(key):
    """A released file's key -> our key; None for what we do not load (constants, coding tables)."""
    key = key.removeprefix("module.")                                   # saved from DistributedDataParallel
    if key in COMPRESSAI_CONSTANTS or key.endswith(TABLE_BUFFERS):   # tables: rebuilt by update()
        return None
    module, _, name = key.partition(".")
    for old, new in BOTTLENECK_NAMES.items():
        if module == "entropy_bottleneck" and name.startswith(old):
            return f"{module}.{new}{name[len(old):]}"
    return key
