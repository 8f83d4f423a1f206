"""Feature and relation losses against mdistiller's own values (tests/golden/feature_losses.json,
a byte-identical copy of the shared golden file): every case's loss and its gradient with respect
to the student's features, to 1e-10 in float64."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdablate import feature_losses as fl

GOLDEN = json.loads((Path(__file__).parent / "golden" / "feature_losses.json").read_text())
TOL = {"rtol": 1e-10, "atol": 1e-10}

# kind -> (the loss of kdablate's for its stages of student and teacher features, the case's params)
LOSSES = {
    "at": lambda s, t, p: fl.attention_transfer(s, t, p["p"]),
    "sp": lambda s, t, p: fl.similarity_preserving(s[0], t[0]),
    "rkd": lambda s, t, p: fl.relational(s[0], t[0], p["distance_weight"], p["angle_weight"], p["squared"], p["eps"]),
    "pkt": lambda s, t, p: fl.probabilistic_transfer(s[0], t[0], p["eps"]),
    "fitnet_hint": lambda s, t, p: fl.fitnet_hint(s[0], t[0]),
}


def stages(values: list) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in values]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c['kind']}-{i}") for i, c in enumerate(GOLDEN["cases"])])
def test_loss_and_gradient_match_mdistiller(case):
    student = [s.requires_grad_() for s in stages(case["student_feats"])]
    teacher = stages(case["teacher_feats"])
    loss = LOSSES[case["kind"]](student, teacher, case["params"])
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float64), **TOL)
    grads = torch.autograd.grad(loss, student)
    for g, want in zip(grads, stages(case["grad_student_feats"])):
        torch.testing.assert_close(g, want, **TOL)


def test_every_case_kind_is_checked():
    assert {c["kind"] for c in GOLDEN["cases"]} == set(LOSSES) and len(GOLDEN["cases"]) == 14


def test_teacher_features_get_no_gradient():
    s, t = torch.randn(4, 8, 4, 4, requires_grad=True), torch.randn(4, 16, 4, 4, requires_grad=True)
    for loss in (fl.attention_transfer([s], [t]), fl.similarity_preserving(s, t),
                 fl.relational(s.mean((2, 3)), t.mean((2, 3))), fl.probabilistic_transfer(s.mean((2, 3)), t.mean((2, 3)))):
        loss.backward()
    assert t.grad is None and s.grad is not None
