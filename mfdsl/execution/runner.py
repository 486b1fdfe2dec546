"""``mfdsl run``: every sweep point of every backend, in worker processes, into one store.

The sweep survives failure: a run that raises is recorded as failed (its error in the
store's ``message`` and in ``<store>.log``) and the others go on; a run whose worker
process dies is run again, and failed only once its worker has died ``WORKER_RETRIES +
1`` times while running it (the runs queued behind it are not charged); a diverged run
— its loss non-finite or above the divergence threshold (``--diverge-above``), or a
recorded value non-finite — is a result, not a failure; Ctrl-C and SIGTERM stop
cleanly, leaving every finished run in the store for ``--resume``.  A finished run is
never written again.  Workers are tied to the driver: a driver killed outright takes
its workers with it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mfdsl.core import location as loc
from mfdsl.core.errors import SpecError, count
from mfdsl.core.plugins import Backend, BackendUnavailable, available_backends, get_backend
from mfdsl.core.resources import default_workers
from mfdsl.core.version import __version__
from mfdsl.execution.cluster import DaskLauncher, _check_scheduler
from mfdsl.execution.launch import Job, Launcher
from mfdsl.execution.local import LocalPool
from mfdsl.execution.progress import escape
from mfdsl.execution.worker import (
    _STORAGE_ERRORS,
    DIVERGE_ABOVE,
    _as_stored,
    _attrs_folder,
    _clear_attrs_folder,
    _merge_run_attrs,
)
from mfdsl.language import ir as ir
from mfdsl.language.load import to_yaml
from mfdsl.plan.check import check_all
from mfdsl.plan.layout import Layout, Task, cost, plan_tasks
from mfdsl.store.status import FINISHED

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def default_store(spec: ir.Spec) -> str:
    return os.path.join("runs", f"{spec.experiment}.zarr")


# ---- planning ------------------------------------------------------------------------


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
    groups.sort(key=lambda unit: -sum(cost(t.plan) for t in unit))
    return groups


# ---- one run, in a worker ------------------------------------------------------------


#: the environment variable that numbers the local pool's worker processes (0, 1, …,
#: counting replacements on): a backend may pick a device by it (torch: ``device =
#: cuda`` spread over the GPUs)


# ---- the command -----------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, which ``mfdsl run`` handles as it handles Ctrl-C."""


#: set while a SIGTERM is being handled (the sweep's handlers catch it as Ctrl-C)
_SIGTERM_SEEN = threading.Event()


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Any:
    """SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) while the block
    runs, so a sweep stopped by a batch system or ``kill`` ends as Ctrl-C ends it:
    finished runs kept, the lock released, the command that resumes it printed.  A
    second SIGTERM while that happens is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _SIGTERM_SEEN.is_set():
            return
        _SIGTERM_SEEN.set()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM_SEEN.clear()


def _stopped(error: BaseException | None) -> tuple[str, int]:
    """The word and exit code of a sweep stopped by Ctrl-C or SIGTERM."""
    if isinstance(error, Terminated) or _SIGTERM_SEEN.is_set():
        return "terminated (SIGTERM)", EXIT_TERMINATED
    return "interrupted", EXIT_INTERRUPTED


def run_command(args: argparse.Namespace, spec: ir.Spec) -> int:
    """``mfdsl run``: returns the exit code.  Holds the store's lock (``<store>.lock``)
    from before the store is touched until the sweep ends.  SIGTERM is handled as
    Ctrl-C is (exit 143 instead of 130)."""
    with _sigterm_as_ctrl_c():
        try:
            return _run_command(args, spec)
        except Terminated as stop:  # before the lock was taken: nothing was touched
            word, code = _stopped(stop)
            from rich.console import Console

            Console(stderr=True, highlight=False).print(
                f"[yellow]{word}[/yellow] before the store was touched"
            )
            return code


def _run_command(args: argparse.Namespace, spec: ir.Spec) -> int:
    from rich.console import Console

    from mfdsl.execution.cluster import ClusterError
    from mfdsl.store.lock import StoreLocked, acquire

    err = Console(stderr=True, highlight=False)
    try:
        args.output = loc.normalize(args.output or default_store(spec))
    except ValueError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}")
        return EXIT_USAGE
    store = args.output
    if getattr(args, "extend", False):
        args.resume = True  # everything --resume checks and finishes, and the sweep grows
    problem = _threshold_problem(getattr(args, "diverge_above", None)) or _refusal(store, args)
    if problem is not None:  # before the lock: a refused target is not touched at all
        err.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True)
        return EXIT_USAGE
    # before _check_scheduler, which sets args.workers to the cluster's size
    finish = resume_command(args, spec)
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
        return _run_locked(args, spec, finish, lock)
    except ClusterError as error:
        err.print(
            f"[red]error:[/red] {escape(str(error))}\nThe store is kept: finish it with {escape(finish)}",
            soft_wrap=True,
        )
        return EXIT_USAGE
    except OSError as error:
        if error.errno not in _STORAGE_ERRORS:
            raise
        err.print(
            f"[red]error:[/red] {escape(_storage_problem(store, error))}. Finished runs are kept; "
            f"once that is fixed, finish with {escape(finish)}",
            soft_wrap=True,
        )
        return EXIT_FAILED
    except KeyboardInterrupt as stop:
        # Ctrl-C or SIGTERM outside the sweep itself (planning, checking, the summary):
        # the sweep's own is handled where it runs
        word, code = _stopped(stop)
        if loc.exists(store):
            err.print(
                f"[yellow]{word}[/yellow]: finished runs are kept; finish with {escape(finish)}",
                soft_wrap=True,
            )
        else:
            err.print(f"[yellow]{word}[/yellow] before the store was made")
        return code
    finally:
        lock.release()


def _threshold_problem(value: Any) -> str | None:
    """What is wrong with a ``--diverge-above`` value, if anything."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"--diverge-above takes a positive, finite loss (got {value!r})"
    return None


