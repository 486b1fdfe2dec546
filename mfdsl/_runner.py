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
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from . import _ir as ir
from ._api import to_yaml
from ._compile import compile_point
from ._errors import SpecError
from ._expand import Point, check_all
from ._plan import RunPlan
from ._plugins import Backend, BackendUnavailable, available_backends, get_backend

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

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


def execute(
    task: Task, store: str, layer_coord: Sequence[int], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[str, str, str]:
    """Run one task and write its cell.  Returns ``(key, status, message)``; an
    exception inside the backend (or in writing its records) becomes a failed cell,
    not a crash.  ``shapes`` gives each variable's store dimensions after ``step``."""
    from ._store import Status, write_run

    def progress(step: int, loss: float) -> None:
        if _progress_queue is not None:
            _progress_queue.put((task.key, step, loss))

    steps = task.plan.record_steps
    try:
        backend = get_backend(task.backend)
        result = backend.run(task.plan, progress=progress)
        records = _place(task.plan, dict(result["records"]), layer_coord, shapes or {})
        status = Status.DIVERGED if result.get("status") == "diverged" else Status.DONE
        message = str(result.get("message", ""))
        write_run(store, index=task.index, records=records, steps=steps, status=status, message=message)
        _save_run_attrs(store, task, result.get("attrs"))
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        lines = traceback.format_exception(error)
        write_run(
            store, index=task.index, records={}, steps=steps, status=Status.FAILED, message="".join(lines)
        )
        return task.key, "failed", f"{type(error).__name__}: {error}"
    return task.key, status.name.lower(), message


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
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "-".join(str(task.index[d]) for d in task.index) + ".json")
    with open(f"{path}.tmp", "w", encoding="utf-8") as file:
        json.dump({"key": task.key, "attrs": dict(attrs)}, file)
    os.replace(f"{path}.tmp", path)


