"""Claims about explain.py: the bits map is the model's own likelihood bits, the attention shown is the adapter's
own, and the caption's effect is zero exactly when the adapter's gammas are."""
import pytest
import torch
from helpers import TINY, TINY_ELIC, natural_image, tiny_model
from PIL import Image

import eval as evaluation
import taco
from machinery import checkpoints, container, explain


@pytest.mark.parametrize("config", [TINY, TINY_ELIC], ids=["hyperprior", "elic"])
def test_bits_map_totals_the_likelihood_bits_of_the_same_forward_pass_and_the_file_adds_the_header(request, config):
    """The bits map is the model's own estimate; the file is that estimate's streams plus the header the figure
    names (that the streams are within a fraction of a percent of the estimate: test_taco.py)."""
    model = request.getfixturevalue("tiny_elic" if config is TINY_ELIC else "tiny_hyperprior")
    x = natural_image(70, 100)
    result = explain.analyse(model, x, "a red barn")
    with torch.no_grad():
        likelihoods = model(taco.pad_to_64(x), ["a red barn"])["likelihoods"]
    total_y, total_z = -torch.log2(likelihoods["y"].double()).sum(), -torch.log2(likelihoods["z"].double()).sum()
    assert float(result["bits_y"].sum()) == pytest.approx(float(total_y), rel=1e-12)    # float64 summation order
    assert result["bits_z"] == pytest.approx(float(total_z), rel=1e-12)
    data = model.compress(x, "a red barn")
    *_, z_bytes, y_bytes = container.HEADER.unpack_from(data)
    assert result["bytes"] == len(data) and 8 * len(data) - explain.HEADER_BITS == 8 * (z_bytes + y_bytes)


def test_attention_shown_is_the_adapters_own_and_follows_the_caption(encoder):
    model, x = tiny_model(encoder, gammas=False, config=TINY), natural_image(64, 64)
    first = explain.analyse(model, x, "a red barn in the snow")
    assert torch.allclose(first["attention"].sum(-1), torch.ones(first["attention"].shape[:2]), atol=1e-5)
    assert first["attention"].shape[:2] == (16, 16)                             # the first Injector: 1/4
    other = explain.analyse(model, x, "two boats on a lake")
    assert not torch.allclose(first["attention"], other["attention"])
    words = [w for w, _, _ in explain.word_attention(first)]
    assert words and set(words) <= {"a", "red", "barn", "in", "the", "snow"}
    assert all(not i.record_attention and i.attention is None for i in explain.injectors(model))


@pytest.mark.parametrize("gammas", [False, True])
def test_caption_changes_the_bits_map_exactly_when_the_gammas_are_nonzero(encoder, gammas):
    model, x = tiny_model(encoder, gammas=gammas, config=TINY), natural_image(64, 128)
    with_caption, empty = explain.analyse(model, x, "a red barn"), explain.analyse(model, x, "")
    assert torch.equal(with_caption["bits_y"], empty["bits_y"]) != gammas


def test_the_explain_cli_writes_any_format_whole_and_never_overwrites_or_leaves_a_partial_file(tmp_path, capsys,
                                                                                              tiny_hyperprior,
                                                                                              monkeypatch):
    """A PNG, then another format (PDF: written as asked, not as the temporary file's name says); an unknown format
    is refused before anything is touched; a failed write leaves the earlier figure and no temporary file."""
    checkpoints.save_checkpoint(str(tmp_path / "tiny.pt"), tiny_hyperprior)
    Image.fromarray((natural_image(64, 96)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(
        tmp_path / "photo.png")
    base = ["--checkpoint", str(tmp_path / "tiny.pt"), "--explain", str(tmp_path / "photo.png"), "--caption",
            "a red barn", "-o"]
    evaluation.main(base + [str(tmp_path / "explain.png")])
    assert "with the caption" in capsys.readouterr().out
    with Image.open(tmp_path / "explain.png") as figure:
        assert figure.size[0] > 800
    before = (tmp_path / "explain.png").read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        evaluation.main(base + [str(tmp_path / "explain.png")])
    assert (tmp_path / "explain.png").read_bytes() == before

    base.insert(-1, "--force")
    for name, magic in (("fig.pdf", b"%PDF"), ("fig.jpg", b"\xff\xd8"), ("fig.svg", b"<?xml")):   # as asked
        evaluation.main(base + [str(tmp_path / name)])
        assert (tmp_path / name).read_bytes().startswith(magic), name
    (tmp_path / "fig.xyz").write_bytes(b"the user's file")
    with pytest.raises(SystemExit, match="cannot write '.xyz'"):
        evaluation.main(base + [str(tmp_path / "fig.xyz")])
    assert (tmp_path / "fig.xyz").read_bytes() == b"the user's file"
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")
    import matplotlib.figure
    old = (tmp_path / "fig.pdf").read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        evaluation.main(base + [str(tmp_path / "fig.pdf")])
    assert (tmp_path / "fig.pdf").read_bytes() == old                  # --force, and still the old figure
    assert sorted(p.name for p in tmp_path.iterdir()) == before        # no partial or temporary file left


@pytest.mark.parametrize("size", [(64, 1024), (1024, 64)], ids=["wide", "tall"])
def test_extreme_aspect_ratios_give_a_bounded_readable_figure_of_the_costliest_window(tmp_path, tiny_hyperprior,
                                                                                    size):
    """16:1 and 1:16, four and eight times past what is drawn whole; the costly band far from the start."""
    x = natural_image(*size)
    explain.explain(tiny_hyperprior, x, "a long strip", str(tmp_path / "fig.png"))
    with Image.open(tmp_path / "fig.png") as figure:
        width, height = figure.size
    assert width <= 1280 and 300 <= height <= 2200
    H, W = size
    bits = torch.rand(H, W).numpy()
    bits[700:716] = bits[:, 700:716] = 50.0                            # a costly band of rows / of columns
    rows, columns = explain.window(bits)
    assert (rows.stop - rows.start, columns.stop - columns.start) == ((H, 4 * H) if W > H else (2 * W, W))
    assert (columns.start <= 700 and columns.stop >= 716) if W > H else (rows.start <= 700 and rows.stop >= 716)