def _refusal(store: str, args: argparse.Namespace) -> str | None:
    """Why ``mfdsl run`` must not touch the target ``store`` with these options, told
    before its lock is taken (nothing is created, not even the lock): an existing path
    without ``--resume``/``--overwrite``; with ``--overwrite``, anything but an mfdsl
    store; with ``--resume``, anything that is no mfdsl store.  ``_prepare_store``
    checks again under the lock."""
    from mfdsl.store.verify import NotAStore, open_attrs
    from mfdsl.store.zarr import removal_problem

    if not loc.exists(store):  # nothing there (a link to nothing: the store is made where it points)
        return None
    if getattr(args, "overwrite", False):
        problem = removal_problem(store)
        if problem is not None:
            return (
                f"refusing to replace {store}: {problem}. --overwrite replaces an mfdsl store and nothing "
                "else; move or delete it yourself, or write elsewhere (-o)."
            )
        return None
    if getattr(args, "resume", False):
        try:
            open_attrs(store)
        except NotAStore as error:
            return f"cannot resume: {error}"
        return None
    try:
        open_attrs(store)
    except NotAStore as error:
        return f"{store} already exists, and is no mfdsl store: {error}. Write the sweep elsewhere (-o)."
    return (
        f"{store} already exists. Use --resume to finish its pending runs, "
        "--overwrite to replace it, or -o to write elsewhere."
    )


def resume_command(args: argparse.Namespace, spec: ir.Spec) -> str:
    """The command that finishes this run's store: ``mfdsl run`` with every option the
    run was given (``-o``, ``--set``, ``--backend``, ``--workers``, ``--scheduler``)
    and ``--resume``, each word quoted for a POSIX shell, so that pasting it resumes the
    same store with the same spec."""
    import shlex

    words = ["mfdsl", "run", str(getattr(args, "spec", None) or spec.path), "-o", str(args.output)]
    for override in getattr(args, "overrides", None) or []:
        words += ["--set", str(override)]
    for name in getattr(args, "backend", None) or []:
        words += ["--backend", str(name)]
    if getattr(args, "workers", None):
        words += ["--workers", str(args.workers)]
    if getattr(args, "scheduler", None):
        words += ["--scheduler", str(args.scheduler)]
    if getattr(args, "diverge_above", None) is not None:
        words += ["--diverge-above", repr(float(args.diverge_above))]
    # an interrupted --extend may not have grown the store yet: --extend finishes both
    words.append("--extend" if getattr(args, "extend", False) else "--resume")
    return " ".join(shlex.quote(word) for word in words)


