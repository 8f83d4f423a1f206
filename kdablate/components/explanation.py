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

``sketch`` = m > 0 replaces the K backward passes of a gradient source (saliency,
grad_input) by one backward and m + 1 forward-mode products (for a piecewise-linear model, one
forward over the m + 1 direction rows, at the activation pattern recorded in E_y's forward).
Cosine and Pearson depend on the maps only through their per-sample (K, K) Gram matrix
G = E E^T, and with m Rademacher directions V (D x m), P = E V (= J V for saliency: m JVPs,
about one forward each whatever K is) gives the unbiased sketch G ≈ P P^T / m (``sketch``,
``gram``; Johnson & Lindenstrauss
1984; Achlioptas 2003; Halko, Martinsson & Tropp 2011; Woodruff 2014, *Sketching as a Tool
for Numerical Linear Algebra*). The structure needs only s_c = G_yc / sqrt(G_yy G_cc):
``sketched_similarity`` takes the row G_y. = E E_y exactly (E_y from one backward pass,
then as one more direction) and sketches only what of each norm is orthogonal to E_y:
G_cc = a_c^2 + |P E_c|^2 with a_c = G_yc / |E_y| exact and P = I - u u^T (u = E_y / |E_y|),
sketched as <E_c, P v_j> = <E_c, v_j> - a_c <v_j, u>: P applied after the products, so a
differentiable sketch also differentiates through u (a control variate: the classes whose maps
are most like E_y, the ones a softmax at a small tau weighs, come out nearly exact). Measured, the
class-similarity Spearman to the exact maps at K = 100 is 0.965 (MLP) and 0.991 (1-D CNN) at
m = 4 this way, 0.93 and 0.98 with the whole norm sketched, and needs m = 64 with the whole
Gram sketched (``python -m kdablate.bench.explain``).
Pearson is cosine after centring over the D input dims, C = I - 11^T/D; C is symmetric and
idempotent, so <C E_c, C u> = <E_c, C u>: centring the directions (and E_y) instead of
the maps gives Pearson's Gram exactly, in expectation for the sketched part. The
products run in the mode of the exact path (eval; ``mode: reuse`` is refused).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdablate.components.context import Component, Need, Observation, Probe, StateDict, TargetContext
from kdablate.components.memo import STATE_KEYS as MEMO_STATE, RowMemo, row_keys
from kdablate.components.structure import STRUCTURES, class_sums, uniform_structure
from kdablate import linearized
from kdablate.attribution import EXPLANATIONS, AttributionContext, Explanation, directions, linearization_holds
from kdablate.registry import ConfigError

SIMILARITIES = ("cosine", "pearson", "neg_l2")
GRAM_SIMILARITIES = ("cosine", "pearson")  # functions of the Gram matrix alone: sketchable


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


@contextlib.contextmanager
def explaining_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """``model`` in eval mode inside, if asked; its mode restored after."""
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def explain(model: nn.Module, source: Explanation, inputs: torch.Tensor, *, eval_mode: bool,
            ctx: AttributionContext) -> torch.Tensor:
    """(B, *shape) -> (B, K, *S) maps of ``model``, in eval mode if asked, mode restored after."""
    with explaining_mode(model, eval_mode):
        return source.attribute(model, inputs, ctx=ctx)


def sketch(model: nn.Module, source: Explanation, inputs: torch.Tensor, m: int, *, centre: bool,
           eval_mode: bool, ctx: AttributionContext) -> torch.Tensor:
    """(B, *shape) -> (B, K, m) projections P = E V of the maps on m Rademacher directions per
    sample, each seed's rows from its generator in ``ctx.generators`` (centred over the input dims if
    ``centre``: Pearson);
    (1/m) P P^T estimates the (B, K, K) Gram matrix (``gram``). A sketchable source only."""
    v = directions(inputs, m, ctx, centre)  # (m, B, *shape)
    with explaining_mode(model, eval_mode):
        return source.project(model, inputs, v, ctx=ctx)


def sketched_similarity(model: nn.Module, source: Explanation, inputs: torch.Tensor, labels: torch.Tensor,
                        m: int, *, centre: bool, eval_mode: bool, ctx: AttributionContext) -> torch.Tensor:
    """(B, *shape), (B,) labels -> (B, K) s_c = cos(E_y, E_c) (Pearson if ``centre``) from one backward
    and m + 1 forward-mode products: the Gram row G_yc = <E_c, C E_y> exactly (E_y as one more
    direction), and each norm split along u = E_y / |E_y| into its exact part a_c = G_yc / |E_y| and
    the rest |P E_c|^2, P = I - u u^T, sketched on directions P v_j. Then s_c = a_c / sqrt(a_c^2 +
    |P E_c|^2): the error is in the part orthogonal to E_y alone, so the classes most like y (the
    ones a softmax at a small tau weighs) come out nearly exact, and |s_c| <= 1 by construction."""
    with explaining_mode(model, eval_mode):
        with linearized.recording(model) as pattern:  # x's activation pattern, from E_y's forward
            e_y = source.attribute_labels(model, inputs, labels, ctx=ctx)  # (B, *shape)
        if centre:
            e_y = e_y - e_y.mean(dim=tuple(range(1, e_y.dim())), keepdim=True)
        if not ctx.create_graph:
            e_y = e_y.detach()
        v = directions(inputs, m, ctx, centre)  # (m, B, *shape)
        at_x = dataclasses.replace(ctx, pattern=pattern)
        p = source.project(model, inputs, torch.cat([e_y[None], v]), ctx=at_x)  # (B, K, m + 1)
    p = p.permute(2, 0, 1)  # (m + 1, B, K): the products' own layout, contiguous (x1.5 faster below)
    norm = e_y.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,) |E_y|
    a = p[0] / norm[:, None]  # (B, K) <E_c, u>, |E_y| at y
    # <E_c, P v_j> = <E_c, v_j> - a_c <v_j, u>: the projection applied after the products, with u
    # live, so that a differentiable sketch (create_graph) also differentiates through u = E_y / |E_y|.
    vu = (v.flatten(2) * e_y.flatten(1)).sum(2) / norm  # (m, B) <v_j, u>
    rest = (p[1:] - a * vu[:, :, None]).square().mean(0)  # (B, K) ~ |P E_c|^2, 0 at y
    return a / (a.square() + rest.scatter(1, labels[:, None], 0.0)).clamp_min(1e-24).sqrt()


