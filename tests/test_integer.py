"""Claims about integer.py and the files it makes portable: the entropy parameters are exact integers, so a
file decodes to the same image in a fresh process that loads the checkpoint, and to the same symbols with another
thread count and without oneDNN; float arithmetic would not; and a decoder whose choices differ says so instead of
returning a wrong image."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY, TINY_ELIC, natural_image, tiny_model

from machinery import banded, checkpoints, container, integer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spread_scales(model):
    """Random weights, with the scale outputs moved (by their biases) to values log-uniform over the whole
    scale table, as a trained model's are: many land near a table boundary, where drift flips an index."""
    g = torch.Generator().manual_seed(1)
    last_layers = [model.h_s[-1]] if model.config.backbone == "hyperprior" else \
        [net.fusion[-1] for net in (*model.entropy_parameters_anchor, *model.entropy_parameters_nonanchor)]
    with torch.no_grad():
        for layer in last_layers:
            half = layer.bias.shape[0] // 2                                     # (scales, means)
            layer.bias[:half] = torch.exp(torch.empty(half).uniform_(math.log(0.11), math.log(200), generator=g))
    return model


def model_for(config, encoder):
    return spread_scales(tiny_model(encoder, config=config))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(3, 4, (5, 3), 1, (2, 0)),
                                  nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(3, 4, 5, 2, 2, 1),
                                  nn.ConvTranspose2d(3, 4, 3, 1, 1), nn.ConvTranspose2d(3, 4, (4, 3), (3, 2), 1)],
                         ids=["3x3", "5x3", "1x1", "transposed-5x5/2", "transposed-3x3/1", "transposed-4x3/(3,2)"])
def test_integer_convolution_engine_and_definition_are_the_exact_integer_formula(conv):
    """The engine (IntegerConv, tap by tap) and the definition (integer_conv, torch's convolution in float64) give
    the same integers, and both are the formula: int64 products summed in int64, rounded half up by the shift."""
    torch.manual_seed(0)
    transposed = isinstance(conv, nn.ConvTranspose2d)
    layer = integer.IntegerConv(conv.double())
    a = torch.randint(-2 ** 20, 2 ** 20, (2, 3, 5, 6)).double()
    out = layer(a)
    assert torch.equal(out, integer.integer_conv(layer, a))
    w = layer.weight.long().numpy()
    reference = (F.conv_transpose2d if transposed else F.conv2d)(
        torch.from_numpy(a.long().numpy()).double(), torch.from_numpy(w).double(), None, conv.stride,
        conv.padding, *((conv.output_padding,) if transposed else ())).numpy().astype(np.int64)
    assert out.shape == reference.shape
    accumulators = reference + layer.bias.long().numpy()[None, :, None, None]
    for c, s in enumerate(layer.shifts.tolist()):                               # round half up by an exact shift
        expected = np.floor(accumulators[:, c] / 2 ** s + 0.5) if s >= 0 else accumulators[:, c] * 2 ** -s
        assert np.array_equal(out[:, c].numpy(), expected)
    bound = integer.ACTIVATION_LIMIT * layer.weight.abs().transpose(0, 1 if transposed else 0).flatten(1).sum(1)
    assert (bound + layer.bias.abs() < integer.EXACT_LIMIT).all()             # every partial sum is exact


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 5, 3, 1, 1), nn.ConvTranspose2d(6, 5, 5, 2, 2, 1)],
                         ids=["3x3", "transposed-5x5/2"])
def test_the_definition_is_the_float_convolution_to_its_resolution(conv):
    """integer_conv over to_fixed(x), back at 2**-16, against the float layer in float64: off by no more than the
    rounding of x and of the weights (each below half a unit of their grids) could make it."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 7, 8, dtype=torch.float64) * 4
    layer = integer.IntegerConv(conv)
    approx = integer.integer_conv(layer, integer.to_fixed(x)) * 2.0 ** -integer.FRACTION_BITS
    with torch.no_grad():
        exact = conv.double()(x)
    weight_error = (x.abs().max() * 2.0 ** -layer.shifts.double().min() * conv.weight[0].numel() / 2).item()
    input_error = conv.weight.abs().sum().item() * 2.0 ** -integer.FRACTION_BITS / 2
    assert (approx - exact).abs().max() <= weight_error + input_error + 2.0 ** -integer.FRACTION_BITS


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 3, dilation=2),
                                  nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")])
def test_convolutions_the_integer_path_does_not_compute_are_refused(conv):
    with pytest.raises(TypeError, match="integer convolutions are dense"):
        integer.IntegerConv(conv)


def test_integer_network_follows_the_float_network_to_its_resolution():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(8, 12, 5, 2, 2, 1), nn.LeakyReLU(), nn.Conv2d(12, 6, 3, 1, 1), nn.ReLU())
    x = torch.randn(2, 8, 6, 7) * 4
    with torch.no_grad():
        assert torch.allclose(integer.IntegerNetwork(net)(x).float(), net(x), atol=4 * 2.0 ** -integer.FRACTION_BITS)


def test_conversion_is_made_of_exact_operations_only():
    """Shifts and integer weights from float32 weights must not depend on float rounding: converting a layer
    whose weights are scaled by a power of two gives the same integers with the shift moved by that power."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3)
    twice = nn.Conv2d(16, 8, 3)
    with torch.no_grad():
        twice.weight.copy_(conv.weight * 2)
        twice.bias.copy_(conv.bias * 2)
    a, b = integer.IntegerConv(conv), integer.IntegerConv(twice)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and torch.equal(a.shifts, b.shifts + 1)


