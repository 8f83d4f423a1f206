"""The one trainer every cell runs through: SGD on in-memory tensors.

Batches are slices of a seeded permutation, so a step costs no Python beyond the
model itself, and a teacher is a lookup into precomputed logits (measured ×1.02
of a CE step, against ×1.3–3.2 for an online teacher). Determinism: the model
init, the data order and the components' randomness each come from their own
seeded stream, so arms that share a seed also share init and data order, which
makes per-seed differences between arms paired comparisons.

A cell whose knowledge reads a ``peer`` trains a cohort of two students on the
same batches (Deep Mutual Learning, Zhang et al., CVPR 2018); each distils the
other's detached output of the same step (a simultaneous update). Member 0 is
the reported student; member 1 is logged under ``member1/``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from kdablate.components import Need, TargetContext
from kdablate.components.structure import class_mean_structure, nongt_distribution, oracle_structure
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.metrics import evaluate, offdiagonal, reliability, spearman
from kdablate.models import build_model
from kdablate.objectives import Method, build_method
from kdablate.storage import Checkpoint

EpochCallback = Callable[[int, dict[str, float]], None]
SPLITS = ("train", "val", "test")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how the math runs: device ('cpu', 'cuda', 'cuda:1'...) and autocast ('none', 'bf16', 'fp16').

    Data stays in (pinned) host memory; each batch is copied with ``non_blocking``.
    """

    device: str = "cpu"
    amp: str = "none"

    def autocast(self) -> ContextManager:
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    def to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or (self.device == "cpu" and not t.is_cuda):
            return t  # already there: skip the per-batch device parse of Tensor.to
        return t.to(self.device, non_blocking=True)


CPU = Runtime()


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the cell is marked FAILED."""


class NoTrainingSteps(RuntimeError):
    """The cell would run no optimiser step; it is marked FAILED, never reported at chance."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The reported model, its metrics ('report/<split>_<metric>', 'report/epoch'),
    tensors worth keeping as artifacts (e.g. class-similarity matrices) and, per
    split, the reported model's reliability bins (``kdablate.metrics.reliability``)."""

    model: nn.Module
    metrics: dict[str, float]
    artifacts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    calibration: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Member:
    """One student of the cohort, with its optimiser and its own (stateful) method."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    method: Method
    features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None
    static_target: tuple[tuple, torch.Tensor | None] | None = None  # (key, q) kept across epochs


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """An RNG for one purpose (``stream``) of one seed, independent of the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def make_optimizer(model: nn.Module, cfg: OptimConfig, steps: int,
                   steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # foreach: one multi-tensor kernel per update op instead of one op per parameter (the
    # single-tensor default on CPU). The same arithmetic in the same order: bit-identical.
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay, foreach=True,
    )
    if cfg.schedule == "cosine":
        lam = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    elif cfg.schedule == "multistep":
        lam = lambda s: cfg.gamma ** sum(s >= m * steps_per_epoch for m in cfg.milestones)  # noqa: E731
    else:
        lam = lambda s: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, chunk: int = 1024,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, runtime: Runtime = CPU) -> torch.Tensor:
    """(N, *shape) raw inputs -> (N, K) float32 logits on the CPU, in eval mode, ``prepare`` per chunk."""
    was_training = model.training
    model.eval()
    prepare = prepare or (lambda t: t)
    outs = []
    for i in range(0, len(x), chunk):
        with runtime.autocast():
            outs.append(model(runtime.to(prepare(x[i : i + chunk]))).float().cpu())
    model.train(was_training)
    return torch.cat(outs)


def split_logits(model: nn.Module, data: DataBundle, split: str, runtime: Runtime = CPU) -> torch.Tensor:
    """(N, K) logits of ``model`` on a split; NonFiniteLoss if any is NaN or inf."""
    logits = predict(model, data.split(split)[0], prepare=data.prepare, runtime=runtime)
    if not torch.isfinite(logits).all():
        raise NonFiniteLoss(f"non-finite outputs on the {split} split")
    return logits


