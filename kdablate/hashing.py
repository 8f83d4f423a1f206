"""Content hashes: the identity of cells, teachers and data files.

The bottom layer, beside the registry: the data layer keys its caches with it,
and the config layer names cells with it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, stamp: tuple[int, ...]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (64 hex digits), read once while its inode, size and times stay."""
    st = os.stat(path)
    return _file_digest(os.fspath(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
