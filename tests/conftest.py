"""Shared fixtures: small random batches and an isolated MLflow store per test."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def batch() -> dict:
    """B=16, K=10 logits for a student and a teacher, labels, and a seeded generator."""
    from kdablate.models import build_model

    g = torch.Generator().manual_seed(0)
    b, k = 16, 10
    torch.manual_seed(0)
    models = {"self": build_model("mlp", {"hidden": 16}, (1, 40), k),
              "teacher": build_model("cnn1d", {"channels": 8, "depth": 2}, (1, 40), k)}
    inputs = torch.randn(b, 1, 40, generator=g)
    return {
        "labels": torch.randint(0, k, (b,), generator=g),
        "student": torch.randn(b, k, generator=g) * 2,
        "teacher": torch.randn(b, k, generator=g) * 3,
        "peer": torch.randn(b, k, generator=g) * 2,
        "inputs": inputs,
        "models": models,
        "features": models["self"].features(inputs).detach(),
        "groups": torch.arange(k) // 3,  # superclasses {0,1,2}, {3,4,5}, {6,7,8}, {9}
        "k": k,
    }


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store; the test runs in tmp_path with studies/ reachable."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").symlink_to(ROOT / "studies")
    return uri
