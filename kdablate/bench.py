"""Per-step cost of introspective learning against a CE step, measured side by side.

    python -m kdablate.bench [--steps 20] [--rounds 5]

For K=10 and K=100, on the default MLP student and a CAM-friendly CNN, times a
plain CE step and an IL step per explanation source (constant mass +
explanation structure), plus the cheap saliency schedules (every n steps, a
fraction of the batch). Variants are interleaved round by round so drift hits
them alike; each ratio is the median over rounds of (variant ms / CE ms).
Targets: cam <= x1.10, saliency (cheapest setting that keeps accuracy) <= x3.
The 'soft target, uniform' row is the KD loss alone, so the explanation's own
overhead is the difference to it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.explanations import EXPLANATIONS
from kdablate.trainer import make_member, train_step

# name -> (model, input shape): the default MNIST-1D student, a CAM-friendly 1-D CNN, and the
# CIFAR-size ResNet-20 on 32x32x3 images, where a step is big enough for fixed overheads to vanish.
# ResNet-20 is measured at K=10 only, in 2 rounds, without integrated gradients: a step of
# those is tens of seconds on this CPU and would dominate the benchmark's 10-minute budget.
MODELS = {
    "mlp": (ModelSpec(name="mlp"), (1, 40), (10, 100), None),
    "cnn1d-32": (ModelSpec(name="cnn1d", params={"channels": 32, "depth": 3}), (1, 40), (10, 100), None),
    "resnet20": (ModelSpec(name="resnet20"), (3, 32, 32), (10,), 2),
}
CYCLE = 4  # every window is a whole number of the longest 'every' schedule, so schedules average right


def variants(skip: tuple[str, ...] = ()) -> dict[str, KnowledgeConfig]:
    il = dict(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9)
    # The same soft target with a uniform structure: what IL costs beyond the KD loss itself.
    out = {"ce": KnowledgeConfig(), "soft target, uniform": KnowledgeConfig(structure="uniform", **il)}
    for source in (n for n in EXPLANATIONS.names() if n not in skip):
        # Integrated gradients multiplies the forward by its steps: 8 keeps the benchmark short
        # (it is meant for offline comparison, not training).
        params = {"steps": 8} if source == "integrated_gradients" else {}
        out[f"il {source}"] = KnowledgeConfig(
            structure={"name": "explanation", "source": source, "source_params": params}, **il)
    for every, fraction in ((2, 1.0), (4, 1.0), (1, 0.25), (4, 0.5)):
        name = f"il saliency every={every} fraction={fraction}"
        out[name] = KnowledgeConfig(structure={"name": "explanation", "every": every, "fraction": fraction}, **il)
    return out


def synthetic(num_classes: int, shape: tuple[int, ...] = (1, 40), n: int = 512) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    if len(shape) == 3:
        x = x.contiguous(memory_format=torch.channels_last)
    return DataBundle(x, y, x[:64], y[:64], x[:64], y[:64], num_classes)


def time_steps(member, data: DataBundle, steps: int, batch: int, start: int) -> float:
    """Mean ms of ``steps`` training steps."""
    t0 = time.perf_counter()
    for s in range(start, start + steps):
        i = (s * batch) % (len(data.y_train) - batch)
        train_step([member], data.x_train[i : i + batch], data.y_train[i : i + batch], s, data.num_classes,
                   None, None, torch.Generator().manual_seed(s))
    return 1000 * (time.perf_counter() - t0) / steps


def bench(spec: ModelSpec, shape: tuple[int, ...], num_classes: int, steps: int, rounds: int,
          batch: int = 128, budget_s: float = 0.5, max_step_s: float = 2.0,
          skip: tuple[str, ...] = ()) -> dict[str, tuple[float, float, str]]:
    """variant -> (median ms per step, median ratio to CE, note).

    Each variant runs ``steps`` steps per round, fewer when that would take more than
    ``budget_s`` (but at least 2). A variant slower than ``max_step_s`` a step (integrated
    gradients with 100 classes on a ResNet) is timed on a single step only and says so.
    """
    data = synthetic(num_classes, shape)
    optim = OptimConfig(epochs=1000, batch_size=batch)
    members = {name: make_member(spec, data, optim, k, 0, 4) for name, k in variants(skip).items()}
    first = {}
    for name, m in members.items():  # warm-up (allocator, first calls), then one whole cycle as an estimate
        time_steps(m, data, 1, batch, 0)
        first[name] = time_steps(m, data, CYCLE, batch, 0)
    timed = [n for n in members if first[n] <= max_step_s * 1000]
    n_steps = {n: CYCLE * max(1, min(steps, int(budget_s * 1000 / first[n])) // CYCLE) for n in timed}
    ms: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(rounds):
        for name in timed:
            ms[name].append(time_steps(members[name], data, n_steps[name], batch, CYCLE * (r + 1)))
    out = {name: (statistics.median(v), statistics.median(a / c for a, c in zip(v, ms["ce"])), "")
           for name, v in ms.items()}
    ce = out["ce"][0]
    out.update({n: (first[n], first[n] / ce, f"{CYCLE} steps once") for n in members if n not in timed})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="IL step cost against a CE step, side by side.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path("figures/bench/explanations.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 128, median of {args.rounds} rounds "
          f"x {args.steps} steps")
    results = {}
    for model_name, (spec, shape, ks, rounds) in MODELS.items():
        skip = ("integrated_gradients",) if model_name == "resnet20" else ()
        for k in ks:
            print(f"\n{model_name}, K={k}")
            print(f"  {'variant':42} {'ms/step':>9} {'x CE':>7}")
            rows = bench(spec, shape, k, args.steps, min(args.rounds, rounds or args.rounds), skip=skip)
            results[f"{model_name}/K={k}"] = {n: {"ms": ms, "x_ce": r, "note": note} for n, (ms, r, note) in rows.items()}
            for name, (ms, ratio, note) in rows.items():
                print(f"  {name:42} {ms:9.2f} {ratio:7.2f}  {note}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
