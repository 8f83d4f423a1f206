"""Content hashes: the identity of cells, teachers and data files.

The bottom layer, beside the registry: the data layer keys its caches with it,
and the config layer names cells with it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
