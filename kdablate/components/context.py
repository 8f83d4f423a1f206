"""What a knowledge component may read when it builds its part of a soft target: the step's
``TargetContext``, the load-time ``Probe``, the ``Need`` flags, and the ``Component`` base."""
from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Callable

import torch
from torch import nn


class Need(enum.Flag):
    """What a cell must load beyond the student. Declared by every component and objective,
    combined per cell, and checked when the study loads against the config (a teacher) and
    the dataset (a class hierarchy), so a missing source fails before any cell trains."""

    NONE = 0
    TEACHER = enum.auto()        # the teacher's logits (cached, per view, or online)
    TEACHER_MODEL = enum.auto()  # the teacher network itself (teacher explanations)
    PEER = enum.auto()           # a cohort of students (Deep Mutual Learning)
    FEATURES = enum.auto()       # the student's last feature map from the training forward
    HIERARCHY = enum.auto()      # the dataset's class groups (superclasses)


SOURCE_NEEDS = {"self": Need.NONE, "teacher": Need.TEACHER, "peer": Need.PEER}

# A component's training state as a checkpoint holds it: tensors and plain numbers only, so
# checkpoints load with ``torch.load(weights_only=True)`` and never run code.
StateDict = dict[str, torch.Tensor | float | int | None]


@dataclasses.dataclass
class TargetContext:
    """One training step's view for the components, built by the trainer per member and step.

    labels: (B,) int64 ground truth.
    num_classes: K.
    student_logits: (B, K) the model's own logits, detached (the 'self' source).
    teacher_logits: (B, K) a teacher's logits, or None when no teacher is loaded.
    generator: the cell's RNG for components, so random ones are reproducible per seed. A component
        draws through ``uniform``, which also serves a context of several seeds (``merged``).
    peer_logits: (B, K) the other cohort members' logits (Deep Mutual Learning), detached.
    inputs: (B, *shape) the batch, for components that explain a model on it.
    models: 'self' and, when loaded, 'teacher' modules, for explanations.
    features: (B, C, *L) the student's last feature map from this step's forward, if captured.
    step: the global optimisation step (0-based).
    epoch: the epoch this step belongs to (1-based, as the trainer counts them).
    steps_per_epoch: optimisation steps in one epoch, so a component may schedule by epoch.
    class_groups: (K,) the superclass of each class, when the data has a hierarchy.
    target: (B, K) the soft target q, when the trainer precomputed it (see ``Component.static``).
    temperature: T of the objective that reads this context, applied to any source logits
        before a component reads them. The objective owns T and writes it here before its
        components see the context (``kdablate.objectives.Objective``); the trainer never does.
    """

    labels: torch.Tensor
    num_classes: int
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    generator: torch.Generator | MergedSeeds | None = None
    peer_logits: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    models: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    features: torch.Tensor | None = None
    step: int = 0
    epoch: int = 1
    steps_per_epoch: int = 1
    class_groups: torch.Tensor | None = None
    target: torch.Tensor | None = None
    temperature: float | None = None
    generators: tuple[torch.Generator | None, ...] = ()  # ``merged``: each seed's, in row order
    stack: StackSeat | None = None  # a seed's place in a stack, for components that share the model (``StackSeat``)

    def uniform(self, cols: int) -> torch.Tensor:
        """(B, cols) U[0, 1) draws on the CPU from the cell's generator; in a ``merged`` context each
        seed's rows from that seed's own generator, so the draws are those of the seeds alone."""
        gens = self.generators or (self.generator,)
        rows = len(self.labels) // len(gens)
        return torch.cat([torch.rand(rows, cols, generator=g) for g in gens])

    def logits(self, source: str) -> torch.Tensor:
        """(B, K) logits of 'self', 'teacher' or 'peer'; a clear error if not loaded."""
        out = {"self": self.student_logits, "teacher": self.teacher_logits, "peer": self.peer_logits}[source]
        if out is None:
            raise RuntimeError(f"this component reads the '{source}' source, but none is loaded for this cell")
        return out

    def probs(self, source: str) -> torch.Tensor:
        """(B, K) softmax(logits(source) / T), T the reading objective's temperature."""
        return torch.softmax(self.logits(source) / self.require_temperature(), dim=1)

    def require_temperature(self) -> float:
        """T; an error if no objective has set it (a component called outside an objective)."""
        if self.temperature is None:
            raise RuntimeError("this component reads the temperature, which its objective sets; none has")
        return self.temperature


@dataclasses.dataclass(frozen=True, eq=False)
class StackSeat:
    """Seed ``index``'s place in a stack of S seeds trained as one model (``kdablate.stacked``), for a
    component that reads the model and says ``shares_stack``: it explains every seed's first R rows
    in one call and each seed takes its own slice.

    contexts: the S seeds' contexts at this step, in seed order (each with its ``inputs``).
    model: R -> one module over (S*R, *shape) rows laid out seed-major (R rows of seed 0, then
        seed 1, ...), each row through its own seed's weights; whole copies of such rows stacked
        along dim 0, (j*S*R, *shape), are accepted too (a source that tiles its inputs).
    cache: shared by the S seats of a step, so the first seed's call computes for all.
    """

    index: int
    contexts: list[TargetContext]
    model: Callable[[int], nn.Module]
    cache: dict


