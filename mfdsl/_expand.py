"""Sweep expansion: one concrete, validated spec per combination of sweep values."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import _expr as ex
from . import _ir as ir
from ._errors import SpecError, SpecWarning
from ._plugins import available_backends


@dataclass(frozen=True, kw_only=True)
class Point:
    """One sweep point: its position along each sweep dimension, its coordinates, and
    the spec with every expression evaluated there."""

    index: tuple[int, ...]
    coords: Mapping[str, Any]
    spec: ir.Spec

    @property
    def width(self) -> int:
        return int(self.coords["width"])

    @property
    def seed(self) -> int:
        return int(self.coords["seed"])


#: the most points a sweep may have: expanding costs ~0.1 ms and ~1.5 kB a point, and
#: every point is a training run and a cell of the store (docs/language.md, "Limits")
MAX_POINTS = 100_000


def size(spec: ir.Spec) -> int:
    """The number of sweep points (the product of the variables' lengths: instant,
    however large)."""
    total = 1
    for var in spec.sweep.variables:
        total *= len(var.values)
    return total


def check_size(spec: ir.Spec) -> int:
    """The number of sweep points, after refusing a sweep of more than
    :data:`MAX_POINTS` (a ``SpecError`` at the longest variable's values) before
    anything is expanded."""
    total = size(spec)
    if total <= MAX_POINTS:
        return total
    longest = max(spec.sweep.variables, key=lambda v: len(v.values))
    shown = " × ".join(f"{len(v.values)} {v.name}" for v in spec.sweep.variables if len(v.values) > 1)
    raise SpecError(
        f"the sweep has {total:,} points ({shown}), more than the {MAX_POINTS:,} a sweep may have",
        longest.where("values"),
        hint="sweep fewer values, or split the sweep into several specs (each a store of its own)",
    ).located(spec.path, spec.source)


def expand(spec: ir.Spec) -> Iterator[Point]:
    """Every sweep point in order (``width`` slowest, then ``seed``, then the other
    variables as written); raise :class:`SpecError` at the first invalid one.  A sweep
    of more than :data:`MAX_POINTS` points is refused at once (:func:`check_size`)."""
    check_size(spec)
    return _points(spec)


def _points(spec: ir.Spec) -> Iterator[Point]:
    variables = spec.sweep.variables
    names = [v.name for v in variables]
    for combo in itertools.product(*(list(enumerate(v.values)) for v in variables)):
        index = tuple(i for i, _ in combo)
        coords = {name: value for name, (_, value) in zip(names, combo, strict=True)}
        try:
            concrete = resolve(spec, coords)
        except SpecError as error:
            shown = ", ".join(f"{k} = {ex.describe(v)}" for k, v in coords.items())
            error.message = f"{error.message} (at sweep point {shown})"
            raise error.located(spec.path, spec.source) from None
        yield Point(index=index, coords=dict(coords), spec=concrete)


def resolve(spec: ir.Spec, coords: Mapping[str, Any]) -> ir.Spec:
    """The spec with every expression evaluated at the sweep point ``coords``."""
    env = dict(coords)
    dim = ir.data_dim(spec.data)
    if ir.is_expr(dim):
        env["dim"] = ex.evaluate(dim, env)
    else:
        env["dim"] = dim
    data = _resolve(spec.data, env)
    env["dim"] = ir.data_dim(data)
    changes: dict[str, Any] = {"data": data}
    for name in ("network", "init", "train", "record"):
        node = getattr(spec, name)
        if node is not None:
            changes[name] = _resolve(node, env)
    if ir.is_expr(spec.scaling):
        changes["scaling"] = ex.evaluate(spec.scaling, env, symbols=True)
    changes["backend_options"] = tuple(_options(o, env) for o in spec.backend_options)
    return dataclasses.replace(spec, **changes)


def _resolve(node: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(node, tuple):
        return tuple(_resolve(n, env) for n in node)
    if not isinstance(node, ir.Node):
        return node
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        if f.name in ("span", "spans"):
            continue
        value = getattr(node, f.name)
        if ir.is_expr(value):
            opt = f.metadata.get("option")
            changes[f.name] = ex.evaluate(value, env, symbols=bool(opt and opt.kind.symbols))
        elif isinstance(value, (ir.Node, tuple)):
            new = _resolve(value, env)
            if new is not value:
                changes[f.name] = new
    return dataclasses.replace(node, **changes) if changes else node


def _options(block: ir.BackendOptions, env: Mapping[str, Any]) -> ir.BackendOptions:
    declared = {o.name: o for o in available_backends()[block.backend].options}
    values = []
    changed = False
    for key, value in block.values:
        if ir.is_expr(value):
            kind = declared[key].kind
            value = kind.check(ex.evaluate(value, env, symbols=kind.symbols), block.where(key), key)
            changed = True
        values.append((key, value))
    return dataclasses.replace(block, values=tuple(values)) if changed else block


def check_all(spec: ir.Spec) -> list[Point]:
    """Expand every point (validating each) and let each listed backend check the spec."""
    points = list(expand(spec))
    backends = available_backends()
    for name in spec.backends:
        backend = backends[name]()
        for point in points:
            try:
                backend.check(point.spec)
            except SpecError as error:
                raise error.located(spec.path, spec.source) from None
    return points


def check_data(spec: ir.Spec, points: Iterable[Point] | None = None) -> None:
    """Make sure the real datasets the sweep reads are there, before any run starts:
    the label files of each distinct image data block are read (once), which also sizes
    ``train = all`` and ``test = all`` for the chosen classes.  A missing or unreadable
    file, or a subset larger than the data holds, is a :class:`SpecError` naming the
    files expected and where to get them; so is asking ``output`` or ``neuron_spread``
    for more probes than the test set of those classes holds."""
    from ._data import DataError, image_sizes

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
#: from ``seed`` (:attr:`mfdsl._plan.RunPlan.data_seed`): used by every run
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
    widest network has, and the science checks of :mod:`mfdsl._diagnose` (a limit that
    cannot move, a homogeneous network on norm-separated classes, degenerate middle
    layers); ``points`` are the spec's expanded points, when the caller has them."""
    from ._diagnose import diagnose

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
