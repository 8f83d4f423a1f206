"""Weights files from elsewhere: read a checkpoint, unwrap it and fit it to a zoo model.

A published CIFAR teacher is a ``state_dict``, often wrapped (RepDistiller and mdistiller save
``{'model': sd, ...}``; others ``{'state_dict': sd}`` or ``{'net': sd}``), its keys prefixed with
``module.`` by ``DataParallel``, and named after the reference code's modules
(``kdablate.models.foreign`` maps those names onto the zoo's). Every problem is a one-line
``ConfigError`` that names the file and says what to do; nothing is loaded half-way.

Files are read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdablate.hashing import file_digest
from kdablate.models.foreign import reference_mismatch, to_zoo_keys
from kdablate.registry import ConfigError
from kdablate.storage import load_tensors

WRAPPERS = ("model", "state_dict", "net")  # the keys a checkpoint's state_dict is saved under


def checkpoint_digest(path: str | Path, sha256: str | None = None) -> str:
    """The file's sha256; ConfigError if it is missing or not the file ``sha256`` names."""
    try:
        digest = file_digest(path)
    except OSError as e:
        raise ConfigError(f"checkpoint {path}: {e.strerror or e}; check the path (relative to the folder "
                          "you run kdablate in)") from None
    if sha256 is not None and digest != sha256.lower():
        raise ConfigError(f"checkpoint {path}: its sha256 is {digest}, not the {sha256.lower()} that teacher.sha256 "
                          "names; point at the right file or update sha256")
    return digest


def read_checkpoint(path: str | Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the file's state_dict, unwrapped and without ``module.``, the file's sha256); ConfigError
    if the file is missing, unreadable, not a state_dict, or not the file ``sha256`` names."""
    digest = checkpoint_digest(path, sha256)
    try:
        raw = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - truncated, pickled code, not torch: any failure is unreadable
        raise ConfigError(f"checkpoint {path}: not a torch weights file that loads with weights_only=True "
                          f"({type(e).__name__}); save the model's state_dict with torch.save") from None
    return unwrap(raw, path), digest


def unwrap(raw: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a bare or wrapped state_dict, with a ``module.`` prefix removed."""
    for key in WRAPPERS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"checkpoint {path}: holds no state_dict (a mapping of names to tensors, bare or under "
                          f"{', '.join(repr(w) for w in WRAPPERS)}); save model.state_dict()")
    if all(k.startswith("module.") for k in raw):  # saved from DataParallel
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
    return dict(raw)


def fit_state_dict(model: nn.Module, name: str, params: dict, state: dict[str, torch.Tensor], path: str | Path,
                   num_classes: int) -> dict[str, torch.Tensor]:
    """``state`` with its keys named as ``model``'s (zoo model ``name`` at ``params``), checked key by
    key and shape by shape; ConfigError naming the first three problems of each kind and their count."""
    why = reference_mismatch(name, params, state)
    if why:
        raise ConfigError(f"checkpoint {path}: {why}; set them under teacher.model")
    state = to_zoo_keys(name, state)
    want = model.state_dict()
    head = [k for k in want if want[k].dim() == 2][-1:]  # the classifier's weight: the last matrix
    if head and head[0] in state and state[head[0]].shape[0] != num_classes:
        raise ConfigError(f"checkpoint {path}: its model has {state[head[0]].shape[0]} classes and the data "
                          f"{num_classes}; use a teacher trained on this data")
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}" for k in want
              if k in state and state[k].shape != want[k].shape]
    problems = [(what, found) for what, found in (("missing", missing), ("unexpected", unexpected),
                                                  ("wrong shape", shapes)) if found]
    if problems:
        said = "; ".join(f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
                         for what, found in problems)
        raise ConfigError(f"checkpoint {path}: does not fit model '{name}': {said}; check teacher.model (and "
                          "its params) against the architecture the file was saved from")
    return {k: state[k] for k in want}
