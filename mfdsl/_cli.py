"""The ``mfdsl`` command line: check, show, fmt, run, plot, report, verify.

Exit codes: 0 success, 1 a run failed (or ``fmt --check`` found changes, or ``verify``
found problems), 2 a bad spec or bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._errors import SpecError, count
from ._estimate import CONFIRM_RUNS, MEMORY_ENV

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def print_error(error: SpecError, console: Console | None = None, *, level: str = "error") -> None:
    """A spec error (or, with ``level = "warning"``, a warning), coloured: location and
    message, source excerpt, hint."""
    console = console or _console(stderr=True)
    lines = error.render().split("\n")
    head, rest = lines[0], lines[1:]
    text = Text()
    location, _, message = head.partition(": ")
    text.append(location + ": ", style="bold")
    text.append(f"{level}: ", style="bold red" if level == "error" else "bold yellow")
    text.append(message)
    console.print(text)
    for line in rest:
        if line.startswith("hint: "):
            console.print(Text("hint: ", style="bold cyan") + Text(line[6:]))
        elif "^" in line and line.strip().startswith("|"):
            console.print(Text(line, style="bold red"))
        else:
            console.print(Text(line, style="dim") if "|" in line[:8] else Text(line))


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a value of the spec, e.g. --set train.steps=500 --set sweep.width=[50,100] "
        "(repeatable; the value uses the spec's syntax)",
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="go on even when the sweep needs more memory than this machine has (the estimate "
        f"becomes a warning; {MEMORY_ENV}=16GiB sets the memory assumed instead of the machine's)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mfdsl",
        description="Declarative width sweeps of neural networks and their mean-field limit.",
        epilog="Run 'mfdsl COMMAND --help' for a command's options. Docs: docs/language.md",
    )
    parser.add_argument("--version", action="version", version=f"mfdsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser(
        "check",
        help="validate a spec and summarise its sweep",
        description="Validate a spec (.mf or .yaml) and print a table of its sweep. Also checks what "
        "'mfdsl run' would meet on this machine before any run: each backend's requirements (e.g. "
        "torch.device = cuda needs a GPU torch can see) and the image data files (headers against sizes); "
        "missing data files or backend libraries are warnings.",
    )
    check.add_argument("spec", help="the spec file")
    _add_set(check)
    _add_force(check)
    check.add_argument(
        "--strict",
        action="store_true",
        help="treat every warning as an error (exit 2): the science checks (a limit that cannot "
        "move, a homogeneous network on norm-separated classes, degenerate middle layers), unused "
        "sweep variables, missing data files or backends",
    )

    show = sub.add_parser(
        "show",
        help="print the validated spec as YAML",
        description="Print the validated IR of a spec as YAML (a .yaml spec with the same content is accepted wherever a .mf is).",
    )
    show.add_argument("spec", help="the spec file")
    _add_set(show)

    fmt = sub.add_parser(
        "fmt",
        help="format a spec canonically (comments kept)",
        description="Print a .mf spec in canonical format, keeping comments.",
    )
    fmt.add_argument("specs", nargs="+", metavar="spec", help="the .mf spec files")
    group = fmt.add_mutually_exclusive_group()
    group.add_argument(
        "--check", action="store_true", help="exit 1 if the file is not formatted; change nothing"
    )
    group.add_argument("--write", action="store_true", help="rewrite the file in place")

    run = sub.add_parser(
        "run",
        help="train every sweep point and write the zarr store",
        description="Train the spec's networks at every sweep point (width × seed × ...) and write all trajectories into one zarr store.",
    )
    run.add_argument("spec", help="the spec file")
    run.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="the store: a path or an fsspec URL the workers reach, file:///… or s3://… (default: runs/<experiment>.zarr)",
    )
    run.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="run only this backend (repeatable; default: the spec's 'backends')",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="parallel worker processes, of the local pool or of --scheduler local (default: the usable cores)",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run every unit of work as a task of a Dask cluster: the scheduler's address "
        "(tcp://HOST:8786), or 'local' for a LocalCluster of --workers processes; needs "
        "pip install 'mfdsl[dask]' (default: a local process pool)",
    )
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="finish the runs an existing store has not done")
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing mfdsl store (anything else at the path is refused, never deleted)",
    )
    run.add_argument(
        "--diverge-above",
        type=float,
        metavar="LOSS",
        help="record a run as diverged once a recorded train or test loss exceeds LOSS "
        "(default 1e10; a run with a non-finite recorded value is diverged whatever LOSS); "
        "a store keeps the value it was made with",
    )
    run.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help=f"start a sweep of more than {CONFIRM_RUNS} runs without asking (without a terminal to ask, "
        "such a sweep needs it)",
    )
    _add_force(run)
    _add_set(run)

    plot = sub.add_parser(
        "plot",
        help="draw a store's curves, width convergence or particles",
        description="Draw figures of a results store (needs matplotlib: pip install 'mfdsl[plot]').",
    )
    plot.add_argument("store", help="the zarr store written by 'mfdsl run'")
    plot.add_argument(
        "--kind",
        choices=("curves", "convergence", "particles"),
        default="curves",
        help="curves: variables against time, a line per width (default); convergence: distance to the limit against width, log-log, with the fitted slope; particles: the sampled neurons at the first, middle and last record",
    )
    plot.add_argument(
        "--var",
        action="append",
        metavar="NAME",
        help="plot only this variable, e.g. test_loss or weight_change[layer=1] (repeatable; default: every scalar variable)",
    )
    plot.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="the figure, .png, .svg or .pdf (default: <store name>.png here, <name>-<kind>.png for the other kinds)",
    )

    report = sub.add_parser(
        "report",
        help="tabulate final metrics, distance to the limit and fitted rates",
        description="Print, for each slice of the sweep's other variables: final metrics per width (mean ± sample std over the done seeds; diverged, failed and pending runs counted apart), the distance of each width's seed-mean trajectory to the limit (or to the widest run), and the log-log rate of the distance to the limit with its 95% confidence interval (none against the widest run: the report says why).",
    )
    report.add_argument("store", help="the zarr store written by 'mfdsl run'")
    report.add_argument("--json", action="store_true", help="print the same as JSON on stdout")

    verify = sub.add_parser(
        "verify",
        help="check that a store's data agrees with its statuses",
        description="Check a results store: every cell's status agrees with its data (done runs complete and finite, pending cells empty), every chunk decodes, the stored spec parses and matches the store's shape, the attributes are complete. Exit 1 with a list of problems otherwise.",
    )
    verify.add_argument("store", help="the zarr store written by 'mfdsl run'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mfdsl`` console script and ``python -m mfdsl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = {
            "check": _check,
            "show": _show,
            "fmt": _fmt,
            "run": _run,
            "plot": _plot,
            "report": _report,
            "verify": _verify,
        }[args.command]
        return handler(args)
    except SpecError as error:
        print_error(error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/yellow]")
        return 130
    except MemoryError:
        # The estimate refuses what will not fit before anything is allocated; this is
        # what --force, or an estimate short of the truth, leaves.
        _console(stderr=True).print(
            Text("error: ", style="bold red")
            + Text(
                "this machine ran out of memory. 'mfdsl check SPEC' estimates what the sweep needs; "
                "make it smaller, or run it where there is more memory"
            )
        )
        return EXIT_USAGE


def _load(args: argparse.Namespace) -> Any:
    from ._api import load

    return load(args.spec, overrides=args.overrides)


def _check(args: argparse.Namespace) -> int:
    from ._estimate import check_disk, check_machine, estimate, summary
    from ._expand import check_all, check_data, spec_warnings
    from ._plugins import available_backends
    from ._runner import default_store

    spec = _load(args)
    points = check_all(spec)
    warned: list[SpecError] = []
    level = "error" if args.strict else "warning"
    # before anything else looks at the points' data: a spec too large for this machine
    # is refused by arithmetic, not found out by allocating it
    resources = estimate(spec, points, spec.backends)
    warned += check_machine(resources, spec, force=args.force)
    disk = check_disk(resources, default_store(spec))
    if disk is not None:
        warned.append(disk)
    warned += spec_warnings(spec, points)
    warned += preflight(spec, points, spec.backends)
    present = check_data_files(spec, points)
    try:
        check_data(spec, points)
    except SpecError as error:
        if present:
            raise  # the files are here, and do not hold what the spec asks of them
        # Missing data files do not make the spec wrong (it may be checked on one machine
        # and run on another), but 'mfdsl run' stops on them: say so now.
        error.message += " ('mfdsl run' stops on this)"
        warned.append(error)
    for warning in warned:
        print_error(warning, level=level)
    if args.strict and warned:
        print(f"{args.spec}: {count(len(warned), 'warning')}, an error under --strict", file=sys.stderr)
        return EXIT_USAGE
    console = _console()
    rows, total = [], 0
    for name in spec.backends:
        backend = available_backends()[name]
        # a limit backend computes one run per point of the variables other than width
        runs = len(points) // len(spec.sweep["width"]) if backend.limit else len(points)
        rows.append((f"{name} runs", f"{runs} ({'width = inf' if backend.limit else 'every width'})"))
        total += runs
    table = Table(title=f"{spec.experiment}: {total} runs", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for row in rows:
        table.add_row(*row)
    for var in spec.sweep.variables:
        values = ", ".join(str(v) for v in var.values)
        table.add_row(var.name, f"{values}  ({len(var.values)})")
    steps = {_steps(p.spec) for p in points}
    shown = [str(s) for s in sorted(s for s in steps if s is not None)]
    if None in steps:
        shown.append("? (epochs over the data files, not found)")
    table.add_row("steps", ", ".join(shown))
    data = spec.data
    table.add_row("data", data.kind)

    def across(values: set[Any]) -> str:
        # a field that is a sweep variable takes one value per point
        return ", ".join(str(v) for v in sorted(values, key=str))

    hidden = {p.spec.network.hidden for p in points}
    layers = "1 hidden layer" if hidden == {1} else f"{across(hidden)} hidden layers"
    activation = across({p.spec.network.activation for p in points})
    kinds = across({p.spec.network.kind for p in points})
    table.add_row("network", f"{kinds}, {layers}, {activation}")
    table.add_row("scaling", across({p.spec.scaling for p in points}))
    for row in summary(resources):
        table.add_row(*row)
    console.print(table)
    console.print(f"[green]✓[/green] {args.spec} is valid")
    return EXIT_OK


def preflight(spec: Any, points: Sequence[Any], backends: Sequence[str]) -> list[SpecError]:
    """Each of ``backends`` checks that this machine can run every point
    (:meth:`mfdsl.Backend.preflight`), before anything is created.

    A point asking for what the machine lacks (``device = cuda`` where torch sees no
    GPU) raises its ``SpecError``, located at the option.  A backend whose dependencies
    are missing is returned as a warning (``mfdsl run`` skips it, or stops when it was
    asked for with ``--backend``, and says so itself); names of no installed backend
    are left to the runner too.
    """
    from ._errors import SpecWarning
    from ._plugins import BackendUnavailable, available_backends

    installed = available_backends()
    warnings: list[SpecError] = []
    for name in dict.fromkeys(backends):
        if name not in installed:
            continue
        backend = installed[name]()
        try:
            for point in points:
                backend.preflight(point.spec)
        except BackendUnavailable as error:
            warning = SpecWarning(
                f"backend '{name}' cannot run on this machine: {error}; 'mfdsl run' skips it"
            )
            warnings.append(warning.located(spec.path, spec.source))
        except SpecError as error:
            raise error.located(spec.path, spec.source) from None
    return warnings


def check_data_files(spec: Any, points: Sequence[Any]) -> bool:
    """Check every file of the image datasets the sweep reads, once per dataset
    (:func:`mfdsl._datasets.load_labels`: headers against sizes, without keeping the
    images).  Returns whether they are all there; a file that is there but unusable
    raises a ``SpecError`` at the data block's ``root``, saying what is wrong with which
    file and how to fix it."""
    from ._data import DataError
    from ._datasets import DamagedData, MissingData, load_labels
    from ._ir import ImageData

    seen: set[tuple[str, str]] = set()
    present = True
    for point in points:
        data = point.spec.data
        if not isinstance(data, ImageData):
            return present  # the data's kind cannot change from point to point
        key = (str(data.kind), str(data.root))
        if key in seen:
            continue
        seen.add(key)
        try:
            load_labels(*key)
        except MissingData:
            present = False  # check_data says which files, and where to get them
        except DamagedData as error:
            raise SpecError(error.problem, data.where("root"), hint=error.fix).located(
                spec.path, spec.source
            ) from None
        except DataError as error:
            raise SpecError(str(error), data.where("kind")).located(spec.path, spec.source) from None
    return present


def _steps(spec: Any) -> int | None:
    """The steps of a sweep point (``None`` when they count the examples of image data
    whose files are missing: ``epochs`` over ``train = all``)."""
    from ._compile import total_steps
    from ._data import DataError

    try:
        return total_steps(spec)
    except DataError:
        return None


def _show(args: argparse.Namespace) -> int:
    from ._api import to_yaml

    sys.stdout.write(to_yaml(_load(args)))
    return EXIT_OK


def _fmt(args: argparse.Namespace) -> int:
    from ._fmt import format_source, write_formatted
    from ._syntax import read_source

    status = EXIT_OK
    for path in args.specs:
        source = read_source(path)
        formatted = format_source(source, path)
        if args.check:
            if formatted != source:
                _console(stderr=True).print(f"{path} would be reformatted")
                status = EXIT_FAILED
        elif args.write:
            if formatted != source:
                write_formatted(path, formatted)  # through a symbolic link to its target
        else:
            sys.stdout.write(formatted)
    return status


def _run(args: argparse.Namespace) -> int:
    from ._estimate import check_machine, confirm_runs, estimate
    from ._expand import check_data, expand, spec_warnings
    from ._runner import run_command

    spec = _load(args)
    if args.output and not _reachable(args.output):
        return EXIT_USAGE
    # Once, here, rather than in every worker, and before anything is created: the
    # sweep's size and memory (refused by arithmetic, before any point's data is looked
    # at), the data files, and whether this machine can run each backend (a missing one
    # is the runner's to skip or refuse, so its warning is left to it).
    points = list(expand(spec))
    remote = bool(args.scheduler) and args.scheduler != "local"
    workers = 0 if remote else (args.workers if args.workers and args.workers > 0 else None)
    resources = estimate(spec, points, args.backend or spec.backends, workers=workers)
    for warning in check_machine(resources, spec, force=args.force):
        print_error(warning, level="warning")
    if not confirm_runs(resources.runs, spec, yes=args.yes, ask=_ask if _interactive() else None):
        _console(stderr=True).print("not started")
        return EXIT_FAILED
    for warning in spec_warnings(spec, points):
        print_error(warning, level="warning")
    check_data_files(spec, points)
    check_data(spec, points)
    preflight(spec, points, args.backend or spec.backends)
    return run_command(args, spec)


def _reachable(location: str) -> bool:
    """Whether this machine can open the store ``location`` (a URL needs fsspec and
    its protocol's package); if not, says so on stderr."""
    from ._location import LocationError, check_reachable

    try:
        check_reachable(location)
    except (LocationError, ValueError) as error:
        _store_error(error)
        return False
    return True


def _interactive() -> bool:
    """Whether a person can answer a question: stdin and stderr are terminals."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _ask(question: str) -> bool:
    console = _console(stderr=True)
    try:
        answer = console.input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _plot(args: argparse.Namespace) -> int:
    from ._plot import PlotError, plot_store
    from ._report import StoreError

    if not _reachable(args.store):
        return EXIT_USAGE
    try:
        path = plot_store(args.store, kind=args.kind, variables=args.var, output=args.output)
    except (StoreError, PlotError) as error:
        return _store_error(error)
    _console().print(Text(path))
    return EXIT_OK


def _store_error(error: Exception) -> int:
    """A store that cannot be read: one line on stderr, exit 2."""
    _console(stderr=True).print(Text("error: ", style="bold red") + Text(str(error)))
    return EXIT_USAGE


def _report(args: argparse.Namespace) -> int:
    import json

    from ._report import StoreError, render, summarize

    if not _reachable(args.store):
        return EXIT_USAGE

    try:
        summary = summarize(args.store)
    except StoreError as error:
        return _store_error(error)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    else:
        render(summary, _console())
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from ._verify import NotAStore, render, verify

    if not _reachable(args.store):
        return EXIT_USAGE
    try:
        report = verify(args.store)
    except NotAStore as error:
        return _store_error(error)
    render(report, _console())
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
