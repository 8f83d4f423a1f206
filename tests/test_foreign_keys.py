"""Reference (RepDistiller / mdistiller) state dicts load into the zoo through ``to_zoo_keys``.

``reference_keys.json`` lists, per zoo model, the state_dict keys and shapes of the CRD reference
model at 100 classes, in its state_dict order, as read from RepDistiller's ``models/*.py`` (and
identical in mdistiller's ``mdistiller/models/cifar/*.py``); its ``caveat`` fields say where
equal tensors do not make equal functions.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdablate.models import build_model
from kdablate.models.foreign import to_zoo_keys

REFERENCE = json.loads((Path(__file__).parent / "reference_keys.json").read_text())
SHAPE = (3, 32, 32)


def _zoo(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, REFERENCE[name]["params"], SHAPE, 100)


def _reference_dict(name: str, zoo_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The zoo's tensors under the reference names, paired by order after checking the shapes."""
    ref = REFERENCE[name]["keys"]
    assert [list(v.shape) for v in zoo_state.values()] == [shape for _, shape in ref]
    return {key: tensor for (key, _), tensor in zip(ref, zoo_state.values())}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_keys_rename_to_the_zoo_keys(name: str) -> None:
    ref = {key: torch.empty(shape) for key, shape in REFERENCE[name]["keys"]}
    renamed = to_zoo_keys(name, ref)
    zoo = _zoo(name).state_dict()
    assert list(renamed) == list(zoo)
    assert {k: list(v.shape) for k, v in renamed.items()} == {k: list(v.shape) for k, v in zoo.items()}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_direct_load_of_a_reference_state_dict(name: str, tmp_path: Path) -> None:
    original = _zoo(name).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a misplaced BN tensor shows
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(_reference_dict(name, original.state_dict()), tmp_path / "ckpt.pth")
    fresh = build_model(name, REFERENCE[name]["params"], SHAPE, 100).eval()
    fresh.load_state_dict(to_zoo_keys(name, torch.load(tmp_path / "ckpt.pth")), strict=True)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_zoo_keys_pass_through_unchanged(name: str) -> None:
    zoo = _zoo(name).state_dict()
    renamed = to_zoo_keys(name, zoo)
    assert list(renamed) == list(zoo)
    assert all(renamed[k] is v for k, v in zoo.items())


def test_models_without_a_reference_family_are_unchanged() -> None:
    state = {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    renamed = to_zoo_keys("torchvision", state)
    assert list(renamed) == list(state) and all(renamed[k] is v for k, v in state.items())


def test_mdistiller_names_the_same_files() -> None:
    """Every entry cites its RepDistiller file and the mdistiller copy whose keys equal it."""
    for entry in REFERENCE.values():
        path = entry["source"].split("HobbitLong/RepDistiller/models/", 1)[1]
        assert entry["same_keys_in"].startswith(f"megvii-research/mdistiller/mdistiller/models/cifar/{path} ")
