"""Claims about bands.py and the banded coding path: halos are exact, any band size decodes the same latents,
large declared sizes are refused before anything is allocated."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import TINY, TINY_ELIC, natural_image, tiny_model
from PIL import Image

import codec
import taco
from machinery import banded, bands, checkpoints, container, images


def dependency_rows(network, x, lo, hi, dim):
    """The input positions that output positions [lo, hi) along `dim` really depend on, found by autograd
    (an independent computation): where the gradient of their sum is non-zero."""
    x = x.clone().requires_grad_(True)
    out = network(x)
    index = [slice(None)] * 4
    index[2 + dim] = slice(lo, hi)
    out[tuple(index)].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 1, 3 - dim)) != 0
    where = torch.nonzero(touched).flatten()
    return int(where.min()), int(where.max()) + 1


@pytest.mark.parametrize("layer", [nn.Conv2d(2, 3, 5, 2, 2), nn.Conv2d(2, 3, 3, 1, 1), nn.Conv2d(2, 3, 4, 2, 0),
                                   nn.ConvTranspose2d(2, 3, 5, 2, 2, output_padding=1),
                                   nn.ConvTranspose2d(2, 3, 3, 1, 1), nn.ConvTranspose2d(2, 3, 4, 2, 1)])
def test_the_window_of_a_convolution_is_what_autograd_finds(layer):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 40, 40)
    n_out = layer(x).shape[-2]
    for lo, hi in [(3, 7), (10, 11), (n_out - 4, n_out - 1)]:
        first, last = bands.window(layer, lo, hi, 0)
        assert dependency_rows(layer, x, lo, hi, 0) == (max(first, 0), min(last, 40))


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_the_halo_of_each_transform_covers_every_real_dependency(encoder, config):
    model = tiny_model(encoder, config=config)
    torch.manual_seed(1)
    text = model.read_text(["a boat"], "cpu")
    g_a = banded.analysis_layers(model.g_a)
    refreshed = text[0]         # the Extractor's text is global: the bands take it from a sweep over all positions
    cases = [(lambda x: banded.run_analysis(g_a, x, *text, refreshed), g_a, torch.rand(1, 3, 256, 192)),
             (model.g_s, model.g_s, torch.randn(1, model.config.M, 12, 10)),
             (model.h_s, model.h_s, torch.randn(1, model.config.N, 6, 5))]
    for compute, layout, x in cases:
        n = compute(x).shape[-2]
        for lo, hi in [(1, 3), (n // 2, n // 2 + 1)]:
            first, last = bands.window(layout, lo, hi, 0)
            needed = dependency_rows(compute, x, lo, hi, 0)
            assert max(first, 0) <= needed[0] and needed[1] <= min(last, x.shape[-2])


def test_a_layer_without_a_halo_rule_is_refused():
    with pytest.raises(TypeError, match="no halo rule for MaxPool2d"):
        bands.window(nn.MaxPool2d(2), 0, 4, 0)


def test_the_extractors_running_softmax_equals_multihead_attention_over_all_positions():
    torch.manual_seed(0)
    extractor = taco.Extractor(16, 32, 4).eval()
    x, text = torch.randn(2, 16, 6, 7), torch.randn(2, 5, 32)
    image = extractor.image_norm(extractor.image_feature_dim_proj(taco.to_tokens(x)))
    t = extractor.text_norm(text)
    reference = t + extractor.cross_attn(t, image, image, need_weights=False)[0]
    online = banded.OnlineExtractor(extractor, text)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        online.attend(x[:, :, rows])
    assert torch.allclose(online.finish(), reference, atol=1e-5)
    assert torch.allclose(extractor(x, text), reference, atol=1e-5)


def test_the_online_softmax_over_one_block_is_the_extractors_own_forward_bit_for_bit():
    """One piece, the banded encoder and the one-piece one compute the same floats (so a small image's bytes
    do not depend on which path ran)."""
    torch.manual_seed(0)
    extractor = taco.Extractor(16, 32, 4).eval()
    x, text = torch.randn(2, 16, 6, 7), torch.randn(2, 5, 32)
    online = banded.OnlineExtractor(extractor, text)
    online.attend(x)
    assert torch.equal(online.finish(), extractor(x, text))


def test_blocks_cut_wide_images_into_columns_and_cover_everything_once():
    for height, width, area in [(50, 70, 10 ** 6), (50, 70, 700), (50, 70, 300), (33, 1000, 512)]:
        covered = np.zeros((height, width), dtype=int)
        tiles = bands.blocks(height, width, area)
        for (r0, r1), (c0, c1) in tiles:
            covered[r0:r1, c0:c1] += 1
            assert (r1 - r0) * (c1 - c0) <= max(area, 1)
        assert (covered == 1).all()
    assert any(c != (0, 1000) for _, c in bands.blocks(33, 1000, 512))        # a row alone is too wide


def image_of(kind, size):
    """An 8-bit RGB, 8-bit gray or 16-bit gray image of `size`."""
    x = natural_image(*size)
    if kind == "rgb":
        return (x * 255).round().to(torch.uint8)
    x = x.mean(1, keepdim=True)
    return (x * 65535).round().to(torch.uint16) if kind == "gray16" else (x * 255).round().to(torch.uint8)


def pair_case(model, kind, size, quarter=False):
    """The banded engine against the plain path (taco.py) on an image the plain path codes: with the budget
    just below the one-piece limit (the engine's first size up: several blocks, with ELIC's 16-row halos one per
    position of y) and, with `quarter`, a quarter of it, the engine writes the plain path's bytes and decodes
    them to the plain path's pixels."""
    x = image_of(kind, size)
    limit = 4 * model.config.N * (-(-size[0] // 64) * 64) * (-(-size[1] // 64) * 64)   # taco.TACO.fits
    image = container.describe(x)
    assert model.fits(image, limit) and not model.fits(image, limit - 1)
    plain = model.compress(x, "a boat on a lake", memory=limit)
    pixels = model.decompress(plain, dtype=None, memory=limit)
    assert pixels.shape == x.shape and pixels.dtype == x.dtype
    for memory in (limit - 1, limit // 4) if quarter else (limit - 1,):
        encoding, decoding = [], []
        assert model.compress(x, "a boat on a lake", memory=memory, progress=lambda *a: encoding.append(a)) == plain
        assert torch.equal(model.decompress(plain, dtype=None, memory=memory, progress=lambda *a: decoding.append(a)),
                           pixels)
        for heard in (encoding, decoding):
            for stage in {name for name, _, _ in heard}:              # each stage's pieces once, 1 to its total
                counts = [(done, total) for name, done, total in heard if name == stage]
                assert counts == [(done, len(counts)) for done in range(1, len(counts) + 1)], stage


@pytest.mark.parametrize("config", [pytest.param(TINY, marks=pytest.mark.core), TINY_ELIC],
                         ids=["hyperprior", "elic"])          # -m core: the hyperprior's (ELIC's takes 3 s)
def test_the_banded_engine_writes_the_plain_paths_bytes_and_pixels(request, config):
    pair_case(request.getfixturevalue("tiny_elic" if config is TINY_ELIC else "tiny_hyperprior"), "rgb", (17, 33))


# The pixels' kinds and odd sizes go through the engine's parts that both backbones share (bands.Pixels, the
# decoder's output); ELIC's own banded code sees y, the same for any pixel kind: its case is the rgb pair above.
CASES = [("rgb", (150, 230)), ("gray", (64, 96)), ("gray16", (17, 333))]


@pytest.mark.slow
@pytest.mark.parametrize("kind,size", CASES, ids=[kind for kind, _ in CASES])
def test_the_banded_engine_writes_the_plain_paths_bytes_and_pixels_for_gray_16_bit_and_odd_sizes(tiny_hyperprior,
                                                                                                 kind, size):
    pair_case(tiny_hyperprior, kind, size, quarter=True)


@pytest.mark.slow
def test_the_banded_elic_writes_the_plain_paths_bytes_and_pixels_for_a_tall_image(tiny_elic):
    pair_case(tiny_elic, "rgb", (33, 17))           # taller than wide: its bands of rows hold one row of y each


def test_the_banded_encoders_y_equals_the_one_piece_y(tiny_hyperprior):
    model = tiny_hyperprior
    x = natural_image(150, 230)
    text = model.read_text(["a cat on a mat"], "cpu")
    with torch.no_grad():
        whole = model.g_a(taco.pad_to_64(x), *text)
        pixels = bands.Pixels(x, container.describe(x), "cpu")
        banded_y = banded.analysis(model, pixels, *text, 3e5)
    layers = banded.analysis_layers(model.g_a)
    assert len(bands.blocks(*whole.shape[-2:], 3e5 // bands.bytes_per_output(layers))) > 4
    assert torch.allclose(banded_y, whole, atol=1e-5)


def test_a_forged_size_above_the_limit_or_the_format_is_refused_before_anything_is_allocated():
    model = tiny_model(config=TINY, text_adapter=False)
    data = model.compress(natural_image(64, 64), "")
    fields = list(container.HEADER.unpack_from(data))
    fields[3], fields[4] = 16384, 16384                         # 268 megapixels, the format's maximum
    body = container.HEADER.pack(*fields) + data[container.HEADER.size:-container.CHECKSUM.size]
    forged = body + container.CHECKSUM.pack(__import__("zlib").crc32(body))
    with pytest.raises(container.BitstreamError, match="268 megapixels, more than the limit of 134"):
        model.decompress(forged)
    fields[3], fields[4] = 65535, 65535                         # 4.3 gigapixels: more than the format describes
    body = container.HEADER.pack(*fields) + data[container.HEADER.size:-container.CHECKSUM.size]
    with pytest.raises(container.BitstreamError, match="impossible image size"):
        model.decompress(body + container.CHECKSUM.pack(__import__("zlib").crc32(body)))
    with pytest.raises(container.BitstreamError, match="more than the limit of 0"):
        model.decompress(data, max_pixels=100)


def test_the_format_takes_images_up_to_its_limit_and_refuses_larger_ones():
    view = lambda h, w: torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, h, w)   # noqa: E731 (no memory)
    assert container.describe(view(12000, 12000)).height == 12000          # 144 MP: above the decoder's default
    for h, w in ((17000, 17000), (1, 70000)):
        with pytest.raises(ValueError, match="larger than this format allows"):
            container.describe(view(h, w))


def test_progress_hears_every_band_and_the_library_is_quiet_by_default(tiny_hyperprior, capsys):
    model = tiny_hyperprior
    heard = []
    data = model.compress(natural_image(70, 100), "a", memory=2e5, progress=lambda *a: heard.append(a))
    model.decompress(data, memory=2e5, progress=lambda *a: heard.append(a))
    stages = {name for name, _, _ in heard}
    assert {"text", "g_a", "coding", "g_s"} <= stages and max(total for _, _, total in heard) > 1
    assert all(done <= total for _, done, total in heard)
    model.decompress(data, memory=2e5)
    assert capsys.readouterr() == ("", "")


def test_sixteen_bit_grayscale_comes_back_as_sixteen_bits(tmp_path):
    model = tiny_model(config=TINY, text_adapter=False)
    ramp = (natural_image(64, 96).mean(1, keepdim=True) * 65535).round().to(torch.uint16)
    data = model.compress(ramp, "")
    decoded = model.decompress(data, dtype=None)
    assert decoded.dtype == torch.uint16 and decoded.shape == ramp.shape
    eight = model.decompress(data, dtype=torch.float32)
    assert (decoded.float() / 65535 - eight).abs().max() <= 0.5 / 65535 + 1e-7
    path = str(tmp_path / "out.png")
    images.write_image(decoded, path)
    with Image.open(path) as image:
        assert image.mode.startswith("I;16") or image.mode == "I"


def test_the_cli_refuses_an_image_above_the_pixel_limit_and_writes_nothing(tmp_path, capsys):
    model = tiny_model(config=TINY, text_adapter=False)
    checkpoints.save_checkpoint(str(tmp_path / "model.pt"), model)
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    code = codec.main(["compress", str(tmp_path / "big.png"), "--checkpoint", str(tmp_path / "model.pt"),
                       "--max-image-pixels", "5000"])
    assert code == 1
    assert "more than the limit of 5000 pixels set by --max-image-pixels" in capsys.readouterr().err
    assert not (tmp_path / "big.taco").exists()


def test_per_image_figures_refuse_sizes_they_would_hold_in_one_piece():
    from machinery import explain, metrics
    model = tiny_model(config=TINY, text_adapter=False)
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 4097, 4097)                # a view: nothing allocated
    with pytest.raises(ValueError, match="downsample it first"):
        explain.analyse(model, huge, "")
    metrics.check_one_piece(4096, 4096, "the largest one-piece image")     # 16.8 MP is still fine
