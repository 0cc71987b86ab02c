"""Claims about CompressAI's mbt2018-mean files: laid out here exactly as CompressAI writes them (its zoo's bare
state dicts after update(), examples/train.py's wrapped training states before it, every naming generation of
the factorized prior), they load into our adapter-free TACO, compute what their layers define, and code."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLIP, natural_image

import taco
import train
from machinery import checkpoints, container, integer

N, M = 8, 12
PEDESTAL = 2.0 ** -36
# The factorized prior's parameter names in each CompressAI generation (matrix, bias, factor).
GENERATIONS = {"1.2.6": ("_matrix{}", "_bias{}", "_factor{}"), "1.2.7": ("matrices.{}", "biases.{}", "factors.{}"),
               "zoo": ("_matrices.{}", "_biases.{}", "_factors.{}")}


def compressai_state(generation="1.2.6", updated=True, seed=0):
    """MeanScaleHyperprior(N, M).state_dict() as CompressAI writes it, with random weights: g_a / g_s as one
    Sequential each (conv or deconv at even indexes, GDN at odd ones), GDN's beta and gamma stored as
    sqrt(value + pedestal) beside their parametrizers' buffers, h_a / h_s with LeakyReLUs at odd indexes, the
    entropy models' constant bounds as buffers, and their coding tables filled (after update()) or empty."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale          # noqa: E731
    state = {}

    def conv(name, cin, cout, k):
        state[name + ".weight"], state[name + ".bias"] = rand(cout, cin, k, k), rand(cout, scale=0.01)

    def deconv(name, cin, cout, k):
        state[name + ".weight"], state[name + ".bias"] = rand(cin, cout, k, k), rand(cout, scale=0.01)

    def gdn(name, C):
        beta = 1 + 0.1 * torch.rand(C, generator=g)
        gamma = 0.1 * torch.eye(C) + 0.01 * torch.rand(C, C, generator=g)
        state[name + ".beta"], state[name + ".gamma"] = torch.sqrt(beta + PEDESTAL), torch.sqrt(gamma + PEDESTAL)
        for part, minimum in (("beta", 1e-6), ("gamma", 0.0)):
            state[f"{name}.{part}_reparam.pedestal"] = torch.tensor([PEDESTAL])
            state[f"{name}.{part}_reparam.lower_bound.bound"] = torch.tensor([(minimum + PEDESTAL) ** 0.5])

    for i, (cin, cout) in enumerate([(3, N), (N, N), (N, N), (N, M)]):
        conv(f"g_a.{2 * i}", cin, cout, 5)
        if i < 3:
            gdn(f"g_a.{2 * i + 1}", cout)
    for i, (cin, cout) in enumerate([(M, N), (N, N), (N, N), (N, 3)]):
        deconv(f"g_s.{2 * i}", cin, cout, 5)
        if i < 3:
            gdn(f"g_s.{2 * i + 1}", cout)
    conv("h_a.0", M, N, 3), conv("h_a.2", N, N, 5), conv("h_a.4", N, N, 5)
    deconv("h_s.0", N, M, 5), deconv("h_s.2", M, M * 3 // 2, 5), conv("h_s.4", M * 3 // 2, 2 * M, 3)
    state["g_a.6.weight"] *= 8                      # y spread over a few units, scales around 3: likelihoods
    state["h_s.4.bias"][:M] += 3                    # of every size, rarely at their lower bound; g_s
    state["g_s.0.weight"] *= 0.05                   # brings them back to an image's range
    widths = (1, 3, 3, 3, 3, 1)
    names = GENERATIONS[generation]
    for i in range(5):
        state["entropy_bottleneck." + names[0].format(i)] = rand(N, widths[i + 1], widths[i], scale=0.3) - 1
        state["entropy_bottleneck." + names[1].format(i)] = rand(N, widths[i + 1], 1, scale=0.5)
        if i < 4:
            state["entropy_bottleneck." + names[2].format(i)] = rand(N, widths[i + 1], 1, scale=0.5)
    state["entropy_bottleneck.quantiles"] = torch.tensor([-6.0, 0.0, 6.0]).repeat(N, 1, 1) + rand(N, 1, 3)
    target = math.log(2 / 1e-9 - 1)
    state["entropy_bottleneck.target"] = torch.tensor([-target, 0.0, target])
    state["entropy_bottleneck.likelihood_lower_bound.bound"] = torch.tensor([1e-9])
    scale_table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))       # CompressAI's get_scale_table
    state["gaussian_conditional.scale_table"] = scale_table if updated else torch.zeros(0)
    state["gaussian_conditional.scale_bound"] = torch.tensor([0.11])
    state["gaussian_conditional.lower_bound_scale.bound"] = torch.tensor([0.11])
    state["gaussian_conditional.likelihood_lower_bound.bound"] = torch.tensor([1e-9])
    empty = torch.zeros(0, dtype=torch.int32)
    for module, tables in (("entropy_bottleneck", N), ("gaussian_conditional", 64)):
        filled = {"_offset": torch.full((tables,), -5, dtype=torch.int32),
                  "_quantized_cdf": (torch.arange(12, dtype=torch.int32) * 5000).repeat(tables, 1),
                  "_cdf_length": torch.full((tables,), 12, dtype=torch.int32)}
        for name, table in filled.items():
            state[f"{module}.{name}"] = table if updated else empty
    return state


