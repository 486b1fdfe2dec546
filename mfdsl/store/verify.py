"""``mfdsl verify``: does a store hold what its statuses say?

Every cell (one run: a point of the sweep) is checked against its ``status``:

* **done**: every value its run records (its observables, at its record steps, over the
  layers and probes it covers) is present and finite, and nothing else is written;
* **diverged**: a message says why, nothing is written where the run records nothing;
* **failed**: a message says why, and no data;
* **pending**: no data and no message.

Every chunk must decode (zstd's checksum catches a cut-off or damaged file), the
coordinates' included.  The stored spec must parse, and re-planning it must give the
store's shape and every coordinate's values; the root and variable attributes must be
complete.

Nothing in the store is trusted before it is read: :func:`inspect_store` reads its
layout — which variables there are, whether each one's metadata parses, whether their
shapes agree with their coordinates, whether the coordinates decode — and turns any
damage into a problem, never an exception.  ``mfdsl run --resume`` runs it too before
it adds a run (:mod:`mfdsl.execution.runner`), and :func:`check_cells` is what it uses to find
finished cells whose data did not survive (a write cut off mid-chunk), so that they
run again.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mfdsl.core import location as loc
from mfdsl.core.errors import count
from mfdsl.plan.layout import LAYERED
from mfdsl.store.status import Status

if TYPE_CHECKING:
    from mfdsl.plan.layout import Task
    from mfdsl.plan.types import RunPlan

_NAMES: dict[int, str] = {
    Status.PENDING: "pending",
    Status.DONE: "done",
    Status.FAILED: "failed",
    Status.DIVERGED: "diverged",
}
#: read a variable whole when it is at most this big; cell by cell otherwise
_WHOLE_BYTES = 256 * 2**20

#: root attributes every store written by ``mfdsl run`` has, and their types
REQUIRED_ATTRS: dict[str, type | tuple[type, ...]] = {
    "mfdsl_store_format": int,
    "created": str,
    "host": str,
    "versions": dict,
    "experiment": str,
    "spec_source": str,
    "spec_ir": str,
    "backends": list,
}


#: the variables every store has, whatever its spec records
REQUIRED_VARIABLES = ("status", "message", "step", "time", "width", "seed")
#: the losses a divergence threshold (root attribute ``diverge_above``) applies to
LOSSES = ("train_loss", "test_loss")


class NotAStore(Exception):
    """The path is no mfdsl store this version can read (exit 2, not a list of problems)."""


@dataclass
class Structure:
    """A store's layout, read without trusting any of it (:func:`inspect_store`)."""

    store: str
    attrs: dict[str, Any]
    #: every variable whose metadata reads, by name (zarr arrays)
    arrays: dict[str, Any] = field(default_factory=dict)
    #: the sweep dimensions (``status``'s), empty when they cannot be told
    dims: tuple[str, ...] = ()
    #: the values of every coordinate that decodes (1-d ones, and ``time``)
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    #: coordinates whose chunks do not decode (a checksum that fails), and why
    unreadable: dict[str, str] = field(default_factory=dict)
    #: what is wrong with the layout: missing or unreadable variables, shapes that
    #: disagree with their coordinates (each makes the store unsafe to add runs to)
    problems: list[str] = field(default_factory=list)
    #: the consolidated metadata's problem (missing, stale, unreadable), if any
    consolidated: str | None = None

    @property
    def cells_readable(self) -> bool:
        """Whether the cells can be checked: ``status``, ``message`` and ``step`` are
        there with the sweep dimensions and shapes their coordinates give."""
        return bool(self.dims) and not self._blocking

    _blocking: list[str] = field(default_factory=list)


Cell = tuple[int, ...]


@dataclass
class CellCheck:
    """The cells' statuses (``-1`` where unreadable) and each bad cell's problems."""

    status: np.ndarray
    problems: dict[Cell, list[str]] = field(default_factory=dict)
    labels: dict[Cell, str] = field(default_factory=dict)

    def add(self, cell: Cell, problem: str) -> None:
        self.problems.setdefault(cell, []).append(problem)


@dataclass
class Report:
    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---- the cells ----------------------------------------------------------------------------


