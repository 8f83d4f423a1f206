"""The cell's teacher: trained once per (data, teacher config, seed), or loaded from a checkpoint
file or from the student an earlier run saved, or an ensemble of such members; cached with its
logits and handed to a cell's training as one ``kdablate.trainer.TeacherSignal`` (``Teacher.signal``).

A cache record holds the teacher's weights (the reported, best-on-val ones of a trained teacher),
its model spec, its metrics and its logits on every split of the unaugmented data, so
distillation is a lookup. Writes are atomic (temp file + rename) and a per-key file lock keeps
two processes from making the same teacher twice.

A record also says what it was made from (the teacher key, the data's fingerprint) and carries
a sha256 over everything read back from it: weights, logits, views, metrics and spec. A file
that does not match, because it was copied from another study, edited, flipped a bit, or made
from other data, is never used: the teacher is made again, with a one-line message.

An ensemble's distribution is the mean of its members' probabilities at the cell's temperature
T; it reaches the trainer as the logits z = T log mean_m softmax(t_m / T), whose softmax at T is
exactly that mean (``ensemble_logits``). Each member is made, cached and gated on its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdablate.components import Need
from kdablate.config import CellConfig, KnowledgeConfig, TeacherConfig
from kdablate.data import DataBundle, crop_flip_params, load_dataset
from kdablate.metrics import evaluate
from kdablate.models import build_model
from kdablate.models.ensemble import Ensemble, ensemble_logits
from kdablate.models.checkpoint import checkpoint_digest, fit_state_dict, read_checkpoint
from kdablate.models.factory import place_model
from kdablate.registry import ConfigError
from kdablate.saved import read_saved, saved_mismatch
from kdablate.storage import atomic_save, file_lock, load_tensors
from kdablate.trainer import CPU, SPLITS, Runtime, TeacherSignal, fit, predict


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher as a cell reads it.

    logits: split -> (N, K) on the cell's data; metrics: 'report/...' of the teacher; path: its
    record (None for an ensemble); checksum: of everything its record holds (what derived caches
    record); source: trained | checkpoint | run | ensemble; sha256: the checkpoint file's or the run's
    saved weights'; spec: {'name', 'params'} of its model; members: an ensemble's teachers.
    """

    key: str
    logits: dict[str, torch.Tensor]
    metrics: dict[str, float]
    path: Path | None
    checksum: str
    config: TeacherConfig | None = None
    source: str = "trained"
    sha256: str = ""
    spec: dict | None = None
    members: tuple["Teacher", ...] = ()
    temperature: float = 1.0

    def rejection(self, cell: CellConfig, num_classes: int) -> str | None:
        """Why ``cell`` must not distil from this teacher (its, or a member's, quality gate), or None."""
        if self.members:
            return next((why for m in self.members if (why := m.rejection(cell, num_classes))), None)
        acc, gate = self.metrics["report/val_acc"], self.config.gate(num_classes)
        if acc >= gate:
            return None
        fix = "train it longer" if self.source == "trained" else f"check the {self.source}'s teacher"
        return (f"teacher {self.key} ({self.spec['name']}) has validation accuracy {acc:.4f}, below "
                f"teacher.min_accuracy {gate:.4f}; {fix} or set base.teacher.min_accuracy")

    def tags(self) -> dict[str, str]:
        """What a cell's run records of its teacher."""
        tags = {"kdablate.teacher_key": self.key, "kdablate.teacher_source": self.source}
        if self.sha256:
            tags["kdablate.teacher_sha256"] = self.sha256
        if self.members:
            tags["kdablate.teacher_members"] = ",".join(f"{m.source}:{m.key}" for m in self.members)
        return tags

    def signal(self, cell: CellConfig, data: DataBundle, runtime: Runtime = CPU) -> TeacherSignal:
        """This teacher as ``cell``'s training reads it: the cached logits, and what the cell's
        knowledge needs beyond them. Cached logits are of unaugmented images: on augmented data
        a cell that reads the teacher's logits looks them up on ``teacher.views`` cached augmented
        views or, with views 0, runs the teacher online on every batch (exact)."""
        needs = cell.knowledge.needs()
        augmented_kd = data.augment != "none" and Need.TEACHER in needs
        views_n = 0 if self.members else self.config.views
        views = get_teacher_views(views_n, data, self, runtime) if augmented_kd and views_n else None
        online = augmented_kd and views is None
        model = self.model(data, runtime) if online or Need.TEACHER_MODEL in needs else None
        # The views' logits go to the device once, as the images did: an epoch's lookup is a gather there.
        looked_up = None if views is None else (views["views"], runtime.to(views["logits"]))
        return TeacherSignal(self.logits, model, looked_up, online)

    def model(self, data: DataBundle, runtime: Runtime = CPU) -> nn.Module:
        """The teacher as a frozen module in eval mode (an ensemble's: ``Ensemble``)."""
        if self.members:
            return Ensemble([m.model(data, runtime) for m in self.members], self.temperature).eval()
        model = build_model(self.spec["name"], self.spec["params"], data.input_shape, data.num_classes)
        model.load_state_dict(verified_record(self.path, self.checksum)["state_dict"])
        return place_model(model, data.input_shape, runtime.device).eval().requires_grad_(False)