def save(path, state, wrapped=False):
    """A zoo file (the bare state dict) or examples/train.py's checkpoint (wrapped, saved from DataParallel)."""
    if wrapped:
        state = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}, "loss": torch.tensor(1.5),
                 "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                 "aux_optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [2]}]},
                 "lr_scheduler": {"mode": "min", "best": 1.5, "num_bad_epochs": 0, "last_epoch": 3}}
    torch.save(state, path)
    return path


def reference_forward(state, x):
    """The MeanScaleHyperprior's eval-mode forward from the file's tensors, layer by layer (Balle et al. 2018,
    Minnen et al. 2018): -> x_hat, y and z likelihoods."""
    def gdn(h, name, inverse=False):
        C = h.shape[1]
        beta = state[name + ".beta"].clamp_min((1e-6 + PEDESTAL) ** 0.5) ** 2 - PEDESTAL
        gamma = state[name + ".gamma"].clamp_min(PEDESTAL ** 0.5) ** 2 - PEDESTAL
        norm = torch.sqrt(F.conv2d(h * h, gamma.view(C, C, 1, 1), beta))
        return h * norm if inverse else h / norm

    def conv(h, name, stride=2):
        weight = state[name + ".weight"]
        return F.conv2d(h, weight, state[name + ".bias"], stride=stride, padding=weight.shape[-1] // 2)

    def deconv(h, name):
        return F.conv_transpose2d(h, state[name + ".weight"], state[name + ".bias"], stride=2, padding=2,
                                  output_padding=1)

    def normal_cdf(t):
        return 0.5 * torch.erfc(-t / math.sqrt(2))

    y = x
    for i in range(4):
        y = conv(y, f"g_a.{2 * i}")
        y = gdn(y, f"g_a.{2 * i + 1}") if i < 3 else y
    z = conv(F.leaky_relu(conv(F.leaky_relu(conv(y, "h_a.0", 1)), "h_a.2")), "h_a.4")
    medians = state["entropy_bottleneck.quantiles"][:, 0, 1].view(1, -1, 1, 1)
    z_hat = torch.round(z - medians) + medians

    def logits_cumulative(v):                                             # v (N, 1, n)
        for i in range(5):
            v = F.softplus(state[f"entropy_bottleneck._matrix{i}"]) @ v + state[f"entropy_bottleneck._bias{i}"]
            if i < 4:
                v = v + torch.tanh(state[f"entropy_bottleneck._factor{i}"]) * torch.tanh(v)
        return v
    v = z_hat.permute(1, 0, 2, 3).reshape(N, 1, -1)
    lower, upper = logits_cumulative(v - 0.5), logits_cumulative(v + 0.5)
    sign = -torch.sign(lower + upper)
    z_likelihoods = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs().clamp_min(1e-9)
    z_likelihoods = z_likelihoods.reshape(N, *z.shape[:1], *z.shape[2:]).permute(1, 0, 2, 3)
    hyper = conv(F.leaky_relu(deconv(F.leaky_relu(deconv(z_hat, "h_s.0")), "h_s.2")), "h_s.4", 1)
    scales, means = hyper.chunk(2, dim=1)
    y_hat = torch.round(y - means) + means
    distance, scales = (y_hat - means).abs(), scales.clamp_min(0.11)
    y_likelihoods = (normal_cdf((0.5 - distance) / scales) - normal_cdf((-0.5 - distance) / scales)).clamp_min(1e-9)
    x_hat = y_hat
    for i in range(4):
        x_hat = deconv(x_hat, f"g_s.{2 * i}")
        x_hat = gdn(x_hat, f"g_s.{2 * i + 1}", inverse=True) if i < 3 else x_hat
    return x_hat, y_likelihoods, z_likelihoods


def canonical(state, generation):
    """The state with the factorized prior under CompressAI 1.2.6's names, as reference_forward reads it."""
    renamed = dict(state)
    for ours, theirs in zip(GENERATIONS["1.2.6"], GENERATIONS[generation]):
        for i in range(5):
            if "entropy_bottleneck." + theirs.format(i) in renamed:
                renamed["entropy_bottleneck." + ours.format(i)] = renamed.pop("entropy_bottleneck." + theirs.format(i))
    return renamed


# Every naming generation in a zoo file, and the two forms of a training checkpoint (the names and the file's
# form are read by separate code: their combinations fail in no other way).
FORMS = [(generation, False, True) for generation in GENERATIONS] + [("1.2.6", True, False), ("1.2.6", True, True)]


@pytest.mark.parametrize("generation,wrapped,updated", FORMS, ids=[
    f"{g}-{'training checkpoint' if w else 'zoo file'}{' after update' if w and u else ''}" for g, w, u in FORMS])
def test_a_compressai_mean_scale_hyperprior_computes_what_its_layers_define(tmp_path, monkeypatch, generation,
                                                                             wrapped, updated):
    state = compressai_state(generation, updated)
    model, _ = checkpoints.load_checkpoint(save(str(tmp_path / "mbt2018-mean-3.pth.tar"), state, wrapped))
    assert (model.config.N, model.config.M, model.config.text_adapter) == (N, M, False)
    x = natural_image(64, 128)
    expected_x_hat, expected_y, expected_z = reference_forward(canonical(state, generation), x)
    monkeypatch.setattr(integer, "estimate_networks", lambda model, device: model.float_networks())  # as defined
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out["x_hat"], expected_x_hat, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out["likelihoods"]["y"], expected_y, atol=1e-5)
    assert torch.allclose(out["likelihoods"]["z"], expected_z, atol=1e-5)