def check_cells(
    store: str,
    tasks: Sequence[Task] | None,
    *,
    structure: Structure | None = None,
    coords: Mapping[str, Any] | None = None,
    diverge_above: float | None = None,
) -> CellCheck:
    """Check every cell of ``store`` against its status.

    ``tasks`` (from :func:`mfdsl.plan.layout.plan_tasks` of the store's spec) say what each
    cell's run records; without them a done cell need only hold some data.
    ``structure`` is the store's :func:`inspect_store` (read now if not given; its
    cells must be readable), ``coords`` coordinate values that replace the store's
    (the spec's, where the store's do not decode), ``diverge_above`` the store's
    divergence threshold: a done run with a loss above it is a problem.
    """
    shape_of = structure if structure is not None else inspect_store(store)
    if not shape_of.cells_readable:
        raise NotAStore(f"{store}: its cells cannot be read ({'; '.join(shape_of._blocking)})")
    dims = shape_of.dims
    status_array = shape_of.arrays["status"]
    shape = tuple(status_array.shape)
    values_of = {**shape_of.coords, **(coords or {})}
    labels: dict[str, list[Any]] = {
        d: list(np.asarray(values_of[d]).tolist()) if d in values_of else [] for d in dims
    }
    status = _read_cells(status_array, shape, np.int8)
    check = CellCheck(status=np.where(status.mask, -1, status.data).astype(np.int16))
    for cell in np.ndindex(shape):
        check.labels[cell] = ", ".join(
            f"{d}={_fmt(labels[d][i])}" if i < len(labels[d]) else f"{d}[{i}]"
            for d, i in zip(dims, cell, strict=True)
        )
        if status.mask[cell]:
            check.add(cell, f"status unreadable: {status.errors.get(cell, '?')}")
        elif int(status.data[cell]) not in _NAMES:
            check.add(cell, f"status {int(status.data[cell])} is none of {sorted(_NAMES)}")

    message = _read_cells(shape_of.arrays["message"], shape, object)
    store_steps = np.asarray(values_of["step"]) if "step" in values_of else None
    layer_coord = [int(x) for x in np.asarray(values_of["layer"]).tolist()] if "layer" in values_of else []
    variables = {
        name: array
        for name, array in sorted(shape_of.arrays.items())
        if _dims(array)[: len(dims)] == dims and _dims(array)[len(dims) : len(dims) + 1] == ("step",)
    }
    shapes = {name: tuple(arr.shape[len(dims) + 1 :]) for name, arr in variables.items()}
    if store_steps is None:
        tasks = None  # where each run's values are cannot be told: checked loosely
    by_cell = {tuple(t.index[d] for d in dims): t for t in tasks} if tasks is not None else None
    masks: dict[Cell, Expected | None] = {}
    if by_cell is not None and store_steps is not None:
        masks = {cell: expected(t.plan, store_steps, layer_coord, shapes) for cell, t in by_cell.items()}
    threshold = (
        float(diverge_above)
        if isinstance(diverge_above, (int, float)) and not isinstance(diverge_above, bool)
        else None
    )

    held: dict[Cell, list[str]] = {}  # variables holding data, per cell
    for name, array in variables.items():
        for cell, values, error in _cells(array, shape):
            state = int(check.status[cell])
            if error is not None:
                check.add(cell, f"{name}: chunk unreadable ({error})")
                continue
            assert values is not None
            present = ~np.isnan(values)
            if present.any():
                held.setdefault(cell, []).append(name)
            if state not in (Status.DONE, Status.DIVERGED):
                continue
            if state == Status.DONE and threshold is not None and name in LOSSES:
                finite = values[np.isfinite(values)]  # infinite values are reported as such
                above = int((finite > threshold).sum())
                if above:
                    check.add(
                        cell,
                        f"{name}: {count(above, 'value')} above the store's divergence threshold "
                        f"{threshold:g} (diverge_above) in a done run",
                    )
            if by_cell is None:
                if state == Status.DONE and np.isinf(values).any():
                    check.add(cell, f"{name}: infinite values in a done run")
                continue
            if cell not in by_cell:
                continue  # reported below, once
            where = masks.get(cell)
            if where is None or name not in where.allowed:
                if state == Status.DONE and store_steps is not None:
                    _lenient(check, cell, name, values, by_cell[cell].plan, store_steps)
                continue
            required, allowed = where.required[name], where.allowed[name]
            outside = present & ~allowed
            if outside.any():
                check.add(cell, f"{name}: {count(int(outside.sum()), 'value')} where the run records none")
            if state == Status.DONE:
                missing = int((required & np.isnan(values)).sum())
                infinite = int((allowed & np.isinf(values)).sum())
                what = (
                    [f"{missing} of {count(int(required.sum()), 'recorded value')} missing"]
                    if missing
                    else []
                )
                what += [f"{infinite} infinite"] if infinite else []
                if what:
                    check.add(cell, f"{name}: {'; '.join(what)}")

    for cell in np.ndindex(shape):
        state = int(check.status[cell])
        if message.mask[cell]:
            check.add(cell, f"message unreadable: {message.errors.get(cell, '?')}")
            text = ""
        else:
            text = str(message.data[cell]) if message.data[cell] is not None else ""
        names = held.get(cell, [])
        if by_cell is not None and cell not in by_cell and state != Status.PENDING and state in _NAMES:
            check.add(cell, f"{_NAMES[state]}, but no run of the spec belongs to this cell")
        if state == Status.PENDING:
            if names:
                check.add(cell, f"pending, but holds data ({', '.join(names)}): a writer stopped early?")
            if text:
                check.add(cell, "pending, but has a message")
        elif state == Status.FAILED:
            if names:
                check.add(cell, f"failed, but holds data ({', '.join(names)})")
            if not text:
                check.add(cell, "failed without a message")
        elif state == Status.DIVERGED:
            if not text:
                check.add(cell, "diverged without a message")
        elif state == Status.DONE and not names and variables:
            check.add(cell, "done, but holds no data")
    return check


