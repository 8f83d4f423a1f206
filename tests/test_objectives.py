"""DKD against the DKD paper's formula (and in high precision for confident logits), the warm-up
ramps, DML on tiny data, and the new components' identities."""
from __future__ import annotations

import dataclasses

import math

import pytest
import torch
import torch.nn.functional as F

from kdablate.components import Need, TargetContext
from kdablate.components.mass import virtual_teacher_mass
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.objectives import SoftTargetObjective, build_objective, dkd_parts, entropy, warmup_ramp
from kdablate.trainer import TeacherSignal, fit


def soft_target(mass: dict, structure: dict, temperature: float, alpha: float) -> SoftTargetObjective:
    """The soft-target objective of a cell with this mass, structure, T and alpha."""
    return build_objective(KnowledgeConfig(mass=mass, structure=structure, temperature=temperature, alpha=alpha))


def dkd_by_the_paper(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float]:
    """Zhao et al. (CVPR 2022), eqs. 1-4, written out per sample in float64."""
    tckd = nckd = 0.0
    for zs, zt, t in zip(z_s.double(), z_t.double(), y.tolist()):
        ps, pt = torch.softmax(zs / T, 0), torch.softmax(zt / T, 0)
        bs, bt = [ps[t], 1 - ps[t]], [pt[t], 1 - pt[t]]
        tckd += sum(b_t * math.log(b_t / b_s) for b_t, b_s in zip(bt, bs))
        others = [i for i in range(len(zs)) if i != t]
        hs, ht = torch.softmax(zs[others] / T, 0), torch.softmax(zt[others] / T, 0)
        nckd += float((ht * (ht / hs).log()).sum())
    n = len(y)
    return float(tckd) / n * T**2, nckd / n * T**2


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_the_paper(batch, T):
    tckd, nckd = dkd_parts(batch["student"], batch["teacher"], batch["labels"], T)
    ref_t, ref_n = dkd_by_the_paper(batch["student"], batch["teacher"], batch["labels"], T)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-5) and nckd.item() == pytest.approx(ref_n, rel=1e-5)


