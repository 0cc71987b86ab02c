"""Evaluation results that survive a crash, for eval.py at the scale of MS-COCO 30k.

Each finished (checkpoint, caption mode, image) is one JSON line, appended the moment it is finished; the features
the set metrics need (CLIP and Inception embeddings of the original and the decoded image) are appended first to a
binary file beside it, and the line records where. A run killed at any moment loses only the image in flight (a
half-written last line is dropped); `--resume` skips every finished row. Several processes (torchrun ranks)
write their own pair of files, rows-<rank>.jsonl and features-<rank>.f32; every rank reads all of them, so a run
may be resumed with another number of processes.
"""
import glob
import json
import os
from pathlib import Path

import numpy as np

from machinery import devices, files

SETTINGS = "settings.json"


def key(row):
    return row["checkpoint"], row["captions"], row["image"]


def append(path, row):
    """One finished line at the end of a JSON-lines file (a kill leaves at most a cut-off last line)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def check(folder, settings, resume=False, force=False):
    """Refuse, before anything is computed or written: --resume of nothing or with other settings than the
    interrupted run's (naming the setting), and a fresh run in a folder that holds rows or results."""
    path = os.path.join(folder, SETTINGS)
    if resume:
        if not os.path.isfile(path):
            raise SystemExit(f"error: nothing to resume in {folder} (no {SETTINGS})")
        with open(path) as f:
            files.check_resumed(json.load(f), settings, f"{folder} was evaluated")
        return
    try:                                                        # a run that got nowhere is no loss
        files.refuse_overwrite(folder, force, earlier=("rows-*.jsonl", "results.json"),
                               message=f"{folder} holds an earlier evaluation; pass --resume to continue it or "
                                       f"--force to start again")
    except FileExistsError as error:
        raise SystemExit(f"error: {error}")


class ResultStore:
    """The rows of one run in `folder`. A fresh run refuses a folder that holds rows or results (unless `force`,
    which removes the rows); `resume` continues it and refuses settings that differ from the interrupted run's."""

    def __init__(self, folder, settings, rank=0, resume=False, force=False):
        self.folder = folder
        if rank == 0:
            self.prepare(settings, resume, force)
        devices.barrier()                                 # rank 0 has checked, cleaned and written the settings
        self.rows_path = os.path.join(folder, f"rows-{rank}.jsonl")
        self.features_path = os.path.join(folder, f"features-{rank}.f32")
        self.baselines_path = os.path.join(folder, f"baselines-{rank}.jsonl")
        for path in (self.rows_path, self.baselines_path):
            files.cut_unfinished_line(path)
        every = self.every_row()
        self.done = {key(row) for row in every if "unreadable" not in row}
        self.unreadable = {row["image"]: row["unreadable"] for row in every if "unreadable" in row}
        self.earlier_images = {row["image"] for row in every}                  # what an interrupted run reached

    def prepare(self, settings, resume, force):
        check(self.folder, settings, resume, force)
        if resume:
            return
        os.makedirs(self.folder, exist_ok=True)
        for old in self.files("rows-*.jsonl") + self.files("features-*.f32") + self.files("baselines-*.jsonl"):
            os.remove(old)
        text = json.dumps(settings, indent=1)
        files.write_atomically(os.path.join(self.folder, SETTINGS), lambda path: Path(path).write_text(text))

    def files(self, pattern):
        return sorted(glob.glob(os.path.join(self.folder, pattern)))

    def add(self, row, features):
        """Append one finished row; `features` {name: 1-d array} go to the binary file first."""
        with open(self.features_path, "ab") as f:
            offset = f.tell()
            for value in features.values():
                f.write(np.asarray(value, dtype=np.float32).tobytes())
        row = dict(row, features={"file": os.path.basename(self.features_path), "offset": offset,
                                  "sizes": {name: int(np.size(value)) for name, value in features.items()}})
        append(self.rows_path, row)
        self.done.add(key(row))

    def say_what_changed(self, images):
        """A resumed run over another set of images keeps the rows of those still there: say what it changed."""
        earlier = self.earlier_images
        gone, new = sorted(earlier - set(images)), [name for name in images if name not in earlier]
        if gone:
            print(f"resuming: {len(gone)} image(s) of the earlier run are no longer in --images / --image-list "
                  f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}): their rows are left out")
        if new and earlier:
            print(f"resuming: {len(new)} image(s) not in the earlier run are coded now")

    def add_unreadable(self, image, reason):
        """An image that cannot be read: recorded once, so that no later checkpoint, caption mode or resumed run
        tries it again, and results.json names it."""
        append(self.rows_path, {"image": image, "unreadable": reason})
        self.unreadable[image] = reason

    def every_row(self):
        """Every finished line of every rank (a half-written last line of another rank's file is skipped)."""
        return [row for path in self.files("rows-*.jsonl") for row in files.read_jsonl(path)]

    def rows(self):
        """Every finished row of every rank, unreadable images left out."""
        return [row for row in self.every_row() if "unreadable" not in row]

    def add_baseline(self, row):
        """One finished image of a Pillow baseline's quality sweep."""
        append(self.baselines_path, row)

    def baselines(self):
        """{(codec, image): row} of the finished baseline sweeps."""
        return {(r["codec"], r["image"]): r for path in self.files("baselines-*.jsonl")
                for r in files.read_jsonl(path)}

    def features(self, row):
        """{name: float32 array} of one row, read from the binary file."""
        where = row["features"]
        values, offset = {}, where["offset"]
        with open(os.path.join(self.folder, where["file"]), "rb") as f:
            for name, size in where["sizes"].items():
                f.seek(offset)
                values[name] = np.frombuffer(f.read(4 * size), dtype=np.float32)
                offset += 4 * size
        return values
