import json
import os

import pytest

from machinery import files


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.taco"
    path.write_bytes(b"before")

    def fails(temporary):
        open(temporary, "wb").write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(str(path), fails)
    assert path.read_bytes() == b"before" and os.listdir(tmp_path) == ["out.taco"]


def test_an_existing_file_or_an_earlier_run_is_refused_unless_forced(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="a.png exists; pass --force"):
        files.refuse_overwrite(str(tmp_path / "a.png"))
    files.refuse_overwrite(str(tmp_path / "a.png"), force=True)
    files.refuse_overwrite(str(tmp_path), earlier=("rows-*.jsonl",))            # nothing of an earlier run
    (tmp_path / "rows-0.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="earlier"):
        files.refuse_overwrite(str(tmp_path), earlier=("rows-*.jsonl",), message="an earlier run")


def test_a_log_keeps_its_finished_rows_whatever_a_kill_left(tmp_path):
    """An unfinished last line is skipped when read and cut off before the next append; a cut-off line that an
    earlier version closed with a newline (old caption logs) is skipped too."""
    log = tmp_path / "log.jsonl"
    row = json.dumps({"image": "0.png"}) + "\n"
    log.write_text(row + '{"image": "1.p\n' + row + '{"image": "2')
    assert files.read_jsonl(str(log)) == [{"image": "0.png"}] * 2
    files.cut_unfinished_line(str(log))
    assert log.read_text() == row + '{"image": "1.p\n' + row
