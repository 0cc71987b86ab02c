"""Claims about elic.py: the released checkpoints' keys load strictly, and the two-pass checkerboard codes
bit-exactly in the same order on both sides."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import entropy
import rangecoder
from machinery import checkpoints, container, elic
from machinery.integer import IntegerNetwork


def reference_shapes(N=192, M=320, D=512, slices=(16, 16, 32, 64, 192), table_width=40):
    """Key -> shape of a released TACO state dict, written from the reference's code (models/taco.py,
    modules/transform/{analysis,synthesis}.py, ELIC's res_blk / context / entropy modules) and CompressAI
    1.2's AttentionBlock, EntropyBottleneck and GaussianConditional, whose buffers these files also hold."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def deconv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, k, k), (cout,)

    def branch(name, n):
        conv(f"{name}.0", n, n // 2, 1), conv(f"{name}.2", n // 2, n // 2, 3), conv(f"{name}.4", n // 2, n, 1)

    def attention(name, n):
        for part in ("conv_a", "conv_b"):
            for j in range(3):
                branch(f"{name}.{part}.{j}.conv", n)
        conv(f"{name}.conv_b.3", n, n, 1)

    def linear(name, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

    def cross_attention(name, n, text_side):
        linear(f"{name}.{'text' if text_side else 'image'}_feature_dim_proj", D if text_side else N, n)
        for norm in ("image_norm", "text_norm"):
            shapes[f"{name}.{norm}.weight"], shapes[f"{name}.{norm}.bias"] = (n,), (n,)
        shapes[f"{name}.cross_attn.in_proj_weight"], shapes[f"{name}.cross_attn.in_proj_bias"] = (3 * n, n), (3 * n,)
        linear(f"{name}.cross_attn.out_proj", n, n)

    a = "g_a.analysis_transform"
    conv(f"{a}.0", 3, N, 5), conv(f"{a}.4", N, N, 5), conv(f"{a}.10", N, N, 5), conv(f"{a}.16", N, M, 5)
    for i in (1, 2, 3, 5, 6, 7, 11, 12, 13):
        branch(f"{a}.{i}.branch", N)
    cross_attention(f"{a}.8", N, True), cross_attention(f"{a}.15", N, True), cross_attention(f"{a}.14", D, False)
    shapes[f"{a}.8.gamma"] = shapes[f"{a}.15.gamma"] = (N,)
    attention(f"{a}.9", N), attention(f"{a}.17", M)
    s = "g_s.synthesis_transform"
    attention(f"{s}.0", M), attention(f"{s}.6", N)
    deconv(f"{s}.1", M, N, 5), deconv(f"{s}.5", N, N, 5), deconv(f"{s}.10", N, N, 5), deconv(f"{s}.14", N, 3, 5)
    for i in (2, 3, 4, 7, 8, 9, 11, 12, 13):
        branch(f"{s}.{i}.branch", N)
    conv("h_a.reduction.0", M, N, 3), conv("h_a.reduction.2", N, N, 5), conv("h_a.reduction.4", N, N, 5)
    deconv("h_s.increase.0", N, M, 5), deconv("h_s.increase.2", M, M * 3 // 2, 5)
    deconv("h_s.increase.4", M * 3 // 2, 2 * M, 3)
    for i, c in enumerate(slices):
        conv(f"local_context.{i}", c, 2 * c, 5)
        if i:
            conv(f"channel_context.{i}.fushion.0", sum(slices[:i]), 224, 5)
            conv(f"channel_context.{i}.fushion.2", 224, 128, 5), conv(f"channel_context.{i}.fushion.4", 128, 2 * c, 5)
        for kind, cin in (("anchor", 2 * M + (2 * c if i else 0)), ("nonanchor", 2 * M + (4 * c if i else 2 * c))):
            out = 2 * c
            conv(f"entropy_parameters_{kind}.{i}.fusion.0", cin, out * 5 // 3, 1)
            conv(f"entropy_parameters_{kind}.{i}.fusion.2", out * 5 // 3, out * 4 // 3, 1)
            conv(f"entropy_parameters_{kind}.{i}.fusion.4", out * 4 // 3, out, 1)
    widths = (1, 3, 3, 3, 3, 1)
    for i in range(5):
        shapes[f"entropy_bottleneck._matrix{i}"] = (N, widths[i + 1], widths[i])
        shapes[f"entropy_bottleneck._bias{i}"] = (N, widths[i + 1], 1)
        if i < 4:
            shapes[f"entropy_bottleneck._factor{i}"] = (N, widths[i + 1], 1)
    shapes.update({"entropy_bottleneck.quantiles": (N, 1, 3), "entropy_bottleneck.target": (3,),
                   "entropy_bottleneck.likelihood_lower_bound.bound": (1,),
                   "entropy_bottleneck._offset": (N,), "entropy_bottleneck._quantized_cdf": (N, table_width),
                   "entropy_bottleneck._cdf_length": (N,),
                   "gaussian_conditional.likelihood_lower_bound.bound": (1,),
                   "gaussian_conditional.lower_bound_scale.bound": (1,), "gaussian_conditional.scale_bound": (1,),
                   "gaussian_conditional.scale_table": (64,), "gaussian_conditional._offset": (64,),
                   "gaussian_conditional._quantized_cdf": (64, table_width),
                   "gaussian_conditional._cdf_length": (64,)})
    return shapes


GENERATIONS = {   # the factorized prior's matrices, biases and factors as each CompressAI generation names them
    "1.2.6": ("_matrix{}", "_bias{}", "_factor{}"),         # up to 1.2.6
    "1.2.7": ("matrices.{}", "biases.{}", "factors.{}"),    # from 1.2.7 (nn.ParameterList)
    "zoo": ("_matrices.{}", "_biases.{}", "_factors.{}"),   # the oldest files its model zoo still maps
}


def fake_release(path, shapes=None, prefix="module.", generation="1.2.6", updated=False):
    """A file laid out like the released ones, with random weights (and sane entropy-model values). As the
    reference's train.py writes it: net.state_dict() of the training model, never update()d, so CompressAI's
    coding tables and the scale table are empty (shape (0,)); `updated` fills them in as update() would.
    `shapes`: reference_shapes() at some widths (the released ones by default)."""
    torch.manual_seed(0)
    state = {}
    shapes = shapes or reference_shapes()
    for key, shape in shapes.items():
        state[prefix + key] = torch.randn(shape) * 0.05
    N = shapes["entropy_bottleneck.quantiles"][0]
    state[prefix + "entropy_bottleneck.quantiles"] = torch.tensor([-8.0, 0.0, 8.0]).repeat(N, 1, 1)
    state[prefix + "entropy_bottleneck.target"] = torch.tensor([-21.4, 0.0, 21.4])
    state[prefix + "gaussian_conditional.scale_table"] = torch.exp(torch.linspace(np.log(0.11), np.log(256), 64))
    for key in ("entropy_bottleneck._cdf_length", "gaussian_conditional._cdf_length"):
        state[prefix + key] = torch.full(state[prefix + key].shape, 7, dtype=torch.int32)
    if not updated:
        for key in [k for k in state if k.endswith(entropy.TABLE_BUFFERS + ("scale_table",))]:
            state[key] = torch.zeros(0, dtype=torch.int32 if "table" not in key.split(".")[-1] else torch.float32)
    for ours, theirs in zip(("_matrix{}", "_bias{}", "_factor{}"), GENERATIONS[generation]):
        for i in range(5):
            if f"{prefix}entropy_bottleneck.{ours.format(i)}" in state:
                value = state.pop(f"{prefix}entropy_bottleneck.{ours.format(i)}")
                state[f"{prefix}entropy_bottleneck.{theirs.format(i)}"] = value
    torch.save({"state_dict": state, "epoch": 49, "optimizer": {"state": {}, "param_groups": []}}, path)
    return state


# The released layout at toy widths: every key of the released files, each tensor 6 to 10 times narrower (N, M,
# the slices and CLIP's width; the channel context's 224 and 128 stay). The layout logic -- names, naming
# generations, prefixes, rebuilt tables, strictness -- is the same at any width; only the test below needs the
# released widths themselves.
SMALL = dict(N=32, M=40, D=64, slices=(4, 4, 8, 8, 16))


def released_config(state):
    """The ELIC config a released state dict's shapes give (N, M, the slices, CLIP's width), else as released."""
    shape = lambda key: state[next(k for k in state if k.removeprefix("module.") == key)].shape     # noqa: E731
    slices = tuple(shape(f"local_context.{i}.weight")[1] for i in range(len(elic.OFFICIAL.slices)))
    return dataclasses.replace(elic.OFFICIAL, N=shape("g_a.analysis_transform.0.weight")[0],
                               M=shape("g_a.analysis_transform.16.weight")[0], slices=slices,
                               text_dim=shape("g_a.analysis_transform.8.text_feature_dim_proj.weight")[1])


@pytest.fixture
def small_release(monkeypatch):
    """fake_release at the SMALL widths; while the test runs, checkpoints.load_released builds ElicTACO with the
    config read off the file's shapes instead of the released widths."""
    def write(path, shapes=None, **kwargs):
        state = fake_release(path, shapes or reference_shapes(**SMALL), **kwargs)
        monkeypatch.setattr(elic, "OFFICIAL", released_config(state))
        return state
    return write


def test_our_state_dict_has_exactly_the_reference_keys_and_shapes():
    ours = {k: tuple(v.shape) for k, v in elic.ElicTACO(elic.OFFICIAL).state_dict().items()}
    reference = {k: v for k, v in reference_shapes().items() if k not in checkpoints.COMPRESSAI_CONSTANTS}
    assert sorted(ours) == sorted(reference)
    tables = [k for k in ours if k.endswith(entropy.TABLE_BUFFERS)]          # sized by update(), rebuilt on load
    assert {k: v for k, v in ours.items() if k not in tables} == {k: v for k, v in reference.items()
                                                                   if k not in tables}


# Every naming generation as the reference saves its files (tables empty), and one file as update() fills them:
# the names and the tables are read by separate code, so their combinations fail in no other way.
RELEASED_FORMS = [(generation, False) for generation in GENERATIONS] + [("1.2.6", True)]


@pytest.mark.parametrize("generation,updated", RELEASED_FORMS,
                         ids=[g + (" after update" if u else " as trained") for g, u in RELEASED_FORMS])
def test_a_released_file_loads_strictly_through_load_checkpoint(tmp_path, small_release, generation, updated):
    """The file's own tensors, the tables rebuilt (that such a model codes: the test below)."""
    path = str(tmp_path / "lambda_0.004.pth.tar")
    state = small_release(path, generation=generation, updated=updated)
    model, checkpoint = checkpoints.load_checkpoint(path)
    assert isinstance(model, elic.ElicTACO) and checkpoint["epoch"] == 49
    loaded = model.state_dict()
    for key in ("g_a.analysis_transform.8.gamma", "h_s.increase.4.weight", "channel_context.4.fushion.4.bias"):
        assert torch.equal(loaded[key], state["module." + key])
    bottleneck = {k: v for k, v in state.items() if k.startswith("module.entropy_bottleneck.") and v.dim() == 3}
    assert len(bottleneck) == 15                                            # 5 matrices, 5 biases, 4 factors, quantiles
    for i in range(5):
        file_key = "module.entropy_bottleneck." + GENERATIONS[generation][0].format(i)
        assert torch.equal(loaded[f"entropy_bottleneck._matrix{i}"], state[file_key])
    assert torch.allclose(model.gaussian_conditional.scale_table,
                          torch.exp(torch.linspace(np.log(0.11), np.log(256), 64)))
    for module in (model.entropy_bottleneck, model.gaussian_conditional):   # the file's tables were rebuilt
        rangecoder.check_cdfs(*module.tables())
        assert not (module._cdf_length == 7).all()
    assert (model.config.N, model.config.M) == (SMALL["N"], SMALL["M"])


def test_the_same_released_weights_write_the_same_file_whether_or_not_update_filled_the_scale_table(
        tmp_path, small_release):
    """A released file as the reference saves it (empty tables) and after CompressAI's update() (the scale table
    filled with torch.exp's float32 values) are one model: one fingerprint, one file, which decodes to the
    model's own reconstruction. A genuinely different scale table is the file's own, kept: another model."""
    forms = {}
    for form in ("as trained", "after update", "custom table"):
        path = str(tmp_path / f"{form}.pth.tar")
        small_release(path, updated=form != "as trained")
        if form == "custom table":
            checkpoint = torch.load(path, weights_only=True)
            checkpoint["state_dict"]["module.gaussian_conditional.scale_table"] = torch.exp(
                torch.linspace(np.log(0.2), np.log(64), 64))
            torch.save(checkpoint, path)
        forms[form], _ = checkpoints.load_checkpoint(path)
    filled = torch.load(str(tmp_path / "after update.pth.tar"), weights_only=True)["state_dict"]
    assert not torch.equal(filled["module.gaussian_conditional.scale_table"],
                           forms["as trained"].gaussian_conditional.scale_table)       # the float32 exp's table
    fingerprints = {form: container.fingerprint(model) for form, model in forms.items()}
    assert fingerprints["as trained"] == fingerprints["after update"] != fingerprints["custom table"]
    assert torch.allclose(forms["custom table"].gaussian_conditional.scale_table[[0, -1]], torch.tensor([0.2, 64.0]))
    features, x = torch.randn(1, 38, SMALL["D"]), torch.rand(1, 3, 64, 64)     # precomputed CLIP token features
    files = {form: model.compress(x, features) for form, model in forms.items()}
    assert files["as trained"] == files["after update"] != files["custom table"]
    with torch.no_grad():
        own = forms["as trained"](x, features)["x_hat"].clamp(0, 1)
    assert torch.equal(forms["as trained"].decompress(files["as trained"]), own)
    assert torch.equal(forms["after update"].decompress(files["as trained"]), forms["as trained"].decompress(
        files["after update"]))
    with pytest.raises(container.BitstreamError, match="another model"):
        forms["custom table"].decompress(files["as trained"])


@pytest.mark.parametrize("damage", ["missing", "misshapen", "unexpected"])
def test_missing_or_misshapen_key_gives_an_error_naming_it(tmp_path, small_release, damage):
    shapes = reference_shapes(**SMALL)
    if damage == "missing":
        del shapes["g_a.analysis_transform.15.gamma"]
    elif damage == "misshapen":
        shapes["g_a.analysis_transform.15.gamma"] = (SMALL["N"] + 1,)
    else:
        shapes["g_a.analysis_transform.18.weight"] = (3,)
    small_release(str(tmp_path / "bad.pth.tar"), shapes, prefix="")
    with pytest.raises(checkpoints.CheckpointError, match=f"{damage}.*g_a.analysis_transform.1[58]"):
        checkpoints.load_checkpoint(str(tmp_path / "bad.pth.tar"))


@pytest.mark.parametrize("size", [pytest.param((64, 64), marks=pytest.mark.core), (70, 100)],
                         ids=["a multiple of 64", "padded"])
def test_lossless_round_trip_an_elic_taco_file_decodes_to_the_models_own_reconstruction_exactly(tiny_elic, size):
    model = tiny_elic
    x = torch.rand(1, 3, *size)
    data = model.compress(x, "a lighthouse on a cliff")
    padded = F.pad(x, (0, -size[1] % 64, 0, -size[0] % 64), mode="replicate")
    with torch.no_grad():
        expected = model(padded, ["a lighthouse on a cliff"])["x_hat"].clamp(0, 1)[:, :, :size[0], :size[1]]
    assert torch.equal(model.decompress(data), expected)


def test_checkerboard_masks_are_complementary_with_anchors_where_row_plus_column_is_odd():
    anchor, nonanchor = elic.checkerboard(elic.ANCHOR, 3, 4), elic.checkerboard(elic.NONANCHOR, 3, 4)
    assert anchor.tolist() == [[False, True, False, True], [True, False, True, False], [False, True, False, True]]
    assert torch.equal(anchor, ~nonanchor)


@pytest.mark.parametrize("top", [0, 1])
@pytest.mark.parametrize("width", [7, 8])
def test_gather_takes_each_pass_in_raster_order_and_scatter_puts_it_back(top, width):
    """Against boolean-mask selection, row by row: gather keeps each row's positions of the pass, left to right,
    padded at the end; gathered() marks the real ones; scatter is its inverse and leaves the others alone."""
    values = torch.arange(2 * 5 * width, dtype=torch.float64).view(1, 2, 5, width) + 1
    for kind in (elic.ANCHOR, elic.NONANCHOR):
        mask = elic.checkerboard(kind, 5, width, top=top)
        kept, real = elic.gather(values, kind, top), elic.gathered(kind, range(top, top + 5), width)
        for r in range(5):
            assert torch.equal(kept[0, :, r, real[r]], values[0, :, r, mask[r]])
            assert not kept[0, :, r, ~real[r]].any()
        out = -torch.ones_like(values)
        elic.scatter(kept, kind, top, out)
        assert torch.equal(out, torch.where(mask, values, -torch.ones_like(values)))


def test_the_local_contexts_anchor_taps_give_the_whole_convolution_at_the_non_anchors():
    """The integer local context computes only the taps with dy + dx odd; on an input that is zero off the
    anchors its outputs at the non-anchors equal the whole 5x5 convolution's, and differ at the anchors (so
    the other taps really were dropped)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 5, padding=2)
    whole, taps = IntegerNetwork(conv), IntegerNetwork(conv, keep=elic.reads_anchors)
    x = torch.randn(1, 4, 9, 11) * elic.checkerboard(elic.ANCHOR, 9, 11)
    nonanchors = elic.checkerboard(elic.NONANCHOR, 9, 11)
    assert torch.equal(taps(x)[..., nonanchors], whole(x)[..., nonanchors])
    assert not torch.equal(taps(x)[..., ~nonanchors], whole(x)[..., ~nonanchors])
    assert sum(elic.reads_anchors(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)) == 12


@pytest.mark.parametrize("corruption", ["swapped passes", "positions visited backwards"])
def test_a_decoder_that_visits_symbols_in_another_order_does_not_reproduce_the_image(tiny_elic, monkeypatch,
                                                                                   corruption):
    model = tiny_elic
    x = torch.rand(1, 3, 64, 64)
    data = model.compress(x, "a boat")
    correct = model.decompress(data)
    if corruption == "swapped passes":
        swap = lambda kind: elic.NONANCHOR if kind == elic.ANCHOR else elic.ANCHOR      # noqa: E731
        for name in ("checkerboard", "first_column"):
            original = getattr(elic, name)
            monkeypatch.setattr(elic, name, lambda kind, *a, original=original, **k: original(swap(kind), *a, **k))
    else:
        class Backwards(rangecoder.SymbolDecoder):
            def decode(self, indexes, *tables):
                return super().decode(indexes[::-1], *tables)[::-1].copy()
        monkeypatch.setattr(container, "SymbolDecoder", Backwards)
    try:
        corrupted = model.decompress(data)
    except container.BitstreamError:
        return                                                      # detected: fine
    assert not torch.equal(corrupted, correct)


def test_adapter_size_at_the_reference_width_matches_the_paper():
    """About 1.65 M adapter parameters at dim 192 (two Injectors and one Extractor), as in the paper."""
    from machinery import metrics
    counted = metrics.complexity(elic.ElicTACO(elic.OFFICIAL), size=64)
    assert 1.6e6 < counted["adapter_params"] < 1.7e6
