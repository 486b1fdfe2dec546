"""The local process pool: a sweep's units on this machine's cores, with a worker that
dies replaced and its unit run again (failed after ``WORKER_RETRIES + 1`` deaths), the
units queued behind it not charged."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mfdsl.core.errors import count
from mfdsl.core.resources import default_workers
from mfdsl.execution.launch import Job, Launcher, Outcome
from mfdsl.execution.progress import escape
from mfdsl.execution.worker import _STORAGE_ERRORS, DIVERGE_ABOVE, _init_worker, _mark_failed, _run_unit
from mfdsl.plan.layout import Task, cost

#: times a run is run again after its worker process died while running it (the local
#: pool): the run is failed when its worker dies WORKER_RETRIES + 1 times
WORKER_RETRIES = 2


def _execute_all(
    groups: list[list[Task]],
    store: str,
    layer_coord: list[int],
    shapes: Mapping[str, tuple[int, ...]],
    workers: int,
    console: Any,
    diverge_above: float = DIVERGE_ABOVE,
) -> tuple[list[tuple[str, str, str]], bool]:
    """Every unit of work in a local pool of worker processes: each run's outcome, and
    whether Ctrl-C (or SIGTERM) stopped the sweep.

    A worker process that dies (killed, out of memory) breaks the whole pool: the units
    that were running on it are charged — each of their runs counts one death of its
    worker — and every unfinished unit runs again in a fresh pool, the charged ones
    split run by run.  The units queued behind them, and those the broken pool's other
    workers were running when it tore them down, are not charged.  A run charged
    ``WORKER_RETRIES + 1`` times is failed."""
    from mfdsl.execution.progress import Tracker

    outcomes: list[tuple[str, str, str]] = []
    if not groups:
        return outcomes, False
    # spawn, not fork: the driver runs threads (progress), and forking those is unsafe.
    ctx = mp.get_context("spawn")
    # A worker killed while it writes to the progress queue leaves the queue's lock taken
    # for good, so every pool gets a fresh queue; ``channel[0]`` is the live one.
    channel = [ctx.Queue()]
    numbers = ctx.Value("i", 0)  # numbers the workers, replacements too (WORKER_ENV)
    total_threads = default_workers()
    threads = max(1, total_threads // workers)
    interrupted = False
    with Tracker(console, groups, workers, counts=lambda: _counts(outcomes)) as tracker:
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
                if step < 0:
                    tracker.started(key)
                else:
                    tracker.step(key, step, loss)

        def finish(unit: Sequence[Task], finished: Sequence[tuple[str, str, str]]) -> None:
            for task, outcome in zip(unit, finished, strict=True):
                outcomes.append(outcome)
                tracker.finished(task.key, outcome[1])

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        futures: dict[cf.Future[list[tuple[str, str, str]]], tuple[int, int]] = {}
        units = [list(unit) for unit in groups]
        deaths: dict[str, int] = {}  # run key -> times its worker died while running it
        left = list(range(len(units)))
        pool: cf.ProcessPoolExecutor | None = None
        try:
            while left:
                if pool is not None:  # a worker died: replace the queue it may have locked
                    old, channel[0] = channel[0], ctx.Queue()
                    old.cancel_join_thread()
                    old.close()
                started = ctx.RawArray("q", len(left))  # slot -> pid of the worker running it
                pool = cf.ProcessPoolExecutor(
                    max_workers=min(workers, len(left)),
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(channel[0], threads, os.getpid(), started, numbers),
                )
                # submitted largest first: the pool hands them out in this order
                futures = {
                    pool.submit(_run_unit, slot, units[i], store, layer_coord, shapes, diverge_above): (
                        slot,
                        i,
                    )
                    for slot, i in enumerate(left)
                }
                processes = dict(getattr(pool, "_processes", None) or {})
                broken: list[tuple[int, int]] = []
                for future in cf.as_completed(futures):
                    slot, i = futures[future]
                    unit = units[i]
                    try:
                        finished = future.result()
                    except BrokenProcessPool:
                        broken.append((slot, i))
                        continue
                    except Exception as error:  # recorded, and the sweep goes on
                        if isinstance(error, OSError) and error.errno in _STORAGE_ERRORS:
                            raise  # the store cannot be written: stop, say so
                        finished = [(t.key, "failed", f"worker error: {error!r}") for t in unit]
                        for task, outcome in zip(unit, finished, strict=True):
                            _mark_failed(store, task, outcome[2])
                    finish(unit, finished)
                processes.update(getattr(pool, "_processes", None) or {})
                pool.shutdown(wait=True)
                left = []
                if not broken:
                    continue
                charged = _charged(broken, started, processes)
                again: list[int] = []
                for _, i in sorted(broken, key=lambda b: b[1]):
                    if i not in charged:
                        again.append(i)
                        continue
                    how = _death(charged[i])
                    for task in units[i]:
                        deaths[task.key] = deaths.get(task.key, 0) + 1
                        if deaths[task.key] > WORKER_RETRIES:
                            times = deaths[task.key]
                            message = (
                                f"its worker process died while running it, {times} times (the last {how})"
                            )
                            _mark_failed(store, task, message)
                            finish([task], [(task.key, "failed", message)])
                        elif len(units[i]) == 1:
                            again.append(i)
                        else:  # run by run from now on: one bad run cannot take the others down
                            units.append([task])
                            again.append(len(units) - 1)
                    names = ", ".join(t.key for t in units[i][:3]) + (" …" if len(units[i]) > 3 else "")
                    console.print(
                        f"[yellow]a worker process died[/yellow] ({escape(how)}) while running {escape(names)}"
                    )
                left = sorted(again, key=lambda i: -sum(cost(t.plan) for t in units[i]))
                if left:
                    console.print(f"running the broken pool's {count(len(left), 'unfinished unit')} again")
                for unit in (units[i] for i in left):
                    tracker.requeued([task.key for task in unit])
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


def _charged(broken: Sequence[tuple[int, int]], started: Any, processes: Mapping[int, Any]) -> dict[int, Any]:
    """The units a broken pool's death is charged to (unit → the exit code of the worker
    that ran it): those that were running on a worker that died by itself; if none
    can be told (every worker ended by the pool's SIGTERM, or none had started a
    unit), those that were running; if none was, every unit the pool lost, so that a
    pool whose workers die before running anything cannot go round forever."""
    codes = {pid: getattr(process, "exitcode", None) for pid, process in processes.items()}
    running = {i: int(started[slot]) for slot, i in broken if int(started[slot]) > 0}
    died = {
        i: codes.get(pid) for i, pid in running.items() if codes.get(pid) not in (None, -int(signal.SIGTERM))
    }
    if died:
        return died
    if running:
        return {i: codes.get(pid) for i, pid in running.items()}
    return {i: None for _, i in broken}


def _death(exitcode: Any) -> str:
    """How a worker process ended, in words."""
    if isinstance(exitcode, int) and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", out of memory?" if -exitcode == int(signal.SIGKILL) else ""
        return f"killed by {name}{hint}"
    if isinstance(exitcode, int):
        return f"exit code {exitcode}"
    return "it ended abruptly"


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now; their unfinished cells stay pending for ``--resume``."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()


def _counts(outcomes: Iterable[tuple[str, str, str]]) -> str:
    tally: dict[str, int] = {}
    for _, status, _ in outcomes:
        tally[status] = tally.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(tally.items()))


class LocalPool(Launcher):
    """The units in worker processes on this machine (``--workers``, default every usable
    core)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def launch(self, units: list[list[Task]], job: Job) -> tuple[list[Outcome], bool]:
        return _execute_all(
            units, job.store, list(job.layer_coord), job.shapes, self.workers, job.console, job.diverge_above
        )
