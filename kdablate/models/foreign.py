"""State dicts of the CRD reference models, renamed to the zoo's keys.

The zoo (``kdablate.models.zoo``) builds the CRD benchmark architectures with the same tensors
in the same order, but names them ``features.<i>...`` and ``head.*``. The reference code names
them by module: RepDistiller (github.com/HobbitLong/RepDistiller, ``models/resnet.py``,
``resnetv2.py``, ``wrn.py``, ``vgg.py``, ``mobilenetv2.py``, ``ShuffleNetv1.py``,
``ShuffleNetv2.py``) and mdistiller (github.com/megvii-research/mdistiller,
``mdistiller/models/cifar/*.py``), which copies RepDistiller's modules and so its keys.

Each family's renaming is data (``_FAMILIES``): a regex whose integer groups number the
repeated units (blocks) and ordered (reference prefix regex, zoo prefix) rules. In a zoo prefix
``{u}`` is the unit's index in ``features``, ``{v}`` its position within a zoo unit (VGG puts a
conv and its BN in one), ``{end}`` the index after the last unit. Caveats: ``mobilenetv2``
loads CRD's ``mobile_half`` at ``width_mult: 0.5, stem_stride: 2`` (the zoo's default stride 1
would compute another function with the same tensors, so ``reference_mismatch`` refuses it); VGG indices assume 32 px inputs (at >= 64 px the
zoo pools after stage 3 too, shifting stage 4's indices).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch


@dataclasses.dataclass(frozen=True)
class _Family:
    unit: str  # matches the prefix of a key inside a repeated unit; its groups are integers
    rules: tuple[tuple[str, str], ...]  # (reference key prefix, zoo key prefix), first match wins
    first: int = 1  # features index of the first unit (after the stem)
    per_unit: int = 1  # reference units in one zoo unit
    pool_after: tuple[int, ...] = ()  # first unit groups followed by a parameter-free layer


def _inside(unit: str, names: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Rules renaming ``<unit><ref>.`` to ``features.{u}.<zoo>.`` for each ``ref: zoo``."""
    return tuple((unit + re.escape(ref) + r"\.", f"features.{{u}}.{zoo}.") for ref, zoo in names.items())