def _run_locked(args: argparse.Namespace, spec: ir.Spec, finish: str, lock: Any = None) -> int:
    """``mfdsl run`` once the store is locked (``lock``, a
    :class:`mfdsl.store.lock.StoreLock`); ``finish`` is :func:`resume_command`."""
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
    # The store has room for the runs of every backend the spec names, and of those that
    # already wrote it (--resume), whichever this call runs: several calls with different
    # --backend fill one store.  The tasks of those that wrote it are planned too, so that
    # --resume checks their cells as exactly as this call's.
    stored = _stored_backends(store) if args.resume else []
    running = [b.name for b in backends]
    known = available_backends()
    others = [get_backend(n) for n in stored if n not in running and n in known]
    room = [get_backend(n) for n in dict.fromkeys([*spec.backends, *stored]) if n in known]
    layout, every = plan_tasks(spec, points, [*backends, *others], room_for=room)
    tasks = [t for t in every if t.backend in running]
    spec_yaml = to_yaml(spec)

    prepared = _prepare_store(store, spec, spec_yaml, layout, args, err, backends, every)
    if prepared is None:
        return EXIT_USAGE
    status, diverge_above = prepared
    if not args.resume:
        with contextlib.suppress(OSError):
            _clear_attrs_folder(_attrs_folder(store))  # left by a replaced store
    todo = [t for t in tasks if status[tuple(t.index[d] for d in layout.sweep)] not in FINISHED]
    skipped = len(tasks) - len(todo)
    if skipped:
        console.print(f"resuming: {count(skipped, 'run')} already finished, {len(todo)} to go")
    workers = max(1, min(args.workers or default_workers(), len(todo) or 1))
    groups = group_tasks(todo, workers)
    workers = max(1, min(workers, len(groups)))
    layer_coord = [int(x) for x in layout.extra.get("layer", [])]
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    stop: KeyboardInterrupt | None = None
    try:
        remote = bool(getattr(args, "scheduler", None))
        # a cluster's workers outlive a driver that died: their cells are fenced by the lock
        fence = lock.fence() if remote and lock is not None else None
        launcher: Launcher = DaskLauncher(args, workers) if remote else LocalPool(workers)
        job = Job(
            store=store,
            layer_coord=layer_coord,
            shapes=shapes,
            diverge_above=diverge_above,
            fence=fence,
            console=console,
            err=err,
        )
        outcomes, interrupted = launcher.launch(groups, job)
        if remote and lock is not None and any(o[1] == "lost" for o in outcomes):
            outcomes = _settle_lost(store, groups, outcomes, lock)
    except KeyboardInterrupt as error:  # between the sweep's own handlers
        outcomes, interrupted, stop = [], True, error
    from mfdsl.store.zarr import finalize

    def warn(text: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    _merge_run_attrs(store, warn)
    finalize(store)
    _write_log(store, outcomes, warn)
    summary = getattr(args, "summary", None)  # the CLI's table of final values (mfdsl.analysis)
    if summary is not None:
        summary(console, store)
    failed = [o for o in outcomes if o[1] == "failed"]
    diverged = [o for o in outcomes if o[1] == "diverged"]
    lost = [o for o in outcomes if o[1] == "lost"]
    if diverged:
        console.print(f"[yellow]{count(len(diverged), 'run')} diverged[/yellow] (marked in 'status')")
    if failed:
        err.print(
            f"[red]{count(len(failed), 'run')} failed[/red]; errors in {store}.log and the store's 'message':"
        )
        for key, _, message in failed[:5]:
            err.print(f"  {escape(key)}: {escape(message)}")
    if lost:
        err.print(
            f"[red]{count(len(lost), 'run')} lost[/red] by the cluster and still pending in the store "
            f"(listed in {store}.log); finish them with {escape(finish)}",
            soft_wrap=True,
        )
        for key, _, message in lost[:5]:
            err.print(f"  {escape(key)}: {escape(message)}")
    if interrupted:
        word, code = _stopped(stop)
        err.print(
            f"[yellow]{word}[/yellow]: finished runs are kept; finish with {escape(finish)}",
            soft_wrap=True,
        )
        return code
    return EXIT_FAILED if failed or lost else EXIT_OK


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
) -> tuple[np.ndarray, float] | None:
    """Create (or reopen for ``--resume``) the store; return the status array and the
    divergence threshold its runs are judged by.

    Before any training: a store that cannot be written (read-only) or that would not
    fit on its disk is refused with a message; ``--overwrite`` deletes an mfdsl store
    and nothing else; on ``--resume``, the store is inspected as ``mfdsl verify`` does
    it, refused if damaged beyond what the spec can restore, and finished cells whose
    data does not read back (a write cut off mid-chunk) are set pending again."""
    from mfdsl.store.zarr import NotRemovable, clean_partial, create_store, read_status, remove_store

    for leftover in clean_partial(store):
        err.print(
            f"[yellow]note:[/yellow] removed {escape(leftover)}, a skeleton a killed run left half-made"
        )
    refusal = _refusal(store, args)  # again, now that the store is locked
    if refusal is not None:
        err.print(f"[red]error:[/red] {escape(refusal)}", soft_wrap=True)
        return None
    exists = loc.exists(store)
    if exists and getattr(args, "extend", False):
        return _extend_store(store, spec, spec_yaml, layout, args, err, backends, tasks)
    if exists and args.resume:
        return _reopen_store(store, spec_yaml, layout, args, err, backends, tasks)
    if not _check_space(store, layout, len(tasks), True, err):
        return None
    threshold = float(getattr(args, "diverge_above", None) or DIVERGE_ABOVE)
    if exists and args.overwrite:
        try:
            remove_store(store)
        except NotRemovable as error:
            err.print(f"[red]error:[/red] refusing to replace {escape(str(error))}", soft_wrap=True)
            return None
        _remove_old_log(store, err)  # the replaced store's failures are history
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
                "diverge_above": threshold,
            },
        )
    except OSError as error:
        _drop_skeleton(store)
        err.print(f"[red]error:[/red] {escape(_storage_problem(store, error))}")
        return None
    except BaseException:  # Ctrl-C mid-skeleton: no half store is left to --resume
        _drop_skeleton(store)
        raise
    return read_status(store), threshold


