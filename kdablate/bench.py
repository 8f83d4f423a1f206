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
import statistics
import time

import torch

from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.explanations import EXPLANATIONS
from kdablate.trainer import make_member, train_step

MODELS = {"mlp": ModelSpec(name="mlp"), "cnn1d-32": ModelSpec(name="cnn1d", params={"channels": 32, "depth": 3})}


def variants() -> dict[str, KnowledgeConfig]:
    il = dict(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9)
    # The same soft target with a uniform structure: what IL costs beyond the KD loss itself.
    out = {"ce": KnowledgeConfig(), "soft target, uniform": KnowledgeConfig(structure="uniform", **il)}
    for source in EXPLANATIONS.names():
        out[f"il {source}"] = KnowledgeConfig(structure={"name": "explanation", "source": source}, **il)
    for every, fraction in ((2, 1.0), (4, 1.0), (1, 0.25), (4, 0.5)):
        name = f"il saliency every={every} fraction={fraction}"
        out[name] = KnowledgeConfig(structure={"name": "explanation", "every": every, "fraction": fraction}, **il)
    return out


def synthetic(num_classes: int, n: int = 512) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 40, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return DataBundle(x, y, x[:64], y[:64], x[:64], y[:64], num_classes)


def time_steps(member, data: DataBundle, steps: int, batch: int, start: int) -> float:
    """Mean ms of ``steps`` training steps."""
    t0 = time.perf_counter()
    for s in range(start, start + steps):
        i = (s * batch) % (len(data.y_train) - batch)
        train_step([member], data.x_train[i : i + batch], data.y_train[i : i + batch], s, data.num_classes,
                   None, None, torch.Generator().manual_seed(s))
    return 1000 * (time.perf_counter() - t0) / steps


def bench(spec: ModelSpec, num_classes: int, steps: int, rounds: int, batch: int = 128) -> dict[str, tuple[float, float]]:
    """variant -> (median ms per step, median ratio to CE)."""
    data = synthetic(num_classes)
    optim = OptimConfig(epochs=1000, batch_size=batch)
    members = {name: make_member(spec, data, optim, k, 0, 4) for name, k in variants().items()}
    for m in members.values():  # warm-up: allocator, first-call overheads
        time_steps(m, data, 3, batch, 0)
    ms: dict[str, list[float]] = {name: [] for name in members}
    for r in range(rounds):
        for name, m in members.items():
            ms[name].append(time_steps(m, data, steps, batch, 3 + r * steps))
    ratios = {name: statistics.median(a / c for a, c in zip(v, ms["ce"])) for name, v in ms.items()}
    return {name: (statistics.median(v), ratios[name]) for name, v in ms.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="IL step cost against a CE step, side by side.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 128, median of {args.rounds} rounds "
          f"x {args.steps} steps")
    for model_name, spec in MODELS.items():
        for k in (10, 100):
            print(f"\n{model_name}, K={k}")
            print(f"  {'variant':42} {'ms/step':>8} {'x CE':>6}")
            for name, (ms, ratio) in bench(spec, k, args.steps, args.rounds).items():
                print(f"  {name:42} {ms:8.2f} {ratio:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
