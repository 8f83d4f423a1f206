"""No study may finish with a wrong number and no warning: every case that once did is either
refused when the study loads (exit 2, one line naming file and field) or FAILs with its reason."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kdablate import tracking
from kdablate.config import CellConfig, KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.registry import ConfigError
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study
from kdablate.teacher import get_teacher
from kdablate.trainer import NoTrainingSteps, fit
from tests.test_study import assert_refused

BASE = """
base:
  data: {name: mnist1d, num_samples: 500}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 1, batch_size: 32}
  teacher: {model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 1, batch_size: 32}}
seeds: [0, 1]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - {name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}
"""

# (case, (text to replace, replacement), field named, message) -- mnist1d, 500 samples: 360 train.
REFUSED = [
    ("batch larger than the training split", ("optim: {epochs: 1, batch_size: 32}\n  teacher",
                                              "optim: {epochs: 1, batch_size: 512}\n  teacher"),
     "base.optim.batch_size", "larger than the 360 training samples"),
    ("teacher batch larger than the training split", ("optim: {epochs: 1, batch_size: 32}}",
                                                      "optim: {epochs: 1, batch_size: 4096}}"),
     "base.teacher.optim.batch_size", "no optimiser step would run"),
    ("arm batch override larger than the split", ("alpha: 0.0}", "alpha: 0.0, set: {optim.batch_size: 999}}"),
     "arms[0] (ce): optim.batch_size", "larger than the 360"),
    ("oracle structure on data without a hierarchy", ("structure: teacher,", "structure: oracle,"),
     "arms[1] (kd)", "needs a class hierarchy"),
    ("2-D model on 1-D signals", ("student: {name: mlp, hidden: 16, depth: 1}", "student: {name: resnet8}"),
     "base.student", "model 'resnet8' does not fit dataset 'mnist1d'"),
    ("2-D teacher on 1-D signals", ("model: {name: cnn1d, channels: 8, depth: 2}", "model: {name: wrn_16_2}"),
     "base.teacher.model", "does not fit"),
    ("gradcam on the MLP", ("structure: teacher,", "structure: {name: explanation, source: gradcam},"),
     "arms[1] (kd)", "gives one number per class"),
    ("gradcam at a layer the model lacks", ("structure: teacher,",
                                            "structure: {name: explanation, source: gradcam, "
                                            "source_params: {layer: blocks}},"),
     "arms[1] (kd)", "has no layer 'blocks'"),
    ("gradcam of the teacher at a layer without spatial dims",
     ("structure: teacher,", "structure: {name: explanation, source: gradcam, explainer: teacher, "
                             "source_params: {layer: head}},"),
     "arms[1] (kd)", "of the teacher model 'cnn1d' gives one number per class"),
    ("duplicate key in a mapping", ("alpha: 0.9}", "alpha: 0.9, alpha: 0.0}"), "line 10",
     "key 'alpha' appears twice"),
    ("duplicate top-level key", ("seeds: [0, 1]", "seeds: [0, 1]\nseeds: [2]"), "line", "key 'seeds' appears twice"),
    ("boolean seeds", ("seeds: [0, 1]", "seeds: [true, false]"), "seeds[0]", "valid integer"),
    ("boolean alpha", ("alpha: 0.9}", "alpha: true}"), "arms[1].alpha", "not a boolean"),
    ("boolean epochs", ("optim: {epochs: 1, batch_size: 32}\n  teacher", "optim: {epochs: true}\n  teacher"),
     "base.optim.epochs", "valid integer"),
    ("float epochs", ("optim: {epochs: 1, batch_size: 32}\n  teacher", "optim: {epochs: 1.5}\n  teacher"),
     "base.optim.epochs", "valid integer"),
    ("gate out of range", ("batch_size: 32}}", "batch_size: 32}, min_accuracy: 1.5}"), "base.teacher.min_accuracy",
     "less than or equal to 1"),
]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("case,edit,field,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_at_load_with_file_field_and_fix(tmp_path, case, edit, field, message):
    assert edit[0] in BASE, case
    assert_refused(write(tmp_path, BASE.replace(edit[0], edit[1], 1)), field, message)


def test_cam_on_the_mlp_is_per_unit_maps_not_degenerate(tmp_path):
    """CAM of an MLP is w_c * h over its hidden units (the README's documented variant): a map
    of `hidden` numbers per class, so it loads; Grad-CAM there is one number and is refused."""
    cam = BASE.replace("structure: teacher,", "structure: {name: explanation, source: cam},")
    assert load_study(write(tmp_path, cam)).cells


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdablate.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "is not one of"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["--workers", "0"], "argument --workers: '0': use 1 or more workers, or 'auto'"),
    (["--workers", "many"], "is neither a number of workers nor 'auto'"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--threads", "two"], "argument --threads: invalid int value"),
])
def test_bad_run_options_are_one_line_exit_2(tmp_path, args, message):
    out = cli("run", str(write(tmp_path, BASE)), *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_cuda_without_cuda_is_refused(tmp_path):
    out = cli("run", str(write(tmp_path, BASE)), "--device", "cuda", cwd=tmp_path)
    assert out.returncode == 2 and "CUDA is not available here" in out.stderr and out.stderr.count("\n") == 1


def test_dry_run_catches_a_misfit_before_any_store_exists(tmp_path):
    path = write(tmp_path, BASE.replace("structure: teacher,", "structure: oracle,"))
    out = cli("dry-run", str(path), cwd=tmp_path)
    assert out.returncode == 2 and "needs a class hierarchy" in out.stderr and out.stderr.count("\n") == 1


def test_zero_optimiser_steps_fail_instead_of_reporting_chance():
    data = load_dataset("mnist1d", {"num_samples": 200})
    with pytest.raises(NoTrainingSteps, match="no step would run"):
        fit(ModelSpec(name="mlp"), data, OptimConfig(epochs=1, batch_size=len(data.y_train) + 1), KnowledgeConfig(), 0)


def test_ce_logs_only_the_terms_it_has():
    data = load_dataset("mnist1d", {"num_samples": 200})
    logs: list[dict] = []
    fit(ModelSpec(name="mlp"), data, OptimConfig(epochs=1, batch_size=32), KnowledgeConfig(temperature=4.0), 0,
        on_epoch=lambda e, m: logs.append(m))
    assert "train/loss_ce" in logs[0] and "train/loss_kd" not in logs[0] and "train/target_mass" not in logs[0]


def cells(tmp_path: Path, text: str = BASE) -> list[CellConfig]:
    return list(load_study(write(tmp_path, text)).cells)


def test_a_teacher_cache_from_elsewhere_is_never_used(tmp_path, capsys):
    """A valid cache file with other logits in it (copied, edited, or made from other data)
    is detected and the teacher retrained, with a one-line message."""
    cell = next(c for c in cells(tmp_path) if c.arm == "kd")
    data, cache = load_dataset(cell.data.name, cell.data.params), tmp_path / "cache"
    first = get_teacher(cell, data, cache)
    record = torch.load(first.path, weights_only=True)
    record["logits"]["train"] = torch.randn_like(record["logits"]["train"])  # a valid file, other logits
    torch.save(record, first.path)
    again = get_teacher(cell, data, cache)
    assert "its contents do not match their checksum; making it again" in capsys.readouterr().out
    assert torch.equal(again.logits["train"], first.logits["train"])
    other = load_dataset(cell.data.name, {**cell.data.params, "generator_seed": 7})  # same shape, other data
    get_teacher(cell, other, cache)
    assert "made from another data" in capsys.readouterr().out
    record = torch.load(first.path, weights_only=True)
    record["identity"]["key"] = "0" * 16
    torch.save(record, first.path)
    get_teacher(cell, other, cache)
    assert "made from another key" in capsys.readouterr().out


def runs(study: str) -> dict[str, list]:
    client = tracking.client()
    exp = client.get_experiment_by_name(study)
    out: dict[str, list] = {}
    for r in tracking.search_cells(client, exp.experiment_id):
        out.setdefault(r.data.tags["arm"], []).append(r)
    return out


def test_teacher_below_its_gate_fails_the_cells_that_read_it(mlflow_store, tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 32}}", "batch_size: 32}, min_accuracy: 0.99}"))
    failed = run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False))
    by_arm = runs("s")
    assert failed == 2 and {r.info.status for r in by_arm["kd"]} == {"FAILED"}
    reason = by_arm["kd"][0].data.tags["kdablate.failure_reason"]
    assert "TeacherRejected" in reason and "below teacher.min_accuracy 0.9900" in reason
    acc = float(reason.split("validation accuracy ")[1].split(",")[0])
    assert 0 <= acc < 0.99
    # CE reads no teacher: it runs, and logs no teacher metrics it did not use.
    assert {r.info.status for r in by_arm["ce"]} == {"FINISHED"}
    assert not any(k.startswith("teacher/") for k in by_arm["ce"][0].data.metrics)


def test_a_diverging_teacher_fails_its_cells_and_the_rest_run(mlflow_store, tmp_path):
    path = write(tmp_path, BASE.replace("optim: {epochs: 1, batch_size: 32}}",
                                        "optim: {epochs: 1, batch_size: 32, lr: 1.0e+8, momentum: 0.0}}"))
    failed = run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False))
    by_arm = runs("s")
    assert failed == 2 and {r.info.status for r in by_arm["ce"]} == {"FINISHED"}
    assert all("the teacher failed to train (NonFiniteLoss" in r.data.tags["kdablate.failure_reason"] for r in by_arm["kd"])


def test_teacher_metrics_and_provenance_are_logged_and_precision_cannot_mix(mlflow_store, tmp_path):
    path = write(tmp_path, BASE.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "batch_size: 32}}", "batch_size: 32}, min_accuracy: 0.0}"))
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    kd = runs("s")["kd"][0]
    assert {"teacher/val_acc", "teacher/test_acc"} <= set(kd.data.metrics)
    assert {"env." + t for t in ("cpu_model", "cpu_capability", "torch_version", "torch_cuda", "threads", "amp", "device")} <= set(kd.data.tags)
    with pytest.raises(ConfigError, match=r"2 finished cell\(s\) ran on cpu with --amp none.*--amp bf16"):
        run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False, amp="bf16"))
    out = cli("run", str(path), "--amp", "bf16", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "keep the precisions apart" in out.stderr
    from kdablate.hardware import cpu_flags

    # Before anything else, bf16 on a CPU without AMX is announced as likely slower.
    assert ("warning: --amp bf16 on this CPU" in out.stdout) == ("amx_bf16" not in cpu_flags())
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
