"""Seeds until the answer is precise enough: `kdablate run --until-halfwidth`."""
from __future__ import annotations

import pytest

from kdablate import tracking
from kdablate.runner import RunOptions
from kdablate.sequential import Until, comparisons, halfwidths, next_seeds, run_until
from kdablate.study import load_study
from tests.datafiles import TINY_STUDY as STUDY
from tests.test_study import write
from tests.test_trust import cli, runs



def test_next_seeds_are_the_next_integers_up_to_the_cap():
    assert next_seeds([0, 1], Until(0.5, max_seeds=40, batch=5)) == [2, 3, 4, 5, 6]
    assert next_seeds([0, 1, 7], Until(0.5, max_seeds=5, batch=5)) == [8, 9]
    assert next_seeds(list(range(5)), Until(0.5, max_seeds=5, batch=5)) == []


def test_adds_seeds_until_max_and_resumes_without_training_again(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, STUDY)
    study = load_study(path)
    assert comparisons(study) == [("ls", "ce")]
    opts = RunOptions(cache_dir=tmp_path / "c", progress=False)
    assert run_until(study, Until(1e-6, max_seeds=5, batch=2), opts) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("until-halfwidth:")]
    assert [ln.split(" seeds")[0] for ln in lines] == ["until-halfwidth: 2", "until-halfwidth: 4",
                                                       "until-halfwidth: 5"]
    assert "adding seeds 2-3" in lines[0] and "max-seeds 5 reached" in lines[-1]
    assert sorted(r.data.tags["seed"] for r in runs("s")["ls"]) == ["0", "1", "2", "3", "4"]
    parent = tracking.newest_parent(tracking.client(), "s", tracking.SEQUENTIAL_SEEDS)
    assert parent.data.tags[tracking.SEQUENTIAL_SEEDS] == "0,1,2,3,4"
    width = halfwidths(study.with_seeds(range(5)), "report/test_acc")["ls − ce"]
    assert f"ls − ce {width:.3f}" == parent.data.tags[tracking.SEQUENTIAL_HALFWIDTHS]
    # The same command again (as after a kill): nothing trains, the same answer.
    assert run_until(study, Until(1e-6, max_seeds=5, batch=2), opts) == 0
    assert "0 to run" in capsys.readouterr().out.splitlines()[-3]
    assert len(runs("s")["ls"]) == 5


def test_stops_at_once_when_precise_and_the_report_reads_the_added_seeds(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, STUDY)
    out = cli("run", str(path), "--until-halfwidth", "1e-6", "--max-seeds", "3", "--seed-batch", "4",
              "--no-progress", cwd=tmp_path)
    assert out.returncode == 0 and "until-halfwidth: 3 seeds" in out.stdout
    out = cli("run", str(path), "--until-halfwidth", "1000", "--no-progress", cwd=tmp_path)
    assert "until-halfwidth: 3 seeds" in out.stdout  # it resumes from the seeds it added, never drops one
    assert "every half-width is at most ±1000" in out.stdout and "0 to run" in out.stdout
    from analysis.report import write as report

    rep = report(load_study(path), out=tmp_path / "figs", log=False)
    assert "| ls | " in (rep.out / "table.md").read_text() and "| 3 |" in (rep.out / "table.md").read_text()


@pytest.mark.parametrize("args,says", [(["--until-halfwidth", "0"], "must be > 0"),
                                       (["--until-halfwidth", "1", "--seed", "0"], "drop --seed"),
                                       (["--until-halfwidth", "1", "--max-seeds", "1"], "--max-seeds must be >= 2")])
def test_bad_until_options_are_one_line_and_exit_2(mlflow_store, tmp_path, args, says):
    out = cli("run", str(write(tmp_path, STUDY)), *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr


def test_without_comparisons_it_is_refused(mlflow_store, tmp_path):
    out = cli("run", str(write(tmp_path, STUDY.replace("analysis: {baseline: ce}", ""))), "--until-halfwidth", "1",
              cwd=tmp_path)
    assert out.returncode == 2 and "declare analysis.pairs or analysis.baseline" in out.stderr


def test_killed_mid_batch_it_resumes_to_the_same_end(mlflow_store, tmp_path):
    """kill -9 after the first batch's line, then the same command: every seed up to the cap once."""
    import os
    import signal
    import subprocess
    import sys

    path = write(tmp_path, STUDY)
    cmd = [sys.executable, "-m", "kdablate.cli", "run", str(path), "--until-halfwidth", "1e-6", "--max-seeds", "6",
           "--seed-batch", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("until-halfwidth: 2 seeds"):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "until-halfwidth: 6 seeds" in out.stdout, out.stderr
    for arm in ("ce", "ls"):
        finished = sorted(int(r.data.tags["seed"]) for r in runs("s")[arm] if r.info.status == "FINISHED")
        assert finished == list(range(6))
