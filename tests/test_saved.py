"""Saved students: ``save_model: true`` logs the reported weights; ``kdablate.load_student``
gives back a model whose test accuracy is the run's ``report/test_acc``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdablate
from kdablate import tracking
from kdablate.data import load_dataset
from kdablate.registry import ConfigError
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study

SMOKE = Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml"


def test_saved_student_reproduces_its_reported_test_accuracy(mlflow_store, tmp_path):
    plain = load_study(SMOKE, arms=["ce"], seeds=[0])
    study = load_study(SMOKE, ["save_model=true", "optim.epochs=2"], arms=["ce"], seeds=[0])
    cell = study.cells[0]
    assert cell.save_model and cell.config_hash() == load_study(SMOKE, ["optim.epochs=2"], ["ce"], [0]).cells[0].config_hash()
    assert plain.cells[0].config_hash() != cell.config_hash()
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    client = tracking.client()
    run = tracking.search_cells(client, client.get_experiment_by_name("smoke").experiment_id, "FINISHED")[0]
    model = kdablate.load_student(run.info.run_id)
    assert not model.training
    data = load_dataset(cell.data.name, cell.data.params)
    x, y = data.split("test")
    with torch.no_grad():
        acc = (model(data.prepare(x, train=False)).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(tracking.summary(run)["report/test_acc"], abs=1e-6)


def test_a_run_without_a_saved_model_says_how_to_save_one(mlflow_store, tmp_path):
    study = load_study(SMOKE, ["optim.epochs=1"], arms=["ce"], seeds=[0])
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
    client = tracking.client()
    run = tracking.search_cells(client, client.get_experiment_by_name("smoke").experiment_id, "FINISHED")[0]
    with pytest.raises(ConfigError, match="has no saved model.*save_model: true"):
        kdablate.load_student(run.info.run_id)


def test_a_study_without_a_teacher_runs(mlflow_store, tmp_path):
    """teacher: null (no teacher at all) once crashed computing the cell hash."""
    path = tmp_path / "noteacher.yaml"
    path.write_text("base: {data: {name: mnist1d, num_samples: 500}, student: {name: mlp, hidden: 8, depth: 1},\n"
                    "       optim: {epochs: 1}, teacher: null}\nseeds: [0]\narms: [{name: ce, mass: none, alpha: 0.0}]\n")
    study = load_study(path)
    assert study.cells[0].teacher is None and len(study.cells[0].config_hash()) == 16
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 0
