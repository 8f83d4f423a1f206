"""Where a teacher comes from: a checkpoint file, an earlier run's saved student, its own data,
or an ensemble; each checked at load (exit 2, one line) and recorded on the cells that use it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdablate import tracking
from kdablate.config import CellConfig
from kdablate.data import load_dataset
from kdablate.data.fake import write_cifar
from kdablate.hashing import file_digest
from kdablate.models import build_model
from kdablate.models.ensemble import ensemble_logits
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study
from kdablate.teacher import get_teacher, get_teacher_views, train_teacher
from kdablate.trainer import predict
from tests.test_study import assert_refused, write
from tests.test_trust import cli, runs

REFERENCE = json.loads((Path(__file__).parent / "reference_keys.json").read_text())


# ------------------------------------------------------------------ checkpoint files


def image_study(root: Path, teacher: str, arms: str = "") -> str:
    return f"""
    base:
      data: {{name: cifar10, data_root: {root}, augment: false}}
      student: {{name: resnet8}}
      optim: {{epochs: 1, batch_size: 16}}
      teacher: {teacher}
    seeds: [0]
    arms:
      - {{name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}}
    {arms}"""


def reference_named(state: dict[str, torch.Tensor], model: str) -> dict[str, torch.Tensor]:
    """A zoo state_dict under the reference code's key names (RepDistiller's, from the recorded facts)."""
    names = [k for k, _ in REFERENCE[model]["keys"]]
    assert len(names) == len(state)
    return dict(zip(names, state.values()))


FORMATS = {
    "bare": lambda sd, m: sd,
    "model-wrapped": lambda sd, m: {"model": sd, "epoch": 240, "best_acc": 0.5},
    "state_dict-wrapped": lambda sd, m: {"state_dict": sd},
    "net-wrapped": lambda sd, m: {"net": sd, "acc": 1.0},
    "DataParallel": lambda sd, m: {f"module.{k}": v for k, v in sd.items()},
    "RepDistiller names": lambda sd, m: {"model": reference_named(sd, m)},
}


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    return write_cifar(tmp_path / "data", "cifar10", 120, 40)


def saved_model(path: Path, name: str = "resnet8", k: int = 10, fmt: str = "bare", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, {}, (3, 32, 32), k).eval()
    torch.save(FORMATS[fmt](model.state_dict(), name), path)
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_in_every_format_is_the_model_it_saved(tmp_path, cifar, fmt, capsys):
    ckpt = tmp_path / "t.pth"
    model = saved_model(ckpt, fmt=fmt)
    cell = CellConfig(arm="kd", seed=0, data={"name": "cifar10", "data_root": str(cifar)},
                      teacher={"model": "resnet8", "checkpoint": str(ckpt)},
                      knowledge={"mass": "teacher", "structure": "teacher", "temperature": 4.0, "alpha": 0.9})
    data = load_dataset("cifar10", cell.data.params)
    teacher = get_teacher(cell, data, tmp_path / "cache")
    assert f"from checkpoint {ckpt} (sha256 {file_digest(ckpt)})" in capsys.readouterr().out
    direct = predict(model, data.x_test, prepare=data.prepare)
    assert torch.equal(teacher.logits["test"], direct)
    assert teacher.source == "checkpoint" and teacher.sha256 == file_digest(ckpt)
    assert {"report/val_acc", "report/test_acc"} <= set(teacher.metrics)
    assert teacher.tags()["kdablate.teacher_source"] == "checkpoint"


def test_a_checkpoint_teacher_runs_untrained_and_is_recorded(mlflow_store, tmp_path, cifar, capsys):
    ckpt = tmp_path / "t.pth"
    saved_model(ckpt, fmt="model-wrapped")
    path = write(tmp_path, image_study(cifar, f"{{model: resnet8, checkpoint: {ckpt}, min_accuracy: 0.0}}"))
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    out = capsys.readouterr().out
    assert "loaded teacher" in out and "from checkpoint" in out and "training teacher" not in out
    kd = runs("s")["kd"][0]
    assert kd.data.tags["kdablate.teacher_source"] == "checkpoint"
    assert kd.data.tags["kdablate.teacher_sha256"] == file_digest(ckpt)
    assert {"teacher/val_acc", "teacher/test_acc"} <= set(kd.data.metrics)
    # Another file at the same path is another teacher: another cache key, and another cell.
    cell = load_study(path).cells[0]
    before = cell.teacher_key(), cell.config_hash()
    saved_model(tmp_path / "new.pth", fmt="model-wrapped", seed=1)
    (tmp_path / "new.pth").replace(ckpt)  # as a copy or download puts a file in place
    after = cell.teacher_key(), cell.config_hash()
    assert before[0] != after[0] and before[1] != after[1]


@pytest.mark.parametrize("case", ["missing", "sha256", "keys", "classes", "not a state_dict", "mobilenet stride"])
def test_a_checkpoint_that_cannot_teach_is_refused_at_load(tmp_path, cifar, case):
    ckpt = tmp_path / "t.pth"
    teacher, message = f"{{model: resnet8, checkpoint: {ckpt}}}", ""
    if case == "missing":
        message = "No such file"
    elif case == "sha256":
        saved_model(ckpt)
        teacher, message = f"{{model: resnet8, checkpoint: {ckpt}, sha256: {'ab' * 32}}}", "not the abab"
    elif case == "keys":
        saved_model(ckpt, name="resnet20")  # 3 blocks a stage, not 1
        message = "does not fit model 'resnet8': 12 missing (features.2.shortcut.0.weight"
    elif case == "classes":
        saved_model(ckpt, k=100)
        message = "its model has 100 classes and the data 10"
    elif case == "not a state_dict":
        torch.save({"epoch": 3}, ckpt)
        message = "holds no state_dict"
    else:
        model = build_model("mobilenetv2", {"width_mult": 0.5, "stem_stride": 2}, (3, 32, 32), 10)
        torch.save({"model": reference_named(model.state_dict(), "mobilenetv2")}, ckpt)
        teacher = f"{{model: {{name: mobilenetv2, width_mult: 0.5}}, checkpoint: {ckpt}}}"
        message = "needs stem_stride: 2"
    assert_refused(write(tmp_path, image_study(cifar, teacher)), "base.teacher.checkpoint", message)


def test_dry_run_refuses_a_missing_checkpoint_in_one_line(tmp_path, cifar):
    path = write(tmp_path, image_study(cifar, f"{{model: resnet8, checkpoint: {tmp_path / 'none.pth'}}}"))
    out = cli("dry-run", str(path), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "base.teacher.checkpoint" in out.stderr


def test_reference_mobilenet_loads_at_crd_stride(tmp_path, cifar):
    ckpt = tmp_path / "t.pth"
    model = build_model("mobilenetv2", {"width_mult": 0.5, "stem_stride": 2}, (3, 32, 32), 10).eval()
    torch.save({"model": reference_named(model.state_dict(), "mobilenetv2")}, ckpt)
    study = load_study(write(tmp_path, image_study(
        cifar, f"{{model: {{name: mobilenetv2, width_mult: 0.5, stem_stride: 2}}, checkpoint: {ckpt}}}")))
    data = load_dataset("cifar10", study.cells[0].data.params)
    teacher = get_teacher(study.cells[0], data, tmp_path / "cache")
    assert torch.equal(teacher.logits["val"], predict(model, data.x_val, prepare=data.prepare))


# ------------------------------------------------------------------ from an earlier run

MNIST = """
base:
  data: {name: mnist1d, num_samples: 500}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 2, batch_size: 32}
  teacher: TEACHER
  save_model: true
