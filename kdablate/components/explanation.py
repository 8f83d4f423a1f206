"""The explanation-derived structure of introspective learning (Gu, Wu & Tresp, 2020).

A model explains its prediction for every class; classes whose explanations look
like the true class's explanation are treated as similar:
    s_c = sim(E_y, E_c),  r = softmax(s / tau) over c != y.
The recipe beyond the paper's abstract is this project's, and every choice is a
parameter: the explanation ``source``, ``similarity``, ``tau``, which model
explains (``explainer``: self or teacher), how often (``every`` n steps) and on
how much of the batch (``fraction``).

Samples not explained at a step get their class's running-average structure
(an EMA over explained samples), so a cheap schedule still yields a target for
every sample. BatchNorm: explanation passes run the model in eval mode by
default, so one sample's explanation never depends on the rest of the batch
(train-mode BN mixes samples through the batch statistics), and BN running
statistics are not updated by the extra pass.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdablate.components.context import Component, Need, Probe, StateDict, TargetContext
from kdablate.components.structure import STRUCTURES, class_means, uniform_structure
from kdablate.attribution import EXPLANATIONS, AttributionContext, Explanation
from kdablate.registry import ConfigError

SIMILARITIES = ("cosine", "pearson", "neg_l2")


def explanation_similarity(maps: torch.Tensor, labels: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(B, K, *S) maps, (B,) labels -> (B, K) s_c = sim(E_y, E_c)."""
    e = maps.reshape(maps.shape[0], maps.shape[1], -1)  # (B, K) scalar maps become D = 1
    if kind == "pearson":
        e = e - e.mean(2, keepdim=True)
    if kind in ("cosine", "pearson"):
        e = F.normalize(e, dim=2, eps=1e-12)
    e_y = e[torch.arange(len(labels)), labels]  # (B, D)
    if kind == "neg_l2":
        return -(e - e_y[:, None]).norm(dim=2)
    return torch.bmm(e, e_y[:, :, None]).squeeze(2)  # bmm: measured faster than einsum here


