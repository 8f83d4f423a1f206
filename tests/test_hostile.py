"""Hostile study files are refused cheaply: a StudyError of one short line (so `kdablate dry-run`
exits 2 without a traceback), in bounded time and memory. One test per hostile input found;
each bound is loose (the refusals take milliseconds) but far below what the input cost before."""
from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from kdablate import study as study_module
from kdablate.registry import brief
from kdablate.study import (MAX_FILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, BoundedLoader, Study, StudyError,
                            arm_name, count_cells, load_study, resolve_path)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = (ROOT / "studies" / "smoke.yaml").read_text()
TEMPLATE = '"{mass}+{structure}"'  # smoke.yaml's third arm (arms[2]) crosses mass x structure
MIB = 2**20


def timed(study: str | Path) -> tuple[Study | StudyError, float]:
    """``load_study(study)``'s result or StudyError, and its seconds."""
    start = time.perf_counter()
    try:
        return load_study(study), time.perf_counter() - start
    except StudyError as e:
        return e, time.perf_counter() - start


def peak_memory(study: str | Path) -> int:
    """The peak Python allocation of ``load_study(study)`` in bytes (tracemalloc: ~6x slower)."""
    tracemalloc.start()
    try:
        timed(study)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(study: str | Path, seconds: float = 5.0, mib: int = 64) -> StudyError:
    """The StudyError ``study`` is refused with: one line of <= 500 characters, within the bounds
    (time measured untraced, memory in a second, traced run)."""
    result, took = timed(study)
    assert isinstance(result, StudyError), f"{study} loaded"
    text = str(result)
    assert len(text.splitlines()) == 1 and len(text) <= 500, text
    assert took < seconds, f"{took:.1f} s: {text}"
    peak = peak_memory(study)
    assert peak < mib * MIB, f"{peak / MIB:.0f} MiB: {text}"
    return result


def write(tmp_path: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def laughs(levels: int = 9) -> list[str]:
    """The billion-laughs anchors: &a is 9 strings, each next level 9 aliases of the one before."""
    names = "abcdefghijk"[:levels]
    return ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip(names, names[1:])]


def test_deep_nesting_is_refused_while_composing(tmp_path):
    # 5,000 '[' was a RecursionError (a 3,000-line traceback) after 2 s.
    err = refused(write(tmp_path, "seeds: [0]\narms: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert err.field == "line 2" and f"nested deeper than {MAX_YAML_DEPTH} levels" in err.message
    err = refused(write(tmp_path, "x:\n" + "".join("  " * i + "- \n" for i in range(200)), "block.yaml"))
    assert "nested deeper" in err.message
    # Depth reached through aliases counts too: each anchor is 40 deep, the alias nests one in another.
    deep = "a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n"
    assert "through aliases" in refused(write(tmp_path, deep, "alias.yaml")).message


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "random"])
def test_text_that_is_not_utf8_is_refused_with_the_byte_offset(tmp_path, encoding):
    # These were a UnicodeDecodeError traceback.
    text = SMOKE.replace("smoke test", "café test")
    if encoding == "random":
        data = bytes(random.Random(0).randrange(256) for _ in range(4096))
    else:
        data = text.encode(encoding)
    err = refused(write(tmp_path, data))
    assert "not UTF-8 text" in err.message and err.message.endswith("save the file as UTF-8")
    if encoding == "latin-1":
        at = text.index("é")  # everything before it is ASCII: one byte per character
        assert err.field == "line 2" and f"byte 0xe9 at byte offset {at} (invalid continuation byte)" in err.message
    if encoding == "utf-16":
        assert "byte 0xff at byte offset 0" in err.message and "UTF-16" in err.message
    assert isinstance(load_study(write(tmp_path, text.encode("utf-8-sig"), "bom.yaml")), Study)  # a BOM is fine


@pytest.mark.parametrize("template", ["{mass:>1000000000}", "{mass.__class__.__mro__}", "{mass!r}", "{mass[0]}",
                                      "{}", "{0}", "{mass:{structure}}"])
def test_arm_name_templates_take_only_plain_keys(tmp_path, template):
    # {mass:>1000000000} was a MemoryError (2.5 GB); {mass.__class__.__mro__} printed Python classes.
    err = refused(write(tmp_path, SMOKE.replace(TEMPLATE, f'"{template}"')))
    assert err.field == "arms[2].name" and "is not a plain {key}" in err.message, err


