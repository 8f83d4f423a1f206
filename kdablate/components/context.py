"""What a knowledge component may read when it builds its part of a soft target: the step's
``TargetContext`` (one seed's rows, or a stack's), the load-time ``Probe``, the ``Need`` flags,
the ``Component`` base, and the ``Observation`` a component reports for the measurements."""
from __future__ import annotations

import abc
import dataclasses
import enum
import inspect
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


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a component measured at a step beyond its value, for ``kdablate.measures``.

    name: what it is ('explanation': the structure of explained rows).
    rows: (n, K) the values it measured, of the step's first n rows of each seed (none: (0, K)).
    labels: (n,) their labels.
    seconds: the time it took.
    """

    name: str
    rows: torch.Tensor
    labels: torch.Tensor
    seconds: float


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class TargetContext:
    """One training step's rows for the components: one seed's batch of B rows, or the batches of
    the S seeds of a stack as S*B rows, seed-major in equal blocks (``seeds``). The trainer builds
    it; nothing writes to it after.

    labels: (N,) int64 ground truth.
    num_classes: K.
    student_logits: (N, K) the model's own logits, detached (the 'self' source).
    teacher_logits: (N, K) a teacher's logits, or None when no teacher is loaded.
    generators: each seed's RNG for components, one per block of rows, so random ones draw what
        the seed draws alone, whether it trains alone or stacked; draw through ``uniform``.
    peer_logits: (N, K) the other cohort members' logits (Deep Mutual Learning), detached.
    inputs: (N, *shape) the batch, for components that explain a model on it.
    models: 'self' and, when loaded, 'teacher' modules, for explanations. In a stack, 'self' is
        the stack as one model over its seeds' rows, each row through its own seed's weights.
    features: (N, C, *L) the student's last feature map from this step's forward, if captured.
    step: the global optimisation step (0-based).
    epoch: the epoch this step belongs to (1-based, as the trainer counts them).
    steps_per_epoch: optimisation steps in one epoch, so a component may schedule by epoch.
    class_groups: (K,) the superclass of each class, when the data has a hierarchy.
    target: (N, K) the soft target q, when the trainer precomputed it (see ``Component.static``).
    observe: where a component reports an ``Observation`` (``report``), or None.
    """

    labels: torch.Tensor
    num_classes: int
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    generators: tuple[torch.Generator, ...] = ()
    peer_logits: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    models: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    features: torch.Tensor | None = None
    step: int = 0
    epoch: int = 1
    steps_per_epoch: int = 1
    class_groups: torch.Tensor | None = None
    target: torch.Tensor | None = None
    observe: Callable[[Observation], None] | None = None

    @property
    def seeds(self) -> int:
        """S, the seeds whose rows the context holds (one block of rows each)."""
        return max(len(self.generators), 1)

    def uniform(self, cols: int) -> torch.Tensor:
        """(N, cols) U[0, 1) draws on the CPU, each seed's rows from that seed's own generator."""
        if not self.generators:
            raise RuntimeError("this component draws from the seed's generator, and the context has none")
        rows = len(self.labels) // len(self.generators)
        return torch.cat([torch.rand(rows, cols, generator=g) for g in self.generators])

    def logits(self, source: str) -> torch.Tensor:
        """(N, K) logits of 'self', 'teacher' or 'peer'; a clear error if not loaded."""
        out = {"self": self.student_logits, "teacher": self.teacher_logits, "peer": self.peer_logits}[source]
        if out is None:
            raise RuntimeError(f"this component reads the '{source}' source, but none is loaded for this cell")
        return out

    def probs(self, source: str, temperature: float) -> torch.Tensor:
        """(N, K) softmax(logits(source) / T)."""
        return torch.softmax(self.logits(source) / temperature, dim=1)

    def report(self, observation: Observation) -> None:
        """Hand ``observation`` to the step's measurements, if any listen."""
        if self.observe is not None:
            self.observe(observation)

    def seed(self, s: int) -> TargetContext:
        """Seed s's rows alone, with its generator, no model and no listener: a seed's own loss."""
        b = len(self.labels) // self.seeds
        rows = {f: None if getattr(self, f) is None else getattr(self, f)[s * b:(s + 1) * b] for f in PER_ROW}
        gens = self.generators[s:s + 1]
        return dataclasses.replace(self, **rows, generators=gens, models={}, observe=None)


# The fields with a value per row, which a seed's slice of the context takes its block of.
PER_ROW = ("labels", "student_logits", "teacher_logits", "peer_logits", "inputs", "features", "target")


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

    ``needs`` (a ``Need`` flag set) says what the component reads beyond the student, so the
    study checks it at load and the trainer loads only what a cell uses. ``differentiable``
    components let gradients flow through the target. ``static`` components are a fixed function
    of (labels, cached teacher logits, T, class_groups) per sample, so the trainer may build their
    target once per cell.

    ``row_wise`` is the contract for what a stack of seeds may share: the component gives each row
    a value from that row of the context alone (its labels, logits and inputs, its seed's draws
    through ``TargetContext.uniform``, its seed's weights through ``models['self']``) and keeps
    no state, so one call over a stack's S*B rows gives each seed what its own call would. A
    stack trains an objective only when its components are all row-wise. Off unless a component
    says so, and off again in a subclass that redefines ``__call__`` or ``state_dict`` without
    restating it (``tests/test_stacked.py`` checks every registered component that says so
    against each seed alone). What a component measures goes to ``TargetContext.report``.
    """

    needs: Need = Need.NONE
    differentiable: bool = False
    static: bool = False
    row_wise: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)  # type: ignore[arg-type]
        # A subclass that changes what is computed or kept must say again what a stack may do with it.
        own = vars(cls)
        if any(name in own for name in ("__call__", "state_dict")) and "row_wise" not in own:
            cls.row_wise = False
        if "__call__" in own and len(inspect.signature(own["__call__"]).parameters) != 3:
            raise TypeError(f"{cls.__name__}.__call__ must take (self, ctx, temperature): the objective "
                            "passes its T to every component call")

    def __init__(self, params: object) -> None:
        self.params = params

    @abc.abstractmethod
    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        """(N,) mass or (N, K) structure for the rows of ``ctx``, sources read at ``temperature``
        (the objective's T, which it alone owns)."""

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