def test_a_compressai_file_round_trips_and_reads_the_same_in_either_form(tmp_path):
    """The zoo's form (after update()) and the training form (before it) are one model: one fingerprint, one
    file; decompress gives the model's own reconstruction."""
    zoo, _ = checkpoints.load_checkpoint(save(str(tmp_path / "zoo.pth.tar"), compressai_state(updated=True)))
    trained, _ = checkpoints.load_checkpoint(save(str(tmp_path / "train.pth.tar"), compressai_state(updated=False),
                                                  wrapped=True))
    assert container.fingerprint(zoo) == container.fingerprint(trained)
    x = natural_image(70, 90)
    data = zoo.compress(x)
    assert data == trained.compress(x)
    with torch.no_grad():
        own = zoo(taco.pad_to_64(x))["x_hat"].clamp(0, 1)[:, :, :70, :90]
    assert torch.equal(trained.decompress(data), own)


@pytest.mark.parametrize("architecture", ["bmshj2018-hyperprior", "mbt2018", "cheng2020-anchor"])
def test_other_compressai_architectures_are_refused_naming_what_was_found(tmp_path, architecture):
    state = compressai_state()
    if architecture == "bmshj2018-hyperprior":                  # h_s ends with M channels: scales, no means
        state["h_s.4.weight"], state["h_s.4.bias"] = torch.zeros(M, N, 3, 3), torch.zeros(M)
    elif architecture == "mbt2018":
        state["context_prediction.weight"], state["context_prediction.bias"] = torch.zeros(2 * M, M, 5, 5), \
            torch.zeros(2 * M)
    else:
        state = {k.replace("g_a.0.", "g_a.0.conv1."): v for k, v in state.items()}
        state["context_prediction.weight"] = torch.zeros(2 * M, M, 5, 5)
    with pytest.raises(checkpoints.CheckpointError, match=f"{architecture.split('-')[0]}.*mbt2018-mean"):
        checkpoints.load_checkpoint(save(str(tmp_path / "other.pth.tar"), state))


def test_fine_tuning_taco_from_a_compressai_file_keeps_its_backbone_and_starts_the_adapter_fresh(tmp_path,
                                                                                                 capsys):
    path = save(str(tmp_path / "mbt2018-mean-3.pth.tar"), compressai_state(updated=True))
    source, _ = checkpoints.load_checkpoint(path)
    cfg = train.parse_args(["--N", str(N), "--M", str(M), "--clip-model", TINY_CLIP, "--clip-pretrained", "random",
                            "--init-from", path, "--out", str(tmp_path / "run")])
    config = taco.TacoConfig(N=N, M=M, clip_model=TINY_CLIP, clip_pretrained="random", text_dim=64)
    model, *_ = train.build_model(cfg, config, torch.device("cpu"), print)
    torch.manual_seed(cfg.seed)
    fresh = taco.TACO(config)
    said = capsys.readouterr().out
    backbone, ours = source.state_dict(), model.state_dict()
    for key, value in ours.items():
        if key in backbone:
            assert torch.equal(value, backbone[key]), key
        else:
            assert key.startswith(("g_a.inject_", "g_a.extract_")) and torch.equal(value, fresh.state_dict()[key]), key
    assert all(torch.equal(m.gamma, torch.zeros_like(m.gamma)) for m in model.modules()
               if isinstance(m, taco.Injector))
    assert f"{len(backbone)} tensors from {path}" in said and "text adapter initialised" in said
    wrong = train.parse_args(["--N", "16", "--M", str(M), "--init-from", path, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="N=8, M=12"):
        train.build_model(wrong, taco.TacoConfig(N=16, M=M, clip_model=TINY_CLIP, clip_pretrained="random",
                                                 text_dim=64), torch.device("cpu"), print)