def evaluate_model(
    model: nn.Module, data: DataBundle, teacher: dict[str, torch.Tensor] | None, splits: tuple[str, ...] = ("val", "test"),
    runtime: Runtime = CPU,
) -> dict[str, float]:
    """'<split>/<metric>' of ``model`` on each split (agreement when a teacher is given)."""
    out: dict[str, float] = {}
    for split in splits:
        logits = split_logits(model, data, split, runtime)
        out.update(evaluate(logits, data.split(split)[1], split, None if teacher is None else teacher[split]))
    return out


def make_member(spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
                seed: int, steps_per_epoch: int, runtime: Runtime = CPU) -> Member:
    torch.manual_seed(seed)  # the init is drawn on the CPU, so it is the same on every device
    model = build_model(spec.name, spec.params, data.input_shape, data.num_classes).to(runtime.device)
    if len(data.input_shape) == 3:  # images: match the channels_last batches of DataBundle.prepare
        model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(model, optim, max(optim.epochs * steps_per_epoch, 1), steps_per_epoch)
    member = Member(model, opt, sched, build_method(knowledge, steps_per_epoch))
    if runtime.amp == "fp16":  # fp16 needs loss scaling; bf16 has fp32's range and does not
        member.scaler = torch.amp.GradScaler(torch.device(runtime.device).type)
    if Need.FEATURES in member.method.needs:
        # The training forward's last feature map, so CAM needs no second forward.
        model.features.register_forward_hook(lambda m, i, out: member.features.append(out))
    return member


