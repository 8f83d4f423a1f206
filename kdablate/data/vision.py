"""Image datasets in their real on-disk formats, decoded once into uint8 tensors.

CIFAR-10/100 (the python pickles), MNIST and Fashion-MNIST (idx files, read by
torchvision) and ImageFolder (``train/`` and ``test/`` folders of class
subfolders). Nothing is downloaded unless ``download: true``; missing files give
an error that says what to put where. Decoded tensors are cached under
``<data_root>/.kdablate/`` keyed by the source files' names, sizes and mtimes, so
a folder of 60k JPEGs is decoded once. Images stay uint8 in memory; the trainer
normalises (and, for training, augments) each batch as float.
"""
from __future__ import annotations

import abc
import dataclasses
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kdablate.data.bundle import DATASETS, DataBundle, balanced_subset, split_train_val
from kdablate.hashing import stable_hash
from kdablate.registry import ConfigError
from kdablate.storage import atomic_save, file_lock, load_tensors

# Per-dataset channel mean / std of the training set, in [0, 1] units.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclasses.dataclass(frozen=True)
class VisionParams:
    """Shared parameters of the image datasets."""

    data_root: str = "data"
    download: bool = False
    train_subset: int = 0
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.train_subset < 0:
            raise ValueError(f"train_subset must be >= 0 (0: all), got {self.train_subset}")
        if not self.download and not Path(self.data_root).is_dir():
            raise ValueError(f"data_root '{self.data_root}' does not exist; create it and put the dataset there, "
                             "or set download: true")


