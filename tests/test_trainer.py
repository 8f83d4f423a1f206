"""The shared trainer: determinism, reporting rule, metrics, failure on divergence."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdablate.components.structure import class_mean_structure, nongt_distribution
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.metrics import agreement, ece, offdiagonal, spearman
from kdablate.trainer import NonFiniteLoss, TeacherSignal, fit, predict

CE = KnowledgeConfig()
OPT = OptimConfig(epochs=3, batch_size=32)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist1d", {"num_samples": 400})


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_same_seed_same_result_on_cpu(tiny, model):
    spec = ModelSpec(name=model, params={"hidden": 16} if model == "mlp" else {"channels": 8, "depth": 2})
    logs_a, logs_b = [], []
    a = fit(spec, tiny, OPT, CE, seed=3, on_epoch=lambda e, m: logs_a.append(m))
    b = fit(spec, tiny, OPT, CE, seed=3, on_epoch=lambda e, m: logs_b.append(m))
    untimed = lambda logs: [{k: v for k, v in m.items() if not k.startswith("time/")} for m in logs]  # noqa: E731
    assert a.metrics == b.metrics and untimed(logs_a) == untimed(logs_b)
    sa, sb = state(a.model), state(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = fit(spec, tiny, OPT, CE, seed=4)
    assert any(not torch.equal(sa[k], v) for k, v in state(c.model).items())


def test_kd_with_teacher_logits_is_deterministic_and_logs_every_part(tiny):
    teacher = TeacherSignal({s: torch.randn(len(tiny.split(s)[1]), 10, generator=torch.Generator().manual_seed(0))
                             for s in ("train", "val", "test")})
    obj = KnowledgeConfig(mass="teacher", structure="permuted", temperature=4.0, alpha=0.9)
    logs = []
    a = fit(ModelSpec(name="mlp"), tiny, OPT, obj, 0, teacher=teacher, on_epoch=lambda e, m: logs.append(m))
    b = fit(ModelSpec(name="mlp"), tiny, OPT, obj, 0, teacher=teacher)
    assert a.metrics == b.metrics
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "train/target_mass", "val/acc", "val/nll",
            "val/ece", "test/acc", "test/agreement"} <= set(logs[0])
    assert "report/test_agreement" in a.metrics


def test_report_rule_is_recorded_and_selects_on_validation_only(tiny):
    logs = []
    best = fit(ModelSpec(name="mlp"), tiny, OptimConfig(epochs=5, batch_size=32),
               CE, 0, report="best_val", on_epoch=lambda e, m: logs.append(m))
    epoch = int(best.metrics["report/epoch"])
    val = [m["val/acc"] for m in logs]
    assert val[epoch - 1] == max(val) and epoch == val.index(max(val)) + 1
    assert best.metrics["report/val_acc"] == pytest.approx(val[epoch - 1])
    last = fit(ModelSpec(name="mlp"), tiny, OptimConfig(epochs=5, batch_size=32), CE, 0, report="last")
    assert last.metrics["report/epoch"] == 5


def test_diverging_loss_raises(tiny):
    with pytest.raises(NonFiniteLoss):
        fit(ModelSpec(name="mlp"), tiny, OptimConfig(epochs=3, lr=1e6, momentum=0.0), CE, 0)


def test_predict_restores_training_mode(tiny):
    model = fit(ModelSpec(name="cnn1d", params={"channels": 4, "depth": 1}), tiny, OptimConfig(epochs=1), CE, 0).model
    model.train()
    predict(model, tiny.x_val)
    assert model.training


def test_ece_and_agreement():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert ece(logits, labels) < 1e-3  # confident and right
    assert ece(logits, 1 - labels) > 0.99  # confident and wrong
    assert ece(torch.zeros(4, 2), labels) == pytest.approx(0.0)  # 50% confident, 50% right
    assert agreement(logits, logits) == 1.0 and agreement(logits, -logits) == 0.0


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("knowledge", [
    KnowledgeConfig(),
    KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure={"name": "explanation", "every": 2, "fraction": 0.5},
                    temperature=4.0, alpha=0.9),
    KnowledgeConfig(mass="peer", structure="peer", alpha=0.5),
], ids=["ce", "il", "dml"])
def test_resume_from_checkpoint_is_bit_identical(tiny, tmp_path, knowledge):
    from kdablate.storage import Checkpoint

    spec, opt = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=4, batch_size=32)
    straight = fit(spec, tiny, opt, knowledge, 0)

    def crash_after_2(epoch, metrics):
        if epoch == 2:
            raise Interrupt

    ckpt = Checkpoint(tmp_path / "cell.pt", every=1, meta={"run_id": "r1"})
    with pytest.raises(Interrupt):
        fit(spec, tiny, opt, knowledge, 0, on_epoch=crash_after_2, checkpoint=ckpt)
    assert ckpt.load()["epoch"] == 1 and ckpt.load()["meta"] == {"run_id": "r1"}
    epochs_seen = []
    resumed = fit(spec, tiny, opt, knowledge, 0, checkpoint=ckpt, on_epoch=lambda e, m: epochs_seen.append(e))
    assert epochs_seen == [2, 3, 4]
    assert resumed.metrics == straight.metrics


def test_multistep_schedule_decays_at_milestones():
    from kdablate.trainer import make_optimizer

    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(epochs=10, lr=0.1, schedule="multistep", milestones=(3, 6), gamma=0.1)
    opt, sched = make_optimizer(model, cfg, steps=50, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)


def test_bf16_autocast_runs_and_learns_on_cpu():
    from kdablate.trainer import Runtime

    data = load_dataset("mnist1d", {"num_samples": 1000})
    spec, opt = ModelSpec(name="cnn1d", params={"channels": 16, "depth": 2}), OptimConfig(epochs=8, batch_size=32)
    kd = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure={"name": "explanation", "source": "cam"},
                         temperature=4.0, alpha=0.5)
    fp32 = fit(spec, data, opt, kd, 0)
    bf16 = fit(spec, data, opt, kd, 0, runtime=Runtime("cpu", "bf16"))
    assert bf16.metrics["report/val_acc"] > 0.4  # chance is 0.1
    assert abs(bf16.metrics["report/val_acc"] - fp32.metrics["report/val_acc"]) < 0.1
    assert next(bf16.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_runtime_resolves_auto_to_the_available_device():
    from kdablate.runner import RunOptions

    rt = RunOptions(device="auto").runtime()
    assert rt.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert RunOptions(device="cpu", amp="bf16").runtime().amp == "bf16"



IL_SCHEDULED = KnowledgeConfig(mass={"name": "constant", "eps": 0.2},
                               structure={"name": "explanation", "every": 2, "fraction": 0.5},
                               temperature=4.0, alpha=0.9)


@pytest.mark.parametrize("knowledge", [
    IL_SCHEDULED,
    KnowledgeConfig(mass="self", structure={"name": "permuted", "base": "explanation",
                                            "base_params": {"every": 2, "fraction": 0.5}}, temperature=4.0, alpha=0.9),
    KnowledgeConfig(mass="peer", structure="peer", alpha=0.5),
], ids=["il", "permuted_il", "dml"])
def test_resume_after_two_epochs_matches_every_later_epoch(tiny, tmp_path, knowledge):
    """Resumed from epoch 2 (the class EMA of a scheduled explanation has moved by then; DML
    restores both members), every later epoch's metrics equal the uninterrupted run's."""
    from kdablate.storage import Checkpoint

    spec, opt = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=4, batch_size=32)
    untimed = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    logs = {}
    straight = fit(spec, tiny, opt, knowledge, 0, on_epoch=lambda e, m: logs.setdefault(e, untimed(m)))

    def crash_after_2(epoch, metrics):
        if epoch == 3:
            raise Interrupt

    ckpt = Checkpoint(tmp_path / "cell.pt", every=1)
    with pytest.raises(Interrupt):
        fit(spec, tiny, opt, knowledge, 0, on_epoch=crash_after_2, checkpoint=ckpt)
    saved = ckpt.load()
    assert saved["epoch"] == 2 and len(saved["members"]) == (2 if knowledge.mass.name == "peer" else 1)
    resumed_logs = {}
    resumed = fit(spec, tiny, opt, knowledge, 0, checkpoint=ckpt,
                  on_epoch=lambda e, m: resumed_logs.setdefault(e, untimed(m)))
    assert resumed_logs == {e: logs[e] for e in (3, 4)}
    assert resumed.metrics == straight.metrics


def test_objective_state_dict_round_trips_the_explanation_ema(batch):
    """The state a checkpoint keeps of an IL objective is its tensors; loaded into a fresh one,
    the next steps give the same losses, and the two never share storage."""
    from kdablate.components import TargetContext
    from kdablate.objectives import build_objective

    def ctx(step):
        return TargetContext(batch["labels"], batch["k"], batch["student"], inputs=batch["inputs"],
                             models={"self": batch["models"]["self"]}, step=step)

    a, b = build_objective(IL_SCHEDULED), build_objective(IL_SCHEDULED)
    for step in range(3):
        a(batch["student"], ctx(step))
    state = a.state_dict()
    assert set(state) == {"structure.class_matrix"}  # the epoch's statistics are the measurements'
    assert state["structure.class_matrix"].shape == (batch["k"], batch["k"])
    older = {**state, **{f"structure.{k}": 0 for k in ("epoch_sums", "epoch_counts", "seconds", "steps")}}
    b.load_state_dict(older)  # a checkpoint written before the measurements took them still loads
    b.load_state_dict(state)
    assert b.state_dict()["structure.class_matrix"].data_ptr() != state["structure.class_matrix"].data_ptr()
    for step in (3, 4):
        assert torch.equal(a(batch["student"], ctx(step))["loss"], b(batch["student"], ctx(step))["loss"])
    assert torch.equal(a.state_dict()["structure.class_matrix"], b.state_dict()["structure.class_matrix"])
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        b.load_state_dict({"bogus": 1})
    assert build_objective(KnowledgeConfig()).state_dict() == {}  # CE keeps no state


def test_teacher_signal_looks_up_the_cache_a_view_per_epoch_or_runs_the_model(batch):
    """One teacher object, three sources of a batch's logits: the cache (fixed, so a static target
    may be built once), view (e - 1) mod V in epoch e, or the model on the batch itself."""
    from kdablate.trainer import CPU, NO_TEACHER

    cache = {s: torch.randn(6, 10) for s in ("train", "val", "test")}
    views = (torch.arange(2 * 6 * 3).view(2, 6, 3), torch.randn(2, 6, 10))
    cached, viewed = TeacherSignal(cache), TeacherSignal(cache, views=views)
    assert cached.epoch_lookup(3) == (None, cache["train"]) and cached.fixed_train_logits is cache["train"]
    for epoch, v in ((1, 0), (2, 1), (3, 0)):
        aug, logits = viewed.epoch_lookup(epoch)
        assert torch.equal(aug, views[0][v]) and torch.equal(logits, views[1][v])
    assert viewed.fixed_train_logits is None and viewed.split_logits("val") is cache["val"]
    model = batch["models"]["teacher"].eval()
    online = TeacherSignal(cache, model, online=True)
    assert online.epoch_lookup(1) == (None, None) and online.fixed_train_logits is None
    with torch.no_grad():
        expected = model(batch["inputs"])
    torch.testing.assert_close(online.logits_for(batch["inputs"], None, CPU), expected, rtol=0, atol=0)
    assert cached.logits_for(batch["inputs"], cache["train"], CPU) is cache["train"]
    assert NO_TEACHER.split_logits("val") is None and NO_TEACHER.epoch_lookup(1) == (None, None)
    with pytest.raises(ValueError, match="needs its model"):
        TeacherSignal(cache, online=True)


def test_image_models_and_batches_share_one_layout():
    from kdablate.data.bundle import batch_layout
    from kdablate.models import build_model
    from kdablate.models.factory import place_model

    images = place_model(build_model("resnet8", {}, (3, 8, 8), 10), (3, 8, 8))
    kernels = [p for p in images.parameters() if p.dim() == 4]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    assert batch_layout(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    signals = place_model(build_model("cnn1d", {}, (1, 40), 10), (1, 40))
    assert all(p.is_contiguous() for p in signals.parameters())
    x = torch.randn(2, 1, 40)
    assert batch_layout(x) is x


def test_every_arm_logs_the_reported_students_class_similarity_on_val(tiny):
    """A CE arm with a teacher: the reported student's own (K, K) similarity from its val outputs
    at T = 1, the teacher's at T = 1 on the same samples, and their Spearman correlation."""
    g = torch.Generator().manual_seed(1)
    teacher = TeacherSignal({s: 3 * torch.randn(len(tiny.split(s)[1]), 10, generator=g)
                             for s in ("train", "val", "test")})
    result = fit(ModelSpec(name="mlp", params={"hidden": 16}), tiny, OPT, CE, 0, teacher=teacher)
    student, ref = result.artifacts["similarity_student"], result.artifacts["similarity_teacher_t1"]
    off = ~torch.eye(10, dtype=torch.bool)
    assert student.shape == ref.shape == (10, 10) and (student[~off] == 0).all()
    for m in (student, ref):  # rows sum to 1 off the diagonal
        assert torch.allclose((m * off).sum(1), torch.ones(10))
    x, y = tiny.split("val")  # the reported (best-on-val) weights' val outputs, at T = 1
    assert torch.allclose(student, class_mean_structure(
        nongt_distribution(torch.softmax(predict(result.model, x, prepare=tiny.prepare), 1), y), y, 10))
    t1 = torch.softmax(teacher.logits["val"], 1)  # the teacher at T = 1 too, on the same samples
    assert torch.allclose(ref, class_mean_structure(nongt_distribution(t1, y), y, 10))
    rho = result.metrics["report/student_similarity_spearman"]
    assert math.isfinite(rho) and rho == spearman(offdiagonal(student), offdiagonal(ref))
    new = {k for k in result.metrics if "similarity" in k}
    assert new == {"report/student_similarity_spearman"}  # mnist1d has no class groups, and nothing on test
    assert set(result.artifacts) == {"similarity_student", "similarity_teacher_t1"}


def test_student_similarity_without_a_teacher_logs_the_oracle_one_or_none(tiny):
    bare = fit(ModelSpec(name="mlp", params={"hidden": 16}), tiny, OPT, CE, 0)
    assert not any("similarity" in k for k in bare.metrics)
    assert set(bare.artifacts) == {"similarity_student"}  # the student's own matrix needs no reference
    grouped = dataclasses.replace(tiny, class_groups=torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3]))
    result = fit(ModelSpec(name="mlp", params={"hidden": 16}), grouped, OPT, CE, 0)
    assert {k for k in result.metrics if "similarity" in k} == {"report/student_similarity_oracle_spearman"}
    assert math.isfinite(result.metrics["report/student_similarity_oracle_spearman"])
    # The other reported numbers do not change with the similarity diagnostics.
    assert {k: v for k, v in result.metrics.items() if "similarity" not in k} == bare.metrics
