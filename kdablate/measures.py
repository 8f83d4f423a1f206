"""Measurements: what a seed's training is read for beyond its loss and accuracy.

A ``Measurement`` sees a seed at four moments and answers at each with what it measures:
``observe`` takes a component's ``Observation`` of a training step, ``epoch`` answers after each
epoch (and starts the next), ``evaluated`` answers for a split's logits at every evaluation, and
``reported`` for the reported model's validation logits. The trainer calls them through one
``Measurements`` per seed (``for_cell``), so the training loop holds no measurement of its own:

- ``ExplanationSimilarity``: the epoch's class-mean explanation structure of introspective
  learning (Gu, Wu & Tresp, 2020), its time per step, and its Spearman correlation with the
  teacher's soft-target structure at the arm's T and with the oracle hierarchy;
- ``Agreement``: top-1 agreement with the teacher's cached logits on each split;
- ``StudentSimilarity``: the reported student's own class similarity on validation, against the
  teacher's and the oracle's.
"""
from __future__ import annotations

import abc
import dataclasses

import torch

from kdablate.components.context import Observation
from kdablate.components.structure import (
    class_mean_structure, class_means, class_sums, nongt_distribution, oracle_structure,
)
from kdablate.data import DataBundle
from kdablate.metrics import agreement, offdiagonal, spearman

Reading = tuple[dict[str, float], dict[str, torch.Tensor]]  # (metrics, (K, K) artifacts)


def output_similarity(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) logits, (N,) labels -> (K, K) class similarity of a model's outputs: row y is the mean,
    over the samples of class y, of softmax(logits) with the true class zeroed and the rest
    renormalised (rows sum to 1 off the diagonal; a class without samples gets a uniform row).
    Divide the logits by a temperature first to read the outputs at that temperature."""
    p = torch.softmax(logits, 1)
    return class_mean_structure(nongt_distribution(p, y), y, num_classes)


def oracle_similarity(data: DataBundle) -> torch.Tensor | None:
    """(K, K) the oracle hierarchy's class similarity where the data has class groups, else None."""
    if data.class_groups is None:
        return None
    return oracle_structure(torch.arange(data.num_classes), data.class_groups, 1.0)


def correlations(matrix: torch.Tensor, references: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, float]:
    """Spearman correlation of the off-diagonal entries of (K, K) ``matrix`` with each reference,
    logged under ``names[reference]``."""
    return {names[name]: spearman(offdiagonal(matrix), offdiagonal(ref)) for name, ref in references.items()}


class Measurement(abc.ABC):
    """One thing measured on a seed; each moment it does not measure answers nothing."""

    def observe(self, observation: Observation) -> None:
        """A component's observation of one training step."""

    def epoch(self) -> Reading:
        """What the epoch just trained measured; the next epoch starts from nothing."""
        return {}, {}

    def evaluated(self, split: str, logits: torch.Tensor) -> dict[str, float]:
        """'<split>/<metric>' of a model's (N, K) logits on ``split``."""
        return {}

    def reported(self, val_logits: torch.Tensor) -> Reading:
        """'report/<metric>' of the reported model, from its (N_val, K) validation logits (never test)."""
        return {}, {}


class ExplanationSimilarity(Measurement):
    """The epoch's class-mean explanation structure (the 'explanation' observations: the explained
    rows' r), as artifact 'similarity_explanation', with its Spearman correlation against each
    reference (the teacher's mean soft-target structure at the arm's T on the train split, the
    oracle's) and the explanation time per training step, 'time/explain_ms'."""

    SPEARMAN = {"teacher": "train/similarity_spearman", "oracle": "train/similarity_oracle_spearman"}

    def __init__(self, references: dict[str, torch.Tensor]) -> None:
        self.references = references
        self.sums: torch.Tensor | None = None  # (K, K) this epoch's per-class sums of r
        self.counts: torch.Tensor | None = None  # (K,) and sample counts
        self.seconds, self.steps = 0.0, 0

    def observe(self, observation: Observation) -> None:
        if observation.name != "explanation":
            return
        self.seconds += observation.seconds
        self.steps += 1  # a step that explained nothing (a schedule's) counts in the time per step
        r, labels = observation.rows, observation.labels
        k = r.shape[1]
        if self.sums is None:
            self.sums = torch.zeros(k, k, device=r.device)
            self.counts = torch.zeros(k, device=r.device)
        if len(r):
            sums, counts = class_sums(r, labels, k)
            self.sums += sums
            self.counts += counts

    def epoch(self) -> Reading:
        if self.sums is None:
            return {}, {}
        matrix = class_means(self.sums, self.counts).cpu()
        metrics = {"time/explain_ms": 1000 * self.seconds / max(self.steps, 1),
                   **correlations(matrix, self.references, self.SPEARMAN)}
        artifacts = {"similarity_explanation": matrix, **{f"similarity_{n}": m for n, m in self.references.items()}}
        self.sums = self.counts = None
        self.seconds, self.steps = 0.0, 0
        return metrics, artifacts


