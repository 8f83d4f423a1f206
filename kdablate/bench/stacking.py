"""Seed-stacked training rows: S seeds as one stacked model against S models one after another.

* step rows: one epoch of S seeds through ``kdablate.stacked.Stacked.train`` against S calls of
  ``kdablate.trainer.train_epoch``, on the same data, for the MLP (CE, and the IL saliency arm,
  whose explanations a stack computes in one call) and the 1-D CNN of the default data and a
  CIFAR ResNet: these decide where ``--stack auto`` stacks on a CPU;
* the study row: the same 8-cell grid through the CLI with ``--stack on`` against ``--stack
  off`` (wall time of the whole process), the issue's target (>= x3).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kdablate.bench.core import Row, Scale, interleave, ratio, synthetic
from kdablate.bench.system import run_study, write_study
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.stacked import Stacked
from kdablate.trainer import CPU, NO_TEACHER, Runtime, make_member, seeded_generator, train_epoch

SEEDS = 10  # the default study's seeds per arm


# The introspective study's saliency arm: every seed's rows explained in one call on the stack.
IL_SALIENCY = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure={"name": "explanation"},
                              temperature=4.0, alpha=0.9)


def epoch_variants(spec: ModelSpec, data: DataBundle, seeds: int, batch: int, runtime: Runtime = CPU,
                   knowledge: KnowledgeConfig = KnowledgeConfig()) -> dict:
    """'stacked' and 'one by one': an epoch of ``seeds`` seeds each way (the same inits)."""
    optim = OptimConfig(epochs=1, batch_size=batch)
    steps = len(data.y_train) // batch
    alone = [make_member(spec, data, optim, knowledge, s, steps, runtime) for s in range(seeds)]
    stack = Stacked([[make_member(spec, data, optim, knowledge, s, steps, runtime)] for s in range(seeds)], optim, steps)
    gens = [tuple(seeded_generator(s, i) for i in range(3)) for s in range(seeds)]
    # A CUDA step returns before its kernels finish: time up to the last of them.
    sync = torch.cuda.synchronize if runtime.device.startswith("cuda") else (lambda: None)

    def stacked() -> None:
        stack.train(data, batch, gens, 1, 0, [NO_TEACHER] * seeds, runtime)
        sync()

    def one_by_one() -> None:
        for m, g in zip(alone, gens):
            train_epoch([m], data, batch, g, 1, 0, runtime=runtime)
        sync()

    return {"stacked": stacked, "one by one": one_by_one}


def step_rows(scale: Scale, runtime: Runtime = CPU, resnet_seeds: int = 4) -> list[Row]:
    """Per model: an epoch of ``SEEDS`` seeds stacked vs one by one (x faster) on ``runtime``'s device."""
    ce, mlp_data = KnowledgeConfig(), synthetic(10, (1, 40), scale.mlp_samples)
    settings = [
        ("MLP (default data)", ModelSpec(name="mlp"), mlp_data, scale.batch, ce),
        ("MLP (default data), IL saliency", ModelSpec(name="mlp"), mlp_data, scale.batch, IL_SALIENCY),
        ("1-D CNN 32ch (default data)", ModelSpec(name="cnn1d", params={"channels": 32}),
         synthetic(10, (1, 40), scale.mlp_samples // 4), scale.batch, ce),
        ("ResNet-8 (32x32x3)", ModelSpec(name="resnet8"),
         synthetic(10, (3, scale.image_size, scale.image_size), scale.image_samples // 2), scale.batch // 2, ce),
    ]
    rows = []
    for label, spec, data, batch, knowledge in settings:
        seeds = SEEDS if spec.name != "resnet8" else resnet_seeds
        times = interleave(epoch_variants(spec, data, seeds, batch, runtime, knowledge), max(scale.rounds // 2, 2))
        speedup = ratio(times, "one by one", "stacked")
        where = runtime.device.upper() if runtime.device.startswith("cuda") else "CPU"
        steps = "IL saliency steps" if knowledge is IL_SALIENCY else "CE steps"
        rows.append(Row("stacked seeds", f"{label}: {seeds} seeds stacked vs one by one, {where}", speedup, "x",
                        "reported", None, f"an epoch of {steps}, {seeds} seeds; > 1: stacking is faster"))
    return rows


def cells_seconds(store: Path, study: str) -> float:
    """The summed ``time/wall_s`` of the finished cells in ``store`` (a stacked seed's is its share).
    Each store is read once, after both runs: a store's client stays open on its file, and
    ``run_study`` moves the first store aside to make room for the second."""
    from kdablate import tracking

    client = tracking.client(f"sqlite:///{store.resolve()}/mlruns.db")
    runs = tracking.search_cells(client, tracking.experiment_id(client, study), "FINISHED")
    return sum(r.data.metrics["time/wall_s"] for r in runs)


def study_row(scale: Scale) -> Row:
    """The 8-cell grid (2 arms x 4 seeds, default data, MLP) with --stack on against off."""
    with tempfile.TemporaryDirectory(prefix="kdablate-bench-") as tmp:
        folder = Path(tmp)
        study = write_study(folder, scale.study_cells, scale.study_epochs)
        off_s, _ = run_study(study, 1, folder, extra=("--stack", "off"))
        on_s, _ = run_study(study, 1, folder, extra=("--stack", "on"))
        off_cells = cells_seconds(next(folder.glob("w1-*")), study.stem)
        on_cells = cells_seconds(folder / "last", study.stem)
    speedup = off_s / on_s
    return Row("stacked seeds", f"study of {scale.study_cells} cells (2 arms x {scale.study_cells // 2} seeds), "
               "stacked vs unstacked", speedup, "x", ">= x3", speedup >= 3,
               f"whole `kdablate run` process, 1 worker: {off_s:.1f} s vs {on_s:.1f} s; the cells alone "
               f"(no start-up): {off_cells:.1f} s vs {on_cells:.1f} s, x{off_cells / max(on_cells, 1e-9):.2f}")


def all_rows(scale: Scale) -> list[Row]:
    torch.manual_seed(0)
    return step_rows(scale) + [study_row(scale)]