def _extend_store(
    store: str,
    spec: ir.Spec,
    spec_yaml: str,
    layout: Layout,
    args: argparse.Namespace,
    err: Any,
    backends: Sequence[Backend],
    tasks: Sequence[Task],
) -> tuple[np.ndarray, float] | None:
    """``--extend``: check the store as ``--resume`` does against the spec it was made
    with, then rebuild it with the spec's grown sweep, every finished cell copied
    (:mod:`mfdsl.store.extend`); its new cells are pending.  Every refusal comes before
    anything is written."""
    from mfdsl.language.build import build
    from mfdsl.language.load import yaml_to_module
    from mfdsl.store.extend import growth, refuse_url
    from mfdsl.store.verify import NotAStore, open_attrs

    refusal = refuse_url(store)
    if refusal is not None:
        err.print(f"[red]error:[/red] cannot extend: {escape(refusal)}", soft_wrap=True)
        return None
    try:
        attrs = open_attrs(store)
        stored_yaml = attrs.get("spec_ir")
        if not isinstance(stored_yaml, str):
            raise NotAStore(f"{store} holds no spec (its root attribute 'spec_ir' is missing)")
        stored = build(yaml_to_module(stored_yaml, f"{store}:spec_ir"))
    except NotAStore as error:
        err.print(f"[red]error:[/red] cannot extend: {escape(str(error))}", soft_wrap=True)
        return None
    except SpecError as error:
        err.print(
            f"[red]error:[/red] cannot extend {escape(store)}: its stored spec does not read back "
            f"({escape(error.render().splitlines()[0])}); 'mfdsl verify' reports it",
            soft_wrap=True,
        )
        return None
    grown = growth(stored, stored_yaml, spec, to_yaml)
    if grown.problem is not None:
        err.print(f"[red]error:[/red] cannot extend {escape(store)}: {escape(grown.problem)}", soft_wrap=True)
        for line in grown.diff:
            err.print(f"  {line}", markup=False)
        return None
    names = list(dict.fromkeys(t.backend for t in tasks))
    known = available_backends()
    room = [get_backend(n) for n in dict.fromkeys([*spec.backends, *_stored_backends(store)]) if n in known]
    old_layout, old_tasks = plan_tasks(
        stored, check_all(stored), [get_backend(n) for n in names], room_for=room
    )
    reopened = _reopen_store(store, stored_yaml, old_layout, args, err, backends, old_tasks)
    if reopened is None or (not grown.added and old_layout.sweep == layout.sweep):
        return reopened  # nothing to grow (values in another order are laid out again)
    misfit = _growth_misfit(old_layout, layout)
    if misfit is not None:
        err.print(f"[red]error:[/red] cannot extend {escape(store)}: {escape(misfit)}", soft_wrap=True)
        return None
    if not _check_space(store, layout, len(tasks), True, err):  # the grown store is a copy
        return None
    _grow(store, spec, spec_yaml, old_layout, layout, grown.added, err)
    from mfdsl.store.zarr import read_status

    return read_status(store), reopened[1]


