"""kdablate's losses against values computed by other implementations, in float64.

Golden cases (tests/golden/README.md): mdistiller's ``kd_loss`` and ``dkd_loss``,
torchdistill's ``KDLoss`` and an exact log-space DKD for confident logits. Every case
is computed here with kdablate's own components and objectives, and its loss and its
gradient with respect to the student's logits are checked to 1e-10.

Label smoothing at T != 1 through the fused loss node is checked against torch's own
``F.kl_div`` / ``F.cross_entropy`` under autograd: no golden file holds it, and it is
where a wrong T factor in ``_FusedSoftTargetLoss.backward`` would show.
"""
from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdablate.components import TargetContext
from kdablate.config import KnowledgeConfig
from kdablate.objectives import SoftTargetObjective, build_objective, dkd_parts

GOLDEN = json.loads((Path(__file__).parent / "golden" / "kd_losses.json").read_text())
CASES = GOLDEN["cases"]
TOL = {"rtol": 1e-10, "atol": 1e-10}


def ids(kinds: tuple[str, ...]) -> list:
    return [pytest.param(c, id=f"{c['kind']}-{i}") for i, c in enumerate(CASES) if c["kind"] in kinds]


def tensors(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K) student logits (a leaf that requires grad), (B, K) teacher logits, (B,) labels,
    (B, K) the golden gradient; all float64."""
    s = torch.tensor(case["student_logits"], dtype=torch.float64, requires_grad=True)
    t = torch.tensor(case["teacher_logits"], dtype=torch.float64)
    return s, t, torch.tensor(case["labels"]), torch.tensor(case["grad_student_logits"], dtype=torch.float64)


def soft_target(mass: dict, structure: dict, temperature: float, alpha: float) -> SoftTargetObjective:
    """The soft-target objective of a cell with this mass, structure, T and alpha."""
    return build_objective(KnowledgeConfig(mass=mass, structure=structure, temperature=temperature, alpha=alpha))


def check(loss: torch.Tensor, s: torch.Tensor, case: dict, grad: torch.Tensor) -> None:
    (g,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float64), **TOL)
    torch.testing.assert_close(g, grad, **TOL)


def test_the_golden_file_is_the_documented_one():
    assert len(CASES) == 24 and "float64" in GOLDEN["about"]
    kinds = {c["kind"] for c in CASES}
    assert kinds == {"kd", "kd_mixed", "dkd", "dkd_confident"}, "a new kind needs a test below"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("case", ids(("kd", "kd_mixed")))
def test_kd_matches_mdistiller_and_torchdistill(case, fused):
    """Hinton KD = teacher mass + teacher structure. mdistiller's kd_loss is the KD term
    alone (alpha = 1 here); torchdistill's KDLoss is (1 - alpha) CE + alpha T^2 KL, the
    meaning of kdablate's alpha."""
    s, t, y, grad = tensors(case)
    T, alpha = case["params"]["T"], case["params"]["alpha"]
    kd = soft_target({"name": "teacher"}, {"name": "teacher"}, T, alpha)
    ctx = TargetContext(y, s.shape[1], s.detach(), t)
    # A target that requires grad takes the plain autograd path; a constant one the fused node.
    ctx = dataclasses.replace(ctx, target=kd.target(ctx).detach().requires_grad_(not fused))
    loss = kd(s, ctx)["loss"]
    assert ("Fused" in type(loss.grad_fn).__name__) == fused
    check(loss, s, case, grad)


@pytest.mark.parametrize("case", ids(("dkd", "dkd_confident")))
def test_dkd_matches_mdistiller_and_the_exact_log_space_dkd(case):
    """The goldens are mdistiller's dkd_loss, alpha TCKD + beta NCKD without the CE."""
    s, t, y, grad = tensors(case)
    p = case["params"]
    tckd, nckd = dkd_parts(s, t, y, p["T"])
    check(p["alpha"] * tckd + p["beta"] * nckd, s, case, grad)


@pytest.mark.parametrize("case", ids(("dkd", "dkd_confident")))
def test_dkd_objective_is_ce_plus_mdistillers_dkd_loss(case):
    """mdistiller's DKD distiller adds CE (CE_WEIGHT 1) to dkd_loss; so does the objective."""
    s, t, y, grad = tensors(case)
    p = case["params"]
    knowledge = KnowledgeConfig(objective={"name": "dkd", "beta": p["beta"]}, temperature=p["T"], alpha=p["alpha"])
    parts = build_objective(knowledge)(s, TargetContext(y, s.shape[1], s.detach(), t))
    torch.testing.assert_close(parts["loss_kd"], torch.tensor(case["loss"], dtype=torch.float64), **TOL)
    (g,) = torch.autograd.grad(parts["loss"], s)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s, y), s)
    torch.testing.assert_close(g, grad + g_ce, **TOL)


@pytest.mark.parametrize("T", [2.0, 4.0])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_label_smoothing_at_temperature_through_the_fused_node(T, alpha):
    """constant mass + uniform structure at T != 1: the fused node's loss and gradient against
    (1 - alpha) CE + alpha T^2 KL(q || softmax(z/T)) written with torch's losses, q explicit.

    K = 9 so that 1/(K-1) is exact in float32 too (the uniform structure follows the logits'
    dtype; see the next test).
    """
    eps, k = 0.25, 9
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (16,), generator=g)
    ls = soft_target({"name": "constant", "eps": eps}, {"name": "uniform"}, T, alpha)
    s1 = z.clone().requires_grad_()
    out = ls(s1, TargetContext(y, k, z))["loss"]
    assert "Fused" in type(out.grad_fn).__name__
    q = torch.full_like(z, eps / (k - 1)).scatter_(1, y[:, None], 1 - eps)
    s2 = z.clone().requires_grad_()
    ref = (1 - alpha) * F.cross_entropy(s2, y) + alpha * T**2 * F.kl_div(
        F.log_softmax(s2 / T, 1), q, reduction="batchmean")
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out, s1)[0], torch.autograd.grad(ref, s2)[0], **TOL)


def test_uniform_structure_follows_the_logits_dtype(batch):
    z = batch["student"].double()
    ls = soft_target({"name": "constant", "eps": 0.2}, {"name": "uniform"}, 4.0, 1.0)
    q = ls.target(TargetContext(batch["labels"], 10, z))
    exact = torch.full_like(z, 0.2 / 9).scatter_(1, batch["labels"][:, None], 0.8)
    torch.testing.assert_close(q, exact, rtol=1e-15, atol=0)