def record_checksum(record: dict) -> str:
    """sha256 over everything a cache record holds except its identity: every tensor (by name,
    dtype, shape and bytes) and every other value (as JSON), in key order."""
    h = hashlib.sha256()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}/{k}", value[k])
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{prefix}={json.dumps(value, sort_keys=True, default=str)}".encode())

    walk("", {k: v for k, v in record.items() if k != "identity"})
    return h.hexdigest()


def verified(path: Path, identity: dict[str, str]) -> tuple[dict | None, str]:
    """The cache record at ``path`` if it is whole, was made from ``identity`` and everything in it
    still matches its checksum; else (None, why). A missing file is (None, '')."""
    if not path.exists():
        return None, ""
    try:
        record = load_tensors(path)
        saved = record["identity"]
        sha = record_checksum(record)
    except Exception as e:  # noqa: BLE001 - truncated, zeroed or foreign: any failure means do not use it
        return None, f"unreadable ({type(e).__name__})"
    for field, want in identity.items():
        if saved.get(field) != want:
            return None, f"made from another {field} ({saved.get(field)!s:.16} != {want:.16})"
    if saved.get("sha256") != sha:
        return None, "its contents do not match their checksum"
    return record, ""


def verified_record(path: Path, checksum: str) -> dict:
    """The record at ``path``, read again (a frozen teacher module): still the one of ``checksum``."""
    record, why = verified(path, {"sha256": checksum})
    if record is None:
        raise RuntimeError(f"teacher cache {path} changed while in use ({why or 'deleted'}); rerun the study")
    return record


def sealed(record: dict, identity: dict[str, str]) -> dict:
    """``record`` with its identity and the checksum of its contents."""
    return {**record, "identity": {**identity, "sha256": record_checksum(record)}}


def cached(path: Path, identity: dict[str, str], make: Any, what: str) -> dict:
    """The verified record at ``path``, made by ``make()`` and saved when absent or unusable."""
    with file_lock(path.with_suffix(".lock")):
        record, why = verified(path, identity)
        if record is None:
            if why:
                print(f"{what} cache {path} is not usable: {why}; making it again", flush=True)
            record = sealed(make(), identity)
            atomic_save(record, path)
    return record


def data_logits(model: nn.Module, data: DataBundle, runtime: Runtime) -> dict[str, torch.Tensor]:
    """split -> (N, K) logits of ``model`` on the unaugmented data, in inference mode."""
    with torch.inference_mode():
        return {s: predict(model, data.split(s)[0], prepare=data.prepare, runtime=runtime) for s in SPLITS}