seeds: [0]
arms:
  - {name: ARM, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}
"""


def mnist_study(tmp_path: Path, name: str, teacher: str, arm: str = "kd") -> Path:
    return write(tmp_path, MNIST.replace("TEACHER", teacher).replace("ARM", arm), f"{name}.yaml")


def test_born_again_chain_from_saved_runs(mlflow_store, tmp_path, capsys):
    gen0 = mnist_study(tmp_path, "gen0", "{model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 2, batch_size: 32}, "
                                              "min_accuracy: 0.0}")
    opts = RunOptions(cache_dir=tmp_path / "cache", progress=False)
    assert run_study(load_study(gen0), opts) == 0
    parent = runs("gen0")["kd"][0]
    gen1 = mnist_study(tmp_path, "gen1", f"{{from_run: {parent.info.run_id}, min_accuracy: 0.0}}")
    assert run_study(load_study(gen1), opts) == 0
    assert f"from run {parent.info.run_id}" in capsys.readouterr().out
    child = runs("gen1")["kd"][0]
    assert child.data.tags["kdablate.teacher_source"] == "run"
    # The teacher is the saved student itself: its accuracy on the same split is the student's.
    assert child.data.metrics["teacher/val_acc"] == pytest.approx(parent.data.metrics["report/val_acc"], abs=1e-9)
    gen2 = mnist_study(tmp_path, "gen2", f"{{from_run: {child.info.run_id}, min_accuracy: 0.0}}")
    assert run_study(load_study(gen2), opts) == 0
    assert runs("gen2")["kd"][0].data.metrics["teacher/val_acc"] == pytest.approx(
        child.data.metrics["report/val_acc"], abs=1e-9)


def test_a_run_that_cannot_teach_is_refused_at_load(mlflow_store, tmp_path):
    study = mnist_study(tmp_path, "plain", "{model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 1}, min_accuracy: 0.0}")
    text = study.read_text().replace("save_model: true", "save_model: false")
    study.write_text(text)
    run_study(load_study(study), RunOptions(cache_dir=tmp_path / "cache", progress=False))
    no_model = runs("plain")["kd"][0].info.run_id
    assert_refused(mnist_study(tmp_path, "a", f"{{from_run: {no_model}}}"), "base.teacher.from_run", "has no saved model")
    saver = mnist_study(tmp_path, "saver", "{model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 1}, min_accuracy: 0.0}")
    saver.write_text(saver.read_text().replace("num_samples: 500", "num_samples: 600"))
    run_study(load_study(saver), RunOptions(cache_dir=tmp_path / "cache", progress=False))
    other_data = runs("saver")["kd"][0].info.run_id
    assert_refused(mnist_study(tmp_path, "b", f"{{from_run: {other_data}}}"), "base.teacher.from_run",
                   "trained on other data")


# ------------------------------------------------------------------ the teacher's own data


def subset_study(root: Path, teacher_data: str, student_subset: int = 40) -> str:
    return f"""
    base:
      data: {{name: cifar10, data_root: {root}, train_subset: {student_subset}, augment: false}}
      student: {{name: resnet8}}
      optim: {{epochs: 1, batch_size: 8}}
      teacher: {{model: resnet8, optim: {{epochs: 1, batch_size: 8}}, data: {teacher_data}, min_accuracy: 0.0}}
    seeds: [0]
    arms:
      - {{name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}}
    """


def test_the_teacher_trains_on_its_own_data(tmp_path, cifar, capsys):
    path = write(tmp_path, subset_study(cifar, f"{{name: cifar10, data_root: {cifar}, augment: false}}"))
    cell = load_study(path).cells[0]
    data = load_dataset("cifar10", cell.data.params)
    teacher = get_teacher(cell, data, tmp_path / "cache")
    record = torch.load(teacher.path, weights_only=True)
    full = load_dataset("cifar10", {"data_root": str(cifar), "augment": False})
    assert len(record["logits"]["train"]) == len(full.y_train) > len(data.y_train) == 40  # trained on all
    assert torch.equal(teacher.logits["train"], predict(teacher.model(data), data.x_train, prepare=data.prepare))
    assert "epoch 1/1: val/acc" in capsys.readouterr().out  # progress, one line an epoch off a terminal
    # The students' subset is not the teacher's identity; its own data is.
    other = load_study(write(tmp_path, subset_study(cifar, f"{{name: cifar10, data_root: {cifar}, augment: false}}",
                                                    30), "o.yaml")).cells[0]
    assert other.teacher_key() == cell.teacher_key()
    plain = cell.model_copy(update={"teacher": cell.teacher.model_copy(update={"data": None})})
    assert plain.teacher_key() != cell.teacher_key()


@pytest.mark.parametrize("data,message", [
    ("{name: cifar10, data_root: ROOT, split_seed: 3}", "same validation and test split"),
    ("{name: cifar10, data_root: ROOT, val_fraction: 0.2}", "same validation and test split"),
    ("{name: cifar100, data_root: ROOT}", "same validation and test split"),
])
def test_teacher_data_with_another_split_is_refused(tmp_path, cifar, data, message):
    assert_refused(write(tmp_path, subset_study(cifar, data.replace("ROOT", str(cifar)))), "base.teacher.data", message)


def test_teacher_data_guard_at_run_time(tmp_path, cifar):
    from kdablate.registry import ConfigError
    from kdablate.teacher import teacher_data

    cell = CellConfig(arm="kd", seed=0, data={"name": "cifar10", "data_root": str(cifar)},
                      teacher={"model": "resnet8", "data": {"name": "cifar10", "data_root": str(cifar), "split_seed": 1}})
    with pytest.raises(ConfigError, match="val split is not the students'"):
        teacher_data(cell.teacher, load_dataset("cifar10", cell.data.params), tmp_path / "cache")


# ------------------------------------------------------------------ what a cache may hold

SMALL = dict(arm="kd", seed=0, data={"name": "mnist1d", "num_samples": 500},
             teacher={"model": {"name": "cnn1d", "channels": 8, "depth": 2}, "optim": {"epochs": 1, "batch_size": 32}},
             knowledge={"mass": "teacher", "structure": "teacher", "temperature": 4.0, "alpha": 0.9})


@pytest.mark.parametrize("part", ["weights", "logits", "metrics", "spec"])
def test_any_edit_to_a_cached_teacher_is_detected(tmp_path, capsys, part):
    """One flipped value in a cached teacher (weights too, which an explainer-teacher cell reads)
    makes it again, with a message; a record edited while in use fails loudly."""
    cell = CellConfig(**SMALL)
    data = load_dataset("mnist1d", cell.data.params)
    first = get_teacher(cell, data, tmp_path / "cache")
    weights = first.model(data).state_dict()
    record = torch.load(first.path, weights_only=True)
    edit = {"weights": lambda r: r["state_dict"][next(iter(r["state_dict"]))].view(-1)[0].add_(1e-3),
            "logits": lambda r: r["logits"]["val"].view(-1)[0].add_(1e-3),
            "metrics": lambda r: r["metrics"].update({"report/val_acc": 1.0}),
            "spec": lambda r: r["spec"]["params"].update({"depth": 3})}
    edit[part](record)
    torch.save(record, first.path)
    with pytest.raises(RuntimeError, match="changed while in use"):
        first.model(data)
    again = get_teacher(cell, data, tmp_path / "cache")
    assert "its contents do not match their checksum" in capsys.readouterr().out
    assert all(torch.equal(v, weights[k]) for k, v in again.model(data).state_dict().items())


def test_edited_teacher_views_are_recomputed(tmp_path, capsys):
    root = write_cifar(tmp_path / "d", "cifar10", 60, 20)
    cell = CellConfig(arm="kd", seed=0, data={"name": "cifar10", "data_root": str(root)},
                      teacher={"model": "resnet8", "optim": {"epochs": 1, "batch_size": 16}, "views": 2},
                      knowledge=SMALL["knowledge"])
    data = load_dataset("cifar10", cell.data.params)
    teacher = get_teacher(cell, data, tmp_path / "cache")
    views = get_teacher_views(2, data, teacher)
    path = teacher.path.with_name(f"{teacher.key}-views2.pt")
    record = torch.load(path, weights_only=True)
    record["views"][0, 0, 2] = 1 - record["views"][0, 0, 2]  # one flip flag: the logits no longer fit
    torch.save(record, path)
    again = get_teacher_views(2, data, teacher)
    assert "its contents do not match their checksum" in capsys.readouterr().out
    assert torch.equal(again["views"], views["views"])


def test_teacher_progress_off_a_terminal(tmp_path, capsys):
    cell = CellConfig(**{**SMALL, "teacher": {**SMALL["teacher"], "optim": {"epochs": 3, "batch_size": 32}}})
    train_teacher(cell, cell.teacher, load_dataset("mnist1d", cell.data.params))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "val/acc" in ln]
    assert [ln.split(" epoch ")[1].split(":")[0] for ln in lines] == ["1/3", "2/3", "3/3"]


# ------------------------------------------------------------------ ensembles


def test_ensemble_logits_are_the_mean_probability_at_t():
    g = torch.Generator().manual_seed(0)
    members = [torch.randn(50, 7, generator=g, dtype=torch.float64) * 4 for _ in range(3)]
    for t in (1.0, 4.0):
        z = ensemble_logits(members, t)
        mean = torch.stack([torch.softmax(m / t, -1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(z / t, -1), mean.float(), rtol=1e-6, atol=1e-7)


ENSEMBLE = """
base:
  data: {name: mnist1d, num_samples: 500}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 1, batch_size: 32}
  teacher: TEACHER
