"""The ``mfdsl`` command line: check, show, fmt, run, plot, report, verify, lsp.

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

from mfdsl.core.errors import SpecError, SpecErrors, count, errors_of
from mfdsl.core.resources import MEMORY_ENV
from mfdsl.plan.estimate import CONFIRM_RUNS

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


def print_errors(error: SpecError, console: Console | None = None) -> None:
    """Every error ``error`` stands for (several, for a :class:`SpecErrors`), then how
    many there are when there is more than one."""
    console = console or _console(stderr=True)
    for one in errors_of(error):
        print_error(one, console)
    if isinstance(error, SpecErrors):
        total = len(error.errors) + error.omitted
        shown = f" (the first {len(error.errors)} shown)" if error.omitted else ""
        console.print(Text(f"{count(total, 'error')}{shown}", style="bold red"))


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
    from mfdsl.core.version import __version__

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
        description="Print a .mf spec in canonical format, keeping comments (--from-yaml: a YAML spec as .mf).",
    )
    fmt.add_argument("specs", nargs="+", metavar="spec", help="the .mf spec files")
    group = fmt.add_mutually_exclusive_group()
    group.add_argument(
        "--check", action="store_true", help="exit 1 if the file is not formatted; change nothing"
    )
    group.add_argument("--write", action="store_true", help="rewrite the file in place")
    group.add_argument(
        "--from-yaml",
        action="store_true",
        help="read YAML specs and print each as a .mf spec (YAML comments are not carried over), "
        "e.g. mfdsl fmt --from-yaml spec.yaml > spec.mf",
    )

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
        "--extend",
        action="store_true",
        help="grow an existing store by the new values of its sweep variables (more seeds, widths, "
        "learning rates): train only the new runs (and any unfinished), keep every finished one; "
        "anything else that changed is refused",
    )
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
        help="draw a store's curves, width convergence, particles, learning-rate transfer or coordinate check",
        description="Draw figures of a results store (needs matplotlib: pip install 'mfdsl[plot]').",
    )
    plot.add_argument("store", help="the zarr store written by 'mfdsl run'")
    plot.add_argument(
        "--kind",
        choices=("curves", "convergence", "particles", "transfer", "coord"),
        default="curves",
        help="curves: variables against time, a line per width (default); convergence: distance to the limit against width, log-log, with the fitted slope; particles: the sampled neurons at the first, middle and last record; transfer: final (or --best) loss against the swept learning rate, a curve per width, each optimum marked (muP's transfer plot); coord: preactivation_rms of each layer against width at a few steps, log-log (mup's coordinate check)",
    )
    plot.add_argument(
        "--var",
        action="append",
        metavar="NAME",
        help="plot only this variable, e.g. test_loss or weight_change[layer=1] (repeatable; default: every scalar variable; transfer: the one variable, default test_loss)",
    )
    plot.add_argument(
        "--row",
        metavar="VAR",
        help="a row of panels per value of this sweep variable, seed included (default: panels wrap into a near-square grid)",
    )
    plot.add_argument("--col", metavar="VAR", help="a column of panels per value of this sweep variable")
    plot.add_argument(
        "--x",
        metavar="VAR",
        help="transfer: the sweep variable on the x axis (default: the one the learning rate varies with)",
    )
    plot.add_argument(
        "--best",
        action="store_true",
        help="transfer: each run's best value over its records instead of its final one",
    )
    plot.add_argument(
        "--step",
        action="append",
        type=int,
        metavar="N",
        help="coord: draw this record step (repeatable; default: step 0 and up to 3 more, spread geometrically)",
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

    sub.add_parser(
        "lsp",
        help="run the language server for editors (stdio)",
        description="Serve the Language Server Protocol on stdin and stdout for an editor: the "
        "diagnostics of 'mfdsl check' as you type, completion of blocks, keys and values, and hover "
        "documentation. Needs pygls: pip install 'mfdsl[lsp]'. Setup for VS Code and Neovim: docs/editors.md.",
    )
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
            "lsp": _lsp,
        }[args.command]
        return handler(args)
    except SpecError as error:
        print_errors(error)
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
    from mfdsl.language.load import load

    return load(args.spec, overrides=args.overrides)


def _check(args: argparse.Namespace) -> int:
    from mfdsl.core.plugins import available_backends
    from mfdsl.execution.runner import default_store
    from mfdsl.plan.check import check_all, check_data, check_data_files, preflight, spec_warnings
    from mfdsl.plan.estimate import check_disk, check_machine, duration, estimate, rough_seconds, summary

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
    seconds = rough_seconds(points, spec.backends, resources.workers)
    if seconds is not None:
        workers = f"{resources.workers} worker{'s' * (resources.workers != 1)}"
        table.add_row("time", f"roughly {duration(seconds)} with {workers} (an order of magnitude)")
    console.print(table)
    console.print(f"[green]✓[/green] {args.spec} is valid")
    return EXIT_OK


def _steps(spec: Any) -> int | None:
    """The steps of a sweep point (``None`` when they count the examples of image data
    whose files are missing: ``epochs`` over ``train = all``)."""
    from mfdsl.core.errors import DataError
    from mfdsl.plan.compile import total_steps

    try:
        return total_steps(spec)
    except DataError:
        return None


def _show(args: argparse.Namespace) -> int:
    from mfdsl.language.load import to_yaml

    sys.stdout.write(to_yaml(_load(args)))
    return EXIT_OK


def _fmt(args: argparse.Namespace) -> int:
    from mfdsl.language.fmt import format_module, format_source, write_formatted
    from mfdsl.language.load import YAML_SUFFIXES, yaml_to_module
    from mfdsl.language.syntax import read_source

    status = EXIT_OK
    for path in args.specs:
        if args.from_yaml:
            sys.stdout.write(format_module(yaml_to_module(read_source(path), path)))
            continue
        if path.endswith(YAML_SUFFIXES):
            raise SpecError(
                "'mfdsl fmt' formats .mf specs, and this is a YAML spec",
                path=path,
                hint=f"'mfdsl fmt --from-yaml {path}' prints it as a .mf spec; a YAML spec is checked and "
                "run as it is (mfdsl check, mfdsl run)",
            )
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
    from mfdsl.analysis.report import print_summary
    from mfdsl.api import prepare_run
    from mfdsl.execution.runner import run_command
    from mfdsl.language.expand import expand

    if args.workers is not None and args.workers < 1:
        _console(stderr=True).print(
            Text("error: ", style="bold red")
            + Text(
                f"--workers takes a number of worker processes of at least 1 (got {args.workers}); "
                "leave it out to use every usable core"
            )
        )
        return EXIT_USAGE
    spec = _load(args)
    if args.output and not _reachable(args.output):
        return EXIT_USAGE
    points = list(expand(spec))
    remote = bool(args.scheduler) and args.scheduler != "local"
    workers = args.workers if args.workers and args.workers > 0 else None
    ready = prepare_run(
        spec,
        points,
        args.backend,
        workers=workers,
        remote=remote,
        force=args.force,
        yes=args.yes,
        warn=lambda warning: print_error(warning, level="warning"),
        ask=_ask if _interactive() else None,
    )
    if not ready:
        _console(stderr=True).print("not started")
        return EXIT_FAILED
    args.summary = print_summary
    return run_command(args, spec)


def _reachable(location: str) -> bool:
    """Whether this machine can open the store ``location`` (a URL needs fsspec and
    its protocol's package); if not, says so on stderr."""
    from mfdsl.core.location import LocationError, check_reachable

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
    from mfdsl.analysis.plot import PlotError, plot_store
    from mfdsl.analysis.report import StoreError

    if not _reachable(args.store):
        return EXIT_USAGE
    try:
        path = plot_store(
            args.store,
            kind=args.kind,
            variables=args.var,
            output=args.output,
            row=args.row,
            col=args.col,
            x=args.x,
            best=args.best,
            steps=args.step,
        )
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

    from mfdsl.analysis.report import StoreError, render, summarize

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
    from mfdsl.store.verify import NotAStore, render, verify

    if not _reachable(args.store):
        return EXIT_USAGE
    try:
        report = verify(args.store)
    except NotAStore as error:
        return _store_error(error)
    render(report, _console())
    return EXIT_OK if report.ok else EXIT_FAILED


def _lsp(args: argparse.Namespace) -> int:
    try:
        import pygls  # noqa: F401
    except ImportError:
        _console(stderr=True).print(
            Text("error: ", style="bold red")
            + Text("'mfdsl lsp' needs pygls, which is not installed: pip install 'mfdsl[lsp]'")
        )
        return EXIT_USAGE
    from mfdsl.lsp import serve

    serve()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
