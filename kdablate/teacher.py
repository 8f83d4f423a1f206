"""Train a teacher once per (data, teacher config, seed), cache it with its logits.

The cache holds the reported (best-on-val) weights, their metrics and the
teacher's logits on every split of the unaugmented data, so distillation is a
lookup. Writes are atomic (temp file + rename) and a per-key file lock keeps two
processes from training the same teacher twice.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from torch import nn

from kdablate.config import CellConfig, KnowledgeConfig
from kdablate.data import DataBundle, crop_flip_params
from kdablate.models import build_model
from kdablate.storage import atomic_save, file_lock
from kdablate.trainer import CPU, SPLITS, Runtime, fit, predict


@dataclasses.dataclass(frozen=True)
class Teacher:
    """logits: split -> (N, K); metrics: 'report/...' of the cached teacher."""

    key: str
    logits: dict[str, torch.Tensor]
    metrics: dict[str, float]
    path: Path


def train_teacher(cell: CellConfig, data: DataBundle, runtime: Runtime = CPU) -> dict:
    """Fit the teacher of ``cell`` with plain CE; return the cache record (logits in inference mode)."""
    assert cell.teacher is not None
    seed = cell.seed if cell.teacher.seed is None else cell.teacher.seed
    result = fit(cell.teacher.model, data, cell.teacher.optim, KnowledgeConfig(), seed, report=cell.report,
                 runtime=runtime)
    logits = {s: predict(result.model, data.split(s)[0], prepare=data.prepare, runtime=runtime) for s in SPLITS}
    return {
        "state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
        "logits": logits,
        "metrics": result.metrics,
        "config": {"data": cell.data.model_dump(), "teacher": cell.teacher.model_dump(), "seed": seed},
    }


def get_teacher(cell: CellConfig, data: DataBundle, cache_dir: Path, runtime: Runtime = CPU) -> Teacher:
    """The cached teacher of ``cell``, training and caching it first if needed."""
    key = cell.teacher_key()
    path = Path(cache_dir) / "teachers" / f"{key}.pt"
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            print(f"training teacher {key} ({cell.teacher.model.name})", flush=True)
            atomic_save(train_teacher(cell, data, runtime), path)
    record = torch.load(path, weights_only=True)
    return Teacher(key, record["logits"], record["metrics"], path)


@torch.inference_mode()
def view_logits(model: nn.Module, data: DataBundle, views: torch.Tensor, runtime: Runtime = CPU,
                chunk: int = 512) -> torch.Tensor:
    """(V, N, 3) fixed augmentations of the train split -> (V, N, K) teacher logits on them."""
    out = torch.empty(views.shape[0], len(data.y_train), data.num_classes)
    for v in range(views.shape[0]):
        for i in range(0, len(data.y_train), chunk):
            x = data.prepare(data.x_train[i : i + chunk], train=True, views=views[v, i : i + chunk])
            with runtime.autocast():
                out[v, i : i + chunk] = model(runtime.to(x)).float().cpu()
    return out


def get_teacher_views(cell: CellConfig, data: DataBundle, teacher: Teacher, runtime: Runtime = CPU) -> dict:
    """{'views': (V, N, 3) augmentation params, 'logits': (V, N, K)}, computed once and cached."""
    n_views = cell.teacher.views
    path = teacher.path.with_name(f"{teacher.key}-views{n_views}.pt")
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            g = torch.Generator().manual_seed(int(teacher.key[:8], 16))  # fixed per teacher and data
            views = torch.stack([crop_flip_params(len(data.y_train), g) for _ in range(n_views)])
            logits = view_logits(teacher_model(cell, data, teacher, runtime), data, views, runtime)
            atomic_save({"views": views, "logits": logits}, path)
    return torch.load(path, weights_only=True)


def teacher_model(cell: CellConfig, data: DataBundle, teacher: Teacher, runtime: Runtime = CPU) -> nn.Module:
    """The cached teacher as a frozen module in eval mode (for teacher explanations)."""
    spec = cell.teacher.model
    model = build_model(spec.name, spec.params, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(teacher.path, weights_only=True)["state_dict"])
    model = model.to(runtime.device)
    if len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)