def _growth_misfit(old: Layout, new: Layout) -> str | None:
    """What the grown sweep changes beyond its sweep dimensions (the record steps, the
    probes, layers or particles recorded), which ``--extend`` cannot carry over."""
    from mfdsl.store.verify import same_values

    if list(old.sweep) != list(new.sweep):
        return "the grown sweep has other dimensions than the store"
    if not same_values(old.steps, new.steps):
        return "the new sweep values record at other steps than the store's runs (coordinate 'step')"
    if set(old.extra) != set(new.extra) or any(
        not same_values(old.extra[k], new.extra[k]) for k in old.extra
    ):
        return "the new sweep values record other probes, layers or particles than the store's runs"
    if {v.name for v in old.variables} != {v.name for v in new.variables}:
        return "the new sweep values record other variables than the store's runs"
    return None


def _grow(
    store: str,
    spec: ir.Spec,
    spec_yaml: str,
    old: Layout,
    new: Layout,
    added: Mapping[str, Sequence[Any]],
    err: Any,
) -> None:
    """Rebuild ``store`` (checked, locked) with the layout ``new``: a new skeleton
    beside it, every cell copied into its place, then swapped in."""
    from datetime import UTC, datetime

    from mfdsl.store.extend import copy_cells, kept_attrs, position_maps, swap_in
    from mfdsl.store.verify import open_attrs
    from mfdsl.store.zarr import NotRemovable, create_store, partial_path, remove_store, update_attrs

    _merge_run_attrs(store)  # left by a stopped sweep, under the old cell indices
    real = store if loc.is_url(store) else os.path.realpath(store.rstrip(os.sep))
    given, own = kept_attrs(open_attrs(real))
    before = given.get("extended")
    history: list[Any] = before if isinstance(before, list) else []
    given.update(
        spec_source=spec.source or "",
        spec_path=spec.path or "",
        spec_ir=spec_yaml,
        extended=[
            *history,
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "added": {k: list(v) for k, v in added.items()},
            },
        ],
    )
    side = partial_path(real)
    try:
        create_store(
            side,
            sweep=new.sweep,
            steps=new.steps,
            time=new.time,
            variables=new.variables,
            extra_coords=new.extra,
            attrs=given,
        )
        copy_cells(real, side, position_maps(old.sweep, new.sweep))
        update_attrs(side, own)
        swap_in(real, side)
    except BaseException:
        with contextlib.suppress(OSError, NotRemovable):
            remove_store(side)
        raise
    shown = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in added.items())
    if shown:
        err.print(f"extended {escape(store)} by {escape(shown)}", soft_wrap=True)
    else:
        err.print(f"laid {escape(store)} out again in the order of the spec's sweep", soft_wrap=True)


def _drop_skeleton(store: str) -> None:
    """Remove what a ``create_store`` cut short left at ``store`` (an object store's
    skeleton is written in place; a local one never is): zarr's files alone."""
    from mfdsl.store.zarr import NotRemovable, remove_store

    if loc.is_url(store):
        with contextlib.suppress(OSError, NotRemovable):
            remove_store(store, marker=False)


