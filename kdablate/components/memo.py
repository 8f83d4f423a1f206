"""A frozen explainer's per-row results, computed once: ``RowMemo``.

The teacher is frozen and explained in eval mode, where a row's explanation does not depend on
the rest of its batch, so the explanation structure's similarities for an (input row, label) are
the same at every epoch. On the introspective study's teacher-explainer arm (MNIST-1D), ~58 s of
a seed's cell went into explaining rows it had explained in earlier epochs.

Keys are a 16-byte BLAKE2b hash of the row's bytes and its label (Aumasson et al. 2013); the
values live in one (rows, K) tensor. The memo forgets everything when the explainer changes: a
weight or buffer replaced or changed in place (checked at every call, by identity and tensor
version) or, checked once an epoch, a change of values by any route (a sha256 digest). Augmented
inputs never repeat: from the third epoch on, an epoch that found under 5 % of its rows turns
the memo off for the cell. Its state is tensors and numbers, so a checkpoint holds it and a
resumed cell explains exactly the rows an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import torch
from torch import nn

MEMO_ROWS = 262_144  # ~10 MiB of values at K = 10, plus ~40 bytes of key and index a row
KEY_BYTES = 24  # 16 of hash, 8 of label
MIN_HIT_RATE = 0.05
STATE_KEYS = ("memo_keys", "memo_values", "memo_digest", "memo_off", "memo_epoch", "memo_hits", "memo_looked")


def weights_digest(model: nn.Module) -> bytes:
    """sha256 over the dtype, shape and values of ``model``'s parameters and buffers, in order."""
    h = hashlib.sha256()
    for t in (*model.parameters(), *model.buffers()):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def row_keys(x: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    """(n, *S) CPU inputs, (n,) labels -> n keys of ``KEY_BYTES``: the hash of each row's bytes (in
    logical order, whatever the strides) and its label."""
    rows = x.detach().reshape(len(x), -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() + int(label).to_bytes(8, "little", signed=True)
            for r, label in zip(rows, labels.tolist())]


class RowMemo:
    """Key -> (K,) row of a frozen explainer's results (see the module docstring)."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.values: torch.Tensor | None = None  # (capacity, K); the first len(index) rows are used
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.versions: tuple[int, ...] = ()
        self.digest, self.off = b"", False
        self.epoch, self.hits, self.looked = 0, 0, 0

    def follow(self, model: nn.Module, epoch: int) -> None:
        """Forget on a changed explainer; at a new epoch, check its values and the hit rate."""
        tensors = (*model.parameters(), *model.buffers())
        same = len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors))
        versions = tuple(t._version for t in tensors)
        if epoch != self.epoch or not same or versions != self.versions:
            digest = weights_digest(model)
            if digest != self.digest:
                self.index, self.values = {}, None
            self.tensors, self.versions, self.digest = tensors, versions, digest
        if epoch != self.epoch:
            if epoch >= 3 and self.looked and self.hits < MIN_HIT_RATE * self.looked:
                self.off, self.index, self.values = True, {}, None  # inputs that do not repeat
            self.epoch, self.hits, self.looked = epoch, 0, 0

    def lookup(self, keys: list[bytes]) -> tuple[list[int], list[int]]:
        """(positions found, their memo rows) and counts the hit rate."""
        found = [(i, self.index[k]) for i, k in enumerate(keys) if k in self.index]
        self.hits, self.looked = self.hits + len(found), self.looked + len(keys)
        return [i for i, _ in found], [j for _, j in found]

    def add(self, keys: list[bytes], rows: torch.Tensor) -> None:
        """Keep (n, K) ``rows`` under their ``keys`` while there is room (``MEMO_ROWS``)."""
        new: dict[bytes, int] = {}  # key -> its first row: a batch may hold a row twice
        for i, k in enumerate(keys):
            if k not in self.index and k not in new:
                new[k] = i
        start = len(self.index)
        if self.off or not new or start + len(new) > MEMO_ROWS:
            return
        rows = rows.detach()[list(new.values())].cpu()
        if self.values is None or start + len(rows) > len(self.values):
            grown = torch.empty(min(MEMO_ROWS, max(2 * (start + len(rows)), 1024)), rows.shape[1], dtype=rows.dtype)
            if self.values is not None:
                grown[:start] = self.values[:start]
            self.values = grown
        self.values[start : start + len(rows)] = rows
        self.index.update((k, start + j) for j, k in enumerate(new))

    def state(self) -> dict[str, torch.Tensor | int | None]:
        """Tensors and numbers a checkpoint holds (Nones while empty), the hit count included, so a
        resumed cell turns the memo off when an uninterrupted one would."""
        counts = {"memo_off": int(self.off), "memo_epoch": self.epoch, "memo_hits": self.hits,
                  "memo_looked": self.looked}
        if not self.index:
            return {"memo_keys": None, "memo_values": None, "memo_digest": None, **counts}
        keys = torch.frombuffer(bytearray(b"".join(self.index)), dtype=torch.uint8).view(len(self.index), KEY_BYTES)
        return {"memo_keys": keys, "memo_values": self.values[: len(self.index)].clone(),
                "memo_digest": torch.frombuffer(bytearray(self.digest), dtype=torch.uint8), **counts}

    def load(self, state: dict) -> None:
        """``state()``'s inverse, from tensors on any device; a state without a memo empties it."""
        self.__init__()  # type: ignore[misc]
        self.off = bool(state.get("memo_off") or 0)
        self.epoch, self.hits, self.looked = (int(state.get(k) or 0) for k in STATE_KEYS[4:])
        keys, values, digest = (state.get(k) for k in STATE_KEYS[:3])
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and isinstance(digest, torch.Tensor):
            if len(keys) != len(values) or keys.shape[1:] != (KEY_BYTES,):
                raise ValueError(f"memo state has {len(keys)} keys of {tuple(keys.shape[1:])} bytes "
                                 f"for {len(values)} rows")
            self.index = {k.tobytes(): i for i, k in enumerate(keys.cpu().numpy())}
            self.values, self.digest = values.cpu().clone(), digest.cpu().numpy().tobytes()
