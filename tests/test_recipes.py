"""The published recipes as studies: every resolved cell of ``crd_cifar100.yaml`` against
mdistiller's CIFAR-100 recipe, field by field."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdablate.data.fake import write_cifar
from kdablate.study import load_study
from tests.datafiles import write_shipped_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crd")
    write_cifar(folder / "data", "cifar100", 400, 100)
    write_shipped_checkpoints(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield load_study(ROOT / "studies" / "crd_cifar100.yaml")


def test_every_cell_follows_mdistillers_schedule(crd):
    assert crd.config.seeds and len(crd.cells) == len(crd.arms()) * len(crd.config.seeds)
    for cell in crd.cells:
        assert cell.student.name == "resnet8x4" and cell.data.name == "cifar100"
        assert cell.data.params["augment"] is True  # random crop (padding 4) and flip, as mdistiller
        o = cell.optim
        assert (o.epochs, o.batch_size, o.lr, o.momentum, o.weight_decay) == (240, 64, 0.05, 0.9, 5e-4)
        assert (o.nesterov, o.schedule, o.milestones, o.gamma) == (False, "multistep", (150, 180, 210), 0.1)
        t = cell.teacher
        assert t.source == "checkpoint" and t.model.name == "resnet32x4" and t.checkpoint == "teachers/resnet32x4.pth"
        assert cell.report == "last"  # never selected on test (mdistiller's best_acc is)


def arm(crd, name: str):
    return next(c for c in crd.cells if c.arm == name).knowledge


def test_the_arms_are_mdistillers_losses(crd):
    ce, kd, dkd = arm(crd, "ce"), arm(crd, "kd"), arm(crd, "dkd")
    assert ce.alpha == 0.0 and ce.mass.name == "none"
    # CE weight 0.1, KD weight 0.9 (with T^2) at T 4: (1 - alpha) CE + alpha T^2 KL.
    assert (kd.objective.name, kd.mass.name, kd.structure.name, kd.temperature, kd.alpha) == \
        ("soft_target", "teacher", "teacher", 4.0, 0.9)
    # CE weight 1, alpha 1, beta 8, T 4, warm-up min(epoch / 20, 1).
    assert (dkd.objective.name, dkd.objective.params["beta"], dkd.alpha, dkd.temperature) == ("dkd", 8.0, 1.0, 4.0)
    assert (dkd.warmup_epochs, dkd.warmup_by) == (20, "epoch")
    assert {"il_uniform", "il_cam", "il_saliency"} <= set(crd.arms())


def test_published_values_are_mdistillers(crd):
    assert crd.config.published == {"ce": 72.50, "kd": 73.33, "dkd": 76.32, "teacher": 79.42}
