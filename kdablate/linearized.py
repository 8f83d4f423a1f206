"""Forward-mode products of piecewise-linear networks, by their linearization.

A network built of affine layers (linear, convolution, eval-mode batch norm), ReLUs and
linear glue (reshapes, sums, means, average pooling) is piecewise linear: on the activation
pattern of x, J(x) v is the same network applied to v with every offset (bias, batch norm's
shift) removed and every ReLU replaced by its mask at x (the linear regions of ReLU networks:
Montúfar et al. 2014; the products themselves: Pearlmutter 1994). ``jvp_rows`` computes J v
for m directions in one forward over the rows [x; v_1; ...; v_m], with hooks that take the
offsets off the direction rows and mask them at each ReLU by the x rows' signs: one batched
pass, where ``torch.func.jvp`` under ``vmap`` pays its per-op dispatch overhead on every op.

Only networks whose every module is known are linearized (``supported``): leaf modules of the
exact types below, and containers whose own ``forward`` is linear glue, which is
``nn.Sequential`` or a class that declares ``linear_glue = True`` itself. A ``torch.relu``
written in a ``forward`` would be invisible to the hooks, so an undeclared container is refused
(the CIFAR ResNets' blocks), and the explanation structure's load-time check compares the two
paths on the first training inputs, so a wrong declaration fails before any cell trains.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Linear, without an offset (and dropout in eval mode, ``_known``).
PLAIN = (nn.Flatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _known(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.Dropout:  # the identity only in eval mode
        return not module.training
    if kind in AFFINE or kind in PLAIN or kind is nn.Sequential:
        return True
    if kind is nn.ReLU:  # in place, it would overwrite the direction rows before the hook sees them
        return not module.inplace
    if kind in NORMS:  # per row only with running statistics, in eval mode
        return module.track_running_stats and not module.training
    # Glue owns no tensors: a parameter its forward added would be an offset no hook removes.
    owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    return vars(kind).get("linear_glue", False) is True and not owns


def supported(model: nn.Module) -> bool:
    """Whether ``jvp_rows`` holds for ``model`` as it is now (eval mode): every module known."""
    return all(_known(m) for m in model.modules())


def offset(module: nn.Module) -> torch.Tensor | None:
    """(C,) the constant term of an affine leaf (its bias; batch norm's beta - gamma mu / sigma), or None."""
    if type(module) in NORMS:
        shift = -module.running_mean / torch.sqrt(module.running_var + module.eps)
        return shift if module.weight is None else module.bias + module.weight * shift
    return getattr(module, "bias", None) if type(module) in AFFINE else None


@contextlib.contextmanager
def _linearizing(model: nn.Module, primal: int) -> Iterator[None]:
    """Hooks on ``model``'s leaves: rows past the first ``primal`` lose each offset and take each
    ReLU's mask of the primal row they are a direction of (rows laid out (1 + m, primal))."""

    def affine(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        c = offset(module)
        if c is None:
            return out
        # A linear layer's features are the last dim; a convolution's and a norm's channels dim 1.
        shape = (-1,) if type(module) is nn.Linear else (-1,) + (1,) * (out.dim() - 2)
        return torch.cat([out[:primal], out[primal:] - c.view(shape)])

    def relu(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        mask = (x[:primal] > 0).to(x.dtype)  # torch's own ReLU derivative: 1 where x > 0
        tangents = x[primal:].unflatten(0, (-1, primal)) * mask
        return torch.cat([out[:primal], tangents.flatten(0, 1)])

    hooks = [m.register_forward_hook(relu if type(m) is nn.ReLU else affine)
             for m in model.modules() if type(m) is nn.ReLU or offset(m) is not None]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def jvp_rows(model: nn.Module, inputs: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor | None:
    """(B, *S) inputs, (m, B, *S) tangents -> (B, K, m) J_b t_jb in one forward over (1 + m) B rows,
    or None where ``model`` (as it is now, eval mode) is not ``supported``: the caller then takes
    forward mode. Each direction is scaled to norm sqrt(D) for the pass and the product scaled
    back (J is linear), so removing an offset never swamps a small direction (the true class's
    gradient can be tiny next to a bias)."""
    if not supported(model):  # checked here only: the one walk over the modules a call pays
        return None
    m, b = tangents.shape[:2]
    norms = tangents.flatten(2).norm(dim=2).clamp_min(1e-30) / math.sqrt(inputs[0].numel())  # (m, B)
    unit = tangents / norms.view(m, b, *[1] * (tangents.dim() - 2))
    with _linearizing(model, b):
        out = model(torch.cat([inputs, unit.flatten(0, 1)]))
    return (out[b:].unflatten(0, (m, b)) * norms[..., None]).permute(1, 2, 0)
