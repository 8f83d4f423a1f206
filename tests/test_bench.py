"""The benchmark suite runs and reports every row; the trainer's hot loop makes no per-step host sync.

No test here asserts a speed: timings belong to ``make bench``, not to a test.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from kdablate.bench import suite as bench, system as bench_system
from kdablate.bench.core import Row, interleave, ratio, synthetic
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.attribution import EXPLANATIONS, Cost
from kdablate.study import load_study
from kdablate.trainer import TeacherSignal, cohort_size, make_member, seeded_generator, train_epoch

IL = dict(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9)
KNOWLEDGE = {
    "ce": KnowledgeConfig(),
    "ls": KnowledgeConfig(mass={"name": "constant", "eps": 0.1}, structure="uniform", alpha=1.0),
    "kd": KnowledgeConfig(mass="teacher", structure="teacher", temperature=4.0, alpha=0.9),
    "dkd": KnowledgeConfig(objective={"name": "dkd"}, temperature=4.0, alpha=1.0),
    "il cam": KnowledgeConfig(structure={"name": "explanation", "source": "cam"}, **IL),
    "il saliency": KnowledgeConfig(structure={"name": "explanation", "source": "saliency"}, **IL),
    "il saliency every 2": KnowledgeConfig(structure={"name": "explanation", "every": 2, "fraction": 0.5}, **IL),
    "dml": KnowledgeConfig(mass="peer", structure="peer", temperature=1.0, alpha=0.5),
}


@pytest.fixture(scope="module")
def quick_record(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--sections", "trainer,levers,il", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_quick_bench_reports_every_row(quick_record):
    names = {(r["section"], r["name"]) for r in quick_record["rows"]}
    for setting in ("default data (MNIST-1D, MLP)", "32x32x3, ResNet-20"):
        for row in ("kdablate trainer, throughput vs a hand-written loop", "KD step, cached teacher logits, vs CE step",
                    "data pipeline throughput / model step throughput"):
            assert (setting, row) in names
        assert any(s == setting and n.startswith("KD step, online teacher") for s, n in names)
        sources = {n for s, n in names if s == f"IL, {setting}"}
        offline = {n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).cost is Cost.PER_CLASS_STEPS}
        expected = set(EXPLANATIONS.names()) - (offline if "ResNet" in setting else set())
        assert {f"il {src} step vs CE step" for src in expected} <= sources
    assert ("compute", "ResNet-20 step GFLOP/s / conv peak") in names
    for section in ("IL sketch, mlp, MNIST-1D-shaped", "IL sketch, cnn1d, MNIST-1D-shaped", "IL sketch, resnet20, 32x32x3"):
        assert (section, "saliency step vs CE step, K = 100, sketch m = 4") in names, section
    assert sum(s == "levers" for s, _ in names) == 4
    assert quick_record["machine"]["torch"] == torch.__version__


def test_quick_bench_values_are_finite_and_targets_are_judged(quick_record):
    for r in quick_record["rows"]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        assert r["status"] in ("PASS", "MISS", "") and bool(r["status"]) == bool(r["target"] != "reported"), r


def test_il_sources_are_planned_by_their_declared_cost(monkeypatch):
    """The IL rows read each source's ``cost`` and ``quick_params``, not its name: a new source
    meant for offline use is left out at image scale and runs with its quick parameters."""
    import dataclasses as dc

    from kdablate.attribution import Saliency
    from kdablate.bench.explain import variants

    monkeypatch.setattr(EXPLANATIONS, "_entries", dict(EXPLANATIONS._entries))

    @EXPLANATIONS.register("slow_saliency")
    class SlowSaliency(Saliency):
        @dc.dataclass(frozen=True)
        class Params:
            steps: int = 64

        cost = Cost.PER_CLASS_STEPS
        quick_params = {"steps": 2}

    default, images = variants(images=False), variants(images=True)
    assert default["il slow_saliency"].structure.params["source_params"] == {"steps": 2}
    assert "il slow_saliency" not in images and "il saliency" in images


def test_interleave_runs_every_variant_each_round_and_ratios_pair_rounds():
    calls: list[str] = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and all(len(v) == 3 for v in times.values())
    assert ratio({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}, "a", "b") == 3.0
    assert Row("s", "n", 1.0, "x", "≤ 1", True).status == "PASS" and Row("s", "n", 1.0, "x").status == ""


def test_bench_study_file_is_a_valid_study(tmp_path):
    study = load_study(str(bench_system.write_study(tmp_path, cells=8, epochs=3)))
    assert len(study.cells) == 8 and {c.arm for c in study.cells} == {"ce", "ls"}


def test_peak_rss_counts_the_subprocess():
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    _, mem = bench_system.run_measured([sys.executable, "-c", code])
    assert 200 <= mem["anon"] <= mem["rss"] < 1024 and 0.5 * mem["rss"] <= mem["pss"] <= mem["rss"]


def test_the_memory_watcher_reads_the_costly_pss_rarely(monkeypatch):
    """smaps_rollup (PSS) walks a process's page tables, ~12 ms a read of a torch process: read
    every 50 ms it took a quarter of a core per watched process, slowing the study being timed."""
    reads = {"status": 0, "smaps_rollup": 0}
    real_open = open

    def counting(path, *args, **kwargs):
        name = str(path).rsplit("/", 1)[-1]
        if name in reads:
            reads[name] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bench_system, "open", counting, raising=False)
    bench_system.run_measured([sys.executable, "-c", "import time; time.sleep(1.0)"])
    # about 20 samples of a process whose RSS stops growing once started: PSS read as it starts
    # (at most every PSS_MIN_S), then every PSS_MAX_S
    assert reads["status"] >= 10 and 1 <= reads["smaps_rollup"] <= 1.0 / bench_system.PSS_MIN_S + 1


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the Tensor methods that copy a value to the host (a device sync on a GPU)."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            counts["n"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("name", list(KNOWLEDGE))
def test_train_epoch_makes_no_host_sync_per_step(monkeypatch, name):
    """The number of host reads in an epoch does not grow with its number of steps."""
    knowledge, syncs = KNOWLEDGE[name], []
    members_n = cohort_size(knowledge)
    for steps in (2, 6):
        data = synthetic(10, (1, 40), 16 * steps)
        teacher = TeacherSignal({"train": torch.randn(16 * steps, 10)})
        members = [make_member(ModelSpec(name="mlp", params={"hidden": 16}), data, OptimConfig(batch_size=16),
                               knowledge, i, steps) for i in range(members_n)]
        gens = (seeded_generator(0, 0), seeded_generator(0, 1), seeded_generator(0, 2))
        with monkeypatch.context() as m:
            counts = count_syncs(m)
            logs, _ = train_epoch(members, data, 16, gens, 1, 0, teacher)
        syncs.append(counts["n"])
        assert "train/acc" in logs[0] and "train/loss" in logs[0]
    assert syncs[0] > 0  # the epoch-end metrics: proves the counting works
    assert syncs[0] == syncs[1], f"{name}: {syncs[0]} host reads for 2 steps, {syncs[1]} for 6"


# --- make gpu-check: the comparison logic and the study it runs, without a GPU -----------------------

def test_gpu_check_agreement_is_within_two_standard_errors():
    from kdablate.bench.gpu import agrees

    assert agrees([0.90, 0.92, 0.94], [0.91, 0.93, 0.95])[2]        # +1 point, well inside the noise
    diff, tol, ok = agrees([0.90, 0.901, 0.899], [0.95, 0.951, 0.949])
    assert not ok and diff == pytest.approx(0.05) and tol == pytest.approx(0.01)  # the 1-point floor
    assert not agrees([0.5, 0.6, 0.7], [0.9, 0.95, 1.0])[2]


def test_gpu_check_report_fails_on_a_missing_arm_a_failed_cell_or_a_stack_that_never_stacked():
    from kdablate.bench.gpu import ModeResult, report

    cpu = ModeResult("cpu", "cpu", {"ce": [0.9, 0.91], "kd": [0.93, 0.94]}, 100.0, float("nan"), 1.0, 0, 0)
    same = ModeResult("cuda", "H", {"ce": [0.905, 0.91], "kd": [0.93, 0.935]}, 900.0, 300.0, 1.0, 0, 0)
    assert report([cpu, same])[1]
    assert not report([cpu, ModeResult("cuda", "H", {"ce": [0.9, 0.91]}, 900.0, 300.0, 1.0, 0, 0)])[1]
    text, ok = report([cpu, dataclasses.replace(same, failed=1)])
    assert not ok and "1 failed" in text
    # A stack that fails falls back to one-by-one training with the same accuracies: only the
    # count of stacked cells shows that the stacked path never ran (as it once did on CUDA).
    stack = dataclasses.replace(same, mode="cuda-stack")
    text, ok = report([cpu, stack])
    assert not ok and "0 trained in a stack" in text
    assert report([cpu, dataclasses.replace(stack, stacked=2)])[1]


def test_gpu_check_study_loads_and_cpu_mode_reads_its_runs(tmp_path):
    """The study file it writes passes the load-time checks, and the CPU mode runs it end to end."""
    from kdablate.bench.gpu import run_mode, write_study
    from kdablate.study import load_study

    study = write_study(tmp_path, train=200, epochs=1, seeds=2)
    assert {c.arm for c in load_study(study).cells} == {"ce", "kd", "il-cam"}
    result = run_mode(study, "cpu", tmp_path, threads=1)
    assert result.failed == 0 or set(result.acc) >= {"ce", "il-cam"}  # kd may meet the teacher gate
    assert len(result.acc["ce"]) == 2 and result.images_per_s > 0


def test_the_baseline_row_leaves_no_worktree_when_a_run_fails(monkeypatch):
    """A study that fails on either side leaves the checkout's worktree list as it was."""
    import subprocess

    from kdablate.bench import baseline
    from kdablate.bench.core import QUICK

    def worktrees() -> str:
        return subprocess.run(["git", "-C", str(baseline.ROOT), "worktree", "list"], capture_output=True, text=True).stdout

    def failing(*args, **kwargs):
        raise RuntimeError("the study failed")

    before = worktrees()
    monkeypatch.setattr(baseline, "run_cli", failing)
    try:
        baseline.baseline_row(QUICK)
    except RuntimeError as e:
        assert "the study failed" in str(e)
    assert worktrees() == before


