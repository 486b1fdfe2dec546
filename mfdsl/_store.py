"""The results store: one zarr v3 store per run of a spec, read with ``xarray.open_zarr``.

The layout is described in ``docs/store.md``.  In short: every recorded observable is a
float64 variable over ``(width, seed, <other sweep variables>, step, <extra dims>)``,
chunked 1 along every sweep dimension so each training run owns its chunks; ``status``
(int8, CF flags) and ``message`` (string) sit over the sweep dimensions alone.

Life cycle: :func:`create_store` writes the skeleton (metadata, coordinates, no data
chunks, so unwritten cells read as NaN / pending); each run calls :func:`write_run`,
possibly from many processes at once, writing only its own chunks — data first, status
last, so a writer that dies leaves its cell pending; :func:`finalize` stamps the end
time and refreshes the consolidated metadata.
"""

from __future__ import annotations

import contextlib
import enum
import os
import platform
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.errors import ZarrUserWarning

from ._location import normalize

#: bumped whenever a reader of an older store would misread a newer one
STORE_FORMAT = 1

STEP = "step"
TIME = "time"
STATUS = "status"
MESSAGE = "message"

# Big enough that a run's chunk costs one file per variable in every realistic spec,
# small enough that reading one run's particles never pulls in more than this.
_CHUNK_BYTES = 8 * 2**20


class Status(enum.IntEnum):
    """The value of a cell of ``status`` (CF ``flag_values``)."""

    PENDING = 0
    DONE = 1
    FAILED = 2
    DIVERGED = 3


_FLAG_MEANINGS = " ".join(s.name.lower() for s in Status)


@dataclass(frozen=True, kw_only=True)
class VariableSpec:
    """A recorded variable: its dimensions after ``step`` (e.g. ``("probe",)``), a CF
    ``long_name`` and ``units`` (``"1"`` when dimensionless)."""

    name: str
    dims: tuple[str, ...] = ()
    long_name: str
    units: str = "1"


