"""MLflow bookkeeping: one experiment per study, a parent run per invocation,
a child run per cell, and finished cells found again by their config hash.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global
active run, so logging never depends on hidden state.

A cell has one owner at a time: it is claimed in the store before it trains (see
``claim_cell``), so two invocations of one study, workers, Ray tasks or two users
on one server never train it twice. A new SQLite store is created once, under a
file lock, into a temporary file renamed into place, so a kill or a race during
creation never leaves a half-made store.
"""
from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import platform
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdablate.registry import ConfigError

BATCH = 100  # log_batch accepts at most 100 params per call
F = TypeVar("F", bound=Callable[..., Any])


def retry_locked(fn: F) -> F:
    """Retry a store call that hit SQLite's 'database is locked' (several workers, one file)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(12):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - MLflow wraps the sqlite error in its own types
                if "locked" not in str(e).lower() or attempt == 11:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set (a relative SQLite path made absolute), else a SQLite store
    in the project folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute(env)
    root = Path.cwd() if root is None else root
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


# The stores MLflow's tracking client can talk to: a SQLite or other database URL, or a server.
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def absolute(uri: str) -> str:
    """``sqlite:///rel.db`` (relative to the current folder, MLflow's usual form) made absolute:
    MLflow cannot put artifacts beside a relative path."""
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def client(uri: str | None = None) -> MlflowClient:
    """A client of the store at ``uri``; a local SQLite store is created (or repaired) first, a
    server must answer; StoreError (one line) for a store that cannot be used."""
    uri = absolute(uri or tracking_uri())
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise StoreError(f"MLFLOW_TRACKING_URI={uri[:80]}: unknown scheme '{scheme[:20]}'; use sqlite:///path/to/"
                         "mlruns.db or http://host:port (an MLflow server)")
    if scheme in ("http", "https"):
        reachable(uri)
    ensure_store(uri)
    return MlflowClient(tracking_uri=uri)


@functools.lru_cache(maxsize=8)
def reachable(uri: str, timeout: float = 10.0) -> None:
    """StoreError unless the tracking server at ``uri`` answers (once per process): MLflow's own
    client would retry for minutes and end in a hundred lines of traceback."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered, if not with a health page: a server is there
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise StoreError(f"cannot reach the MLflow server at {uri[:80]} ({str(reason)[:100]}); start it (mlflow "
                         "server) or point MLFLOW_TRACKING_URI elsewhere") from None


class StoreError(ConfigError):
    """The store cannot be used (half-made with runs in it, unwritable); one line for the CLI."""


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store, else None (a server or another backend)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _store_state(db: Path) -> str:
    """'ok', 'empty' (half-made, no runs: safe to recreate) or 'runs' (half-made with runs).

    Opened for writing: a process killed mid-transaction leaves a hot journal, which SQLite rolls
    back on the next connection that may write; a read-only one fails ("attempt to write a readonly
    database"), and a whole store would be taken for a damaged one. A store that stays locked is
    being written by another process: whole, as far as this check can tell (MLflow's calls retry)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
            done = "alembic_version" in tables and con.execute("select count(*) from alembic_version").fetchone()[0]
            if done and {"experiments", "runs", "metrics", "tags"} <= tables:
                return "ok"
            return "runs" if "runs" in tables and con.execute("select count(*) from runs").fetchone()[0] else "empty"
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e) or "busy" in str(e):
            return "ok"
        return "empty" if db.stat().st_size == 0 else "runs"


def ensure_store(uri: str) -> None:
    """Create a local SQLite store once, under a file lock, in a temporary file renamed into place.
    A store left half-made (by a kill, or by an older kdablate) is recreated when it holds no runs,
    with a message; with runs in it, StoreError says what to do."""
    db = sqlite_path(uri)
    if db is not None and db.is_dir():
        raise StoreError(f"the MLflow store {db} is a directory, not a SQLite file; point MLFLOW_TRACKING_URI at a "
                         "file (sqlite:///path/to/mlruns.db)")
    if db is None or (db.exists() and _store_state(db) == "ok"):
        return
    from kdablate.storage import file_lock

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(db.with_name(db.name + ".lock")):
            if db.exists():
                state = _store_state(db)
                if state == "ok":
                    return
                if state == "runs":
                    raise StoreError(f"the MLflow store {db} is damaged and holds runs; move it aside "
                                     "(or repair it with sqlite3) and rerun")
                aside = db.with_name(f"{db.name}.broken-{int(time.time())}")
                os.replace(db, aside)
                print(f"note: the MLflow store {db} was half-made (no runs in it); moved to {aside.name}, "
                      "creating it anew", flush=True)
            _create_store(db)
    except PermissionError as e:
        raise StoreError(f"cannot write the MLflow store at {db}: {e.strerror}; set MLFLOW_TRACKING_URI "
                         "to a writable place") from None


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """The named loggers at WARNING for the block: their INFO lines are MLflow's bookkeeping."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def _create_store(db: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for stale in db.parent.glob(f".{db.name}.*.creating*"):  # left by a creator killed mid-way (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    with quiet_loggers("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        store = SqlAlchemyStore(f"sqlite:///{tmp}", str(db.parent / "mlartifacts"))
    store.engine.dispose()
    os.replace(tmp, db)  # atomic: readers see no store or a whole one


