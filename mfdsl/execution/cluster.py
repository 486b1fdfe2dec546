"""``mfdsl run --scheduler``: the sweep's units of work as tasks of a Dask cluster.

Each unit of work (the runs one worker trains together; see ``group_tasks`` in the
runner) becomes one ``distributed`` task with an explicit key, ``mfdsl-<token>:<run
key>``, that calls the same function a local worker process calls.  The task writes
its runs' cells itself, straight into the store — chunk-aligned regions no other task
touches — so nothing but a few short outcome tuples travels back to the driver, which
shows progress as tasks complete (``as_completed``) and writes the consolidated
metadata once they all have.

Faults: a worker that dies mid-task is Dask's to handle — the scheduler runs the task
again elsewhere (up to ``distributed.scheduler.allowed-failures`` times, 3 by default),
and a task that raises is retried ``RETRIES`` times more.  Rewriting a cell is
harmless: a run writes its whole cell, data first and status last.  A unit that failed
for good (it raised every time, or it killed worker after worker) is recorded as
failed, so ``--resume`` runs it again.  A unit the cluster lost track of — the
scheduler died, the connection to it broke — has no known outcome: a worker that
survived may still write it.  Its runs are reported as the store has them, and those
still pending stay pending (``lost`` in the log, exit 1): the log, the exit code and
the store agree, and ``--resume`` finishes them.

GPUs: when a run trains on cuda the task asks for one ``GPU`` resource, so a worker
started with ``--resources GPU=1`` takes one such task at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mfdsl.core import location as loc
from mfdsl.core.errors import count
from mfdsl.execution import worker
from mfdsl.execution.launch import Job, Launcher, Outcome
from mfdsl.execution.progress import escape
from mfdsl.execution.worker import DIVERGE_ABOVE, _as_stored, _mark_failed
from mfdsl.plan.layout import Task

#: retries of a task that raised (a worker lost mid-task is retried by the scheduler)
RETRIES = 2
#: how long to wait for a scheduler to answer
CONNECT_TIMEOUT = "20s"


class ClusterError(Exception):
    """The cluster cannot be used: Dask is missing, the scheduler does not answer, or no
    worker can run the tasks.  The message is for the user."""


def require() -> None:
    """Raise :class:`ClusterError` unless ``dask.distributed`` imports."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterError(
            "--scheduler needs Dask's distributed scheduler: pip install 'mfdsl[dask]' "
            "(or pip install 'dask[distributed]')"
        ) from None


