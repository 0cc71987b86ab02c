"""Claims about tables.py: its functions are accurate float64, and the coding tables and fingerprint a checkpoint
gives are the same bits on a CPU without AVX2 (torch's and numpy's vector kernels off) and at another thread
count -- for our checkpoints and for files laid out like the released ones, with a prior spread out as after
training."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import TINY, natural_image, tiny_model
from numpy._core import _multiarray_umath
from scipy import special
from test_elic import SMALL, fake_release, reference_shapes, released_config

import entropy
from machinery import checkpoints, container, elic, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_elementary_functions_are_float64_accurate():
    x = np.linspace(-700, 700, 100001)
    assert np.abs(tables.exp(x) / np.exp(x) - 1).max() < 1e-15
    y = np.exp(np.linspace(-700, 700, 100001))
    assert np.abs(tables.log(y) - np.log(y)).max() < 1e-13
    t = np.linspace(-40, 40, 100001)
    assert np.abs(tables.tanh(t) - np.tanh(t)).max() < 1e-15
    assert np.abs(tables.sigmoid(t) / special.expit(t) - 1).max() < 1e-14
    assert np.abs(tables.softplus(t) - np.logaddexp(0, t)).max() < 1e-13
    e = np.linspace(0, 20, 100001)
    assert np.abs(tables.erfc(e) - special.erfc(e)).max() < 1e-14
    assert np.abs(tables.erfc(e) / special.erfc(e) - 1).max() < 1e-12                # tails keep their digits
    assert abs(tables.normal_quantile(0.5e-9) + special.ndtri(0.5e-9)) < 1e-12


def test_scale_table_is_compressai_log_spaced_table():
    reference = np.exp(np.linspace(np.log(0.11), np.log(256), 64))
    assert np.allclose(tables.scale_table(0.11, 256, 64), reference, rtol=1e-7)


def spread_out(state, prefix=""):
    """A factorized prior as after training: weights moved off their initial values, wide uneven ranges
    (the initial prior's tables happen to come out the same everywhere). torch.rand: the same bits on every CPU."""
    g = torch.Generator().manual_seed(3)
    for key in [k for k in state if k.startswith(prefix + "entropy_bottleneck.") and state[k].dim() == 3]:
        if key.endswith("quantiles"):
            q = state[key].clone()
            q[:, 0, 0] -= torch.rand(len(q), generator=g) * 30
            q[:, 0, 2] += torch.rand(len(q), generator=g) * 40
            state[key] = q
        else:
            state[key] = state[key] + torch.rand(state[key].shape, generator=g) - 0.5
    return state


def coding_tables(paths):
    """path -> the coding tables (and scale table) and fingerprint that loading the checkpoint gives."""
    result = {}
    for path in paths:
        model, _ = checkpoints.load_checkpoint(path)
        model.update()
        keep = entropy.TABLE_BUFFERS + ("scale_table",)
        result[path] = {k: v for k, v in model.state_dict().items() if k.endswith(keep)}
        result[path]["fingerprint"] = torch.tensor(list(container.fingerprint(model)))
    return result


TABLES_ELSEWHERE = textwrap.dedent("""
    import dataclasses, json, sys, torch
    sys.path.insert(0, %r)
    sys.path.insert(0, %r)
    from machinery import elic
    from test_tables import coding_tables
    widths = json.loads(sys.argv[1])
    elic.OFFICIAL = dataclasses.replace(elic.OFFICIAL, **dict(widths, slices=tuple(widths["slices"])))
    torch.save(coding_tables(sys.argv[3:]), sys.argv[2])
""" % (ROOT, os.path.dirname(os.path.abspath(__file__))))

def other_machine():
    """Another machine, every difference at once: no AVX2 (torch's and numpy's vector kernels off) and another
    thread count than this process's."""
    vector_features = " ".join(f for f in _multiarray_umath.__cpu_dispatch__
                               if _multiarray_umath.__cpu_features__.get(f))
    return {"ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": vector_features,      # (torch takes no
            "OMP_NUM_THREADS": "1" if torch.get_num_threads() > 1 else "2"}                   # more than the cores)


@pytest.mark.slow
def test_coding_tables_and_fingerprint_of_ours_and_of_released_files_are_the_same_bits_on_another_cpu(
        tmp_path, monkeypatch, encoder):
    """One process on another machine (other_machine) reads both files: one of ours and one in the released
    layout (at toy widths, test_elic.SMALL), each with a prior spread out as after training."""
    ours, released = str(tmp_path / "model.pt"), str(tmp_path / "lambda_0.0004.pth.tar")
    model = tiny_model(encoder, config=dict(TINY, N=64))
    model.load_state_dict(spread_out(model.state_dict()))
    checkpoints.save_checkpoint(ours, model.update())
    fake_release(released, reference_shapes(**SMALL))
    checkpoint = torch.load(released, weights_only=True)
    spread_out(checkpoint["state_dict"], prefix="module.")
    torch.save(checkpoint, released)
    config = released_config(checkpoint["state_dict"])
    monkeypatch.setattr(elic, "OFFICIAL", config)
    here = coding_tables([ours, released])
    assert [len(here[path]) for path in (ours, released)] == [8, 8]
    widths = json.dumps({k: getattr(config, k) for k in ("N", "M", "slices", "text_dim")})
    run = subprocess.run([sys.executable, "-c", TABLES_ELSEWHERE, widths, str(tmp_path / "there.pt"), ours,
                          released], env=dict(os.environ, **other_machine()), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    there = torch.load(str(tmp_path / "there.pt"), weights_only=True)
    for path, values in here.items():
        for key, value in values.items():
            assert torch.equal(there[path][key], value), (os.path.basename(path), key)


def test_the_fingerprint_names_the_decoder_and_ignores_encoder_only_weights(encoder):
    """A file written by a model whose encoder was fine-tuned decodes with the old decoder: g_a and h_a are not
    in the fingerprint; any decoder-side weight is."""
    model, other = tiny_model(encoder), tiny_model(encoder)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith(("g_a.", "h_a.")):
                p.add_(0.01)
    assert container.fingerprint(model) == container.fingerprint(other)
    data = other.compress(natural_image(64, 64), "a boat")
    assert torch.equal(model.decompress(data), other.decompress(data))
    with torch.no_grad():
        other.g_s[0].weight.add_(0.01)
    assert container.fingerprint(model) != container.fingerprint(other)
