"""Claims about what a user meets in the first hour, through the command lines: what can be checked is checked
before any model is loaded or pixel coded, one line naming the value or file; an unreadable image costs an
evaluation only its own row; photos read the right way up; nothing is chosen silently."""
import json
import os
import runpy
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import codec
import eval as evaluation
import train
from machinery import images, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = "absent.pt"                  # a checkpoint that does not exist: every refusal below comes before it


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_codec_refuses_bad_outputs_and_devices_in_one_line_before_reading_the_checkpoint(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    (tmp_path / "folder").mkdir()
    cases = [(["compress", str(photo), "-o", str(tmp_path / "nodir" / "a.taco")], "its folder .* does not exist"),
             (["compress", str(photo), "-o", str(tmp_path / "folder"), "--force"], "is a folder"),
             (["decompress", str(tmp_path / "a.taco"), "-o", str(tmp_path / "decoded_noext")],
              "extension '\\(none\\)'"),
             (["compress", str(photo), "--device", "gpu"], "unknown device 'gpu': cpu, cuda"),
             (["decompress", str(tmp_path / "a.taco"), "--device", "cuda:7"], "cuda")]
    for argv, message in cases:
        assert codec.main([*argv, "--checkpoint", str(tmp_path / ABSENT)]) == 1
        assert __import__("re").search(message, one_error_line(capsys)), argv
    if not torch.cuda.is_available():
        assert codec.main(["compress", str(photo), "--device", "cuda", "--checkpoint", ABSENT]) == 1
        assert "no CUDA device on this machine" in one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--memory", "-5"], "must be a positive number of MiB, not -5"),
    (["--memory", "0"], "must be a positive number of MiB, not 0"),
    (["--caption", "a", "--caption-file", "c.txt"], "not allowed with argument --caption"),
])
def test_codec_refuses_a_memory_that_is_not_positive_and_two_captions(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        codec.main(["compress", "photo.png", "--checkpoint", ABSENT, *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_images_and_caption_files_are_named_and_small_limits_speak_in_pixels(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(photo)
    (tmp_path / "truncated.png").write_bytes(photo.read_bytes()[:-30])
    with pytest.raises(OSError, match="truncated.png cannot be read as an image"):
        images.read_pixels(str(tmp_path / "truncated.png"))
    with pytest.raises(ValueError, match="40x50|50x40") as refused:
        images.read_pixels(str(photo), max_pixels=1000)
    assert "1000 pixels set by --max-image-pixels" in str(refused.value) and "Pillow" not in str(refused.value)
    (tmp_path / "caption.txt").write_bytes("une tasse de caf\xe9".encode("latin-1"))
    assert codec.main(["compress", str(photo), "--caption-file", str(tmp_path / "caption.txt"), "--checkpoint",
                       ABSENT]) == 1
    assert "caption file" in (err := one_error_line(capsys)) and "caption.txt is not UTF-8" in err


def exif_rotated_jpeg(path, stored_hw=(16, 32)):
    """A JPEG stored landscape with EXIF orientation 6 (turn 90 degrees clockwise to view): a phone's portrait."""
    H, W = stored_hw
    array = np.zeros((H, W, 3), np.uint8)
    array[:, : W // 2] = 255                                            # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, quality=95, exif=exif.tobytes())
    return array


def test_a_phone_photo_is_read_as_viewers_show_it_for_compress_eval_and_training(tmp_path):
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    x = images.read_pixels(str(tmp_path / "phone.jpg"))
    assert x.shape == (1, 3, 32, 16)                                     # portrait, as shown
    assert x[0, :, :8].float().mean() > 200 and x[0, :, -8:].float().mean() < 50   # white on top after the turn
    import data
    assert data.load_rgb(str(tmp_path / "phone.jpg")).shape == (3, 32, 16)     # training reads the same way


def sixteen_bit_rgb_png(path, H=4, W=5):
    """A PNG with 16 bits per RGB channel, written byte by byte (Pillow writes none)."""
    a = (np.arange(H * W * 3).reshape(H, W, 3) * 1000).astype(">u2")
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(H))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_is_said_to_be_read_as_8_bits(tmp_path, capsys):
    sixteen_bit_rgb_png(tmp_path / "deep.png")
    assert images.read_pixels(str(tmp_path / "deep.png")).dtype == torch.uint8
    assert "16 bits per channel; it is read as 8-bit RGB" in capsys.readouterr().out
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "plain.png")
    images.read_pixels(str(tmp_path / "plain.png"))
    assert capsys.readouterr().out == ""


def test_compress_names_a_random_text_tower_and_decompress_a_lossy_output(weights_folder, tmp_path, capsys):
    photo = str(weights_folder / "images" / "cat.png")
    checkpoint = str(weights_folder / "tiny.pt")
    assert codec.main(["compress", photo, "--caption", "a cat", "--checkpoint", checkpoint,
                       "-o", str(tmp_path / "cat.taco")]) == 0
    assert "STAND-IN: this checkpoint's CLIP text tower has random weights" in capsys.readouterr().out
    assert codec.main(["decompress", str(tmp_path / "cat.taco"), "--checkpoint", checkpoint,
                       "-o", str(tmp_path / "cat.jpg")]) == 0
    assert "cat.jpg is a lossy format: the decoded image is re-encoded" in capsys.readouterr().out


def test_eval_explain_without_a_caption_refuses_and_a_bad_device_is_one_line(weights_folder, tmp_path):
    common = ["--checkpoint", str(weights_folder / "tiny.pt"), "--explain", str(weights_folder / "images/cat.png"),
              "-o", str(tmp_path / "e.png")]
    with pytest.raises(SystemExit, match="give --caption"):
        evaluation.main(common)
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        evaluation.main([*common, "--caption", "a cat", "--device", "gpu"])
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        evaluation.main(["--checkpoint", ABSENT, "--images", str(weights_folder / "images"), "--device", "gpu"])


def eval_arguments(folder, images, out, *extra):
    return ["--checkpoint", str(folder / "tiny.pt"), "--images", str(images), "--captions",
            str(folder / "captions.json"), "--baselines", "JPEG", "--out", str(out), *extra]


def test_an_unreadable_photo_costs_only_its_row_and_resume_keeps_the_rest(weights_folder, tmp_path, capsys,
                                                                          monkeypatch):
    photos = tmp_path / "photos"
    shutil.copytree(weights_folder / "images", photos)
    good = (photos / "rocket.png").read_bytes()
    (photos / "rocket.png").write_bytes(good[: len(good) // 2])               # truncated
    out = tmp_path / "out"
    evaluation.main(eval_arguments(weights_folder, photos, out))
    printed = capsys.readouterr()
    assert "rocket.png cannot be read as an image" in printed.out + printed.err
    report = json.loads((out / "results.json").read_text())
    assert list(report["unreadable"]) == ["rocket.png"]
    rows = (out / "rows-0.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["image"] for r in rows if "bpp" in json.loads(r)) == ["cat.png", "coffee.png"]
    assert len((out / "baselines-0.jsonl").read_text().splitlines()) == 2      # swept as they finished

    (photos / "rocket.png").unlink()
    monkeypatch.setattr(evaluation.image_files, "read_image", None)        # nothing may be coded again,
    monkeypatch.setattr(training.baselines, "pillow_sweep", None)            # nor swept
    evaluation.main(eval_arguments(weights_folder, photos, out, "--resume"))
    assert "1 image(s) of the earlier run are no longer in --images" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["unreadable"] == {} and again["baselines"] == report["baselines"]
    per_image = again["checkpoints"][str(weights_folder / "tiny.pt")]["given"]["per_image"]
    assert [r["image"] for r in per_image] == ["cat.png", "coffee.png"]


def test_a_training_folder_counts_what_it_skips_and_decodes_each_image_once(tmp_path, capsys):
    for name in ("a.png", "b.png", "uncaptioned.png"):
        Image.fromarray(np.full((70, 70, 3), 90, np.uint8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes((tmp_path / "b.png").read_bytes()[:-40])
    captions = {"a.png": "a gray square", "b.png": "another"}
    items = train.data.folder_items(str(tmp_path), captions, 64)
    assert [os.path.basename(p) for p, _ in items] == ["a.png"]
    assert "1 images, 1 without a caption (skipped), 1 unreadable (skipped)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--data", "folder"], "--data folder needs --root"),
    (["--data", "folder", "--root", "."], "--data folder needs --captions"),
    (["--data", "cocoo", "--clip-pretrained", "openai"], "unknown --data 'cocoo'"),
])
def test_train_names_a_missing_or_misspelt_data_flag_before_any_weights(tmp_path, argv, message, monkeypatch):
    monkeypatch.setattr(training, "build_towers", None)                     # never reached
    with pytest.raises(SystemExit, match=message):
        train.train(train.parse_args([*argv, "--out", str(tmp_path / "run")]))


@pytest.mark.parametrize("program, where", [("train.py", "no checkpoint was written yet; the same command with "
                                                          "--resume"),
                                            ("eval.py", "every finished row is kept in --out")])
def test_ctrl_c_ends_in_one_line_that_says_how_to_resume(program, where, monkeypatch, tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "check_data_flags", interrupt)
    monkeypatch.setattr(train.data, "list_images", interrupt)
    monkeypatch.setattr("sys.argv", [program, "--out", str(tmp_path / "run")] +
                        (["--checkpoint", ABSENT, "--images", "."] if program == "eval.py" else []))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, program), run_name="__main__")
    assert str(stop.value).startswith("interrupted: ") and where in str(stop.value)