def test_arm_names_are_substituted_as_text_not_formatted():
    assert arm_name("{mass}+{structure}", {"mass": "{structure}", "structure": "x"}) == "{structure}+x"
    assert arm_name("il_{structure_source}", {"structure": {"name": "explanation", "source": "cam"}}) == "il_cam"
    assert arm_name("{{literal}}-{mass}", {"mass": "teacher"}) == "{literal}-teacher"
    assert arm_name("ce", {"alpha": 0.5}) == "ce[alpha=0.5]"
    with pytest.raises(ValueError, match="not a plain"):
        arm_name("{mass:>9}", {"mass": "teacher"})
    with pytest.raises(KeyError):
        arm_name("{temp}", {"mass": "teacher"})


def test_alias_bombs_are_refused_before_they_expand(tmp_path):
    # In description: a MemoryError while the message was built; as arms[0]: a 312 MB error line.
    bomb = "description: [" + ", ".join(laughs()) + "]\n"
    err = refused(write(tmp_path, SMOKE.replace("description: smoke test of the components grid.\n", bomb)))
    assert err.field == "line 2" and f"expands to more than {MAX_YAML_NODES:,} values" in err.message
    base = "base:\n  x: [" + ", ".join(laughs()) + "]\n"
    arms = SMOKE.replace("base:\n", base).split("\narms:")[0] + "\narms: [*i]\n"
    assert "an alias counts each time" in refused(write(tmp_path, arms, "arms.yaml")).message
    assert "contains it" in refused(write(tmp_path, "x: &a [1, *a]\n", "loop.yaml")).message  # a recursive alias


def test_a_flat_flood_of_values_stops_the_parse_at_the_budget(tmp_path, monkeypatch):
    # No alias at all: the count stops the parse (100,000 values take ~12 s to parse on a slow box).
    monkeypatch.setattr(study_module, "MAX_YAML_NODES", 1000)
    err = refused(write(tmp_path, "seeds: [" + "0, " * 100_000 + "]\n"), seconds=2)
    assert "more than 1,000 YAML values" in err.message


def test_shipped_studies_are_far_below_the_yaml_limits():
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        loader = BoundedLoader(path.read_text())
        nodes, depth = loader._extent[id(loader.get_single_node())]
        assert nodes * 100 < MAX_YAML_NODES and depth * 5 < MAX_YAML_DEPTH, (path.name, nodes, depth)
        assert path.stat().st_size * 100 < MAX_FILE_BYTES, path.name


def test_echoed_values_are_cut_short(tmp_path):
    # Wrong types echo the value given; a long one is cut, not printed whole.
    listing = "[" + ", ".join([f"'{'x' * 100}'"] * 1000) + "]"  # a 100 KB repr
    assert "..." in refused(write(tmp_path, SMOKE.replace("smoke test of the components grid.", listing))).message
    err = refused(write(tmp_path, SMOKE.replace("eps: 0.1", f"eps: {listing}"), "eps.yaml"))
    assert "must be float, got list" in err.message  # the registry's echo (registry._coerce)
    err = refused(write(tmp_path, SMOKE.replace("  - name: ce", "  - name: " + "c" * 200_000), "name.yaml"))
    assert err.field == "analysis.baseline" and " ... " in err.message
    nested: list = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # 9^9 strings, shared: only reprlib's bounded walk is cheap
    start = time.perf_counter()
    assert len(brief(nested)) <= 200 and len(brief("x" * 10**7)) <= 200 and time.perf_counter() - start < 1


def test_yaml_values_python_cannot_build_are_refused(tmp_path):
    # Base-60 integers ('1:59:59...') were read in quadratic time: 84 s for a 1 MiB one; bad dates raised ValueError.
    err = refused(write(tmp_path, "seeds: [1" + ":59" * 50_000 + "]\n"))
    assert "an integer of 150,001 characters" in err.message
    err = refused(write(tmp_path, SMOKE.replace("smoke test of the components grid.", "2020-13-45"), "date.yaml"))
    assert err.field == "line 2" and "cannot read this value as timestamp" in err.message
    assert "unhashable" in refused(write(tmp_path, "? [a]\n: 1\n", "key.yaml")).message


CELLS_1E9 = "\naxes:\n" + "".join(f"  {k}: [" + ", ".join(str(i / 1000) for i in range(1, 101)) + "]\n"
                                  for k in ("optim.lr", "optim.weight_decay", "optim.momentum", "alpha"))


def test_cells_are_counted_before_they_are_expanded(tmp_path, monkeypatch):
    # 10^9 cells were still expanding after 2 minutes; 10,000 seeds (80,000 cells) took 89 s and 1.1 GB.
    err = refused(write(tmp_path, SMOKE.replace("seeds: [0, 1]", "seeds: [0, 1]" + CELLS_1E9)))
    assert err.field == "arms" and "expands to 1,600,000,000 cells" in err.message
    assert "KDABLATE_MAX_CELLS" in err.message
    seeds = SMOKE.replace("seeds: [0, 1]", "seeds: [" + ", ".join(map(str, range(10_000))) + "]")
    assert "expands to 80,000 cells" in refused(write(tmp_path, seeds, "seeds.yaml")).message  # the default
    monkeypatch.setenv("KDABLATE_MAX_CELLS", "50000")
    assert "expands to 80,000 cells" in refused(write(tmp_path, seeds, "seeds.yaml")).message
    monkeypatch.setenv("KDABLATE_MAX_CELLS", "lots")
    err = refused(write(tmp_path, SMOKE, "e.yaml"))
    assert "KDABLATE_MAX_CELLS='lots' is not a positive whole number" in err.message