def _lenient(
    check: CellCheck, cell: Cell, name: str, values: np.ndarray, plan: RunPlan, store_steps: np.ndarray
) -> None:
    """Without an exact mask: every row at the run's record steps holds a finite value."""
    if name not in {o.name for o in plan.observables}:
        if (~np.isnan(values)).any():
            check.add(cell, f"{name}: values the run does not record")
        return
    rows = np.searchsorted(store_steps, plan.record_steps)
    flat = values[rows].reshape(len(rows), -1)
    empty = int((~np.isfinite(flat)).all(axis=1).sum())
    if empty:
        check.add(
            cell,
            f"{name}: {empty} of {count(len(rows), 'record step')} {'holds' if empty == 1 else 'hold'} no finite value",
        )


@dataclass(frozen=True)
class Expected:
    """Where a run writes values, per store variable (boolean masks over ``(step,
    *extra)``): ``required`` where a done run holds a finite value, ``allowed`` where
    any run may hold one (``required`` is a part of it).  Outside ``allowed`` a store
    holds NaN: steps the run does not record, layers it does not cover, and the
    padding of records narrower than the store's dimension."""

    required: dict[str, np.ndarray]
    allowed: dict[str, np.ndarray]


def expected(
    plan: RunPlan, store_steps: np.ndarray, layer_coord: Sequence[int], shapes: Mapping[str, tuple[int, ...]]
) -> Expected | None:
    """Where a run of ``plan`` writes values, derived from the plan alone (never from the
    data); ``None`` when this cannot be told exactly.

    The padding every run of the sweep shares its store dimensions with is NaN: probes,
    outputs and particles beyond the run's own count (the sweep varies them), layers
    the run's observable does not cover, and what ``particles`` pads within its own
    record (:func:`particle_extent`)."""
    from mfdsl.plan.layout import PARTICLE_COMPONENTS
    from mfdsl.plan.layout import place as _place

    n = len(plan.record_steps)
    need: dict[str, np.ndarray] = {}
    may: dict[str, np.ndarray] = {}
    for obs in plan.observables:
        store_shape = shapes.get(obs.name)
        if store_shape is None:
            return None
        if obs.name in ("train_loss", "test_loss", "test_accuracy"):
            own: tuple[int, ...] = ()
        elif obs.name == "output":
            own = (obs.probes, plan.layers[-1].fan_out) if len(store_shape) == 2 else (obs.probes,)
        elif obs.name in LAYERED:
            own = (len(obs.layers),)
        elif obs.name == "particles":
            extent = particle_extent(plan, obs)
            if extent is None:
                return None
            rows, may_rows, second = extent
            need[obs.name] = _particle_mask(n, obs.sample, rows, second, len(PARTICLE_COMPONENTS))
            may[obs.name] = _particle_mask(n, obs.sample, may_rows, second, len(PARTICLE_COMPONENTS))
            continue
        else:
            return None
        need[obs.name] = np.ones((n, *own))
        may[obs.name] = need[obs.name]
    try:
        placed_need = _place(plan, need, layer_coord, shapes)
        placed_may = _place(plan, may, layer_coord, shapes)
    except (ValueError, IndexError):
        return None
    rows_at = np.searchsorted(store_steps, plan.record_steps)
    if np.any(rows_at >= len(store_steps)) or np.any(
        store_steps[np.minimum(rows_at, len(store_steps) - 1)] != plan.record_steps
    ):
        return None
    masks: list[dict[str, np.ndarray]] = []
    for placed in (placed_need, placed_may):
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            mask = np.zeros((len(store_steps), *shape), dtype=bool)
            if name in placed:
                finite = np.isfinite(np.asarray(placed[name]))
                if finite.shape[1:] != shape:
                    return None
                mask[rows_at] = finite
            out[name] = mask
        masks.append(out)
    return Expected(required=masks[0], allowed=masks[1])


