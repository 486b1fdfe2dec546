"""The verbs: what ``mfdsl check / run / report / plot / verify`` do, as Python functions.

The command line (:mod:`mfdsl.cli`) is a thin layer over these: it parses flags, asks
questions on a terminal and prints.  A notebook calls them directly::

    import mfdsl
    ds = mfdsl.run("specs/quickstart.mf", "runs/q.zarr", overrides=["sweep.seed=[0, 1]"])
    mfdsl.report("runs/q.zarr")["slices"]

Errors in a spec raise :class:`mfdsl.SpecError` (its ``str`` is the rendered message
with the place in the spec); warnings are issued as :class:`MfdslWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mfdsl.core.errors import SpecError

if TYPE_CHECKING:
    import xarray as xr

    from mfdsl.language.expand import Point
    from mfdsl.language.ir import Spec
    from mfdsl.store.verify import Report


class MfdslWarning(UserWarning):
    """A spec's warning (a sweep variable nothing uses, a limit that cannot move, …)
    raised by the Python verbs; the command line prints the same text."""


class RunError(RuntimeError):
    """``run`` could not run the sweep at all (a refused store, no backend that can
    run); the reason was printed on stderr.  Runs that fail or diverge are not errors:
    they are recorded in the store's ``status`` and ``message``."""