def _merge_run_attrs(store: str) -> None:
    """Root attribute ``NAME`` = ``{run key: value}`` for every ``NAME`` a run reported
    (merged into what the store holds, so a resumed sweep keeps earlier runs')."""
    import json

    import zarr

    folder = _attrs_folder(store)
    if not os.path.isdir(folder):
        return
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as file:
                entries.append(json.load(file))
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
    shutil.rmtree(folder, ignore_errors=True)


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
    """``mfdsl run``: returns the exit code."""
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

    prepared = _prepare_store(store, spec, spec_yaml, layout, args, err, backends)
    if prepared is None:
        return EXIT_USAGE
    if not args.resume:
        shutil.rmtree(_attrs_folder(store), ignore_errors=True)  # left by a replaced store
    todo = [t for t in tasks if prepared[tuple(t.index[d] for d in layout.sweep)] not in (1, 3)]
    skipped = len(tasks) - len(todo)
    if skipped:
        console.print(f"resuming: {skipped} run(s) already finished, {len(todo)} to go")
    workers = max(1, min(args.workers or default_workers(), len(todo) or 1))
    # The widest networks take longest: start them first so no worker idles at the end.
    todo.sort(key=lambda t: -_cost(t.plan))
    layer_coord = [int(x) for x in layout.extra.get("layer", [])]
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    outcomes, interrupted = _execute_all(todo, store, layer_coord, shapes, workers, console)
    from ._store import finalize

    _merge_run_attrs(store)
    finalize(store)
    _write_log(store, outcomes)
    _summary(console, store, spec)
    failed = [o for o in outcomes if o[1] == "failed"]
    diverged = [o for o in outcomes if o[1] == "diverged"]
    if diverged:
        console.print(f"[yellow]{len(diverged)} run(s) diverged[/yellow] (marked in 'status')")
    if failed:
        err.print(f"[red]{len(failed)} run(s) failed[/red]; errors in {store}.log and the store's 'message':")
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
) -> np.ndarray | None:
    """Create (or reopen for ``--resume``) the store; return the status array."""
    from ._store import create_store, read_status

    exists = os.path.exists(store)
    if exists and not (args.resume or args.overwrite):
        err.print(
            f"[red]error:[/red] {store} already exists. Use --resume to finish its pending runs, "
            "--overwrite to replace it, or -o to write elsewhere."
        )
        return None
    if exists and args.resume:
        import xarray as xr

        with xr.open_zarr(store, consolidated=True) as ds:
            stored = ds.attrs.get("spec_ir", "")
            if stored != spec_yaml:
                err.print(
                    f"[red]error:[/red] the spec differs from the one {store} was made with; "
                    "--resume needs the same spec and overrides (or use --overwrite)"
                )
                _diff(stored, spec_yaml, err)
                return None
        return read_status(store)
    if exists and args.overwrite:
        shutil.rmtree(store)
        if os.path.exists(f"{store}.log"):  # the replaced store's failures are history
            os.remove(f"{store}.log")
    os.makedirs(os.path.dirname(os.path.abspath(store)), exist_ok=True)
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
    return read_status(store)


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
    tasks: list[Task],
    store: str,
    layer_coord: list[int],
    shapes: Mapping[str, tuple[int, ...]],
    workers: int,
    console: Any,
) -> tuple[list[tuple[str, str, str]], bool]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    outcomes: list[tuple[str, str, str]] = []
    if not tasks:
        return outcomes, False
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    # spawn, not fork: the driver runs threads (progress), and forking those is unsafe.
    ctx = mp.get_context("spawn")
    updates = ctx.Queue()
    total_threads = default_workers()
    threads = max(1, total_threads // workers)
    interrupted = False
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("sweep", total=len(tasks), info="")
        bars: dict[str, Any] = {}
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                try:
                    key, step, loss = updates.get(timeout=0.1)
                except queue.Empty:
                    continue
                except (EOFError, OSError):
                    return
                bar = bars.get(key)
                if bar is None:
                    total = next(t.plan.steps for t in tasks if t.key == key)
                    bar = bars[key] = progress.add_task(f"  {key}", total=total, info="")
                progress.update(bar, completed=step, info=f"loss {loss:.4g}")

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        pool = cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(updates, threads)
        )
        futures: dict[cf.Future[tuple[str, str, str]], Task] = {}
        try:
            futures = {pool.submit(execute, t, store, layer_coord, shapes): t for t in tasks}
            for future in cf.as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - a worker that died: record and go on
                    outcome = (task.key, "failed", f"worker died: {error!r}")
                    _mark_failed(store, task, outcome[2])
                outcomes.append(outcome)
                progress.advance(overall)
                bar = bars.pop(task.key, None)
                if bar is not None:
                    progress.remove_task(bar)
                counts = _counts(outcomes)
                progress.update(overall, info=counts)
        except KeyboardInterrupt:
            interrupted = True
            for future in futures:
                future.cancel()
            _terminate(pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            stop.set()
            pumper.join(timeout=1)
            updates.close()
    return outcomes, interrupted


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now; their unfinished cells stay pending for ``--resume``."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()


def _mark_failed(store: str, task: Task, message: str) -> None:
    from ._store import Status, write_run

    write_run(
        store,
        index=task.index,
        records={},
        steps=task.plan.record_steps,
        status=Status.FAILED,
        message=message,
    )


def _counts(outcomes: Iterable[tuple[str, str, str]]) -> str:
    tally: dict[str, int] = {}
    for _, status, _ in outcomes:
        tally[status] = tally.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(tally.items()))


def _write_log(store: str, outcomes: Sequence[tuple[str, str, str]]) -> None:
    bad = [o for o in outcomes if o[1] != "done"]
    if not bad:
        return
    with open(f"{store}.log", "a", encoding="utf-8") as log:
        log.write(f"# mfdsl run, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        for key, status, message in bad:
            log.write(f"{key}: {status}: {message}\n")


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
