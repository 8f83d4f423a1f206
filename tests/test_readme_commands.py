"""The README's commands run as written: every fenced ``kdablate ...`` and ``make ...`` line of
the README and of docs/ is parsed as the CLI parses it and its study loaded as ``dry-run`` would."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kdablate import cli
from kdablate.study import load_study

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)


def commands() -> list[tuple[str, str]]:
    """(page, command) for every fenced line that starts with kdablate or make (continuations joined)."""
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.strip().removeprefix("$ ")
                if re.match(r"(kdablate|make)( |$)", line):
                    found.append((page.name, line.split(" #")[0].strip()))
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with synthetic CIFAR-100 under data/ and the shipped studies' stand-in teachers."""
    from kdablate.data.fake import write_cifar
    from tests.datafiles import write_shipped_checkpoints

    folder = tmp_path_factory.mktemp("readme")
    write_cifar(folder / "data", "cifar100", 400, 100)
    write_shipped_checkpoints(folder)
    (folder / "studies").symlink_to(ROOT / "studies")  # the README's commands run in a checkout
    return folder


@pytest.mark.parametrize("page,command", commands(), ids=[c for _, c in commands()])
def test_the_command_runs_as_written(page, command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    words = shlex.split(command)
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        assert set(targets) <= make_targets(), f"{page}: {command}: no such make target"
        study = dict(w.split("=", 1) for w in words[1:] if "=" in w).get("STUDY")
        if study and (targets or ["study"])[0] in ("study", "figures", "dry-run", "status"):
            assert load_study(study).cells
        return
    args = cli.parse(words[1:])  # the CLI's own parser: an unknown option or a bad value exits
    if getattr(args, "study", None):
        assert load_study(args.study, getattr(args, "overrides", ()), getattr(args, "arm", ()),
                          getattr(args, "seed", ())).cells


def test_the_pages_hold_commands():
    assert len(commands()) >= 8
