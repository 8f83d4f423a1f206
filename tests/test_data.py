"""The default data is generated offline and split deterministically."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from kdablate import data as data_mod
from kdablate.data import mnist1d as mnist1d_mod


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_mnist1d_is_generated_without_network(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the package's download path would write a .pkl here
    mnist1d_mod._mnist1d.cache_clear()
    d = data_mod.load_dataset("mnist1d", {"num_samples": 1000, "split_seed": 7})
    assert d.x_train.shape == (720, 1, 40) and d.x_val.shape == (80, 1, 40) and d.x_test.shape == (200, 1, 40)
    assert d.num_classes == 10 and set(d.y_train.tolist()) == set(range(10))
    assert not list(tmp_path.iterdir())


def test_generation_is_deterministic_and_leaves_global_rngs_alone():
    state = np.random.get_state()[1].copy()
    mnist1d_mod._mnist1d.cache_clear()
    a = data_mod.load_dataset("mnist1d", {"num_samples": 500})
    mnist1d_mod._mnist1d.cache_clear()
    b = data_mod.load_dataset("mnist1d", {"num_samples": 500})
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert np.array_equal(np.random.get_state()[1], state)


def test_split_seed_changes_only_the_train_val_split():
    a = data_mod.load_dataset("mnist1d", {"num_samples": 500, "split_seed": 0})
    b = data_mod.load_dataset("mnist1d", {"num_samples": 500, "split_seed": 1})
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_val, b.x_val)
    # train + val is the same pool either way
    pool = lambda d: torch.cat([d.x_train, d.x_val]).flatten(1).sum(1).sort().values  # noqa: E731
    torch.testing.assert_close(pool(a), pool(b))


def test_split_train_val_is_disjoint_and_complete():
    x = torch.arange(100.0)[:, None]
    y = torch.arange(100)
    x_tr, y_tr, x_val, y_val = data_mod.split_train_val(x, y, 0.2, seed=0)
    assert len(y_val) == 20 and len(y_tr) == 80
    assert sorted(torch.cat([y_tr, y_val]).tolist()) == list(range(100))
