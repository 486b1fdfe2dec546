"""One unit of work, in a worker process (the local pool's or a Dask worker's): the
backend's runs, their verdict (done, diverged, failed) and their cells written into the
store, each as soon as the unit has finished.  A run that raises is recorded as failed,
never a crash; a worker ties its life to the driver's."""

from __future__ import annotations

import contextlib
import errno
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mfdsl.core import location as loc
from mfdsl.core.errors import count
from mfdsl.core.plugins import WORKER_ENV, get_backend
from mfdsl.plan.layout import Task
from mfdsl.plan.layout import place as _place
from mfdsl.plan.types import RunPlan
from mfdsl.store.lock import fence_holds

#: the default divergence threshold: a run whose recorded train or test loss exceeds it
#: is diverged (``--diverge-above``)
DIVERGE_ABOVE = 1e10


#: the recorded losses the divergence threshold applies to
_LOSSES = ("train_loss", "test_loss")


_progress_queue: Any = None


#: the local pool's unit slots: a worker writes its pid into a unit's slot when it starts
#: the unit, so that the driver knows which units were running when a worker died
_started: Any = None


def _init_worker(
    progress_queue: Any, threads: int, driver: int | None = None, started: Any = None, counter: Any = None
) -> None:
    global _progress_queue, _started
    _progress_queue = progress_queue
    _started = started
    if counter is not None:
        with counter.get_lock():
            os.environ[WORKER_ENV] = str(counter.value)
            counter.value += 1
    # Ctrl-C belongs to the driver, which stops the workers itself; a worker that took
    # it would record its run as failed, or go on to the next task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Oversubscribed BLAS threads slow every worker down; pin each to its share.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    _tie_to_driver(os.getppid() if driver is None else driver)


def _tie_to_driver(driver: int) -> None:
    """Leave with the driver.  A driver killed outright (SIGKILL) cannot stop its
    workers, and a worker's queues never report it gone, so each worker sees to it:

    * on Linux the kernel kills the worker when its parent dies (``PR_SET_PDEATHSIG``);
    * then, the parent is checked to still be the driver — whose pid the driver passed
      in, not read here: a driver that died while this worker was starting (importing,
      before this runs) is already gone, and the worker's parent is then init;
    * everywhere, a thread waits on the pipe from the driver that only its death
      closes (multiprocessing's parent sentinel) and polls the parent pid.

    A cell the worker was writing stays pending: its status is written last."""
    _parent_death_signal()
    if os.getppid() != driver:
        os._exit(1)
    parent = mp.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    threading.Thread(
        target=_orphan_watch, args=(driver, sentinel), daemon=True, name="mfdsl-orphan-watch"
    ).start()


def _parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _orphan_watch(driver: int, sentinel: int | None) -> None:
    from multiprocessing.connection import wait

    while os.getppid() == driver:
        if sentinel is None:
            time.sleep(0.5)
        elif wait([sentinel], timeout=0.5):
            break  # the driver's end of the pipe closed: it is gone
    os._exit(1)


def _run_unit(
    slot: int,
    tasks: Sequence[Task],
    store: str,
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
    diverge_above: float,
) -> list[tuple[str, str, str]]:
    """:func:`execute_group` in a worker of the local pool, its slot marked started."""
    if _started is not None:
        _started[slot] = os.getpid()
    if _progress_queue is not None and tasks:
        _progress_queue.put((tasks[0].key, -1, math.nan))  # started: the driver times the unit
    return execute_group(tasks, store, layer_coord, shapes, diverge_above)


def execute(
    task: Task,
    store: str,
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    diverge_above: float = DIVERGE_ABOVE,
) -> tuple[str, str, str]:
    """Run one task and write its cell: :func:`execute_group` of one task."""
    return execute_group([task], store, layer_coord, shapes, diverge_above)[0]


