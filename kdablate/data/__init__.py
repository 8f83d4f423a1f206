"""Datasets: the in-memory bundle and its registry, MNIST-1D (generated), the image
formats (CIFAR, MNIST, ImageFolder) and their synthetic stand-ins (``fake``).

Importing the package registers every dataset.
"""
from kdablate.data import mnist1d, vision  # noqa: F401  (registration)
from kdablate.data.bundle import (DATASETS, DataBundle, DataShape, apply_crop_flip, balanced_subset, crop_flip, on_device,
                                  crop_flip_params, describe_dataset, split_train_val)
from kdablate.data.cache import load_dataset

__all__ = ["DATASETS", "DataBundle", "DataShape", "apply_crop_flip", "balanced_subset", "crop_flip", "on_device",
           "crop_flip_params", "describe_dataset", "load_dataset", "split_train_val"]
