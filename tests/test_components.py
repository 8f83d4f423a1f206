"""Identities of the knowledge components, and invariants checked over every registered plugin."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kdablate.components import MASSES, STRUCTURES, Need, TargetContext, assemble_target, soft_target_loss
from kdablate.components.structure import permute_nongt
from kdablate.config import KnowledgeConfig
from kdablate.objectives import SoftTargetObjective, build_objective


def soft_target(mass: dict, structure: dict, temperature: float, alpha: float) -> SoftTargetObjective:
    """The soft-target objective of a cell with this mass, structure, T and alpha."""
    return build_objective(KnowledgeConfig(mass=mass, structure=structure, temperature=temperature, alpha=alpha))


def ctx_for(batch: dict, seed: int = 0) -> TargetContext:
    """Every source a component may read: teacher and peer logits, inputs, models, features."""
    return TargetContext(batch["labels"], batch["k"], batch["student"], batch["teacher"],
                         (torch.Generator().manual_seed(seed),), peer_logits=batch["peer"], inputs=batch["inputs"],
                         models=batch["models"], features=batch["features"], class_groups=batch["groups"])


@pytest.mark.parametrize("mass,structure", list(itertools.product(MASSES.names(), STRUCTURES.names())))
def test_every_target_is_a_distribution(batch, mass, structure):
    obj = soft_target({"name": mass}, {"name": structure}, 4.0, 0.9)
    ctx = ctx_for(batch)
    m, r, q = obj.mass(ctx, 4.0), obj.structure(ctx, 4.0), obj.target(ctx)
    y = batch["labels"]
    assert q.shape == (16, 10)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16))
    torch.testing.assert_close(q.gather(1, y[:, None]).squeeze(1), 1 - m)
    assert ((m >= 0) & (m <= 1)).all()
    # The structure lives off the true class only and is a distribution there.
    assert (r.gather(1, y[:, None]) == 0).all()
    torch.testing.assert_close(r.sum(1), torch.ones(16))


def test_teacher_mass_and_structure_is_hinton_kd(batch):
    T, alpha = 4.0, 0.9
    obj = soft_target({"name": "teacher"}, {"name": "teacher"}, T, alpha)
    ctx = ctx_for(batch)
    p_t = torch.softmax(batch["teacher"] / T, 1)
    torch.testing.assert_close(obj.target(ctx), p_t, rtol=0, atol=1e-6)
    s = batch["student"].clone().requires_grad_()
    ours = obj(s, ctx)["loss"]
    hinton = (1 - alpha) * F.cross_entropy(s, batch["labels"]) + alpha * T**2 * (
        p_t * (p_t.log() - F.log_softmax(s / T, 1))
    ).sum(1).mean()
    torch.testing.assert_close(ours, hinton, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ls", [0.05, 0.1, 0.3])
def test_constant_mass_uniform_structure_is_label_smoothing(batch, ls):
    """torch's label_smoothing=ls puts ls/K on every class, so eps = ls * (K-1)/K.

    At T=1, alpha=1 the KL loss is the smoothed CE minus the (constant) entropy of
    q, so the values differ by H(q) and the gradients are identical.
    """
    k = batch["k"]
    eps = ls * (k - 1) / k
    obj = soft_target({"name": "constant", "eps": eps}, {"name": "uniform"}, 1.0, 1.0)
    ctx = ctx_for(batch)
    q = obj.target(ctx)
    s1 = batch["student"].clone().requires_grad_()
    s2 = batch["student"].clone().requires_grad_()
    ours = obj(s1, ctx)["loss"]
    torch_ls = F.cross_entropy(s2, batch["labels"], label_smoothing=ls)
    entropy = -(q * q.log()).sum(1).mean()
    torch.testing.assert_close(ours, torch_ls - entropy, rtol=1e-6, atol=1e-6)
    ours.backward()
    torch_ls.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mass,structure", [("teacher", "teacher"), ("constant", "permuted"), ("none", "uniform")])
def test_alpha_zero_is_plain_ce(batch, mass, structure):
    obj = soft_target({"name": mass}, {"name": structure}, 4.0, 0.0)
    s1 = batch["student"].clone().requires_grad_()
    s2 = batch["student"].clone().requires_grad_()
    # No teacher in the context: alpha=0 must not need one.
    ctx = TargetContext(batch["labels"], batch["k"], batch["student"])
    ours = obj(s1, ctx)["loss"]
    ce = F.cross_entropy(s2, batch["labels"])
    assert torch.equal(ours, ce)
    ours.backward()
    ce.backward()
    assert torch.equal(s1.grad, s2.grad)
    assert obj.needs == Need.NONE


def test_permuted_keeps_values_and_mass_but_moves_them(batch):
    ctx = ctx_for(batch)
    teacher = soft_target({"name": "teacher"}, {"name": "teacher"}, 4.0, 0.9)
    permuted = soft_target({"name": "teacher"}, {"name": "permuted"}, 4.0, 0.9)
    q_t, q_p = teacher.target(ctx), permuted.target(ctx)
    y = batch["labels"]
    # Same mass, same multiset of non-ground-truth values, per sample.
    torch.testing.assert_close(q_p.gather(1, y[:, None]), q_t.gather(1, y[:, None]))
    torch.testing.assert_close(q_p.sort(1).values, q_t.sort(1).values)
    # ...but assigned to other classes in (almost) every row.
    assert (q_p != q_t).any(1).float().mean() > 0.8


def test_permutation_is_fresh_per_step_and_reproducible_per_seed(batch):
    r = torch.softmax(batch["teacher"], 1)
    y = batch["labels"]
    def ctx(seed: int) -> TargetContext:
        return TargetContext(y, r.shape[1], r, generators=(torch.Generator().manual_seed(seed),))

    k, first = r.shape[1], ctx(3)
    a, b = permute_nongt(r, y, first.uniform(k - 1)), permute_nongt(r, y, first.uniform(k - 1))
    assert not torch.equal(a, b)
    c = permute_nongt(r, y, ctx(3).uniform(k - 1))
    assert torch.equal(a, c)


def test_teacher_components_declare_their_source():
    assert soft_target({"name": "teacher"}, {"name": "uniform"}, 4.0, 0.5).needs == Need.TEACHER
    assert soft_target({"name": "constant"}, {"name": "permuted"}, 4.0, 0.5).needs == Need.TEACHER
    assert soft_target({"name": "constant"}, {"name": "uniform"}, 4.0, 0.5).needs == Need.NONE


def test_assemble_and_loss_shapes_and_zero_entries():
    y = torch.tensor([0, 2])
    q = assemble_target(torch.tensor([0.0, 0.5]), torch.tensor([[0, 0.5, 0.5], [1.0, 0, 0]]), y)
    torch.testing.assert_close(q, torch.tensor([[1.0, 0, 0], [0.5, 0, 0.5]]))
    out = soft_target_loss(torch.zeros(2, 3), y, q, 2.0, 0.5)
    assert set(out) == {"loss", "loss_ce", "loss_kd"}
    assert all(torch.isfinite(v) for v in out.values())


def test_oracle_structure_splits_mass_by_superclass(batch):
    from kdablate.components.structure import oracle_structure

    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    r = oracle_structure(torch.tensor([0, 3, 5]), groups, within=0.8)
    torch.testing.assert_close(r[0], torch.tensor([0, 0.4, 0.4, 0.2 / 3, 0.2 / 3, 0.2 / 3]))
    torch.testing.assert_close(r[1], torch.tensor([0.05, 0.05, 0.05, 0, 0.8, 0.05]))
    torch.testing.assert_close(r[2], torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0]))  # a superclass of one
    obj = soft_target({"name": "constant", "eps": 0.5}, {"name": "oracle", "within": 1.0}, 1.0, 1.0)
    ctx = ctx_for(batch)
    q = obj.target(ctx)
    same = batch["groups"][batch["labels"]][:, None] == batch["groups"][None]
    assert torch.allclose((q * ~same).sum(1)[batch["labels"] != 9], torch.tensor(0.0))