def create_store(
    path: str | os.PathLike[str],
    *,
    sweep: Mapping[str, Sequence[Any] | np.ndarray],
    steps: Sequence[int] | np.ndarray,
    time: tuple[Sequence[str], np.ndarray],
    variables: Sequence[VariableSpec],
    extra_coords: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write the store's skeleton: coordinates, empty variables and attributes.

    ``sweep`` maps each sweep dimension, in order, to its values: ``width`` first
    (float64, ``inf`` for the limit), then ``seed``, then the spec's other variables
    (strings for categorical values).  ``steps`` is the union of the recorded steps.
    ``time`` is ``(dims, values)`` with ``dims`` some sweep dimensions (those the learning
    rate varies over, in sweep order) followed by ``"step"``.  ``extra_coords`` gives the
    coordinates of the dimensions variables use after ``step``.  ``attrs`` (JSON-able)
    go to the root next to the store's own: ``mfdsl_store_format``, ``created``,
    ``host`` and ``versions`` (a dict; the caller's ``versions`` entries are merged in).

    An existing store at ``path`` is an error unless ``overwrite``: it may hold results.
    """
    path = normalize(path)
    sweep_coords = _sweep_coords(sweep)
    sweep_dims = tuple(sweep_coords)
    step_values = np.asarray(steps)
    if step_values.ndim != 1 or step_values.size == 0 or step_values.dtype.kind not in "iu":
        raise ValueError("steps must be a non-empty 1-d integer array")
    step_values = step_values.astype(np.int64)
    if np.any(np.diff(step_values) <= 0) or step_values[0] < 0:
        raise ValueError("steps must be non-negative and strictly increasing")
    extra = {name: _coord_values(name, values) for name, values in (extra_coords or {}).items()}

    names = [*sweep_dims, STEP, TIME, *extra, STATUS, MESSAGE, *(v.name for v in variables)]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"names used twice in the store: {', '.join(duplicated)}")

    time_dims = tuple(time[0])
    time_values = np.asarray(time[1], dtype=np.float64)
    if time_dims[-1:] != (STEP,) or list(time_dims[:-1]) != [d for d in sweep_dims if d in time_dims]:
        raise ValueError(f"time dims must be sweep dims in sweep order, then 'step' (got {time_dims})")
    sizes = {**{d: v.size for d, v in sweep_coords.items()}, STEP: step_values.size}
    sizes.update((d, v.size) for d, v in extra.items())
    if time_values.shape != tuple(sizes[d] for d in time_dims):
        raise ValueError(
            f"time has shape {time_values.shape}, its dims {time_dims} need "
            f"{tuple(sizes[d] for d in time_dims)}"
        )

    coords: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]] = {
        name: ((name,), values, {"long_name": _SWEEP_LONG_NAMES.get(name, name), "units": "1"})
        for name, values in sweep_coords.items()
    }
    coords[STEP] = ((STEP,), step_values, {"long_name": "training step", "units": "1"})
    coords[TIME] = (time_dims, time_values, {"long_name": "mean-field time (lr × step)", "units": "1"})
    for name, values in extra.items():
        coords[name] = ((name,), values, {"long_name": name})

    sweep_shape = tuple(sizes[d] for d in sweep_dims)
    cell = (1,) * len(sweep_dims)
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, Any]]] = {}
    encoding: dict[str, dict[str, Any]] = {}
    for var in variables:
        unknown = [d for d in var.dims if d not in extra]
        if unknown:
            raise ValueError(f"variable {var.name!r} uses dims without coordinates: {unknown}")
        dims = (*sweep_dims, STEP, *var.dims)
        shape = tuple(sizes[d] for d in dims)
        # A broadcast view costs no memory; zarr compares each chunk with the fill
        # value and, as write_empty_chunks is off, writes none of them.
        data_vars[var.name] = (
            dims,
            np.broadcast_to(np.float64(np.nan), shape),
            {"long_name": var.long_name, "units": var.units},
        )
        extra_size = int(np.prod(shape[len(sweep_dims) + 1 :]))
        step_chunk = max(1, min(step_values.size, _CHUNK_BYTES // (8 * extra_size)))
        encoding[var.name] = {
            "chunks": (*cell, step_chunk, *shape[len(sweep_dims) + 1 :]),
            "compressors": _compressors(),
        }
    data_vars[STATUS] = (
        sweep_dims,
        np.broadcast_to(np.int8(Status.PENDING), sweep_shape),
        {
            "long_name": "run status",
            "flag_values": np.array([s.value for s in Status], dtype=np.int8),
            "flag_meanings": _FLAG_MEANINGS,
        },
    )
    # Status is a flag, not a measurement: 0 is "pending", never "missing", so the zarr
    # fill value stays out of xarray's mask (zarr v3 stores do not mask by default).
    encoding[STATUS] = {"chunks": cell, "fill_value": np.int8(Status.PENDING), "compressors": _compressors()}
    data_vars[MESSAGE] = (
        sweep_dims,
        np.broadcast_to(np.array("", dtype=object), sweep_shape),
        {"long_name": "why a run failed or diverged ('' otherwise)"},
    )
    encoding[MESSAGE] = {"chunks": cell, "fill_value": "", "compressors": _compressors()}

    ds = xr.Dataset(data_vars, coords=coords, attrs=_root_attrs(attrs or {}))
    with _quiet_consolidation():
        # Consolidating now, not only at the end, is what lets xarray open the store
        # without a warning while runs are still writing; runs never change metadata,
        # so the consolidated copy stays true.
        ds.to_zarr(
            path,
            mode="w" if overwrite else "w-",
            zarr_format=3,
            consolidated=True,
            encoding=encoding,
            write_empty_chunks=False,
        )


def write_run(
    path: str | os.PathLike[str],
    *,
    index: Mapping[str, int],
    records: Mapping[str, np.ndarray],
    steps: Sequence[int] | np.ndarray,
    status: int,
    message: str = "",
) -> None:
    """Write one run's cell: its records, then its message and status.

    ``index`` is the run's position along every sweep dimension.  ``records[name]`` has
    shape ``(len(steps), *extra)``, row ``i`` recorded at ``steps[i]`` (a subset of the
    store's steps).  The whole cell is rewritten: store steps the run did not record, and
    variables missing from ``records``, read NaN.  Only this cell's chunks are touched,
    so runs in different processes may write at once.
    """
    try:
        status = Status(int(status))
    except ValueError:
        raise ValueError(f"status must be one of {[int(s) for s in Status]} (got {status})") from None
    path = normalize(path)
    ds = xr.open_zarr(path, consolidated=True, chunks=None)
    sweep_dims = tuple(str(d) for d in ds[STATUS].dims)
    if set(index) != set(sweep_dims):
        raise ValueError(f"index must give exactly the sweep dims {list(sweep_dims)} (got {list(index)})")
    region: dict[str, slice] = {}
    for dim in sweep_dims:
        i = int(index[dim])
        if not 0 <= i < ds.sizes[dim]:
            raise IndexError(f"index {dim}={i} is outside 0..{ds.sizes[dim] - 1}")
        region[dim] = slice(i, i + 1)

    store_steps = ds[STEP].values
    run_steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    rows = np.searchsorted(store_steps, run_steps)
    if np.any(rows >= store_steps.size) or np.any(
        store_steps[np.minimum(rows, store_steps.size - 1)] != run_steps
    ):
        raise ValueError("the run's steps must all be steps of the store")

    observables = [str(n) for n in ds.data_vars if n not in (STATUS, MESSAGE)]
    unknown = sorted(set(records) - set(observables))
    if unknown:
        raise ValueError(f"records for variables the store lacks: {unknown}")
    cell = (1,) * len(sweep_dims)
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name in observables:
        var = ds[name]
        extra_shape = var.shape[len(sweep_dims) + 1 :]
        row = np.full((store_steps.size, *extra_shape), np.nan)
        if name in records:
            rec = np.asarray(records[name], dtype=np.float64)
            if rec.shape != (run_steps.size, *extra_shape):
                raise ValueError(
                    f"records[{name!r}] has shape {rec.shape}, expected {(run_steps.size, *extra_shape)}"
                )
            row[rows] = rec
        out[name] = (tuple(str(d) for d in var.dims), row.reshape(cell + row.shape))
    out[MESSAGE] = (sweep_dims, np.full(cell, message, dtype=object))
    ds.close()

    # Two writes, status last: a writer killed in between leaves the cell pending, and
    # a pending cell is simply run again.
    _write_region(path, xr.Dataset(out), region)
    _write_region(path, xr.Dataset({STATUS: (sweep_dims, np.full(cell, status, dtype=np.int8))}), region)


def read_status(path: str | os.PathLike[str]) -> np.ndarray:
    """``status`` over the sweep dimensions (int8, values of :class:`Status`)."""
    with xr.open_zarr(normalize(path), consolidated=True, chunks=None) as ds:
        return np.asarray(ds[STATUS].values)


def finalize(path: str | os.PathLike[str]) -> None:
    """Stamp ``finalized`` (UTC) on the root and rewrite the consolidated metadata.

    Call it once no writer is left; a store is readable before, ``finalized`` only tells
    readers that no run is still writing.
    """
    path = normalize(path)
    group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    group.attrs["finalized"] = _now()
    with _quiet_consolidation():
        zarr.consolidate_metadata(path, zarr_format=3)


def open_store(path: str | os.PathLike[str]) -> xr.Dataset:
    """The store as a lazily loaded :class:`xarray.Dataset`."""
    return xr.open_zarr(normalize(path), consolidated=True)


_SWEEP_LONG_NAMES = {"width": "network width (inf: the mean-field limit)", "seed": "random seed"}


def _sweep_coords(sweep: Mapping[str, Sequence[Any] | np.ndarray]) -> dict[str, np.ndarray]:
    if list(sweep)[:2] != ["width", "seed"]:
        raise ValueError(f"the sweep dims must start with width, seed (got {list(sweep)})")
    out = {}
    for name, values in sweep.items():
        if name == "width":
            arr = np.asarray(values, dtype=np.float64)
        elif name == "seed":
            arr = np.asarray(values, dtype=np.int64)
        else:
            arr = _coord_values(name, values)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"sweep dim {name!r} needs a non-empty 1-d array of values")
        if np.unique(arr).size != arr.size:
            raise ValueError(f"sweep dim {name!r} repeats a value: {arr.tolist()}")
        out[name] = arr
    return out


def _coord_values(name: str, values: Sequence[Any] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"coordinate {name!r} must be 1-d")
    if arr.dtype.kind in "USTO":
        # Variable-length strings: zarr v3 warns that fixed-width unicode has no spec.
        return np.array([str(v) for v in arr], dtype=object)
    return arr


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "xarray": xr.__version__,
        "zarr": zarr.__version__,
    }
    versions.update(attrs.get("versions", {}))
    own = {"mfdsl_store_format": STORE_FORMAT, "created": _now(), "host": socket.gethostname()}
    clash = sorted((set(own) | {"finalized"}) & set(attrs))
    if clash:
        raise ValueError(f"attrs may not set the store's own keys: {clash}")
    return {**attrs, **own, "versions": versions}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _compressors() -> list[Any]:
    # zarr's default (zstd) with its content checksum: a chunk cut off mid-write or
    # damaged later fails to decode instead of reading as wrong numbers
    # (``mfdsl verify``, ``mfdsl run --resume``).
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=0, checksum=True)]


def _write_region(path: str | os.PathLike[str], ds: xr.Dataset, region: dict[str, slice]) -> None:
    # consolidated=False: re-consolidating would rewrite the root zarr.json, the one
    # file every concurrent writer shares.
    ds.to_zarr(path, mode="r+", region=region, consolidated=False, write_empty_chunks=False)


@contextlib.contextmanager
def _quiet_consolidation() -> Iterator[None]:
    # zarr notes that consolidated metadata is not yet in the v3 spec; the store relies
    # on it knowingly, since xarray warns on every open of a store without it.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Consolidated metadata is currently not part", category=ZarrUserWarning
        )
        yield