@dataclass(kw_only=True)
class RunRequest:
    """What the runner reads: the command line's ``mfdsl run`` flags, or :func:`run`'s
    arguments."""

    spec: str | None = None  # the spec's path, as given (for the resume command shown)
    output: str | None = None
    backend: list[str] | None = None
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    scheduler: str | None = None
    diverge_above: float | None = None
    overrides: Sequence[str] = ()
    #: prints the table of final values at the end (the command line's; ``None``: quiet)
    summary: Callable[[Any, str], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_spec(spec: str | os.PathLike[str] | Spec, overrides: Sequence[str] = ()) -> Spec:
    """A checked spec: ``spec`` is a path to a ``.mf`` (or YAML) file, or a spec
    already loaded (then ``overrides`` must be empty)."""
    from mfdsl.language.ir import Spec as SpecType
    from mfdsl.language.load import load

    if isinstance(spec, SpecType):
        if overrides:
            raise ValueError("overrides apply to a spec file: pass its path, or mfdsl.apply_overrides")
        return spec
    return load(spec, overrides=overrides)


def check(spec: str | os.PathLike[str] | Spec, *, overrides: Sequence[str] = ()) -> list[SpecError]:
    """Everything ``mfdsl check`` checks that is about the spec: every sweep point
    expanded and checked by its backends, the data files, this machine's backends.
    Raises the first error; returns the warnings."""
    from mfdsl.plan.check import check_all, check_data, check_data_files, preflight, spec_warnings

    loaded = load_spec(spec, overrides)
    points = check_all(loaded)
    found: list[SpecError] = [*spec_warnings(loaded, points), *preflight(loaded, points, loaded.backends)]
    if check_data_files(loaded, points):
        check_data(loaded, points)
    return found


def prepare_run(
    spec: Spec,
    points: Sequence[Point],
    backends: Sequence[str] | None,
    *,
    workers: int | None,
    remote: bool = False,
    force: bool = False,
    yes: bool = False,
    warn: Callable[[SpecError], None],
    ask: Callable[[str], bool] | None = None,
) -> bool:
    """What ``mfdsl run`` checks before it creates anything: the sweep's size and
    memory (by arithmetic, before any data is looked at), the spec's warnings, the data
    files, and whether this machine can run each backend.  Raises :class:`SpecError`;
    returns ``False`` when a large sweep was not confirmed (``yes`` or ``ask``)."""
    from mfdsl.plan.check import check_data, check_data_files, preflight, spec_warnings
    from mfdsl.plan.estimate import CONFIRM_RUNS, check_machine, confirm_runs, estimate, rough_seconds

    chosen = list(backends or spec.backends)
    resources = estimate(spec, points, chosen, workers=0 if remote else workers)
    for warning in check_machine(resources, spec, force=force):
        warn(warning)
    seconds = None
    if resources.runs > CONFIRM_RUNS and not yes:
        seconds = rough_seconds(points, chosen, resources.workers)
    if not confirm_runs(resources.runs, spec, yes=yes, ask=ask, seconds=seconds, workers=resources.workers):
        return False
    for warning in spec_warnings(spec, points):
        warn(warning)
    check_data_files(spec, points)
    check_data(spec, points)
    preflight(spec, points, chosen)
    return True


def run(
    spec: str | os.PathLike[str] | Spec,
    store: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    backends: Sequence[str] | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    diverge_above: float | None = None,
    force: bool = False,
    yes: bool = False,
) -> xr.Dataset:
    """Run a sweep into ``store`` (default ``runs/<experiment>.zarr``) and open it.

    The same runs, into the same store, as ``mfdsl run SPEC -o STORE`` with the same
    options (``--set`` is ``overrides``, ``--backend`` is ``backends``); ``resume``
    finishes an interrupted sweep, ``overwrite`` replaces a store mfdsl made.  Sweeps
    above 1000 runs need ``yes=True``.  Returns the store opened with
    ``xarray.open_zarr`` (failed and diverged runs are in it, marked by ``status``).
    """
    from mfdsl.execution.runner import EXIT_FAILED, EXIT_OK, default_store, run_command
    from mfdsl.language.expand import expand

    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    loaded = load_spec(spec, overrides)
    points = list(expand(loaded))

    def warn(warning: SpecError) -> None:
        warnings.warn(str(warning), MfdslWarning, stacklevel=3)

    if not prepare_run(loaded, points, backends, workers=workers, force=force, yes=yes, warn=warn):
        raise RunError(
            f"{len(points)} sweep points is a large sweep: pass yes=True to run it "
            "('mfdsl check' says how long it may take)"
        )
    where = os.fspath(store) if store is not None else default_store(loaded)
    request = RunRequest(
        spec=None if not isinstance(spec, (str, os.PathLike)) else os.fspath(spec),
        output=where,
        backend=list(backends) if backends else None,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        diverge_above=diverge_above,
        overrides=tuple(overrides),
    )
    code = run_command(request, loaded)  # type: ignore[arg-type]
    if code == 130 or code == 143:
        raise KeyboardInterrupt
    if code not in (EXIT_OK, EXIT_FAILED):
        raise RunError(f"mfdsl run did not run the sweep into {where} (the reason is above, on stderr)")
    return open_store(request.output or where)


def open_store(store: str | os.PathLike[str]) -> xr.Dataset:
    """A store as an ``xarray.Dataset`` (lazily, with dask where installed); raises
    :class:`mfdsl.analysis.report.StoreError` with the reason when it is not one."""
    from mfdsl.analysis.report import open_results

    return open_results(os.fspath(store))


def report(store: str | os.PathLike[str]) -> dict[str, Any]:
    """``mfdsl report --json``'s content: per slice of the sweep, the final values per
    width with their spread, how the runs ended, and fitted rates to the limit."""
    from mfdsl.analysis.report import summarize

    return summarize(os.fspath(store))


def plot(
    store: str | os.PathLike[str],
    *,
    kind: str = "curves",
    variables: Sequence[str] | None = None,
    output: str | os.PathLike[str] | None = None,
) -> str:
    """``mfdsl plot``: draw the store's curves (or another ``kind``) into an image;
    returns its path."""
    from mfdsl.analysis.plot import plot_store

    return str(
        plot_store(
            os.fspath(store),
            kind=kind,
            variables=list(variables) if variables else None,
            output=None if output is None else os.fspath(output),
        )
    )


def verify(store: str | os.PathLike[str]) -> Report:
    """``mfdsl verify``: every cell of the store checked against its status and the
    plan of its spec; ``report.ok`` says whether all is well."""
    from mfdsl.store.verify import verify as verify_store

    return verify_store(os.fspath(store))


__all__ = [
    "MfdslWarning",
    "RunError",
    "RunRequest",
    "check",
    "load_spec",
    "open_store",
    "plot",
    "prepare_run",
    "report",
    "run",
    "verify",
]
