"""Claims about the classical codecs (baselines.py) and the published anchors (report.py): HEVC intra and JPEG XL
are swept from real bytes when their plugins are installed and named in one line when not; HEVC's bytes are its
stream without the HEIF boxes; BD-rate against the published VTM curve is Bjontegaard's, checked against an
independent computation on CompressAI's own numbers; the Kodak comparison is made on Kodak only."""
import io

import numpy as np
import pytest
from helpers import natural_image
from PIL import Image

from machinery import baselines, metrics, report


def independent_bd_rate(anchor, test):
    """Bjontegaard's delta rate computed another way: numpy's Polynomial fits of ln(rate) over PSNR, the mean
    difference by the trapezoid rule on a fine grid over the PSNR range both curves cover."""
    from numpy.polynomial import Polynomial
    (ra, pa), (rb, pb) = (np.array(list(zip(*c))) for c in (anchor, test))
    fa, fb = Polynomial.fit(pa, np.log(ra), 3), Polynomial.fit(pb, np.log(rb), 3)
    grid = np.linspace(max(pa.min(), pb.min()), min(pa.max(), pb.max()), 200_001)
    difference = fb(grid) - fa(grid)
    mean = np.sum((difference[1:] + difference[:-1]) / 2 * np.diff(grid)) / (grid[-1] - grid[0])
    return (np.exp(mean) - 1) * 100


def test_bd_rate_of_bpg_against_vtm_from_compressais_files_matches_an_independent_computation():
    ours = metrics.bd_rate(report.VTM, report.BPG)
    assert ours == pytest.approx(independent_bd_rate(report.VTM, report.BPG), abs=1e-4)
    assert 20 < ours < 24                                    # BPG 4:4:4 needs about 22% more bits than VTM
    assert metrics.bd_rate(report.VTM, report.MINNEN) == pytest.approx(
        independent_bd_rate(report.VTM, report.MINNEN), abs=1e-4)


def small_photo():
    return natural_image(32, 48, seed=3)                                          # (1, 3, 32, 48) in [0, 1]


@pytest.mark.parametrize("codec", ["HEIC", "JXL"])
def test_hevc_intra_and_jpeg_xl_sweep_a_small_image_from_real_bytes(codec):
    missing = baselines.baseline_missing(codec)
    if missing:
        pytest.skip(missing)
    x = small_photo()
    sweep = list(baselines.pillow_sweep(x, codec))
    assert len(sweep) >= 12
    rates = [bpp for _, bpp, _, _, _ in sweep]
    quality = [float(metrics.psnr(decoded, x)) for _, _, decoded, _, _ in sweep]
    assert all(decoded.shape == x.shape for _, _, decoded, _, _ in sweep)
    assert rates[-1] > 4 * rates[0] and quality[-1] > quality[0] + 1              # coarsest first, finest last


def test_hevc_is_4_4_4_at_constant_qp_and_counts_its_stream_without_the_heif_boxes():
    if baselines.baseline_missing("HEIC"):
        pytest.skip(baselines.baseline_missing("HEIC"))
    import pillow_heif
    array = (small_photo()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    files = {}
    for quality in (10, 90):                                 # Pillow's quality is ignored: the QP decides
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="HEIF", quality=quality, chroma=baselines.HEVC_CHROMA,
                                    enc_params={"x265:qp": "30", **baselines.HEVC_SETTINGS})
        files[quality] = buffer.getvalue()
    assert files[10] == files[90]
    heif = files[10]
    assert pillow_heif.open_heif(io.BytesIO(heif)).info["chroma"] == 444
    mdat = heif.find(b"mdat")                                  # the coded image, found by its box's name
    payload = int.from_bytes(heif[mdat - 4:mdat], "big") - 8
    stream = baselines.hevc_stream_bytes(heif)
    assert payload < stream < payload + 200                    # + the parameter sets (VPS, SPS, PPS)
    assert 150 < len(heif) - stream < 1000                     # the HEIF boxes left out
    bpp = baselines.pillow_codec(small_photo(), "HEIC", 30)[0]
    assert bpp == 8 * stream / (32 * 48)


def test_a_missing_plugin_is_named_in_one_line_and_the_other_baselines_go_on(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(baselines.PLUGINS, "JXL", ("no_such_jxl_module", "pillow-jxl-plugin"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")

    class Store:
        rows = []

        def baselines(self):
            return {}

        def add_baseline(self, row):
            self.rows.append(row)
    curves = report.baseline_curves(str(tmp_path), ["a.png"], ["JXL", "JPEG"], Store())
    assert list(curves) == ["JPEG"] and len(Store.rows) == 1
    assert "note: JXL needs pillow-jxl-plugin (pip install pillow-jxl-plugin); skipped" in capsys.readouterr().out


def test_kodak_is_recognised_by_its_24_names_and_sizes_and_nothing_else(tmp_path):
    names = [f"kodim{i:02d}.png" for i in range(1, 25)]
    for i, name in enumerate(names):
        Image.fromarray(np.zeros((512, 768) if i % 3 else (768, 512), np.uint8)).save(tmp_path / name)
    assert report.kodak_mismatch(str(tmp_path), names) is None
    assert "23 images" in report.kodak_mismatch(str(tmp_path), names[:23])
    Image.fromarray(np.zeros((500, 768), np.uint8)).save(tmp_path / "kodim05.png")
    assert "kodim05.png is 768x500" in report.kodak_mismatch(str(tmp_path), names)

