"""A disk cache of generated datasets, so a study process (and each of its workers) loads
MNIST-1D instead of generating it again: ``make_dataset`` took ~6 s of a study's start-up here.

A dataset plugin opts in with ``cache_identity()``: what its data depends on beyond its
params (the generator's and numpy's versions for MNIST-1D), so a new generator never meets
an old file. The file is a ``kdablate.storage`` envelope (sha256, size, key; tensors only,
``weights_only``), written atomically: a truncated, edited or foreign file is generated
again with a one-line note, never used, and a cache that cannot be written costs only time.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from kdablate.data.bundle import DATASETS, DataBundle
from kdablate.hashing import stable_hash
from kdablate.storage import StorageError, atomic_write, pack_checkpoint, unpack_checkpoint

_LOADED: dict[str, DataBundle] = {}  # this process's last few, by key: each cell asks again
_KEEP = 4  # as MNIST-1D's in-process cache: a long-lived (Ray) worker must not hoard datasets


def load_dataset(name: str, params: dict, cache_dir: Path | None = None) -> DataBundle:
    """Build the dataset plugin ``name`` with ``params`` and return its splits; a plugin with
    ``cache_identity()`` (generated data) is read from, or written to, ``cache_dir`` when given."""
    plugin = DATASETS.build(name, params)
    identity = getattr(plugin, "cache_identity", None)
    if cache_dir is None or identity is None:
        return plugin.load()
    return cached_load(name, plugin.params, identity(), plugin.load, cache_dir)


def cache_path(cache_dir: Path, name: str, key: str) -> Path:
    return Path(cache_dir) / "data" / f"{name}-{key[:16]}.pt"


def cached_load(name: str, params: Any, identity: dict[str, str], load: Callable[[], DataBundle],
                cache_dir: Path) -> DataBundle:
    """``load()``'s bundle, from ``cache_dir`` when a whole file made for the same ``name``,
    ``params`` (a dataclass) and ``identity`` is there; else generated and written there."""
    key = stable_hash({"dataset": name, "params": dataclasses.asdict(params), "identity": identity})
    if key in _LOADED:
        return _LOADED[key]
    path = cache_path(cache_dir, name, key)
    bundle = read(path, key)
    if bundle is None:
        bundle = load()
        write(path, key, bundle)
    _LOADED[key] = bundle
    while len(_LOADED) > _KEEP:
        del _LOADED[next(iter(_LOADED))]  # the oldest
    return bundle


def read(path: Path, key: str) -> DataBundle | None:
    """The bundle in ``path`` if it is whole and made for ``key``; None (with a note why) if not."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        print(f"note: dataset cache {path} is unreadable ({e.strerror}); generating the data", file=sys.stderr)
        return None
    state, why = unpack_checkpoint(blob, key)
    fields = {f.name for f in dataclasses.fields(DataBundle)}
    if state is not None and set(state) == fields and _splits_are_tensors(state):
        try:
            return DataBundle(**state)
        except (TypeError, ValueError) as e:
            why = f"not a dataset ({e})"
    print(f"note: dataset cache {path}: {why or 'not a dataset'}; generating the data again", file=sys.stderr)
    return None


def write(path: Path, key: str, bundle: DataBundle) -> None:
    """Write ``bundle`` to ``path`` atomically; a failure is a note (the cache only saves time)."""
    state = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(bundle)}
    header, payload = pack_checkpoint(state, key)
    try:
        atomic_write(path, lambda fh: (fh.write(header), fh.write(payload)))
    except StorageError as e:
        print(f"note: the dataset cache is not written: {e}", file=sys.stderr)


def _splits_are_tensors(state: dict) -> bool:
    return all(isinstance(state[f"{p}_{s}"], torch.Tensor) for p in "xy" for s in ("train", "val", "test"))
