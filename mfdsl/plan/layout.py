"""The sweep's layout in a store: one task per (backend, sweep point), the store's
coordinates and variables that hold them all, and how a run's records are placed on the
store's shared dimensions.  The runner writes by it and ``mfdsl verify`` checks by it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mfdsl.language import ir
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import ObservablePlan, RunPlan

if TYPE_CHECKING:
    from mfdsl.core.plugins import Backend
    from mfdsl.language.expand import Point


@dataclass(frozen=True, kw_only=True)
class VariableSpec:
    """A recorded variable: its dimensions after ``step`` (e.g. ``("probe",)``), a CF
    ``long_name`` and ``units`` (``"1"`` when dimensionless)."""

    name: str
    dims: tuple[str, ...] = ()
    long_name: str
    units: str = "1"


#: each observable's ``long_name`` (:data:`mfdsl.language.ir.OBSERVABLE_KINDS`)
LONG_NAMES = {name: kind.long_name for name, kind in ir.OBSERVABLE_KINDS.items()}
PARTICLE_COMPONENTS = ("w_in_1", "w_in_2", "w_in_norm", "w_out")
#: the observables recorded per layer (stored along the ``layer`` dimension)
LAYERED = tuple(name for name, kind in ir.OBSERVABLE_KINDS.items() if kind.per_layer)


@dataclass(frozen=True, kw_only=True)
class Task:
    """One run: a backend at one sweep point, and where it lands in the store."""

    key: str
    backend: str
    plan: RunPlan
    index: Mapping[str, int]  # position along each store sweep dimension
    layer_positions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The store's shape: sweep coordinates, steps, time, variables, extra coords."""

    sweep: dict[str, list[Any]]
    steps: np.ndarray
    time: tuple[tuple[str, ...], np.ndarray]
    variables: list[Any]
    extra: dict[str, np.ndarray]


def plan_tasks(
    spec: ir.Spec,
    points: Sequence[Point],
    backends: Sequence[Backend],
    *,
    room_for: Sequence[Backend] = (),
) -> tuple[Layout, list[Task]]:
    """Every task of the sweep for ``backends``, and the store layout that holds them
    all, and the runs of ``room_for`` as well (backends that other ``mfdsl run`` calls
    write into the same store: a limit backend among them needs the ``width = inf``
    cells)."""
    widths = [float(w) for w in spec.sweep["width"]]
    if any(b.limit for b in [*backends, *room_for]):
        widths.append(math.inf)
    sweep: dict[str, list[Any]] = {"width": widths}
    for var in spec.sweep.variables:
        if var.name != "width":
            sweep[var.name] = [_coord(v) for v in var.values]

    tasks: list[Task] = []
    for backend in backends:
        for point in points:
            if backend.limit and point.index[0] != 0:
                continue  # one limit per (seed, other variables), not one per width
            coords = dict(point.coords)
            index = dict(zip(sweep_dims(spec), point.index, strict=True))
            if backend.limit:
                coords["width"] = math.inf
                index["width"] = len(widths) - 1
            plan = compile_point(point.spec, coords, backend.name)
            if backend.limit:
                plan = _as_limit(plan)
            key = f"{backend.name}:" + ",".join(f"{k}={v}" for k, v in coords.items())
            tasks.append(Task(key=key, backend=backend.name, plan=plan, index=index))

    steps = np.unique(np.concatenate([t.plan.record_steps for t in tasks]))
    lrs = {t.plan.optimizer.lr for t in tasks}
    if len(lrs) == 1:
        time_coord: tuple[tuple[str, ...], np.ndarray] = (("step",), lrs.pop() * steps.astype(np.float64))
    else:
        # time spans the sweep dimensions the learning rate varies over (docs/store.md)
        lr = np.full([len(v) for v in sweep.values()], np.nan)
        for t in tasks:
            lr[tuple(t.index[d] for d in sweep)] = t.plan.optimizer.lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: cells no task fills
            varies = [
                not np.array_equal(np.nanmin(lr, axis=axis), np.nanmax(lr, axis=axis), equal_nan=True)
                for axis in range(lr.ndim)
            ]
            drop = tuple(axis for axis in range(lr.ndim) if not varies[axis])
            lr = np.nanmax(lr, axis=drop) if drop else lr
        lr_dims = tuple(d for d, v in zip(sweep, varies, strict=True) if v)
        time_coord = ((*lr_dims, "step"), lr[..., None] * steps.astype(np.float64))

    names: dict[str, ir.Observable | None] = {}
    layers: set[int] = set()
    probes, sample, outputs = 0, 0, 1
    for t in tasks:
        outputs = max(outputs, t.plan.layers[-1].fan_out)
        for obs in t.plan.observables:
            names.setdefault(obs.name, None)
            if obs.name in LAYERED:
                layers.update(obs.layers)
            probes = max(probes, obs.probes if obs.name == "output" else 0)
            sample = max(sample, obs.sample)
    extra: dict[str, np.ndarray] = {}
    variables = []
    for name in names:
        dims: tuple[str, ...] = ()
        if name == "output":
            dims = ("probe", "unit") if outputs > 1 else ("probe",)
            extra["probe"] = np.arange(probes, dtype=np.int64)
            if outputs > 1:
                extra["unit"] = np.arange(outputs, dtype=np.int64)
        elif name in LAYERED:
            dims = ("layer",)
        elif name == "particles":
            dims = ("particle", "component")
            extra["particle"] = np.arange(sample, dtype=np.int64)
            extra["component"] = np.array(PARTICLE_COMPONENTS, dtype=object)
        variables.append(VariableSpec(name=name, dims=dims, long_name=LONG_NAMES[name], units="1"))
    if layers:
        extra["layer"] = np.array(sorted(layers), dtype=np.int64)
    return Layout(sweep=sweep, steps=steps, time=time_coord, variables=variables, extra=extra), tasks