_STEM = ((r"conv1\.", "features.0.0."), (r"bn1\.", "features.0.1."))
_LAYER = r"layer\d+\.\d+\."
_FAMILIES: dict[str, _Family] = {
    "resnet": _Family(r"layer(\d+)\.(\d+)\.", _STEM + _inside(_LAYER, {
        "conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1.0", "bn2": "body.1.1",
        "downsample": "shortcut"}) + ((r"fc\.", "head."),)),
    "resnetv2": _Family(r"layer(\d+)\.(\d+)\.", _STEM + _inside(_LAYER, {
        "conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1.0", "bn2": "body.1.1",
        "conv3": "body.2.0", "bn3": "body.2.1", "shortcut": "shortcut"}) + ((r"linear\.", "head."),)),
    "wrn": _Family(r"block(\d+)\.layer\.(\d+)\.", ((r"conv1\.", "features.0."),) + _inside(
        r"block\d+\.layer\.\d+\.", {"bn1": "pre.0", "conv1": "body.0", "bn2": "body.1",
                                    "conv2": "body.3", "convShortcut": "shortcut"})
        + ((r"bn1\.", "features.{end}."), (r"fc\.", "head."))),
    "vgg": _Family(r"block(\d+)\.(\d+)\.", ((r"block\d+\.\d+\.", "features.{u}.{v}."),
                                            (r"classifier\.", "head.")),
                   first=0, per_unit=2, pool_after=(0, 1, 2)),
    "mobilenetv2": _Family(r"blocks\.(\d+)\.(\d+)\.", (
        (r"conv1\.", "features.0."),) + _inside(r"blocks\.\d+\.\d+\.", {
            f"conv.{ref}": f"body.{zoo}" for ref, zoo in
            (("0", "0.0"), ("1", "0.1"), ("3", "1.0"), ("4", "1.1"), ("6", "2.0"), ("7", "2.1"))})
        + ((r"conv2\.", "features.{end}."), (r"classifier\.0\.", "head."))),
    "shufflenetv1": _Family(r"layer(\d+)\.(\d+)\.", _STEM + _inside(_LAYER, {
        "conv1": "squeeze.0", "bn1": "squeeze.1", "conv2": "rest.0.0", "bn2": "rest.0.1",
        "conv3": "rest.1.0", "bn3": "rest.1.1"}) + ((r"linear\.", "head."),)),
    "shufflenetv2": _Family(r"layer(\d+)\.(\d+)\.", _STEM + _inside(r"layer\d+\.0\.", {
        "conv1": "left.0.0", "bn1": "left.0.1", "conv2": "left.1.0", "bn2": "left.1.1",
        "conv3": "right.0.0", "bn3": "right.0.1", "conv4": "right.1.0", "bn4": "right.1.1",
        "conv5": "right.2.0", "bn5": "right.2.1"}) + _inside(r"layer\d+\.[1-9]\d*\.", {
            "conv1": "branch.0.0", "bn1": "branch.0.1", "conv2": "branch.1.0", "bn2": "branch.1.1",
            "conv3": "branch.2.0", "bn3": "branch.2.1"})
        + ((r"conv2\.", "features.{end}.0."), (r"bn2\.", "features.{end}.1."), (r"linear\.", "head."))),
}
# Zoo parameters the reference function needs where the zoo's default differs: a reference
# checkpoint loaded without them has the right tensors and computes another function.
_REQUIRES: dict[str, dict[str, object]] = {"mobilenetv2": {"stem_stride": 2}}
_FAMILY_OF: dict[str, str] = {
    **{f"resnet{d}": "resnet" for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": "resnet", "resnet32x4": "resnet", "resnet50": "resnetv2",
    **{f"wrn_{d}_{w}": "wrn" for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": "vgg" for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": "mobilenetv2", "shufflenetv1": "shufflenetv1", "shufflenetv2": "shufflenetv2",
}


def _indices(family: _Family, keys: list[str]) -> dict[tuple[int, ...], tuple[int, int]]:
    """Each reference unit (its integer groups) -> (features index, position in the zoo unit)."""
    units = sorted({tuple(map(int, m.groups())) for k in keys if (m := re.match(family.unit, k))})
    return {u: (family.first + r // family.per_unit + sum(p < u[0] for p in family.pool_after),
                r % family.per_unit) for r, u in enumerate(units)}


def _zoo_key(key: str, family: _Family, indices: Mapping[tuple[int, ...], tuple[int, int]]) -> str:
    """``key`` renamed by the first rule that matches it, or ``key`` when none does."""
    end = family.first + len(indices) // family.per_unit + len(family.pool_after)
    for pattern, prefix in family.rules:
        if (m := re.match(pattern, key)) is None:
            continue
        unit = re.match(family.unit, key)
        u, v = indices[tuple(map(int, unit.groups()))] if unit else (-1, -1)
        return prefix.format(u=u, v=v, end=end) + key[m.end():]
    return key


def to_zoo_keys(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with RepDistiller / mdistiller keys of ``model_name``'s family renamed to the zoo's.

    Keys that are already the zoo's, or that no rule knows, are kept as they are (the caller
    compares the result with the model and reports missing or unexpected keys); a model
    without a reference family gets its state dict back unchanged. Tensors are not copied.
    """
    family = _FAMILIES.get(_FAMILY_OF.get(model_name, ""))
    if family is None:
        return dict(state_dict)
    indices = _indices(family, list(state_dict))
    return {_zoo_key(k, family, indices): v for k, v in state_dict.items()}


def reference_mismatch(model_name: str, params: Mapping[str, object], state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why reference-named ``state_dict`` would load into ``model_name`` at ``params`` yet compute
    another function than the reference model (a zoo parameter it needs differs), or None."""
    family = _FAMILY_OF.get(model_name, "")
    if family not in _REQUIRES or to_zoo_keys(model_name, state_dict).keys() == state_dict.keys():
        return None  # zoo names: saved from this very model
    wrong = {k: v for k, v in _REQUIRES[family].items() if params.get(k) != v}
    if not wrong:
        return None
    said = ", ".join(f"{k}: {v}" for k, v in wrong.items())
    return f"its keys are the reference {model_name}'s, which needs {said} in the model's params to compute its function"
