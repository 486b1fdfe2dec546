"""``mfdsl run``: every sweep point of every backend, in worker processes, into one store.

The sweep survives failure: a run that raises is recorded as failed (its error in the
store's ``message`` and in ``<store>.log``) and the others go on; a diverged run is a
result, not a failure; Ctrl-C stops cleanly, leaving every finished run in the store
for ``--resume``.  A finished run is never written again.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import errno
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from . import _ir as ir
from . import _location as loc
from ._api import to_yaml
from ._compile import compile_point
from ._errors import SpecError, count
from ._expand import Point, check_all
from ._plan import RunPlan
from ._plugins import Backend, BackendUnavailable, available_backends, get_backend

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: times a unit of work runs again after its worker process died (the local pool)
WORKER_RETRIES = 2

_LONG_NAMES = {
    "train_loss": "training loss (mean over the steps since the last record)",
    "test_loss": "test loss",
    "test_accuracy": "test accuracy",
    "output": "network output on the probe inputs",
    "neuron_spread": "std across neurons of the pre-activation H_l on the probes",
    "weight_change": "relative Frobenius change of W_l since initialisation",
    "particles": "sampled neurons: incoming weights (2 directions, norm) and outgoing weight",
}
PARTICLE_COMPONENTS = ("w_in_1", "w_in_2", "w_in_norm", "w_out")


@dataclass(frozen=True, kw_only=True)
class Task:
    """One run: a backend at one sweep point, and where it lands in the store."""

    key: str
    backend: str
    plan: RunPlan
    index: Mapping[str, int]  # position along each store sweep dimension
    layer_positions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The store's shape: sweep coordinates, steps, time, variables, extra coords."""

    sweep: dict[str, list[Any]]
    steps: np.ndarray
    time: tuple[tuple[str, ...], np.ndarray]
    variables: list[Any]
    extra: dict[str, np.ndarray]


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_store(spec: ir.Spec) -> str:
    return os.path.join("runs", f"{spec.experiment}.zarr")


# ---- planning ------------------------------------------------------------------------


def plan_tasks(
    spec: ir.Spec, points: Sequence[Point], backends: Sequence[Backend]
) -> tuple[Layout, list[Task]]:
    """Every task of the sweep, and the store layout that holds them all."""
    widths = [float(w) for w in spec.sweep["width"]]
    if any(b.limit for b in backends):
        widths.append(math.inf)
    sweep: dict[str, list[Any]] = {"width": widths}
    for var in spec.sweep.variables:
        if var.name != "width":
            sweep[var.name] = [_coord(v) for v in var.values]

    tasks: list[Task] = []
    for backend in backends:
        for point in points:
            if backend.limit and point.index[0] != 0:
                continue  # one limit per (seed, other variables), not one per width
            coords = dict(point.coords)
            index = dict(zip(sweep_dims(spec), point.index, strict=True))
            if backend.limit:
                coords["width"] = math.inf
                index["width"] = len(widths) - 1
            plan = compile_point(point.spec, coords, backend.name)
            if backend.limit:
                plan = _as_limit(plan)
            key = f"{backend.name}:" + ",".join(f"{k}={v}" for k, v in coords.items())
            tasks.append(Task(key=key, backend=backend.name, plan=plan, index=index))

    steps = np.unique(np.concatenate([t.plan.record_steps for t in tasks]))
    lrs = {t.plan.optimizer.lr for t in tasks}
    if len(lrs) == 1:
        time_coord: tuple[tuple[str, ...], np.ndarray] = (("step",), lrs.pop() * steps.astype(np.float64))
    else:
        # time spans the sweep dimensions the learning rate varies over (docs/store.md)
        lr = np.full([len(v) for v in sweep.values()], np.nan)
        for t in tasks:
            lr[tuple(t.index[d] for d in sweep)] = t.plan.optimizer.lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: cells no task fills
            varies = [
                not np.array_equal(np.nanmin(lr, axis=axis), np.nanmax(lr, axis=axis), equal_nan=True)
                for axis in range(lr.ndim)
            ]
            drop = tuple(axis for axis in range(lr.ndim) if not varies[axis])
            lr = np.nanmax(lr, axis=drop) if drop else lr
        lr_dims = tuple(d for d, v in zip(sweep, varies, strict=True) if v)
        time_coord = ((*lr_dims, "step"), lr[..., None] * steps.astype(np.float64))

    from ._store import VariableSpec

    names: dict[str, ir.Observable | None] = {}
    layers: set[int] = set()
    probes, sample, outputs = 0, 0, 1
    for t in tasks:
        outputs = max(outputs, t.plan.layers[-1].fan_out)
        for obs in t.plan.observables:
            names.setdefault(obs.name, None)
            if obs.name in ("neuron_spread", "weight_change"):
                layers.update(obs.layers)
            probes = max(probes, obs.probes if obs.name == "output" else 0)
            sample = max(sample, obs.sample)
    extra: dict[str, np.ndarray] = {}
    variables = []
    for name in names:
        dims: tuple[str, ...] = ()
        if name == "output":
            dims = ("probe", "unit") if outputs > 1 else ("probe",)
            extra["probe"] = np.arange(probes, dtype=np.int64)
            if outputs > 1:
                extra["unit"] = np.arange(outputs, dtype=np.int64)
        elif name in ("neuron_spread", "weight_change"):
            dims = ("layer",)
        elif name == "particles":
            dims = ("particle", "component")
            extra["particle"] = np.arange(sample, dtype=np.int64)
            extra["component"] = np.array(PARTICLE_COMPONENTS, dtype=object)
        variables.append(VariableSpec(name=name, dims=dims, long_name=_LONG_NAMES[name], units="1"))
    if layers:
        extra["layer"] = np.array(sorted(layers), dtype=np.int64)
    return Layout(sweep=sweep, steps=steps, time=time_coord, variables=variables, extra=extra), tasks