def structure_from_similarity(sim: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, K) similarities -> (B, K) softmax(s / tau) over c != y, 0 at y."""
    masked = (sim / tau).scatter(1, labels[:, None], float("-inf"))
    return torch.softmax(masked, dim=1)


def explain(model: nn.Module, source: Explanation, inputs: torch.Tensor, *, eval_mode: bool,
            ctx: AttributionContext) -> torch.Tensor:
    """(B, *shape) -> (B, K, *S) maps of ``model``, in eval mode if asked, mode restored after."""
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        return source.attribute(model, inputs, ctx=ctx)
    finally:
        model.train(was_training)


@STRUCTURES.register("explanation")
class ExplanationStructure(Component):
    """r from the similarity of per-class explanations; see the module docstring."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        source: str = "saliency"
        source_params: dict = dataclasses.field(default_factory=dict)
        similarity: str = "cosine"
        tau: float = 0.3
        explainer: str = "self"
        every: int = 1
        fraction: float = 1.0
        ema: float = 0.9
        mode: str = "auto"
        differentiable: bool = False

        def __post_init__(self) -> None:
            checks = [
                (self.similarity in SIMILARITIES, f"similarity must be one of {', '.join(SIMILARITIES)}"),
                (self.tau > 0, "tau must be > 0"),
                (self.explainer in ("self", "teacher"), "explainer must be 'self' or 'teacher'"),
                (self.every >= 1, "every must be >= 1"),
                (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
                (0 <= self.ema < 1, "ema must be in [0, 1)"),
                (self.mode in ("auto", "eval", "reuse"), "mode must be auto, eval or reuse"),
            ]
            for ok, msg in checks:
                if not ok:
                    raise ValueError(msg)
            EXPLANATIONS.params(self.source, self.source_params)  # fail at load time

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.source = EXPLANATIONS.build(params.source, params.source_params)
        # 'reuse' takes the feature map of this step's training forward: CAM is then one einsum.
        self.reuse = params.mode == "reuse" or (
            params.mode == "auto" and self.source.needs_features and params.explainer == "self")
        self.needs = (Need.TEACHER_MODEL if params.explainer == "teacher" else Need.NONE) | (
            Need.FEATURES if self.reuse else Need.NONE)
        self.differentiable = params.differentiable
        self.class_matrix: torch.Tensor | None = None  # (K, K) EMA of r per true class
        self._epoch_sums: torch.Tensor | None = None
        self._epoch_counts: torch.Tensor | None = None
        self._seconds, self._steps = 0.0, 0

    def __call__(self, ctx: TargetContext) -> torch.Tensor:
        k, y = ctx.num_classes, ctx.labels
        if self.class_matrix is None:
            dev = y.device
            self.class_matrix = uniform_structure(torch.arange(k, device=dev), k)
            self._epoch_sums, self._epoch_counts = torch.zeros(k, k, device=dev), torch.zeros(k, device=dev)
        self._steps += 1
        r = self.class_matrix[y]
        if ctx.step % self.params.every:
            return r
        t0 = time.perf_counter()
        n = max(1, round(self.params.fraction * len(y)))  # batches are shuffled: the first n are random
        r_exp = self.explained_structure(ctx, n)
        self._update(r_exp.detach(), y[:n], k)
        self._seconds += time.perf_counter() - t0
        return torch.cat([r_exp, r[n:]]) if n < len(y) else r_exp

    def check(self, probe: Probe) -> None:
        """Refuse a source the explainer cannot support: one that fails on it, or that gives one
        number per class (Grad-CAM at a layer with no spatial dims, e.g. an MLP's), whose
        similarities are all +-1, so the 'structure' would carry nothing and say nothing."""
        who = self.params.explainer
        model = probe.models.get(who)
        if model is None:  # a missing teacher is refused by the cell's needs
            return
        what = f"explanation '{self.params.source}' of the {who} model '{probe.names[who]}'"
        # A generator of its own: a source that draws noise is checked without touching the cell's RNG.
        probe_ctx = AttributionContext(generator=torch.Generator().manual_seed(0))
        try:
            maps = explain(model, self.source, probe.inputs, eval_mode=True, ctx=probe_ctx)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise ConfigError(f"{what} fails: {e}") from None
        if maps[0, 0].numel() < 2:
            raise ConfigError(f"{what} gives one number per class (maps {tuple(maps.shape[2:]) or '()'}), so "
                              "every similarity is +-1; use saliency or grad_input, or a layer with spatial dims")
        if not torch.isfinite(maps).all():
            raise ConfigError(f"{what} gives non-finite maps on the first training inputs")

    def explained_structure(self, ctx: TargetContext, n: int) -> torch.Tensor:
        """(n, K) structure of the first n samples from their explanations."""
        if ctx.inputs is None:
            raise RuntimeError("structure 'explanation' needs the batch inputs in its context")
        model = ctx.models.get(self.params.explainer)
        if model is None:
            raise RuntimeError(f"structure 'explanation' explains with '{self.params.explainer}', which is not loaded")
        features = ctx.features[:n] if self.reuse and ctx.features is not None else None
        source_ctx = AttributionContext(features=features, generator=ctx.generator,
                                        create_graph=self.params.differentiable)
        maps = explain(model, self.source, ctx.inputs[:n], eval_mode=not self.reuse, ctx=source_ctx)
        if not self.params.differentiable:
            maps = maps.detach()
        sim = explanation_similarity(maps, ctx.labels[:n], self.params.similarity)
        return structure_from_similarity(sim, ctx.labels[:n], self.params.tau)

    def _update(self, r: torch.Tensor, labels: torch.Tensor, k: int) -> None:
        sums = torch.zeros(k, k, device=r.device).index_add_(0, labels, r.float())
        counts = torch.bincount(labels, minlength=k).float()
        self._epoch_sums += sums
        self._epoch_counts += counts
        if self.params.every == 1 and self.params.fraction == 1:
            return  # every sample is explained at every step: the class EMA is never read
        seen = counts > 0
        means = sums[seen] / counts[seen, None]
        self.class_matrix[seen] = self.params.ema * self.class_matrix[seen] + (1 - self.params.ema) * means

    def state_dict(self) -> StateDict:
        """The class EMA 'class_matrix' (K, K), this epoch's per-class sums of r 'epoch_sums' (K, K)
        and sample counts 'epoch_counts' (K,) (all None before the first step), and the epoch's
        explanation time and step count; the EMA makes an ``every``/``fraction`` schedule resume
        bit for bit."""
        return {"class_matrix": self.class_matrix, "epoch_sums": self._epoch_sums,
                "epoch_counts": self._epoch_counts, "seconds": self._seconds, "steps": self._steps}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore ``state_dict()``'s output (tensors cloned: they are updated in place)."""
        want = {"class_matrix", "epoch_sums", "epoch_counts", "seconds", "steps"}
        if set(state) != want:
            raise ValueError(f"explanation structure state has keys {sorted(state)}, expected {sorted(want)}")

        def own(t: torch.Tensor | float | int | None) -> torch.Tensor | None:
            return t.clone() if isinstance(t, torch.Tensor) else None

        self.class_matrix, self._epoch_sums = own(state["class_matrix"]), own(state["epoch_sums"])
        self._epoch_counts = own(state["epoch_counts"])
        self._seconds, self._steps = float(state["seconds"] or 0.0), int(state["steps"] or 0)

    def summary(self) -> dict[str, torch.Tensor]:
        """{'similarity': (K, K) this epoch's class-mean r, 'explain_ms': ms per training step}."""
        if self._epoch_sums is None:
            return {}
        out = {"similarity": class_means(self._epoch_sums, self._epoch_counts).cpu(),
               "explain_ms": torch.tensor(1000 * self._seconds / max(self._steps, 1))}
        self._epoch_sums.zero_()
        self._epoch_counts.zero_()
        self._seconds, self._steps = 0.0, 0
        return out
