"""Checkpoints: ours ({"config", "state_dict", ...}, written atomically), the reference TACO's released files
(lambda_*.pth.tar: a bare training state, loaded into the ELIC backbone) and CompressAI's mbt2018-mean files (its
MeanScaleHyperprior: our hyperprior without the text adapter, layer for layer), coding tables rebuilt by our
update(). Every load is strict: a missing, unexpected, misshapen or non-finite tensor is one CheckpointError
naming it, and another architecture is refused with what was found."""
import dataclasses
import os

import torch

import taco
from entropy import TABLE_BUFFERS
from machinery import elic, files

CHECKPOINT_FORMAT = 2      # 2: h_s gives (scales, means), as CompressAI and elic.py; 1 gave (means, scales)


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is not ours, or does not fit its own config."""


def save_checkpoint(path, model, **extra):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
               "format": CHECKPOINT_FORMAT, **extra}
    files.write_atomically(path, lambda temporary: torch.save(payload, temporary))


def load_checkpoint(path, device="cpu"):
    """-> (TACO in eval mode, the whole checkpoint dict). Ours ({"config", "state_dict", ...}), a released
    lambda_*.pth.tar of the reference ({"state_dict", optimizer states, epoch}), or CompressAI's mbt2018-mean
    (a zoo file's bare state dict, or examples/train.py's {"state_dict", "optimizer", ...})."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    if isinstance(checkpoint, dict) and "config" not in checkpoint:
        state = checkpoint.get("state_dict", checkpoint)      # CompressAI's examples/train.py wraps it; its zoo not
        keys = [k.removeprefix("module.") for k in state] if isinstance(state, dict) else []
        if any(k.startswith("g_a.analysis_transform.") for k in keys):
            return load_released(path, checkpoint).to(device).eval(), checkpoint
        if any(k.startswith(("g_a.", "entropy_bottleneck.")) for k in keys):
            return load_compressai(path, state).to(device).eval(), checkpoint
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
    GaussianConditional(None)); our update() rebuilds the tables, and the standard scale table is ours whether
    the file's is empty or filled (standard_scale_table). Every other key must match exactly, in any of
    CompressAI's naming generations (released_key)."""
    state = {ours: v for k, v in checkpoint["state_dict"].items() if (ours := released_key(k)) is not None}
    return load_rebuilding_tables(elic.ElicTACO(elic.OFFICIAL), state, path)


def load_rebuilding_tables(model, state, path, rebuilt=()):
    """The tail of loading a file saved by CompressAI's code (the released files, its mbt2018-mean): a standard
    scale table is replaced by ours (the same table, the same bits on every machine), the coding tables and the
    keys `rebuilt` may be absent, and update() rebuilds them."""
    table = state.get("gaussian_conditional.scale_table")
    if table is not None and standard_scale_table(table, model.gaussian_conditional.scale_table):
        del state["gaussian_conditional.scale_table"]
    load_weights(model, state, path, rebuilt=TABLE_BUFFERS + ("gaussian_conditional.scale_table",) + rebuilt)
    return model.update()


def standard_scale_table(table, ours):
    """Is a file's scale table empty (never filled) or the standard one -- the same bounds and number of levels
    as ours, equal to float32 rounding (CompressAI's update() fills it with torch.exp's float32 values, which
    differ from ours by a few units in the last place and from CPU to CPU)? Then the same weights give the same
    model, fingerprint and files whichever form they arrive in. Any other table is data of the file, kept."""
    return table.numel() == 0 or (table.shape == ours.shape and torch.allclose(table.double(), ours.double(),
                                                                             rtol=1e-6, atol=0))


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


# ----------------------------------------------------------------------------------------------------------
# CompressAI's mbt2018-mean (MeanScaleHyperprior), as its zoo and its examples/train.py write it
# ----------------------------------------------------------------------------------------------------------
SUPPORTED = ("this code reads its own checkpoints, the reference TACO's released files and CompressAI's "
             "mbt2018-mean (MeanScaleHyperprior)")


def load_compressai(path, state):
    """CompressAI's MeanScaleHyperprior -> our TACO without a text adapter, N and M read off the shapes. Its
    g_a is one Sequential (conv, GDN, conv, GDN, conv, GDN, conv), ours four stages; its GDN keeps beta and gamma
    reparametrized exactly as our NonNegative does (sqrt(v + 2**-36)), under other names."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    found = compressai_architecture(state)
    if found:
        raise CheckpointError(f"{path} holds CompressAI's {found}; {SUPPORTED}")
    N, M = state["g_a.0.weight"].shape[0], state["g_a.6.weight"].shape[0]
    model = taco.TACO(taco.TacoConfig(N=N, M=M, text_adapter=False))
    mapped = {ours: value for key, value in state.items() if (ours := compressai_key(key)) is not None}
    return load_rebuilding_tables(model, mapped, path, rebuilt=("entropy_bottleneck.target",))


def compressai_architecture(state):
    """None for a MeanScaleHyperprior's keys; else what CompressAI model they are."""
    if any(k.startswith("context_prediction.") for k in state):
        return ("cheng2020 model (residual transforms and a context model)" if "g_a.0.conv1.weight" in state
                else "mbt2018 (a context model over y)")
    if "g_a.0.weight" not in state or "g_a.6.weight" not in state:
        return "model with other transforms than conv + GDN"
    if not any(k.startswith("h_s.") for k in state):
        return "bmshj2018-factorized (no hyperprior)"
    if "h_s.4.weight" in state and state["h_s.4.weight"].shape[0] != 2 * state["g_a.6.weight"].shape[0]:
        return "bmshj2018-hyperprior (its h_s gives scales only, no means)"
    return None


def compressai_key(key):
    """A MeanScaleHyperprior key -> ours; None for constants, coding tables and GDN's reparametrization buffers."""
    key = released_key(key)
    if key is None or "_reparam." in key:
        return None
    parts = key.split(".")
    if parts[0] in ("g_a", "g_s") and len(parts) == 3 and parts[2] in ("beta", "gamma"):
        parts.append("param")                                 # g_a.1.beta -> g_a.1.beta.param (NonNegative)
    if parts[0] == "g_a" and parts[1].isdigit():
        i = int(parts[1])                                     # conv at 0, 2, 4, 6; GDN at 1, 3, 5
        parts[1:2] = ["stages", str(i // 2)] + ([] if i == 6 else [str(i % 2)])
    return ".".join(parts)
