"""Run a study: every pending cell through the shared trainer, logged to MLflow.

One parent run per invocation, one child run per cell x seed. Cells whose
config hash already has a FINISHED run are skipped, so a rerun resumes; RUNNING
runs whose process died are marked KILLED first, and a cell with a checkpoint
continues inside its old run from the last saved epoch. A cell that raises or
diverges is marked FAILED with the reason as a tag; the study goes on, and the
exit code says that cells failed.

Cells run in this process, in ``workers`` local processes, or as Ray tasks on
an existing cluster (``executor='ray'``); teachers are trained once, before the
cells fan out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdablate import hardware, stacked, tracking
from kdablate.checks import data_facts
from kdablate.compose import import_plugins
from kdablate.components import Need
from kdablate.config import CellConfig, canonical, flatten
from kdablate.data import DataBundle, load_dataset, on_device
from kdablate.factors import FACTOR_TABLE
from kdablate.hashing import stable_hash
from kdablate.registry import ConfigError
from kdablate.saved import save_student
from kdablate.storage import Checkpoint
from kdablate.study import Study
from kdablate.teacher import Teacher, get_teacher
from kdablate.trainer import FitResult, Runtime, fit


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run a study (not part of any cell's config or hash)."""

    cache_dir: Path = Path(".cache/kdablate")
    threads: int = 0  # torch threads per worker; 0: the cores left to each (1 per Ray task)
    workers: int = 1  # local processes; 0: auto (``auto_workers``), the CLI's default
    checkpoint_every: int = 1
    executor: str = "local"
    address: str | None = None
    uri: str | None = None
    progress: bool = True
    device: str = "auto"
    amp: str = "none"
    checkpoint_every_s: float = 0.0  # > 0: checkpoint by time instead (the CLI's default, 60 s)
    plugins: tuple[str, ...] = ()  # the study's plugin modules, imported in every worker too
    plugin_dir: str = ""  # the study file's folder, where plugin modules may lie
    gpus_per_cell: float = 0.25  # the fraction of a GPU a Ray task of one cell requests
    roles: tuple[tuple[str, str], ...] = ()  # arm -> 'baseline' / 'reference' (the rest: 'arm'), a run tag
    stack: str = "auto"  # train an arm's seeds as one stacked model: 'auto' (where faster), 'on', 'off'
    stack_max: int = 16  # at most this many seeds in one stack
    allow_mixed_code: bool = False  # add cells to a study whose finished cells other code made
    # teacher key -> why it cannot be used (it diverged or failed to train), found by
    # ensure_teachers before the cells fan out, so no worker trains it again.
    teacher_failures: tuple[tuple[str, str], ...] = ()

    def runtime(self) -> Runtime:
        """'auto' picks CUDA when torch sees a GPU, else the CPU."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        return Runtime(device, self.amp)


@dataclasses.dataclass(frozen=True)
class CellOutcome:
    arm: str
    seed: int
    status: str
    message: str


def provenance(threads: int, runtime: Runtime = Runtime()) -> dict[str, str]:
    """Tags that say where and how a run was made: bit-identical numbers need all of them equal."""
    device = runtime.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "cpu_model": hardware.cpu_model(),
        "cpu_capability": hardware.cpu_capability(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "python_version": platform.python_version(),
        "device": device,
        "amp": runtime.amp,
        "threads": str(threads),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "host": platform.node(),
    }


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run here (None if it can): the CLI says so in one line, exit 2."""
    if device in ("auto", "cpu"):
        return None
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        return f"--device '{device[:40]}' is not one of auto, cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); use --device cpu"
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..."
    return None


class TeacherRejected(RuntimeError):
    """The cell reads a teacher that diverged, failed to train, or is below its quality gate."""


def load_teacher(cell: CellConfig, data: DataBundle, opts: RunOptions, runtime: Runtime) -> Teacher | None:
    """The cell's teacher, if it has one it may use. An unusable teacher fails a cell that reads it
    (TeacherRejected) and is left out of one that does not (which then logs no agreement)."""
    if cell.teacher is None:
        return None
    reads = bool(cell.knowledge.needs() & (Need.TEACHER | Need.TEACHER_MODEL))
    why = dict(opts.teacher_failures).get(cell.teacher_key())
    teacher = None if why else get_teacher(cell, data, opts.cache_dir, runtime)
    why = why or teacher.rejection(cell, data.num_classes)
    if why and reads:
        raise TeacherRejected(why)
    return None if why else teacher


