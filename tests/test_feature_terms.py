"""Feature and relation terms (``kdablate.components.feature``), parametrized over every registered
term: a finite loss from real models' features whose gradient reaches the student and never the
teacher; the refusals at load; CRD's NCE loss against the paper's formula written out, and its
memory bank's momentum update."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdablate import feature_losses as fl
from kdablate.components.feature import FEATURE_TERMS, TermBatch
from kdablate.models import build_model
from kdablate.models.stages import extract, stage_ends

PAIRS = {"1-D CNNs": ("cnn1d", {"channels": 8, "depth": 2}, "cnn1d", {"channels": 16, "depth": 2}, (1, 40)),
         "CIFAR ResNets": ("resnet8", {}, "resnet20", {}, (3, 32, 32))}


def features(name: str, params: dict, shape: tuple[int, ...], x: torch.Tensor):
    torch.manual_seed(0)
    model = build_model(name, params, shape, 10)
    return model, extract(model, x, stage_ends(model, shape))


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("name", FEATURE_TERMS.names())
def test_every_term_gives_a_finite_loss_whose_gradient_reaches_the_student_only(name, pair):
    s_name, s_params, t_name, t_params, shape = PAIRS[pair]
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    student, fs = features(s_name, s_params, shape, x)
    teacher, ft = features(t_name, t_params, shape, x)
    term = FEATURE_TERMS.build(name, {"nce_k": 16} if name == "crd" else {})
    assert term.refusal(fs, ft) == ""
    term.bind(fs, ft, num_samples=100)
    loss = term.loss(fs, ft, TermBatch(torch.arange(8), torch.Generator().manual_seed(2)))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert term.weight == FEATURE_TERMS.get(name).Params().weight


def test_terms_that_cannot_read_the_models_say_why():
    x = torch.randn(4, 1, 40)
    _, mlp = features("mlp", {}, (1, 40), x)
    _, cnn = features("cnn1d", {}, (1, 40), x)
    assert "spatial feature maps" in FEATURE_TERMS.build("at").refusal(mlp, cnn)
    assert "hint stage 9 does not exist in the student" in FEATURE_TERMS.build("fitnet", {"hint": 9}).refusal(cnn, cnn)
    assert "differ in kind" in FEATURE_TERMS.build("fitnet", {"hint": 1}).refusal(mlp, cnn)
    assert FEATURE_TERMS.build("rkd").refusal(mlp, cnn) == ""  # pooled features: any two models


def direct_nce(scores: torch.Tensor, n: int, eps: float = 1e-7) -> float:
    """The NCE loss of CRD (Tian et al., ICLR 2020, eq. 11 with a uniform noise Pn = 1/N), element by element."""
    k, total = scores.shape[1] - 1, 0.0
    for row in scores.tolist():
        total += math.log(row[0] / (row[0] + k / n + eps))
        total += sum(math.log((k / n) / (x + k / n + eps)) for x in row[1:])
    return -total / len(scores)


def test_crd_nce_loss_is_the_papers_formula_on_a_small_bank():
    g = torch.Generator().manual_seed(3)
    n, b, k, d, t = 20, 4, 6, 5, 0.07
    memory = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64))
    anchor = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64))
    contrast = torch.cat([torch.arange(b)[:, None], torch.randint(n, (b, k), generator=g)], 1)
    scores = fl.contrast_scores(anchor, memory, contrast, t)
    for i in range(b):
        for j in range(k + 1):
            want = math.exp(sum(memory[contrast[i, j], c].item() * anchor[i, c].item() for c in range(d)) / t)
            assert scores[i, j].item() == pytest.approx(want, rel=1e-12)
    z = scores.mean() * n
    assert fl.nce_loss(scores / z, n).item() == pytest.approx(direct_nce(scores / z, n), rel=1e-12)


def test_crd_memory_update_is_the_momentum_average_kept_at_unit_length():
    g = torch.Generator().manual_seed(4)
    memory = F.normalize(torch.randn(10, 3, generator=g, dtype=torch.float64))
    before, emb, idx = memory.clone(), torch.randn(2, 3, generator=g, dtype=torch.float64), torch.tensor([7, 2])
    fl.momentum_update(memory, idx, emb, 0.5)
    for row, i in enumerate(idx.tolist()):
        mixed = 0.5 * before[i] + 0.5 * emb[row]
        torch.testing.assert_close(memory[i], mixed / mixed.norm(), rtol=1e-12, atol=1e-12)
    untouched = [i for i in range(10) if i not in (7, 2)]
    assert torch.equal(memory[untouched], before[untouched])