def particle_extent(plan: RunPlan, obs: Any) -> tuple[int, int, bool] | None:
    """What ``particles`` holds in a run of ``plan``: ``(rows every run holds, rows a
    run may hold, whether the second component w_in_2 is there)``; ``None`` when the
    record's size is not fixed by the plan (``sample = 0``: every neuron).

    The language's rule (``docs/language.md``): rows beyond the layer's width, and
    ``w_in_2`` when the layer has one input, are NaN.  A network of finite width has
    ``fan_out`` neurons in the layer, fewer than ``sample`` in a narrow one.  The limit
    has infinitely many, but a limit backend holds it with finitely many particles: one
    whose ``particles`` option is below ``sample`` fills ``particles`` rows (every row
    where the layer collapses onto one particle), so the rows beyond may be NaN."""
    sample = int(obs.sample)
    if sample <= 0:
        return None
    layer = int(obs.layers[0]) if obs.layers else 1
    if not 1 <= layer < len(plan.layers):
        return None
    spec = plan.layers[layer - 1]
    if math.isfinite(plan.width):
        rows = min(sample, int(spec.fan_out))
        return rows, rows, int(spec.fan_in) >= 2
    # the limit's first layer has the data's inputs; a deeper one, infinitely many
    second = layer > 1 or int(spec.fan_in) >= 2
    particles = plan.options.get("particles")
    if isinstance(particles, int) and not isinstance(particles, bool) and 0 < particles < sample:
        return particles, sample, second
    return sample, sample, second


def _particle_mask(steps: int, sample: int, rows: int, second: bool, components: int) -> np.ndarray:
    """A ``particles`` record of ``steps`` steps: 1 where a value is, NaN elsewhere."""
    mask = np.full((steps, sample, components), np.nan)
    mask[:, :rows] = 1.0
    if not second:
        mask[:, :, 1] = np.nan
    return mask


@dataclass
class _Cells:
    data: np.ndarray
    mask: np.ndarray  # True where unreadable
    errors: dict[Cell, str]


def _read_cells(array: Any, shape: tuple[int, ...], dtype: Any) -> _Cells:
    """A variable over the sweep dims alone (status, message), cell by cell on error."""
    errors: dict[Cell, str] = {}
    try:
        data = np.asarray(array[...])
        return _Cells(data=data, mask=np.zeros(shape, dtype=bool), errors=errors)
    except Exception:  # noqa: BLE001 - a damaged chunk: find which, below
        pass
    data = np.zeros(shape, dtype=dtype)
    mask = np.zeros(shape, dtype=bool)
    for cell in np.ndindex(shape):
        try:
            data[cell] = array[cell]
        except Exception as error:  # noqa: BLE001 - any decoding error marks the cell
            mask[cell] = True
            errors[cell] = _short(error)
    return _Cells(data=data, mask=mask, errors=errors)


def _cells(array: Any, shape: tuple[int, ...]) -> Iterator[tuple[Cell, np.ndarray | None, str | None]]:
    """Each cell's block of a data variable, or the error reading it."""
    whole = None
    if math.prod(array.shape) * array.dtype.itemsize <= _WHOLE_BYTES:
        with contextlib.suppress(Exception):
            whole = np.asarray(array[...])
    for cell in np.ndindex(shape):
        if whole is not None:
            yield cell, whole[cell], None
            continue
        try:
            yield cell, np.asarray(array[cell]), None
        except Exception as error:  # noqa: BLE001 - any decoding error marks the cell
            yield cell, None, _short(error)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _dims(array: Any) -> tuple[str, ...]:
    return tuple(str(d) for d in (array.metadata.dimension_names or ()))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _data_variables(arrays: Mapping[str, Any], dims: tuple[str, ...]) -> dict[str, Any]:
    """The observables among ``arrays`` (name → zarr array): over ``dims``, then ``step``."""
    out = {}
    for name, array in sorted(arrays.items()):
        array_dims = _dims(array)
        if array_dims[: len(dims)] == dims and array_dims[len(dims) : len(dims) + 1] == ("step",):
            out[name] = array
    return out


# ---- the whole store ----------------------------------------------------------------------