def train_cell(client: tracking.MlflowClient, run_id: str, cell: CellConfig, opts: RunOptions,
               on_epoch: Callable[[int, dict[str, float]], None],
               before_save: Callable[[], None] | None = None) -> dict[str, float]:
    """Train one cell, handing each epoch's metrics to ``on_epoch``; returns the reported metrics.
    ``before_save`` runs before each checkpoint is written."""
    runtime = opts.runtime()
    data = cell_data(cell, runtime, opts.cache_dir)
    tracking.log_dataset(client, run_id, cell.data.name, data.fingerprint, cell.data.model_dump(mode="json"))
    teacher = load_teacher(cell, data, opts, runtime)
    # The teacher, resolved once into what the trainer reads: cached logits, cached views or online.
    signal = None if teacher is None else teacher.signal(cell, data, runtime)
    ckpt = cell_checkpoint(cell, opts, run_id, before_save)
    result = fit(cell.student, data, cell.optim, cell.knowledge, cell.seed, teacher=signal, report=cell.report,
                 on_epoch=on_epoch, checkpoint=ckpt, runtime=runtime)
    return record_result(client, run_id, cell, result, teacher, data)


def cell_data(cell: CellConfig, runtime: Runtime, cache_dir: Path) -> DataBundle:
    """The cell's data; on a GPU its images live there (``on_device``), or, too large for it, in
    pinned host memory for asynchronous copies."""
    data = load_dataset(cell.data.name, cell.data.params, cache_dir)
    if runtime.device.startswith("cuda"):
        moved = on_device(data, runtime.device)
        data = moved if moved is not data else dataclasses.replace(
            data, x_train=data.x_train.pin_memory(), y_train=data.y_train.pin_memory())
    return data


def cell_checkpoint(cell: CellConfig, opts: RunOptions, run_id: str,
                    before_save: Callable[[], None] | None = None) -> Checkpoint:
    return Checkpoint(checkpoint_path(cell, opts), opts.checkpoint_every, {"run_id": run_id}, key=cell.config_hash(),
                      every_s=opts.checkpoint_every_s, before_save=before_save)


def record_result(client: tracking.MlflowClient, run_id: str, cell: CellConfig, result: FitResult,
                  teacher: Teacher | None, data: DataBundle) -> dict[str, float]:
    """Log a trained cell's artifacts (similarities, calibration, the student if asked); its
    reported metrics with the teacher's."""
    for name, matrix in result.artifacts.items():
        client.log_text(run_id, json.dumps(matrix.tolist()), f"similarity/{name}.json")
    for split, bins in result.calibration.items():
        client.log_text(run_id, json.dumps(bins), f"calibration/{split}.json")
    if cell.save_model:
        save_student(client, run_id, cell, result.model, data.input_shape, data.num_classes)
    final = dict(result.metrics)
    if teacher is not None:
        final.update({"teacher/" + key.removeprefix("report/"): v for key, v in teacher.metrics.items()})
        tracking.set_tags(client, run_id, teacher.tags())
    return final


def checkpoint_path(cell: CellConfig, opts: RunOptions) -> Path:
    return Path(opts.cache_dir) / "checkpoints" / f"{cell.config_hash()}.pt"


def spec_label(spec: Any) -> str:
    """A plugin as the tags and descriptions name it: its name and the parameters that differ from
    its defaults, e.g. 'constant(eps=0.1)', so two arms that differ by a parameter are told apart."""
    params = canonical(spec)["params"]
    return spec.name + (f"({','.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")


def factor_tags(cell: CellConfig) -> dict[str, str]:
    """Short tags of the factors an ablation crosses, 'n/a' where the arm does not use one (CE reads
    no mass, structure or T; DKD no mass or structure), so one search selects arms to compare."""
    k = cell.knowledge
    target = k.objective.name == "soft_target" and k.alpha > 0
    uses_t = k.alpha > 0
    params = {**k.structure.params, **k.structure.params.get("base_params", {})}
    source = params.get("source", "saliency") if "explanation" in (k.structure.name, params.get("base")) else "n/a"
    levels = {"objective": spec_label(k.objective), "mass": spec_label(k.mass) if target else "n/a",
              "structure": spec_label(k.structure) if target else "n/a",
              "temperature": f"{k.temperature:g}" if uses_t else "n/a", "alpha": f"{k.alpha:g}",
              "source": source if target else "n/a"}
    return {f.tag: levels[f.name] for f in FACTOR_TABLE}


def describe(cell: CellConfig) -> str:
    """The arm's definition in a line, for the run's description in the MLflow UI: the factor tags'
    values (an arm at alpha 0 reads no mass, structure or T, and says so)."""
    tags = factor_tags(cell)
    what = ", ".join(f"{f.tag} {tags[f.tag]}" for f in FACTOR_TABLE) + ("; alpha 0: plain cross-entropy, no soft target" if cell.knowledge.alpha == 0 else "")
    return (f"Arm `{cell.arm}`, seed {cell.seed}: {what}; student {cell.student.name}, data {cell.data.name}; "
            f"config hash {cell.config_hash()} (full config: config.json).")


