"""The checks ``mfdsl check`` (and ``mfdsl run``, before it creates anything) makes of a
whole sweep: every point expanded and checked by each listed backend, the real data
files present and large enough, and the warnings — unused sweep variables, over-sampled
particles, and the science checks of :mod:`mfdsl.plan.diagnose`."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from mfdsl.core.errors import SpecError, SpecWarning, combined
from mfdsl.core.plugins import available_backends
from mfdsl.language import expr as ex
from mfdsl.language import ir
from mfdsl.language.expand import Point, _points, check_size, expand


def check_all(spec: ir.Spec) -> list[Point]:
    """Expand every point (validating each) and let each listed backend check the spec.

    Every independent error is raised (a :class:`~mfdsl.core.errors.SpecErrors` when there
    are several, in source order): each place of the spec that is wrong at some sweep
    points is reported once, at the first point where it is."""
    check_size(spec)
    found: dict[tuple[Any, ...], SpecError] = {}

    def keep(error: SpecError) -> None:
        span = error.span
        where = (span.path or "", span.line, span.column) if span is not None else ("~", 0, 0)
        found.setdefault(where, error)

    points = list(_points(spec, keep))
    backends = available_backends()
    for name in spec.backends:
        backend = backends[name]()
        for point in points:
            try:
                backend.check(point.spec)
            except SpecError as error:
                keep(error)
    if found:
        # (``--set`` arguments first, then the file by line and column, errors of no place last)
        ordered = [found[k] for k in sorted(found, key=lambda k: (k[0] != "--set", k[0] == "~", k[1], k[2]))]
        raise combined(ordered).located(spec.path, spec.source)
    return points


def check_data(spec: ir.Spec, points: Iterable[Point] | None = None) -> None:
    """Make sure the real datasets the sweep reads are there, before any run starts:
    the label files of each distinct image data block are read (once), which also sizes
    ``train = all`` and ``test = all`` for the chosen classes.  A missing or unreadable
    file, or a subset larger than the data holds, is a :class:`SpecError` naming the
    files expected and where to get them; so is asking ``output`` or ``neuron_spread``
    for more probes than the test set of those classes holds."""
    from mfdsl.core.errors import DataError
    from mfdsl.data.make import image_sizes

    seen: set[tuple[Any, ...]] = set()
    for point in expand(spec) if points is None else points:
        data = point.spec.data
        if not isinstance(data, ir.ImageData):
            return  # the data's kind cannot change from point to point
        observables = point.spec.record.observables if point.spec.record is not None else ()
        key = (
            data.kind,
            data.root,
            data.classes,
            data.train,
            data.test,
            tuple(o.probes for o in observables),
        )
        if key in seen:
            continue
        seen.add(key)
        try:
            n_test = image_sizes(data)[1]
        except DataError as error:
            text = str(error)
            field = "train" if " train images" in text else "test" if " test images" in text else "root"
            message, found, rest = text.partition(" Expected ")
            raise SpecError(
                message.rstrip("."), data.where(field), hint=f"expected {rest}" if found else None
            ).located(spec.path, spec.source) from None
        for obs in observables:
            if obs.probes is not None and obs.probes > n_test:
                raise SpecError(
                    f"{obs.name} asks for {obs.probes} probe inputs, but the test set of classes "
                    f"{list(data.classes)} has only {n_test} points",
                    obs.where("probes"),
                    hint=f"the probes are the first test points: use at most {n_test}",
                ).located(spec.path, spec.source)


#: sweep variables that seed the data (and Langevin noise) and the initialisation apart
#: from ``seed`` (:attr:`mfdsl.plan.types.RunPlan.data_seed`): used by every run
SEEDS_APART = ("data_seed", "init_seed")
#: a width sweep of this many consecutive integers (``64..1024``) is warned about
LONG_WIDTH_RANGE = 16
#: and a sweep of any other variable but ``seed`` of this many
LONG_RANGE = 100


def _long_ranges(spec: ir.Spec) -> list[SpecWarning]:
    """A sweep variable written as a long range of consecutive integers where a few
    spread values were likely meant: ``width = 64..1024`` is 961 widths."""
    out = []
    for var in spec.sweep.variables:
        values = var.values
        limit = LONG_WIDTH_RANGE if var.name == "width" else LONG_RANGE
        if var.name == "seed" or len(values) < limit:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            continue
        if any(b - a != 1 for a, b in itertools.pairwise(values)):
            continue
        lo, hi = values[0], values[-1]
        steps = max(2, round(math.log2(hi / lo)) + 1) if lo > 0 else 5
        suggestion = f"geom({lo}, {hi}, {steps})" if lo > 0 else f"[{lo}, …, {hi}]"
        out.append(
            SpecWarning(
                f"'{var.name}' is {len(values)} values, every integer from {lo} to {hi}: "
                f"{len(values)} times the runs of one value",
                var.where("values"),
                hint=f"for values spread over the range, a geometric range: {var.name} = {suggestion}"
                + (" (64, 128, 256, …)" if var.name == "width" and lo > 0 else ""),
            )
        )
    return out


def spec_warnings(spec: ir.Spec, points: Iterable[Point] | None = None) -> list[SpecWarning]:
    """What is allowed but probably a mistake: a sweep variable that nothing uses (its
    values only repeat the same runs), ``particles`` sampling more neurons than the
    widest network has, and the science checks of :mod:`mfdsl.plan.diagnose` (a limit that
    cannot move, a homogeneous network on norm-separated classes, degenerate middle
    layers); ``points`` are the spec's expanded points, when the caller has them."""
    from mfdsl.plan.diagnose import diagnose

    out: list[SpecWarning] = []
    used = _used_names(spec)
    for var in spec.sweep.variables:
        if var.name in ("width", "seed", *SEEDS_APART) or var.name in used:
            continue
        repeats = f": its {len(var.values)} values repeat the same runs" if len(var.values) > 1 else ""
        out.append(
            SpecWarning(
                f"sweep variable '{var.name}' is never used{repeats}",
                var.where("name"),
                hint=f"use it in an expression (e.g. lr = 0.1 * {var.name}) or remove it from the sweep",
            )
        )
    out += _long_ranges(spec)
    widest = max(int(w) for w in spec.sweep["width"])
    for obs in spec.record.observables if spec.record is not None else ():
        if obs.name == "particles" and isinstance(obs.sample, int) and obs.sample > widest:
            out.append(
                SpecWarning(
                    f"particles samples {obs.sample} neurons, but the widest network has {widest}: "
                    "the rows beyond a network's width are NaN",
                    obs.where("sample"),
                    hint=f"sample = {widest} or fewer records every neuron of the widest network",
                )
            )
    for warning in out:
        warning.located(spec.path, spec.source)
    return out + diagnose(spec, expand(spec) if points is None else points)


