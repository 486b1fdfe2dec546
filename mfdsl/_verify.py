"""``mfdsl verify``: does a store hold what its statuses say?

Every cell (one run: a point of the sweep) is checked against its ``status``:

* **done**: every value its run records (its observables, at its record steps, over the
  layers and probes it covers) is present and finite, and nothing else is written;
* **diverged**: a message says why, nothing is written where the run records nothing;
* **failed**: a message says why, and no data;
* **pending**: no data and no message.

Every chunk must decode (zstd's checksum catches a cut-off or damaged file).  The
stored spec must parse, and re-planning it must give the store's shape; the root and
variable attributes must be complete.

:func:`check_cells` is also what ``mfdsl run --resume`` uses to find finished cells
whose data did not survive (a write cut off mid-chunk), so that they run again.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _location as loc
from ._errors import count

if TYPE_CHECKING:
    from ._plan import RunPlan
    from ._runner import Task

PENDING, DONE, FAILED, DIVERGED = 0, 1, 2, 3
_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed", DIVERGED: "diverged"}
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


class NotAStore(Exception):
    """The path is no mfdsl store this version can read (exit 2, not a list of problems)."""


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


def check_cells(store: str, tasks: Sequence[Task] | None) -> CellCheck:
    """Check every cell of ``store`` against its status.

    ``tasks`` (from :func:`mfdsl._runner.plan_tasks` of the store's spec) say what each
    cell's run records; without them a done cell need only hold some data.
    """
    import zarr

    group: Any = zarr.open_group(store, mode="r", use_consolidated=False)
    status_array = group["status"]
    dims = _dims(status_array)
    shape = tuple(status_array.shape)
    coords = {d: _values(group, d) for d in dims}
    status = _read_cells(status_array, shape, np.int8)
    check = CellCheck(status=np.where(status.mask, -1, status.data).astype(np.int16))
    for cell in np.ndindex(shape):
        check.labels[cell] = ", ".join(f"{d}={_fmt(coords[d][i])}" for d, i in zip(dims, cell, strict=True))
        if status.mask[cell]:
            check.add(cell, f"status unreadable: {status.errors.get(cell, '?')}")
        elif int(status.data[cell]) not in _NAMES:
            check.add(cell, f"status {int(status.data[cell])} is none of {sorted(_NAMES)}")

    message = _read_cells(group["message"], shape, object)
    store_steps = np.asarray(group["step"][...])
    layer_coord = [int(x) for x in _values(group, "layer")] if "layer" in group else []
    variables = _data_variables(group, dims)
    shapes = {name: tuple(arr.shape[len(dims) + 1 :]) for name, arr in variables.items()}
    by_cell = {tuple(t.index[d] for d in dims): t for t in tasks} if tasks is not None else None
    masks: dict[Cell, dict[str, np.ndarray] | None] = {}
    if by_cell is not None:
        masks = {cell: expected(t.plan, store_steps, layer_coord, shapes) for cell, t in by_cell.items()}

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
            if state not in (DONE, DIVERGED):
                continue
            if by_cell is None:
                if state == DONE and np.isinf(values).any():
                    check.add(cell, f"{name}: infinite values in a done run")
                continue
            if cell not in by_cell:
                continue  # reported below, once
            mask = (masks.get(cell) or {}).get(name)
            if mask is None:
                if state == DONE:
                    _lenient(check, cell, name, values, by_cell[cell].plan, store_steps)
                continue
            outside = present & ~mask
            if outside.any():
                check.add(cell, f"{name}: {count(int(outside.sum()), 'value')} where the run records none")
            if state == DONE:
                bad = mask & ~np.isfinite(values)
                if bad.any():
                    missing = int((mask & np.isnan(values)).sum())
                    what = (
                        f"{missing} of {count(int(mask.sum()), 'recorded value')} missing" if missing else ""
                    )
                    infinite = int((mask & np.isinf(values)).sum())
                    what += ("; " if what and infinite else "") + (f"{infinite} infinite" if infinite else "")
                    check.add(cell, f"{name}: {what}")

    for cell in np.ndindex(shape):
        state = int(check.status[cell])
        if message.mask[cell]:
            check.add(cell, f"message unreadable: {message.errors.get(cell, '?')}")
            text = ""
        else:
            text = str(message.data[cell]) if message.data[cell] is not None else ""
        names = held.get(cell, [])
        if by_cell is not None and cell not in by_cell and state != PENDING and state in _NAMES:
            check.add(cell, f"{_NAMES[state]}, but no run of the spec belongs to this cell")
        if state == PENDING:
            if names:
                check.add(cell, f"pending, but holds data ({', '.join(names)}): a writer stopped early?")
            if text:
                check.add(cell, "pending, but has a message")
        elif state == FAILED:
            if names:
                check.add(cell, f"failed, but holds data ({', '.join(names)})")
            if not text:
                check.add(cell, "failed without a message")
        elif state == DIVERGED:
            if not text:
                check.add(cell, "diverged without a message")
        elif state == DONE and not names and variables:
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


def expected(
    plan: RunPlan, store_steps: np.ndarray, layer_coord: Sequence[int], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """Where a run of ``plan`` writes values: a boolean mask per store variable (over
    ``(step, *extra)``), or ``None`` when this cannot be told exactly."""
    from ._runner import PARTICLE_COMPONENTS, _place

    n = len(plan.record_steps)
    records: dict[str, np.ndarray] = {}
    for obs in plan.observables:
        store_shape = shapes.get(obs.name)
        if store_shape is None:
            return None
        if obs.name in ("train_loss", "test_loss", "test_accuracy"):
            own: tuple[int, ...] = ()
        elif obs.name == "output":
            own = (obs.probes, plan.layers[-1].fan_out) if len(store_shape) == 2 else (obs.probes,)
        elif obs.name in ("neuron_spread", "weight_change"):
            own = (len(obs.layers),)
        elif obs.name == "particles":
            own = (obs.sample, len(PARTICLE_COMPONENTS))
        else:
            return None
        records[obs.name] = np.ones((n, *own))
    try:
        placed = _place(plan, records, layer_coord, shapes)
    except (ValueError, IndexError):
        return None
    rows = np.searchsorted(store_steps, plan.record_steps)
    if np.any(rows >= len(store_steps)) or np.any(
        store_steps[np.minimum(rows, len(store_steps) - 1)] != plan.record_steps
    ):
        return None
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        mask = np.zeros((len(store_steps), *shape), dtype=bool)
        if name in placed:
            finite = np.isfinite(np.asarray(placed[name]))
            if finite.shape[1:] != shape:
                return None
            mask[rows] = finite
        out[name] = mask
    return out


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


def _values(group: Any, name: str) -> list[Any]:
    return list(np.asarray(group[name][...]).tolist())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _data_variables(group: Any, dims: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for name, array in sorted(group.arrays()):
        array_dims = _dims(array)
        if array_dims[: len(dims)] == dims and array_dims[len(dims) : len(dims) + 1] == ("step",):
            out[name] = array
    return out


# ---- the whole store ----------------------------------------------------------------------


def open_attrs(store: str) -> dict[str, Any]:
    """The root attributes of an mfdsl store this version reads, or :class:`NotAStore`."""
    import zarr

    from ._store import STORE_FORMAT

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


def verify(location: str | os.PathLike[str]) -> Report:
    """Check a store; :class:`NotAStore` if it is none this mfdsl reads."""
    import zarr

    from ._lock import current_owner, describe

    store = loc.normalize(location)
    attrs = open_attrs(store)
    report = Report(store=store)
    for name, kind in REQUIRED_ATTRS.items():
        if name not in attrs:
            report.problems.append(f"root attribute '{name}' is missing")
        elif not isinstance(attrs[name], kind) or isinstance(attrs[name], bool):
            report.problems.append(f"root attribute '{name}' is a {type(attrs[name]).__name__}")
    if "finalized" not in attrs:
        report.notes.append("not finalized: a sweep is still writing it, or was stopped (mfdsl run --resume)")
    owner = current_owner(store)
    if owner is not None:
        report.notes.append(
            f"an mfdsl run ({describe(owner)}) holds its lock: runs in flight may show as pending with data"
        )

    group: Any = zarr.open_group(store, mode="r", use_consolidated=False)
    names = {name for name, _ in group.arrays()}
    _check_consolidated(store, group, report)
    for name in ("status", "message", "step", "time", "width", "seed"):
        if name not in names:
            report.problems.append(f"variable '{name}' is missing")
    if report.problems and ("status" not in names or "message" not in names or "step" not in names):
        return report
    for name, array in sorted(group.arrays()):
        if not array.attrs.get("long_name"):
            report.problems.append(f"variable '{name}' has no 'long_name' attribute")
    flags: dict[str, Any] = dict(group["status"].attrs)
    if list(flags.get("flag_values", [])) != [PENDING, DONE, FAILED, DIVERGED] or flags.get(
        "flag_meanings"
    ) != " ".join(_NAMES.values()):
        report.problems.append("'status' lacks its flag_values/flag_meanings attributes")

    tasks = _replan(store, attrs, group, report)
    check = check_cells(store, tasks)
    for cell in sorted(check.problems):
        for problem in check.problems[cell]:
            report.problems.append(f"cell {check.labels[cell]}: {problem}")
    counts: dict[str, int] = {}
    for value in check.status.ravel():
        key = _NAMES.get(int(value), "unreadable")
        counts[key] = counts.get(key, 0) + 1
    report.counts = counts
    return report


def _check_consolidated(store: str, group: Any, report: Report) -> None:
    """The consolidated metadata (what xarray reads) must say what the files say."""
    import zarr

    try:
        consolidated: Any = zarr.open_group(store, mode="r", use_consolidated=True)
    except Exception as error:  # noqa: BLE001 - missing or unreadable: one problem
        report.problems.append(f"no consolidated metadata ({_short(error)})")
        return
    stale = [] if dict(consolidated.attrs) == dict(group.attrs) else ["the root attributes"]
    theirs = dict(consolidated.arrays())
    for name, array in sorted(group.arrays()):
        other = theirs.get(name)
        if other is None or other.metadata.to_dict() != array.metadata.to_dict():
            stale.append(f"'{name}'")
    if stale:
        report.problems.append(
            f"the consolidated metadata is out of date for {', '.join(stale[:5])}"
            + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        )


def _replan(store: str, attrs: Mapping[str, Any], group: Any, report: Report) -> list[Task] | None:
    """The store's runs, planned again from its stored spec; ``None`` if that fails."""
    from ._api import yaml_to_module
    from ._build import build
    from ._errors import SpecError
    from ._expand import expand
    from ._plugins import available_backends, get_backend
    from ._runner import plan_tasks
    from ._syntax import parse_text

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
        return None
    try:
        spec = build(yaml_to_module(spec_ir, f"{store}:spec_ir"))
        points = list(expand(spec))
    except SpecError as error:
        report.problems.append(f"the stored spec (spec_ir) does not parse: {error.render().splitlines()[0]}")
        return None
    names = attrs.get("backends")
    if not isinstance(names, list) or not names:
        return None
    missing = [n for n in names if n not in available_backends()]
    if missing:
        report.notes.append(
            f"{'backend' if len(missing) == 1 else 'backends'} {', '.join(missing)} not installed: cells checked loosely"
        )
        return None
    try:
        layout, tasks = plan_tasks(spec, points, [get_backend(n) for n in names])
    except Exception as error:  # noqa: BLE001 - a spec this version plans differently
        report.notes.append(f"the stored spec cannot be planned again ({error}): cells checked loosely")
        return None
    for dim, values in layout.sweep.items():
        if dim not in group or [_plain(v) for v in _values(group, dim)] != [_plain(v) for v in values]:
            report.problems.append(f"coordinate '{dim}' does not match the stored spec's sweep")
            return None
    if "step" not in group or _values(group, "step") != [int(s) for s in layout.steps]:
        report.problems.append("coordinate 'step' does not match the stored spec's record steps")
        return None
    wanted = {v.name for v in layout.variables}
    have = set(_data_variables(group, tuple(layout.sweep)))
    if wanted != have:
        report.problems.append(
            f"variables {sorted(have)} do not match the stored spec's record ({sorted(wanted)})"
        )
        return None
    return tasks


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def render(report: Report, console: Any) -> None:
    """The report for a terminal."""
    from rich.text import Text

    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items()))
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