def gram(maps: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """(B, K, *S) maps -> (B, K, K) E E^T over the flattened S, of the maps centred over S if
    ``centre``; for (B, K, m) projections of ``sketch``, (1/m) of it is the sketched estimate."""
    e = maps.reshape(maps.shape[0], maps.shape[1], -1)
    if centre:
        e = e - e.mean(2, keepdim=True)
    return torch.bmm(e, e.transpose(1, 2))


@STRUCTURES.register("explanation")
class ExplanationStructure(Component):
    """r from the similarity of per-class explanations; see the module docstring."""

    row_wise = True  # when the instance's explainer, source and schedule allow it (``__init__``)

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
        sketch: int = 0

        def __post_init__(self) -> None:
            checks = [
                (self.similarity in SIMILARITIES, f"similarity must be one of {', '.join(SIMILARITIES)}"),
                (self.tau > 0, "tau must be > 0"),
                (self.explainer in ("self", "teacher"), "explainer must be 'self' or 'teacher'"),
                (self.every >= 1, "every must be >= 1"),
                (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
                (0 <= self.ema < 1, "ema must be in [0, 1)"),
                (self.mode in ("auto", "eval", "reuse"), "mode must be auto, eval or reuse"),
                (self.sketch >= 0, "sketch must be >= 0 (0: exact maps)"),
            ]
            for ok, msg in checks:
                if not ok:
                    raise ValueError(msg)
            EXPLANATIONS.params(self.source, self.source_params)  # fail at load time
            if self.sketch:
                self._check_sketch()

        def _check_sketch(self) -> None:
            """sketch > 0 estimates the Gram matrix of a gradient source's maps, with eval-mode JVPs."""
            sketchable = [n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).sketchable]
            if not EXPLANATIONS.get(self.source).sketchable or self.similarity not in GRAM_SIMILARITIES \
                    or self.mode == "reuse":
                raise ValueError(
                    f"sketch={self.sketch} needs source {' or '.join(sketchable)}, similarity "
                    f"{' or '.join(GRAM_SIMILARITIES)} and mode auto or eval (got source '{self.source}', "
                    f"similarity '{self.similarity}', mode '{self.mode}'); sketch=0 explains exactly")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.source = EXPLANATIONS.build(params.source, params.source_params)
        # 'reuse' takes the feature map of this step's training forward: CAM is then one einsum.
        self.reuse = params.mode == "reuse" or (
            params.mode == "auto" and self.source.needs_features and params.explainer == "self")
        self.needs = (Need.TEACHER_MODEL if params.explainer == "teacher" else Need.NONE) | (
            Need.FEATURES if self.reuse else Need.NONE)
        self.differentiable = params.differentiable
        # Row-wise, so a stack explains every seed's rows in one call on its stacked model: the
        # student's own explanations, recomputed (not the training forward's features), by a source
        # that reads the model row by row (``Explanation.stackable``), of every row at every step
        # (a schedule fills the other rows from a class EMA: state, not a row's own value).
        self.scheduled = params.every > 1 or params.fraction < 1
        self.row_wise = (type(self).row_wise and params.explainer == "self" and not self.reuse
                         and self.source.stackable and not self.scheduled)
        # The teacher is frozen, and in eval mode a row's maps do not depend on its batch: its
        # similarities for an input row and label are computed once (``_memoized_similarity``),
        # unless the sketch's draws or gradients through the maps are asked for.
        self.memoizes = (params.explainer == "teacher" and self.source.deterministic
                         and not (params.sketch or params.differentiable or self.reuse))
        self._memo = RowMemo()
        self.class_matrix: torch.Tensor | None = None  # (K, K) EMA of r per true class, when scheduled

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        """(N, K) r: the explained structure of the step's rows, or, on a schedule, of the first
        ``fraction`` of them every ``every`` steps and the class EMA for the rest. Each call reports
        the explained rows (``Observation`` 'explanation'; none on a skipped step) and their time."""
        k, y = ctx.num_classes, ctx.labels
        if self.scheduled and self.class_matrix is None:
            self.class_matrix = uniform_structure(torch.arange(k, device=y.device), k)
        if self.scheduled and ctx.step % self.params.every:
            ctx.report(Observation("explanation", y.new_empty(0, k, dtype=torch.float32), y[:0], 0.0))
            return self.class_matrix[y]
        t0 = time.perf_counter()
        n = max(1, round(self.params.fraction * len(y)))  # batches are shuffled: the first n are random
        r_exp = self.explained_structure(ctx, n)
        rest = self.class_matrix[y[n:]] if n < len(y) else None  # the EMA before this step's update
        if self.scheduled:
            self._update(r_exp.detach(), y[:n], k)
        ctx.report(Observation("explanation", r_exp.detach(), y[:n], time.perf_counter() - t0))
        return r_exp if rest is None else torch.cat([r_exp, rest])

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
        probe_ctx = AttributionContext(generators=(torch.Generator().manual_seed(0),))
        try:
            maps = explain(model, self.source, probe.inputs, eval_mode=True, ctx=probe_ctx)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise ConfigError(f"{what} fails: {e}") from None
        if maps[0, 0].numel() < 2:
            raise ConfigError(f"{what} gives one number per class (maps {tuple(maps.shape[2:]) or '()'}), so "
                              "every similarity is +-1; use saliency or grad_input, or a layer with spatial dims")
        if not torch.isfinite(maps).all():
            raise ConfigError(f"{what} gives non-finite maps on the first training inputs")
        if self.params.sketch:
            self._check_sketch(model, probe.inputs, what, probe_ctx)

    def _check_sketch(self, model: nn.Module, inputs: torch.Tensor, what: str, probe_ctx: AttributionContext) -> None:
        """Forward-mode products must go through every layer of the model, and a model that says its
        forward is linear glue (``kdablate.linearized``) must give the forward-mode products."""
        try:
            labels = torch.zeros(len(inputs), dtype=torch.long, device=inputs.device)
            sketched_similarity(model, self.source, inputs, labels, 2, centre=False, eval_mode=True, ctx=probe_ctx)
            holds = linearization_holds(model, inputs)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise ConfigError(f"{what} cannot be sketched (sketch={self.params.sketch}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not holds:
            raise ConfigError(f"{what}: the model declares linear_glue, but its linearized products differ "
                              "from forward-mode ones (a nonlinearity in a forward?); remove the declaration")

    def explained_structure(self, ctx: TargetContext, n: int) -> torch.Tensor:
        """(n, K) structure of the first n rows from their explanations; on a stack's rows (n all
        of them: a row-wise structure), by one call over every seed's rows on the stacked model."""
        if ctx.inputs is None:
            raise RuntimeError("structure 'explanation' needs the batch inputs in its context")
        model = ctx.models.get(self.params.explainer)
        if model is None:
            raise RuntimeError(f"structure 'explanation' explains with '{self.params.explainer}', which is not loaded")
        features = ctx.features[:n] if self.reuse and ctx.features is not None else None
        source_ctx = AttributionContext(features=features, generators=ctx.generators,
                                        create_graph=self.params.differentiable)
        x, y = ctx.inputs[:n], ctx.labels[:n]
        if self.memoizes and x.device.type == "cpu":
            sim = self._memoized_similarity(model, x, y, source_ctx, ctx.epoch)
        else:
            sim = self.similarity(model, x, y, source_ctx)
        return structure_from_similarity(sim, y, self.params.tau)

    def _memoized_similarity(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             source_ctx: AttributionContext, epoch: int) -> torch.Tensor:
        """(n, K) similarities of a frozen explainer, explaining only the rows (with their labels)
        it has not explained before (``kdablate.components.memo``)."""
        self._memo.follow(model, epoch)
        if self._memo.off:
            return self.similarity(model, x, y, source_ctx)
        keys = row_keys(x, y)
        at, rows = self._memo.lookup(keys)
        if len(at) == len(keys):
            return self._memo.values[rows]
        missing = sorted(set(range(len(keys))) - set(at))
        fresh = self.similarity(model, x[missing], y[missing], source_ctx)
        self._memo.add([keys[i] for i in missing], fresh)
        if not at:
            return fresh
        out = torch.empty(len(keys), fresh.shape[1], dtype=fresh.dtype)
        out[missing], out[at] = fresh, self._memo.values[rows].to(fresh.dtype)
        return out

    def similarity(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   source_ctx: AttributionContext) -> torch.Tensor:
        """(n, *shape) inputs, (n,) labels -> (n, K) s_c = sim(E_y, E_c) of ``model``'s explanations,
        exact or sketched; detached unless the structure is differentiable."""
        p = self.params
        if p.sketch:
            sim = sketched_similarity(model, self.source, x, y, p.sketch, centre=p.similarity == "pearson",
                                      eval_mode=not self.reuse, ctx=source_ctx)
        else:
            maps = explain(model, self.source, x, eval_mode=not self.reuse, ctx=source_ctx)
            sim = explanation_similarity(maps if p.differentiable else maps.detach(), y, p.similarity)
        return sim if p.differentiable else sim.detach()

    def _update(self, r: torch.Tensor, labels: torch.Tensor, k: int) -> None:
        """The class EMA towards this step's class means of the (n, K) explained r."""
        sums, counts = class_sums(r, labels, k)
        seen = counts > 0
        means = sums[seen] / counts[seen, None]
        self.class_matrix[seen] = self.params.ema * self.class_matrix[seen] + (1 - self.params.ema) * means

    def state_dict(self) -> StateDict:
        """The class EMA 'class_matrix' (K, K) (None unless scheduled, and before the first step)
        and a frozen explainer's memo ('memo_keys' (N, L) uint8, 'memo_values' (N, K),
        'memo_digest' (32,) uint8; None while empty): the EMA and the memo make a schedule and a
        teacher explainer resume bit for bit."""
        state: StateDict = {"class_matrix": self.class_matrix}
        return {**state, **self._memo.state()} if self.memoizes else state

    def load_state_dict(self, state: StateDict) -> None:
        """Restore ``state_dict()``'s output (the EMA cloned: it is updated in place). The epoch's
        statistics that older checkpoints also hold (measured at each epoch's end, so reset in any
        checkpoint) are the measurements' now, and are ignored."""
        want = {"class_matrix"}
        if not want <= set(state) <= want | set(MEMO_STATE) | set(EPOCH_STATISTICS):
            raise ValueError(f"explanation structure state has keys {sorted(state)}, expected {sorted(want)} "
                             f"(and, for a frozen explainer, {', '.join(MEMO_STATE)})")
        matrix = state["class_matrix"]
        self.class_matrix = matrix.clone() if isinstance(matrix, torch.Tensor) and self.scheduled else None
        self._memo.load(state)


# What checkpoints of this structure held before ``kdablate.measures`` measured its similarity.
EPOCH_STATISTICS = ("epoch_sums", "epoch_counts", "seconds", "steps")
