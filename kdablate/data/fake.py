"""Synthetic datasets written in the *real* on-disk formats (CIFAR pickles, MNIST idx, ImageFolder).

For tests, and for trying the image studies where the real data cannot be
downloaded. The images are learnable and hierarchical: each superclass has a
random low-resolution template, each class adds its own weaker template, and
every image is its class pattern, randomly shifted, plus noise. So classes of
one superclass really are similar, which the ``oracle`` structure and a teacher
can pick up. These are *not* CIFAR: numbers on them say nothing about CIFAR.

    python -m kdablate.data.fake cifar100 data --train 50000 --test 10000
"""
from __future__ import annotations

import argparse
import pickle
import struct
from pathlib import Path

import numpy as np


def class_images(labels: np.ndarray, groups: np.ndarray, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 (N, C, H, W) images of ``labels`` with superclass ``groups[label]``."""
    c, h, w = shape
    rng = np.random.default_rng(1234)  # the templates are fixed; ``seed`` only drives the samples
    k, g = len(groups), int(groups.max()) + 1
    coarse = rng.normal(0, 1, (g, c, 4, 4)).repeat(h // 4 + 1, 2).repeat(w // 4 + 1, 3)[:, :, :h, :w]
    fine = rng.normal(0, 1, (k, c, 8, 8)).repeat(h // 8 + 1, 2).repeat(w // 8 + 1, 3)[:, :, :h, :w]
    pattern = coarse[groups] + 0.6 * fine
    r = np.random.default_rng(seed)
    x = pattern[labels]
    shifts = r.integers(-3, 4, size=(len(labels), 2))
    x = np.stack([np.roll(img, tuple(s), axis=(1, 2)) for img, s in zip(x, shifts)])
    x = x + r.normal(0, 1.0, x.shape)
    return np.clip(128 + 40 * x, 0, 255).astype(np.uint8)


def write_cifar(root: Path, name: str = "cifar100", n_train: int = 400, n_test: int = 100, seed: int = 0) -> Path:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) pickles."""
    k = 10 if name == "cifar10" else 100
    groups = np.arange(k) // (2 if k == 10 else 5)
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if k == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    files = {"test_batch" if k == 10 else "test": n_test}
    files.update({f"data_batch_{i}": n_train // 5 for i in range(1, 6)} if k == 10 else {"train": n_train})
    for i, (fname, n) in enumerate(files.items()):
        y = np.concatenate([np.arange(min(n, k)), rng.integers(0, k, max(0, n - k))])
        x = class_images(y, groups, (3, 32, 32), seed + i + 1).reshape(n, 3072)
        batch = {b"data": x, b"labels": y.tolist()} if k == 10 else {
            b"data": x, b"fine_labels": y.tolist(), b"coarse_labels": groups[y].tolist()}
        with open(folder / fname, "wb") as fh:
            pickle.dump(batch, fh)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, ubyte = 8, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as fh:
        fh.write(struct.pack(">BBBB", 0, 0, 8, array.ndim))
        fh.write(struct.pack(f">{array.ndim}I", *array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """Uncompressed idx files where torchvision's MNIST / FashionMNIST look for them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", class_images(y, np.arange(10) // 2, (1, 28, 28), n)[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return root


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), per_class: int = 6) -> Path:
    """``root/{train,test}/<class>/<i>.{jpg,png}``, JPEG and PNG alternating."""
    from PIL import Image

    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            imgs = class_images(np.full(per_class, c), np.arange(len(classes)), (3, 20, 24), 10 * s + c)
            for i, img in enumerate(imgs):
                ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
                Image.fromarray(img.transpose(1, 2, 0)).save(root / split / name / f"{i}.{ext}", fmt)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"))
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--test", type=int, default=10000)
    args = p.parse_args(argv)
    if args.dataset.startswith("cifar"):
        write_cifar(args.root, args.dataset, args.train, args.test)
    elif args.dataset == "imagefolder":
        write_imagefolder(args.root, per_class=max(1, args.train // 3))
    else:
        write_mnist(args.root, "MNIST" if args.dataset == "mnist" else "FashionMNIST", args.train, args.test)
    print(f"wrote synthetic {args.dataset} in its real format under {args.root} (not the real data)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