def open_attrs(store: str) -> dict[str, Any]:
    """The root attributes of an mfdsl store this version reads, or :class:`NotAStore`."""
    import zarr

    from mfdsl.store.zarr import STORE_FORMAT

    if not loc.exists(store):
        raise NotAStore(f"{store}: no such store")
    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception as error:  # noqa: BLE001 - zarr raises many kinds for "not a store"
        raise NotAStore(f"{store} is not a zarr store ({type(error).__name__}: {error})") from None
    version = attrs.get("mfdsl_store_format")
    if version is None:
        raise NotAStore(f"{store} was not written by mfdsl (it has no 'mfdsl_store_format' attribute)")
    if isinstance(version, bool) or not isinstance(version, int) or version > STORE_FORMAT:
        raise NotAStore(
            f"{store} has store format {version!r}, newer than this mfdsl reads ({STORE_FORMAT}); "
            "upgrade mfdsl to read it"
        )
    return attrs


def draws_torch_noise(spec: Any) -> bool:
    """Whether a spec's runs draw Langevin noise in the torch backend (what stream layout
    3 moved: :func:`mfdsl.core.streams.same_draws`)."""
    from mfdsl.language.ir import Langevin

    return isinstance(spec.train.optimizer, Langevin) and "torch" in spec.backends


def _stored_draws_torch_noise(attrs: Mapping[str, Any]) -> bool:
    """:func:`draws_torch_noise` of the spec a store records (``True`` if it does not read back)."""
    from mfdsl.language.build import build
    from mfdsl.language.load import yaml_to_module

    try:
        return draws_torch_noise(build(yaml_to_module(str(attrs["spec_ir"]), "spec_ir")))
    except Exception:  # noqa: BLE001 - a damaged record: assume the worst
        return True


def stream_layout_mismatch(attrs: Mapping[str, Any], *, torch_noise: bool | None = None) -> str | None:
    """How a store with root attributes ``attrs`` was made with other random streams
    than this mfdsl draws for its spec (its ``stream_layout`` differs from
    :data:`mfdsl.core.streams.STREAM_LAYOUT` in a way that moves a draw of the spec —
    ``torch_noise``: whether it draws Langevin noise in the torch backend, by default
    read from the store's spec — or is missing: a store from before layouts were
    recorded), completing "the store was …"; ``None`` when they are the same.  Runs
    added to such a store would not draw what its finished runs drew: ``--resume``
    refuses it."""
    from mfdsl.core.streams import STREAM_LAYOUT, same_draws

    layout = attrs.get("stream_layout")
    if isinstance(layout, int) and not isinstance(layout, bool):
        if layout != STREAM_LAYOUT and torch_noise is None:  # the stored spec is read only when it matters
            torch_noise = _stored_draws_torch_noise(attrs)
        if same_draws(layout, torch_noise=bool(torch_noise)):
            return None
        return (
            f"written by {'a newer' if layout > STREAM_LAYOUT else 'an older'} mfdsl, whose random "
            f"streams differ (random-stream layout {layout}; this mfdsl's is {STREAM_LAYOUT})"
        )
    if layout is None:
        return (
            "written by an older mfdsl, whose random streams differ (it records no 'stream_layout'; "
            f"this mfdsl's random-stream layout is {STREAM_LAYOUT})"
        )
    return f"written with an unknown random-stream layout ({layout!r}; this mfdsl's is {STREAM_LAYOUT})"