def logits_metrics(logits: dict[str, torch.Tensor], data: DataBundle) -> dict[str, float]:
    """'report/<split>_<metric>' of given logits on val and test: a teacher that did not train here."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        metrics = evaluate(logits[split], data.split(split)[1], split)
        out.update({"report/" + k.replace("/", "_"): v for k, v in metrics.items()})
    return out


def epoch_progress(label: str, epochs: int) -> tuple[Any, Any]:
    """(on_epoch, close): a bar on a terminal, otherwise one line per epoch with its val accuracy,
    so a teacher that trains for minutes shows its progress as a cell does."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=f"  {label}", unit="ep", leave=False)

        def tick(epoch: int, metrics: dict[str, float]) -> None:
            bar.set_postfix(val_acc=f"{metrics['val/acc']:.4f}", refresh=False)
            bar.update(1)

        return tick, bar.close

    def line(epoch: int, metrics: dict[str, float]) -> None:
        print(f"  {label} epoch {epoch}/{epochs}: val/acc {metrics['val/acc']:.4f}", flush=True)

    return line, lambda: None


def train_teacher(cell: CellConfig, member: TeacherConfig, data: DataBundle, runtime: Runtime = CPU) -> dict:
    """Fit ``member`` on ``data`` with plain CE; return its cache record (logits in inference mode)."""
    seed = cell.teacher_seed(member)
    label = f"teacher {cell.teacher_key(member)} ({member.model.name})"
    print(f"training {label}", flush=True)
    tick, close = epoch_progress(label, member.optim.epochs)
    try:
        result = fit(member.model, data, member.optim, KnowledgeConfig(), seed, report=cell.report,
                     runtime=runtime, on_epoch=tick, splits=("val",))
    finally:
        close()
    return {"state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
            "spec": {"name": member.model.name, "params": dict(member.model.params)},
            "logits": data_logits(result.model, data, runtime), "metrics": result.metrics,
            "config": {"data": (member.data or cell.data).model_dump(), "teacher": member.model_dump(), "seed": seed}}


def loaded_record(model: nn.Module, spec: dict, data: DataBundle, runtime: Runtime, config: dict) -> dict:
    """The cache record of a teacher that did not train here: evaluated on the cell's data."""
    model = place_model(model, data.input_shape, runtime.device).eval()
    logits = data_logits(model, data, runtime)
    return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "spec": spec, "logits": logits,
            "metrics": logits_metrics(logits, data), "config": config}


def from_checkpoint(cell: CellConfig, member: TeacherConfig, data: DataBundle, cache: Path,
                    runtime: Runtime) -> Teacher:
    """A teacher read from ``member.checkpoint``, its keys fitted to the zoo model; nothing trains."""
    digest = checkpoint_digest(member.checkpoint, member.sha256)
    key = cell.teacher_key(member, digest)
    spec = {"name": member.model.name, "params": dict(member.model.params)}

    def make() -> dict:
        state, _ = read_checkpoint(member.checkpoint, digest)
        model = build_model(spec["name"], spec["params"], data.input_shape, data.num_classes)
        model.load_state_dict(fit_state_dict(model, spec["name"], spec["params"], state, member.checkpoint,
                                             data.num_classes))
        print(f"loaded teacher {key} ({spec['name']}) from checkpoint {member.checkpoint} (sha256 {digest})",
              flush=True)
        return loaded_record(model, spec, data, runtime, {"checkpoint": member.checkpoint, "sha256": digest})

    record = cached(cache / f"{key}.pt", {"key": key, "data": data.fingerprint}, make, "teacher")
    return made(key, record, cache / f"{key}.pt", member, "checkpoint", digest)


def from_run(cell: CellConfig, member: TeacherConfig, data: DataBundle, cache: Path, runtime: Runtime) -> Teacher:
    """The student that run ``member.from_run`` saved, as the teacher; nothing trains."""
    saved = read_saved(member.from_run)
    why = saved_mismatch(saved.spec, cell.data, data.input_shape, data.num_classes)
    if why:
        raise ConfigError(f"teacher.from_run {member.from_run}: {why}")
    key = cell.teacher_key(member)
    spec = {"name": saved.spec["name"], "params": saved.spec["params"]}

    def make() -> dict:
        print(f"loaded teacher {key} ({spec['name']}) from run {member.from_run} (sha256 {saved.sha256})", flush=True)
        return loaded_record(saved.build(), spec, data, runtime, {"from_run": member.from_run, "sha256": saved.sha256})

    record = cached(cache / f"{key}.pt", {"key": key, "data": data.fingerprint, "weights": saved.sha256}, make,
                    "teacher")
    return made(key, record, cache / f"{key}.pt", member, "run", saved.sha256)


