"""Forward-mode products of piecewise-linear networks, by their linearization.

A network built of affine layers (linear, convolution, eval-mode batch norm), ReLUs and
linear glue (reshapes, sums, means, average pooling) is piecewise linear: on the activation
pattern of x, J(x) v is the same network applied to v with every offset (bias, batch norm's
shift) removed and every ReLU replaced by its mask at x (the linear regions of ReLU networks:
Montúfar et al. 2014; the products themselves: Pearlmutter 1994). ``recording`` takes x's
pattern (each ReLU call's mask) from a forward the caller runs anyway, the true class's map's for
the sketch, and ``jvp_at`` computes J v for m directions in one forward over the m B direction
rows alone, each affine leaf run without its offset and each ReLU call as its recorded mask:
one batched pass, where ``torch.func.jvp`` under ``vmap`` pays its per-op dispatch overhead on
every op. ``jvp_rows`` runs the pattern's forward itself, for callers that have none.

Only networks whose every module is known are linearized (``supported``): leaf modules of the
exact types below, and containers whose own ``forward`` is linear glue, which is
``nn.Sequential`` or a class whose ``forward`` is declared ``linear_glue = True``
(``declares_glue``). A ``torch.relu`` written in a ``forward`` would be invisible to the pass,
so an undeclared container is refused (the zoo's MobileNetV2 and ShuffleNets; VGG for its max
pooling), and the explanation structure's load-time check compares the two paths on the first
training inputs, so a wrong declaration fails before any cell trains.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Linear, without an offset (and dropout in eval mode, ``_known``).
PLAIN = (nn.Flatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _known(module: nn.Module) -> bool:
    kind = type(module)
    if "forward" in vars(module):  # a forward set on the instance is code of its own, not its type's
        return False
    if kind is nn.Dropout:  # the identity only in eval mode
        return not module.training
    if kind in AFFINE or kind in PLAIN or kind is nn.Sequential:
        return True
    if kind is nn.ReLU:  # in place, it overwrites its input, which a model may still read (no model here needs it)
        return not module.inplace
    if kind in NORMS:  # per row only with running statistics, in eval mode
        return module.track_running_stats and not module.training
    # Glue owns no tensors: a parameter its forward added would be an offset the pass keeps.
    owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    return declares_glue(kind) and not owns


def declares_glue(kind: type) -> bool:
    """Whether ``kind``'s ``forward`` is declared linear glue: the nearest ``linear_glue`` among the
    class that writes that ``forward`` and its subclasses in ``kind``'s MRO. So a subclass inherits
    the declaration with the forward (or makes one for it) and loses it by writing a forward of its
    own, and a mixin that declares it cannot vouch for a forward it does not derive from. A method
    the forward calls is part of it: a subclass that overrides one must restate the declaration."""
    owner = next((c for c in kind.__mro__ if "forward" in vars(c)), None)
    for c in kind.__mro__:
        if owner is not None and issubclass(c, owner) and "linear_glue" in vars(c):
            return vars(c)["linear_glue"] is True
    return False


def _walk(model: nn.Module) -> tuple[bool, list[nn.Module]]:
    """One walk over ``model``: whether every module is known, and the leaves a linearized pass replaces."""
    modules = list(model.modules())
    leaves = [m for m in modules if type(m) in AFFINE or type(m) in NORMS or type(m) is nn.ReLU]
    return all(_known(m) for m in modules), leaves


def supported(model: nn.Module) -> bool:
    """Whether ``jvp_rows`` holds for ``model`` as it is now (eval mode): every module known."""
    return _walk(model)[0]


def _state(model: nn.Module) -> tuple:
    """What a pattern depends on beyond the inputs: the mode, and each weight and buffer by identity
    and version (an optimiser step or a load bumps the version)."""
    return model.training, tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


class Pattern:
    """The activation pattern of one forward of ``model`` over B rows: each ReLU call's mask, in call
    order (a ReLU module called twice gives two), the rows it was taken at and the model's state, so
    that a later pass over directions is linearized at exactly those rows or not at all (``jvp_at``).
    ``linear`` is False where the model is not ``supported``: nothing is recorded, and the products
    go to forward mode without asking again. Use it within the step that recorded it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linear, self.leaves = _walk(model)
        self.masks: list[torch.Tensor] = []
        self.calls, self.depth, self.version = 0, 0, -1
        self.inputs: torch.Tensor | None = None
        self.state = _state(model) if self.linear else ()

    def holds_for(self, model: nn.Module, inputs: torch.Tensor) -> bool:
        """Whether this is ``model``'s pattern at ``inputs``, as they are now: one recorded forward of
        these very rows, neither they nor the model changed since."""
        x = self.inputs
        if not (self.linear and model is self.model and self.calls == 1 and x is not None
                and x._version == self.version and x.shape == inputs.shape and _state(model) == self.state):
            return False
        # The same memory, unwritten since (the version): equal without reading it (~70 us on a CPU).
        same = x.data_ptr() == inputs.data_ptr() and x.stride() == inputs.stride() and x.dtype == inputs.dtype
        return same or torch.equal(x, inputs.detach())


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Pattern]:
    """Within: the forwards of ``model`` record its ``Pattern`` (yielded; ``linear`` False, and nothing
    recorded, where ``model`` is not ``supported``). The forward itself is left as it is (the hooks
    only read), so the pattern comes free with a forward the caller needs anyway, such as the true
    class's map's. Only ReLU calls inside a call of ``model`` itself count."""
    pattern = Pattern(model)
    if not pattern.linear:
        yield pattern
        return

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pattern.depth += 1

    def leave(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        pattern.depth, pattern.calls = pattern.depth - 1, pattern.calls + 1
        x = args[0] if args else None
        pattern.inputs = x.detach() if isinstance(x, torch.Tensor) else None
        pattern.version = x._version if isinstance(x, torch.Tensor) else -1

    def relu(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if pattern.depth:
            pattern.masks.append(args[0].detach() > 0)  # torch's own ReLU derivative: 1 where x > 0

    hooks = [model.register_forward_pre_hook(enter, with_kwargs=True),
             model.register_forward_hook(leave, with_kwargs=True)]
    hooks += [m.register_forward_hook(relu) for m in pattern.leaves if type(m) is nn.ReLU]
    try:
        yield pattern
    finally:
        for h in hooks:
            h.remove()


def _linear_part(module: nn.Module, relu: Callable[[torch.Tensor], torch.Tensor]) -> Callable | None:
    """The forward of ``module``'s linear part at the pattern (``relu`` for a ReLU), or None where the
    module is linear already (glue, pooling, eval-mode dropout)."""
    if type(module) is nn.ReLU:
        return relu
    if type(module) is nn.Linear:
        return lambda t: F.linear(t, module.weight)
    if type(module) in AFFINE:
        return lambda t: module._conv_forward(t, module.weight, None)
    if type(module) in NORMS:  # eval mode (``supported``): a per-channel scale once the shift is off
        scale = torch.rsqrt(module.running_var + module.eps)
        scale = scale if module.weight is None else scale * module.weight
        return lambda t: t * scale.view(-1, *[1] * (t.dim() - 2))
    return None


@contextlib.contextmanager
def _linearized(pattern: Pattern) -> Iterator[None]:
    """Within: the pattern's model computes J v on rows of directions (laid out (m, B)): each affine
    leaf runs without its offset and each ReLU call multiplies by the recorded mask of the same call.
    The leaves' ``forward`` is replaced for the pass, not post-processed by hooks: no offset added and
    taken off again (which would round a small direction away), and no pass more than a forward's."""
    rows, calls = len(pattern.inputs), iter(pattern.masks)
    mismatch = RuntimeError("a linearized pass took another path through the model than its pattern's forward")

    def relu(t: torch.Tensor) -> torch.Tensor:
        mask, t = next(calls, None), t.unflatten(0, (-1, rows))
        if mask is None or mask.shape != t.shape[1:]:  # not the recorded forward: never a silent mismatch
            raise mismatch
        return (t * mask.to(t.dtype)).flatten(0, 1)  # bool masks: a quarter of the memory

    parts = [(m, f) for m in pattern.leaves if (f := _linear_part(m, relu)) is not None]
    for module, forward in parts:
        module.forward = forward  # an instance attribute, found before the class's forward
    try:
        yield
        if next(calls, None) is not None:
            raise mismatch
    finally:
        for module, _ in parts:
            del module.forward


def jvp_at(pattern: Pattern, tangents: torch.Tensor) -> torch.Tensor:
    """(m, B, *S) tangents at the pattern's B rows -> (B, K, m) J_b t_jb in one forward over the m B
    direction rows alone. Each direction runs at norm sqrt(D) and its product is scaled back (J is
    linear): the true class's map can be ~1e-7 an entry, which half precision would flush to zero."""
    rows = None if pattern.inputs is None else tuple(pattern.inputs.shape)
    if not pattern.linear or tangents.shape[1:] != rows:
        raise ValueError(f"tangents {tuple(tangents.shape)} are not directions at the pattern's rows {rows}")
    m, b = tangents.shape[:2]
    norms = tangents.flatten(2).norm(dim=2).clamp_min(1e-30) * tangents[0, 0].numel() ** -0.5  # (m, B)
    unit = tangents / norms.view(m, b, *[1] * (tangents.dim() - 2))
    with _linearized(pattern):
        out = pattern.model(unit.flatten(0, 1))
    return (out.unflatten(0, (m, b)) * norms[..., None]).permute(1, 2, 0)


def jvp_rows(model: nn.Module, inputs: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor | None:
    """(B, *S) inputs, (m, B, *S) tangents -> (B, K, m) J_b t_jb: a forward over the B rows for their
    pattern, then ``jvp_at``; or None where ``model`` (as it is now, eval mode) is not ``supported``:
    the caller then takes forward mode."""
    with recording(model) as pattern, torch.no_grad():
        if not pattern.linear:
            return None
        model(inputs)
    return jvp_at(pattern, tangents)