# The only globals a CIFAR python batch refers to: numpy's array reconstruction. The real
# files (Python 2 cPickle, protocol 2) name numpy.core.multiarray._reconstruct, numpy.ndarray
# and numpy.dtype; numpy >= 2 writes numpy._core; protocol 5 (Python >= 3.14's default, e.g. a
# kdablate.data.fake batch there) writes arrays through numeric._frombuffer. Everything else a
# batch holds (dicts, lists, ints, bytes) needs no global.
CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: any other global is refused before it is imported,
    so a crafted file cannot run code (``pickle.load`` would call whatever it names)."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        super().__init__(fh, encoding="bytes")  # the real files are Python 2 str: keep them bytes
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR_GLOBALS:
            what = f"{module}.{name}"  # a crafted name may hold newlines: keep the message one line
            what = what[:120] if what.isprintable() else ascii(what)[:120]
            raise ConfigError(f"refusing to load {self.path}: it asks for {what}; not a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR batch file -> its dict (bytes keys), through ``CifarUnpickler``; a one-line
    ConfigError for a file that is not one (foreign globals, truncated, not a pickle)."""
    try:
        with open(path, "rb") as fh:
            batch = CifarUnpickler(fh, path).load()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle: any failure means not a batch
        raise ConfigError(f"cannot read {path}: {type(e).__name__}; not a CIFAR batch (extract it again)") from None
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ConfigError(f"cannot read {path}: no b'data' entry; not a CIFAR batch (extract it again)")
    return batch


def read_cifar(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The python-pickle CIFAR under ``root``: uint8 (N, 3, 32, 32) images and int64 labels.

    CIFAR-100 also gives ``coarse`` (K,) : the superclass of each fine class.
    """
    folder = root / CIFAR_DIRS[name]
    files = (["data_batch_%d" % i for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    missing = [f for f in files[0] + files[1] if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{name} not found: expected {folder}/{missing[0]} (the python version of the dataset, "
                         f"extracted); put it there or set download: true")
    key = b"labels" if name == "cifar10" else b"fine_labels"
    out: dict[str, torch.Tensor] = {}
    for split, names in zip(("train", "test"), files):
        batches = [_unpickle(folder / f) for f in names]
        x = torch.cat([torch.as_tensor(b[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32) for b in batches])
        out[f"x_{split}"], out[f"y_{split}"] = x, torch.cat([torch.as_tensor(b[key]) for b in batches]).long()
        if name == "cifar100":
            coarse = torch.cat([torch.as_tensor(b[b"coarse_labels"]) for b in batches]).long()
            groups = torch.zeros(100, dtype=torch.long).scatter_(0, out[f"y_{split}"], coarse)
            out["groups"] = groups
    return out


def read_mnist(root: Path, name: str, download: bool) -> dict[str, torch.Tensor]:
    """MNIST / Fashion-MNIST from the idx files torchvision expects: uint8 (N, 1, 28, 28)."""
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    out: dict[str, torch.Tensor] = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError:
            raw = root / cls.__name__ / "raw"
            raise ConfigError(f"{name} not found: expected {raw}/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                              "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (uncompressed); put them there "
                              "or set download: true") from None
        out[f"x_{split}"], out[f"y_{split}"] = ds.data[:, None].clone(), ds.targets.long().clone()
    return out


def read_imagefolder(root: Path, image_size: int) -> dict[str, torch.Tensor]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` images, RGB, resized to image_size²."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    out: dict[str, torch.Tensor] = {}
    classes = None
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"imagefolder not found: expected {root / split}/<class>/<image> folders; create "
                              "train/ and test/ with one subfolder per class")
        ds = ImageFolder(str(root / split))
        if classes is not None and ds.classes != classes:
            raise ConfigError(f"imagefolder: {root}/test has classes {ds.classes}, train has {classes}; make them match")
        classes = ds.classes
        images = []
        for path, _ in ds.samples:
            with Image.open(path) as im:
                images.append(pil_to_tensor(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)))
        out[f"x_{split}"] = torch.stack(images)
        out[f"y_{split}"] = torch.tensor(ds.targets, dtype=torch.long)
    return out


def source_signature(root: Path) -> str:
    """A key that changes whenever a file under ``root`` (outside our cache) changes."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".kdablate" not in p.parts)
    return stable_hash([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def decoded(name: str, root: Path, reader, extra: str = "") -> dict[str, torch.Tensor]:
    """``reader()`` once per source signature; afterwards a torch.load of the cached tensors."""
    path = root / ".kdablate" / f"{name}{extra}-{source_signature(root)}.pt"
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            atomic_save(reader(), path)
    return load_tensors(path)


class VisionDataset(abc.ABC):
    """Base of the image dataset plugins: read, cache, subset, split, and describe batches."""

    name = ""
    num_classes = 0
    crop_flip = True  # the standard CIFAR augmentation makes sense for this data

    def __init__(self, params: VisionParams) -> None:
        self.params = params

    @abc.abstractmethod
    def read(self, root: Path) -> dict[str, torch.Tensor]:
        """Decode the files under ``root``: x_/y_ train and test, uint8 images and int64 labels."""

    def read_cached(self) -> dict[str, torch.Tensor]:
        root = Path(self.params.data_root)
        return decoded(self.name, root, lambda: self.read(root), self.cache_suffix())

    def cache_suffix(self) -> str:
        return ""

    def load(self) -> DataBundle:
        d, p = self.read_cached(), self.params
        x_tr, y_tr = d["x_train"], d["y_train"]
        x_tr, y_tr, x_val, y_val = split_train_val(x_tr, y_tr, p.val_fraction, p.split_seed)
        if p.train_subset:
            keep = balanced_subset(y_tr, p.train_subset, p.split_seed)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        mean, std = NORMALIZATION[self.name]
        return DataBundle(x_tr, y_tr, x_val, y_val, d["x_test"], d["y_test"], self.num_classes or int(d["y_train"].max()) + 1,
                          mean=mean, std=std, augment="crop_flip" if p.augment and self.crop_flip else "none",
                          class_groups=d.get("groups"))


@DATASETS.register("cifar10")
class CIFAR10(VisionDataset):
    Params = VisionParams
    name, num_classes = "cifar10", 10

    def read(self, root: Path) -> dict[str, torch.Tensor]:
        if self.params.download:
            from torchvision.datasets import CIFAR10 as TV

            TV(str(root), download=True)
        return read_cifar(root, self.name)


@DATASETS.register("cifar100")
class CIFAR100(VisionDataset):
    """CIFAR-100; ``coarse: true`` trains on the 20 superclasses. Fine labels carry their
    superclass as ``class_groups`` for the ``oracle`` structure."""

    @dataclasses.dataclass(frozen=True)
    class Params(VisionParams):
        coarse: bool = False

    name, num_classes = "cifar100", 100

    def read(self, root: Path) -> dict[str, torch.Tensor]:
        if self.params.download:
            from torchvision.datasets import CIFAR100 as TV

            TV(str(root), download=True)
        return read_cifar(root, self.name)

    def read_cached(self) -> dict[str, torch.Tensor]:
        d = super().read_cached()
        if not self.params.coarse:
            return d
        groups = d["groups"]
        return {"x_train": d["x_train"], "y_train": groups[d["y_train"]], "x_test": d["x_test"],
                "y_test": groups[d["y_test"]]}

    def load(self) -> DataBundle:
        bundle = super().load()
        return dataclasses.replace(bundle, num_classes=20) if self.params.coarse else bundle


@DATASETS.register("mnist")
class MNISTImages(VisionDataset):
    Params = VisionParams
    name, num_classes, crop_flip = "mnist", 10, False

    def read(self, root: Path) -> dict[str, torch.Tensor]:
        return read_mnist(root, self.name, self.params.download)


@DATASETS.register("fashion_mnist")
class FashionMNIST(MNISTImages):
    name = "fashion_mnist"


@DATASETS.register("imagefolder")
class ImageFolderData(VisionDataset):
    """Your own images: ``data_root/train/<class>/*`` and ``data_root/test/<class>/*``."""

    @dataclasses.dataclass(frozen=True)
    class Params(VisionParams):
        image_size: int = 32

    name = "imagefolder"

    def read(self, root: Path) -> dict[str, torch.Tensor]:
        return read_imagefolder(root, self.params.image_size)

    def cache_suffix(self) -> str:
        return f"-{self.params.image_size}px"
