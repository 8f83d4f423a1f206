"""Saved students: with ``save_model: true`` a cell logs its reported student (the weights
that ``report`` chose, on the validation split) and what rebuilds it, as artifacts of its
MLflow run under ``model/``; ``load_student(run_id)`` gives the model back for post-hoc
evaluation.

    model = kdablate.load_student("3f2a...")          # an nn.Module in eval mode
    logits = model(x)                                  # (B, K)

Weights are a plain ``state_dict`` read with ``torch.load(weights_only=True)``, so a
saved model can never run code when it is loaded.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdablate import tracking
from kdablate.config import CellConfig
from kdablate.models import build_model
from kdablate.registry import ConfigError

ARTIFACT_DIR = "model"
FORMAT = 1


def save_student(client: tracking.MlflowClient, run_id: str, cell: CellConfig, model: nn.Module,
                 input_shape: tuple[int, ...], num_classes: int) -> None:
    """Log ``model``'s weights (moved to the CPU) and its spec into ``model/`` of ``run_id``."""
    spec = {"format": FORMAT, "name": cell.student.name, "params": dict(cell.student.params),
            "input_shape": list(input_shape), "num_classes": num_classes, "config_hash": cell.config_hash()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="kdablate-model-") as tmp:
        torch.save(state, Path(tmp) / "student.pt")
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, indent=2))
        client.log_artifacts(run_id, tmp, ARTIFACT_DIR)


def load_student(run_id: str, uri: str | None = None, device: str = "cpu") -> nn.Module:
    """The student saved by run ``run_id`` of the store at ``uri`` (default: MLFLOW_TRACKING_URI or
    ./mlruns.db), rebuilt from its spec, in eval mode on ``device``. ConfigError, one line, when
    the run does not exist or saved no model."""
    client = tracking.client(uri)
    with tempfile.TemporaryDirectory(prefix="kdablate-model-") as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, ARTIFACT_DIR, tmp))
            spec = json.loads((folder / "spec.json").read_text())
        except Exception as e:  # noqa: BLE001 - a missing run or artifact, whatever MLflow raises
            raise ConfigError(f"run {run_id[:40]} has no saved model ({type(e).__name__}); set save_model: true "
                              "in the study's base (or an arm's set) and rerun that cell") from None
        state = torch.load(folder / "student.pt", map_location=device, weights_only=True)
    model = build_model(spec["name"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"])
    model.load_state_dict(state)
    return model.to(device).eval()
