"""The commands that README.md and docs/ show use only flags that the commands have: every command of this
repository in a code block (or an inline `python ...` span) is checked against its own --help."""
import contextlib
import glob
import io
import os
import re
import shlex

import pytest

import bench
import codec
import eval as evaluate
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PROGRAMS = {"train.py": lambda argv: train.parse_args(argv), "eval.py": evaluate.main, "codec.py": codec.main,
            "bench.py": bench.main}
WITH_SUBCOMMANDS = ("codec.py", "bench.py")          # their first word names the subcommand, whose --help is read


def commands(text):
    """The repository's commands shown in `text`: lines of indented or fenced code blocks (joined across a
    trailing backslash) and inline code spans, from `python`/`torchrun` on, without a trailing # comment."""
    lines, fenced, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            pending += line.strip().removesuffix("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                lines.append(pending)
                pending = ""
        lines += re.findall(r"`([^`]*(?:python|torchrun) [^`]*)`", line)
    found = []
    for line in lines:
        for part in re.split(r"&&|\|", line.split(" #")[0]):
            match = re.search(r"(?:python(?: -m)?|torchrun(?: --\S+)*) (\S+)(.*)", part)
            if match and match[1] in PROGRAMS:
                found.append((match[1], match[2].strip()))
    return found


def help_text(program, words):
    """The --help of `program` (with its subcommand, the first word, for codec.py and the benchmarks)."""
    subcommand = [words[0]] if program in WITH_SUBCOMMANDS and words else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        PROGRAMS[program](subcommand + ["--help"])
    return out.getvalue()


def shown_commands():
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            for program, rest in commands(f.read()):
                yield os.path.relpath(page, ROOT), program, rest


def test_every_flag_the_docs_show_is_one_the_command_has():
    cache, checked, unknown = {}, 0, []
    for page, program, rest in shown_commands():
        try:
            words = shlex.split(rest)
        except ValueError:
            words = rest.split()
        key = (program, words[0] if program in WITH_SUBCOMMANDS and words else "")
        if key not in cache:
            cache[key] = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", help_text(program, words)))
        for flag in (w.split("=")[0] for w in words if w.startswith("-") and len(w) > 1 and not w[1].isdigit()):
            checked += 1
            if flag not in cache[key]:
                unknown.append(f"{page}: {program} {key[1]} {flag}".replace("  ", " "))
    assert checked > 40                         # the pages show many commands: the parser found them
    assert not unknown, "flags the commands do not have: " + "; ".join(unknown)


def test_the_docs_check_finds_a_flag_that_does_not_exist(tmp_path):
    found = commands("Run it:\n\n    python train.py --steps 10 --no-such-flag\n\nor `python codec.py compress "
                     "a.png --fast`.\n")
    assert found == [("train.py", "--steps 10 --no-such-flag"), ("codec.py", "compress a.png --fast")]
    flags = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", help_text("train.py", [])))
    assert "--steps" in flags and "--no-such-flag" not in flags