def _reopen_store(
    store: str,
    spec_yaml: str,
    layout: Layout,
    args: argparse.Namespace,
    err: Any,
    backends: Sequence[Backend],
    tasks: Sequence[Task],
) -> tuple[np.ndarray, float] | None:
    """``--resume``: check the existing store as ``mfdsl verify`` does before adding a
    run to it, repair what the spec alone determines (a coordinate that does not decode,
    the consolidated metadata), refuse the rest — every refusal before anything is
    written."""
    from mfdsl.core.streams import STREAM_LAYOUT
    from mfdsl.store.verify import NotAStore, inspect_store, open_attrs, stream_layout_mismatch
    from mfdsl.store.zarr import update_attrs

    try:
        attrs = open_attrs(store)
    except NotAStore as error:
        err.print(f"[red]error:[/red] cannot resume: {escape(str(error))}")
        return None
    mismatch = stream_layout_mismatch(attrs)
    if mismatch is not None:
        layout_number = attrs.get("stream_layout")
        newer = isinstance(layout_number, int) and layout_number > STREAM_LAYOUT
        err.print(
            f"[red]error:[/red] cannot resume {escape(store)}: it was {escape(mismatch)}, so runs added "
            "now would not draw the random numbers its finished runs drew. "
            + ("Upgrade mfdsl to resume it, or write " if newer else "Write ")
            + "the sweep to a new store (-o NEW.zarr), or replace this one (--overwrite).",
            soft_wrap=True,
        )
        return None
    stored = attrs.get("spec_ir", "")
    if stored != spec_yaml:
        err.print(
            f"[red]error:[/red] the spec differs from the one {store} was made with; "
            "--resume needs the same spec and overrides (or use --overwrite)"
        )
        _diff(str(stored), spec_yaml, err)
        return None
    threshold, problem = _stored_threshold(store, attrs, getattr(args, "diverge_above", None))
    if problem is not None:
        err.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True)
        return None
    try:
        structure = inspect_store(store, attrs)
    except NotAStore as error:
        err.print(f"[red]error:[/red] cannot resume: {escape(str(error))}")
        return None
    if structure.problems:
        shown = "; ".join(structure.problems[:3]) + (
            f"; and {count(len(structure.problems) - 3, 'more problem')}"
            if len(structure.problems) > 3
            else ""
        )
        err.print(
            f"[red]error:[/red] cannot resume {escape(store)}: it is damaged ({escape(shown)}). "
            f"'mfdsl verify {escape(store)}' lists every problem. Write the sweep to a new store "
            "(-o NEW.zarr), or replace this one (--overwrite).",
            soft_wrap=True,
        )
        return None
    misfit = _layout_misfit(structure, layout, backends)
    if misfit is not None:
        err.print(
            f"[red]error:[/red] cannot resume {escape(store)}: {escape(misfit)}. Write the runs of "
            "every backend to a new store (-o NEW.zarr), or replace this one (--overwrite).",
            soft_wrap=True,
        )
        return None
    try:
        _probe_writable(store)
    except OSError as error:
        err.print(f"[red]error:[/red] {escape(_storage_problem(store, error))}")
        return None
    _repair(store, structure, layout, err)
    # every backend that writes the store, in the order of their first write; set
    # before any run writes, so that a store this call leaves unfinished says so too
    written = [str(n) for n in attrs.get("backends", [])] if isinstance(attrs.get("backends"), list) else []
    joining = [b.name for b in backends if b.name not in written]
    record: dict[str, Any] = {"backends": [*written, *joining]} if joining else {}
    if "diverge_above" not in attrs:
        record["diverge_above"] = threshold  # a store of an mfdsl from before the threshold
    if record:
        update_attrs(store, record)
    status = _resume_status(store, tasks, layout, [b.name for b in backends], err, threshold)
    if not _check_space(store, layout, int(np.count_nonzero((status != 1) & (status != 3))), False, err):
        return None
    return status, threshold


def _stored_threshold(store: str, attrs: Mapping[str, Any], given: float | None) -> tuple[float, str | None]:
    """The divergence threshold of ``--resume``: the store's (root attribute
    ``diverge_above``), which ``--diverge-above`` may repeat but not change — its
    finished runs were judged by it; for a store without one, the one given or the
    default.  Returns it, or the problem."""
    stored = attrs.get("diverge_above")
    if stored is None:
        return float(given if given is not None else DIVERGE_ABOVE), None
    if (
        isinstance(stored, bool)
        or not isinstance(stored, (int, float))
        or not math.isfinite(stored)
        or stored <= 0
    ):
        return DIVERGE_ABOVE, (
            f"cannot resume {store}: its root attribute 'diverge_above' is {stored!r}, not a positive "
            "number ('mfdsl verify' reports it). Write the sweep to a new store (-o NEW.zarr), or replace "
            "this one (--overwrite)."
        )
    if given is not None and float(given) != float(stored):
        return float(stored), (
            f"cannot resume {store} with --diverge-above {given:g}: its runs were judged with "
            f"--diverge-above {float(stored):g}, and so are the runs --resume adds. Resume without "
            "--diverge-above (or with the same value), or write the sweep to a new store (-o NEW.zarr)."
        )
    return float(stored), None


def _rewritable_time(structure: Any, layout: Layout) -> bool:
    """Whether the store's ``time`` may be written again from the spec: it is there, with
    the spec's dimensions (it is derived, lr × step, and labels no cell)."""
    array = structure.arrays.get("time")
    return array is not None and tuple(array.metadata.dimension_names or ()) == tuple(layout.time[0])