def test_count_matches_expansion_and_a_large_allowed_study_loads_fast(tmp_path):
    # The axes override the grid's structure: 1 + 1 + 2 x 1 combinations x 2 lr x 3 seeds.
    with_axes = SMOKE.split("\nanalysis:")[0].replace(
        "seeds: [0, 1]", "seeds: [0, 1, 2]\naxes: {optim.lr: [0.1, 0.05], structure: [uniform]}")
    for study in (ROOT / "studies" / "smoke.yaml", ROOT / "studies" / "temperature.yaml", write(tmp_path, with_axes)):
        loaded = load_study(study)
        assert count_cells(loaded.config) == len(loaded.cells), study
    load_study(ROOT / "studies" / "smoke.yaml")  # builds the models once, as any first load does
    large = write(tmp_path, SMOKE.replace("seeds: [0, 1]", "seeds: [" + ", ".join(map(str, range(250))) + "]"))
    result, took = timed(large)
    assert isinstance(result, Study) and len(result.cells) == 2000
    assert took < 30  # 3.2 s on a 2-core box: ~1.6 ms per cell
    assert peak_memory(large) < 128 * MIB  # 14 MiB: ~7 KiB per cell


@pytest.mark.parametrize("name", [".", "..", "../studies/smoke", "a/b", ".hidden", "", "smoke\n", "/" * 5000])
def test_study_names_are_plain_file_names(name):
    # '.' and '..' used to resolve to the directories themselves.
    assert "not a study" in refused(name).message


def test_a_plain_name_too_long_for_a_file_is_one_line():
    assert "File name too long" in refused("x" * 5000).message


def test_study_name_field_and_file_stem_are_refused_as_dot_names(tmp_path):
    for bad in (".", ".."):
        err = refused(write(tmp_path, SMOKE + f"name: '{bad}'\n"))
        assert err.field == "name" and "not starting with '.'" in err.message
    assert refused(write(tmp_path, SMOKE, "..yaml")).field == "name"  # the name defaults to the stem '.'
    assert resolve_path("smoke") == Path("studies") / "smoke.yaml"
    assert resolve_path("a.b-c_1") == Path("studies") / "a.b-c_1.yaml"
    assert isinstance(load_study(write(tmp_path, SMOKE, "other.yml")), Study)


def test_directories_fifos_and_huge_files_are_refused(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    assert "is a directory" in refused(tmp_path / "dir.yaml").message
    huge = write(tmp_path, SMOKE + "#" + "x" * MAX_FILE_BYTES + "\n", "huge.yaml")
    assert "larger than 1,048,576 bytes (1 MiB)" in refused(huge).message
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    found: list = []
    reader = threading.Thread(target=lambda: found.append(timed(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # it opened the FIFO and blocks: write to it to free the thread, then fail
        with open(fifo, "w") as f:
            f.write("x: 1\n")
        pytest.fail("load_study opened a FIFO and blocked on it")
    assert "not a regular file" in str(found[0][0])


def test_an_unreadable_file_is_one_line(tmp_path):
    path = write(tmp_path, SMOKE)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not stop reading")
    assert "cannot be read" in refused(path).message


def test_merge_keys_still_work_and_seeds_stay_in_range(tmp_path):
    """`<<: *anchor` is YAML's way to share settings; a seed must fit the generators' 64 bits."""
    merged = SMOKE.replace("  optim: {epochs: 4, batch_size: 64}\n", "  optim: &opt {epochs: 4, batch_size: 64}\n", 1)
    merged = merged.replace("    optim: {epochs: 4, batch_size: 64}\n", "    optim: {<<: *opt, epochs: 2}\n", 1)
    assert "<<: *opt" in merged and "&opt" in merged
    study, _ = timed(write(tmp_path, merged, "merged.yaml"))
    assert isinstance(study, Study), study
    assert {(c.optim.epochs, c.teacher.optim.epochs, c.teacher.optim.batch_size) for c in study.cells} == {(4, 2, 64)}
    err = refused(write(tmp_path, SMOKE.replace("seeds: [0, 1]", f"seeds: [0, {2**40}]"), "big.yaml"))
    assert err.field == "seeds[1]" and "less than 4294967296" in err.message
