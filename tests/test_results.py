"""Claims about eval.py at the paper's scale (results.py): the image list and COCO's annotation file are read as
they are published; rows are stored as they finish, so a run killed with SIGKILL and resumed ends with the results
of an uninterrupted run; torchrun's processes share the images and give the results of one process. One
uninterrupted run (`whole`) is what every other run here must reproduce."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import eval as evaluation
from machinery import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("encode_s", "decode_s")


def test_an_image_list_selects_and_orders_the_images_and_names_what_is_missing(weights_folder, tmp_path):
    images = str(weights_folder / "images")
    (tmp_path / "list.json").write_text(json.dumps(["rocket.png", "coffee.png", "rocket.png"]))
    assert data.list_images(images, str(tmp_path / "list.json")) == ["rocket.png", "coffee.png"]
    (tmp_path / "list.txt").write_text("cat.png\n\ncoffee.png\n")
    assert data.list_images(images, str(tmp_path / "list.txt")) == ["cat.png", "coffee.png"]
    (tmp_path / "bad.json").write_text(json.dumps(["cat.png", "COCO_val2014_000000000042.jpg"]))
    with pytest.raises(SystemExit, match="1 image.*not in .*COCO_val2014_000000000042.jpg"):
        data.list_images(images, str(tmp_path / "bad.json"))
    assert data.list_images(images) == ["cat.png", "coffee.png", "rocket.png"]


def test_a_coco_annotation_file_gives_each_image_its_lowest_id_caption(tmp_path):
    """The layout of COCO's captions_val2014.json, annotations in no particular order."""
    coco = {"info": {}, "licenses": [],
            "images": [{"id": 7, "file_name": "coffee.png", "width": 150, "height": 100},
                       {"id": 9, "file_name": "cat.png", "width": 150, "height": 100}],
            "annotations": [{"id": 51, "image_id": 7, "caption": "A cup of coffee on a saucer. "},
                            {"id": 12, "image_id": 7, "caption": "Coffee in a white cup."},
                            {"id": 30, "image_id": 9, "caption": "A cat lying down."}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    captions = data.captions_for(["coffee.png", "cat.png"], str(tmp_path / "captions_val2014.json"), False)
    assert captions == {"coffee.png": "Coffee in a white cup.", "cat.png": "A cat lying down."}


def test_the_references_coco_pair_file_is_read_as_laid_out_and_last_picks_the_caption_its_script_reported(
        tmp_path):
    """materials/mscoco_val41k_img_cap_pair.json: {file: [captions]}; its script's figures are the last one's."""
    pairs = {"COCO_val2014_000000000042.jpg": ["A dog on a bench.", "A brown dog sits.", "Bench with a dog."],
             "COCO_val2014_000000000073.jpg": ["A motorcycle."]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    names = list(pairs)
    assert data.captions_for(names, str(tmp_path / "pairs.json"), False, "last") == {
        names[0]: "Bench with a dog.", names[1]: "A motorcycle."}
    assert data.captions_for(names, str(tmp_path / "pairs.json"), False)[names[0]] == "A dog on a bench."


def arguments(folder, out, *extra):
    return ["--checkpoint", str(folder / "tiny.pt"), "--images", str(folder / "images"), "--captions",
            str(folder / "captions.json"), "--baselines", "", "--out", str(out), *extra]


@contextlib.contextmanager
def one_thread():
    """This process computes as the eval.py processes below do (OMP_NUM_THREADS=1): the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(weights_folder, tmp_path_factory):
    """conftest's three photos evaluated without interruption, in this process: the folder eval.py wrote."""
    out = tmp_path_factory.mktemp("results") / "whole"
    with one_thread():
        evaluation.main(arguments(weights_folder, out))
    return out


def results_of(out):
    return json.loads((out / "results.json").read_text())


def test_a_finished_run_is_never_overwritten_and_resume_needs_its_settings(weights_folder, whole, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    with pytest.raises(SystemExit, match="holds an earlier evaluation"):
        evaluation.main(arguments(weights_folder, out))
    with pytest.raises(SystemExit, match="evaluated with --ablation False, this run asks for True"):
        evaluation.main(arguments(weights_folder, out, "--resume", "--ablation"))
    (tmp_path / "list.json").write_text(json.dumps(["cat.png"]))
    rows = (out / "rows-0.jsonl").read_text()
    evaluation.main(arguments(weights_folder, out, "--resume", "--image-list", str(tmp_path / "list.json")))
    assert [r["image"] for r in next(iter(results_of(out)["checkpoints"].values()))["given"]["per_image"]] == \
        ["cat.png"] and (out / "rows-0.jsonl").read_text() == rows            # the others' rows kept, not recoded
    evaluation.main(arguments(weights_folder, out, "--resume"))                # nothing left to code
    assert without_timings(results_of(out)) == without_timings(results_of(whole))
    evaluation.main(arguments(weights_folder, out, "--force", "--image-list", str(tmp_path / "list.json")))
    assert len((out / "rows-0.jsonl").read_text().splitlines()) == 1          # the three earlier rows are gone


def test_our_curve_is_written_in_compressais_results_layout(whole):
    layout = json.loads((whole / "compressai-taco-ours.json").read_text())
    mean = next(iter(results_of(whole)["checkpoints"].values()))["given"]["mean"]
    assert layout["name"] == "TACO (ours)"
    assert layout["results"]["bpp"] == [mean["bpp"]] and layout["results"]["psnr-rgb"] == [mean["psnr"]]
    assert layout["results"]["ms-ssim-rgb"] == [mean["ms_ssim"]]


def without_timings(report):
    """results.json without wall times (which no two runs share) and the output folder's name."""
    for entry in report["checkpoints"].values():
        for run in ("given", "empty", "shuffled") if "empty" in entry else ("given",):
            for key in TIMINGS:
                entry[run]["mean"].pop(key)
            for row in entry[run]["per_image"]:
                for key in TIMINGS:
                    row.pop(key)
    return report


def run(args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")          # torchrun's workers: one thread each
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)


def finished(process):
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors[-3000:]


@pytest.mark.slow
def test_a_run_killed_after_its_first_image_resumes_to_the_results_of_an_uninterrupted_run(weights_folder, whole,
                                                                                          tmp_path):
    """Killed in its own process; resumed here (a fresh ResultStore reads the rows the killed process left)."""
    killed = run([sys.executable, "eval.py", *arguments(weights_folder, tmp_path / "killed")])
    rows = tmp_path / "killed" / "rows-0.jsonl"
    deadline = time.time() + 300
    while not (rows.exists() and rows.read_text().count("\n") >= 1):
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()[-3000:]
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert rows.read_text().count("\n") < 3 and not (tmp_path / "killed" / "results.json").exists()
    with one_thread():
        evaluation.main(arguments(weights_folder, tmp_path / "killed", "--resume"))
    assert len(rows.read_text().splitlines()) == 3                             # every row once
    assert without_timings(results_of(tmp_path / "killed")) == without_timings(results_of(whole))


@pytest.mark.slow
def test_two_torchrun_processes_share_the_images_and_give_the_results_of_one(weights_folder, whole, tmp_path):
    finished(run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
                  *arguments(weights_folder, tmp_path / "two")]))
    shares = [len((tmp_path / "two" / f"rows-{rank}.jsonl").read_text().splitlines()) for rank in (0, 1)]
    assert shares == [2, 1]                                                    # images 0, 2 and image 1
    one = results_of(whole)
    assert without_timings(results_of(tmp_path / "two")) == without_timings(one)
    assert "cmmd" in one["checkpoints"][str(weights_folder / "tiny.pt")]["given"]["mean"]


@pytest.mark.parametrize("partial", [b'{"checkpoint": "a", "capt', b"x" * 200_000], ids=["short", "over 64 KiB"])
def test_a_row_cut_off_mid_line_is_dropped_and_the_finished_rows_kept(tmp_path, partial):
    row = {"checkpoint": "a.pt", "captions": "given", "image": "0.png", "bpp": 0.5}
    (tmp_path / "rows-0.jsonl").write_bytes((json.dumps(row) + "\n").encode() * 3 + partial)
    (tmp_path / results.SETTINGS).write_text("{}")                           # the interrupted run's settings
    store = results.ResultStore(str(tmp_path), {}, resume=True)
    assert (tmp_path / "rows-0.jsonl").read_bytes() == (json.dumps(row) + "\n").encode() * 3
    assert store.done == {("a.pt", "given", "0.png")}