def sweep_dims(spec: ir.Spec) -> list[str]:
    return [v.name for v in spec.sweep.variables]


def _coord(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _as_limit(plan: RunPlan) -> RunPlan:
    import dataclasses

    return dataclasses.replace(plan, width=math.inf)


def group_tasks(tasks: Sequence[Task], workers: int) -> list[list[Task]]:
    """The units of work: each backend's tasks as its :meth:`Backend.group` cuts them
    (seeds of a width as one ensemble, say), largest first, so that the widest
    networks start first and no worker idles at the end (greedy longest-first)."""
    by_backend: dict[str, list[Task]] = {}
    for task in tasks:
        by_backend.setdefault(task.backend, []).append(task)
    groups: list[list[Task]] = []
    for name, mine in by_backend.items():
        cut = get_backend(name).group([t.plan for t in mine], workers)
        if sorted(i for unit in cut for i in unit) != list(range(len(mine))) or not all(cut):
            raise RuntimeError(f"backend '{name}': group() must use every run exactly once")
        groups.extend([mine[i] for i in unit] for unit in cut)
    groups.sort(key=lambda unit: -sum(_cost(t.plan) for t in unit))
    return groups


# ---- one run, in a worker ------------------------------------------------------------

_progress_queue: Any = None


def _init_worker(progress_queue: Any, threads: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # Ctrl-C belongs to the driver, which stops the workers itself; a worker that took
    # it would record its run as failed, or go on to the next task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Oversubscribed BLAS threads slow every worker down; pin each to its share.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # A driver killed outright (SIGKILL) cannot stop its workers, and a worker's queues
    # never report it gone: each worker watches for itself and leaves with its driver
    # (a cell it was writing stays pending: its status is written last).
    driver = os.getppid()
    threading.Thread(target=_orphan_watch, args=(driver,), daemon=True, name="mfdsl-orphan-watch").start()


def _orphan_watch(driver: int) -> None:
    while os.getppid() == driver:
        time.sleep(0.5)
    os._exit(1)


def execute(
    task: Task, store: str, layer_coord: Sequence[int], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[str, str, str]:
    """Run one task and write its cell: :func:`execute_group` of one task."""
    return execute_group([task], store, layer_coord, shapes)[0]


def execute_group(
    tasks: Sequence[Task],
    store: str,
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[tuple[str, str, str]]:
    """Run one unit of work (tasks of one backend, grouped by :meth:`Backend.group`)
    and write each task's cell as soon as the unit has finished.  Returns ``(key,
    status, message)`` per task.  An exception inside the backend becomes failed cells,
    not a crash: a unit of several tasks that raises is run again task by task, so that
    only the tasks that fail are failed; an error in writing one task's records fails
    that task alone.  ``shapes`` gives each variable's store dimensions after ``step``."""

    def progress(i: int, step: int, loss: float) -> None:
        if _progress_queue is not None:
            _progress_queue.put((tasks[i].key, step, loss))

    try:
        backend = get_backend(tasks[0].backend)
        results = backend.run_group([t.plan for t in tasks], progress=progress)
        if len(results) != len(tasks):
            raise RuntimeError(f"backend '{backend.name}' gave {len(results)} results for {len(tasks)} runs")
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        if len(tasks) > 1:
            return [
                outcome for task in tasks for outcome in execute_group([task], store, layer_coord, shapes)
            ]
        return [_record_failure(store, tasks[0], error)]
    return [
        _record_result(store, task, result, layer_coord, shapes or {})
        for task, result in zip(tasks, results, strict=True)
    ]


def _record_result(
    store: str,
    task: Task,
    result: Mapping[str, Any],
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[str, str, str]:
    from ._store import Status, write_run

    try:
        records = _place(task.plan, dict(result["records"]), layer_coord, shapes)
        status = Status.DIVERGED if result.get("status") == "diverged" else Status.DONE
        message = str(result.get("message", ""))
        write_run(
            store,
            index=task.index,
            records=records,
            steps=task.plan.record_steps,
            status=status,
            message=message,
        )
        _save_run_attrs(store, task, result.get("attrs"))
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        return _record_failure(store, task, error)
    return task.key, status.name.lower(), message


def _write_failed(store: str, task: Task, message: str) -> None:
    """The task's cell marked failed, with ``message``."""
    from ._store import Status, write_run

    write_run(
        store,
        index=task.index,
        records={},
        steps=task.plan.record_steps,
        status=Status.FAILED,
        message=message,
    )


def _record_failure(store: str, task: Task, error: BaseException) -> tuple[str, str, str]:
    """The task's cell marked failed, with ``error``'s whole traceback as its message."""
    _write_failed(store, task, "".join(traceback.format_exception(error)))
    return task.key, "failed", f"{type(error).__name__}: {error}"


def _attrs_folder(store: str) -> str:
    return f"{store}.attrs"


def _save_run_attrs(store: str, task: Task, attrs: Mapping[str, Any] | None) -> None:
    """Keep a run's ``attrs`` (facts a backend reports about the run, e.g. the limit's
    reductions) in a file of its own beside the store: the store's root attributes are
    one file that concurrent writers must not share.  :func:`_merge_run_attrs` moves
    them into the store when the sweep ends."""
    if not attrs:
        return
    import json

    folder = _attrs_folder(store)
    loc.make_dirs(folder)
    path = loc.join(folder, "-".join(str(task.index[d]) for d in task.index) + ".json")
    loc.write_text(path, json.dumps({"key": task.key, "attrs": dict(attrs)}))


def _merge_run_attrs(store: str) -> None:
    """Root attribute ``NAME`` = ``{run key: value}`` for every ``NAME`` a run reported
    (merged into what the store holds, so a resumed sweep keeps earlier runs')."""
    import json

    import zarr

    folder = _attrs_folder(store)
    entries = [
        json.loads(loc.read_text(loc.join(folder, name)))
        for name in loc.list_names(folder)
        if name.endswith(".json")
    ]
    if entries:
        group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
        merged: dict[str, dict[str, Any]] = {}
        for entry in entries:
            for name, value in entry["attrs"].items():
                if name not in merged:
                    before = group.attrs.get(name)
                    merged[name] = dict(before) if isinstance(before, Mapping) else {}
                merged[name][entry["key"]] = value
        group.attrs.update(merged)
    with contextlib.suppress(OSError):
        loc.remove(folder)


def _place(
    plan: RunPlan,
    records: dict[str, np.ndarray],
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Records reshaped onto the store's shared extra dimensions: ``layer`` by
    coordinate; ``probe``, ``particle`` (which may be longer in the store when the
    sweep varies ``probes`` or ``sample``) padded with NaN."""
    out = dict(records)
    for obs in plan.observables:
        if obs.name not in out:
            continue
        rec = np.asarray(out[obs.name], dtype=np.float64)
        if obs.name in ("neuron_spread", "weight_change"):
            placed = np.full((rec.shape[0], len(layer_coord)), np.nan)
            for j, layer in enumerate(obs.layers):
                placed[:, list(layer_coord).index(layer)] = rec[:, j]
            out[obs.name] = placed
        elif obs.name in shapes and rec.ndim == 1 + len(shapes[obs.name]):
            shape = shapes[obs.name]
            if rec.shape[1:] != shape and all(a <= b for a, b in zip(rec.shape[1:], shape, strict=True)):
                placed = np.full((rec.shape[0], *shape), np.nan)
                placed[(slice(None), *(slice(0, n) for n in rec.shape[1:]))] = rec
                out[obs.name] = placed
    return out


# ---- the command -----------------------------------------------------------------------


def run_command(args: argparse.Namespace, spec: ir.Spec) -> int:
    """``mfdsl run``: returns the exit code.  Holds the store's lock (``<store>.lock``)
    from before the store is touched until the sweep ends."""
    from rich.console import Console

    from ._cluster import ClusterError
    from ._lock import StoreLocked, acquire

    err = Console(stderr=True, highlight=False)
    try:
        args.output = loc.normalize(args.output or default_store(spec))
    except ValueError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}")
        return EXIT_USAGE
    store = args.output
    scheduler = getattr(args, "scheduler", None)
    if scheduler:
        try:
            _check_scheduler(args, err)
        except ClusterError as error:
            err.print(f"[red]error:[/red] {escape(str(error))}")
            return EXIT_USAGE
    try:
        lock = acquire(store, lambda text: err.print(f"[yellow]warning:[/yellow] {escape(text)}"))
    except StoreLocked as error:
        err.print(f"[red]error:[/red] {escape(str(error))}")
        return EXIT_USAGE
    except OSError as error:
        err.print(f"[red]error:[/red] {escape(_storage_problem(loc.parent(store), error))}")
        return EXIT_USAGE
    try:
        return _run_locked(args, spec)
    except ClusterError as error:
        err.print(
            f"[red]error:[/red] {escape(str(error))}\n"
            f"The store is kept: finish it with mfdsl run {spec.path} -o {store} --resume"
        )
        return EXIT_USAGE
    except OSError as error:
        if error.errno not in _STORAGE_ERRORS:
            raise
        err.print(
            f"[red]error:[/red] {escape(_storage_problem(store, error))}. Finished runs are kept; "
            f"once that is fixed, finish with mfdsl run {spec.path} -o {store} --resume"
        )
        return EXIT_FAILED
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, spec: ir.Spec) -> int:
    """``mfdsl run`` once the store is locked."""
    from rich.console import Console

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    points = check_all(spec)
    backends = _backends(spec, args.backend, err)
    if backends is None:
        return EXIT_USAGE
    if not backends:
        err.print("[red]error:[/red] no backend can run (see the warnings above)")
        return EXIT_USAGE
    store = args.output or default_store(spec)
    layout, tasks = plan_tasks(spec, points, backends)
    spec_yaml = to_yaml(spec)

    prepared = _prepare_store(store, spec, spec_yaml, layout, args, err, backends, tasks)
    if prepared is None:
        return EXIT_USAGE
    if not args.resume:
        with contextlib.suppress(OSError):
            loc.remove(_attrs_folder(store))  # left by a replaced store
    todo = [t for t in tasks if prepared[tuple(t.index[d] for d in layout.sweep)] not in (1, 3)]
    skipped = len(tasks) - len(todo)
    if skipped:
        console.print(f"resuming: {count(skipped, 'run')} already finished, {len(todo)} to go")
    workers = max(1, min(args.workers or default_workers(), len(todo) or 1))
    groups = group_tasks(todo, workers)
    workers = max(1, min(workers, len(groups)))
    layer_coord = [int(x) for x in layout.extra.get("layer", [])]
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    if getattr(args, "scheduler", None):
        outcomes, interrupted = _execute_on_cluster(
            groups, store, layer_coord, shapes, workers, args, console, err
        )
    else:
        outcomes, interrupted = _execute_all(groups, store, layer_coord, shapes, workers, console)
    from ._store import finalize

    _merge_run_attrs(store)
    finalize(store)
    _write_log(store, outcomes)
    _summary(console, store, spec)
    failed = [o for o in outcomes if o[1] == "failed"]
    diverged = [o for o in outcomes if o[1] == "diverged"]
    if diverged:
        console.print(f"[yellow]{count(len(diverged), 'run')} diverged[/yellow] (marked in 'status')")
    if failed:
        err.print(
            f"[red]{count(len(failed), 'run')} failed[/red]; errors in {store}.log and the store's 'message':"
        )
        for key, _, message in failed[:5]:
            err.print(f"  {escape(key)}: {escape(message)}")
    if interrupted:
        err.print(
            f"[yellow]interrupted[/yellow]: finished runs are kept; finish with mfdsl run {spec.path} --resume"
        )
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK


def escape(text: str) -> str:
    """Text shown verbatim by rich (``mfdsl[jax]`` is not markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _backends(spec: ir.Spec, requested: Sequence[str] | None, err: Any) -> list[Backend] | None:
    names = list(requested or spec.backends)
    out: list[Backend] = []
    for name in names:
        if name not in available_backends():
            err.print(
                f"[red]error:[/red] unknown backend '{name}' (installed: {', '.join(available_backends())})"
            )
            return None
        backend = get_backend(name)
        try:
            backend.require()
        except BackendUnavailable as error:
            if requested:
                err.print(f"[red]error:[/red] backend '{name}': {escape(str(error))}")
                return None
            err.print(f"[yellow]warning:[/yellow] skipping backend '{name}': {escape(str(error))}")
            continue
        try:
            backend.check(spec)
        except SpecError as error:
            raise error.located(spec.path, spec.source) from None
        out.append(backend)
    return out


def _prepare_store(
    store: str,
    spec: ir.Spec,
    spec_yaml: str,
    layout: Layout,
    args: argparse.Namespace,
    err: Any,
    backends: Sequence[Backend],
    tasks: Sequence[Task],
) -> np.ndarray | None:
    """Create (or reopen for ``--resume``) the store; return the status array.

    Before any training: a store that cannot be written (read-only) or that would not
    fit on its disk is refused with a message; on ``--resume``, finished cells whose
    data does not read back (a write cut off mid-chunk) are set pending again."""
    from ._store import create_store, read_status
    from ._verify import NotAStore, open_attrs

    exists = loc.exists(store)
    if exists and not (args.resume or args.overwrite):
        err.print(
            f"[red]error:[/red] {store} already exists. Use --resume to finish its pending runs, "
            "--overwrite to replace it, or -o to write elsewhere."
        )
        return None
    if exists and args.resume:
        try:
            stored = open_attrs(store).get("spec_ir", "")
        except NotAStore as error:
            err.print(f"[red]error:[/red] cannot resume: {escape(str(error))}")
            return None
        if stored != spec_yaml:
            err.print(
                f"[red]error:[/red] the spec differs from the one {store} was made with; "
                "--resume needs the same spec and overrides (or use --overwrite)"
            )
            _diff(str(stored), spec_yaml, err)
            return None
        try:
            _probe_writable(store)
        except OSError as error:
            err.print(f"[red]error:[/red] {escape(_storage_problem(store, error))}")
            return None
        status = _resume_status(store, tasks, layout, err)
        if not _check_space(store, layout, int(np.count_nonzero((status != 1) & (status != 3))), False, err):
            return None
        return status
    if not _check_space(store, layout, len(tasks), not exists or args.overwrite, err):
        return None
    if exists and args.overwrite:
        loc.remove(store)
        loc.remove(f"{store}.log")  # the replaced store's failures are history
    loc.make_parent(store)
    try:
        create_store(
            store,
            sweep=layout.sweep,
            steps=layout.steps,
            time=layout.time,
            variables=layout.variables,
            extra_coords=layout.extra,
            attrs={
                "experiment": spec.experiment,
                "spec_source": spec.source or "",
                "spec_path": spec.path or "",
                "spec_ir": spec_yaml,
                "backends": [b.name for b in backends],
                "versions": _versions(),
            },
        )
    except OSError as error:
        with contextlib.suppress(OSError):
            loc.remove(store)  # half a skeleton is no store
        err.print(f"[red]error:[/red] {escape(_storage_problem(store, error))}")
        return None
    return read_status(store)


# errors that mean "the store's storage cannot take it", not a bug
_STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _storage_problem(where: str, error: OSError) -> str:
    """A storage error in words."""
    what = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "it is on a read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(error.errno or 0, error.strerror or str(error))
    return f"cannot write to {where}: {what}"


def _probe_writable(store: str) -> None:
    """Write and remove a file inside the store: ``OSError`` if it cannot be written."""
    probe = loc.join(store, f".mfdsl-write-test-{os.getpid()}")
    loc.write_text(probe, "")
    loc.remove(probe)


def _check_space(store: str, layout: Layout, runs: int, skeleton: bool, err: Any) -> bool:
    """Whether the disk holding ``store`` has room for ``runs`` more runs (and the
    skeleton), by an upper bound: uncompressed values, every file at least a block."""
    free = loc.free_bytes(store)
    if free is None or runs == 0:
        return True
    block = 4096
    per_run = 2 * block  # status, message
    steps = len(layout.steps)
    for var in layout.variables:
        values = steps * int(np.prod([len(layout.extra[d]) for d in var.dims], dtype=np.int64))
        nbytes = 8 * values
        chunks = max(1, -(-nbytes // (8 * 2**20)))
        per_run += max(-(-nbytes // block) * block, chunks * block)
    need = runs * per_run
    if skeleton:
        arrays = len(layout.variables) + len(layout.sweep) + len(layout.extra) + 4
        need += 2 * block * arrays
    if need <= free:
        return True
    err.print(
        f"[red]error:[/red] not enough space for {escape(store)}: {count(runs, 'run')} need up to "
        f"{_size(need)} (uncompressed), and {_size(free)} are free on "
        f"{escape(loc.parent(os.path.abspath(store)))}. Free some space or write elsewhere (-o)."
    )
    return False


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover


def _resume_status(store: str, tasks: Sequence[Task], layout: Layout, err: Any) -> np.ndarray:
    """The status of every cell for ``--resume``: finished cells that fail the integrity
    check of :mod:`mfdsl._verify` (a chunk that does not decode, recorded values that
    are missing) are written pending again, so they run again."""
    from ._store import Status, write_run
    from ._verify import check_cells

    check = check_cells(store, tasks)
    status = check.status.astype(np.int8)
    dims = list(layout.sweep)
    redo: list[str] = []
    for task in tasks:
        cell = tuple(task.index[d] for d in dims)
        problems = check.problems.get(cell)
        if not problems or int(status[cell]) not in (Status.DONE, Status.DIVERGED, -1):
            continue  # pending and failed cells run anyway, whatever their chunks hold
        write_run(store, index=task.index, records={}, steps=task.plan.record_steps, status=Status.PENDING)
        status[cell] = Status.PENDING
        redo.append(f"{check.labels[cell]}: {problems[0]}")
    if redo:
        err.print(
            f"[yellow]warning:[/yellow] {count(len(redo), 'finished run')} do not read back intact and run again:"
        )
        for line in redo[:5]:
            err.print(f"  {escape(line)}")
    return status


def _diff(old: str, new: str, err: Any) -> None:
    import difflib

    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "stored", "now", lineterm="", n=0))
    for line in lines[2:12]:
        err.print(f"  {line}", markup=False)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"mfdsl": __version__}
    for package in ("torch", "jax", "lark"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def _cost(plan: RunPlan) -> float:
    if not math.isfinite(plan.width):
        return math.inf  # a limit run is usually the longest: start it first
    params = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
    return float(plan.steps) * float(plan.batch) * params


def _execute_all(
    groups: list[list[Task]],
    store: str,
    layer_coord: list[int],
    shapes: Mapping[str, tuple[int, ...]],
    workers: int,
    console: Any,
) -> tuple[list[tuple[str, str, str]], bool]:
    from rich.progress import Progress

    outcomes: list[tuple[str, str, str]] = []
    if not groups:
        return outcomes, False
    steps = {t.key: t.plan.steps for unit in groups for t in unit}
    columns = sweep_columns()
    # spawn, not fork: the driver runs threads (progress), and forking those is unsafe.
    ctx = mp.get_context("spawn")
    # A worker killed while it writes to the progress queue leaves the queue's lock taken
    # for good, so every pool gets a fresh queue; ``channel[0]`` is the live one.
    channel = [ctx.Queue()]
    total_threads = default_workers()
    threads = max(1, total_threads // workers)
    interrupted = False
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("sweep", total=len(steps), info="")
        bars: dict[str, Any] = {}
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                live = channel[0]
                try:
                    key, step, loss = live.get(timeout=0.1)
                except queue.Empty:
                    continue
                except (EOFError, OSError, ValueError):
                    if live is channel[0]:
                        return
                    continue  # the queue was replaced: read the new one
                bar = bars.get(key)
                if bar is None:
                    bar = bars[key] = progress.add_task(f"  {key}", total=steps[key], info="")
                progress.update(bar, completed=step, info=f"loss {loss:.4g}")

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        futures: dict[cf.Future[list[tuple[str, str, str]]], list[Task]] = {}
        # A worker process that dies (killed, out of memory) breaks the whole pool: every
        # unit it had not finished runs again in a fresh pool, up to WORKER_RETRIES times.
        attempts = [0] * len(groups)
        left = list(range(len(groups)))
        pool: cf.ProcessPoolExecutor | None = None
        try:
            while left:
                if pool is not None:  # a worker died: replace the queue it may have locked
                    old, channel[0] = channel[0], ctx.Queue()
                    old.cancel_join_thread()
                    old.close()
                pool = cf.ProcessPoolExecutor(
                    max_workers=min(workers, len(left)),
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(channel[0], threads),
                )
                # submitted largest first: the pool hands them out in this order
                futures = {
                    pool.submit(execute_group, groups[i], store, layer_coord, shapes): groups[i] for i in left
                }
                index = {id(groups[i]): i for i in left}
                left = []
                for future in cf.as_completed(futures):
                    unit = futures[future]
                    try:
                        finished = future.result()
                    except BrokenProcessPool as error:
                        i = index[id(unit)]
                        attempts[i] += 1
                        if attempts[i] <= WORKER_RETRIES:
                            left.append(i)
                            continue
                        finished = [(t.key, "failed", f"its worker process died: {error}") for t in unit]
                        for task, outcome in zip(unit, finished, strict=True):
                            _mark_failed(store, task, outcome[2])
                    except Exception as error:  # recorded, and the sweep goes on
                        if isinstance(error, OSError) and error.errno in _STORAGE_ERRORS:
                            raise  # the store cannot be written: stop, say so
                        finished = [(t.key, "failed", f"worker error: {error!r}") for t in unit]
                        for task, outcome in zip(unit, finished, strict=True):
                            _mark_failed(store, task, outcome[2])
                    for task, outcome in zip(unit, finished, strict=True):
                        outcomes.append(outcome)
                        progress.advance(overall)
                        bar = bars.pop(task.key, None)
                        if bar is not None:
                            progress.remove_task(bar)
                    progress.update(overall, info=_counts(outcomes))
                pool.shutdown(wait=True)
                if left:
                    left.sort()  # largest first again
                    console.print(
                        f"[yellow]a worker process died[/yellow]: running its pool's "
                        f"{count(len(left), 'unfinished unit')} again"
                    )
                    for unit in (groups[i] for i in left):
                        for task in unit:
                            bar = bars.pop(task.key, None)
                            if bar is not None:
                                progress.remove_task(bar)
        except KeyboardInterrupt:
            interrupted = True
            for future in futures:
                future.cancel()
            if pool is not None:
                _terminate(pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            stop.set()
            pumper.join(timeout=1)
            channel[0].close()
    return outcomes, interrupted


def _check_scheduler(args: argparse.Namespace, err: Any) -> None:
    """Validate ``--scheduler`` before the store is touched (:class:`ClusterError`)."""
    from ._cluster import ClusterError, connect, require

    require()
    if args.scheduler == "local":
        return
    if args.workers:
        raise ClusterError(
            f"--workers sets the size of a local pool or cluster (--scheduler local); the cluster at "
            f"{args.scheduler} has the workers it was started with"
        )
    if "://" not in args.scheduler:
        raise ClusterError(
            f"--scheduler takes a scheduler's address, e.g. tcp://HOST:8786, or 'local' (got {args.scheduler!r})"
        )
    with connect(args.scheduler, None, False) as client:
        # group the sweep for the cluster's size, as the local pool does for its workers
        info = client.scheduler_info().get("workers", {})
        args.workers = sum(int(w.get("nthreads", 1)) for w in info.values()) or None


def _execute_on_cluster(
    groups: list[list[Task]],
    store: str,
    layer_coord: list[int],
    shapes: Mapping[str, tuple[int, ...]],
    workers: int,
    args: argparse.Namespace,
    console: Any,
    err: Any,
) -> tuple[list[tuple[str, str, str]], bool]:
    """The units of work as tasks of a Dask cluster (:mod:`mfdsl._cluster`)."""
    from ._cluster import execute_on_cluster, needs_gpu

    def lost(unit: Sequence[Task], message: str) -> list[tuple[str, str, str]]:
        for task in unit:
            _mark_failed(store, task, message)
        return [(task.key, "failed", message) for task in unit]

    # workers elsewhere resolve a relative path against their own folder
    where = store if loc.is_url(store) else os.path.abspath(store)
    return execute_on_cluster(
        groups,
        execute_group,
        (where, layer_coord, shapes),
        scheduler=args.scheduler,
        workers=workers,
        gpu=any(needs_gpu(dict(t.plan.options)) for unit in groups for t in unit),
        lost=lost,
        console=console,
        warn=lambda text: err.print(f"[yellow]warning:[/yellow] {escape(text)}"),
    )


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now; their unfinished cells stay pending for ``--resume``."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()


def sweep_columns() -> tuple[Any, ...]:
    """The progress display's columns (the local pool's and a Dask cluster's): name,
    bar, done/total, the outcome counts, time."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )


def _mark_failed(store: str, task: Task, message: str) -> None:
    """Record a run its worker could not (the worker died).  If even that cannot be
    written, the cell stays pending, which ``--resume`` runs again all the same."""
    with contextlib.suppress(OSError):
        _write_failed(store, task, message)


def _counts(outcomes: Iterable[tuple[str, str, str]]) -> str:
    tally: dict[str, int] = {}
    for _, status, _ in outcomes:
        tally[status] = tally.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(tally.items()))


def _write_log(store: str, outcomes: Sequence[tuple[str, str, str]]) -> None:
    bad = [o for o in outcomes if o[1] != "done"]
    if not bad:
        return
    lines = [f"# mfdsl run, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    lines += [f"{key}: {status}: {message}\n" for key, status, message in bad]
    loc.append_text(f"{store}.log", "".join(lines))


def _summary(console: Any, store: str, spec: ir.Spec) -> None:
    """Final losses per width, mean ± std over seeds, and how to open the store."""
    import xarray as xr
    from rich.table import Table

    with xr.open_zarr(store, consolidated=True) as ds:
        metrics = [m for m in ("train_loss", "test_loss", "test_accuracy") if m in ds]
        if metrics:
            table = Table(title="final values (mean ± std over seeds)", title_justify="left")
            table.add_column("width", justify="right")
            others = [d for d in ds["status"].dims if d not in ("width", "seed")]
            for m in metrics:
                table.add_column(m, justify="right")
            table.add_column("runs", justify="right")
            final = ds[metrics].isel(step=-1).load()
            status = ds["status"].load()
            for width in ds["width"].values:
                row = [("∞" if np.isinf(width) else f"{width:g}")]
                sel = final.sel(width=width)
                for m in metrics:
                    values = sel[m].values
                    finite = values[np.isfinite(values)]
                    row.append(f"{finite.mean():.4g} ± {finite.std():.2g}" if finite.size else "—")
                done = int((status.sel(width=width) == 1).sum())
                row.append(f"{done}/{status.sel(width=width).size}")
                table.add_row(*row)
            console.print(table)
            if others:
                console.print(f"(averaged over {', '.join(others)} as well)")
    console.print(f"results: [bold]{store}[/bold] — open with  xarray.open_zarr({store!r})")