def experiment_id(c: MlflowClient, name: str, description: str = "") -> str:
    """The experiment ``name``, created if missing (artifacts beside a local SQLite store), with
    ``description`` as its note (what the MLflow UI shows on the experiment's page)."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        uri = c._tracking_client.tracking_uri
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
        exp_id = c.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    if description and (exp is None or exp.tags.get("mlflow.note.content") != description):
        c.set_experiment_tag(exp_id, "mlflow.note.content", description)
    return exp_id


def runs_link(exp_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's runs table of an experiment (the experiment's own page opens elsewhere), in
    Model training mode (MLflow 3 opens in GenAI mode otherwise)."""
    return f"http://{host}:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def standard_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's own tags that fill the UI's User and Source columns."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    out = {"mlflow.user": user, "mlflow.source.name": "kdablate", "mlflow.source.type": "LOCAL"}
    if tag(tags, "env.git_commit", "unknown") != "unknown":
        out["mlflow.source.git.commit"] = tag(tags, "env.git_commit")
    return out


@retry_locked
def log_dataset(c: MlflowClient, run_id: str, name: str, digest: str, source: dict[str, Any]) -> None:
    """The run's training data as an MLflow dataset input (the UI's Dataset column)."""
    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps(source, default=str))
    c.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", "train")])])


PACKAGE_DIR = Path(__file__).resolve().parent


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """{'git_commit': sha or 'unknown', 'git_dirty': 'true'/'false'/'unknown'} of the checkout at
    ``cwd``, by default the one kdablate itself is in (not the folder a study runs from)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd or PACKAGE_DIR, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def module_files(name: str) -> list[Path]:
    """The source files of module or package ``name`` (a package: every .py below it), found
    without importing it; [] when it has no source on disk."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []


def source_digest(name: str) -> str:
    """16 hex digits of sha256 over the source of module or package ``name`` (relative paths and
    bytes, in path order): the code that made a number, committed or not; 'unknown' without source."""
    files = module_files(name)
    if not files:
        return "unknown"
    import hashlib

    root = files[0].parent if len(files) == 1 else Path(os.path.commonpath(files))
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_state(plugins: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """What code made a run: kdablate's git commit and dirty flag, the sha256 of its source, and
    of each plugin module the study imported ('name=digest,...', or 'none')."""
    return {**git_state(), "code_sha256": source_digest("kdablate"),
            "plugins_sha256": ",".join(f"{m}={source_digest(m)}" for m in plugins) or "none"}


CODE_TAGS = ("code_sha256", "plugins_sha256")  # what must match for two runs to share a code version
# On a parent run of `run --until-halfwidth`: the seeds run so far and their CI half-widths.
SEQUENTIAL_SEEDS, SEQUENTIAL_HALFWIDTHS = "kdablate.sequential_seeds", "kdablate.sequential_halfwidths"


def newest_parent(c: MlflowClient, study: str, tag: str | None = None) -> Any:
    """The study's newest parent run (with ``tag`` set, if given), or None."""
    exp = c.get_experiment_by_name(study)
    if exp is None:
        return None
    query = "tags.kind = 'study'" + (f" and tags.`{tag}` != ''" if tag else "")
    found = c.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def sequential_seeds(c: MlflowClient, study: str) -> list[int]:
    """Every seed ``run --until-halfwidth`` has run for ``study`` (all its records), sorted, or []."""
    exp = c.get_experiment_by_name(study)
    if exp is None:
        return []
    found = c.search_runs([exp.experiment_id], f"tags.kind = 'study' and tags.`{SEQUENTIAL_SEEDS}` != ''")
    return sorted({int(s) for r in found for s in r.data.tags[SEQUENTIAL_SEEDS].split(",")})


def search_cells(c: MlflowClient, exp_id: str, status: str | None = None) -> list:
    """Every cell run of the experiment (optionally only those with ``status``)."""
    query = "tags.kind = 'cell'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finished_hashes(c: MlflowClient, exp_id: str) -> dict[str, str]:
    """config_hash -> run_id of every FINISHED cell."""
    return {r.data.tags["config_hash"]: r.info.run_id for r in search_cells(c, exp_id, "FINISHED")}


@retry_locked
def start_run(c: MlflowClient, exp_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
    tags = {**standard_tags(tags), **tags}
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent}
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


@retry_locked
def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), BATCH):
        c.log_batch(run_id, params=items[i : i + BATCH])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """The metrics at ``step``, with a heartbeat tag, so stale runs can be told apart."""
    now = int(time.time() * 1000)
    log_metric_list(c, run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])