def execute_group(
    tasks: Sequence[Task],
    store: str,
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    diverge_above: float = DIVERGE_ABOVE,
    fence: Mapping[str, Any] | None = None,
) -> list[tuple[str, str, str]]:
    """Run one unit of work (tasks of one backend, grouped by :meth:`Backend.group`)
    and write each task's cell as soon as the unit has finished.  Returns ``(key,
    status, message)`` per task.  An exception inside the backend becomes failed cells,
    not a crash: a unit of several tasks that raises is run again task by task, so that
    only the tasks that fail are failed; an error in writing one task's records fails
    that task alone.  ``shapes`` gives each variable's store dimensions after ``step``;
    a run the backend calls done is diverged all the same when its records blow up
    (:func:`judge`: a loss above ``diverge_above``, a non-finite value).  With a
    ``fence`` (:meth:`mfdsl.store.lock.StoreLock.fence`), a cell is written only while the
    sweep that started the unit still holds it; otherwise its run is ``lost``."""

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
                outcome
                for task in tasks
                for outcome in execute_group([task], store, layer_coord, shapes, diverge_above, fence)
            ]
        if not fence_holds(fence):
            return [_unfenced(tasks[0])]
        return [_record_failure(store, tasks[0], error)]
    return [
        _record_result(store, task, result, layer_coord, shapes or {}, diverge_above)
        if fence_holds(fence)
        else _unfenced(task)
        for task, result in zip(tasks, results, strict=True)
    ]


def _unfenced(task: Task) -> tuple[str, str, str]:
    return (
        task.key,
        "lost",
        "not written: the mfdsl run that started it has ended or given it up (its lock's token changed)",
    )


def _record_result(
    store: str,
    task: Task,
    result: Mapping[str, Any],
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
    diverge_above: float = DIVERGE_ABOVE,
) -> tuple[str, str, str]:
    from mfdsl.store.status import Status
    from mfdsl.store.zarr import write_run

    try:
        records = _place(task.plan, dict(result["records"]), layer_coord, shapes)
        status = Status.DIVERGED if result.get("status") == "diverged" else Status.DONE
        message = str(result.get("message", ""))
        if status == Status.DONE:
            verdict = judge(task.plan, records, layer_coord, shapes, diverge_above)
            if verdict is not None:
                status, message = Status.DIVERGED, verdict
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


def judge(
    plan: RunPlan,
    records: dict[str, np.ndarray],
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
    diverge_above: float = DIVERGE_ABOVE,
) -> str | None:
    """Whether a run its backend calls done blew up: the message of a diverged run,
    or ``None``.  It diverged at the first record step where a recorded loss
    (``train_loss``, ``test_loss``) is above ``diverge_above``, or any recorded value
    is infinite, or NaN where the run records a value (never its padding, which the
    plan gives: :func:`mfdsl.store.verify.expected`).  ``records`` (placed on the store's
    dimensions, one row per record step) keep that step's values, the evidence, and
    read NaN after it, as a backend leaves a run that diverged."""
    from mfdsl.store.verify import expected

    steps = np.asarray(plan.record_steps, dtype=np.int64)
    where = expected(plan, steps, layer_coord, {n: tuple(np.shape(r)[1:]) for n, r in records.items()})
    first: tuple[int, str, str] | None = None  # (row, variable, what)
    for name, values in records.items():
        rows = np.asarray(values, dtype=np.float64)
        if rows.ndim == 0 or rows.shape[0] != len(steps):
            continue
        flat = rows.reshape(len(steps), -1)
        bad = np.isinf(flat)
        if where is not None and name in where.required:
            bad |= np.isnan(flat) & where.required[name].reshape(len(steps), -1)
        if name in _LOSSES:
            with np.errstate(invalid="ignore"):
                bad |= flat > diverge_above
        hit = np.flatnonzero(bad.any(axis=1))
        if hit.size and (first is None or hit[0] < first[0]):
            row = int(hit[0])
            value = float(flat[row][bad[row]][0])
            if math.isfinite(value):
                what = f"is {value:.4g}, above the divergence threshold {diverge_above:g} (--diverge-above)"
            else:
                what = f"is {value}"
            first = (row, name, what)
    if first is None:
        return None
    row, name, what = first
    for key, values in records.items():
        if np.ndim(values) and np.shape(values)[0] == len(steps):
            records[key] = np.array(values, dtype=np.float64)
            records[key][row + 1 :] = np.nan
    step = int(steps[row])
    return f"diverged: {name} at step {step} {what}; records after step {step} are NaN"


def _write_failed(store: str, task: Task, message: str) -> None:
    """The task's cell marked failed, with ``message``."""
    from mfdsl.store.status import Status
    from mfdsl.store.zarr import write_run

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


