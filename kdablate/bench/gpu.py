"""``make gpu-check``: the CUDA path checked on real hardware against the CPU.

    python -m kdablate.bench.gpu [--dataset cifar100] [--train 6000] [--epochs 8] [--seeds 3]
                                 [--modes cpu,cuda,cuda-bf16,cuda-w2,cuda-stack] [--no-stack-rows]

Writes synthetic CIFAR-100 (or -10) in its real on-disk format (``kdablate.data.fake``),
then runs one short image study (resnet20 teacher -> resnet8 student; CE, KD
from the teacher, and introspective learning from CAM) once per mode, each into its own
MLflow store through the public ``run_study``:

* ``cpu``        fp32 on the CPU, the reference;
* ``cuda``       fp32 on the GPU;
* ``cuda-bf16``  bf16 autocast on the GPU;
* ``cuda-w2``    fp32 on the GPU with two worker processes sharing it;
* ``cuda-stack`` fp32 on the GPU, each arm's seeds trained as one stacked model (``--stack on``).
  Only CE stacks here: the IL arm reads the model and KD's teacher runs online on the augmented
  batches, so both train their seeds one by one, with a note. The mode fails unless some cell
  was trained in a stack: a stack that raises falls back to one-by-one training with only a note.

It first prints (unless ``--no-stack-rows``) ``make bench``'s 'stacked seeds' step rows measured on the GPU
(``kdablate.bench.stacking``), which decide where ``--stack auto`` stacks on CUDA, then (unless
``--no-recipe-rows``) the throughput of ``studies/crd_cifar100.yaml``'s KD cell, resnet32x4 ->
resnet8x4, for one seed and for seeds stacked, with the projected wall time of one seed
(``kdablate.bench.recipe``; the target is at most 15 minutes on one H100-class GPU).

Per arm it prints test accuracy as mean +- std over seeds and whether each GPU
mode agrees with the CPU within seed noise (|difference of means| <= 2 standard
errors of that difference, and at least 1 point), then per mode images/s (training
images over the cells' wall time, evaluation included) and peak GPU memory.
The table and the machine go to ``figures/gpu/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# mode -> (device, autocast, workers, --stack)
MODES = {"cpu": ("cpu", "none", 1, "auto"), "cuda": ("cuda", "none", 1, "off"), "cuda-bf16": ("cuda", "bf16", 1, "off"),
         "cuda-w2": ("cuda", "none", 2, "off"), "cuda-stack": ("cuda", "none", 1, "on")}

STUDY = """\
description: gpu-check, a short image study run once per device and precision.
base:
  data: {{name: {dataset}, data_root: {root}, train_subset: {train}}}
  student: {{name: resnet8}}
  optim: {{epochs: {epochs}, batch_size: 128, lr: 0.05, weight_decay: 5.0e-4}}
  teacher:
    model: {{name: resnet20}}
    optim: {{epochs: {teacher_epochs}, batch_size: 128, lr: 0.05, weight_decay: 5.0e-4}}
    min_accuracy: {gate}  # twice chance: the check is agreement, not quality
    seed: 0
  report: best_val
seeds: {seeds}
arms:
  - {{name: ce, mass: none, alpha: 0.0}}
  - {{name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}}
  - name: il-cam  # the README's IL recipe; cam, as saliency costs K backward passes a step
    mass: {{name: constant, eps: 0.2}}
    structure: {{name: explanation, source: cam}}
    temperature: 4.0
    alpha: 0.9