@retry_locked
def log_metric_list(c: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Metrics of any steps in batches of at most 1000 (MLflow's limit), each with a heartbeat."""
    for i in range(0, len(metrics), 1000):
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=metrics[i : i + 1000], tags=[RunTag(HEARTBEAT, str(now))])


class MetricBuffer:
    """A run's per-epoch metrics, written every ``every_s`` seconds instead of every epoch.

    One write to a SQLite store costs ~50 ms, as much as a few dozen MLP steps: a default cell
    that wrote each of its 40 epochs spent about a quarter of its time there. Call ``flush``
    before a checkpoint is saved (``Checkpoint.before_save``), so a resumed cell never skips
    an epoch's metrics, and when the cell ends however it ends.
    """

    def __init__(self, c: MlflowClient, run_id: str, every_s: float = 30.0) -> None:
        self.client, self.run_id, self.every_s = c, run_id, every_s
        self.pending: list[Metric] = []
        self.last = time.monotonic()

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            log_metric_list(self.client, self.run_id, self.pending)
        self.pending, self.last = [], time.monotonic()


@retry_locked
def set_tags(c: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@retry_locked
def terminate(c: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run as FINISHED / FAILED / KILLED, with the reason as the FAILURE tag."""
    if reason:
        c.set_tag(run_id, FAILURE, reason[:4000])
    c.set_terminated(run_id, status)


# Bookkeeping tags live under 'kdablate.', provenance under 'env.', so the UI's tag list shows the
# factors, not the plumbing (the MLflow UI hides only 'mlflow.*'). Older stores carry the bare names.
HEARTBEAT, WORKER_HOST, WORKER_PID = "kdablate.heartbeat", "kdablate.worker_host", "kdablate.worker_pid"
FAILURE, RESUMED = "kdablate.failure_reason", "kdablate.resumed_from_epoch"
ENV = "env."


def tag(tags: dict[str, str], name: str, default: str = "") -> str:
    """A tag by its prefixed name ('kdablate.x', 'env.x'), else by its bare name in an older store."""
    bare = name.split(".", 1)[1] if name.startswith(("kdablate.", ENV)) else name
    return tags.get(name, tags.get(bare, default))


def env_tags(provenance: dict[str, str]) -> dict[str, str]:
    """Provenance (code state, machine, library build) as 'env.*' tags."""
    return {ENV + k: v for k, v in provenance.items()}


# Summary metrics are logged at step 0 for the UI, which shows two decimals: accuracies, agreement
# and ECE go there in percent, so the charts show hundredths of a point. Everything that reads them
# back (`summary`) gets fractions, as kdablate computes them; a run without the UNITS tag (an older
# store) holds fractions already.
UNITS, PERCENT_SUFFIXES = "kdablate.summary_units", ("_acc", "_agreement", "_ece")


def in_percent(name: str) -> bool:
    """Whether summary metric ``name`` is logged in percent ('report/test_acc', 'teacher/val_acc')."""
    return name.split("/", 1)[0] in ("report", "teacher") and name.endswith(PERCENT_SUFFIXES)


def log_summary(c: MlflowClient, run_id: str, final: dict[str, float]) -> None:
    """Log a cell's summary metrics (fractions) at step 0, the PERCENT ones times 100."""
    set_tags(c, run_id, {UNITS: "percent"})
    log_metrics(c, run_id, {k: 100 * v if in_percent(k) else v for k, v in final.items()}, 0)


def summary(run: Any) -> dict[str, float]:
    """A run's latest metrics with the summaries in fractions, whichever units its store logged."""
    scale = 100.0 if run.data.tags.get(UNITS) == "percent" else 1.0
    return {k: v / scale if in_percent(k) else v for k, v in run.data.metrics.items()}


def owner_tags() -> dict[str, str]:
    """Which process runs this: stale RUNNING runs are found by host + pid or heartbeat."""
    return {WORKER_HOST: platform.node(), WORKER_PID: str(os.getpid())}


def owner_of(tags: dict[str, str]) -> tuple[str, str]:
    """(host, pid) of the process that last claimed a run."""
    return tag(tags, WORKER_HOST), tag(tags, WORKER_PID)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie (exited, not yet reaped: where PID 1 does not reap orphans,
    e.g. a container without an init, a killed study's workers stay so) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: signal 0 is all there is
    return state not in ("Z", "X")


STALE_AFTER_S = 1800.0  # a run of another host with no heartbeat for this long is dead
DEAD = "the process running it died (killed or crashed); rerun resumes it"


def owner_alive(run: Any, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the process that owns a RUNNING run still runs: by pid on this host, else by the
    age of its heartbeat (a tag refreshed with every epoch's metrics)."""
    host, pid = owner_of(run.data.tags)
    if host == platform.node() and pid.isdigit():
        return _pid_alive(int(pid))
    last = float(tag(run.data.tags, HEARTBEAT) or run.info.start_time or 0)
    return time.time() * 1000 - last <= stale_after_s * 1000


def owner(run: Any) -> str:
    host, pid = owner_of(run.data.tags)
    return f"{host or '?'} pid {pid or '?'}"


def reap_stale(c: MlflowClient, exp_id: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Mark RUNNING runs whose process is gone KILLED; returns their run ids."""
    reaped = []
    for run in c.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000):
        if not owner_alive(run, stale_after_s):
            terminate(c, run.info.run_id, "KILLED", DEAD)
            reaped.append(run.info.run_id)
    return reaped


@contextlib.contextmanager
def claim_lock(uri: str) -> Iterator[None]:
    """Serialises claims on a local SQLite store (one file lock beside it). A server has no shared
    lock: there ``claim_cell`` settles races by a deterministic tie-break instead."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from kdablate.storage import file_lock

    with file_lock(db.with_name(db.name + ".claims")):
        yield


def cell_runs(c: MlflowClient, exp_id: str, config_hash: str) -> list:
    return c.search_runs([exp_id], f"tags.kind = 'cell' and tags.config_hash = '{config_hash}'", max_results=1000)


def resume_point(c: MlflowClient, run_id: str, epoch: int) -> tuple[float, int]:
    """For a run resumed from its checkpoint at ``epoch``: the seconds its earlier attempts took
    to reach that epoch (so wall time accumulates), and the last epoch they already logged
    (epochs up to it are retrained bit for bit and must not be logged twice)."""
    elapsed = max((m.value for m in c.get_metric_history(run_id, "time/elapsed_s") if m.step == epoch), default=0.0)
    logged = max((m.step for m in c.get_metric_history(run_id, "val/acc")), default=0)
    return elapsed, logged


SETTLE_S = 1.0  # on a server: how long a new claim waits for a rival's claim to become visible


def claim_cell(c: MlflowClient, exp_id: str, uri: str, config_hash: str, resume: str | None,
               create: Callable[[], str]) -> tuple[str | None, bool, str]:
    """Make this process the one owner of a cell before it trains.

    Returns (run_id, resumed, '') when it now owns the cell: ``resume`` (a run id from its
    checkpoint) reopened if that run is not finished, else a run made by ``create``, which must
    set ``owner_tags``. Returns (None, False, why) when the cell is finished or a live process
    owns it; a RUNNING run whose owner died is marked KILLED and taken over.
    """
    with claim_lock(uri):
        runs = cell_runs(c, exp_id, config_hash)
        if any(r.info.status == "FINISHED" for r in runs):
            return None, False, "finished meanwhile by another process"
        for r in runs:
            if r.info.status == "RUNNING":
                mine = owner_of(r.data.tags) == owner_of(owner_tags())
                if owner_alive(r) and not mine:
                    return None, False, f"being trained by {owner(r)}"
                terminate(c, r.info.run_id, "KILLED", DEAD)
        resumed = resume in {r.info.run_id for r in runs}
        if resumed:
            c.update_run(resume, status="RUNNING")
            set_tags(c, resume, owner_tags())
        run_id = resume if resumed else create()
    if sqlite_path(uri) is None:
        return _settle(c, exp_id, config_hash, run_id, resumed)
    return run_id, resumed, ""


def _settle(c: MlflowClient, exp_id: str, config_hash: str, run_id: str,
            resumed: bool) -> tuple[str | None, bool, str]:
    """Without a shared lock two processes may both claim a cell; after a pause, the RUNNING run
    that started first (then the smaller id) keeps it, and for a reopened run the last owner tag
    written does. The others back off, so exactly one trains."""
    time.sleep(SETTLE_S)
    if resumed:
        run = c.get_run(run_id)
        if owner_of(run.data.tags) != owner_of(owner_tags()):
            return None, False, f"being trained by {owner(run)}"
        return run_id, True, ""
    rivals = [r for r in cell_runs(c, exp_id, config_hash) if r.info.status == "RUNNING"]
    first = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id))
    if first.info.run_id != run_id:
        terminate(c, run_id, "KILLED", f"lost the claim on this cell to {owner(first)}")
        return None, False, f"being trained by {owner(first)}"
    return run_id, False, ""
