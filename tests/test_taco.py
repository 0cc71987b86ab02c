"""Claims about taco.py: files decode bit-exactly without the caption, and bad files fail clearly."""
import os
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, TINY_CLIP, natural_image, tiny_model
from PIL import Image

import codec
from machinery import checkpoints, clip_text, container, images, integer
from machinery.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from machinery.clip_text import TextEncoder
from machinery.container import BitstreamError
from taco import GDN, TACO, TacoConfig



def eval_reconstruction(model, x, caption):
    """The model's own forward pass at test time, on the padded image, cropped back."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (0, -W % 64, 0, -H % 64), mode="replicate")
    with torch.no_grad():
        return model(padded, [caption])["x_hat"].clamp(0, 1)[:, :, :H, :W]


@pytest.mark.parametrize("size", [(17, 33), (130, 200)])
@pytest.mark.core
def test_lossless_round_trip_a_taco_file_decodes_to_the_models_own_reconstruction_exactly(tiny_hyperprior, size):
    model = tiny_hyperprior
    x = natural_image(*size)
    data = model.compress(x, "a red barn in the snow")
    assert torch.equal(model.decompress(data), eval_reconstruction(model, x, "a red barn in the snow"))


@pytest.mark.core
def test_decoding_needs_no_caption_and_zero_gammas_make_the_caption_irrelevant(encoder):
    x = natural_image(64, 96)
    model = tiny_model(encoder, gammas=False)
    first, second = model.compress(x, "a cat"), model.compress(x, "an aircraft carrier at dawn")
    assert first == second
    decoder = TACO(model.config).eval()              # a fresh model: no text encoder anywhere
    decoder.load_state_dict(model.state_dict())
    assert decoder.text_encoder is None
    assert torch.equal(decoder.decompress(first), model.decompress(first))


def test_with_nonzero_gammas_the_caption_changes_the_bitstream(encoder):
    x = natural_image(64, 96)
    model = tiny_model(encoder, gammas=True)
    assert model.compress(x, "a cat") != model.compress(x, "an aircraft carrier at dawn")


@pytest.mark.core
def test_adapter_off_is_the_plain_mean_scale_hyperprior():
    """No adapter weights, and g_a is conv 5x5/2 + GDN three times, then conv 5x5/2: computed here layer by layer
    with F.conv2d and GDN's formula (Balle et al. 2017; Minnen et al. 2018)."""
    torch.manual_seed(0)
    plain = TACO(TacoConfig(**{**TINY, "text_adapter": False})).eval()
    adapted = TACO(TacoConfig(**TINY))
    adapter_keys = set(adapted.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(adapted.state_dict())
    assert adapter_keys and all(k.startswith(("g_a.inject_", "g_a.extract_")) for k in adapter_keys)
    x = natural_image(64, 128)
    h = x.double()
    for i in range(4):
        conv = plain.g_a.stages[i] if i == 3 else plain.g_a.stages[i][0]
        h = F.conv2d(h, conv.weight.double(), conv.bias.double(), stride=2, padding=2)
        if i < 3:
            gdn = plain.g_a.stages[i][1]
            beta, gamma = gdn.beta().double(), gdn.gamma().double()
            h = h / torch.sqrt(beta[None, :, None, None] + torch.einsum("ij,bjhw->bihw", gamma, h ** 2))
    with torch.no_grad():
        assert torch.allclose(plain.g_a(x), h.float(), atol=1e-5)
    assert plain.h_s[-1].out_channels == 2 * plain.config.M                 # scales and means of y


@pytest.mark.core
def test_igdn_inverts_gdn():
    """IGDN is the first step of the fixed-point iteration x = y * sqrt(beta + gamma x^2) that inverts GDN
    (Balle et al. 2016); exact where gamma = 0, and the iteration from it recovers x."""
    torch.manual_seed(0)
    gdn, igdn = GDN(4), GDN(4, inverse=True)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        for module in (gdn, igdn):
            module.double().gamma.param.zero_()
        assert torch.allclose(igdn(gdn(x)), x, atol=1e-12)
        gamma = torch.sqrt(0.05 * torch.rand(4, 4, dtype=torch.float64) + 2 ** -36)
        for module in (gdn, igdn):
            module.gamma.param.copy_(gamma)
        y = gdn(x)
        beta, gamma = gdn.beta()[None, :, None, None], gdn.gamma()
        step = lambda estimate: y * torch.sqrt(beta + torch.einsum("ij,bjhw->bihw", gamma, estimate ** 2))  # noqa: E731
        estimate = igdn(y)
        assert torch.allclose(estimate, step(y))
        for _ in range(200):
            estimate = step(estimate)
        assert torch.allclose(estimate, x, atol=1e-9)


@pytest.mark.core
def test_model_without_text_adapter_codes_without_any_text_tower():
    model = TACO(TacoConfig(**{**TINY, "text_adapter": False})).eval().update()
    x = natural_image(40, 50)
    assert torch.equal(model.decompress(model.compress(x)), eval_reconstruction(model, x, None))


@pytest.mark.core
def test_real_y_stream_is_within_half_a_percent_of_the_models_own_estimate_and_z_and_the_file_add_up(encoder):
    """-sum log2 p(y_hat) from the eval-mode forward's likelihoods (the model's own estimate), against the bytes
    of y in the file, on a model moved to look trained: y's channels spread over 0.11-10 and h_s predicts each
    channel's mean and scale."""
    model = tiny_model(encoder)
    M, x, caption = model.config.M, natural_image(512, 512, seed=3), ["a photo"]
    sigma = torch.exp(torch.linspace(np.log(0.11), np.log(10), M))
    last, hyper = model.g_a.stages[3], model.h_s[-1]
    with torch.no_grad():
        y = model.g_a(x, *model.read_text(caption, "cpu"))
        gain = sigma / y.std(dim=(0, 2, 3))
        last.weight.mul_(gain.view(-1, 1, 1, 1)), last.bias.mul_(gain)
        y = model.g_a(x, *model.read_text(caption, "cpu"))
        hyper.weight.mul_(0.05)
        hyper.bias.copy_(torch.cat([sigma, y.mean(dim=(0, 2, 3))]))
        likelihoods = model(x, caption)["likelihoods"]
    estimate, z_estimate = (float(-torch.log2(likelihoods[k]).sum()) for k in ("y", "z"))
    data = model.compress(x, caption[0])
    *_, z_bytes, y_bytes = container.HEADER.unpack_from(data)
    assert estimate > 20_000
    assert estimate <= 8 * y_bytes <= 1.005 * estimate
    assert abs(8 * z_bytes - z_estimate) <= 0.03 * z_estimate + 64     # z: 1/4096 of the pixels, a few bytes more
    assert len(data) == container.HEADER.size + z_bytes + y_bytes + container.CHECKSUM.size


@pytest.mark.core
def test_gdn_follows_its_formula():
    torch.manual_seed(0)
    gdn = GDN(4)
    with torch.no_grad():
        gdn.gamma.param.add_(0.1 * torch.rand(4, 4))
        gdn.beta.param.add_(0.1 * torch.rand(4))
    x = torch.randn(2, 4, 3, 5)
    beta, gamma = gdn.beta().detach().numpy(), gdn.gamma().detach().numpy()
    xn = x.numpy()
    norm = beta[None, :, None, None] + np.einsum("ij,bjhw->bihw", gamma, xn ** 2)
    assert np.allclose(gdn(x).detach().numpy(), xn / np.sqrt(norm), rtol=1e-5, atol=1e-6)
    gdn.inverse = True
    assert np.allclose(gdn(x).detach().numpy(), xn * np.sqrt(norm), rtol=1e-5, atol=1e-6)
    assert (beta >= 1e-6).all() and (gamma >= 0).all()


def test_grayscale_and_rgba_inputs_are_handled(tiny_hyperprior):
    model = tiny_hyperprior
    gray = natural_image(40, 30)[:, :1]
    decoded = model.decompress(model.compress(gray, "x"))
    assert decoded.shape == (1, 1, 40, 30)
    rgba = torch.cat([natural_image(40, 30), torch.ones(1, 1, 40, 30)], dim=1)
    assert model.decompress(model.compress(rgba, "x")).shape == (1, 3, 40, 30)


@pytest.fixture(scope="module")
def coded(tiny_hyperprior):
    """A small file (383 bytes: every one of them is flipped below) and the model that wrote it."""
    model = tiny_hyperprior
    return model, model.compress(natural_image(17, 33), "a boat")


def test_truncated_file_raises_clear_error(coded):
    model, data = coded
    for cut in (0, 3, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(BitstreamError):
            model.decompress(data[:cut])


def test_every_flipped_byte_raises_clear_error(coded):
    model, data = coded
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x5A
        with pytest.raises(BitstreamError):
            model.decompress(bytes(corrupted))


def test_file_that_is_not_ours_raises_clear_error(coded):
    model, _ = coded
    with pytest.raises(BitstreamError, match="not a TACO file"):
        model.decompress(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_file_from_another_model_raises_clear_error(encoder, coded):
    _, data = coded
    other = tiny_model(encoder, seed=1)
    with pytest.raises(BitstreamError, match="another model"):
        other.decompress(data)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"config": {**TINY, "M": 32}, "state_dict": TACO(TacoConfig(**TINY)).state_dict()},
               tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="misshapen key.*g_a.stages.3"):
        load_checkpoint(str(tmp_path / "mismatch.pt"))


def test_cli_roundtrip_refuses_to_overwrite_and_reports_errors(encoder, tmp_path, capsys):
    from PIL import Image
    model = tiny_model(encoder, text_adapter=False)
    save_checkpoint(str(tmp_path / "model.pt"), model)
    image = (natural_image(45, 60)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    ckpt, photo, coded = str(tmp_path / "model.pt"), str(tmp_path / "photo.png"), str(tmp_path / "photo.taco")
    assert codec.main(["compress", photo, "--checkpoint", ckpt, "-o", coded]) == 0
    assert "bpp" in capsys.readouterr().out
    decoded = str(tmp_path / "decoded.png")
    assert codec.main(["decompress", coded, "--checkpoint", ckpt, "-o", decoded]) == 0
    expected = model.decompress(open(coded, "rb").read())
    assert np.array_equal(np.asarray(Image.open(decoded)),
                          (expected[0].permute(1, 2, 0) * 255).round().byte().numpy())

    before = open(coded, "rb").read()
    assert codec.main(["compress", photo, "--checkpoint", ckpt, "-o", coded]) == 1
    assert "--force" in capsys.readouterr().err and open(coded, "rb").read() == before
    for command in (["compress", photo], ["decompress", coded]):       # refused before the checkpoint is read
        out = coded if command[0] == "compress" else decoded
        assert codec.main([*command, "--checkpoint", str(tmp_path / "absent.pt"), "-o", out]) == 1
        assert "--force" in capsys.readouterr().err

    (tmp_path / "broken.taco").write_bytes(before[:-5])
    assert codec.main(["decompress", str(tmp_path / "broken.taco"), "--checkpoint", ckpt,
                      "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.png")


def test_codec_info_lays_a_file_open_without_a_checkpoint_and_refuses_a_damaged_one_as_decompress(
        tiny_hyperprior, tmp_path, capsys):
    from PIL import Image
    from machinery import container
    Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(tmp_path / "a.png")
    save_checkpoint(str(tmp_path / "model.pt"), tiny_hyperprior)
    assert codec.main(["compress", str(tmp_path / "a.png"), "--caption", "", "--checkpoint",
                       str(tmp_path / "model.pt")]) == 0
    data = (tmp_path / "a.taco").read_bytes()
    capsys.readouterr()
    assert codec.main(["info", str(tmp_path / "a.taco")]) == 0
    out = capsys.readouterr().out
    sizes = [int(n) for n in re.findall(r"^  (?:header|z|y|checksum) +(\d+) bytes", out, re.M)]
    assert sum(sizes) == len(data) and f"{len(data)} bytes" in out
    assert "70x40, RGB, 8 bits" in out and container.fingerprint(tiny_hyperprior).hex() in out
    z_len, y_len = struct.unpack(">II", data[22:30])                        # the header's own last two fields
    assert sizes[1:3] == [z_len, y_len]
    (tmp_path / "b.taco").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    errors = []
    for command in (["info"], ["decompress", "--checkpoint", str(tmp_path / "model.pt")]):
        assert codec.main([command[0], str(tmp_path / "b.taco"), *command[1:]]) == 1
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == "error: corrupted file: checksum mismatch\n"


def test_cli_text_model_requires_a_caption(tiny_hyperprior, tmp_path, capsys):
    from PIL import Image
    save_checkpoint(str(tmp_path / "model.pt"), tiny_hyperprior)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    assert codec.main(["compress", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "model.pt")]) == 1
    assert "--caption" in capsys.readouterr().err
    (tmp_path / "caption.txt").write_text("a black square\n")
    assert codec.main(["compress", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "model.pt"),
                      "--caption-file", str(tmp_path / "caption.txt")]) == 0
    assert os.path.exists(tmp_path / "a.taco")


def test_text_embedding_matches_open_clips_own_encode_text(encoder):
    """Our 38-token path and open_clip's 77-token encode_text agree for captions that fit."""
    import open_clip
    torch.manual_seed(0)
    clip = clip_text.load_clip(TINY_CLIP, "random")
    ours = TextEncoder(TINY_CLIP, "random", clip=clip)
    captions = ["a red barn in the snow", "two dogs", ""]
    _, _, embedding = ours(captions)
    with torch.no_grad():
        reference = clip.encode_text(open_clip.get_tokenizer("ViT-B-32-quickgelu")(captions))
    assert torch.allclose(embedding, reference, atol=1e-5)


def test_text_features_are_a_hand_written_clip_text_forward_over_38_tokens_with_the_padding_masked(encoder):
    """The reference read HF CLIP's last hidden state: start token, caption, end token, padded to 38 with the
    end token (a longer caption cut to the 36 tokens that fit between them), padding masked in the attention,
    final LayerNorm. Recomputed here by hand from the weights: a mask that were not applied, or applied to the
    caption's own positions, would change the features."""
    captions = ["a red barn in the snow!", "boats", "word " * 100]
    ids, padding = encoder.tokenize(captions)
    eot = encoder.tokenizer.eot_token_id
    body = [encoder.tokenizer.encode(c)[:36] for c in captions]
    assert ids.shape == (3, 38) and len(body[2]) == 36
    for row, tokens, pad in zip(ids.tolist(), body, padding.tolist()):
        assert row == [encoder.tokenizer.sot_token_id] + tokens + [eot] * (38 - 1 - len(tokens))
        assert pad == [False] * (len(tokens) + 2) + [True] * (36 - len(tokens))
    features, _ = encoder.encode(ids, padding)

    x = encoder.token_embedding.weight[ids] + encoder.positional_embedding[:38]
    allowed = torch.tril(torch.ones(38, 38, dtype=torch.bool))[None] & ~padding[:, None, :]   # (B, 38, 38)
    heads, width = encoder.transformer.resblocks[0].attn.num_heads, x.shape[-1]
    split = lambda t: t.view(3, 38, heads, width // heads).transpose(1, 2)            # (B, heads, T, d)
    with torch.no_grad():
        for block in encoder.transformer.resblocks:
            h = block.ln_1(x)
            q, k, v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
            scores = split(q) @ split(k).transpose(-1, -2) / (width // heads) ** 0.5
            scores = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
            attended = (scores @ split(v)).transpose(1, 2).reshape(3, 38, width)
            x = x + block.ls_1(block.attn.out_proj(attended))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        assert torch.allclose(features, encoder.ln_final(x), atol=1e-5)


def test_missing_pretrained_weights_fail_at_once_naming_the_flag_and_the_config_field(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))   # whatever this machine has
    with pytest.raises(clip_text.WeightsUnavailable, match=r"--clip-pretrained .*TacoConfig\(clip_pretrained="):
        clip_text.load_clip(TacoConfig().clip_model, "openai")


def test_without_network_the_hugging_face_hub_reads_its_cache_at_once_and_is_restored(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(clip_text, "reachable", lambda url, timeout=3.0: False)
    with clip_text.hub_offline_unless_reachable():
        assert constants.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE


def test_openai_weights_are_never_paired_with_the_wrong_gelu():
    """OpenAI's CLIP was trained with QuickGELU; open_clip's plain ViT-B-32 would silently use GELU."""
    import open_clip
    assert open_clip.get_model_config(TacoConfig().clip_model)["quick_gelu"] is True
    with pytest.raises(ValueError, match="ViT-B-32-quickgelu"):
        clip_text.load_clip("ViT-B-32", "openai")


def test_caption_cache_reuses_features_and_stays_bounded():
    torch.manual_seed(0)
    encoder = TextEncoder(TINY_CLIP, "random", cache_size=3)
    first, _, _ = encoder(["a cat", "a dog"])
    encoder.encode = None                                   # a cache hit must not run the text tower
    again, _, _ = encoder(["a dog", "a cat"])
    assert torch.equal(again, first.flip(0))
    del encoder.encode                                      # back to the class method
    encoder(["a bird", "a fish", "a cow"])
    assert list(encoder.cache) == ["a bird", "a fish", "a cow"]


def test_no_change_of_the_weights_goes_unseen_by_the_fingerprint_and_the_integer_networks(encoder):
    """Writes through .data do not bump a tensor's version counter; the file must still carry the new weights'
    fingerprint and be coded with their integer networks."""
    model = tiny_model(encoder)
    x = natural_image(64, 64)
    first, before = container.fingerprint(model), model.compress(x, "a boat")
    z_hat = torch.randn(1, model.config.N, 2, 2)
    hyper = integer.networks(model).h_s(z_hat)
    version = model.h_s[0].weight._version
    model.h_s[0].weight.data.mul_(2)
    assert model.h_s[0].weight._version == version                  # invisible to a version-counter cache
    assert container.fingerprint(model) != first
    assert not torch.equal(integer.networks(model).h_s(z_hat), hyper)
    after = model.compress(x, "a boat")
    copy = tiny_model(encoder)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.decompress(after), model.decompress(after)) and after != before


def test_sixteen_bit_and_gray_alpha_images_read_as_one_full_precision_channel(tmp_path):
    from PIL import Image
    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    x = images.read_image(str(tmp_path / "ramp16.png"))
    assert x.shape == (1, 1, 32, 32)
    assert np.allclose(x[0, 0].numpy(), ramp / 65535, atol=1e-7)
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.stack([gray, 255 - gray], -1), mode="LA").save(tmp_path / "la.png")
    x = images.read_image(str(tmp_path / "la.png"))
    assert x.shape == (1, 1, 16, 16) and np.allclose(x[0, 0].numpy(), gray / 255)


def test_adapter_model_without_text_says_what_it_needs(tiny_hyperprior):
    model = tiny_hyperprior
    with pytest.raises(ValueError, match="text adapter: pass captions"):
        model(torch.rand(1, 3, 64, 64))


def test_hyper_synthesis_gives_scales_then_means_and_old_checkpoints_are_converted(tiny_hyperprior, encoder,
                                                                                   tmp_path):
    model = tiny_hyperprior
    hyper = torch.cat([torch.full((1, 24, 1, 1), 3.0), torch.full((1, 24, 1, 1), 0.25)], dim=1)
    y = torch.full((1, 24, 1, 1), 0.25)
    _, likelihoods = model.eval().y_model(y, hyper, None)           # scale 3 around mean 0.25: P(0) of N(0, 9)
    from scipy.stats import norm
    assert np.allclose(likelihoods.numpy(), norm.cdf(0.5 / 3) - norm.cdf(-0.5 / 3), atol=1e-6)
    x = natural_image(64, 64)
    save_checkpoint(str(tmp_path / "new.pt"), model)
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["format"]                                               # format 1: h_s gave (means, scales)
    for key in ("h_s.4.weight", "h_s.4.bias"):
        old["state_dict"][key] = torch.cat(old["state_dict"][key].chunk(2)[::-1])
    torch.save(old, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(str(tmp_path / "old.pt"))
    assert loaded.attach_text_encoder(encoder).compress(x, "a cat") == model.compress(x, "a cat")


def test_a_checkpoint_with_a_nan_weight_names_the_key(tmp_path, encoder, capsys):
    model = tiny_model(encoder)
    with torch.no_grad():
        model.h_s[0].weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(str(tmp_path / "nan.pt"), model)
    with pytest.raises(CheckpointError, match="h_s.0.weight holds NaN or infinite values"):
        checkpoints.load_checkpoint(str(tmp_path / "nan.pt"))
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert codec.main(["compress", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nan.pt"),
                       "--caption", "a"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
