"""Files we read and write: checkpoints are atomic, checked and never run code; CIFAR batches
are read through a restricted unpickler; a failed write says which file and why."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.data.fake import write_cifar
from kdablate.registry import ConfigError
from kdablate.storage import CHECKPOINT_MAGIC, Checkpoint, StorageError, atomic_save
from kdablate.trainer import fit
from kdablate.data.vision import _unpickle

SPEC, OPT = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=4, batch_size=32)
IL = KnowledgeConfig(mass={"name": "constant", "eps": 0.2},
                     structure={"name": "explanation", "every": 2, "fraction": 0.5}, temperature=4.0, alpha=0.9)
DML = KnowledgeConfig(mass="peer", structure="peer", alpha=0.5)


class Interrupt(Exception):
    pass


class Mkdir:
    """A pickle payload: unpickling it creates the folder ``marker`` (what a planted file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist1d", {"num_samples": 400})


@pytest.fixture(scope="module")
def straight(tiny):
    """The uninterrupted CE run every restarted cell must reproduce exactly."""
    return fit(SPEC, tiny, OPT, KnowledgeConfig(), 0)


def crashed_checkpoint(tiny, path: Path, knowledge: KnowledgeConfig = KnowledgeConfig()) -> Checkpoint:
    """The checkpoint a cell leaves when it dies during epoch 2 (it holds epoch 1)."""

    def crash_after_1(epoch, metrics):
        if epoch == 2:
            raise Interrupt

    ckpt = Checkpoint(path, every=1, meta={"run_id": "r1"})
    with pytest.raises(Interrupt):
        fit(SPEC, tiny, OPT, knowledge, 0, on_epoch=crash_after_1, checkpoint=ckpt)
    return ckpt


def split_envelope(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a checkpoint file's bytes."""
    assert blob.startswith(CHECKPOINT_MAGIC)
    end = blob.index(b"\n", len(CHECKPOINT_MAGIC))
    return json.loads(blob[len(CHECKPOINT_MAGIC) : end]), blob[end + 1 :]


def envelope(payload: bytes, key: str) -> bytes:
    """A well-formed checkpoint file around ``payload``: what someone planting a file can write."""
    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    return CHECKPOINT_MAGIC + json.dumps(header).encode() + b"\n" + payload


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


# --- checkpoints: planted, damaged, foreign ---------------------------------------------------


def test_a_planted_checkpoint_never_runs_its_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"epoch": 1, "evil": Mkdir(marker)}, buf)
    payload = buf.getvalue()
    torch.load(io.BytesIO(payload), weights_only=False)  # the payload is real: an unchecked load runs it
    assert marker.is_dir()
    marker.rmdir()
    # In the old format (a bare torch.save), and inside a well-formed envelope with a valid sha256.
    for blob, why in [(payload, "not a kdablate checkpoint"), (envelope(payload, "cell"), "refused")]:
        path = tmp_path / "cell.pt"
        path.write_bytes(blob)
        state, message = Checkpoint(path).load_checked()
        assert state is None and not marker.exists() and not path.exists()
        assert why in message and str(path) in message and one_line(message)
        assert capsys.readouterr().out.strip() == message


def test_a_planted_checkpoint_under_fit_trains_from_scratch(tiny, straight, tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "cell.pt"
    buf = io.BytesIO()
    torch.save({"epoch": 3, "members": Mkdir(marker)}, buf)
    path.write_bytes(envelope(buf.getvalue(), "cell"))
    epochs = []
    result = fit(SPEC, tiny, OPT, KnowledgeConfig(), 0, checkpoint=Checkpoint(path),
                 on_epoch=lambda e, m: epochs.append(e))
    assert not marker.exists() and epochs == [1, 2, 3, 4] and result.metrics == straight.metrics
    assert "refused" in capsys.readouterr().out


def truncated(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def zeroed(blob: bytes) -> bytes:
    return bytes(len(blob))


def flipped(blob: bytes) -> bytes:
    i = len(blob) - 100  # inside the payload: the header still reads, the checksum does not match
    return blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1 :]


def emptied(blob: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage,why", [
    (truncated, "truncated"), (zeroed, "not a kdablate checkpoint"), (flipped, "does not match its sha256"),
    (emptied, "empty"),
])
def test_a_damaged_checkpoint_is_discarded_and_the_cell_restarts(tiny, straight, tmp_path, capsys, damage, why):
    ckpt = crashed_checkpoint(tiny, tmp_path / "cell.pt")
    ckpt.path.write_bytes(damage(ckpt.path.read_bytes()))
    capsys.readouterr()
    epochs = []
    result = fit(SPEC, tiny, OPT, KnowledgeConfig(), 0, checkpoint=ckpt, on_epoch=lambda e, m: epochs.append(e))
    out = capsys.readouterr().out
    assert epochs == [1, 2, 3, 4] and result.metrics == straight.metrics  # from epoch 0, to the end
    lines = [line for line in out.splitlines() if "is not usable" in line]
    assert len(lines) == 1 and why in lines[0] and str(ckpt.path) in lines[0]
    assert "restarts from epoch 0" in lines[0]


