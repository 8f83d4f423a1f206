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


# --- the disk cache of generated data (kdablate.data.cache) ------------------------------------

@pytest.fixture
def fresh_cache(monkeypatch):
    """No bundle remembered in this process, and generation counted."""
    from kdablate.data import cache

    monkeypatch.setattr(cache, "_LOADED", {})
    calls = []
    real = mnist1d_mod.MNIST1D.load
    monkeypatch.setattr(mnist1d_mod.MNIST1D, "load", lambda self: calls.append(1) or real(self))
    return calls


def test_generated_data_is_cached_on_disk_and_read_back_the_same(tmp_path, fresh_cache, monkeypatch):
    from kdablate.data import cache

    params = {"num_samples": 1000}
    made = data_mod.load_dataset("mnist1d", params, tmp_path)
    (path,) = (tmp_path / "data").glob("mnist1d-*.pt")
    monkeypatch.setattr(cache, "_LOADED", {})  # as a new process: read the file
    read = data_mod.load_dataset("mnist1d", params, tmp_path)
    assert fresh_cache == [1] and read.fingerprint == made.fingerprint
    assert data_mod.load_dataset("mnist1d", params).fingerprint == made.fingerprint  # no cache asked
    # Other params, or another generator version, never meet this file.
    monkeypatch.setattr(cache, "_LOADED", {})
    data_mod.load_dataset("mnist1d", {"num_samples": 1000, "split_seed": 1}, tmp_path)
    monkeypatch.setattr(np, "__version__", "0.0-other")
    data_mod.load_dataset("mnist1d", params, tmp_path)
    assert len(list((tmp_path / "data").glob("mnist1d-*.pt"))) == 3 and path.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_a_damaged_data_cache_is_generated_again_with_a_note(tmp_path, fresh_cache, monkeypatch, capsys, damage):
    from kdablate.data import cache

    made = data_mod.load_dataset("mnist1d", {"num_samples": 1000}, tmp_path)
    (path,) = (tmp_path / "data").glob("mnist1d-*.pt")
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[: len(blob) // 2], "flip": blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:],
                      "empty": b"", "foreign": torch.zeros(3).numpy().tobytes()}[damage])
    monkeypatch.setattr(cache, "_LOADED", {})
    again = data_mod.load_dataset("mnist1d", {"num_samples": 1000}, tmp_path)
    assert again.fingerprint == made.fingerprint and fresh_cache == [1, 1]
    assert f"note: dataset cache {path}" in capsys.readouterr().err
    assert path.read_bytes() == blob  # written whole again


def test_an_unwritable_data_cache_costs_only_time(tmp_path, fresh_cache, capsys):
    (tmp_path / "data").write_text("a file where the folder should be")
    d = data_mod.load_dataset("mnist1d", {"num_samples": 1000}, tmp_path)
    assert len(d.y_test) == 200 and "note: the dataset cache is not written" in capsys.readouterr().err
