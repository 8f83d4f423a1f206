"""Property-based fuzzing of study files: every mutant of a shipped study either loads or is
refused with one short StudyError line; any other exception is a bug.

Mutations: of the text (random characters inserted, slices deleted, lines swapped), of the parsed
structure (keys deleted or renamed, values retyped number <-> string <-> list <-> dict <-> bool
<-> null, keys added) and of the encoding (latin-1, UTF-16/32, a BOM, flipped bytes). The
examples are derandomized, so CI runs the same ones every time; KDABLATE_FUZZ_EXAMPLES=2000 runs
that many fresh random ones per test instead (add --hypothesis-seed=N to repeat a run).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdablate.study import Study, StudyError, load_study
from tests.datafiles import write_shipped_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {p.stem: p.read_text() for p in sorted((ROOT / "studies").glob("*.yaml"))}
MAX_MESSAGE = 500
EXAMPLES = int(os.environ.get("KDABLATE_FUZZ_EXAMPLES", "0"))

FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# Characters that mean something to YAML, to the name templates or to the loader's checks.
SYNTAX = list("{}[]:,-&*!|>'\"#%@`?~\\\n\t ") + ["{mass}", "{x:>9}", "<<", "---", "\x00", "\x85", "\u2028",
                                                "é", "\ufeff", "0x", "1e9", "..", "null", "yes"]
INSERTS = st.lists(st.sampled_from(SYNTAX) | st.characters(), min_size=1, max_size=4).map("".join)
# Integers stay small or impossibly large: a model width of 10^5 is a real cost (the load-time checks
# build each model: tens of GB), but a separate problem from the ones fuzzed here.
SCALARS = st.one_of(
    st.integers(-5, 200), st.sampled_from([0, -1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["none", "teacher", "constant", "uniform", "mlp", "cifar100", "{mass}",
                                           "4.0", "1e-3", "0x10", "..", ""]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(["name", "eps", "mass"]), inner,
                                        max_size=3), max_leaves=8)
KEYS = st.text(min_size=1, max_size=10) | st.sampled_from(
    ["name", "seeds", "arms", "base", "axes", "grid", "set", "mass", "structure", "optim.lr", "alpha", "data",
     "student", "teacher", "analysis", "baseline", "temperature", "objective", "source", "eps"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding a fake CIFAR-100 under data/ (the image studies' data_root), made the cwd."""
    from kdablate.data.fake import write_cifar

    folder = tmp_path_factory.mktemp("fuzz")
    write_cifar(folder / "data", "cifar100", 400, 100)
    write_shipped_checkpoints(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder


def outcome(path: Path) -> Study | StudyError:
    """Load ``path``: a Study, or the StudyError, which must be one line of <= MAX_MESSAGE
    characters. Any other exception propagates and fails the example."""
    try:
        return load_study(path)
    except StudyError as e:
        text = str(e)
        assert len(text.splitlines()) == 1 and "\n" not in text, repr(text)
        assert len(text) <= MAX_MESSAGE, f"{len(text)} characters: {text[:200]}..."
        return e


def write(folder: Path, stem: str, data: str | bytes) -> Path:
    # The file keeps the study's name: the name field defaults to it.
    path = folder / f"{stem}.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@st.composite
def text_mutants(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped study with 1-4 edits of its text."""
    stem = draw(st.sampled_from(sorted(STUDIES)))
    text = STUDIES[stem]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "insert", "delete", "swap"]))
        if edit == "insert":
            text = text[:at] + draw(INSERTS) + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        else:
            lines = text.splitlines(keepends=True)
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
    return stem, text


def _pick(draw: st.DrawFn, doc: dict) -> tuple[Any, Any]:
    """A random (container, key or index) inside ``doc``, at least one level down."""
    parent: Any = doc
    key = draw(st.sampled_from(list(doc)))
    while isinstance(parent[key], (dict, list)) and parent[key] and draw(st.integers(0, 3)):  # mostly deeper
        child = parent[key]
        parent, key = child, draw(st.sampled_from(list(child) if isinstance(child, dict) else range(len(child))))
    return parent, key


NUMBERS = st.sampled_from([0, -1, 1, 2, 0.0, -0.5, 0.5, 1.0, 1.5, 1e-300, 1e300, 2**63, float("nan"),
                           float("inf"), float("-inf")])


def _retype(draw: st.DrawFn, value: Any) -> Any:
    """``value`` as another type (its text, a list or dict holding it, a bool, null...) or, for a
    number, an edge value of the same type (0, -1, nan, inf, 2**63), to reach the range checks."""
    same = [NUMBERS] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    return draw(st.one_of(*same, st.sampled_from([str(value), [value], {"name": value}, None, True, 0, 1.5, [], {}]),
                          VALUES))


@st.composite
def structure_mutants(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped study parsed, with 1-3 keys deleted, renamed, retyped or added, dumped again."""
    stem = draw(st.sampled_from(sorted(STUDIES)))
    doc = copy.deepcopy(yaml.safe_load(STUDIES[stem]))
    for _ in range(draw(st.integers(1, 3))):
        if not doc:
            break
        parent, key = _pick(draw, doc)
        op = draw(st.sampled_from(["delete", "retype", "retype", "rename", "add"]))
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = _retype(draw, parent[key])
        elif op == "rename" and isinstance(parent, dict):
            new = draw(KEYS | st.sampled_from([key + "s", key.upper() if isinstance(key, str) else key, f" {key}"]))
            parent[new] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(VALUES))
    return stem, yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@FUZZ
@given(mutant=text_mutants())
def test_text_mutants_load_or_fail_in_one_line(workdir, mutant):
    stem, text = mutant
    outcome(write(workdir, stem, text))


@FUZZ
@given(mutant=structure_mutants())
def test_structure_mutants_load_or_fail_in_one_line(workdir, mutant):
    stem, text = mutant
    outcome(write(workdir, stem, text))


@FUZZ
@given(stem=st.sampled_from(sorted(STUDIES)), encoding=st.sampled_from(
    ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig", "flip"]), data=st.data())
def test_encoding_mutants_are_refused_as_not_utf8(workdir, stem, encoding, data):
    text = STUDIES[stem]
    if encoding == "utf-8-sig":  # a UTF-8 byte-order mark is fine
        assert isinstance(outcome(write(workdir, stem, text.encode("utf-8-sig"))), Study)
        return
    if encoding == "flip":
        raw = bytearray(text.encode("utf-8"))
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[at] = data.draw(st.integers(0, 255))
        outcome(write(workdir, stem, bytes(raw)))
        return
    at = data.draw(st.integers(0, len(text)))
    result = outcome(write(workdir, stem, (text[:at] + "é" + text[at:]).encode(encoding)))
    assert isinstance(result, StudyError) and "not UTF-8" in str(result) and "save the file as UTF-8" in str(result)


HOSTILE = {
    "nest": "seeds: [0]\narms: " + "[" * 5000 + "]" * 5000 + "\n",
    "bomb": "description: [&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
            + "".join(f", &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")) + "]\n",
    "utf16": STUDIES["smoke"],
    "spec": STUDIES["smoke"].replace('"{mass}+{structure}"', '"{mass:>1000000000}"'),
}


def test_cli_refuses_hostile_files_in_one_line(tmp_path):
    """Through the real CLI: exit 2, one stderr line, no traceback (the runs go in parallel)."""
    paths = {}
    for name, text in HOSTILE.items():
        data = text.encode("utf-16") if name == "utf16" else text.encode()
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_bytes(data)
    args = {**{n: [str(p)] for n, p in paths.items()}, "bare ..": [".."]}
    procs = {n: subprocess.Popen([sys.executable, "-m", "kdablate.cli", "dry-run", *a], cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n, a in args.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err[-500:])
        assert "Traceback" not in err and len(err.splitlines()) == 1 and len(err) <= MAX_MESSAGE + 20, (name, err)
        assert err.startswith("kdablate: error: ") and out == "", (name, err)