def _repair(store: str, structure: Any, layout: Layout, err: Any) -> None:
    """Restore what the spec alone determines: a coordinate whose chunks do not decode
    is written again from the layout (the spec, which ``--resume`` checked is the
    store's, gives its values), and so is a ``time`` whose values are not the spec's
    (a byte flipped in a store from before coordinates had checksums: it is derived
    and labels no cell); stale or missing consolidated metadata is written again from
    the metadata files (which :func:`inspect_store` read whole)."""
    import zarr

    from mfdsl.store.verify import coordinate_differences
    from mfdsl.store.zarr import _quiet_consolidation

    planned = {**layout.sweep, "step": layout.steps, "time": layout.time[1], **layout.extra}
    broken = dict(structure.unreadable)
    if "time" in coordinate_differences(structure, layout) and _rewritable_time(structure, layout):
        broken["time"] = "its values are not the spec's lr × step"
    for name, why in sorted(broken.items()):
        array = zarr.open_array(store, path=name, mode="r+", zarr_format=3)
        values = np.asarray(planned[name])
        array[...] = values.astype(array.dtype) if values.dtype.kind in "iuf" else values
        err.print(
            f"[yellow]repaired:[/yellow] coordinate '{escape(name)}' of {escape(store)} was damaged "
            f"({escape(why)}); rewritten from the spec",
            soft_wrap=True,
        )
    if structure.consolidated is not None:
        with _quiet_consolidation():
            zarr.consolidate_metadata(store, zarr_format=3)
        err.print(
            f"[yellow]repaired:[/yellow] the consolidated metadata of {escape(store)} was missing or out of "
            f"date ({escape(structure.consolidated)}); written again from the metadata files",
            soft_wrap=True,
        )


def _remove_old_log(store: str, err: Any) -> None:
    """Remove ``<store>.log`` if it is a log ``mfdsl run`` wrote (a regular file that
    starts as :func:`_write_log` starts each entry); anything else is kept."""
    path = f"{store}.log"
    if not loc.exists(path):
        return
    head = ""
    if loc.is_url(path) or (os.path.isfile(path) and not os.path.islink(path)):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            head = loc.read_text(path)[: len(_LOG_HEADER)]
    if head == _LOG_HEADER:
        loc.remove(path)
    else:
        err.print(f"[yellow]note:[/yellow] kept {escape(path)}: it is not a log mfdsl wrote")


# errors that mean "the store's storage cannot take it", not a bug


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


def _resume_status(
    store: str,
    tasks: Sequence[Task],
    layout: Layout,
    running: Sequence[str],
    err: Any,
    diverge_above: float | None = None,
) -> np.ndarray:
    """The status of every cell for ``--resume``: finished cells that fail the integrity
    check of :mod:`mfdsl.store.verify` (a chunk that does not decode, recorded values that
    are missing; never the NaN padding the plan predicts) are written pending again, so
    they run again: now if their backend is among ``running``, else when it next runs."""
    from mfdsl.store.status import Status
    from mfdsl.store.verify import check_cells
    from mfdsl.store.zarr import write_run

    check = check_cells(store, tasks, diverge_above=diverge_above)
    status = check.status.astype(np.int8)
    dims = list(layout.sweep)
    redo: list[str] = []
    later: dict[str, list[str]] = {}
    for task in tasks:
        cell = tuple(task.index[d] for d in dims)
        problems = check.problems.get(cell)
        if not problems or int(status[cell]) not in (Status.DONE, Status.DIVERGED, -1):
            continue  # pending and failed cells run anyway, whatever their chunks hold
        write_run(store, index=task.index, records={}, steps=task.plan.record_steps, status=Status.PENDING)
        status[cell] = Status.PENDING
        line = f"{check.labels[cell]}: {problems[0]}"
        if task.backend in running:
            redo.append(line)
        else:
            later.setdefault(task.backend, []).append(line)
    if redo:
        verbs = "does not read back intact and runs" if len(redo) == 1 else "do not read back intact and run"
        err.print(f"[yellow]warning:[/yellow] {count(len(redo), 'finished run')} {verbs} again:")
        for line in redo[:5]:
            err.print(f"  {escape(line)}")
    for backend, lines in later.items():
        one = len(lines) == 1
        err.print(
            f"[yellow]warning:[/yellow] {count(len(lines), 'finished run')} of backend '{escape(backend)}' "
            f"{'does' if one else 'do'} not read back intact and {'is' if one else 'are'} pending again; "
            f"--resume with --backend {escape(backend)} runs {'it' if one else 'them'}:"
        )
        for line in lines[:5]:
            err.print(f"  {escape(line)}")
    return status