seeds: [0]
arms:
  - {name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}
"""
MEMBER = "{model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 2, batch_size: 32}, seed: SEED, min_accuracy: GATE}"


def member(seed: int, gate: float = 0.0) -> str:
    return MEMBER.replace("SEED", str(seed)).replace("GATE", str(gate))


def test_an_ensemble_of_one_is_that_teacher(mlflow_store, tmp_path):
    single = load_study(write(tmp_path, ENSEMBLE.replace("TEACHER", member(0)), "one.yaml"))
    listed = load_study(write(tmp_path, ENSEMBLE.replace("TEACHER", f"[{member(0)}]"), "listed.yaml"))
    assert single.cells == listed.cells
    opts = RunOptions(cache_dir=tmp_path / "cache", progress=False)
    assert run_study(single, opts) == 0 and run_study(listed, opts) == 0
    a, b = ({k: v for k, v in runs(s)["kd"][0].data.metrics.items() if not k.startswith("time/")}
            for s in ("one", "listed"))
    assert a == b and "teacher/val_acc" in a and len(a) > 20


def test_an_ensemble_teacher_is_the_mean_of_its_members(mlflow_store, tmp_path):
    path = write(tmp_path, ENSEMBLE.replace("TEACHER", f"[{member(0)}, {member(1)}]"))
    cell = load_study(path).cells[0]
    data = load_dataset("mnist1d", cell.data.params)
    teacher = get_teacher(cell, data, tmp_path / "cache")
    singles = [get_teacher(cell.model_copy(update={"teacher": m}), data, tmp_path / "cache") for m in cell.teachers()]
    assert len({s.path for s in singles}) == 2  # each member cached on its own
    mean = torch.stack([torch.softmax(s.logits["test"] / 4.0, -1) for s in singles]).mean(0)
    torch.testing.assert_close(torch.softmax(teacher.logits["test"] / 4.0, -1), mean)
    y = data.y_test
    assert teacher.metrics["report/test_acc"] == pytest.approx((mean.argmax(1) == y).double().mean().item())
    assert teacher.metrics["report/member1_val_acc"] == singles[1].metrics["report/val_acc"]
    with torch.inference_mode():
        online = teacher.model(data)(data.prepare(data.x_test))
    torch.testing.assert_close(online, teacher.logits["test"], rtol=1e-4, atol=1e-4)
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    kd = runs("s")["kd"][0]
    assert kd.data.tags["kdablate.teacher_source"] == "ensemble"
    assert tracking.summary(kd)["teacher/test_acc"] == pytest.approx(teacher.metrics["report/test_acc"])
    assert "teacher/member0_val_acc" in kd.data.metrics


def test_each_ensemble_member_is_gated(mlflow_store, tmp_path):
    path = write(tmp_path, ENSEMBLE.replace("TEACHER", f"[{member(0)}, {member(1, 0.99)}]"))
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 1
    kd = runs("s")["kd"][0]
    assert kd.info.status == "FAILED" and "below teacher.min_accuracy 0.9900" in kd.data.tags["kdablate.failure_reason"]


def test_ensemble_members_with_views_are_refused(tmp_path):
    views = member(1).replace("seed: 1", "seed: 1, views: 2")
    assert_refused(write(tmp_path, ENSEMBLE.replace("TEACHER", f"[{member(0)}, {views}]")), "base.teacher[1].views",
                   "set views: 0")
