"""Feature knowledge in training (``feature:`` terms, issue 28's first half): a cell with feature
terms logs each term, trains the terms' modules with the student, resumes bit for bit (the
regressor, CRD's heads, memory banks and normalisers are in its checkpoint), refuses at load what
its models cannot give, and trains unstacked with its reason said once."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.models import build_model
from kdablate.storage import Checkpoint
from kdablate.trainer import TeacherSignal, fit, make_member

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ModelSpec(name="cnn1d", params={"channels": 8, "depth": 2})
TERMS = [{"name": "at"}, {"name": "fitnet", "hint": -1}, {"name": "sp"}, {"name": "rkd"}, {"name": "pkt"},
         {"name": "crd", "nce_k": 32, "feat_dim": 16}]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist1d", {"num_samples": 400})


@pytest.fixture(scope="module")
def teacher(tiny):
    torch.manual_seed(5)
    model = build_model("cnn1d", {"channels": 16, "depth": 2}, tiny.input_shape, tiny.num_classes)
    return TeacherSignal(model=model.eval().requires_grad_(False))


def test_every_term_is_logged_and_its_modules_train_with_the_student(tiny, teacher):
    knowledge = KnowledgeConfig(mass="teacher", structure="teacher", temperature=4.0, alpha=0.5, feature=TERMS)
    signal = TeacherSignal(logits={s: teacher.model(tiny.prepare(tiny.split(s)[0])).detach() for s in
                                   ("train", "val", "test")}, model=teacher.model)
    logs = {}
    fit(STUDENT, tiny, OptimConfig(epochs=1, batch_size=32), knowledge, 0, teacher=signal,
        on_epoch=lambda e, m: logs.update(m))
    for name in ("at", "fitnet", "sp", "rkd", "pkt", "crd"):
        assert math.isfinite(logs[f"train/feature_{name}"]), name
    member = make_member(STUDENT, tiny, OptimConfig(epochs=1, batch_size=32), knowledge, 0, 12, teacher=teacher.model)
    trained = {id(p) for group in member.opt.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in member.feature.terms.parameters())
    assert {id(p) for p in member.model.parameters()} <= trained


def test_resume_with_feature_terms_matches_the_uninterrupted_run(tiny, teacher, tmp_path):
    knowledge = KnowledgeConfig(feature=[{"name": "fitnet", "hint": -1}, {"name": "crd", "nce_k": 32}])
    opt = OptimConfig(epochs=4, batch_size=32)
    untimed = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    logs, resumed_logs = {}, {}
    straight = fit(STUDENT, tiny, opt, knowledge, 0, teacher=teacher, on_epoch=lambda e, m: logs.setdefault(e, untimed(m)))

    def crash_after_2(epoch, metrics):
        if epoch == 3:
            raise Interrupt

    ckpt = Checkpoint(tmp_path / "cell.pt", every=1)
    with pytest.raises(Interrupt):
        fit(STUDENT, tiny, opt, knowledge, 0, teacher=teacher, on_epoch=crash_after_2, checkpoint=ckpt)
    assert {"memory_s", "memory_t", "z"} <= {k.split(".")[-1] for k in ckpt.load()["members"][0]["feature"]}
    resumed = fit(STUDENT, tiny, opt, knowledge, 0, teacher=teacher, checkpoint=ckpt,
                  on_epoch=lambda e, m: resumed_logs.setdefault(e, untimed(m)))
    assert resumed_logs == {e: logs[e] for e in (3, 4)}
    assert resumed.metrics == straight.metrics


def study(tmp_path: Path, student: str, feature: str) -> Path:
    path = tmp_path / "k.yaml"
    path.write_text(f"""
base:
  data: {{name: mnist1d, num_samples: 600}}
  student: {student}
  optim: {{epochs: 1, batch_size: 64}}
  teacher: {{model: {{name: cnn1d, channels: 8, depth: 2}}, optim: {{epochs: 1}}, min_accuracy: 0.0}}
seeds: [0, 1]
arms:
  - {{name: ce, mass: none, alpha: 0.0}}
  - {{name: feat, mass: none, alpha: 0.0, feature: [{feature}]}}
""")
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdablate.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("student, feature, message", [
    ("{name: mlp, hidden: 16}", "at", "arms[1] (feat).feature[0]: at reads spatial feature maps"),
    ("{name: cnn1d, channels: 8, depth: 2}", "{name: fitnet, hint: 5}", "fitnet hint stage 5 does not exist"),
    ("{name: cnn1d, channels: 8, depth: 2}", "atx", "unknown feature term 'atx'; known: at, crd, fitnet"),
])
def test_a_term_its_models_cannot_feed_is_refused_at_load_in_one_line(tmp_path, student, feature, message):
    out = cli("dry-run", str(study(tmp_path, student, feature)), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_feature_arms_train_unstacked_and_say_so_once(mlflow_store, tmp_path):
    path = study(tmp_path, "{name: mlp, hidden: 16}", "rkd")
    out = cli("run", str(path), "--no-progress", "--stack", "on", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("note: feat: seeds train one by one, not stacked: its feature terms read") == 1
    assert "training 4 cells as 3 units" in out.stdout  # ce's two seeds stacked, feat's alone


def test_dry_run_names_each_cells_feature_terms(tmp_path):
    out = cli("dry-run", str(study(tmp_path, "{name: cnn1d, channels: 8, depth: 2}", "at, rkd")), cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert "feature" in lines[1] and lines[2].split()[6] == "none" and lines[4].split()[6] == "at+rkd", out.stdout


def test_an_online_teacher_runs_once_a_step_for_its_logits_and_features(tiny, teacher):
    """KD with feature terms and a teacher run online: one teacher forward per step gives both the
    batch's teacher logits (the same values as the model alone) and its stage features."""
    from kdablate.models import stages
    from kdablate.trainer import CPU

    online, ends = TeacherSignal(model=teacher.model, online=True), stages.stage_ends(teacher.model, tiny.input_shape)
    x = tiny.prepare(tiny.x_train[:8])
    logits, features = online.read(x, None, CPU, ends)
    assert torch.equal(logits, online.logits_for(x, None, CPU)) and len(features.stages) == len(ends)
    cached = TeacherSignal(logits={"train": torch.zeros(8, 10)}, model=teacher.model)
    assert cached.read(x, cached.logits["train"], CPU, ends)[0] is cached.logits["train"]
    knowledge = KnowledgeConfig(mass="teacher", structure="teacher", temperature=4.0, alpha=0.5, feature=[{"name": "at"}])
    optim, calls = OptimConfig(epochs=1, batch_size=32), []
    handle = teacher.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        make_member(STUDENT, tiny, optim, knowledge, 0, 1, teacher=teacher.model)
        setup = len(calls)  # the probes that bind the terms to the teacher's shapes
        fit(STUDENT, tiny, optim, knowledge, 0, teacher=online, splits=("val",))
    finally:
        handle.remove()
    assert len(calls) - 2 * setup == len(tiny.y_train) // 32  # one forward a step