def _used_names(spec: ir.Spec) -> set[str]:
    """Every name the spec's expressions refer to (in the blocks of listed backends)."""
    found: set[str] = set()
    nodes: list[Any] = [spec.data, spec.network, spec.init, spec.train, spec.record]
    nodes += [o for o in spec.backend_options if o.backend in spec.backends]
    if ir.is_expr(spec.scaling):
        found.update(n.id for n in ex.names(spec.scaling))
    while nodes:
        node = nodes.pop()
        if isinstance(node, tuple):
            nodes.extend(node)
        elif ir.is_expr(node):
            found.update(n.id for n in ex.names(node))
        elif isinstance(node, ir.Node):
            nodes.extend(
                getattr(node, f.name) for f in dataclasses.fields(node) if f.name not in ("span", "spans")
            )
    return found


def preflight(spec: ir.Spec, points: Sequence[Point], backends: Sequence[str]) -> list[SpecError]:
    """Each of ``backends`` checks that this machine can run every point
    (:meth:`mfdsl.Backend.preflight`), before anything is created.

    A point asking for what the machine lacks (``device = cuda`` where torch sees no
    GPU) raises its ``SpecError``, located at the option.  A backend whose dependencies
    are missing is returned as a warning (``mfdsl run`` skips it, or stops when it was
    asked for with ``--backend``, and says so itself); names of no installed backend
    are left to the runner too.
    """
    from mfdsl.core.errors import SpecWarning
    from mfdsl.core.plugins import BackendUnavailable, available_backends

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


def check_data_files(spec: ir.Spec, points: Sequence[Point]) -> bool:
    """Check every file of the image datasets the sweep reads, once per dataset
    (:func:`mfdsl.data.images.load_labels`: headers against sizes, without keeping the
    images).  Returns whether they are all there; a file that is there but unusable
    raises a ``SpecError`` at the data block's ``root``, saying what is wrong with which
    file and how to fix it."""
    from mfdsl.core.errors import DataError
    from mfdsl.data.images import DamagedData, MissingData, load_labels
    from mfdsl.language.ir import ImageData

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
