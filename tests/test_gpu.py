"""Claims that only a real GPU can check: the whole user path on CUDA. Skipped without one (`-m gpu` selects
them); tests/test_devices.py proves the same paths on a CPU-only machine with a stand-in device."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY, TINY_CLIP, TINY_ELIC
from test_train import ROOT, TINY_RUN, free_port

import eval as evaluation
import taco
import train
from machinery import checkpoints, clip_text, integer

pytestmark = pytest.mark.gpu


def run(args, tmp_path, name):
    train.train(train.parse_args(TINY_RUN + ["--out", str(tmp_path / name)] + args))
    return torch.load(tmp_path / name / "latest.pt", weights_only=True)


@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--compile"]], ids=["fp32", "bf16", "compile"])
def test_demo_trains_validates_checkpoints_and_resumes_on_the_gpu(tmp_path, capsys, extra):
    common = ["--steps", "4", "--val-every", "2"] + extra
    run(common + ["--stop-at", "2"], tmp_path, "run")
    checkpoint = run(common + ["--resume"], tmp_path, "run")
    out = capsys.readouterr().out
    assert "training on cuda" in out and "held-out real bpp" in out and checkpoint["step"] == 4


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_compress_on_the_gpu_decodes_on_the_gpu_and_on_the_cpu(config):
    torch.manual_seed(0)
    model = checkpoints.build_model(taco.TacoConfig(**config)).eval().update()
    model.attach_text_encoder(clip_text.TextEncoder(TINY_CLIP, "random"))
    x = torch.rand(1, 3, 130, 200)
    data = model.cuda().compress(x, "a red barn")
    on_gpu = model.decompress(data).cpu()
    on_cpu = model.cpu().decompress(data)
    assert (on_gpu - on_cpu).abs().max() <= 2 / 255                     # g_s may round differently


def test_the_integer_engine_and_definition_give_the_cpus_integers_on_the_gpu():
    """Exact float64 arithmetic is exact on any device: cuBLAS's summation orders (the engine) and torch's
    convolution without cuDNN (the definition) give the CPU's integers, for a convolution and a transposed one."""
    torch.manual_seed(0)
    for conv in (torch.nn.Conv2d(24, 16, 3, 1, 1), torch.nn.ConvTranspose2d(24, 16, 5, 2, 2, 1)):
        layer = integer.IntegerConv(conv)
        a = torch.randint(-2 ** 24, 2 ** 24, (1, 24, 9, 11)).double()
        on_cpu = layer(a)
        assert torch.equal(layer(a.cuda()).cpu(), on_cpu)
        assert torch.equal(integer.integer_conv(layer, a.cuda()).cpu(), on_cpu)


def test_eval_runs_its_networks_on_the_gpu(weights_folder, alexnet_weights, tmp_path):
    folder = weights_folder                       # photos, captions, a tiny checkpoint (conftest.py)
    evaluation.main(["--checkpoint", str(folder / "tiny.pt"), "--images", str(folder / "images"), "--captions",
                  str(folder / "captions.json"), "--baselines", "", "--alexnet-weights", alexnet_weights,
                  "--device", "cuda", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert all(r["bpp"] > 0 for r in report["checkpoints"][str(folder / "tiny.pt")]["given"]["per_image"])


def test_torchrun_with_one_process_and_nccl(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *TINY_RUN,
               "--steps", "3", "--val-every", "100", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training on cuda:0 x1" in done.stdout
    assert torch.load(tmp_path / "ddp" / "latest.pt", weights_only=True)["step"] == 3