def test_a_checkpoint_of_another_cell_is_discarded(tiny, straight, tmp_path, capsys):
    """The file names the config hash it was made for; one copied under another hash is not used."""
    other = crashed_checkpoint(tiny, tmp_path / "aaaa.pt")
    mine = Checkpoint(tmp_path / "bbbb.pt", meta={"run_id": "r2"})
    shutil.copy(other.path, mine.path)
    state, message = mine.load_checked()
    assert state is None and not mine.path.exists() and one_line(message)
    assert "made for another config (aaaa != bbbb)" in message
    # An explicit key (the runner's cell.config_hash()) wins over the file name.
    shutil.copy(other.path, mine.path)
    assert Checkpoint(mine.path, key="aaaa").load()["epoch"] == 1
    epochs = []
    result = fit(SPEC, tiny, OPT, KnowledgeConfig(), 0, checkpoint=Checkpoint(mine.path, key="cccc"),
                 on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [1, 2, 3, 4] and result.metrics == straight.metrics
    assert "made for another config (aaaa != cccc)" in capsys.readouterr().out


def test_no_checkpoint_is_no_message(tmp_path, capsys):
    assert Checkpoint(tmp_path / "none.pt").load_checked() == (None, "")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("knowledge", [IL, DML], ids=["il", "dml"])
def test_checkpoints_hold_only_weights_only_loadable_state(tiny, tmp_path, monkeypatch, knowledge):
    ckpt = crashed_checkpoint(tiny, tmp_path / "cell.pt", knowledge)
    header, payload = split_envelope(ckpt.path.read_bytes())
    assert header["key"] == "cell" and header["size"] == len(payload)
    assert header["sha256"] == hashlib.sha256(payload).hexdigest()
    state = torch.load(io.BytesIO(payload), weights_only=True)  # no Python objects in it at all
    assert state["epoch"] == 1 and state["meta"] == {"run_id": "r1"}
    members = state["members"]
    assert len(members) == (2 if knowledge is DML else 1)
    if knowledge is IL:  # the class EMA is saved as a (K, K) tensor, and it has moved off uniform
        matrix = members[0]["method"]["structure.class_matrix"]
        uniform = (1 - torch.eye(10)) / 9
        assert matrix.shape == (10, 10) and not torch.allclose(matrix, uniform)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert ckpt.load()["epoch"] == 1 and calls and all(k.get("weights_only") is True for k in calls)


# --- writing: atomic, durable, and a clear error when it cannot be done ------------------------


def test_atomic_save_leaves_no_temp_file_and_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def half_then_fail(obj, fh):
        fh.write(b"half a file")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"] and path.read_bytes() == before


def test_atomic_save_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real(fd))
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert synced == [False, True]  # the file's bytes, then the folder's entry for the rename


def test_an_unwritable_folder_is_a_storage_error_naming_the_path(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "file" / "checkpoints" / "cell.pt"
    with pytest.raises(StorageError) as e:
        Checkpoint(path).save({"epoch": 1})
    assert isinstance(e.value, OSError) and str(path) in str(e.value) and one_line(str(e.value))
    assert e.value.errno == errno.ENOTDIR

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("tempfile.mkstemp", denied)
    with pytest.raises(StorageError, match=r"cannot write .*ro[/\\]x\.pt: Permission denied$"):
        atomic_save({"a": 1}, tmp_path / "ro" / "x.pt")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            atomic_save({"a": 1}, folder / "x.pt")
    finally:
        folder.chmod(0o700)


def test_a_full_disk_says_how_much_space_is_free(tmp_path, monkeypatch):
    def full(obj, fh):
        fh.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 1536))
    for save, path in [(lambda p: atomic_save({"a": 1}, p), tmp_path / "cache.pt"),
                       (lambda p: Checkpoint(p).save({"epoch": 1}), tmp_path / "cell.pt")]:
        with pytest.raises(StorageError) as e:
            save(path)
        assert e.value.errno == errno.ENOSPC and one_line(str(e.value))
        assert str(e.value) == f"cannot write {path}: no space left on the device (1.5 KiB free in {tmp_path})"
        assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_a_failing_checkpoint_write_stops_the_cell(tiny, tmp_path, monkeypatch):
    """Not swallowed: a cell that cannot checkpoint fails (the runner marks it FAILED with the reason)."""
    def full(obj, fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError, match="no space left on the device"):
        fit(SPEC, tiny, OptimConfig(epochs=2, batch_size=32), KnowledgeConfig(), 0,
            checkpoint=Checkpoint(tmp_path / "cell.pt"))