def dkd_in_high_precision(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float]:
    """The paper's eqs. 1-4 per sample at 60 significant digits (mpmath), the non-target mass
    summed over the other classes as the paper defines it, so that nothing cancels."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    tckd = nckd = mp.mpf(0)
    for zs, zt, t in zip(z_s.double().tolist(), z_t.double().tolist(), y.tolist()):
        es, et = [mp.exp(mp.mpf(v) / T) for v in zs], [mp.exp(mp.mpf(v) / T) for v in zt]
        os, ot = (mp.fsum(e[c] for c in range(len(e)) if c != t) for e in (es, et))
        bs, bt = (es[t] / (es[t] + os), os / (es[t] + os)), (et[t] / (et[t] + ot), ot / (et[t] + ot))
        tckd += mp.fsum(b_t * mp.log(b_t / b_s) for b_t, b_s in zip(bt, bs))
        nckd += mp.fsum((et[c] / ot) * mp.log((et[c] / ot) / (es[c] / os)) for c in range(len(zs)) if c != t)
    return float(tckd / len(y) * T**2), float(nckd / len(y) * T**2)


def confident_logits(scale: float, dtype: torch.dtype, labels: str = "random",
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = 8, K = 100 student / teacher logits of scale ``scale``, and labels: 'random', or the
    'teacher' or 'student' argmax, whose p_y then rounds to 1 at T = 1."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(8, 100, generator=g, dtype=torch.float64) * scale for _ in range(2))
    y = {"random": torch.randint(0, 100, (8,), generator=g), "teacher": t.argmax(1), "student": s.argmax(1)}[labels]
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("labels", ["random", "teacher", "student"])
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale,T", [(40.0, 1.0), (40.0, 4.0), (150.0, 1.0)])
def test_dkd_is_exact_for_confident_logits(dtype, rel, scale, T, labels):
    """The old form, 1 - p_y and a log clamped at 1e-12, put TCKD off by 17% to 100% at T = 1
    here, in either dtype; both parts must now be right to ``rel``.

    Relative to values a dtype can hold: a TCKD below its smallest normal number (1e-43 in
    float32 at scale 150, random labels) has no relative precision to check.
    """
    s, t, y = confident_logits(scale, dtype, labels)
    tckd, nckd = dkd_parts(s, t, y, T)
    ref_t, ref_n = dkd_in_high_precision(s, t, y, T)
    tiny = torch.finfo(dtype).tiny
    assert tckd.dtype == dtype
    assert tckd.item() == pytest.approx(ref_t, rel=rel, abs=tiny) and nckd.item() == pytest.approx(ref_n, rel=rel, abs=tiny)


def test_dkd_gradient_is_right_for_confident_logits():
    s, t, _ = confident_logits(40.0, torch.float64)
    # gradcheck differentiates numerically: keep it small. Rows 0-1 are confident on y for the
    # student (p_y rounds to 1), row 2 for the teacher, row 3 for neither.
    s, t = s[:4, :12].clone(), t[:4, :12]
    y = torch.cat([s[:2].argmax(1), t[2:3].argmax(1), s[3:].argmin(1)])
    s.requires_grad_()

    def loss(z: torch.Tensor) -> torch.Tensor:
        tckd, nckd = dkd_parts(z, t, y, 1.0)
        return tckd + 8.0 * nckd

    assert torch.autograd.gradcheck(loss, (s,))


def test_dkd_gradient_is_right_where_target_and_non_target_tie():
    """K = 2 and a zero-initialised head: b = (1/2, 1/2), where the two branches of
    ``binary_log_probs`` meet."""
    s = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: dkd_parts(z, t, torch.tensor([0, 1, 0]), 1.0)[0], (s,))


def test_dkd_reformulates_kd_per_sample(batch):
    """The DKD paper's identity: KD = TCKD + (1 - p_t^T) NCKD, sample by sample."""
    T = 4.0
    for i in range(4):
        s, t, y = batch["student"][i : i + 1], batch["teacher"][i : i + 1], batch["labels"][i : i + 1]
        tckd, nckd = dkd_parts(s, t, y, T)
        p_t = torch.softmax(t / T, 1)
        kd = F.kl_div(F.log_softmax(s / T, 1), p_t, reduction="batchmean") * T**2
        torch.testing.assert_close(kd, tckd + (1 - p_t[0, y[0]]) * nckd, rtol=1e-5, atol=1e-6)


def test_dkd_objective_weights_tckd_by_alpha_and_nckd_by_beta(batch):
    method = build_objective(KnowledgeConfig(objective={"name": "dkd", "beta": 8.0}, temperature=4.0, alpha=1.0))
    ctx = TargetContext(batch["labels"], 10, batch["student"], batch["teacher"])
    parts = method(batch["student"], ctx)
    tckd, nckd = dkd_parts(batch["student"], batch["teacher"], batch["labels"], 4.0)
    ce = F.cross_entropy(batch["student"], batch["labels"])
    torch.testing.assert_close(parts["loss"], ce + 1.0 * tckd + 8.0 * nckd)
    assert method.needs == Need.TEACHER


def test_peer_components_are_kd_from_the_peer(batch):
    obj = soft_target({"name": "peer"}, {"name": "peer"}, 3.0, 0.5)
    ctx = TargetContext(batch["labels"], 10, batch["student"], peer_logits=batch["peer"])
    torch.testing.assert_close(obj.target(ctx), torch.softmax(batch["peer"] / 3.0, 1), rtol=0, atol=1e-6)
    assert obj.needs == Need.PEER


def test_self_mass_is_the_students_own_detached_mass(batch):
    obj = soft_target({"name": "self"}, {"name": "uniform"}, 4.0, 0.9)
    s = batch["student"].clone().requires_grad_()
    ctx = TargetContext(batch["labels"], 10, s)  # not detached on purpose: the mass must detach
    m = obj.mass(ctx, 4.0)
    p = torch.softmax(batch["student"] / 4.0, 1)
    torch.testing.assert_close(m, 1 - p.gather(1, batch["labels"][:, None]).squeeze(1))
    assert not m.requires_grad and obj.needs == Need.NONE


