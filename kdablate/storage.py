"""Crash-safe files: atomic writes, advisory locks and per-cell checkpoints.

Every shared file (teacher checkpoints, logit caches, cell checkpoints) is
written to a temp file in the same folder, flushed to the disk and renamed into
place (and the folder synced), so a reader, a ``kill -9`` or a power cut never
leaves half a file under the real name; a per-key ``flock`` keeps concurrent
workers from doing the same work twice. A write that fails (an unwritable
folder, a full disk) raises ``StorageError`` naming the file.

A cell checkpoint is an envelope: a header line with the sha256 and size of the
payload and the identity (config hash) of the cell it was made for, then the
payload, a ``torch.save`` of tensors, numbers and strings only, loaded with
``weights_only=True``. A checkpoint that is truncated, zeroed, edited, made for
another cell or asks for Python objects is deleted with a one-line message and
the cell restarts from epoch 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

# The first line of every cell checkpoint; the number changes when the state layout does.
CHECKPOINT_MAGIC = b"KDABLATE-CHECKPOINT 1\n"


class StorageError(OSError):
    """A file could not be written (unwritable folder, full disk...); the message names it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code  # kept for callers that branch on it; str() stays the one-line message


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the ``with`` block (POSIX flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(folder: Path) -> str:
    """Free space on the filesystem holding ``folder`` (or its nearest existing parent)."""
    for p in (folder, *folder.parents):
        if p.exists():
            try:
                return human_bytes(shutil.disk_usage(p).free)
            except OSError:
                break
    return "unknown space"


def storage_error(path: Path, e: OSError) -> StorageError:
    """A one-line StorageError for a failed write of ``path``; a full disk says how much is free."""
    if e.errno == errno.ENOSPC:
        why = f"no space left on the device ({free_space(path.parent)} free in {path.parent})"
    else:
        why = e.strerror or str(e) or type(e).__name__
    return StorageError(f"cannot write {path}: {why}", e.errno)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some filesystems cannot fsync a directory: nothing more to do
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(fh)`` into a temp file in ``path``'s folder, fsync it, rename it over ``path``, fsync
    the folder. On any failure the temp file is removed and ``path`` is untouched; an OSError
    becomes a StorageError naming ``path``."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise storage_error(path, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically and durably (see ``atomic_write``)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def pack_checkpoint(state: dict[str, Any], key: str) -> tuple[bytes, bytes]:
    """(header, payload): the payload is torch.save of ``state``; the header line carries its
    sha256 and size and ``key``, the identity of what the state was made from."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    return CHECKPOINT_MAGIC + json.dumps(header).encode() + b"\n", payload


def read_header(blob: bytes) -> tuple[dict | None, int, str]:
    """(header, payload offset, '') of a checkpoint file's bytes, else (None, 0, why)."""
    if not blob:
        return None, 0, "the file is empty"
    if not blob.startswith(CHECKPOINT_MAGIC):
        return None, 0, "not a kdablate checkpoint (no header: zeroed, foreign or an older format)"
    end = blob.find(b"\n", len(CHECKPOINT_MAGIC))
    try:
        header = json.loads(blob[len(CHECKPOINT_MAGIC) : end]) if end > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not {"key", "sha256", "size"} <= set(header):
        return None, 0, "truncated or corrupt header"
    return header, end + 1, ""


def shown(value: object) -> str:
    """A header field for a one-line message: at most 16 characters, escaped if not printable."""
    text = str(value)[:16]
    return text if text.isprintable() else ascii(text)


def unpack_checkpoint(blob: bytes, key: str) -> tuple[dict | None, str]:
    """(state, '') when ``blob`` is a whole checkpoint made for ``key``; else (None, why)."""
    header, start, why = read_header(blob)
    if header is None:
        return None, why
    payload = blob[start:]
    if len(payload) != header["size"]:
        return None, f"truncated ({len(payload)} of {shown(header['size'])} payload bytes)"
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        return None, "corrupt (its payload does not match its sha256)"
    if header["key"] != key:
        return None, f"made for another config ({shown(header['key'])} != {shown(key)})"
    try:
        # weights_only: tensors, numbers, strings and containers; never code, even from a planted file.
        state = load_tensors(io.BytesIO(payload))
    except pickle.UnpicklingError:
        return None, "refused: its payload asks for Python objects, which a checkpoint never holds"
    except Exception as e:  # noqa: BLE001 - any other failure: the file is not usable
        return None, f"unreadable ({type(e).__name__})"
    return (state, "") if isinstance(state, dict) else (None, "not a training state")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a cell saves its training state: every ``every`` epochs, or, with ``every_s`` > 0,
    at the end of the first epoch after ``every_s`` seconds since the last save (0 and 0: never).

    By time is the default of a study (``--checkpoint-every 60s``): a sub-second MNIST-1D
    epoch spent a noticeable share of its time writing a checkpoint every epoch, and a
    crash loses at most a minute either way.

    meta: caller data saved alongside (the MLflow run id, to resume into it).
    key: the identity of the cell the state belongs to (its config hash); '' means the
    file's stem, which is the config hash in ``runner.lifecycle.checkpoint_path``.
    """

    path: Path
    every: int = 1
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    key: str = ""
    every_s: float = 0.0
    # Called before each save: the runner writes the metrics of the epochs the state covers first.
    before_save: Callable[[], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    # When the clock started or the last save was: mutable state of a frozen record.
    _since: list[float] = dataclasses.field(default_factory=lambda: [time.monotonic()], compare=False, repr=False)

    @property
    def identity(self) -> str:
        return self.key or Path(self.path).stem

    def load_checked(self) -> tuple[dict[str, Any] | None, str]:
        """(state, '') for a whole checkpoint of this cell; (None, '') when there is none;
        (None, message) when the file was unusable: it is deleted and the one-line message,
        also printed, says why (for the caller to tag the run with)."""
        path = Path(self.path)
        if not path.exists():
            return None, ""
        try:
            state, why = unpack_checkpoint(path.read_bytes(), self.identity)
        except OSError as e:
            state, why = None, f"unreadable ({e.strerror or type(e).__name__})"
        if state is not None:
            return state, ""
        try:
            path.unlink()
            fate = "deleted it"
        except OSError as e:  # the next save then fails with a StorageError that says why
            fate = f"could not delete it ({e.strerror or type(e).__name__})"
        message = f"checkpoint {path} is not usable: {why}; {fate}, the cell restarts from epoch 0"
        print(message, flush=True)
        return None, message

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (none, or an unusable one: see ``load_checked``)."""
        return self.load_checked()[0]

    def save(self, state: dict[str, Any]) -> None:
        """Atomically write ``state`` (tensors, numbers, strings) with ``meta``; StorageError on failure."""
        if self.before_save is not None:
            self.before_save()

        def write(fh: IO[bytes]) -> None:
            header, payload = pack_checkpoint({**state, "meta": self.meta}, self.identity)
            fh.write(header)
            fh.write(payload)

        atomic_write(Path(self.path), write)
        self._since[0] = time.monotonic()

    def due(self, epoch: int, last: int) -> bool:
        """Whether to save after ``epoch`` of ``last`` (never after the last: the cell is done)."""
        if epoch >= last:
            return False
        if self.every_s > 0:
            return time.monotonic() - self._since[0] >= self.every_s
        return self.every > 0 and epoch % self.every == 0

    def clear(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def load_tensors(source: str | os.PathLike | IO[bytes], map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers, never code. torch's warning
    about a foreign pickle protocol is kept quiet: such a file is refused (an exception), which
    its caller reports in one line."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        return torch.load(source, map_location=map_location, weights_only=True)
