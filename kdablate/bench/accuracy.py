"""Does bf16 autocast keep accuracy? Paired fp32 / bf16 cells, same seeds (not part of ``make bench``).

    python -m kdablate.bench.accuracy [--seeds 5] [--resnet-seeds 2]

* default data: the MLP student with CE and with KD from the cached CNN-1D teacher
  (the teacher trained once in fp32), 40 epochs, as in ``studies/components.yaml``;
* ResNet-20 on a synthetic 10-class CIFAR (``kdablate.data.fake``: class templates
  plus noise, crop + flip), 3 epochs: a check that bf16 trains the same, not a CIFAR number.

Prints test accuracy per seed and the paired mean difference (bf16 - fp32).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdablate.bench.core import KD
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle, load_dataset
from kdablate.data.fake import write_cifar
from kdablate.trainer import Runtime, TeacherSignal, fit, predict


def paired(name: str, spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
           seeds: range, teacher: TeacherSignal | None = None) -> dict[str, list[float]]:
    """Test accuracy (%) per seed with amp none and bf16; prints one line per cell."""
    acc: dict[str, list[float]] = {"none": [], "bf16": []}
    for seed in seeds:
        for amp in acc:
            t0 = time.perf_counter()
            result = fit(spec, data, optim, knowledge, seed, teacher=teacher, runtime=Runtime("cpu", amp))
            acc[amp].append(100 * result.metrics["report/test_acc"])
            print(f"  {name:22} seed {seed} {amp:5} test acc {acc[amp][-1]:6.2f}%  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    diffs = [b - a for a, b in zip(acc["none"], acc["bf16"])]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"{name}: fp32 {statistics.mean(acc['none']):.2f}%, bf16 {statistics.mean(acc['bf16']):.2f}%, "
          f"paired difference {statistics.mean(diffs):+.2f} ± {sd:.2f} (n={len(diffs)})", flush=True)
    return acc


def cached_teacher(data: DataBundle) -> TeacherSignal:
    """A CNN-1D teacher trained with CE in fp32, as its cached logits on every split."""
    model = fit(ModelSpec(name="cnn1d"), data, OptimConfig(epochs=30), KnowledgeConfig(), 0).model
    return TeacherSignal({s: predict(model, data.split(s)[0], prepare=data.prepare) for s in ("train", "val", "test")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fp32 vs bf16 autocast accuracy, paired by seed.")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--resnet-seeds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", {"num_samples": 5000})
    mlp, optim = ModelSpec(name="mlp"), OptimConfig(epochs=40)
    paired("mlp ce", mlp, data, optim, KnowledgeConfig(), range(args.seeds))
    paired("mlp kd (cnn1d)", mlp, data, optim, KD, range(args.seeds), cached_teacher(data))
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar10", n_train=2000, n_test=500)
        images = load_dataset("cifar10", {"data_root": tmp, "augment": True})
        paired("resnet20 ce (synthetic)", ModelSpec(name="resnet20"), images, OptimConfig(epochs=3, lr=0.1), KnowledgeConfig(),
               range(args.resnet_seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