def open_run(client: tracking.MlflowClient, exp_id: str, parent: str, cell: CellConfig, opts: RunOptions,
             tags: dict[str, str]) -> tuple[str | None, int, str]:
    """Claim the cell (see ``tracking.claim_cell``): the run its checkpoint names, reopened, else a
    new one. Returns (run_id, the epoch it resumes after (0: a new run), '') or (None, 0, why)
    when the cell is finished or another process owns it."""
    # A truncated, corrupt or foreign checkpoint is deleted here, with a message: the cell restarts.
    saved, problem = (Checkpoint(checkpoint_path(cell, opts), key=cell.config_hash()).load_checked()
                      if opts.checkpoint_every or opts.checkpoint_every_s else (None, ""))

    def create() -> str:
        # The UI lists tag keys in the order the first run logged them: the factors first.
        cell_tags = {"arm": cell.arm, "role": dict(opts.roles).get(cell.arm, "arm"), **factor_tags(cell),
                     "seed": str(cell.seed), "kind": "cell", "config_hash": cell.config_hash(), **tags,
                     **tracking.owner_tags(), "mlflow.note.content": describe(cell)}
        return tracking.start_run(client, exp_id, f"{cell.arm}/seed{cell.seed}", cell_tags, parent)

    run_id, resumed, why = tracking.claim_cell(client, exp_id, opts.uri or tracking.tracking_uri(),
                                               cell.config_hash(), saved["meta"].get("run_id") if saved else None,
                                               create)
    if run_id is None:
        return None, 0, why
    if resumed:
        tracking.set_tags(client, run_id, {tracking.RESUMED: str(saved["epoch"])})
        return run_id, int(saved["epoch"]), ""
    if saved:  # its run is gone (another store) or finished: the checkpoint is not this run's
        checkpoint_path(cell, opts).unlink(missing_ok=True)
    if problem:
        tracking.set_tags(client, run_id, {"kdablate.checkpoint_discarded": problem})
    tracking.log_params(client, run_id, flatten(cell.model_dump(mode="json")))
    client.log_text(run_id, json.dumps(cell.model_dump(mode="json"), indent=2), "config.json")
    return run_id, 0, ""


def run_cell(cell: CellConfig, exp_id: str, parent: str, tags: dict[str, str], opts: RunOptions) -> CellOutcome:
    """One child run, FINISHED or FAILED (SKIPPED when another process owns the cell); a
    KeyboardInterrupt marks it KILLED and propagates."""
    client = tracking.client(opts.uri)
    run_id, resumed, why = open_run(client, exp_id, parent, cell, opts, tags)
    if run_id is None:
        return CellOutcome(cell.arm, cell.seed, "SKIPPED", why)
    return train_claimed(client, cell, run_id, resumed, opts)


