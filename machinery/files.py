"""Files a crash cannot leave half-written: outputs written whole beside their target and moved into place,
never replacing what the user did not ask to replace, JSON-lines logs whose last line a kill may cut off, and
the settings that a resumed run must share with the run it continues."""
import glob
import json
import os


def refuse_overwrite(path, force=False, earlier=None, message=None):
    """Before anything is computed or written: FileExistsError (`message`, by default "<path> exists; pass --force
    to overwrite it") unless `force`, when `path` exists -- or, given glob patterns `earlier`, when the folder
    `path` holds a file matching one of them (an earlier run's)."""
    if earlier is None:
        found = os.path.exists(path)
    else:
        found = any(glob.glob(os.path.join(glob.escape(path), pattern)) for pattern in earlier)
    if found and not force:
        raise FileExistsError(message or f"{path} exists; pass --force to overwrite it")


def check_output(path, extensions=None, what="output"):
    """Before any work: ValueError naming `path` unless it can be written -- its folder exists, it is not a
    folder, and (given `extensions`, such as an image writer's) its extension is one of them."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: its folder {os.path.dirname(path) or '.'} does not exist")
    if extensions is not None and os.path.splitext(path)[1].lower() not in extensions:
        common = [e for e in (".png", ".tif", ".bmp", ".jpg", ".webp") if e in extensions]
        raise ValueError(f"{what} {path}: the extension {os.path.splitext(path)[1] or '(none)'!r} names no image "
                         f"format this can write: use {', '.join(common)} or another of Pillow's")


def check_resumed(earlier, settings, what):
    """Stop with a message naming the first of `settings` ({name: value}) that differs from the interrupted run's
    `earlier` ones, "<what> with <name> <earlier>, this run asks for <value>"; a setting the earlier run did not
    record (an older file) is not checked."""
    for name, value in settings.items():
        if name in earlier and earlier[name] != value:
            raise SystemExit(f"error: {what} with {name} {earlier[name]!r}, this run asks for {value!r}: resume "
                             f"with the same setting, or start anew in another --out")


def write_atomically(path, write):
    """write(temporary) for a temporary file beside `path` (with its extension, for writers that read the format
    off the name), then move it into place: a crash or an error leaves no partial file and whatever `path` held."""
    temporary = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def cut_unfinished_line(path):
    """A process killed while appending leaves at most one unfinished last line: cut it off, so that the next row
    starts a line of its own (read backwards from the end: the file may hold hundreds of thousands of rows)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        position = f.seek(0, os.SEEK_END)
        while position > 0:
            step = min(position, 1 << 16)
            position -= step
            f.seek(position)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                f.truncate(position + newline + 1)
                return
        f.truncate(0)


def read_jsonl(path):
    """The rows of a JSON-lines file, one per finished line: an unfinished last line (another process may be
    writing it, or was killed doing so) and a line that does not parse (a cut-off line that an earlier version
    closed with a newline) are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows
