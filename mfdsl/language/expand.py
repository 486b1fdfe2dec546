"""Sweep expansion: one concrete, validated spec per combination of sweep values."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mfdsl.core.errors import SpecError
from mfdsl.core.plugins import available_backends
from mfdsl.language import expr as ex
from mfdsl.language import ir as ir
from mfdsl.language.latent import LatentFunction, bind, fold


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


def _points(spec: ir.Spec, on_error: Callable[[SpecError], None] | None = None) -> Iterator[Point]:
    """The points; an invalid one raises, or with ``on_error`` is handed to it and
    left out."""
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
            if on_error is None:
                raise error.located(spec.path, spec.source) from None
            on_error(error)
            continue
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
            if opt is not None and isinstance(opt.kind, LatentFunction):
                # a function of the latent coordinates: only the sweep point's variables bind
                changes[f.name] = fold(bind(value, env))
                continue
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
