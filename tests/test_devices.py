"""Claims about devices, proven on a CPU-only machine with a stand-in GPU (tests/standin.py): a model on an
accelerator codes, trains, validates, checkpoints and resumes; the coder only ever sees CPU copies."""

import pytest
import torch
from helpers import TINY, TINY_CLIP, TINY_ELIC
from standin import DeviceMismatch, StandInGPU
from test_train import TINY_RUN

import taco
import train
from machinery import checkpoints, clip_text, devices, metrics, training


def test_the_stand_in_gpu_catches_what_a_real_gpu_refuses():
    with StandInGPU() as gpu:
        layer = torch.nn.Linear(3, 4).to(gpu.device)
        assert layer.weight.device.type == "cuda"
        with pytest.raises(DeviceMismatch):
            layer(torch.ones(2, 3))
        out = layer(torch.ones(2, 3, device=gpu.device))
        with pytest.raises(TypeError, match="numpy"):
            out.detach().numpy()
        assert out.detach().cpu().device.type == "cpu" and out.device.type == "cuda"


# 17 x 33, padded to one 64 x 64 block (the padding on the device too): at a budget of 2e5 bytes both backbones
# code it in several bands (ELIC, with its 16-row halos, one position of y each)
SIZE = (17, 33)


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_a_model_on_a_gpu_updates_compresses_the_cpu_bytes_and_decodes_on_either(encoder, config):
    torch.manual_seed(0)
    model = checkpoints.build_model(taco.TacoConfig(**config)).eval()
    model.attach_text_encoder(encoder)
    x = torch.rand(1, 3, *SIZE)
    cpu_bytes = model.update().compress(x, "a red barn")
    with StandInGPU() as gpu:
        model.to(gpu.device).update()                  # tables rebuilt from the GPU's parameters
        gpu_bytes = model.compress(x, "a red barn")
        heard = []
        assert model.compress(x, "a red barn", memory=2e5, progress=lambda *a: heard.append(a)) == gpu_bytes
        assert max(total for stage, _, total in heard if stage == "coding") > 1    # in bands on "the GPU"
        on_gpu = model.decompress(gpu_bytes, memory=2e5)
        assert on_gpu.device.type == "cpu"             # the image comes back to the host, band by band
    on_cpu = model.cpu().decompress(gpu_bytes)
    assert gpu_bytes == cpu_bytes                      # the stand-in computes on the CPU: same floats
    assert (on_gpu - on_cpu).abs().max() < 1e-6


def test_complexity_feeds_inputs_on_the_models_device():
    torch.manual_seed(0)
    model = checkpoints.build_model(taco.TacoConfig(**TINY))
    with StandInGPU() as gpu:
        counts = metrics.complexity(model.to(gpu.device), size=64)
    assert counts["macs_per_pixel"] > 0


@pytest.mark.usefixtures("no_curves")
def test_training_on_a_gpu_validates_checkpoints_and_resumes_with_optimizer_state_on_the_gpu(tmp_path,
                                                                                              monkeypatch, small_data):
    args = TINY_RUN + small_data + ["--steps", "2", "--val-every", "1", "--out", str(tmp_path / "run")]
    with StandInGPU() as gpu:
        monkeypatch.setattr(devices, "join_ranks", lambda device: (0, 1, gpu.device))
        train.train(train.parse_args(args + ["--stop-at", "1"]))
        train.train(train.parse_args(args + ["--resume"]))
        cfg = train.parse_args(args + ["--resume"])
        config = taco.TacoConfig(**torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["config"])
        model, (optimizer, _, _), step, _ = train.build_model(cfg, config, gpu.device, print)
        states = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
        assert step == 2 and states and all(t.device.type == "cuda" for t in states)


