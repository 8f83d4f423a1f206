"""The one trainer every cell runs through: SGD on in-memory tensors.

Batches are slices of a seeded permutation, so a step costs no Python beyond the
model itself, and a teacher is a lookup into precomputed logits (measured ×1.02
of a CE step, against ×1.3–3.2 for an online teacher). The teacher reaches the
trainer as one ``TeacherSignal``, resolved once per cell by the runner: cached
logits, per-epoch cached views, or the model run online. Determinism: the model
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
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from kdablate.components import Need, TargetContext
from kdablate.components.context import Observation
from kdablate.components.feature import FEATURE_TERMS, TermBatch
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.measures import Measurements
from kdablate import measures as measuring
from kdablate.metrics import evaluate, reliability
from kdablate.models import build_model, stages
from kdablate.models.factory import place_model
from kdablate.objectives import Objective, build_objective
from kdablate.storage import Checkpoint

EpochCallback = Callable[[int, dict[str, float]], None]
SeedEpochCallback = Callable[[int, int, dict[str, float]], None]  # (seed index, epoch, metrics)
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
    """The reported model, its metrics ('report/<split>_<metric>', 'report/epoch',
    'report/student_similarity_*'), tensors worth keeping as artifacts (class-similarity
    matrices: 'similarity_student' for every arm, the explanation ones for IL) and, per
    split, the reported model's reliability bins (``kdablate.metrics.reliability``)."""

    model: nn.Module
    metrics: dict[str, float]
    artifacts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    calibration: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Member:
    """One student of the cohort, with its optimiser and its own (stateful) objective."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None
    static_target: tuple[tuple, torch.Tensor | None] | None = None  # (key, q) kept across epochs
    feature: FeatureKnowledge | None = None  # the knowledge's feature terms, if it has any


@dataclasses.dataclass
class FeatureKnowledge:
    """A member's feature terms (``kdablate.components.feature``; the modules they train among them),
    the part each logs its value as ('feature_<name>', with its index where a name repeats), and
    where the student's and the teacher's stages end (``kdablate.models.stages``)."""

    terms: nn.ModuleList
    keys: tuple[str, ...]
    ends: tuple[int, ...]
    teacher_ends: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TeacherSignal:
    """The teacher as the trainer reads it; the runner resolves a cell's teacher into one.

    logits: split -> (N, K) logits of the unaugmented data (the teacher cache): evaluation,
        agreement and the reference class similarity, and each training batch's lookup unless
        ``views`` or ``online`` say otherwise.
    model: the frozen teacher module in eval mode, or None; components that explain the
        teacher (``Need.TEACHER_MODEL``) read it, and ``online`` runs it.
    views: ((V, N, 3) fixed augmentations of the train split, (V, N, K) teacher logits on them),
        the ``teacher.views`` cache: epoch e looks up view (e - 1) mod V of every image.
    online: each training batch's logits are ``model`` on that (augmented) batch, exact where
        the cache only holds logits of unaugmented images.
    """

    logits: dict[str, torch.Tensor] | None = None
    model: nn.Module | None = None
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    online: bool = False

    def __post_init__(self) -> None:
        if self.online and (self.model is None or self.views is not None):
            raise ValueError("an online teacher needs its model and no cached views")

    def split_logits(self, split: str) -> torch.Tensor | None:
        """(N, K) cached logits on a split of the unaugmented data, or None without a cache."""
        return None if self.logits is None else self.logits[split]

    @property
    def fixed_train_logits(self) -> torch.Tensor | None:
        """(N, K) train logits that every epoch looks up unchanged (the cache), or None when the
        batches see views or the model online: only then may a target be built once per cell."""
        return None if self.views is not None or self.online else self.split_logits("train")

    def epoch_lookup(self, epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Epoch ``epoch`` (from 1): ((N, 3) fixed augmentations of the train split or None,
        (N, K) train logits its batches look up, or None when there are none or they run online)."""
        if self.views is None:
            return None, self.fixed_train_logits
        v = (epoch - 1) % self.views[0].shape[0]
        return self.views[0][v], self.views[1][v]

    def logits_for(self, x: torch.Tensor, looked_up: torch.Tensor | None, runtime: Runtime) -> torch.Tensor | None:
        """(B, K) a training batch's teacher logits: ``model`` on the prepared batch ``x`` when
        online, else ``looked_up``, the batch's rows of ``epoch_lookup``."""
        if not self.online:
            return looked_up
        with torch.inference_mode(), runtime.autocast():
            return self.model(x).float().clone()  # clone: a normal tensor outside inference mode

    def read(self, x: torch.Tensor, looked_up: torch.Tensor | None, runtime: Runtime,
             ends: tuple[int, ...] | None = None) -> tuple[torch.Tensor | None, stages.Features | None]:
        """A training batch's (B, K) teacher logits (``logits_for``) and, given the teacher's stage
        ``ends`` (feature terms), its stage features on the prepared batch ``x``: online, never
        cached, no gradient. One forward gives both where the teacher runs online."""
        if ends is None:
            return self.logits_for(x, looked_up, runtime), None
        with torch.no_grad(), runtime.autocast():
            features = stages.extract(self.model, x, ends)
        return (features.logits.float() if self.online else looked_up), features


