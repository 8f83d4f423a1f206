"""Datasets as in-memory tensors, split into train / val / test: the bundle, the
dataset registry, and the split and augmentation helpers every dataset shares."""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch

from kdablate.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Splits as tensors: x_* (N, *input_shape), float32 or uint8 images; y_* (N,) int64.

    mean / std: per-channel normalisation applied by ``prepare`` (uint8 is scaled
    to [0, 1] first); augment: 'none' or 'crop_flip' (random crop with padding 4
    and horizontal flip, on training batches only); class_groups: (K,) the
    superclass of each class when the data has a hierarchy (CIFAR-100).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str = "none"
    class_groups: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (x, y) of a split; pass x through ``prepare`` before a model sees it."""
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits of sha256 over every split's samples and labels and the class count:
        what a teacher cache records it was made from, so other data is never silently used."""
        h = hashlib.sha256(str(self.num_classes).encode())
        for name in ("train", "val", "test"):
            for t in self.split(name):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean / std as tensors on ``device``, built once per device rather than on every batch."""
        cache = self.__dict__.setdefault("_norm_by_device", {})  # a frozen dataclass: its own dict
        if device not in cache:
            cache[device] = torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device)
        return cache[device]

    def prepare(self, x: torch.Tensor, train: bool = False, generator: torch.Generator | None = None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *shape) raw batch -> float32 model input: scaled, normalised, augmented if ``train``.

        views: (B, 3) fixed (dy, dx, flip) augmentations instead of random ones (teacher view cache).
        """
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if self.mean is not None:
            mean, std = self._normalisation(x.device)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - mean.view(shape)) / std.view(shape)
        if train and self.augment == "crop_flip":
            x = apply_crop_flip(x, views if views is not None else crop_flip_params(len(x), generator))
        return batch_layout(x)


# Images up to this size live on the GPU (CIFAR's 50,000 uint8 images are 150 MiB); larger sets
# stay in pinned host memory and go over per epoch.
DEVICE_DATA_BYTES = 4 << 30


def on_device(data: DataBundle, device: str) -> DataBundle:
    """``data`` with its images on ``device``: one copy of each split, uint8 kept uint8, so a batch's
    gather, scaling, normalisation, crop and flip run there. Labels stay on the CPU (epoch orders
    index them there and they go over once an epoch); the fingerprint is the CPU bundle's."""
    images = sum(data.split(s)[0].nbytes for s in ("train", "val", "test"))
    if device == "cpu" or images > DEVICE_DATA_BYTES:
        return data
    fingerprint = data.fingerprint  # hashed on the CPU, before the move
    moved = dataclasses.replace(data, **{f"x_{s}": data.split(s)[0].to(device) for s in ("train", "val", "test")})
    moved.__dict__["fingerprint"] = fingerprint
    return moved


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a study checks a dataset against before any cell trains (``kdablate.checks``)."""

    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    has_hierarchy: bool

    @classmethod
    def of(cls, data: DataBundle) -> "DataShape":
        return cls(data.input_shape, data.num_classes, len(data.y_train), data.class_groups is not None)


def batch_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch in the layout the models use: (B, C, H, W) images channels_last (measured +27-57%
    training throughput for convnets on this CPU; ``kdablate.models.factory.place_model`` puts image
    models in it too), any other batch as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def crop_flip_params(b: int, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """(B, 3) random (dy, dx, flip) of the standard CIFAR augmentation."""
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = (torch.rand(b, generator=generator) < 0.5).long()
    return torch.stack([dy, dx, flip], 1)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> random crops of the zero-padded images, half of them flipped (per sample)."""
    return apply_crop_flip(x, crop_flip_params(len(x), generator, pad), pad)


def apply_crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """(B, C, H, W) and (B, 3) (dy, dx, flip) -> the crops of the zero-padded images, flipped where asked.
    Runs where ``x`` is (the GPU for device-resident data); ``params`` are drawn on the CPU, seeded."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    params = params.to(x.device, non_blocking=True)
    dy, dx, flip = params[:, 0], params[:, 1], params[:, 2].bool()
    # Gather rows then columns with per-sample offsets: no Python loop over the batch.
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :].expand(b, x.shape[1], h, w)
    out = out.gather(3, cols)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of about ``n`` samples with (as far as possible) equal counts per class."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per = max(1, n // len(classes))
    picks = [idx[torch.randperm(len(idx), generator=g)[:per]] for idx in (torch.nonzero(labels == c).squeeze(1) for c in classes)]
    return torch.cat(picks).sort().values


def split_train_val(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out ``val_fraction`` of (x, y) at random, seeded; returns x_tr, y_tr, x_val, y_val."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]


def describe_dataset(name: str, params: dict) -> DataShape:
    """The dataset's ``DataShape``: from the plugin's cheap ``describe()`` if it has one, else
    by loading it (which also fails now, at study load, when its files are missing)."""
    plugin = DATASETS.build(name, params)
    return plugin.describe() if hasattr(plugin, "describe") else DataShape.of(plugin.load())