def test_virtual_teacher_mass_is_tfkd():
    # Yuan et al.: p^d = a on the true class, (1-a)/(K-1) elsewhere, softened by T.
    a, T, K = 0.9, 4.0, 10
    pd = torch.full((K,), (1 - a) / (K - 1))
    pd[0] = a
    assert virtual_teacher_mass(a, T, K) == pytest.approx(1 - torch.softmax(pd / T, 0)[0].item(), rel=1e-6)


def test_confidence_penalty_and_warmup(batch):
    y = batch["labels"]
    ctx = TargetContext(y, 10, batch["student"], step=0, steps_per_epoch=5)
    cp = build_objective(KnowledgeConfig(entropy_penalty=0.3))
    expected = F.cross_entropy(batch["student"], y) - 0.3 * entropy(batch["student"])
    torch.testing.assert_close(cp(batch["student"], ctx)["loss"], expected)
    ls = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, alpha=1.0, warmup_epochs=2)
    warm = build_objective(ls)  # ramps over 10 steps: 2 epochs of the context's 5
    ce = F.cross_entropy(batch["student"], y)
    first = warm(batch["student"], ctx)
    torch.testing.assert_close(first["loss"], 0.9 * ce + 0.1 * first["loss_kd"])
    ctx = dataclasses.replace(ctx, step=50)
    torch.testing.assert_close(warm(batch["student"], ctx)["loss"], first["loss_kd"])


def test_dml_trains_a_cohort_and_logs_both_students():
    data = load_dataset("mnist1d", {"num_samples": 400})
    dml = KnowledgeConfig(mass="peer", structure="peer", temperature=1.0, alpha=0.5)
    logs = []
    a = fit(ModelSpec(name="mlp", params={"hidden": 16}), data, OptimConfig(epochs=2, batch_size=32), dml, 0,
            on_epoch=lambda e, m: logs.append(m))
    b = fit(ModelSpec(name="mlp", params={"hidden": 16}), data, OptimConfig(epochs=2, batch_size=32), dml, 0)
    assert a.metrics == b.metrics
    assert {"val/acc", "member1/val_acc", "member1/train_loss_kd", "train/loss_kd"} <= set(logs[-1])
    assert logs[-1]["member1/val_acc"] != logs[-1]["val/acc"] or logs[-1]["member1/val_nll"] != logs[-1]["val/nll"]
    assert logs[-1]["train/loss_kd"] > 0


def test_il_logs_similarity_and_cost_and_spearman_with_teacher():
    data = load_dataset("mnist1d", {"num_samples": 400})
    teacher = TeacherSignal({s: torch.randn(len(data.split(s)[1]), 10) for s in ("train", "val", "test")})
    il = KnowledgeConfig(mass={"name": "constant", "eps": 0.3}, structure={"name": "explanation", "every": 2},
                         temperature=4.0, alpha=0.9)
    logs = []
    r = fit(ModelSpec(name="mlp", params={"hidden": 16}), data, OptimConfig(epochs=2, batch_size=32), il, 0,
            teacher=teacher, on_epoch=lambda e, m: logs.append(m))
    assert -1 <= logs[-1]["train/similarity_spearman"] <= 1 and logs[-1]["time/explain_ms"] > 0
    sim = r.artifacts["similarity_explanation"]
    assert sim.shape == (10, 10) and torch.allclose(sim.sum(1), torch.ones(10)) and (sim.diagonal() == 0).all()
    assert r.artifacts["similarity_teacher"].shape == (10, 10)


def test_warmup_ramps_per_step_and_per_epoch():
    # 2 warm-up epochs of 3 steps: per step 1/6 .. 6/6; per epoch 1/2 for epoch 1, then 1.
    assert [warmup_ramp(s, 2, 3, "step") for s in range(8)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0]
    assert [warmup_ramp(s, 2, 3, "epoch") for s in range(8)] == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert warmup_ramp(10**6, 0, 3, "epoch") == warmup_ramp(0, 0, 3, "step") == 1.0
    assert warmup_ramp(0, 2, 0, "epoch") == 0.5  # no full batch in the split: one step is one epoch


