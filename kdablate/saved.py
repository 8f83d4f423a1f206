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

import dataclasses
import functools
import hashlib
import io
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdablate import tracking
from kdablate.config import CellConfig, DataSpec
from kdablate.models import build_model
from kdablate.registry import ConfigError
from kdablate.storage import load_tensors

ARTIFACT_DIR = "model"
FORMAT = 1


def save_student(client: tracking.MlflowClient, run_id: str, cell: CellConfig, model: nn.Module,
                 input_shape: tuple[int, ...], num_classes: int) -> None:
    """Log ``model``'s weights (moved to the CPU) and its spec into ``model/`` of ``run_id``."""
    spec = {"format": FORMAT, "name": cell.student.name, "params": dict(cell.student.params),
            "input_shape": list(input_shape), "num_classes": num_classes, "config_hash": cell.config_hash(),
            "data": cell.data.model_dump(mode="json")}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="kdablate-model-") as tmp:
        torch.save(state, Path(tmp) / "student.pt")
        (Path(tmp) / "spec.json").write_text(json.dumps(spec, indent=2))
        client.log_artifacts(run_id, tmp, ARTIFACT_DIR)


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """What a ``save_model`` cell logged: spec (name, params, input_shape, num_classes, config_hash
    and, since format 1 gained it, data), the weights on the CPU and their file's sha256."""

    run_id: str
    spec: dict
    state: dict[str, torch.Tensor]
    sha256: str

    def build(self) -> nn.Module:
        """The saved model, rebuilt from its spec with its weights, in eval mode on the CPU."""
        s = self.spec
        model = build_model(s["name"], s["params"], tuple(s["input_shape"]), s["num_classes"])
        model.load_state_dict(self.state)
        return model.eval()


def read_saved(run_id: str, uri: str | None = None) -> SavedModel:
    """The model run ``run_id`` of the store at ``uri`` (default: MLFLOW_TRACKING_URI or ./mlruns.db)
    saved; ConfigError, one line, when the run does not exist or saved no model. A run's artifacts
    do not change, so each is downloaded once per process (the load check and every cell that
    distils from it share it)."""
    return _read_saved(run_id, tracking.tracking_uri() if uri is None else uri)


@functools.lru_cache(maxsize=8)
def _read_saved(run_id: str, uri: str) -> SavedModel:
    client = tracking.client(uri)
    with tempfile.TemporaryDirectory(prefix="kdablate-model-") as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, ARTIFACT_DIR, tmp))
            spec = json.loads((folder / "spec.json").read_text())
            blob = (folder / "student.pt").read_bytes()
        except Exception as e:  # noqa: BLE001 - a missing run or artifact, whatever MLflow raises
            raise ConfigError(f"run {run_id[:40]} has no saved model ({type(e).__name__}); set save_model: true "
                              "in the study's base (or an arm's set) and rerun that cell") from None
    state = load_tensors(io.BytesIO(blob))
    return SavedModel(run_id, spec, state, hashlib.sha256(blob).hexdigest())


def load_student(run_id: str, uri: str | None = None, device: str = "cpu") -> nn.Module:
    """The student saved by run ``run_id`` of the store at ``uri`` (default: MLFLOW_TRACKING_URI or
    ./mlruns.db), rebuilt from its spec, in eval mode on ``device``. ConfigError, one line, when
    the run does not exist or saved no model."""
    return read_saved(run_id, uri).build().to(device)


def saved_mismatch(spec: dict, data: DataSpec, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    """Why a saved model cannot teach on ``data`` (it was made for other data), or None."""
    if tuple(spec["input_shape"]) != tuple(input_shape) or spec["num_classes"] != num_classes:
        return (f"its model takes {tuple(spec['input_shape'])} inputs in {spec['num_classes']} classes, the data "
                f"{tuple(input_shape)} in {num_classes}; use a run trained on this data")
    made_on = spec.get("data")
    if made_on is not None and not DataSpec.model_validate(made_on).same_split(data):
        return (f"it was trained on other data ({made_on['name']} {made_on.get('params')}), which may hold the "
                "students' validation or test images; use a run of the same dataset and split")
    return None
