"""Which code made a number: every cell records kdablate's commit, dirty flag and source hash and
each plugin module's; a study never silently mixes two versions of the code."""
from __future__ import annotations

import pytest

from kdablate import tracking
from kdablate.registry import ConfigError
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study
from tests.datafiles import TINY_STUDY
from tests.test_study import write
from tests.test_trust import cli, runs



def study(tmp_path, seeds: str = "[0]"):
    return write(tmp_path, TINY_STUDY.replace("seeds: [0, 1]", f"seeds: {seeds}"))


def test_every_cell_records_the_code_that_made_it(mlflow_store, tmp_path):
    assert run_study(load_study(study(tmp_path)), RunOptions(cache_dir=tmp_path / "c", progress=False)) == 0
    tags = runs("s")["ce"][0].data.tags
    mine = tracking.code_state()
    assert tags["env.code_sha256"] == mine["code_sha256"] == tracking.source_digest("kdablate") != "unknown"
    assert tags["env.git_commit"] == mine["git_commit"] and tags["env.git_dirty"] in ("true", "false")
    assert tags["env.plugins_sha256"] == "none"


def test_a_plugin_source_is_hashed_and_an_edit_changes_it(tmp_path, monkeypatch):
    (tmp_path / "mylab_probe.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = tracking.code_state(("mylab_probe",))["plugins_sha256"]
    (tmp_path / "mylab_probe.py").write_text("X = 2\n")
    after = tracking.code_state(("mylab_probe",))["plugins_sha256"]
    assert before.startswith("mylab_probe=") and before != after


def test_adding_cells_made_by_other_code_is_refused(mlflow_store, tmp_path):
    opts = RunOptions(cache_dir=tmp_path / "c", progress=False)
    assert run_study(load_study(study(tmp_path)), opts) == 0
    client = tracking.client()
    for r in runs("s")["ce"]:  # as if an older checkout had made them
        client.set_tag(r.info.run_id, "env.code_sha256", "0123456789abcdef")
    more = load_study(study(tmp_path, "[0, 1]"))
    with pytest.raises(ConfigError, match=r"1 finished cell\(s\) were made by other code \(source 0123456789abcdef"):
        run_study(more, opts)
    out = cli("run", str(tmp_path / "s.yaml"), "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--allow-mixed-code" in out.stderr
    assert run_study(more, RunOptions(cache_dir=tmp_path / "c", progress=False, allow_mixed_code=True)) == 0
    from analysis.report import build
    from analysis.runs import load

    build(load(more), tmp_path / "out", "report/test_acc")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "made by 2 versions of the code" in text and "`code_sha256`: " in text