def test_gpu_check_without_cuda_says_so_and_exits_2(monkeypatch, capsys):
    from kdablate.bench import gpu as bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_the_baseline_row_runs_both_codes_or_says_why(monkeypatch):
    """Quick scale: the study at the pre-stacking commit and at this checkout, each in its own
    store; where git cannot make the worktree, a row that says so instead of a number."""
    from kdablate.bench import baseline
    from kdablate.bench.core import QUICK

    row = baseline.baseline_row(QUICK)
    if math.isnan(row.value):
        assert row.note.startswith("no checkout of") and row.ok is None
    else:
        assert row.value > 0 and row.ok in (True, False) and "fresh store and cache each" in row.note
    monkeypatch.setattr(baseline, "ROOT", baseline.ROOT / "no-such-folder")
    missing = baseline.baseline_row(QUICK)
    assert math.isnan(missing.value) and missing.note.startswith("no checkout of")


def test_recipe_rows_run_and_project_one_seed():
    """gpu-check's recipe rows, on the CPU with small models: every variant times, and the projection
    is the recipe's images over the online row's rate."""
    from kdablate.bench.recipe import EPOCHS, TRAIN_IMAGES, recipe_rows
    from kdablate.trainer import Runtime

    rows = recipe_rows(Runtime("cpu"), samples=128, seeds=2, views=2, rounds=1, models=("resnet8", "resnet8"))
    assert [r.unit for r in rows] == ["images/s"] * 3 + ["min"]
    assert all(r.value > 0 for r in rows) and "2 seeds stacked" in rows[2].name
    assert rows[3].value == pytest.approx(EPOCHS * TRAIN_IMAGES / rows[0].value / 60)
    assert rows[3].ok is None  # judged on a GPU only