"""


@dataclasses.dataclass(frozen=True)
class ModeResult:
    mode: str
    device: str
    acc: dict[str, list[float]]  # arm -> test accuracy per seed
    images_per_s: float
    peak_mib: float
    wall_s: float
    failed: int
    stacked: int  # cells a stack trained (tag kdablate.stacked): a stack that raises falls back with only a note


def write_study(folder: Path, train: int, epochs: int, seeds: int, dataset: str = "cifar10") -> Path:
    from kdablate.data.fake import write_cifar

    write_cifar(folder / "data", dataset, n_train=train + train // 8, n_test=max(1000, train // 4))
    path = folder / "gpu_check.yaml"
    path.write_text(STUDY.format(dataset=dataset, gate=0.2 if dataset == "cifar10" else 0.02, root=folder / "data", train=train, epochs=epochs, teacher_epochs=epochs + 2,
                                 seeds=list(range(seeds))))
    return path


def run_mode(study_path: Path, mode: str, folder: Path, threads: int) -> ModeResult:
    """The study in ``mode`` into ``folder/mode``; accuracies, throughput and peak GPU memory."""
    from kdablate import tracking
    from kdablate.runner import RunOptions, run_study
    from kdablate.study import load_study

    device, amp, workers, stack = MODES[mode]
    store = folder / mode
    store.mkdir()
    uri = f"sqlite:///{store}/mlruns.db"
    opts = RunOptions(cache_dir=store / "cache", threads=threads, workers=workers, uri=uri, progress=False,
                      device=device, amp=amp, stack=stack)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    failed = run_study(load_study(study_path), opts)
    wall = time.perf_counter() - t0
    client = tracking.client(uri)
    runs = tracking.search_cells(client, tracking.experiment_id(client, "gpu_check"), "FINISHED")
    acc: dict[str, list[float]] = {}
    images = cell_s = 0.0
    stacks = sum("kdablate.stacked" in r.data.tags for r in runs)
    for r in sorted(runs, key=lambda r: int(r.data.tags["seed"])):
        acc.setdefault(r.data.tags["arm"], []).append(tracking.summary(r)["report/test_acc"])
        subset, val = int(r.data.params["data.train_subset"]), float(r.data.params.get("data.val_fraction", 0.1))
        images += (subset - round(subset * val)) * int(r.data.params["optim.epochs"])
        cell_s += r.data.metrics["time/wall_s"]
    # Two workers are other processes: their GPU memory is not this process's to read.
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" and workers == 1 else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return ModeResult(mode, name, acc, images / cell_s if cell_s else float("nan"), peak, wall, failed, stacks)


def agrees(ref: list[float], other: list[float]) -> tuple[float, float, bool]:
    """(difference of means, tolerance, within it): 2 standard errors of the difference, at least 0.01."""
    diff = statistics.fmean(other) - statistics.fmean(ref)
    var = sum(statistics.variance(v) / len(v) for v in (ref, other) if len(v) > 1)
    tol = max(0.01, 2 * math.sqrt(var))
    return diff, tol, abs(diff) <= tol


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +- {100 * sd:.2f}"


def report(results: list[ModeResult]) -> tuple[str, bool]:
    """The table as text, and whether every GPU mode agreed with the CPU on every arm."""
    ref, lines, ok = results[0], [], True
    lines.append(f"{'arm':<12} " + " ".join(f"{r.mode:>22}" for r in results))
    for arm in ref.acc:
        cells = [mean_std(r.acc.get(arm, [math.nan])) for r in results]
        lines.append(f"{arm:<12} " + " ".join(f"{c:>22}" for c in cells))
        for r in results[1:]:
            if arm not in r.acc:
                lines.append(f"  {r.mode}: MISS, no finished cell")
                ok = False
                continue
            diff, tol, good = agrees(ref.acc[arm], r.acc[arm])
            ok &= good
            lines.append(f"  {r.mode} vs {ref.mode}: {100 * diff:+.2f} points (tolerance {100 * tol:.2f}) "
                         f"{'PASS' if good else 'MISS'}")
    for r in results:
        lines.append(f"{r.mode:<10} on {r.device}: {r.images_per_s:,.0f} images/s (cell wall time), "
                     f"peak GPU memory {r.peak_mib:.0f} MiB, study {r.wall_s:.1f} s, {r.failed} failed, "
                     f"{r.stacked} trained in a stack")
        ok &= r.failed == 0 and (r.stacked > 0 or MODES[r.mode][3] != "on")
    return "\n".join(lines), ok


def stack_rows() -> str:
    """The 'stacked seeds' step rows on the GPU, ResNet-8 with 10 seeds, as a Markdown table."""
    from kdablate.bench.core import Scale, table
    from kdablate.bench.stacking import step_rows
    from kdablate.trainer import Runtime

    # Epochs long enough to time on a GPU: 28 MLP batches, 16 ResNet-8 batches of 64.
    scale = Scale(rounds=6, image_samples=2048)
    return table(step_rows(scale, Runtime("cuda"), resnet_seeds=10))


def recipe_table() -> str:
    """crd_cifar100.yaml's KD cell on the GPU: images/s for one seed and for seeds stacked, and one
    seed's projected wall time (``kdablate.bench.recipe``), as a Markdown table."""
    from kdablate.bench.core import table
    from kdablate.bench.recipe import recipe_rows
    from kdablate.trainer import Runtime

    return table(recipe_rows(Runtime("cuda")))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The defaults are the README's run: K = 100 and long enough to leave the accuracy ceiling.
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar100")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(14, os.cpu_count() or 1), help="torch threads of the CPU run")
    p.add_argument("--modes", default="cpu,cuda,cuda-bf16,cuda-w2,cuda-stack")
    p.add_argument("--out", type=Path, default=Path("figures/gpu"))
    p.add_argument("--stack-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="first time stacked vs one-by-one epochs on the GPU")
    p.add_argument("--recipe-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="time crd_cifar100.yaml's KD cell (resnet32x4 -> resnet8x4) and project one seed")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if [m for m in modes if m not in MODES] or modes[0] != "cpu":
        p.error(f"--modes: the first must be cpu, the rest from {', '.join(MODES)}; got {args.modes}")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    modes = args.modes
    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device on this machine, so there is nothing to check; "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
        return 2
    for wanted, what, rows in ((args.stack_rows, "stacked-seed", stack_rows), (args.recipe_rows, "recipe", recipe_table)):
        if not wanted:
            continue
        try:
            print(rows(), flush=True)
        except Exception as e:  # report it, and still check the study modes
            print(f"gpu-check: the {what} rows failed: {type(e).__name__}: {e}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdablate-gpu-") as tmp:
        folder = Path(tmp)
        study = write_study(folder, args.train, args.epochs, args.seeds, args.dataset)
        done = {}
        for mode in modes[1:] + modes[:1]:  # the GPU first: the CPU reference is the slow part
            r = done[mode] = run_mode(study, mode, folder, args.threads)
            print(f"gpu-check: {mode} done in {r.wall_s:.1f} s, {r.images_per_s:,.0f} images/s, "
                  + ", ".join(f"{arm} {mean_std(v)}" for arm, v in r.acc.items()), flush=True)
        results = [done[m] for m in modes]
    text, ok = report(results)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}\n{text}")
    print("gpu-check: PASS" if ok else "gpu-check: MISS (see above)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
         "args": {k: str(v) for k, v in vars(args).items()}, "results": [dataclasses.asdict(r) for r in results]},
        indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