# --- CIFAR batches through the restricted unpickler --------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the cPickle that wrote CIFAR did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_cifar_batch(batch: dict) -> bytes:
    """``batch`` as the real files have it: protocol 2, Python 2 strings, numpy.core module names."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(batch)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def batch_of(n: int = 4) -> dict:
    return {b"batch_label": b"training batch 1 of 5", b"labels": list(range(n)),
            b"data": np.arange(n * 3072, dtype=np.uint64).astype(np.uint8).reshape(n, 3072),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


@pytest.mark.parametrize("protocol", [2, 4, 5, "py2"])
def test_cifar_batches_in_every_pickle_protocol_load(tmp_path, protocol):
    path, batch = tmp_path / "data_batch_1", batch_of()
    path.write_bytes(py2_cifar_batch(batch) if protocol == "py2" else pickle.dumps(batch, protocol=protocol))
    if protocol == 2:  # Python 3 writes protocol-2 bytes through _codecs.encode: not the real format
        with pytest.raises(ConfigError, match="_codecs.encode"):
            _unpickle(path)
        return
    out = _unpickle(path)
    assert out[b"labels"] == batch[b"labels"] and out[b"filenames"] == batch[b"filenames"]
    assert out[b"data"].dtype == np.uint8 and np.array_equal(out[b"data"], batch[b"data"])


def test_a_python2_style_cifar_dataset_loads(tmp_path):
    """The fake files rewritten the way the real ones are pickled load through the whole loader."""
    root = write_cifar(tmp_path, "cifar10", 100, 40)
    folder = root / "cifar-10-batches-py"
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            batch = pickle.load(fh)
        f.write_bytes(py2_cifar_batch(batch))
    d = load_dataset("cifar10", {"data_root": str(root), "val_fraction": 0.2})
    assert len(d.y_train) + len(d.y_val) == 100 and len(d.y_test) == 40


@pytest.mark.parametrize("nested", [False, True], ids=["top", "inside_a_batch"])
def test_a_malicious_cifar_batch_is_refused_without_running(tmp_path, capsys, nested):
    root = write_cifar(tmp_path, "cifar10", 100, 40)
    marker, path = tmp_path / "pwned", root / "cifar-10-batches-py" / "data_batch_1"
    evil = {**batch_of(), b"labels": Mkdir(marker)} if nested else Mkdir(marker)
    data = pickle.dumps(evil)
    pickle.loads(data)  # the payload is real: plain pickle runs it
    assert marker.is_dir()
    marker.rmdir()
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar10", {"data_root": str(root)})
    assert not marker.exists() and one_line(str(e.value))
    assert str(e.value) == f"refusing to load {path}: it asks for posix.mkdir; not a CIFAR batch"


def test_a_crafted_global_name_still_gives_one_line(tmp_path):
    path = tmp_path / "test_batch"
    # STACK_GLOBAL takes its names from the stack, so they can hold newlines.
    path.write_bytes(b"\x80\x04" + pickle.SHORT_BINUNICODE + b"\x04os\nx" + pickle.SHORT_BINUNICODE + b"\x06system"
                     + pickle.STACK_GLOBAL + pickle.STOP)
    with pytest.raises(ConfigError) as e:
        _unpickle(path)
    assert one_line(str(e.value)) and "refusing to load" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", pickle.dumps([1, 2, 3])],
                         ids=["empty", "garbage", "list"])
def test_a_broken_cifar_batch_is_one_line(tmp_path, content):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(f"cannot read {path}: ") + ".*not a CIFAR batch") as e:
        _unpickle(path)
    assert one_line(str(e.value))


def test_checkpoint_by_time_saves_once_the_interval_has_passed(tmp_path, monkeypatch):
    """--checkpoint-every 60s: no save before 60 s, one after; never after the last epoch."""
    import kdablate.storage as storage

    now = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: now[0])
    ckpt = storage.Checkpoint(tmp_path / "c.pt", every=0, every_s=60.0)
    assert not ckpt.due(1, 10)
    now[0] += 61
    assert ckpt.due(2, 10) and not ckpt.due(10, 10)
    ckpt.save({"epoch": 2})
    assert not ckpt.due(3, 10)  # the clock restarts at the save
    now[0] += 60
    assert ckpt.due(4, 10)
    by_epoch = storage.Checkpoint(tmp_path / "d.pt", every=2)
    assert [e for e in range(1, 7) if by_epoch.due(e, 6)] == [2, 4]
