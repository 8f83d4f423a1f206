"""MNIST-1D (Greydanus, 2020, arXiv:2011.14439), the default data.

It is *generated* offline with the ``mnist1d`` package's ``make_dataset``; its
download path is never used, so no run touches the network.
"""
from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np
import torch

from kdablate.data.bundle import DATASETS, DataBundle, DataShape, split_train_val


@DATASETS.register("mnist1d")
class MNIST1D:
    """MNIST-1D, generated: 10 classes of length-40 signals, shaped (N, 1, 40).

    The test split is the generator's own (the last ``1 - train_split``), so
    numbers compare with the literature; validation is carved from its train part.
    """

    @dataclasses.dataclass(frozen=True)
    class Params:
        num_samples: int = 5000
        train_split: float = 0.8
        val_fraction: float = 0.1
        generator_seed: int = 42
        split_seed: int = 0

        def __post_init__(self) -> None:
            if self.num_samples < 100:
                raise ValueError(f"num_samples must be >= 100, got {self.num_samples}")
            for f in ("train_split", "val_fraction"):
                if not 0.0 < getattr(self, f) < 1.0:
                    raise ValueError(f"{f} must be in (0, 1), got {getattr(self, f)}")

    def __init__(self, params: Params) -> None:
        self.params = params

    def load(self) -> DataBundle:
        return _mnist1d(self.params)

    def cache_identity(self) -> dict[str, str]:
        """What the generated data depends on beyond the params, for ``kdablate.data.cache``:
        the generator's package and numpy (whose random streams it draws from)."""
        from importlib.metadata import version

        return {"mnist1d": version("mnist1d"), "numpy": np.__version__, "format": "1"}

    def describe(self) -> DataShape:
        """The shape of ``load()`` without generating the data (which takes seconds): the
        generator makes num_samples // 10 per class and splits at int(n * train_split)."""
        from mnist1d.data import get_dataset_args

        p = self.params
        n = (p.num_samples // 10) * 10
        n_fit = int(n * p.train_split)
        return DataShape((1, get_dataset_args().final_seq_length), 10, n_fit - int(round(n_fit * p.val_fraction)), False)


@functools.lru_cache(maxsize=4)
def _mnist1d(p: MNIST1D.Params) -> DataBundle:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = p.num_samples, p.train_split, p.generator_seed
    # make_dataset reseeds the global numpy / random RNGs; keep the caller's.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = torch.as_tensor(d["x"], dtype=torch.float32)[:, None, :]
    y = torch.as_tensor(d["y"], dtype=torch.int64)
    x_tr, y_tr, x_val, y_val = split_train_val(x, y, p.val_fraction, p.split_seed)
    x_te = torch.as_tensor(d["x_test"], dtype=torch.float32)[:, None, :]
    y_te = torch.as_tensor(d["y_test"], dtype=torch.int64)
    return DataBundle(x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes=10)