def train_step(members: list[Member], x: torch.Tensor, y: torch.Tensor, step: int, num_classes: int,
               teacher_logits: torch.Tensor | None, teacher_model: nn.Module | None,
               generator: torch.Generator, class_groups: torch.Tensor | None = None,
               runtime: Runtime = CPU, targets: list[torch.Tensor | None] | None = None,
               preds: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
    """One optimisation step of every cohort member on the batch (x, y), all on ``runtime.device``.

    targets: per member, the batch's precomputed soft target (``static_targets``) or None.
    preds: per member, a (B,) int64 buffer that receives the predicted classes; without
    it each member's parts include its batch accuracy 'acc'.
    """
    outputs = []
    for m in members:
        m.features.clear()
        with runtime.autocast():
            outputs.append(m.model(x).float())
    results = []
    for i, (m, logits) in enumerate(zip(members, outputs)):
        others = [o.detach() for j, o in enumerate(outputs) if j != i]
        ctx = TargetContext(
            y, num_classes, m.method.temperature, logits.detach(), teacher_logits, generator,
            peer_logits=torch.stack(others).mean(0) if others else None, inputs=x,
            models={"self": m.model, **({"teacher": teacher_model} if teacher_model is not None else {})},
            features=m.features[-1] if m.features else None, step=step, class_groups=class_groups,
            target=targets[i] if targets else None,
        )
        parts = m.method(logits, ctx)
        m.opt.zero_grad(set_to_none=True)
        (m.scaler.scale(parts["loss"]) if m.scaler else parts["loss"]).backward()
        if preds is None:
            parts["acc"] = (logits.detach().argmax(1) == y).float().mean()
        else:  # one op; the accuracy is counted once per epoch
            torch.argmax(logits.detach(), 1, out=preds[i])
        results.append(parts)
    for m in members:  # after every member's backward: peers saw the same weights
        if m.scaler:
            m.scaler.step(m.opt)
            m.scaler.update()
        else:
            m.opt.step()
        m.sched.step()
    return results


def epoch_batches(t: torch.Tensor | None, order: torch.Tensor, batch_size: int,
                  runtime: Runtime = CPU) -> Sequence[torch.Tensor | None]:
    """The rows ``order`` of ``t`` in batches on ``runtime.device``: one gather (and one copy) for
    the epoch, then views. None: Nones."""
    if t is None:
        return (None,) * -(-len(order) // batch_size)
    return runtime.to(t.index_select(0, order.to(t.device))).split(batch_size)


def static_targets(member: Member, data: DataBundle, teacher: dict[str, torch.Tensor] | None,
                   groups: torch.Tensor | None, runtime: Runtime = CPU) -> torch.Tensor | None:
    """(N, K) the member's soft target for every train sample when it is static (a function of
    the label and the cached teacher logits only, e.g. KD, label smoothing), else None.
    Built once per cell (kept while the data and teacher logits are the same tensors), it turns
    the per-step mass and structure ops into one lookup."""
    if teacher is None and Need.TEACHER in member.method.needs:  # online teacher or teacher views
        return None
    key = (id(data.y_train), None if teacher is None else id(teacher["train"]), id(groups))
    if member.static_target is None or member.static_target[0] != key:
        y = runtime.to(data.y_train)
        t = None if teacher is None else runtime.to(teacher["train"])
        ctx = TargetContext(y, data.num_classes, member.method.temperature,
                            torch.empty(0, data.num_classes, device=y.device), t, class_groups=groups)
        member.static_target = (key, member.method.static_target(ctx))
    return member.static_target[1]


def train_epoch(members: list[Member], data: DataBundle, batch_size: int, gens: tuple[torch.Generator, ...],
                step: int, teacher: dict[str, torch.Tensor] | None, teacher_model: nn.Module | None,
                online_teacher: bool = False, runtime: Runtime = CPU,
                view: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[dict[str, float]], int]:
    """One pass over the train split; per member, the mean of each loss part ('train/<part>').

    online_teacher: the teacher's logits come from ``teacher_model`` on each (augmented)
    batch instead of the cache, which only holds logits of unaugmented images.
    view: ((N, 3) augmentations, (N, K) teacher logits on them): this epoch's cached view.
    """
    for m in members:
        m.model.train()
    order_gen, component_gen, augment_gen = gens
    perm = torch.randperm(len(data.y_train), generator=order_gen)
    # Drop the ragged last batch: BatchNorm cannot train on a batch of 1.
    n = len(perm) - len(perm) % batch_size
    # Per member and part, the step's detached scalar; reduced once at the end of the epoch, so
    # a step adds no tensor ops and no host sync for its metrics.
    logged: list[dict[str, list[torch.Tensor]]] = [{} for _ in members]
    groups = runtime.to(data.class_groups)  # once per epoch, not per batch
    cached = None if view is not None or online_teacher else teacher
    targets = [static_targets(m, data, cached, groups, runtime) for m in members]
    # The epoch's samples gathered once, in order, then sliced into batches (views): a step
    # indexes nothing. Labels, teacher logits and targets go to the device once per epoch.
    order = perm[:n]
    y_epoch = runtime.to(data.y_train.index_select(0, order))  # host to device once per epoch
    xs = epoch_batches(data.x_train, order, batch_size)
    vs = epoch_batches(None if view is None else view[0], order, batch_size)
    logits = view[1] if view is not None else None if online_teacher or teacher is None else teacher["train"]
    ts = epoch_batches(logits, order, batch_size, runtime)
    qs = [epoch_batches(q, order, batch_size, runtime) for q in targets]
    preds = [torch.empty(n, dtype=torch.long, device=runtime.device) for _ in members]
    pred_batches = [p.split(batch_size) for p in preds]
    t0 = time.perf_counter()
    for b, (xb, yb, vb, t_logits) in enumerate(zip(xs, y_epoch.split(batch_size), vs, ts)):
        x = runtime.to(data.prepare(xb, train=True, generator=augment_gen, views=vb))
        if online_teacher and view is None:
            with torch.inference_mode(), runtime.autocast():
                t_logits = teacher_model(x).float().clone()  # clone: a normal tensor outside inference mode
        parts = train_step(members, x, yb, step, data.num_classes, t_logits, teacher_model, component_gen,
                           groups, runtime, [q[b] for q in qs], [p[b] for p in pred_batches])
        step += 1
        for log, p in zip(logged, parts):
            for k, v in p.items():
                log.setdefault(k, []).append(v.detach() if v.requires_grad else v)
    steps = max(n // batch_size, 1)
    sums = [{k: torch.stack(v).float().sum() for k, v in log.items()} for log in logged]
    if n:  # train accuracy: the epoch's predictions against its labels, in one comparison
        for s, p in zip(sums, preds):
            s["acc"] = (p == y_epoch).float().sum() / batch_size
    # Checked once per epoch, not per step: a per-step check is a host sync on a GPU, and a
    # NaN anywhere in the epoch survives in the sum.
    if not all(torch.isfinite(s["loss"]) for s in sums if "loss" in s):
        raise NonFiniteLoss(f"non-finite training loss in the epoch ending at step {step}")
    out = [{f"train/{k}": (v / steps).item() for k, v in s.items()} for s in sums]
    out[0]["time/step_ms"] = 1000 * (time.perf_counter() - t0) / steps
    return out, step


def reference_similarities(data: DataBundle, teacher: dict[str, torch.Tensor] | None,
                           temperature: float) -> dict[str, torch.Tensor]:
    """(K, K) class-similarity matrices to hold explanations against, fixed for a cell: the
    teacher's mean soft-target structure at T, and the oracle where the data has a hierarchy."""
    refs = {}
    if teacher is not None:
        p = torch.softmax(teacher["train"] / temperature, 1)
        refs["teacher"] = class_mean_structure(nongt_distribution(p, data.y_train), data.y_train, data.num_classes)
    if data.class_groups is not None:
        refs["oracle"] = oracle_structure(torch.arange(data.num_classes), data.class_groups, 1.0)
    return refs


# Where each reference's correlation with the explanation similarity is logged.
SPEARMAN_METRICS = {"teacher": "train/similarity_spearman", "oracle": "train/similarity_oracle_spearman"}


def epoch_summary(method: Method, references: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics and matrices from the method's per-epoch summary (explanation similarity),
    with its Spearman correlation against each of ``reference_similarities``."""
    summary = method.summary()
    metrics: dict[str, float] = {}
    artifacts: dict[str, torch.Tensor] = {}
    if "explain_ms" in summary:
        metrics["time/explain_ms"] = float(summary["explain_ms"])
    if "similarity" in summary:
        artifacts["similarity_explanation"] = summary["similarity"]
        for name, matrix in references.items():
            artifacts[f"similarity_{name}"] = matrix
            metrics[SPEARMAN_METRICS[name]] = spearman(offdiagonal(summary["similarity"]), offdiagonal(matrix))
    return metrics, artifacts


def cohort_size(knowledge: KnowledgeConfig) -> int:
    return 2 if Need.PEER in knowledge.needs() else 1


def member_state(m: Member) -> dict:
    """One member's weights, optimiser, schedule, loss-scaler and method state (tensors and numbers)."""
    out = {"model": m.model.state_dict(), "opt": m.opt.state_dict(), "sched": m.sched.state_dict(),
           "method": m.method.state_dict()}
    if m.scaler is not None:  # fp16: the loss scale and its growth counter change every step
        out["scaler"] = m.scaler.state_dict()
    return out


def snapshot(members: list[Member], gens: tuple[torch.Generator, ...], epoch: int, step: int,
             best: dict) -> dict:
    """Everything needed to continue training after ``epoch`` bit for bit. Only tensors, numbers,
    strings and containers (no Python objects), so it loads with ``torch.load(weights_only=True)``:
    the methods are rebuilt from the config and given back their ``state_dict``."""
    return {
        "epoch": epoch, "step": step, "best": best, "gens": [g.get_state() for g in gens],
        "members": [member_state(m) for m in members],
    }


def restore(state: dict, members: list[Member], gens: tuple[torch.Generator, ...]) -> tuple[int, int, dict]:
    """Load ``snapshot``'s output (read onto the CPU) into freshly built members and generators;
    returns (epoch, step, best)."""
    for m, saved in zip(members, state["members"]):
        m.model.load_state_dict(saved["model"])
        m.opt.load_state_dict(saved["opt"])  # moves its state to each parameter's device
        m.sched.load_state_dict(saved["sched"])
        # The method's tensors live where its labels do: the model's device.
        device = next(m.model.parameters(), torch.empty(0)).device
        m.method.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                  for k, v in saved["method"].items()})
        if m.scaler is not None and "scaler" in saved:
            m.scaler.load_state_dict(saved["scaler"])
    for g, saved in zip(gens, state["gens"]):
        g.set_state(saved)
    return state["epoch"], state["step"], state["best"]


def fit(
    model_spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig, seed: int,
    teacher: dict[str, torch.Tensor] | None = None, report: str = "best_val",
    on_epoch: EpochCallback | None = None, teacher_model: nn.Module | None = None,
    checkpoint: Checkpoint | None = None, online_teacher: bool = False, runtime: Runtime = CPU,
    teacher_views: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train a fresh ``model_spec`` (or a cohort) on ``data``; report the last or best-on-val epoch.

    teacher: split -> (N, K) precomputed teacher logits, or None.
    checkpoint: save the state every few epochs and, if one exists, resume from it.
    Selection only ever looks at val accuracy; test is logged, never chosen on.
    """
    steps_per_epoch = len(data.y_train) // optim.batch_size
    if steps_per_epoch < 1:  # refused when the study loads; a FitResult at chance must never come out
        raise NoTrainingSteps(f"batch_size {optim.batch_size} > {len(data.y_train)} training samples: no step would run")
    # Member 0 uses the cell's seed, so its init matches the single-student arms.
    members = [make_member(model_spec, data, optim, knowledge, seed + 7919 * i, steps_per_epoch, runtime)
               for i in range(cohort_size(knowledge))]
    gens = (seeded_generator(seed, 0), seeded_generator(seed, 1), seeded_generator(seed, 2))
    epoch, step, best = 0, 0, {"state": None, "epoch": 0, "val": -1.0, "artifacts": {}}
    references = reference_similarities(data, teacher, knowledge.temperature)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        epoch, step, best = restore(saved, members, gens)
    for epoch in range(epoch + 1, optim.epochs + 1):
        view = None
        if teacher_views is not None:  # epoch e sees view (e - 1) mod V of every image
            v = (epoch - 1) % teacher_views["views"].shape[0]
            view = (teacher_views["views"][v], teacher_views["logits"][v])
        parts, step = train_epoch(members, data, optim.batch_size, gens, step, teacher, teacher_model,
                                  online_teacher, runtime, view)
        metrics = {**parts[0], **evaluate_model(members[0].model, data, teacher, runtime=runtime)}
        for i, m in enumerate(members[1:], 1):
            extra = {**parts[i], **evaluate_model(m.model, data, teacher, runtime=runtime)}
            metrics.update({f"member{i}/" + k.replace("/", "_"): v for k, v in extra.items()})
        summary, best["artifacts"] = epoch_summary(members[0].method, references)
        metrics.update(summary)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if report == "best_val" and metrics["val/acc"] > best["val"]:
            best.update(state=copy.deepcopy(members[0].model.state_dict()), epoch=epoch, val=metrics["val/acc"])
        if checkpoint is not None and checkpoint.due(epoch, optim.epochs):
            checkpoint.save(snapshot(members, gens, epoch, step, best))
    return report_result(members[0].model, data, teacher, report, best, optim.epochs, runtime)


def report_result(model: nn.Module, data: DataBundle, teacher: dict[str, torch.Tensor] | None, report: str,
                  best: dict, epochs: int, runtime: Runtime = CPU) -> FitResult:
    """Load the reported weights and evaluate them: 'report/<split>_<metric>', 'report/epoch',
    and the reliability bins of val and test."""
    if report == "best_val" and best["state"] is not None:
        model.load_state_dict(best["state"])
        epoch = best["epoch"]
    else:
        epoch = epochs
    reported, calibration = {"report/epoch": float(epoch)}, {}
    for split in ("val", "test"):
        logits, y = split_logits(model, data, split, runtime), data.split(split)[1]
        metrics = evaluate(logits, y, split, None if teacher is None else teacher[split])
        reported.update({"report/" + k.replace("/", "_"): v for k, v in metrics.items()})
        calibration[split] = reliability(logits, y)
    return FitResult(model, reported, best["artifacts"], calibration)