def hyper_outputs(model, z_hat):
    with torch.no_grad():
        return model.h_s(z_hat), integer.networks(model).h_s(z_hat)


def test_a_simulated_other_platform_flips_float_table_choices_and_no_integer_one(encoder):
    """Another platform's float h_s differs in the last bits: simulated by evaluating it in float64 and by
    moving its outputs by 1e-6. The integer h_s is simulated by another summation order (its input channels
    permuted) and by moving its inputs by 1e-6 (they are rounded onto its grid)."""
    model = model_for(TINY, encoder)
    z_hat = torch.randint(-6, 7, (1, 16, 32, 32)).float()                     # y: 24 x 128 x 128 scales
    float_hyper, integer_hyper = hyper_outputs(model, z_hat)
    indexes = lambda hyper: model.gaussian_conditional.build_indexes(hyper.chunk(2, 1)[0])
    with torch.no_grad():
        float64_hyper = model.h_s.double()(z_hat.double())
        model.h_s.float()
    flips = (indexes(float_hyper) != indexes(float_hyper + 1e-6)).sum() + \
        (indexes(float_hyper) != indexes(float64_hyper)).sum()
    assert flips > 0

    nets = integer.networks(model)
    order = torch.randperm(16)
    first = nets.h_s.layers[0]
    permuted = integer.IntegerNetwork(model.h_s)
    permuted.layers[0].taps = first.taps[:, :, order]                            # (k, k, Cin, Cout): inputs permuted
    assert torch.equal(permuted(z_hat[:, order]), integer_hyper)
    assert torch.equal(nets.h_s(z_hat + 1e-6), integer_hyper) and torch.equal(nets.h_s(z_hat - 1e-6), integer_hyper)


DECODE_ELSEWHERE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, %r)
    sys.path.insert(0, %r)
    from machinery import checkpoints
    from test_integer import latents
    names, decoded = sys.argv[2:], {}
    for name in names:                             # as started: the test process's thread count and oneDNN
        model, checkpoint = checkpoints.load_checkpoint(name + ".pt")
        decoded[name] = {"step": checkpoint["step"], "x_hat": model.decompress(open(name + ".taco", "rb").read())}
    torch.set_num_threads(int(sys.argv[1]))
    torch.backends.mkldnn.enabled = False
    for name in names:                             # loaded again: nothing computed above is reused
        model, _ = checkpoints.load_checkpoint(name + ".pt")
        data = open(name + ".taco", "rb").read()
        decoded[name].update(y_hat=latents(model, data), x_hat_elsewhere=model.decompress(data))
        torch.save(decoded[name], name + ".decoded")
""" % (ROOT, os.path.dirname(os.path.abspath(__file__))))


def latents(model, data):
    """y_hat of a file (its integer networks' output, exact): what must be the same on every machine."""
    fingerprint = container.fingerprint(model)
    return banded.decode_latents(model, container.unpack(data, fingerprint), fingerprint, model.default_memory)


@pytest.mark.slow
def test_files_of_both_backbones_decode_in_a_fresh_process_and_to_the_same_symbols_elsewhere(tmp_path, encoder):
    """Files written before their checkpoint was saved, decoded by one other process that loads it: first as it
    started (this process's settings: the same image, bit for bit, and the checkpoint's own step), then with
    every change at once -- another thread count than this one's and oneDNN off: the same symbols."""
    threads = 1 if torch.get_num_threads() > 1 else 2
    expected = {}
    for name, config in (("hyperprior", TINY), ("elic", TINY_ELIC)):
        model = model_for(config, encoder)
        data = model.compress(natural_image(192, 256), "a red barn in the snow")
        (tmp_path / f"{name}.taco").write_bytes(data)
        expected[name] = latents(model, data), model.decompress(data)
        checkpoints.save_checkpoint(str(tmp_path / f"{name}.pt"), model, step=7)
    run = subprocess.run([sys.executable, "-c", DECODE_ELSEWHERE, str(threads),
                          *(str(tmp_path / name) for name in expected)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for name, (y_hat, x_hat) in expected.items():
        decoded = torch.load(str(tmp_path / f"{name}.decoded"), weights_only=True)
        assert decoded["step"] == 7 and torch.equal(decoded["x_hat"], x_hat), name
        assert torch.equal(decoded["y_hat"], y_hat), name                     # the symbols, bit for bit
        assert (decoded["x_hat_elsewhere"] - x_hat).abs().max() <= 1 / 255, name    # g_s stays float


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_a_decoder_whose_choices_differ_raises_the_dedicated_error(encoder, config):
    model = model_for(config, encoder)
    data = model.compress(natural_image(64, 96), "a boat")
    nets = integer.networks(model)
    last = (nets.h_s if config is TINY else nets.anchor[0]).layers[-1]
    last.bias[0] += 5 * 2.0 ** (integer.FRACTION_BITS + float(last.shifts[0]))   # scale of channel 0 + 5
    with pytest.raises(container.BitstreamError, match="arithmetic differs from the encoder's"):
        model.decompress(data)


def test_old_format_files_are_refused_with_their_version(encoder):
    model = model_for(TINY, encoder)
    data = bytearray(model.compress(natural_image(64, 64), "a boat"))
    data[4] = 1
    with pytest.raises(container.BitstreamError, match=f"version 1; this code reads version {container.VERSION}"):
        model.decompress(bytes(data))