def needs_gpu(options: dict[str, Any]) -> bool:
    """Whether a run with these backend options trains on a GPU."""
    device = str(options.get("device", "")).lower()
    return device.startswith(("cuda", "gpu"))


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Dask's own log lines off while the sweep runs: a scheduler that goes away makes
    its client log tracebacks as it tries to reconnect, and mfdsl says what happened
    (runs lost, pending, the command that resumes them) itself."""
    names = [
        n for n in list(logging.root.manager.loggerDict) if n == "distributed" or n.startswith("distributed.")
    ]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(["distributed", *names])]
    before = [(logger, logger.level) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in before:
            logger.setLevel(level)


@contextmanager
def connect(scheduler: str, workers: int | None, gpu: bool) -> Iterator[Any]:
    """A ``distributed.Client``: of a ``LocalCluster`` of ``workers`` processes (one
    thread each) when ``scheduler`` is ``local``, else of the scheduler at that address."""
    require()
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if scheduler == "local":
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # on one machine every worker sees the same GPUs: let each hold one task
                resources={"GPU": 1} if gpu else None,
                silence_logs=logging.CRITICAL,
            )
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as error:
                raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from None
        try:
            with _quiet_dask():
                yield client
        finally:
            with _quiet_dask(), contextlib.suppress(Exception):
                client.close()
    finally:
        if cluster is not None:
            with _quiet_dask(), contextlib.suppress(Exception):
                cluster.close()


def _check_workers(client: Any, scheduler: str, gpu: bool, warn: Callable[[str], None]) -> None:
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        warn(f"no worker is connected to {scheduler} yet: the tasks wait for one")
        return
    if gpu and not any(float((w.get("resources") or {}).get("GPU", 0)) > 0 for w in workers.values()):
        raise ClusterError(
            f"the spec trains on cuda, so each task asks for a 'GPU' resource, and no worker of "
            f"{scheduler} has one: start the workers with --resources GPU=1 (see docs/cluster.md)"
        )


def execute_on_cluster(
    units: Sequence[Sequence[Any]],
    fn: Callable[..., list[Outcome]],
    args: tuple[Any, ...],
    *,
    scheduler: str,
    workers: int | None,
    gpu: bool,
    failed: Callable[[Sequence[Any], str], list[Outcome]],
    lost: Callable[[Sequence[Any], str], list[Outcome]],
    console: Any,
    warn: Callable[[str], None],
) -> tuple[list[Outcome], bool]:
    """Run ``fn(unit, *args)`` for every unit (a sequence of runs, each with a ``key``)
    as a task of the cluster; ``failed(unit, message)`` records a unit that failed for
    good (its task raised, or killed its workers), ``lost(unit, message)`` reports one
    the cluster lost track of (no outcome known).  Returns every run's outcome and
    whether Ctrl-C stopped the sweep."""
    from distributed import as_completed

    from mfdsl.execution.progress import Tracker

    outcomes: list[Outcome] = []
    if not units:
        return outcomes, False
    token = uuid.uuid4().hex[:8]
    resources = {"GPU": 1} if gpu else None
    interrupted = False
    with connect(scheduler, workers, gpu) as client:
        _check_workers(client, scheduler, gpu, warn)
        where = "a local Dask cluster" if scheduler == "local" else f"the Dask cluster at {scheduler}"
        console.print(f"running {count(len(units), 'task')} on {where}")
        by_key: dict[str, Sequence[Any]] = {}
        futures = []
        for i, unit in enumerate(units):
            key = f"mfdsl-{token}:{unit[0].key}" + (f" (+{len(unit) - 1})" if len(unit) > 1 else "")
            by_key[key] = unit
            futures.append(
                client.submit(
                    fn,
                    list(unit),
                    *args,
                    key=key,
                    pure=False,
                    retries=RETRIES,
                    resources=resources,
                    priority=len(units) - i,  # the units come largest first: start those first
                )
            )
        with Tracker(console, units, workers or len(units), counts=lambda: _counts(outcomes)) as tracker:
            seen: set[str] = set()
            try:
                for future in as_completed(futures):
                    unit = by_key[future.key]
                    seen.add(future.key)
                    finished = _outcome(future, unit, failed, lost)
                    with contextlib.suppress(Exception):
                        future.release()
                    outcomes.extend(finished)
                    for key, state, _ in finished:
                        tracker.finished(key, state)
            except KeyboardInterrupt:
                interrupted = True
                with contextlib.suppress(Exception):
                    client.cancel(futures)
            except Exception as error:  # noqa: BLE001 - the connection to the scheduler broke
                reason = f"the connection to the scheduler broke ({type(error).__name__}: {error})"
                for future in futures:
                    if future.key not in seen:
                        outcomes.extend(lost(by_key[future.key], f"lost on the cluster: {reason}"))
    return outcomes, interrupted


def _outcome(
    future: Any,
    unit: Sequence[Any],
    failed: Callable[[Sequence[Any], str], list[Outcome]],
    lost: Callable[[Sequence[Any], str], list[Outcome]],
) -> list[Outcome]:
    """A completed future's runs: their outcomes, failed for good, or lost."""
    if future.status == "finished":
        try:
            return list(future.result())
        except Exception as error:  # noqa: BLE001 - its result could not be fetched
            return lost(
                unit, f"lost on the cluster: its result cannot be fetched ({type(error).__name__}: {error})"
            )
    raised: BaseException | None
    try:
        raised = future.exception()
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - cancelled, or the scheduler is gone
        raised = None
    if future.status == "error" and raised is not None:
        return failed(unit, f"failed on the cluster: {type(raised).__name__}: {raised}")
    return lost(unit, f"lost on the cluster (its task is {future.status}: the scheduler went away?)")


def _counts(outcomes: Sequence[Outcome]) -> str:
    tally: dict[str, int] = {}
    for _, status, _ in outcomes:
        tally[status] = tally.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(tally.items()))


def _check_scheduler(args: argparse.Namespace, err: Any) -> None:
    """Validate ``--scheduler`` before the store is touched (:class:`ClusterError`)."""
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
    diverge_above: float = DIVERGE_ABOVE,
    fence: Mapping[str, Any] | None = None,
) -> tuple[list[tuple[str, str, str]], bool]:
    """The units of work as tasks of a Dask cluster (:mod:`mfdsl.execution.cluster`); each
    task writes its cells only while ``fence`` holds (:func:`_settle_lost`)."""

    def failed(unit: Sequence[Task], message: str) -> list[tuple[str, str, str]]:
        for task in unit:
            _mark_failed(store, task, message)
        return [(task.key, "failed", message) for task in unit]

    def lost(unit: Sequence[Task], message: str) -> list[tuple[str, str, str]]:
        return _as_stored(store, unit, message)

    # workers elsewhere resolve a relative path against their own folder
    where = store if loc.is_url(store) else os.path.abspath(store)
    return execute_on_cluster(
        groups,
        worker.execute_group,
        (where, layer_coord, shapes, diverge_above, fence),
        scheduler=args.scheduler,
        workers=workers,
        gpu=any(needs_gpu(dict(t.plan.options)) for unit in groups for t in unit),
        failed=failed,
        lost=lost,
        console=console,
        warn=lambda text: err.print(f"[yellow]warning:[/yellow] {escape(text)}"),
    )


class DaskLauncher(Launcher):
    """The units as tasks of a Dask cluster (``--scheduler ADDRESS``, or ``local`` for a
    cluster on this machine)."""

    def __init__(self, args: Any, workers: int) -> None:
        self.args = args
        self.workers = workers

    def launch(self, units: list[list[Task]], job: Job) -> tuple[list[Outcome], bool]:
        return _execute_on_cluster(
            units,
            job.store,
            list(job.layer_coord),
            job.shapes,
            self.workers,
            self.args,
            job.console,
            job.err,
            job.diverge_above,
            job.fence,
        )
