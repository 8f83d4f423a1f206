"""Train a teacher once per (data, teacher config, seed), cache it with its logits, and hand
it to a cell's training as one ``kdablate.trainer.TeacherSignal`` (``Teacher.signal``).

The cache holds the reported (best-on-val) weights, their metrics and the
teacher's logits on every split of the unaugmented data, so distillation is a
lookup. Writes are atomic (temp file + rename) and a per-key file lock keeps two
processes from training the same teacher twice.

A cache file also records what it was made from (the teacher key, the data's
fingerprint) and a checksum of its logits. A file that does not match, because it
was copied from another study, edited, or made from other data, is never used: the
teacher is retrained, with a one-line message.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from torch import nn

from kdablate.components import Need
from kdablate.config import CellConfig, KnowledgeConfig
from kdablate.data import DataBundle, crop_flip_params
from kdablate.models import build_model
from kdablate.models.factory import place_model
from kdablate.storage import atomic_save, file_lock
from kdablate.trainer import CPU, SPLITS, Runtime, TeacherSignal, fit, predict


@dataclasses.dataclass(frozen=True)
class Teacher:
    """logits: split -> (N, K); metrics: 'report/...' of the cached teacher."""

    key: str
    logits: dict[str, torch.Tensor]
    metrics: dict[str, float]
    path: Path
    checksum: str = ""  # of the logits: what caches derived from this teacher record

    def rejection(self, cell: CellConfig, num_classes: int) -> str | None:
        """Why ``cell`` must not distil from this teacher (its quality gate), or None."""
        acc, gate = self.metrics["report/val_acc"], cell.teacher.gate(num_classes)
        if acc >= gate:
            return None
        return (f"teacher {self.key} ({cell.teacher.model.name}) has validation accuracy {acc:.4f}, below "
                f"teacher.min_accuracy {gate:.4f}; train it longer or set base.teacher.min_accuracy")

    def signal(self, cell: CellConfig, data: DataBundle, runtime: Runtime = CPU) -> TeacherSignal:
        """This teacher as ``cell``'s training reads it: the cached logits, and what the cell's
        knowledge needs beyond them. Cached logits are of unaugmented images: on augmented data
        a cell that reads the teacher's logits looks them up on ``teacher.views`` cached augmented
        views or, with views 0, runs the teacher online on every batch (exact)."""
        needs = cell.knowledge.needs()
        augmented_kd = data.augment != "none" and Need.TEACHER in needs
        views = get_teacher_views(cell, data, self, runtime) if augmented_kd and cell.teacher.views else None
        online = augmented_kd and views is None
        model = teacher_model(cell, data, self, runtime) if online or Need.TEACHER_MODEL in needs else None
        return TeacherSignal(self.logits, model, None if views is None else (views["views"], views["logits"]), online)


def logits_checksum(logits: dict[str, torch.Tensor] | torch.Tensor) -> str:
    """sha256 over every split's logits, in split order (or over one tensor)."""
    if isinstance(logits, torch.Tensor):
        logits = {"": logits}
    h = hashlib.sha256()
    for split in sorted(logits):
        h.update(split.encode())
        h.update(logits[split].contiguous().numpy().tobytes())
    return h.hexdigest()


def train_teacher(cell: CellConfig, data: DataBundle, runtime: Runtime = CPU) -> dict:
    """Fit the teacher of ``cell`` with plain CE; return the cache record (logits in inference mode)."""
    assert cell.teacher is not None
    seed = cell.teacher_seed()
    result = fit(cell.teacher.model, data, cell.teacher.optim, KnowledgeConfig(), seed, report=cell.report,
                 runtime=runtime)
    logits = {s: predict(result.model, data.split(s)[0], prepare=data.prepare, runtime=runtime) for s in SPLITS}
    return {
        "state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
        "logits": logits,
        "metrics": result.metrics,
        "config": {"data": cell.data.model_dump(), "teacher": cell.teacher.model_dump(), "seed": seed},
        "identity": {"key": cell.teacher_key(), "data": data.fingerprint, "logits_sha256": logits_checksum(logits)},
    }


def verified(path: Path, identity: dict[str, str]) -> tuple[dict | None, str]:
    """The cache record at ``path`` if it is whole and was made from ``identity`` (and its logits
    still match their checksum); else (None, why). A missing file is (None, '')."""
    if not path.exists():
        return None, ""
    try:
        record = torch.load(path, weights_only=True)
        saved = record["identity"]
        sha = logits_checksum(record["logits"])
    except Exception as e:  # noqa: BLE001 - truncated, zeroed or foreign: any failure means do not use it
        return None, f"unreadable ({type(e).__name__})"
    for field, want in identity.items():
        if saved.get(field) != want:
            return None, f"made from another {field} ({saved.get(field)!s:.16} != {want:.16})"
    if saved.get("logits_sha256") != sha:
        return None, "its logits do not match their checksum"
    return record, ""


def get_teacher(cell: CellConfig, data: DataBundle, cache_dir: Path, runtime: Runtime = CPU) -> Teacher:
    """The cached teacher of ``cell``, training and caching it first if needed (or if the cached
    file is not the one this cell's teacher config and data would make)."""
    key = cell.teacher_key()
    path = Path(cache_dir) / "teachers" / f"{key}.pt"
    with file_lock(path.with_suffix(".lock")):
        record, why = verified(path, {"key": key, "data": data.fingerprint})
        if record is None:
            if why:
                print(f"teacher cache {path} is not usable: {why}; retraining it", flush=True)
            print(f"training teacher {key} ({cell.teacher.model.name})", flush=True)
            record = train_teacher(cell, data, runtime)
            atomic_save(record, path)
    return Teacher(key, record["logits"], record["metrics"], path, record["identity"]["logits_sha256"])


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
    """{'views': (V, N, 3) augmentation params, 'logits': (V, N, K)}, computed once and cached
    (and recomputed when the cached file was made from another teacher or data)."""
    n_views = cell.teacher.views
    path = teacher.path.with_name(f"{teacher.key}-views{n_views}.pt")
    identity = {"teacher": teacher.checksum, "data": data.fingerprint}
    with file_lock(path.with_suffix(".lock")):
        record, why = verified(path, identity)
        if record is None:
            if why:
                print(f"teacher view cache {path} is not usable: {why}; recomputing it", flush=True)
            g = torch.Generator().manual_seed(int(teacher.key[:8], 16))  # fixed per teacher and data
            views = torch.stack([crop_flip_params(len(data.y_train), g) for _ in range(n_views)])
            logits = view_logits(teacher_model(cell, data, teacher, runtime), data, views, runtime)
            record = {"views": views, "logits": logits,
                      "identity": {**identity, "logits_sha256": logits_checksum(logits)}}
            atomic_save(record, path)
    return record


def teacher_model(cell: CellConfig, data: DataBundle, teacher: Teacher, runtime: Runtime = CPU) -> nn.Module:
    """The cached teacher as a frozen module in eval mode (for teacher explanations)."""
    spec = cell.teacher.model
    model = build_model(spec.name, spec.params, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(teacher.path, weights_only=True)["state_dict"])
    return place_model(model, data.input_shape, runtime.device).eval().requires_grad_(False)
