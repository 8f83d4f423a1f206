"""The smoke study end to end into a temporary MLflow store, then its figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import report
from kdablate import cli, tracking
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def smoke_run(mlflow_store, tmp_path):
    study = load_study(ROOT / "studies" / "smoke.yaml")
    failed = run_study(study, RunOptions(cache_dir=tmp_path / "cache"))
    return study, tmp_path, failed


def test_smoke_study_logs_every_cell_and_resumes(smoke_run, capsys):
    study, tmp_path, failed = smoke_run
    assert failed == 0
    client = tracking.client()
    exp = client.get_experiment_by_name("smoke")
    runs = tracking.search_cells(client, exp.experiment_id)
    assert len(runs) == len(study.cells) == 16
    assert {r.info.status for r in runs} == {"FINISHED"}
    run = next(r for r in runs if r.data.tags["arm"] == "teacher+teacher" and r.data.tags["seed"] == "1")
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["knowledge.mass.name"] == "teacher" and p["knowledge.structure.name"] == "teacher"
    assert p["knowledge.temperature"] == "4.0" and p["knowledge.alpha"] == "0.9" and p["optim.lr"] == "0.05"
    assert {"kdablate.study", "arm", "seed", "env.git_commit", "config_hash", "env.torch_version", "env.deterministic"} <= set(t)
    assert t["mlflow.parentRunId"] and t["config_hash"] == next(
        c.config_hash() for c in study.cells if c.arm == "teacher+teacher" and c.seed == 1)
    assert {"report/test_acc", "report/val_acc", "report/test_agreement", "report/epoch",
            "teacher/test_acc", "train/loss_kd", "val/ece", "test/nll"} <= set(m)
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(h.step for h in history) == [1, 2, 3, 4]
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())
    assert config["knowledge"]["mass"]["name"] == "teacher" and config["seed"] == 1
    # One teacher, trained once and reused by every cell.
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 1
    capsys.readouterr()
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache")) == 0
    assert "16 already finished, 0 to run" in capsys.readouterr().out
    assert len(tracking.search_cells(client, exp.experiment_id)) == 16


def test_figures_and_tables_from_mlflow(smoke_run):
    """A real (trained) study through the whole report, as `make figures` makes it (`kdablate
    report`): every file, logged to the parent run."""
    study, tmp_path, _ = smoke_run
    assert cli.main(["report", "smoke", "--out", str(tmp_path / "figures")]) == 0
    out = tmp_path / "figures" / "smoke"
    for name in ("report.md", "decomposition.png", "decomposition.pdf", "interaction.pdf", "learning_curves.png",
                 "calibration.png", "agreement.pdf", "table.csv", "table.md", "table.tex", "effects.tex"):
        assert (out / name).stat().st_size > 0, name
    import pandas as pd

    table = pd.read_csv(out / "table.csv")
    assert list(table.arm) == study.arms() and set(table.n) == {2}
    effects = pd.read_csv(out / "effects.csv")
    assert list(effects.effect[:3]) == ["mass: teacher − constant", "structure: permuted − uniform",
                                        "structure: teacher − permuted"]
    assert "| teacher+teacher |" in (out / "table.md").read_text()
    client = tracking.client()
    exp = client.get_experiment_by_name("smoke")
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'study'")[0]
    assert "figures/report.md" in {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}


@pytest.mark.parametrize("main, args, prefix", [(cli.main, ["report", "smoke"], "kdablate: error:"),
                                                (report.main, ["smoke"], "analysis: error:")])
def test_figures_without_runs_is_a_clean_error(mlflow_store, capsys, main, args, prefix):
    assert main(args) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(ours) == 1 and "Traceback" not in err
    assert "no finished runs" in ours[0] and "make study STUDY=smoke" in ours[0]


IL_STUDY = """
base:
  data: {name: mnist1d, num_samples: 600}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 2, batch_size: 64}
  teacher: {model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 2, batch_size: 64}, min_accuracy: 0.1}
seeds: [0, 1]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - {name: dml, mass: peer, structure: peer, alpha: 0.5}
  - {name: dkd, objective: dkd, temperature: 4.0, alpha: 1.0}
  - name: "il_{structure_source}"
    mass: {name: constant, eps: 0.2}
    temperature: 4.0
    alpha: 0.9
    grid:
      structure: [{name: explanation, source: cam}, {name: explanation, source: saliency, every: 2}]
analysis: {baseline: ce, reference: [ce], extra_metrics: [train/similarity_spearman], heatmaps: [il_cam, il_saliency]}
"""


def test_introspective_arms_run_and_draw_heatmaps(mlflow_store, tmp_path):
    path = tmp_path / "il_smoke.yaml"
    path.write_text(IL_STUDY)
    study = load_study(path)
    assert study.arms() == ["ce", "dml", "dkd", "il_cam", "il_saliency"]
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache")) == 0
    client = tracking.client()
    runs = tracking.search_cells(client, client.get_experiment_by_name("il_smoke").experiment_id)
    by_arm = {r.data.tags["arm"]: r for r in runs}
    assert "member1/val_acc" in by_arm["dml"].data.metrics
    assert "train/loss_tckd" in by_arm["dkd"].data.metrics
    il = by_arm["il_saliency"].data.metrics
    assert {"train/similarity_spearman", "time/explain_ms"} <= set(il)
    out = tmp_path / "figs"
    assert report.main([str(path), "--out", str(out)]) == 0
    assert "ρ(expl., teacher)" in (out / "il_smoke" / "table.md").read_text()
    import pandas as pd

    sims = pd.read_csv(out / "il_smoke" / "similarity.csv", index_col=0)
    assert list(sims.index) == ["teacher", "il_cam", "il_saliency"]
    assert sims.to_numpy().min() >= -1 and sims.to_numpy().max() <= 1
    assert (out / "il_smoke" / "similarity.png").stat().st_size > 0