NO_TEACHER = TeacherSignal()


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch on the device.

    x: (B, *shape) prepared inputs; y: (B,) int64 labels; teacher_logits: (B, K) or None.
    targets: per member, the batch's rows of its precomputed soft target (``static_targets``)
        or None; empty: none precomputed.
    preds: per member, a (B,) int64 buffer that receives the predicted classes; without it each
        member's parts include its batch accuracy 'acc'.
    """

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    targets: Sequence[torch.Tensor | None] = ()
    preds: Sequence[torch.Tensor] | None = None
    idx: torch.Tensor | None = None  # (B,) the samples' training-set indices (a memory bank reads them)
    teacher_features: stages.Features | None = None  # the teacher's stages on x, for feature terms


@dataclasses.dataclass(frozen=True)
class EpochEnv:
    """What every step of one seed's epoch shares: where it is in training (``epoch`` from 1,
    ``steps_per_epoch``), the components' RNG, the (K,) class groups on the device or None,
    the teacher, the runtime, and where the components' observations go (the seed's measurements)."""

    num_classes: int
    epoch: int
    steps_per_epoch: int
    generator: torch.Generator
    class_groups: torch.Tensor | None = None
    teacher: TeacherSignal = NO_TEACHER
    runtime: Runtime = CPU
    observe: Callable[[Observation], None] | None = None


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """An RNG for one purpose (``stream``) of one seed, independent of the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def make_optimizer(model: nn.Module | Sequence[torch.Tensor], cfg: OptimConfig, steps: int,
                   steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD over ``model``'s parameters (or a list of leaf tensors) and its per-step LR schedule."""
    # foreach: one multi-tensor kernel per update op instead of one op per parameter (the
    # single-tensor default on CPU). The same arithmetic in the same order: bit-identical.
    opt = torch.optim.SGD(
        model.parameters() if isinstance(model, nn.Module) else list(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
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


def evaluate_model(model: nn.Module, data: DataBundle, measures: Measurements = measuring.NONE,
                   splits: tuple[str, ...] = ("val", "test"), runtime: Runtime = CPU) -> dict[str, float]:
    """'<split>/<metric>' of ``model`` on each split, the measurements' among them."""
    out: dict[str, float] = {}
    for split in splits:
        out.update(split_metrics(split_logits(model, data, split, runtime), data, split, measures))
    return out


def split_metrics(logits: torch.Tensor, data: DataBundle, split: str, measures: Measurements) -> dict[str, float]:
    """'<split>/<metric>' of a model's (N, K) logits on ``split``: its accuracy, NLL and ECE, and
    what the seed's measurements read off them (agreement with the teacher)."""
    return {**evaluate(logits, data.split(split)[1], split), **measures.evaluated(split, logits)}


def make_member(spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
                seed: int, steps_per_epoch: int, runtime: Runtime = CPU, teacher: nn.Module | None = None) -> Member:
    """A freshly initialised student (init seeded by ``seed``), its optimiser and schedule, its objective,
    and its feature terms (``teacher``: the teacher network they read, built once per cell)."""
    torch.manual_seed(seed)  # the init is drawn on the CPU, so it is the same on every device
    model = place_model(build_model(spec.name, spec.params, data.input_shape, data.num_classes), data.input_shape,
                        runtime.device)
    feature = feature_knowledge(knowledge, model, teacher, data, runtime)
    # The terms' modules (a FitNet regressor, CRD's heads) train with the student.
    trained = model if feature is None else [*model.parameters(), *feature.terms.parameters()]
    opt, sched = make_optimizer(trained, optim, max(optim.epochs * steps_per_epoch, 1), steps_per_epoch)
    member = Member(model, opt, sched, build_objective(knowledge), feature=feature)
    if runtime.amp == "fp16":  # fp16 needs loss scaling; bf16 has fp32's range and does not
        member.scaler = torch.amp.GradScaler(torch.device(runtime.device).type)
    if Need.FEATURES in member.objective.needs:
        # The training forward's last feature map, so CAM needs no second forward.
        model.features.register_forward_hook(lambda m, i, out: member.features.append(out))
    return member


def feature_knowledge(knowledge: KnowledgeConfig, model: nn.Module, teacher: nn.Module | None, data: DataBundle,
                      runtime: Runtime) -> FeatureKnowledge | None:
    """The knowledge's feature terms, bound to the student's and the teacher's feature shapes on two
    training inputs; None when it has none."""
    if not knowledge.feature:
        return None
    if teacher is None:
        raise RuntimeError("feature terms read the teacher network, and none is loaded for this cell")
    x = runtime.to(data.prepare(data.x_train[:2], train=False))
    ends, teacher_ends = stages.stage_ends(model, data.input_shape), stages.stage_ends(teacher, data.input_shape)
    student, reference = stages.probe(model, x, ends), stages.probe(teacher, x, teacher_ends)
    terms = nn.ModuleList()
    for spec in knowledge.feature:
        terms.append(FEATURE_TERMS.build(spec.name, spec.params))
        terms[-1].bind(student, reference, len(data.y_train))
    names = [spec.name for spec in knowledge.feature]
    keys = tuple(f"feature_{n}" if names.count(n) == 1 else f"feature_{n}{i}" for i, n in enumerate(names))
    return FeatureKnowledge(terms.to(runtime.device), keys, ends, teacher_ends)


def add_feature_terms(parts: dict[str, torch.Tensor], feature: FeatureKnowledge, student: stages.Features,
                      teacher: stages.Features, batch: Batch, env: EpochEnv) -> None:
    """Each term's weighted loss into the member's 'loss', its unweighted value as 'feature_<name>'."""
    at = TermBatch(batch.idx, env.generator)
    for key, term in zip(feature.keys, feature.terms):
        value = term.loss(student, teacher, at).float()
        parts["loss"] = parts["loss"] + term.weight * value
        parts[key] = value.detach()


def step_context(members: list[Member], outputs: list[torch.Tensor], i: int, batch: Batch, step: int,
                 env: EpochEnv) -> TargetContext:
    """Member i's view of the step for its objective's components; ``outputs``: every member's (B, K)
    logits. Member 0's observations go to the seed's measurements."""
    m = members[i]
    others = [o.detach() for j, o in enumerate(outputs) if j != i]
    models = {"self": m.model} if env.teacher.model is None else {"self": m.model, "teacher": env.teacher.model}
    return TargetContext(
        batch.y, env.num_classes, outputs[i].detach(), batch.teacher_logits, (env.generator,),
        peer_logits=torch.stack(others).mean(0) if others else None, inputs=batch.x, models=models,
        features=m.features[-1] if m.features else None, step=step, epoch=env.epoch,
        steps_per_epoch=env.steps_per_epoch, class_groups=env.class_groups,
        target=batch.targets[i] if batch.targets else None, observe=env.observe if i == 0 else None,
    )


def optimizer_step(m: Member) -> None:
    """Apply the member's gradients (through its loss scaler under fp16) and advance its schedule."""
    if m.scaler:
        m.scaler.step(m.opt)
        m.scaler.update()
    else:
        m.opt.step()
    m.sched.step()


def train_step(members: list[Member], batch: Batch, step: int, env: EpochEnv) -> list[dict[str, torch.Tensor]]:
    """One optimisation step of every cohort member on ``batch`` (global ``step``, 0-based), all on
    ``env.runtime.device``; per member, its loss parts (scalars; all but 'loss' detached)."""
    outputs, feats = [], []
    for m in members:
        m.features.clear()
        with env.runtime.autocast():
            if m.feature is None:
                outputs.append(m.model(batch.x).float())
            else:  # the same forward, its stage outputs kept for the feature terms
                feats.append(stages.extract(m.model, batch.x, m.feature.ends))
                outputs.append(feats[-1].logits.float())
    results = []
    for i, (m, logits) in enumerate(zip(members, outputs)):
        parts = m.objective(logits, step_context(members, outputs, i, batch, step, env))
        if m.feature is not None:
            add_feature_terms(parts, m.feature, feats[i], batch.teacher_features, batch, env)
        m.opt.zero_grad(set_to_none=True)
        (m.scaler.scale(parts["loss"]) if m.scaler else parts["loss"]).backward()
        if batch.preds is None:
            parts["acc"] = (logits.detach().argmax(1) == batch.y).float().mean()
        else:  # one op; the accuracy is counted once per epoch
            torch.argmax(logits.detach(), 1, out=batch.preds[i])
        results.append(parts)
    for m in members:  # after every member's backward: peers saw the same weights
        optimizer_step(m)
    return results


def epoch_batches(t: torch.Tensor | None, order: torch.Tensor, batch_size: int,
                  runtime: Runtime = CPU) -> Sequence[torch.Tensor | None]:
    """The rows ``order`` of ``t`` in batches on ``runtime.device``: one gather (and one copy) for
    the epoch, then views. None: Nones."""
    if t is None:
        return (None,) * -(-len(order) // batch_size)
    return runtime.to(t.index_select(0, order.to(t.device))).split(batch_size)


def static_targets(member: Member, data: DataBundle, teacher: TeacherSignal, groups: torch.Tensor | None,
                   runtime: Runtime = CPU) -> torch.Tensor | None:
    """(N, K) the member's soft target for every train sample when it is static (a function of
    the label and the cached teacher logits only, e.g. KD, label smoothing), else None.
    Built once per cell (kept while the data and teacher logits are the same tensors), it turns
    the per-step mass and structure ops into one lookup."""
    logits = teacher.fixed_train_logits
    if logits is None and Need.TEACHER in member.objective.needs:  # online teacher or teacher views
        return None
    key = (id(data.y_train), None if logits is None else id(logits), id(groups))
    if member.static_target is None or member.static_target[0] != key:
        y = runtime.to(data.y_train)
        ctx = TargetContext(y, data.num_classes, torch.empty(0, data.num_classes, device=y.device),
                            runtime.to(logits), class_groups=groups)
        member.static_target = (key, member.objective.static_target(ctx))
    return member.static_target[1]


def epoch_steps(members: list[Member], data: DataBundle, order: torch.Tensor, batch_size: int, env: EpochEnv,
                augment: torch.Generator) -> tuple[Iterator[Batch], list[torch.Tensor], torch.Tensor]:
    """The epoch's batches in ``order``, each prepared (augmented from ``augment``) on the device
    when it is taken; per member the (N,) int64 buffer its batches' predictions fill; the (N,) labels.

    The epoch's samples are gathered once, in order, here, then sliced into batches (views): a
    step indexes nothing, and labels, teacher logits and targets go to the device once per epoch.
    """
    runtime, teacher = env.runtime, env.teacher
    views, logits = teacher.epoch_lookup(env.epoch)
    targets = [static_targets(m, data, teacher, env.class_groups, runtime) for m in members]
    labels = runtime.to(data.y_train.index_select(0, order))
    preds = [torch.empty(len(order), dtype=torch.long, device=runtime.device) for _ in members]
    rows = zip(epoch_batches(data.x_train, order, batch_size), labels.split(batch_size),
               epoch_batches(views, order, batch_size), epoch_batches(logits, order, batch_size, runtime))
    qs = [epoch_batches(q, order, batch_size, runtime) for q in targets]
    pred_batches = [p.split(batch_size) for p in preds]

    idx = order.split(batch_size)
    ends = None if members[0].feature is None else members[0].feature.teacher_ends  # feature terms read the teacher

    def batch(b: int, xb: torch.Tensor, yb: torch.Tensor, vb: torch.Tensor | None, tb: torch.Tensor | None) -> Batch:
        x = runtime.to(data.prepare(xb, train=True, generator=augment, views=vb))
        logits, features = teacher.read(x, tb, runtime, ends)
        return Batch(x, yb, logits, [q[b] for q in qs], [p[b] for p in pred_batches], idx[b], features)

    return (batch(b, *row) for b, row in enumerate(rows)), preds, labels


StepFn = Callable[[list[Batch], int, list[EpochEnv]], list[list[dict[str, torch.Tensor]]]]


def train_epochs(step_fn: StepFn, cohorts: list[list[Member]], data: DataBundle, batch_size: int,
                 gens: list[tuple[torch.Generator, ...]], epoch: int, step: int, teachers: list[TeacherSignal],
                 runtime: Runtime = CPU,
                 measures: Sequence[Measurements] = ()) -> tuple[list[list[dict[str, float]]], int]:
    """One pass over the train split for every seed, epoch ``epoch`` (from 1) from global ``step``:
    each seed in its own order (``gens``: its data order, components and augmentation generators),
    ``step_fn(batches, step, envs)`` taking one step of every seed; per seed and member, the mean of
    each loss part ('train/<part>'), and the global step after the epoch. ``measures``: per seed, what
    its components' observations go to (none: nothing listens)."""
    envs, streams, preds, labels = [], [], [], []
    measures = list(measures) or [measuring.NONE] * len(cohorts)
    for cohort, (order_gen, component_gen, augment_gen), teacher, seen in zip(cohorts, gens, teachers, measures,
                                                                              strict=True):
        perm = torch.randperm(len(data.y_train), generator=order_gen)
        order = perm[: len(perm) - len(perm) % batch_size]  # drop the ragged last batch: BatchNorm cannot train on 1
        env = EpochEnv(data.num_classes, epoch, len(data.y_train) // batch_size, component_gen,
                       runtime.to(data.class_groups), teacher, runtime, seen.observe)  # groups moved once per epoch
        batches, p, y = epoch_steps(cohort, data, order, batch_size, env, augment_gen)
        envs.append(env), streams.append(batches), preds.append(p), labels.append(y)
    # Per seed, member and part, the step's detached scalar; reduced once at the end of the epoch,
    # so a step adds no tensor ops and no host sync for its metrics.
    logged: list[list[dict[str, list[torch.Tensor]]]] = [[{} for _ in cohort] for cohort in cohorts]
    t0 = time.perf_counter()
    for batches in zip(*streams):
        for seed_log, seed_parts in zip(logged, step_fn(list(batches), step, envs)):
            for log, parts in zip(seed_log, seed_parts):
                for k, v in parts.items():
                    log.setdefault(k, []).append(v.detach() if v.requires_grad else v)
        step += 1
    seconds = (time.perf_counter() - t0) / len(cohorts)  # each seed's share of the epoch's steps
    return [epoch_means(log, p, y, batch_size, step, seconds) for log, p, y in zip(logged, preds, labels)], step


def train_epoch(members: list[Member], data: DataBundle, batch_size: int, gens: tuple[torch.Generator, ...],
                epoch: int, step: int, teacher: TeacherSignal = NO_TEACHER,
                runtime: Runtime = CPU) -> tuple[list[dict[str, float]], int]:
    """One cohort's (one seed's) epoch, ``Looped.train``: per member its 'train/<part>' means, and the step after."""
    parts, step = Looped([members]).train(data, batch_size, [gens], epoch, step, [teacher], runtime)
    return parts[0], step


def epoch_means(logged: list[dict[str, list[torch.Tensor]]], preds: list[torch.Tensor], y_epoch: torch.Tensor,
                batch_size: int, step: int, seconds: float) -> list[dict[str, float]]:
    """Per member, 'train/<part>': the mean over the epoch's steps of each logged scalar, and
    'train/acc' from the (N,) predictions against the (N,) labels; 'time/step_ms' for member 0.
    NonFiniteLoss if a loss was NaN or inf at any step of the epoch (which ends at ``step``)."""
    steps = max(len(y_epoch) // batch_size, 1)
    sums = [{k: torch.stack(v).float().sum() for k, v in log.items()} for log in logged]
    if len(y_epoch):  # train accuracy: the epoch's predictions against its labels, in one comparison
        for s, p in zip(sums, preds):
            s["acc"] = (p == y_epoch).float().sum() / batch_size
    # Checked once per epoch, not per step: a per-step check is a host sync on a GPU, and a
    # NaN anywhere in the epoch survives in the sum.
    if not all(torch.isfinite(s["loss"]) for s in sums if "loss" in s):
        raise NonFiniteLoss(f"non-finite training loss in the epoch ending at step {step}")
    out = [{f"train/{k}": (v / steps).item() for k, v in s.items()} for s in sums]
    out[0]["time/step_ms"] = 1000 * seconds / steps
    return out


def cohort_size(knowledge: KnowledgeConfig) -> int:
    """Students trained side by side: two when the knowledge reads a peer (DML), else one."""
    return 2 if Need.PEER in knowledge.needs() else 1


def member_state(m: Member) -> dict:
    """One member's weights, optimiser, schedule, loss-scaler and objective state (tensors and numbers).
    The objective's is kept under 'method', the key checkpoints have always used."""
    out = {"model": m.model.state_dict(), "opt": m.opt.state_dict(), "sched": m.sched.state_dict(),
           "method": m.objective.state_dict()}
    if m.scaler is not None:  # fp16: the loss scale and its growth counter change every step
        out["scaler"] = m.scaler.state_dict()
    if m.feature is not None:  # the terms' trained modules and memory banks
        out["feature"] = m.feature.terms.state_dict()
    return out


def snapshot(members: list[Member], gens: tuple[torch.Generator, ...], epoch: int, step: int,
             best: dict) -> dict:
    """Everything needed to continue training after ``epoch`` bit for bit. Only tensors, numbers,
    strings and containers (no Python objects), so it loads with ``torch.load(weights_only=True)``:
    the objectives are rebuilt from the config and given back their ``state_dict``."""
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
        # The objective's tensors live where its labels do: the model's device.
        device = next(m.model.parameters(), torch.empty(0)).device
        m.objective.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in saved["method"].items()})
        if m.scaler is not None and "scaler" in saved:
            m.scaler.load_state_dict(saved["scaler"])
        if m.feature is not None:
            m.feature.terms.load_state_dict(saved["feature"])
    for g, saved in zip(gens, state["gens"]):
        g.set_state(saved)
    return state["epoch"], state["step"], state["best"]


class SeedsMismatch(RuntimeError):
    """The seeds cannot continue as one unit (their checkpoints are at different epochs)."""


class Looped:
    """S seeds as S ordinary cohorts (one module each, or a DML cohort of two): each step of the
    epoch takes every seed's own step in turn, on its own batch; each seed's trajectory is its
    own, as if it trained alone."""

    def __init__(self, cohorts: list[list[Member]], optim: OptimConfig | None = None, steps_per_epoch: int = 0) -> None:
        self.cohorts = cohorts

    @staticmethod
    def refusal(model_spec: ModelSpec, knowledge: KnowledgeConfig, teachers: Sequence[TeacherSignal],
                runtime: Runtime) -> str:
        """'': any seeds train looped."""
        return ""

    def epoch(self, data: DataBundle, batch_size: int, gens: list[tuple], epoch: int, step: int,
              teachers: list[TeacherSignal], measures: list[Measurements], runtime: Runtime,
              splits: tuple[str, ...]) -> tuple[list[dict], int]:
        """Train every seed one epoch and evaluate it on ``splits``: per seed its metrics, and the step after."""
        parts, step = self.train(data, batch_size, gens, epoch, step, teachers, runtime, measures)
        return [epoch_metrics(c, p, data, seen, runtime, splits)
                for c, p, seen in zip(self.cohorts, parts, measures)], step

    def train(self, data: DataBundle, batch_size: int, gens: list[tuple], epoch: int, step: int,
              teachers: list[TeacherSignal], runtime: Runtime,
              measures: Sequence[Measurements] = ()) -> tuple[list[list[dict[str, float]]], int]:
        """``train_epochs`` in each seed's own steps: per seed and member its 'train/<part>' means, the step after."""
        for cohort in self.cohorts:
            for m in cohort:
                m.model.train()

        def steps(batches: list[Batch], step: int, envs: list[EpochEnv]) -> list[list[dict[str, torch.Tensor]]]:
            return [train_step(c, b, step, env) for c, b, env in zip(self.cohorts, batches, envs)]

        return train_epochs(steps, self.cohorts, data, batch_size, gens, epoch, step, teachers, runtime, measures)

    def seed_state(self, s: int) -> dict[str, torch.Tensor]:
        """Seed s's student weights (member 0 of its cohort), copied."""
        return copy.deepcopy(self.cohorts[s][0].model.state_dict())

    def snapshot(self, s: int, gens: tuple, epoch: int, step: int, best: dict) -> dict:
        return snapshot(self.cohorts[s], gens, epoch, step, best)

    def finish(self) -> None:
        """Nothing to hand back: each cohort's modules hold their own weights."""


def make_cohort(spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
                seed: int, steps_per_epoch: int, runtime: Runtime = CPU, teacher: nn.Module | None = None) -> list[Member]:
    """A seed's students: one, or two for a DML cohort (member 0 uses the seed, so its init
    matches the single-student arms')."""
    return [make_member(spec, data, optim, knowledge, seed + 7919 * i, steps_per_epoch, runtime, teacher)
            for i in range(cohort_size(knowledge))]


def resume(cohorts: list[list[Member]], gens: list[tuple], checkpoints: Sequence[Checkpoint | None],
           bests: list[dict]) -> tuple[int, int]:
    """Load each seed's checkpoint into its cohort and generators; (epoch, step) to continue after,
    (0, 0) for none. SeedsMismatch when some seeds have one and others not, or at other epochs."""
    saved = [c.load() if c is not None else None for c in checkpoints]
    if all(s is None for s in saved):
        return 0, 0
    if any(s is None for s in saved) or len({(s["epoch"], s["step"]) for s in saved}) > 1:
        raise SeedsMismatch("the seeds' checkpoints are at different epochs")
    for i, state in enumerate(saved):
        epoch, step, bests[i] = restore(state, cohorts[i], gens[i])
    return epoch, step


def fit_seeds(model_spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
              seeds: Sequence[int], teachers: Sequence[TeacherSignal | None] = (), report: str = "best_val",
              on_epoch: SeedEpochCallback | None = None, checkpoints: Sequence[Checkpoint | None] = (),
              runtime: Runtime = CPU, splits: tuple[str, ...] | None = None,
              kind: Callable[..., Any] = Looped) -> list[FitResult]:
    """Train S fresh students of ``model_spec`` on ``data``, one per seed; report each seed's last
    or best-on-val epoch. The one training loop: ``kind`` trains the seeds (``Looped``, or the
    vmapped ``kdablate.stacked.Stacked``), everything else is shared.

    teachers, checkpoints: per seed (or empty). splits: evaluated every epoch (default: val and
    test with ``on_epoch``, else val alone). Selection only ever looks at val accuracy.
    """
    signals = [NO_TEACHER if t is None else t for t in (teachers or [None] * len(seeds))]
    why = kind.refusal(model_spec, knowledge, signals, runtime)  # the one check, for any caller
    if why:
        raise ValueError(f"these seeds cannot train {kind.__name__}: {why}")
    steps_per_epoch = len(data.y_train) // optim.batch_size
    if steps_per_epoch < 1:  # refused when the study loads; a FitResult at chance must never come out
        raise NoTrainingSteps(f"batch_size {optim.batch_size} > {len(data.y_train)} training samples: no step would run")
    cohorts = [make_cohort(model_spec, data, optim, knowledge, seed, steps_per_epoch, runtime, t.model)
               for seed, t in zip(seeds, signals)]
    gens = [tuple(seeded_generator(seed, i) for i in range(3)) for seed in seeds]
    bests = [{"state": None, "epoch": 0, "val": -1.0, "artifacts": {}} for _ in seeds]
    measures = [measuring.for_cell(data, t.logits, c[0].objective.temperature) for t, c in zip(signals, cohorts)]
    checkpoints = list(checkpoints) or [None] * len(seeds)
    epoch, step = resume(cohorts, gens, checkpoints, bests)
    unit = kind(cohorts, optim, steps_per_epoch)  # after resume: a stack stacks the restored weights
    splits = splits or (("val",) if on_epoch is None else ("val", "test"))  # val alone picks the epoch
    for epoch in range(epoch + 1, optim.epochs + 1):
        metrics, step = unit.epoch(data, optim.batch_size, gens, epoch, step, signals, measures, runtime, splits)
        for s, m in enumerate(metrics):
            epoch_done(unit, s, m, measures[s], bests[s], epoch, report, on_epoch)
        if checkpoints[0] is not None and checkpoints[0].due(epoch, optim.epochs):
            for s, ckpt in enumerate(checkpoints):
                ckpt.save(unit.snapshot(s, gens[s], epoch, step, bests[s]))
    unit.finish()
    return [report_result(c[0].model, data, seen, report, b, optim.epochs, runtime)
            for c, seen, b in zip(cohorts, measures, bests)]


def epoch_done(unit: Any, s: int, metrics: dict[str, float], measures: Measurements, best: dict, epoch: int,
               report: str, on_epoch: SeedEpochCallback | None) -> None:
    """Seed s's epoch, trained and evaluated: its measurements, its callback, its best epoch so far."""
    measured, best["artifacts"] = measures.epoch()
    metrics.update(measured)
    if on_epoch is not None:
        on_epoch(s, epoch, metrics)
    if report == "best_val" and metrics["val/acc"] > best["val"]:
        best.update(state=unit.seed_state(s), epoch=epoch, val=metrics["val/acc"])


def fit(model_spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig, seed: int,
        teacher: TeacherSignal | None = None, report: str = "best_val", on_epoch: EpochCallback | None = None,
        checkpoint: Checkpoint | None = None, runtime: Runtime = CPU,
        splits: tuple[str, ...] | None = None) -> FitResult:
    """``fit_seeds`` for one seed (S = 1): the cell trained alone, ``on_epoch(epoch, metrics)``."""
    each = None if on_epoch is None else (lambda s, epoch, metrics: on_epoch(epoch, metrics))
    return fit_seeds(model_spec, data, optim, knowledge, [seed], [teacher], report, each, [checkpoint], runtime,
                     splits)[0]


def epoch_metrics(members: list[Member], parts: list[dict[str, float]], data: DataBundle, measures: Measurements,
                  runtime: Runtime = CPU, splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
    """An epoch's metrics: member 0's training ``parts`` and evaluation on ``splits``, each other
    member's under 'member<i>/' with the '/' of its keys made '_'."""
    metrics = {**parts[0], **evaluate_model(members[0].model, data, measures, splits, runtime)}
    for i, m in enumerate(members[1:], 1):
        extra = {**parts[i], **evaluate_model(m.model, data, measures, splits, runtime)}
        metrics.update({f"member{i}/" + k.replace("/", "_"): v for k, v in extra.items()})
    return metrics


def report_result(model: nn.Module, data: DataBundle, measures: Measurements, report: str,
                  best: dict, epochs: int, runtime: Runtime = CPU) -> FitResult:
    """Load the reported weights and evaluate them: 'report/<split>_<metric>', 'report/epoch',
    the reliability bins of val and test, and what the measurements read off the reported model
    on val (its own class similarity and correlations, 'report/student_similarity_*')."""
    if report == "best_val" and best["state"] is not None:
        model.load_state_dict(best["state"])
        epoch = best["epoch"]
    else:
        epoch = epochs
    reported, calibration, artifacts = {"report/epoch": float(epoch)}, {}, dict(best["artifacts"])
    for split in ("val", "test"):
        logits, y = split_logits(model, data, split, runtime), data.split(split)[1]
        metrics = split_metrics(logits, data, split, measures)
        reported.update({"report/" + k.replace("/", "_"): v for k, v in metrics.items()})
        calibration[split] = reliability(logits, y)
        if split == "val":  # the validation split only: nothing more is read off test
            similarity, matrices = measures.reported(logits)
            reported.update(similarity)
            artifacts.update(matrices)
    return FitResult(model, reported, artifacts, calibration)