def made(key: str, record: dict, path: Path, member: TeacherConfig, source: str, sha256: str = "") -> Teacher:
    """The Teacher of a verified cache record."""
    return Teacher(key, record["logits"], record["metrics"], path, record["identity"]["sha256"], member, source,
                   sha256, record["spec"])


def trained(cell: CellConfig, member: TeacherConfig, data: DataBundle, cache: Path, runtime: Runtime) -> Teacher:
    """A teacher trained here, on the cell's data or on its own ``member.data`` (then its logits on
    the cell's data are a second cached record, made from its weights)."""
    key = cell.teacher_key(member)
    own = data if member.data is None else teacher_data(member, data, cache)
    path = cache / f"{key}.pt"
    record = cached(path, {"key": key, "data": own.fingerprint}, lambda: train_teacher(cell, member, own, runtime),
                    "teacher")
    teacher = made(key, record, path, member, "trained")
    if own is data:
        return teacher

    def on_cell_data() -> dict:
        return {"logits": data_logits(teacher.model(data, runtime), data, runtime)}

    derived = cached(path.with_name(f"{key}-on-{data.fingerprint}.pt"),
                     {"teacher": teacher.checksum, "data": data.fingerprint}, on_cell_data, "teacher logits")
    return dataclasses.replace(teacher, logits=derived["logits"])


def teacher_data(member: TeacherConfig, data: DataBundle, cache: Path) -> DataBundle:
    """The teacher's own data; ConfigError unless its validation and test splits are the cell's."""
    own = load_dataset(member.data.name, member.data.params, cache)
    for split in ("val", "test"):
        (xa, ya), (xb, yb) = own.split(split), data.split(split)
        if xa.shape != xb.shape or not (torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())):
            raise ConfigError(f"teacher.data: its {split} split is not the students'; the teacher must never "
                              "see their validation or test images: keep val_fraction and split_seed the same")
    return own


SOURCES = {"trained": trained, "checkpoint": from_checkpoint, "run": from_run}


def get_teacher(cell: CellConfig, data: DataBundle, cache_dir: Path, runtime: Runtime = CPU) -> Teacher:
    """The cell's teacher, made and cached first where needed (or where the cached record is not
    the one this cell's teacher config and data would make); an ensemble's members each so."""
    cache = Path(cache_dir) / "teachers"
    members = [SOURCES[m.source](cell, m, data, cache, runtime) for m in cell.teachers()]
    if len(members) == 1:
        return members[0]
    t = cell.knowledge.temperature
    logits = {s: ensemble_logits([m.logits[s] for m in members], t) for s in SPLITS}
    metrics = logits_metrics(logits, data)
    for i, m in enumerate(members):
        metrics.update({f"report/member{i}_{k.removeprefix('report/')}": v for k, v in m.metrics.items()
                        if k in ("report/val_acc", "report/test_acc")})
    checksum = hashlib.sha256(json.dumps([[m.checksum for m in members], t]).encode()).hexdigest()
    return Teacher(cell.teacher_key(), logits, metrics, None, checksum, source="ensemble", members=tuple(members),
                   temperature=t)


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


def get_teacher_views(n_views: int, data: DataBundle, teacher: Teacher, runtime: Runtime = CPU) -> dict:
    """{'views': (V, N, 3) augmentation params, 'logits': (V, N, K)}, computed once and cached
    (and recomputed when the cached file was made from another teacher or data)."""
    path = teacher.path.with_name(f"{teacher.key}-views{n_views}.pt")

    def make() -> dict:
        g = torch.Generator().manual_seed(int(teacher.key[:8], 16))  # fixed per teacher and data
        views = torch.stack([crop_flip_params(len(data.y_train), g) for _ in range(n_views)])
        return {"views": views, "logits": view_logits(teacher.model(data, runtime), data, views, runtime)}

    return cached(path, {"teacher": teacher.checksum, "data": data.fingerprint}, make, "teacher view")