@pytest.mark.usefixtures("no_curves")
def test_resuming_with_another_loss_or_optimizer_setting_stops_and_names_it(tmp_path, small_data):
    args = TINY_RUN + small_data + ["--val-root", "", "--steps", "2", "--out", str(tmp_path / "run")]
    train.train(train.parse_args(args + ["--stop-at", "1"]))
    for flag, value in (("--lmbda", "0.05"), ("--lr", "0.5"), ("--batch-size", "3"), ("--k-j", "0.1")):
        with pytest.raises(SystemExit, match=f"trained with {flag} "):
            train.train(train.parse_args(args + ["--resume", flag, value]))
    train.train(train.parse_args(args + ["--resume", "--val-every", "50"]))      # bookkeeping may change


@pytest.mark.usefixtures("no_curves")
def test_without_the_adapter_the_joint_term_still_gets_caption_embeddings(tmp_path, monkeypatch, capsys,
                                                                          small_data):
    tiny = clip_text.load_clip
    monkeypatch.setattr(clip_text, "load_clip", lambda name, pretrained: tiny(TINY_CLIP, "random"))   # "pretrained"
    args = TINY_RUN + small_data + ["--val-root", "", "--clip-pretrained", "weights.bin", "--no-text-adapter",
                                    "--k-j", "0.1", "--k-p", "0", "--steps", "1", "--out", str(tmp_path / "run")]
    train.train(train.parse_args(args))
    assert "loss terms: rate, MSE, joint image-text" in capsys.readouterr().out
    rows = [line for line in open(tmp_path / "run" / "log.jsonl") if '"joint"' in line]
    assert rows


def test_without_clip_weights_the_stand_in_line_names_only_what_the_model_has(monkeypatch):
    tiny = clip_text.load_clip

    def unavailable(name, pretrained):
        if pretrained != "random":
            raise clip_text.WeightsUnavailable("no weights here")
        return tiny(TINY_CLIP, "random")
    monkeypatch.setattr(clip_text, "load_clip", unavailable)
    for flags, adapter in (([], True), (["--no-text-adapter"], False)):
        said = []
        cfg = train.parse_args(TINY_RUN + flags + ["--clip-pretrained", "weights.bin", "--k-j", "0.1", "--k-p", "0",
                                                   "--allow-missing-weights"])
        training.build_towers(cfg, said.append)
        line = next(s for s in said if s.startswith("STAND-IN: CLIP"))
        assert ("the adapter reads" in line) == adapter and "J is dropped" in line


def test_with_alexnet_weights_lpips_is_built_and_no_stand_in_is_announced(alexnet_weights):
    said = []
    cfg = train.parse_args(TINY_RUN + ["--k-j", "0", "--k-p", "1", "--alexnet-weights", alexnet_weights,
                                       "--allow-missing-weights"])
    _, _, lpips, _ = training.build_towers(cfg, said.append)
    assert lpips is not None and not any(line.startswith("STAND-IN") for line in said)


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_a_device_without_float64_codes_with_the_integer_networks_on_the_cpu(encoder, config):
    """Apple's MPS has no float64: the latents and the integer networks stay on the CPU there, the transforms
    run on the device, and the bytes are those of a CPU."""
    torch.manual_seed(0)
    model = checkpoints.build_model(taco.TacoConfig(**config)).eval()
    model.attach_text_encoder(encoder)
    x = torch.rand(1, 3, *SIZE)
    cpu_bytes = model.update().compress(x, "a red barn")
    on_cpu = model.decompress(cpu_bytes)
    with StandInGPU(float64=False) as gpu:
        with pytest.raises(TypeError, match="float64"):
            torch.zeros(1, dtype=torch.float64, device=gpu.device)
        model.to(gpu.device)
        assert devices.latent_device(model).type == "cpu"
        assert model.compress(x, "a red barn") == cpu_bytes
        assert model.compress(x, "a red barn", memory=2e5) == cpu_bytes
        assert (model.decompress(cpu_bytes, memory=2e5) - on_cpu).abs().max() < 1e-6
        model(torch.rand(1, 3, 64, 64).to(gpu.device), ["a red barn"])                # eval forward: the float estimate