#: the file a run's reported attributes are kept in: its sweep index, joined by "-"
_ATTRS_FILE = re.compile(r"^\d+(-\d+)*\.json$")


#: what :func:`mfdsl.core.location.write_text` leaves when killed before its rename
_ATTRS_TEMP = re.compile(r"^\d+(-\d+)*\.json\.tmp\d+$")


def _merge_run_attrs(store: str, warn: Any = None) -> None:
    """Root attribute ``NAME`` = ``{run key: value}`` for every ``NAME`` a run reported
    (merged into what the store holds, so a resumed sweep keeps earlier runs').  A file
    that cannot be read is left where it is, with a warning; the folder is removed once
    nothing but mfdsl's files was in it."""
    import json

    import zarr

    folder = _attrs_folder(store)
    entries = []
    unreadable = []
    for name in loc.list_names(folder):
        if not _ATTRS_FILE.match(name):
            continue
        try:
            entry = json.loads(loc.read_text(loc.join(folder, name)))
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("key"), str)
                and isinstance(entry.get("attrs"), dict)
            ):
                raise ValueError("not the attributes of a run")
        except (OSError, ValueError, UnicodeDecodeError):
            unreadable.append(name)
            continue
        entries.append(entry)
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
    if unreadable and warn is not None:
        warn(
            f"{count(len(unreadable), 'file')} of the attributes runs reported cannot be read and "
            f"{'is' if len(unreadable) == 1 else 'are'} left in {folder}: {', '.join(unreadable[:3])}"
        )
    with contextlib.suppress(OSError):
        _clear_attrs_folder(folder, keep=set(unreadable))


def _clear_attrs_folder(folder: str, keep: set[str] | None = None) -> None:
    """Remove the files :func:`_save_run_attrs` writes in ``folder`` (but ``keep``), and
    the folder once it is empty: never a file mfdsl did not write there."""
    names = loc.list_names(folder)
    for name in names:
        if name in (keep or set()) or not (_ATTRS_FILE.match(name) or _ATTRS_TEMP.match(name)):
            continue
        path = loc.join(folder, name)
        if loc.is_url(path) or (os.path.isfile(path) and not os.path.islink(path)):
            loc.remove(path)
    if names and loc.list_names(folder):
        return
    if loc.is_url(folder):
        loc.remove(folder)
    elif os.path.isdir(folder) and not os.path.islink(folder):
        os.rmdir(folder)


def _as_stored(store: str, unit: Sequence[Task], message: str) -> list[tuple[str, str, str]]:
    """The outcomes of runs the cluster lost track of (its scheduler gone): what the
    store says of each — a worker that survived may have written it after all — and
    for a cell still pending, ``lost``: it is left pending (never marked failed, which a
    surviving worker could overwrite with done), so the log, the exit code and the
    store agree, and ``--resume`` runs it."""
    import zarr

    from mfdsl.store.status import Status

    names = {Status.DONE: "done", Status.DIVERGED: "diverged", Status.FAILED: "failed"}
    out = []
    try:
        group: Any = zarr.open_group(store, mode="r", use_consolidated=False)
        status, messages = group["status"], group["message"]
        dims = [str(d) for d in status.metadata.dimension_names]
    except Exception:  # noqa: BLE001 - unreadable now: every run stays as lost
        status = messages = None
        dims = []
    for task in unit:
        state, text = None, ""
        if status is not None and messages is not None:
            cell = tuple(task.index[d] for d in dims)
            with contextlib.suppress(Exception):
                state = int(np.asarray(status[cell]))
                text = str(np.asarray(messages[cell]))
        if state in names:
            out.append((task.key, names[Status(state)], text if state != Status.DONE else ""))
        else:
            out.append((task.key, "lost", f"{message}; it is pending in the store"))
    return out


def _mark_failed(store: str, task: Task, message: str) -> None:
    """Record a run its worker could not (the worker died).  If even that cannot be
    written, the cell stays pending, which ``--resume`` runs again all the same."""
    with contextlib.suppress(OSError):
        _write_failed(store, task, message)


#: OS errors that mean the store cannot be written (the sweep stops, says so)
_STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