def inspect_store(store: str, attrs: Mapping[str, Any] | None = None) -> Structure:
    """Read the layout of the mfdsl store ``store`` (:class:`NotAStore` if it is none)
    without trusting any of it: every variable's metadata, the sweep dimensions, every
    shape against its dimensions' coordinates, every coordinate's values (their
    chunks' checksums), the consolidated metadata.  Damage is a problem in the result,
    never an exception."""
    import zarr

    attrs = dict(attrs) if attrs is not None else open_attrs(store)
    out = Structure(store=store, attrs=attrs)
    try:
        group: Any = zarr.open_group(store, mode="r", use_consolidated=False)
    except Exception as error:  # noqa: BLE001 - zarr raises many kinds for "not a store"
        raise NotAStore(f"{store} is not a zarr store ({_short(error)})") from None
    broken: set[str] = set()
    try:
        members = _member_names(store)
    except OSError as error:
        raise NotAStore(f"{store}: its folder cannot be listed ({_short(error)})") from None
    for name in members:
        try:
            node = group[name]
        except Exception as error:  # noqa: BLE001 - metadata that does not parse, or none
            out.problems.append(
                f"variable '{name}': its metadata ({name}/zarr.json) cannot be read ({_short(error)})"
            )
            broken.add(name)
            continue
        if not isinstance(node, zarr.Array):
            out.problems.append(f"'{name}' is a group, not a variable")
            continue
        out.arrays[name] = node
    for name in REQUIRED_VARIABLES:
        if name not in out.arrays and name not in broken:
            out.problems.append(f"variable '{name}' is missing")

    # every dimension's length is its coordinate's; every shape must agree
    sizes: dict[str, int] = {}
    for name, array in out.arrays.items():
        if _dims(array) == (name,) and array.ndim == 1:
            sizes[name] = int(array.shape[0])
    bad_shape: set[str] = set()
    for name, array in sorted(out.arrays.items()):
        dims = _dims(array)
        if len(dims) != array.ndim:
            out.problems.append(f"variable '{name}' has no dimension names for its {array.ndim} axes")
            bad_shape.add(name)
            continue
        lost = [d for d in dims if d not in sizes]
        if lost:
            out.problems.append(
                f"variable '{name}': {'dimension' if len(lost) == 1 else 'dimensions'} "
                f"{', '.join(map(repr, lost))} {'has' if len(lost) == 1 else 'have'} no coordinate"
            )
            bad_shape.add(name)
            continue
        want = tuple(sizes[d] for d in dims)
        if tuple(array.shape) != want:
            out.problems.append(
                f"variable '{name}' has shape {tuple(array.shape)}, its dimensions' coordinates give {want}"
            )
            bad_shape.add(name)

    status = out.arrays.get("status")
    if status is not None and "status" not in bad_shape:
        dims = _dims(status)
        if dims[:2] != ("width", "seed"):
            out.problems.append(f"'status' has dimensions {dims}, not the sweep's (width, seed, …)")
            out._blocking.append("'status' is not over the sweep dimensions")
        else:
            out.dims = dims
    for name in ("status", "message", "step"):
        if name not in out.arrays or name in bad_shape:
            out._blocking.append(f"'{name}' is missing or unreadable")
    message = out.arrays.get("message")
    if out.dims and message is not None and _dims(message) != out.dims:
        out.problems.append(f"'message' has dimensions {_dims(message)}, not status's {out.dims}")
        out._blocking.append("'message' is not over the sweep dimensions")

    for name, array in sorted(out.arrays.items()):
        if (sizes.get(name) is None or _dims(array) != (name,)) and name != "time":
            continue
        if name in bad_shape:
            continue
        try:
            out.coords[name] = np.asarray(array[...])
        except Exception as error:  # noqa: BLE001 - a damaged chunk: a checksum that fails
            out.unreadable[name] = _short(error)
    out.consolidated = _consolidated_problem(store, out.arrays, broken, group)
    return out


def _member_names(store: str) -> list[str]:
    """The folders of a store: its variables (and anything else stored as a folder)."""
    from mfdsl.store.zarr import _ZARR_TEMP

    if loc.is_url(store):
        fs, root = loc._fs(store)
        entries = fs.ls(root, detail=True)
        names = [
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        ]
    else:
        with os.scandir(store) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    return sorted(n for n in names if not n.startswith(".") and not _ZARR_TEMP.match(n))


def coordinate_differences(structure: Structure, layout: Any) -> dict[str, str]:
    """The store's coordinates whose values are not what ``layout`` (the plan of the
    store's spec, :class:`mfdsl.plan.layout.Layout`) gives: name → what is wrong.  Those
    that do not decode are left to :attr:`Structure.unreadable`."""
    wanted: dict[str, Any] = {**layout.sweep, "step": layout.steps, "time": layout.time[1], **layout.extra}
    out: dict[str, str] = {}
    for name, want in wanted.items():
        if name in structure.unreadable:
            continue
        have = structure.coords.get(name)
        if have is None:
            out[name] = "is missing"
        elif not same_values(have, want):
            out[name] = "does not match"
    return out


def same_values(have: Any, want: Any) -> bool:
    """Whether two coordinates hold the same values (numbers to 1e-12, relative)."""
    a, b = np.asarray(have), np.asarray(want)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
        return bool(
            np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-12, atol=0, equal_nan=True)
        )
    return [_plain(v) for v in a.ravel().tolist()] == [_plain(v) for v in b.ravel().tolist()]


