"""The benchmark suite: ``make bench`` (``python -m kdablate.bench``).

    python -m kdablate.bench [--sections trainer,levers,il,system,baseline] [--compile] [--quick]

Prints one table, every ratio measured side by side in this process
(interleaved rounds, medians, warm-up excluded; see ``kdablate.bench.core``),
for the default data (MNIST-1D-shaped signals, MLP student, K = 10) and for
32x32x3 images with ResNet-20, and writes it with the machine's description to
``figures/bench/bench.json``. Sections:

* ``trainer`` (``kdablate.bench.trainer``): the trainer against a hand-written loop, KD
  (cached / online teacher) against CE, the data pipeline against the model step;
  the ResNet-20 step's GFLOP/s against a large convolution's (``kdablate.bench.levers``);
* ``levers`` (``kdablate.bench.levers``): channels_last, bf16 autocast, and with
  ``--compile`` torch.compile;
* ``il`` (``kdablate.bench.explain``): an IL step per explanation source against a CE step, and
  saliency exact and sketched (``sketch`` = m) at K = 10 and 100 on the MLP and the 1-D CNN;
* ``system`` (``kdablate.bench.system``, ``kdablate.bench.stacking``): a study of 8 cells with
  2 workers against 1, peak RSS of a cell, of the study, and of a ResNet-20 cell; seeds
  trained stacked against one by one (an epoch per model, and the 8-cell study);
* ``baseline`` (``kdablate.bench.baseline``): the components study at this code's defaults against
  the code before stacking (a git worktree of it), whole processes one after the other (~10 min).

Timings run on ``--threads`` torch threads (default 1; a study's cells now default to cores ÷ workers).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from kdablate.bench import baseline as bench_baseline, explain as bench_explain, levers as bench_levers
from kdablate.bench import stacking as bench_stacking
from kdablate.bench import system as bench_system, trainer as bench_trainer
from kdablate.bench.core import FULL, QUICK, Row, Scale, table

SECTIONS = ("trainer", "levers", "il", "system", "baseline")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(threads: int) -> dict[str, str | int]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "load_1min": round(load, 2)}


def trainer_section(scale: Scale, _compile: bool) -> list[Row]:
    rows, _ = bench_trainer.trainer_rows(bench_trainer.DEFAULT, scale)
    resnet, extra = bench_trainer.trainer_rows(bench_trainer.RESNET, scale)
    return rows + resnet + [bench_levers.gflops_row(scale, extra["ce_step_s"])]


def system_section(scale: Scale, _compile: bool) -> list[Row]:
    return (bench_system.study_rows(scale) + bench_system.overhead_rows(scale) + [bench_system.resnet_memory_row(scale)]
            + bench_stacking.all_rows(scale))


RUNNERS: dict[str, Callable[[Scale, bool], list[Row]]] = {
    "trainer": trainer_section,
    "levers": bench_levers.lever_rows,
    "il": lambda scale, _: bench_explain.all_rows(scale),
    "system": system_section,
    "baseline": lambda scale, _: [bench_baseline.baseline_row(scale)],
}


def run(sections: tuple[str, ...], scale: Scale, with_compile: bool = False) -> list[Row]:
    rows: list[Row] = []
    for name in sections:
        t0 = time.perf_counter()
        new = RUNNERS[name](scale, with_compile)
        for r in new:
            print(f"  {r.section:34} {r.name:58} {r.value:10.3f} {r.unit:9} {r.status:4} {r.note}", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        rows += new
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="kdablate's benchmark suite (see the module docstring).")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (tens of seconds to compile)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, numbers mean nothing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path("figures/bench/bench.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s): {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    info = machine(args.threads)
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} thread(s), "
          f"batch {scale.batch}, load average {info['load_1min']} at the start", flush=True)
    t0 = time.perf_counter()
    rows = run(sections, scale, args.compile)
    elapsed = time.perf_counter() - t0
    print(f"\n{table(rows)}\n\n{sum(r.ok is True for r in rows)} targets met, "
          f"{sum(r.ok is False for r in rows)} missed; {elapsed:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": info, "scale": dataclasses.asdict(scale),
                  "seconds": elapsed, "rows": [{**dataclasses.asdict(r), "status": r.status} for r in rows]}
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