def sweep_dims(spec: ir.Spec) -> list[str]:
    return [v.name for v in spec.sweep.variables]


def _coord(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _as_limit(plan: RunPlan) -> RunPlan:
    return dataclasses.replace(plan, width=math.inf)


def place(
    plan: RunPlan,
    records: dict[str, np.ndarray],
    layer_coord: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Records reshaped onto the store's shared extra dimensions: ``layer`` by
    coordinate; ``probe``, ``particle`` (which may be longer in the store when the
    sweep varies ``probes`` or ``sample``) padded with NaN."""
    out = dict(records)
    for obs in plan.observables:
        if obs.name not in out:
            continue
        rec = np.asarray(out[obs.name], dtype=np.float64)
        if obs.name in LAYERED:
            placed = np.full((rec.shape[0], len(layer_coord)), np.nan)
            for j, layer in enumerate(obs.layers):
                placed[:, list(layer_coord).index(layer)] = rec[:, j]
            out[obs.name] = placed
        elif obs.name in shapes and rec.ndim == 1 + len(shapes[obs.name]):
            shape = shapes[obs.name]
            if rec.shape[1:] != shape and all(a <= b for a, b in zip(rec.shape[1:], shape, strict=True)):
                placed = np.full((rec.shape[0], *shape), np.nan)
                placed[(slice(None), *(slice(0, n) for n in rec.shape[1:]))] = rec
                out[obs.name] = placed
    return out


def cost(plan: RunPlan) -> float:
    """A run's rough cost, steps × batch × weights, to schedule the longest first."""
    if not math.isfinite(plan.width):
        return math.inf  # a limit run is usually the longest: start it first
    params = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
    return float(plan.steps) * float(plan.batch) * params


def record_arrays(
    observables: Sequence[ObservablePlan],
    count: int,
    *,
    probes: int,
    outputs: int,
    layers: Mapping[str, Sequence[int]],
    particles: int,
) -> dict[str, np.ndarray]:
    """A run's records before it starts: for each observable, ``count`` records of NaN
    in its shape — scalars; ``output`` per probe (and unit when ``outputs > 1``); a
    layered observable (:data:`LAYERED`) per layer of ``layers[name]``; ``particles``
    as ``(particles, 4)`` (:data:`PARTICLE_COMPONENTS`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for o in observables:
        if o.name in ("train_loss", "test_loss", "test_accuracy"):
            shapes[o.name] = ()
        elif o.name == "output":
            shapes[o.name] = (probes,) if outputs == 1 else (probes, outputs)
        elif o.name in LAYERED:
            shapes[o.name] = (len(layers[o.name]),)
        elif o.name == "particles":
            shapes[o.name] = (particles, len(PARTICLE_COMPONENTS))
        else:
            raise ValueError(f"unknown observable {o.name!r}")
    return {name: np.full((count, *shape), np.nan) for name, shape in shapes.items()}
