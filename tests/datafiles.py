"""Tiny datasets in each real on-disk format (written by kdablate.data.fake), per dataset plugin."""
from __future__ import annotations

from pathlib import Path

from kdablate.data.fake import write_cifar, write_imagefolder, write_mnist

# dataset name -> params after writing its files under the given root; a new dataset plugin needs an entry.
WRITERS = {
    "cifar10": lambda r: {"data_root": str(write_cifar(r, "cifar10", 100, 40))},
    "cifar100": lambda r: {"data_root": str(write_cifar(r, "cifar100", 400, 100))},
    "mnist": lambda r: {"data_root": str(write_mnist(r))},
    "fashion_mnist": lambda r: {"data_root": str(write_mnist(r, "FashionMNIST"))},
    "imagefolder": lambda r: {"data_root": str(write_imagefolder(r)), "image_size": 16},
    "mnist1d": lambda r: {"num_samples": 500},
}

# The teacher checkpoints the shipped studies point at (a user provides the real files): path -> (model, classes).
SHIPPED_CHECKPOINTS = {"teachers/resnet32x4.pth": ("resnet32x4", 100)}


def write_shipped_checkpoints(folder: Path) -> None:
    """Untrained stand-ins of SHIPPED_CHECKPOINTS under ``folder``, wrapped as mdistiller saves them."""
    import torch

    from kdablate.models import build_model

    for rel, (name, k) in SHIPPED_CHECKPOINTS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": build_model(name, {}, (3, 32, 32), k).state_dict()}, folder / rel)

# The smallest study that trains: CE and label smoothing on 300 MNIST-1D signals, 1 epoch, no teacher.
TINY_STUDY = """
base:
  data: {name: mnist1d, num_samples: 300}
  student: {name: mlp, hidden: 8, depth: 1}
  optim: {epochs: 1, batch_size: 32}
  teacher: null
seeds: [0, 1]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - {name: ls, mass: {name: constant, eps: 0.1}, structure: uniform, alpha: 1.0}
analysis: {baseline: ce}
"""