def verify(location: str | os.PathLike[str]) -> Report:
    """Check a store; :class:`NotAStore` if it is none this mfdsl reads."""
    from mfdsl.store.lock import current_owner, describe

    store = loc.normalize(location)
    attrs = open_attrs(store)
    report = Report(store=store)
    for name, kind in REQUIRED_ATTRS.items():
        if name not in attrs:
            report.problems.append(f"root attribute '{name}' is missing")
        elif not isinstance(attrs[name], kind) or isinstance(attrs[name], bool):
            report.problems.append(f"root attribute '{name}' is a {type(attrs[name]).__name__}")
    layout = attrs.get("stream_layout")
    if "stream_layout" in attrs and (isinstance(layout, bool) or not isinstance(layout, int)):
        report.problems.append(f"root attribute 'stream_layout' is a {type(layout).__name__}")
    else:
        mismatch = stream_layout_mismatch(attrs)
        if mismatch is not None:
            report.notes.append(
                f"the store was {mismatch}: its data reads as it is, but mfdsl run --resume cannot add runs to it"
            )
    threshold = attrs.get("diverge_above")
    if "diverge_above" in attrs and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0
    ):
        report.problems.append(f"root attribute 'diverge_above' is {threshold!r}, not a positive number")
        threshold = None
    if "finalized" not in attrs:
        report.notes.append("not finalized: a sweep is still writing it, or was stopped (mfdsl run --resume)")
    owner = current_owner(store)
    if owner is not None:
        report.notes.append(
            f"an mfdsl run ({describe(owner)}) holds its lock: runs in flight may show as pending with data"
        )

    structure = inspect_store(store, attrs)
    report.problems += structure.problems
    for name, why in sorted(structure.unreadable.items()):
        report.problems.append(f"coordinate '{name}' cannot be read ({why})")
    if structure.consolidated is not None:
        report.problems.append(structure.consolidated)
    for name, array in sorted(structure.arrays.items()):
        if not array.attrs.get("long_name"):
            report.problems.append(f"variable '{name}' has no 'long_name' attribute")
    if "status" in structure.arrays:
        flags: dict[str, Any] = dict(structure.arrays["status"].attrs)
        if list(flags.get("flag_values", [])) != [
            Status.PENDING,
            Status.DONE,
            Status.FAILED,
            Status.DIVERGED,
        ] or flags.get("flag_meanings") != " ".join(_NAMES.values()):
            report.problems.append("'status' lacks its flag_values/flag_meanings attributes")
    if not structure.cells_readable:
        return report

    try:
        planned, tasks = _replan(store, attrs, structure, report)
    except Exception as error:  # noqa: BLE001 - damage no check above foresaw: one problem, no traceback
        report.problems.append(f"the stored spec cannot be planned again ({_short(error)})")
        planned, tasks = None, None
    # a coordinate that does not decode is read as the spec gives it, to name the cells
    coords = {n: v for n, v in (planned or {}).items() if n in structure.unreadable}
    try:
        check = check_cells(store, tasks, structure=structure, coords=coords, diverge_above=threshold)
    except Exception as error:  # noqa: BLE001 - damage no check above foresaw: one problem, no traceback
        report.problems.append(f"the cells cannot be checked ({_short(error)})")
        return report
    for cell in sorted(check.problems):
        for problem in check.problems[cell]:
            report.problems.append(f"cell {check.labels[cell]}: {problem}")
    counts: dict[str, int] = {}
    for value in check.status.ravel():
        key = _NAMES.get(int(value), "unreadable")
        counts[key] = counts.get(key, 0) + 1
    report.counts = counts
    return report


def _consolidated_problem(store: str, arrays: Mapping[str, Any], broken: set[str], group: Any) -> str | None:
    """What is wrong with the consolidated metadata (what xarray reads), or ``None``
    when it says what the files say."""
    import zarr

    try:
        consolidated: Any = zarr.open_group(store, mode="r", use_consolidated=True)
        theirs = dict(consolidated.arrays())
        their_attrs = dict(consolidated.attrs)
    except Exception as error:  # noqa: BLE001 - missing or unreadable: one problem
        return f"no consolidated metadata ({_short(error)})"
    stale = [] if their_attrs == dict(group.attrs) else ["the root attributes"]
    for name in sorted(set(arrays) | set(theirs) | broken):
        mine, other = arrays.get(name), theirs.get(name)
        if mine is None or other is None or other.metadata.to_dict() != mine.metadata.to_dict():
            stale.append(f"'{name}'")
    if not stale:
        return None
    return f"the consolidated metadata is out of date for {', '.join(stale[:5])}" + (
        f" and {len(stale) - 5} more" if len(stale) > 5 else ""
    )