def _stored_backends(store: str) -> list[str]:
    """The backends that wrote ``store`` (its ``backends`` attribute), ``[]`` if it has
    none or is no store (which ``_prepare_store`` then reports)."""
    from mfdsl.store.verify import NotAStore, open_attrs

    try:
        names = open_attrs(store).get("backends") if loc.exists(store) else None
    except (NotAStore, OSError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def _layout_misfit(structure: Any, layout: Layout, backends: Sequence[Backend]) -> str | None:
    """Why the existing store (its :func:`mfdsl.store.verify.inspect_store`) cannot hold the
    runs of ``layout`` — its coordinates or variables differ from what the spec gives —
    or ``None``.  With the same spec that happens when a limit backend joins a store
    made without one (no ``width = inf`` cells), or when a coordinate was damaged where
    no checksum tells (a store of an mfdsl from before coordinates had one).  A
    coordinate that does not decode is no misfit if it has the spec's length: it is
    repaired (:func:`_repair`)."""
    from mfdsl.store.verify import _data_variables, _plain, coordinate_differences

    differences = coordinate_differences(structure, layout)
    for dim, values in layout.sweep.items():
        if dim not in differences:
            continue
        have = structure.coords.get(dim)
        finite = [_plain(v) for v in values if not isinstance(v, float) or math.isfinite(v)]
        if dim == "width" and have is not None and [_plain(v) for v in np.asarray(have).tolist()] == finite:
            limits = [b.name for b in backends if b.limit]
            return (
                f"it has no width = inf cells for the limit runs of {', '.join(map(repr, limits)) or 'a limit backend'}"
                " (it was made without a limit backend)"
            )
        return f"its coordinate '{dim}' does not match the sweep of the spec"
    if "step" in differences:
        return "its coordinate 'step' does not match the record steps of the spec"
    have_vars = set(_data_variables(structure.arrays, tuple(layout.sweep)))
    if have_vars != {v.name for v in layout.variables}:
        return f"its variables {sorted(have_vars)} do not match what the spec records"
    for name in differences:
        if name == "time" and _rewritable_time(structure, layout):
            continue  # derived, labels no cell: repaired from the spec
        what = "(lr × step) " if name == "time" else ""
        return f"its coordinate '{name}' does not match the spec's {what}(a damaged coordinate? see mfdsl verify)"
    planned = {**layout.sweep, "step": layout.steps, "time": layout.time[1], **layout.extra}
    for name in structure.unreadable:
        if name not in planned or tuple(structure.arrays[name].shape) != np.shape(planned[name]):
            return f"its coordinate '{name}' does not decode, and the spec gives it another shape"
    return None


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


#: how long a worker that passed the fence check may take to finish writing its cell
_FENCE_GRACE_S = 1.0


def _settle_lost(
    store: str, groups: Sequence[Sequence[Task]], outcomes: list[tuple[str, str, str]], lock: Any
) -> list[tuple[str, str, str]]:
    """Make the runs the cluster lost agree with the store for good: revoke the fence
    (a worker that survived its scheduler no longer writes), give a write already
    past the check a moment to finish, and read what the store holds of each."""
    lock.revoke()
    time.sleep(_FENCE_GRACE_S)
    tasks = {t.key: t for unit in groups for t in unit}
    lost = [tasks[key] for key, state, _ in outcomes if state == "lost" and key in tasks]
    messages = {key: message for key, state, message in outcomes if state == "lost"}
    settled = {}
    for task in lost:
        (outcome,) = _as_stored(store, [task], messages[task.key].split("; it is pending")[0])
        settled[task.key] = outcome
    return [settled.get(key, (key, state, message)) for key, state, message in outcomes]


#: how each entry of ``<store>.log`` starts
_LOG_HEADER = "# mfdsl run, "


def _write_log(store: str, outcomes: Sequence[tuple[str, str, str]], warn: Any = None) -> None:
    bad = [o for o in outcomes if o[1] != "done"]
    if not bad:
        return
    lines = [f"{_LOG_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    lines += [f"{key}: {status}: {message}\n" for key, status, message in bad]
    try:
        loc.append_text(f"{store}.log", "".join(lines))
    except OSError as error:
        if warn is None:
            raise
        warn(f"cannot write {store}.log ({error}); the store's 'message' holds every run's error")