class Agreement(Measurement):
    """'<split>/agreement': top-1 agreement with the teacher's cached logits of the split."""

    def __init__(self, teacher_logits: dict[str, torch.Tensor]) -> None:
        self.teacher_logits = teacher_logits

    def evaluated(self, split: str, logits: torch.Tensor) -> dict[str, float]:
        return {f"{split}/agreement": agreement(logits, self.teacher_logits[split])}


class StudentSimilarity(Measurement):
    """The reported student's own class similarity (artifact 'similarity_student') and its
    Spearman correlation with each reference, on the validation split.

    The teacher's matrix (artifact 'similarity_teacher_t1') is read like the student's: at T = 1
    (the temperature the student is evaluated at), whatever the arm's T, and on the same samples.
    Softening only one side would change its class means (a softer softmax weighs the samples of
    a class differently), so the two would differ for a reason other than class similarity."""

    SPEARMAN = {"teacher": "report/student_similarity_spearman", "oracle": "report/student_similarity_oracle_spearman"}

    def __init__(self, y_val: torch.Tensor, num_classes: int, references: dict[str, torch.Tensor]) -> None:
        self.y, self.k, self.references = y_val, num_classes, references

    def reported(self, val_logits: torch.Tensor) -> Reading:
        student = output_similarity(val_logits, self.y, self.k)
        artifacts = {"similarity_student": student}
        if "teacher" in self.references:
            artifacts["similarity_teacher_t1"] = self.references["teacher"]
        return correlations(student, self.references, self.SPEARMAN), artifacts


@dataclasses.dataclass(frozen=True)
class Measurements:
    """A seed's measurements, asked together: each moment's answers merged."""

    parts: tuple[Measurement, ...]

    def observe(self, observation: Observation) -> None:
        for part in self.parts:
            part.observe(observation)

    def epoch(self) -> Reading:
        return merge([part.epoch() for part in self.parts])

    def evaluated(self, split: str, logits: torch.Tensor) -> dict[str, float]:
        return {k: v for part in self.parts for k, v in part.evaluated(split, logits).items()}

    def reported(self, val_logits: torch.Tensor) -> Reading:
        return merge([part.reported(val_logits) for part in self.parts])


def merge(readings: list[Reading]) -> Reading:
    """The readings' metrics and artifacts, each in one dict."""
    return ({k: v for m, _ in readings for k, v in m.items()}, {k: v for _, a in readings for k, v in a.items()})


NONE = Measurements(())


def for_cell(data: DataBundle, teacher_logits: dict[str, torch.Tensor] | None, temperature: float) -> Measurements:
    """A seed's measurements, given its data, its teacher's cached logits per split (or None) and
    its arm's T. The references are fixed for the cell: the oracle where the data has a hierarchy,
    and the teacher's class similarity, at the arm's T on train for the explanations and at T = 1
    on validation for the reported student (``StudentSimilarity``)."""
    oracle = oracle_similarity(data)
    train_refs = val_refs = {} if oracle is None else {"oracle": oracle}
    y_val, k = data.split("val")[1], data.num_classes
    parts: list[Measurement] = []
    if teacher_logits is not None:
        at_t = output_similarity(teacher_logits["train"] / temperature, data.y_train, k)
        train_refs = {"teacher": at_t, **train_refs}
        val_refs = {"teacher": output_similarity(teacher_logits["val"], y_val, k), **val_refs}
        parts.append(Agreement(teacher_logits))
    return Measurements((ExplanationSimilarity(train_refs), *parts, StudentSimilarity(y_val, k, val_refs)))
