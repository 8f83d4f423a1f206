"""Tiny datasets in each real on-disk format (written by kdablate.data.fake), per dataset plugin."""
from __future__ import annotations

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