def _replan(
    store: str, attrs: Mapping[str, Any], structure: Structure, report: Report
) -> tuple[dict[str, Any] | None, list[Task] | None]:
    """The store's runs, planned again from its stored spec, and the coordinates that
    plan gives; ``None`` for the runs if that fails or does not fit the store."""
    from mfdsl.core.errors import SpecError
    from mfdsl.core.plugins import available_backends, get_backend
    from mfdsl.language.build import build
    from mfdsl.language.expand import expand
    from mfdsl.language.load import yaml_to_module
    from mfdsl.language.syntax import parse_text
    from mfdsl.plan.estimate import check_machine, estimate
    from mfdsl.plan.layout import plan_tasks

    source, spec_ir = attrs.get("spec_source"), attrs.get("spec_ir")
    path = str(attrs.get("spec_path") or "spec")
    if isinstance(source, str):
        try:
            if path.endswith((".yaml", ".yml")):
                yaml_to_module(source, path)
            else:
                parse_text(source, path)
        except SpecError as error:
            report.problems.append(
                f"the stored spec (spec_source) does not parse: {error.render().splitlines()[0]}"
            )
    if not isinstance(spec_ir, str):
        return None, None
    try:
        spec = build(yaml_to_module(spec_ir, f"{store}:spec_ir"))
        points = list(expand(spec))
    except SpecError as error:
        report.problems.append(f"the stored spec (spec_ir) does not parse: {error.render().splitlines()[0]}")
        return None, None
    except Exception as error:  # noqa: BLE001 - a stored spec damaged past what the parser reports
        report.problems.append(f"the stored spec (spec_ir) cannot be read ({_short(error)})")
        return None, None
    names = attrs.get("backends")
    if not isinstance(names, list) or not names:
        return None, None
    missing = [n for n in names if n not in available_backends()]
    if missing:
        report.notes.append(
            f"{'backend' if len(missing) == 1 else 'backends'} {', '.join(map(str, missing))} not installed: cells checked loosely"
        )
        return None, None
    # The store has room for the runs of every backend its spec names, whichever wrote
    # it; a store of an mfdsl from before that has room for those that wrote it alone.
    room = [n for n in dict.fromkeys([*spec.backends, *names]) if n in available_backends()]
    # A stored spec is input like any other: planning it again must not allocate what
    # this machine does not have (a hostile 'steps = 2e9, record every 1').
    try:
        check_machine(estimate(spec, points, room, workers=0), spec)
    except SpecError as error:
        report.problems.append(f"the stored spec is too large to plan again: {error.message}")
        return None, None
    width = structure.coords.get("width")
    widths = [_plain(v) for v in np.asarray(width).tolist()] if width is not None else None
    try:
        for extra in (room, []):
            layout, tasks = plan_tasks(
                spec, points, [get_backend(n) for n in names], room_for=[get_backend(n) for n in extra]
            )
            if widths is None or widths == [_plain(v) for v in layout.sweep["width"]]:
                break
    except Exception as error:  # noqa: BLE001 - a spec this version plans differently
        report.notes.append(f"the stored spec cannot be planned again ({error}): cells checked loosely")
        return None, None
    planned = {**layout.sweep, "step": layout.steps, "time": layout.time[1], **layout.extra}
    differences = coordinate_differences(structure, layout)
    for dim in layout.sweep:
        if dim in differences:
            report.problems.append(f"coordinate '{dim}' does not match the stored spec's sweep")
            return planned, None
    if "step" in differences:
        report.problems.append("coordinate 'step' does not match the stored spec's record steps")
        return planned, None
    for name, what in differences.items():
        if name == "time":
            report.problems.append(f"coordinate 'time' {what} the stored spec's (lr × step)")
        elif name not in structure.arrays:
            continue  # a missing variable: reported below, with the others
        else:
            report.problems.append(f"coordinate '{name}' {what} the stored spec's")
    wanted = {v.name for v in layout.variables}
    have = set(_data_variables(structure.arrays, tuple(layout.sweep)))
    if wanted != have:
        report.problems.append(
            f"variables {sorted(have)} do not match the stored spec's record ({sorted(wanted)})"
        )
        return planned, None
    return planned, tasks


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def render(report: Report, console: Any) -> None:
    """The report for a terminal."""
    from rich.text import Text

    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items())) or "cells not checked"
    for note in report.notes:
        console.print(Text("note: ", style="bold cyan") + Text(note))
    if report.ok:
        console.print(Text("✓ ", style="green") + Text(f"{report.store}: no problems ({counts})"))
        return
    console.print(
        Text("✗ ", style="bold red")
        + Text(f"{report.store}: {count(len(report.problems), 'problem')} ({counts})")
    )
    for problem in report.problems:
        console.print(Text(f"  - {problem}"))