def train_claimed(client: tracking.MlflowClient, cell: CellConfig, run_id: str, resumed: int,
                  opts: RunOptions) -> CellOutcome:
    """Train a cell this process has claimed (``open_run``), resuming after epoch ``resumed``."""
    carried, logged = tracking.resume_point(client, run_id, resumed)
    t0 = time.time()
    bar = cell_bar(cell, opts)
    buffer = tracking.MetricBuffer(client, run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch > logged:  # an epoch retrained after a resume is logged once
            buffer.add({**metrics, "time/elapsed_s": carried + time.time() - t0}, epoch)
        if bar is not None:
            bar.update(epoch - bar.n)
            bar.set_postfix({"val/acc": f"{metrics['val/acc']:.3f}"})

    try:
        final = train_cell(client, run_id, cell, opts, on_epoch, buffer.flush)
        final["time/wall_s"] = carried + time.time() - t0
        buffer.flush()
        finish(client, run_id, final)
        checkpoint_path(cell, opts).unlink(missing_ok=True)  # only once every metric is written
    except KeyboardInterrupt:
        end(client, run_id, buffer, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the study
        return failed(client, run_id, cell, e, buffer)
    finally:
        if bar is not None:
            bar.close()
    return finished(cell, final, resumed)


def failed(client: tracking.MlflowClient, run_id: str, cell: CellConfig, error: Exception,
           buffer: tracking.MetricBuffer | None = None) -> CellOutcome:
    """Mark the cell's run FAILED with the error as its reason (its curves written first)."""
    why = f"{type(error).__name__}: {error}"
    if buffer is None:
        tracking.terminate(client, run_id, "FAILED", why)
    else:
        end(client, run_id, buffer, "FAILED", why)
    return CellOutcome(cell.arm, cell.seed, "FAILED", why)


def end(client: tracking.MlflowClient, run_id: str, buffer: tracking.MetricBuffer, status: str, why: str) -> None:
    """End a run that did not finish, its curves written up to where it stopped."""
    try:
        buffer.flush()
    finally:
        tracking.terminate(client, run_id, status, why)


def finish(client: tracking.MlflowClient, run_id: str, final: dict[str, float]) -> None:
    # Summaries at step 0: the UI draws a metric whose steps are all 0 as one bar per run,
    # not as a one-point line (its rule: a line once any run logs it at step >= 1).
    tracking.log_summary(client, run_id, final)
    tracking.terminate(client, run_id, "FINISHED")


def finished(cell: CellConfig, final: dict[str, float], resumed: int, how: str = "") -> CellOutcome:
    note = f" (resumed after epoch {resumed})" if resumed else ""
    return CellOutcome(cell.arm, cell.seed, "FINISHED", f"test/acc {final['report/test_acc']:.4f} "
                       f"(val {final['report/val_acc']:.4f}, {final['time/wall_s']:.1f}s{how}){note}")


# Per device type, the models whose seeds ``--stack auto`` stacks: where the 'stacked seeds' rows
# (``make bench`` on a CPU, ``make gpu-check`` on CUDA) measured it faster. CPU (2-core EPYC):
# the MLP's epoch of 10 seeds x2.2 faster stacked, the 1-D CNN's x1.1 (too little to be worth
# a default), a CIFAR ResNet's x0.8 (grouped convolutions are slow there). CUDA (H200): MLP x4.2, 1-D CNN x3.7,
# ResNet-8 x1.6 (10 seeds); deeper ResNets are unmeasured, so left out. ``--stack on`` stacks any model.
STACK_AUTO = {"cpu": ("mlp",), "cuda": ("mlp", "cnn1d", "resnet8")}


def stack_refusal(cell: CellConfig, opts: RunOptions) -> str | None:
    """None when this cell's seeds train stacked; else why not ('' when ``--stack`` does not ask)."""
    runtime = opts.runtime()
    auto = STACK_AUTO.get(torch.device(runtime.device).type, ())
    if not (cell.student.name in auto if opts.stack == "auto" else opts.stack == "on"):
        return ""
    return stacked.refusal(cell.student, cell.knowledge, (), runtime) or None


def stack_notes(cells: list[CellConfig], opts: RunOptions) -> list[str]:
    """One line per arm whose seeds ``--stack`` asked to stack but that trains them one by one."""
    notes = {c.arm: f"note: {c.arm}: seeds train one by one, not stacked: {why}"
             for c in cells if (why := stack_refusal(c, opts))}
    return list(notes.values())


def work_units(cells: list[CellConfig], opts: RunOptions) -> list[list[CellConfig]]:
    """The cells as units of work, in order: the seeds of one cell config together (at most
    ``stack_max``) where they stack, else one cell each (claimed only when it trains)."""
    groups: dict[str, list[CellConfig]] = {}
    for cell in cells:
        together = stack_refusal(cell, opts) is None
        key = stable_hash({**cell.model_dump(mode="json"), "seed": None}) if together else cell.config_hash()
        groups.setdefault(key, []).append(cell)
    return [g[i : i + opts.stack_max] for g in groups.values() for i in range(0, len(g), opts.stack_max)]


def run_unit(cells: list[CellConfig], exp_id: str, parent: str, tags: dict[str, str],
             opts: RunOptions) -> list[CellOutcome]:
    """A unit of work: one cell, or the seeds of one cell trained as one stack (``kdablate.stacked``).
    A stack that cannot train (its objective reads the model, its seeds' checkpoints disagree, or
    it fails) trains its seeds one by one, with a message, so every seed keeps its own outcome."""
    if len(cells) == 1:
        return [run_cell(cells[0], exp_id, parent, tags, opts)]
    client = tracking.client(opts.uri)
    outcomes, claimed = [], []
    for cell in cells:
        run_id, resumed, why = open_run(client, exp_id, parent, cell, opts, tags)
        if run_id is None:
            outcomes.append(CellOutcome(cell.arm, cell.seed, "SKIPPED", why))
        else:
            claimed.append((cell, run_id, resumed))
    try:
        return outcomes + train_stack(client, claimed, opts)
    except KeyboardInterrupt:
        for _, run_id, _ in claimed:  # not the seeds a stack already finished
            if client.get_run(run_id).info.status == "RUNNING":
                tracking.terminate(client, run_id, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - the seeds then train alone, each with its own outcome
        if claimed:
            print(f"note: {claimed[0][0].arm}: {len(claimed)} seed(s) train one by one, not stacked: "
                  f"{type(e).__name__}: {e}", flush=True)
    for cell, run_id, _ in claimed:
        saved = Checkpoint(checkpoint_path(cell, opts), key=cell.config_hash()).load()
        outcomes.append(train_claimed(client, cell, run_id, saved["epoch"] if saved else 0, opts))
    return outcomes


class StackRefused(RuntimeError):
    """These seeds do not stack (``kdablate.stacked.refusal`` says why)."""


def train_stack(client: tracking.MlflowClient, claimed: list[tuple[CellConfig, str, int]],
                opts: RunOptions) -> list[CellOutcome]:
    """Train claimed seeds of one cell config as one stack; each seed logs to its own run."""
    if len(claimed) < 2:
        raise StackRefused("fewer than two seeds to train")
    cells, runs = [c for c, _, _ in claimed], [r for _, r, _ in claimed]
    runtime = opts.runtime()
    data = cell_data(cells[0], runtime, opts.cache_dir)
    teachers = [load_teacher(cell, data, opts, runtime) for cell in cells]
    signals = [None if t is None else t.signal(c, data, runtime) for t, c in zip(teachers, cells)]
    why = stacked.refusal(cells[0].student, cells[0].knowledge, signals, runtime)
    if why:
        raise StackRefused(why)
    points = [tracking.resume_point(client, r, e) for _, r, e in claimed]
    t0, size = time.time(), len(cells)
    buffers = [tracking.MetricBuffer(client, r) for r in runs]

    def on_epoch(s: int, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > points[s][1]:  # each seed's time is its share of the stack's
            buffers[s].add({**metrics, "time/elapsed_s": points[s][0] + (time.time() - t0) / size}, epoch)

    ckpts = [cell_checkpoint(c, opts, r, b.flush) for c, r, b in zip(cells, runs, buffers)]
    for cell, run_id in zip(cells, runs):
        tracking.log_dataset(client, run_id, cell.data.name, data.fingerprint, cell.data.model_dump(mode="json"))
    try:
        results = stacked.fit_stacked(cells[0].student, data, cells[0].optim, cells[0].knowledge,
                                      [c.seed for c in cells], signals, cells[0].report, on_epoch, ckpts, runtime)
    finally:  # the curves so far, also when the stack fails and its seeds go on alone
        for b in buffers:
            b.flush()
    wall = (time.time() - t0) / size
    return [finish_seed(client, claimed[s], results[s], teachers[s], data, points[s][0] + wall, size, opts)
            for s in range(size)]


def finish_seed(client: tracking.MlflowClient, claim: tuple[CellConfig, str, int], result: FitResult,
                teacher: Teacher | None, data: DataBundle, wall_s: float, size: int, opts: RunOptions) -> CellOutcome:
    """Log one trained seed of a stack to its run. A failure here fails this seed alone: the
    stack's training is done, and the seeds already finished must not train again."""
    cell, run_id, resumed = claim
    try:
        tracking.set_tags(client, run_id, {"kdablate.stacked": str(size)})
        final = {**record_result(client, run_id, cell, result, teacher, data), "time/wall_s": wall_s}
        finish(client, run_id, final)
    except Exception as e:  # noqa: BLE001 - as train_claimed: this cell FAILED, the study goes on
        return failed(client, run_id, cell, e)
    checkpoint_path(cell, opts).unlink(missing_ok=True)
    return finished(cell, final, resumed, f", 1/{size} of a stack")


def cell_bar(cell: CellConfig, opts: RunOptions) -> Any:
    """A per-cell epoch bar, only when cells run in this process on a terminal."""
    if not opts.progress or opts.workers > 1 or opts.executor != "local":
        return None
    from tqdm import tqdm

    return tqdm(total=cell.optim.epochs, desc=f"  {cell.arm} s{cell.seed}", unit="ep", leave=False, disable=None)


def _init_worker(threads: int, plugins: tuple[str, ...] = (), plugin_dir: str = "", parent: int = 0) -> None:
    if parent:  # a local worker process: it goes when the study's process goes, however it goes
        hardware.die_with_parent(parent)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    if plugins:  # a spawned worker or a Ray task starts without the study's own components
        import_plugins(list(plugins), Path(plugin_dir or "."))


def _run_sequential(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    for unit in units:
        yield from run_unit(unit, *args, opts)


def _run_processes(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: forking a process that already runs torch / OpenMP threads is unsafe.
    with cf.ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(opts.threads, opts.plugins, opts.plugin_dir, os.getpid())) as pool:
        devices = placements(len(units), opts.runtime().device, torch.cuda.device_count())
        futures = [pool.submit(run_unit, unit, *args, dataclasses.replace(opts, device=d))
                   for unit, d in zip(units, devices)]
        try:
            for future in cf.as_completed(futures):
                yield from future.result()
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def placements(n_cells: int, device: str, n_gpus: int) -> list[str]:
    """Each cell's device: with ``cuda`` (no index) and several GPUs, round-robin over
    cuda:0..n-1 in submission order, so N workers spread over the GPUs; else ``device``."""
    if device != "cuda" or n_gpus <= 1:
        return [device] * n_cells
    return [f"cuda:{i % n_gpus}" for i in range(n_cells)]


def ray_resources(opts: RunOptions, cells: int = 1) -> dict[str, float]:
    """What a Ray task of a unit of ``cells`` cells (one, or a stack's seeds) asks for: its threads,
    and on CUDA a fraction of a GPU per cell, at most one GPU (a small cell uses a sliver of one:
    gpu-check measured under 400 MiB for a resnet8 cell), so Ray packs several cells per GPU; Ray
    then sets CUDA_VISIBLE_DEVICES, and 'cuda' is the GPU it chose."""
    gpus = min(1.0, opts.gpus_per_cell * cells) if opts.runtime().device.startswith("cuda") else 0.0
    return {"num_cpus": opts.threads or 1, "num_gpus": gpus}


def _run_ray(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    import ray

    ray.init(address=opts.address, log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(_ray_unit)
    pending = [task.options(**ray_resources(opts, len(unit))).remote(unit, *args, opts) for unit in units]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready[0])
    finally:
        ray.shutdown()


def _ray_unit(cells: list[CellConfig], exp_id: str, parent: str, tags: dict[str, str],
              opts: RunOptions) -> list[CellOutcome]:
    _init_worker(opts.threads, opts.plugins, opts.plugin_dir)
    return run_unit(cells, exp_id, parent, tags, opts)


# A worker's peak resident memory, rounded up: the one-cell peak RSS row of ``make bench`` read 936 MiB.
WORKER_MIB = 1024
# Training passes (epochs x training samples, summed over cells) below which one worker is used:
# a worker's start-up (~5 s of imports) outweighs what it takes over. The 8-cell bench grid
# (1.2 M) was no faster on 2 workers; the components study (11.5 M) was x1.26 faster.
AUTO_MIN_PASSES = 4_000_000


def resolve_paths(opts: RunOptions) -> RunOptions:
    """Absolute cache folder and store URI: workers may start elsewhere."""
    return dataclasses.replace(opts, cache_dir=Path(opts.cache_dir).resolve(), uri=opts.uri or tracking.tracking_uri())


def resolve(opts: RunOptions, units: int = 1, passes: int = AUTO_MIN_PASSES) -> RunOptions:
    """``resolve_paths``, the workers (``auto_workers`` when 0) for ``units`` units of work, and
    threads so that workers x threads <= cores."""
    cores = hardware.usable_cores()
    workers = opts.workers or (auto_workers(units, opts.runtime(), passes, opts.threads)
                               if opts.executor == "local" else 1)
    # By default each local worker takes its share of the cores: a stack of 10 MLP seeds is
    # x1.3 faster on 2 threads than on 1, and a single small cell is no slower (measured here).
    threads = opts.threads or (1 if opts.executor == "ray" else max(1, cores // workers))
    if opts.executor == "local" and workers * threads > cores and opts.threads:
        threads = max(1, cores // workers)
        print(f"note: {workers} workers x {opts.threads} threads > {cores} cores; using {threads} thread(s) each")
    return dataclasses.replace(resolve_paths(opts), workers=workers, threads=threads)


def training_passes(cells: list[CellConfig]) -> int:
    """Sum over ``cells`` of epochs x training samples (from the study's checks, memoised per dataset)."""
    return sum(c.optim.epochs * data_facts(c).shape.n_train for c in cells)


def auto_workers(units: int, runtime: Runtime, passes: int = AUTO_MIN_PASSES, threads: int = 0) -> int:
    """``--workers auto``: on a CPU, one process per core (per ``threads`` cores when they are given)
    while each gets at least two units of work, the study has ``AUTO_MIN_PASSES`` training passes
    or more, and memory allows; one on a GPU (several GPUs: ask for N workers to place cells
    round-robin). The components study (8 stacks, 2-core EPYC) took 147 s on 2 workers, 185 s on 1."""
    if torch.device(runtime.device).type != "cpu" or passes < AUTO_MIN_PASSES:
        return 1
    memory = hardware.available_memory_mib() // WORKER_MIB
    return max(1, min(hardware.usable_cores() // max(threads, 1), units // 2, memory))


def ensure_teachers(cells: list[CellConfig], opts: RunOptions) -> RunOptions:
    """Train every teacher the cells need once, before they fan out to workers. A teacher that
    diverges or fails is recorded in the returned options: the cells that read it FAIL with the
    reason, the others run without it. A teacher below a cell's gate is announced here."""
    with every_core():
        failures = train_teachers(cells, opts)
    return dataclasses.replace(opts, teacher_failures=tuple(failures.items()))


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Torch threads on every core this process may use, then back. The teachers train before
    any cell runs, so the cores are idle: measured x1.7 for the default teacher on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(hardware.usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teachers(cells: list[CellConfig], opts: RunOptions) -> dict[str, str]:
    """``ensure_teachers``' loop: each teacher once, its rejection announced; teacher key -> why it failed."""
    failures: dict[str, str] = {}
    seen: set[str] = set()
    for cell in cells:
        key = cell.teacher_key() if cell.teacher is not None else None
        if key is None or key in seen:
            continue
        seen.add(key)
        data = load_dataset(cell.data.name, cell.data.params, opts.cache_dir)
        try:
            why = get_teacher(cell, data, opts.cache_dir, opts.runtime()).rejection(cell, data.num_classes)
        except Exception as e:  # noqa: BLE001 - a failed teacher fails its cells, not the study
            verb = "train" if all(m.source == "trained" for m in cell.teachers()) else "load"
            why = failures[key] = f"the teacher failed to {verb} ({type(e).__name__}: {str(e)[:300]})"
        if why:
            print(f"warning: {why}; the cells that read it will be FAILED", flush=True)
    return failures


def check_precision(client: tracking.MlflowClient, exp_id: str, study: Study, runtime: Runtime) -> None:
    """Refuse (ConfigError) to add cells to a study whose finished cells ran on another device type
    or precision: one table must not silently mix fp32 and bf16, or CPU and GPU numbers."""
    mine = (runtime.device.split(":")[0], runtime.amp)
    hashes = {c.config_hash() for c in study.cells}
    found: dict[tuple[str, str], int] = {}
    for run in tracking.search_cells(client, exp_id, "FINISHED"):
        tags = run.data.tags
        if tags.get("config_hash") in hashes and tracking.tag(tags, "env.device"):
            other = (tracking.tag(tags, "env.device").split(":")[0].split(" ")[0], tracking.tag(tags, "env.amp", "none"))
            found[other] = found.get(other, 0) + 1
    clash = {k: n for k, n in found.items() if k != mine}
    if clash:
        (device, amp), n = next(iter(clash.items()))
        raise ConfigError(f"study {study.name}: {n} finished cell(s) ran on {device} with --amp {amp}, this run "
                          f"would use {mine[0]} with --amp {mine[1]}; rerun with --device {device} --amp {amp}, "
                          "or use a new store (MLFLOW_TRACKING_URI) to keep the precisions apart")


def check_code(client: tracking.MlflowClient, exp_id: str, study: Study) -> None:
    """Refuse (ConfigError) to add cells to a study whose finished cells another code version made
    (kdablate's source or a plugin's differs, or was not recorded): one table must not silently
    mix two versions of the code. ``--allow-mixed-code`` adds them anyway; the report then warns."""
    mine = tracking.code_state(study.plugins)
    hashes = {c.config_hash() for c in study.cells}
    found: dict[tuple[str, ...], tuple[int, str]] = {}
    for run in tracking.search_cells(client, exp_id, "FINISHED"):
        tags = run.data.tags
        if tags.get("config_hash") in hashes:
            other = tuple(tracking.tag(tags, tracking.ENV + t, "unknown") for t in tracking.CODE_TAGS)
            n, _ = found.get(other, (0, ""))
            found[other] = (n + 1, tracking.tag(tags, "env.git_commit", "unknown")[:12])
    clash = {k: v for k, v in found.items() if k != tuple(mine[t] for t in tracking.CODE_TAGS)}
    if clash:
        (code, plugins), (n, commit) = next(iter(clash.items()))
        raise ConfigError(f"study {study.name}: {n} finished cell(s) were made by other code (source {code}, plugins "
                          f"{plugins}, commit {commit}); this code is source {mine['code_sha256']}, plugins "
                          f"{mine['plugins_sha256']}: rerun them, use a new store (MLFLOW_TRACKING_URI), or add "
                          "cells anyway with --allow-mixed-code (the report warns)")


MIN_FREE_MIB = 200  # below this a cache or store folder is refused before any cell trains


def check_places(opts: RunOptions) -> None:
    """The cache's folders and the store's folder can hold a study's files (``check_folder``)."""
    for sub in ("", "teachers", "checkpoints"):
        check_folder(Path(opts.cache_dir) / sub, "the cache (--cache-dir, KDABLATE_CACHE)")
    db = tracking.sqlite_path(opts.uri)
    if db is not None:
        check_folder(db.parent, "the MLflow store's folder (MLFLOW_TRACKING_URI)")


def check_folder(path: Path, what: str) -> None:
    """ConfigError (the CLI's exit 2) when ``path`` cannot hold a study's files: not a folder,
    not writable, or nearly full, so no cell starts only to fail on its first write."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; point {what} elsewhere")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {e.strerror or e}; make it writable or point it elsewhere") from None
    free = shutil.disk_usage(path).free / 2**20
    if free < MIN_FREE_MIB:
        raise ConfigError(f"{what} {path} has only {free:.0f} MiB free (need {MIN_FREE_MIB}); free space or point it elsewhere")


def run_study(study: Study, opts: RunOptions = RunOptions()) -> int:
    """Run every pending cell; returns the number of cells that FAILED."""
    auto = not opts.workers  # --workers auto: workers and threads are resolved once the work is known
    opts = dataclasses.replace(resolve_paths(opts), plugins=study.plugins,
                               plugin_dir=str(study.path.parent.resolve()), roles=roles(study))
    warning = hardware.amp_warning(opts.runtime().device, opts.amp)
    if warning:
        print(warning, flush=True)
    check_places(opts)
    client = tracking.client(opts.uri)
    exp_id = tracking.experiment_id(client, study.name, study.config.description)
    check_precision(client, exp_id, study, opts.runtime())
    if not opts.allow_mixed_code:
        check_code(client, exp_id, study)
    reaped = tracking.reap_stale(client, exp_id)
    done = tracking.finished_hashes(client, exp_id)
    pending = [c for c in study.cells if c.config_hash() not in done]
    print(f"study {study.name}: {len(study.cells)} cells, {len(study.cells) - len(pending)} already finished, "
          f"{len(pending)} to run" + (f"; {len(reaped)} interrupted run(s) marked KILLED" if reaped else ""), flush=True)
    units = work_units(pending, opts)
    weigh = auto and opts.executor == "local" and opts.runtime().device == "cpu"
    opts = resolve(opts, len(units), training_passes(pending) if weigh else AUTO_MIN_PASSES)
    _init_worker(opts.threads)
    parent, tags = start_parent(client, exp_id, study, opts)
    failed = 0
    try:
        opts = ensure_teachers(pending, opts)
        execute = {"local": _run_processes if opts.workers > 1 else _run_sequential, "ray": _run_ray}[opts.executor]
        for note in stack_notes(pending, opts) + unit_notes(len(pending), len(units), opts, auto):
            print(note, flush=True)
        failed = report_progress(execute(units, (exp_id, parent, tags), opts), len(pending), study.name, opts)
    except KeyboardInterrupt:
        tracking.terminate(client, parent, "KILLED", "interrupted")
        raise
    tracking.log_metrics(client, parent, {"study/cells": len(study.cells), "study/failed": failed}, 0)
    tracking.terminate(client, parent, "FAILED" if failed else "FINISHED")
    print(f"runs: {tracking.runs_link(exp_id)} (after 'kdablate ui {study.name}')", flush=True)
    return failed


def unit_notes(cells: int, units: int, opts: RunOptions, auto: bool) -> list[str]:
    """What the run will do with its units: stacks, and the workers ``--workers auto`` chose."""
    notes = []
    if units < cells:
        notes.append(f"training {cells} cells as {units} units: the seeds of an arm stacked "
                     "(--stack off trains them one by one)")
    if auto and opts.executor == "local" and units:
        notes.append(f"--workers auto: {opts.workers} worker(s) x {opts.threads} thread(s) for {units} unit(s)")
    return notes


def roles(study: Study) -> tuple[tuple[str, str], ...]:
    """arm -> 'baseline' or 'reference', from the study's analysis section."""
    a = study.config.analysis
    out = {arm: "reference" for arm in a.reference}
    if a.baseline:
        out[a.baseline] = "baseline"
    return tuple(out.items())


def start_parent(client: tracking.MlflowClient, exp_id: str, study: Study, opts: RunOptions) -> tuple[str, dict[str, str]]:
    """The invocation's parent run, with the study file, its command-line overrides and subset
    recorded; returns (its id, the tags every cell run shares)."""
    tags = {"kdablate.study": study.name,
            **tracking.env_tags({**tracking.code_state(study.plugins), **provenance(opts.threads, opts.runtime())})}
    extra = {"kind": "study", "kdablate.workers": str(opts.workers), "kdablate.stack": opts.stack,
             "kdablate.cells_selected": str(len(study.cells)), "kdablate.overrides": " ".join(study.overrides) or "none",
             "kdablate.plugins": ",".join(study.plugins) or "none"}
    parent = tracking.start_run(client, exp_id, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                {**tags, **tracking.owner_tags(), **extra})
    client.log_artifact(parent, str(study.path))
    if study.overrides:  # the study as run: the file plus its overrides, resolved
        client.log_dict(parent, study.config.model_dump(mode="json"), "study_resolved.json")
    return parent, tags


def report_progress(outcomes, total: int, name: str, opts: RunOptions) -> int:
    """Consume cell outcomes under one study bar (cells done / total, ETA); returns the failures."""
    from tqdm import tqdm

    failed = 0
    with tqdm(total=total, desc=name, unit="cell", disable=None if opts.progress else True) as bar:
        for i, out in enumerate(outcomes, 1):
            failed += out.status == "FAILED"
            tag = "" if out.status == "FINISHED" else out.status + " "
            tqdm.write(f"[{i}/{total}] {tag}{out.arm} seed {out.seed}: {out.message}")
            bar.update(1)
    return failed
