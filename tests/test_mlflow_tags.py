"""What a study leaves in MLflow for the UI: the experiment's description, run names and
descriptions, factor and role tags, MLflow's standard tags and the dataset input."""
from __future__ import annotations

from pathlib import Path

from kdablate import tracking
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study

SMOKE = Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml"


def test_runs_carry_what_the_ui_needs(mlflow_store, tmp_path, capsys):
    study = load_study(SMOKE, ["optim.epochs=1", "teacher.optim.epochs=1", "teacher.min_accuracy=0.0"],
                       arms=["ce", "teacher+teacher"], seeds=[0])
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    client = tracking.client()
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags["mlflow.note.content"] == study.config.description
    assert f"#/experiments/{exp.experiment_id}/runs" in capsys.readouterr().out
    runs = {r.info.run_name: r for r in tracking.search_cells(client, exp.experiment_id, "FINISHED")}
    assert set(runs) == {"ce/seed0", "teacher+teacher/seed0"}
    ce, kd = runs["ce/seed0"].data.tags, runs["teacher+teacher/seed0"].data.tags
    assert ce["role"] == "baseline" and kd["role"] == "reference"
    assert (ce["mass"], ce["structure"], ce["T"], ce["alpha"]) == ("n/a", "n/a", "n/a", "0")
    assert (kd["mass"], kd["structure"], kd["T"], kd["alpha"]) == ("teacher", "teacher", "4", "0.9")
    assert ce["mlflow.note.content"].startswith("Arm `ce`, seed 0:")
    # The description says what the tags say: CE reads no mass, structure or T.
    assert "mass n/a, structure n/a, T n/a, alpha 0, source n/a, feature none; alpha 0: plain cross-entropy" in ce["mlflow.note.content"]
    assert ce["mlflow.source.name"] == "kdablate" and ce["mlflow.user"]
    inputs = client.get_run(runs["ce/seed0"].info.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["mnist1d"] and len(inputs[0].dataset.digest) > 8
    # Tagged arms are one search away in the UI (tags.role / tags.mass are plain equality filters).
    found = client.search_runs([exp.experiment_id], "tags.role = 'baseline'")
    assert [r.info.run_name for r in found] == ["ce/seed0"]
    # Summaries at step 0 (the UI draws them as bars); per-epoch curves from step 1.
    history = client.get_metric_history(runs["ce/seed0"].info.run_id, "report/test_acc")
    assert [h.step for h in history] == [0]
    assert [h.step for h in client.get_metric_history(runs["ce/seed0"].info.run_id, "val/acc")] == [1]
    # The plumbing lives under 'kdablate.', out of the factor tags' way.
    assert {"kdablate.heartbeat", "kdablate.worker_pid", "kdablate.worker_host"} <= set(ce)
    assert not {"heartbeat", "worker_pid", "worker_host"} & set(ce)
    assert "kdablate.teacher_key" in kd
    # Provenance under 'env.'; the factors are the first keys, the order the UI's menus list them in.
    assert {"env.git_commit", "env.code_sha256", "env.cpu_model", "env.torch_version", "env.device"} <= set(kd)
    assert not {"git_commit", "cpu_model", "device", "study", "failure_reason"} & set(kd)
    assert [k for k in kd if not k.startswith("mlflow.")][:10] == ["arm", "role", "objective", "mass", "structure", "T", "alpha", "source",
                                                                         "feature", "seed"]
    # Summary accuracies in percent, which the UI's two decimals show to a hundredth of a point;
    # read back as the fractions kdablate computed.
    stored, read = runs["ce/seed0"].data.metrics, tracking.summary(runs["ce/seed0"])
    assert stored["report/test_acc"] == 100 * read["report/test_acc"] and 0 < read["report/test_acc"] <= 1
    assert stored["report/val_ece"] == 100 * read["report/val_ece"]
    assert stored["time/wall_s"] == read["time/wall_s"] and stored["report/epoch"] == read["report/epoch"]
    assert tracking.summary(runs["teacher+teacher/seed0"])["teacher/val_acc"] <= 1


class _Run:
    def __init__(self, tags: dict[str, str]) -> None:
        self.data = type("D", (), {"tags": tags})()
        self.info = type("I", (), {"start_time": 0})()


def test_owner_tags_of_an_older_store_are_still_read():
    """A store written before the 'kdablate.' prefix: its running cells are judged by the bare tags."""
    import os
    import platform

    live = _Run({"worker_host": platform.node(), "worker_pid": str(os.getpid())})
    assert tracking.owner_alive(live) and tracking.owner(live) == f"{platform.node()} pid {os.getpid()}"
    stale = _Run({"worker_host": "elsewhere", "worker_pid": "1", "heartbeat": "0"})
    assert not tracking.owner_alive(stale)
    new = _Run({tracking.WORKER_HOST: "elsewhere", tracking.WORKER_PID: "1", tracking.HEARTBEAT: "0"})
    assert not tracking.owner_alive(new) and tracking.owner(new) == "elsewhere pid 1"


def test_a_resumed_cell_logging_its_dataset_again_leaves_one_input(mlflow_store):
    """A cell logs its dataset each time it (re)starts; the store keeps one input per run."""
    client = tracking.client()
    run_id = client.create_run(client.create_experiment("resume_inputs")).info.run_id
    for _ in range(3):
        tracking.log_dataset(client, run_id, "mnist1d", "0123456789abcdef", {"num_samples": 5000})
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1


def test_factor_tags_carry_the_parameters_that_tell_arms_apart():
    from kdablate.config import CellConfig
    from kdablate.runner import factor_tags

    def mass(eps: float) -> str:
        k = {"mass": {"name": "constant", "eps": eps}, "structure": "uniform", "alpha": 1.0}
        return factor_tags(CellConfig(arm="a", seed=0, knowledge=k))["mass"]

    assert mass(0.1) == "constant" != mass(0.45) == "constant(eps=0.45)"  # eps 0.1 is the default
    dkd = factor_tags(CellConfig(arm="d", seed=0, knowledge={"objective": {"name": "dkd", "beta": 2.0}, "alpha": 1.0}))
    assert dkd["objective"] == "dkd(beta=2.0)" and dkd["mass"] == "n/a"


def test_summaries_of_an_older_store_are_fractions_already():
    """A run logged before summaries went to percent has no units tag: its values are read as they are."""
    old = _Run({})
    old.data.metrics = {"report/test_acc": 0.8125, "teacher/val_acc": 0.9, "report/epoch": 3.0}
    new = _Run({tracking.UNITS: "percent"})
    new.data.metrics = {"report/test_acc": 81.25, "teacher/val_acc": 90.0, "report/epoch": 3.0}
    assert tracking.summary(old) == tracking.summary(new) == old.data.metrics
    assert [tracking.in_percent(n) for n in ("report/test_acc", "report/member1_val_acc", "teacher/test_agreement",
                                             "report/test_nll", "report/epoch", "val/acc")] == [1, 1, 1, 0, 0, 0]