def test_epoch_warmup_is_mdistillers():
    """mdistiller's DKD.forward_train weighs the DKD loss by min(epoch / warmup, 1), epoch from 1."""
    spe, warmup = 7, 20
    for epoch in range(1, 26):
        for step in range((epoch - 1) * spe, epoch * spe):
            assert warmup_ramp(step, warmup, spe, "epoch") == min(epoch / warmup, 1.0)


@pytest.mark.parametrize("by,ramps", [("epoch", {0: 1 / 20, 2: 1 / 20, 3: 2 / 20, 59: 1.0, 60: 1.0}),
                                      ("step", {0: 1 / 60, 2: 3 / 60, 3: 4 / 60, 59: 1.0, 60: 1.0})])
def test_dkd_method_warms_up_the_dkd_term(batch, by, ramps):
    """loss = CE + ramp * (alpha TCKD + beta NCKD), the ramp per step or per epoch."""
    k = KnowledgeConfig(objective={"name": "dkd", "beta": 2.0}, temperature=4.0, alpha=1.0,
                        warmup_epochs=20, warmup_by=by)
    method = build_objective(k)
    y = batch["labels"]
    ce = F.cross_entropy(batch["student"], y)
    tckd, nckd = dkd_parts(batch["student"], batch["teacher"], y, 4.0)
    for step, ramp in ramps.items():
        ctx = TargetContext(y, 10, batch["student"], batch["teacher"], step=step, epoch=1 + step // 3,
                            steps_per_epoch=3)
        torch.testing.assert_close(method(batch["student"], ctx)["loss"], ce + ramp * (tckd + 2.0 * nckd))


def test_the_objective_owns_the_temperature(batch):
    """T lives on the objective only: the context carries none (it is frozen: nothing writes to it),
    a component takes T as an argument, and the objective hands its own T to its components."""
    kd = soft_target({"name": "teacher"}, {"name": "teacher"}, 3.0, 0.9)
    ctx = TargetContext(batch["labels"], 10, batch["student"], batch["teacher"])
    assert "temperature" not in {f.name for f in dataclasses.fields(TargetContext)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.target = None
    with pytest.raises(TypeError, match="temperature"):
        kd.mass(ctx)
    q = kd.target(ctx)
    torch.testing.assert_close(q, torch.softmax(batch["teacher"] / 3.0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(kd.mass(ctx, 3.0), 1 - torch.softmax(batch["teacher"] / 3.0, 1).gather(
        1, batch["labels"][:, None]).squeeze(1))
    tfkd = build_objective(KnowledgeConfig(mass={"name": "virtual_teacher", "a": 0.9}, structure="uniform",
                                        temperature=2.0, alpha=0.5))
    m = tfkd.target(TargetContext(batch["labels"], 10, batch["student"]))
    expected = virtual_teacher_mass(0.9, 2.0, 10)
    torch.testing.assert_close(1 - m.gather(1, batch["labels"][:, None]), torch.full((16, 1), expected))


def test_an_epoch_dependent_mass_is_one_class(monkeypatch):
    """The context carries the epoch and the steps per epoch, so a mass scheduled by epoch needs
    no edit elsewhere: here m = 0.1 * epoch, seen by the trainer's steps of each epoch."""
    from kdablate.components import MASSES
    from kdablate.components.context import Component

    monkeypatch.setattr(MASSES, "_entries", dict(MASSES._entries))
    seen: list[tuple[int, int]] = []

    @MASSES.register("by_epoch")
    class ByEpoch(Component):
        def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
            seen.append((ctx.epoch, ctx.steps_per_epoch))
            return torch.full((len(ctx.labels),), 0.1 * ctx.epoch)

    data = load_dataset("mnist1d", {"num_samples": 400})
    logs: list[dict] = []
    fit(ModelSpec(name="mlp", params={"hidden": 8}), data, OptimConfig(epochs=2, batch_size=100),
        KnowledgeConfig(mass="by_epoch", structure="uniform", alpha=0.5), 0, on_epoch=lambda e, m: logs.append(m))
    steps = len(data.y_train) // 100
    assert seen == [(1, steps)] * steps + [(2, steps)] * steps
    assert [m["train/target_mass"] for m in logs] == pytest.approx([0.1, 0.2])