class MergedSeeds:
    """The ``generator`` of a ``merged`` context: not a ``torch.Generator``, so torch refuses a draw
    from it (TypeError) where None would draw from the global RNG and break each seed's stream
    silently; a row-wise component draws through ``TargetContext.uniform``."""

    def __repr__(self) -> str:
        return "MergedSeeds(draw through ctx.uniform)"


PER_ROW = ("labels", "student_logits", "teacher_logits", "peer_logits", "target")


def merged(ctxs: list[TargetContext]) -> TargetContext:
    """S seeds' contexts at one step (equal batches B, no model, inputs or features: a stack's) as
    one context of their (S*B,) labels and (S*B, K) logits and targets in seed order, each seed's
    generator kept for its own rows (``uniform``). A ``Component.row_wise`` component gives on it
    each seed's result, stacked."""
    if not ctxs or any(c.models or c.inputs is not None or c.features is not None or c.generators
                       or c.stack is not None for c in ctxs):
        raise ValueError("only a stack's contexts merge: some, with no models, inputs, features or merged contexts")
    if len({len(c.labels) for c in ctxs}) > 1:  # ``uniform`` splits the rows evenly among the seeds
        raise ValueError(f"merged contexts need equal batches, got {[len(c.labels) for c in ctxs]}")
    rows: dict[str, torch.Tensor | None] = {}
    for f in PER_ROW:
        values = [getattr(c, f) for c in ctxs]
        if len({v is None for v in values}) > 1:
            raise ValueError(f"merged contexts need '{f}' in every seed's or in none")
        rows[f] = None if values[0] is None else torch.cat(values)
    first = ctxs[0]
    return dataclasses.replace(first, **rows, generator=MergedSeeds(),
                               generators=tuple(c.generator for c in ctxs))


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a study shows a component when it loads, before any cell trains.

    inputs: (B, *shape) a few prepared training inputs of the cell's dataset.
    models: 'self' (the student) and, when the cell has one, 'teacher': freshly built.
    names: the registry name of each model, for messages.
    """

    inputs: torch.Tensor
    num_classes: int
    models: dict[str, nn.Module]
    names: dict[str, str]


class Component(abc.ABC):
    """Base of mass and structure plugins: holds the checked ``Params``.

    ``needs`` (a ``Need`` flag set) says what the component reads beyond the student,
    so the study checks it at load and the trainer loads only what a cell uses. ``differentiable`` components let gradients flow through the target.
    ``static`` components are a fixed function of (labels, cached teacher logits, T,
    class_groups) per sample, so the trainer may build their target once per epoch.
    ``reads_model`` components read a model (explanations): their arms train unstacked, unless
    the component also ``shares_stack``: it then reads the model only through ``ctx.stack`` when
    one is given (a ``StackSeat``: every seed's rows explained in one call on the stacked model).
    ``row_wise`` components give each row a value from that row of the context alone (and its
    seed's draws, through ``TargetContext.uniform``) and keep no state or statistics, so a
    stack may build every seed's part in one call on the ``merged`` context. Off unless a
    component says so, and off again in a subclass that redefines ``__call__``, ``summary`` or
    ``state_dict`` without restating it (``tests/test_stacked.py`` checks every registered one
    that says so, at its default parameters); ``shares_stack`` likewise (checked against
    separate runs in float64).
    """

    needs: Need = Need.NONE
    differentiable: bool = False
    static: bool = False
    # Reads a model, the inputs or the features (explanations). A stacked step hands its
    # components none of these, so one that reads them without saying so fails loudly there.
    reads_model: bool = False
    row_wise: bool = False
    shares_stack: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)  # type: ignore[arg-type]
        # A subclass that changes what is computed or kept must say again what a stack may do with it.
        own = vars(cls)
        if any(name in own for name in ("__call__", "summary", "state_dict")):
            for flag in ("row_wise", "shares_stack"):
                if flag not in own:
                    setattr(cls, flag, False)

    def __init__(self, params: object) -> None:
        self.params = params

    @abc.abstractmethod
    def __call__(self, ctx: TargetContext) -> torch.Tensor:
        """(B,) mass or (B, K) structure for the batch in ``ctx``."""

    def summary(self) -> dict[str, torch.Tensor]:
        """Per-epoch statistics to log (e.g. a class-similarity matrix); resets them."""
        return {}

    def check(self, probe: Probe) -> None:
        """Raise ConfigError when this component cannot work with the cell's data and models
        (run once per distinct cell at load, so a misfit is refused rather than trained)."""

    def state_dict(self) -> StateDict:
        """What changes in training and must survive a checkpoint (default: nothing)."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore ``state_dict()``'s output; a stateless component refuses state it never made."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class SourceComponent(Component):
    """A component computed from one source's probabilities at T ('self', 'teacher', 'peer').

    What it needs and whether it is static follow from the source: the student itself
    needs nothing loaded; only the cached teacher is fixed per sample.
    """

    source: str = "teacher"

    @property
    def needs(self) -> Need:  # type: ignore[override]
        return SOURCE_NEEDS[self.source]

    @property
    def static(self) -> bool:  # type: ignore[override]
        return self.source == "teacher"
