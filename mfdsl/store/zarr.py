"""The results store: one zarr v3 store per run of a spec, read with ``xarray.open_zarr``.

The layout is described in ``docs/store.md``.  In short: every recorded observable is a
float64 variable over ``(width, seed, <other sweep variables>, step, <extra dims>)``,
chunked 1 along every sweep dimension so each training run owns its chunks; ``status``
(int8, CF flags) sits over the sweep dimensions alone, and so does ``message`` (string), a
non-index coordinate: a label of each run that ``Dataset.where`` leaves alone.

Life cycle: :func:`create_store` writes the skeleton (metadata, coordinates, no data
chunks, so unwritten cells read as NaN / pending) — on a local disk in a folder beside
the store renamed into place once complete, so no half-made skeleton is ever found at
the store's path; each run calls :func:`write_run`,
possibly from many processes at once, writing only its own chunks — data first, status
last, so a writer that dies leaves its cell pending; :func:`finalize` stamps the end
time and refreshes the consolidated metadata.

Deleting: mfdsl deletes a store only through :func:`remove_store`, which refuses
anything that is not an mfdsl store (its root ``zarr.json`` carries
``mfdsl_store_format``) made of the files zarr and mfdsl write and nothing else: a
user's folder, a regular file, a link, the current or home folder are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.errors import ZarrUserWarning

from mfdsl.core import location as loc
from mfdsl.core.location import normalize
from mfdsl.plan.layout import VariableSpec
from mfdsl.store.status import Status

#: bumped whenever a reader of an older store would misread a newer one
STORE_FORMAT = 1

STEP = "step"
TIME = "time"
STATUS = "status"
MESSAGE = "message"
#: root attribute: the version of the random-stream layout (``mfdsl.core.streams``) the runs used
STREAM_LAYOUT_ATTR = "stream_layout"

# Big enough that a run's chunk costs one file per variable in every realistic spec,
# small enough that reading one run's particles never pulls in more than this.
_CHUNK_BYTES = 8 * 2**20


_FLAG_MEANINGS = " ".join(s.name.lower() for s in Status)


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
    go to the root next to the store's own: ``mfdsl_store_format``, ``stream_layout``
    (:data:`mfdsl.core.streams.STREAM_LAYOUT`), ``created``, ``host`` and ``versions`` (a
    dict; the caller's ``versions`` entries are merged in).

    An existing store at ``path`` is an error (``FileExistsError``) unless
    ``overwrite``: it may hold results; and ``overwrite`` replaces only an mfdsl store
    (:func:`remove_store`; anything else raises :class:`NotRemovable`).

    Every array, coordinates included, is compressed with zstd's content checksum, so
    a damaged chunk fails to decode rather than read as wrong values.
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

    sweep_shape = tuple(sizes[d] for d in sweep_dims)
    coords: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]] = {
        name: ((name,), values, {"long_name": _SWEEP_LONG_NAMES.get(name, name), "units": "1"})
        for name, values in sweep_coords.items()
    }
    coords[STEP] = ((STEP,), step_values, {"long_name": "training step", "units": "1"})
    coords[TIME] = (time_dims, time_values, {"long_name": "mean-field time (lr × step)", "units": "1"})
    for name, values in extra.items():
        coords[name] = ((name,), values, {"long_name": name})
    # A label of each run, not a measurement: as a coordinate, ``ds.where(ds.status == 1)``
    # masks the numbers and leaves it alone (a string data variable cannot hold the NaN
    # ``where`` fills in; numpy's StringDType does not promote with float).
    coords[MESSAGE] = (
        sweep_dims,
        np.broadcast_to(np.array("", dtype=object), sweep_shape),
        {"long_name": "why a run failed or diverged ('' otherwise)"},
    )

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
    encoding[MESSAGE] = {"chunks": cell, "fill_value": "", "compressors": _compressors()}
    for name in coords:
        if name != MESSAGE:  # coordinates carry the checksum too: a flipped byte is caught
            encoding[name] = {"compressors": _compressors()}

    ds = xr.Dataset(data_vars, coords=coords, attrs=_root_attrs(attrs or {}))
    if not loc.is_url(path) and os.path.islink(path.rstrip(os.sep)):
        path = os.path.realpath(path)  # made where the link points, the link kept
    if loc.exists(path):
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "an existing store is not overwritten unless asked", path)
        remove_store(path)
    if loc.is_url(path):
        # an object store has no rename: written in place (a cut-off skeleton is what
        # ``mfdsl verify`` and ``--resume`` call incomplete)
        _write_skeleton(ds, path, encoding)
        return
    # Written beside the store and renamed into place once complete: a kill midway
    # leaves no half-made store at ``path``, only a folder :func:`clean_partial` clears.
    partial = partial_path(path)
    try:
        _write_skeleton(ds, partial, encoding)
        os.rename(partial, path)
    except BaseException:
        with contextlib.suppress(OSError, NotRemovable):
            remove_store(partial, marker=False)
        raise


def _write_skeleton(ds: xr.Dataset, path: str, encoding: dict[str, dict[str, Any]]) -> None:
    with _quiet_consolidation():
        # Consolidating now, not only at the end, is what lets xarray open the store
        # without a warning while runs are still writing; runs never change metadata,
        # so the consolidated copy stays true.
        ds.to_zarr(
            path,
            mode="w-",
            zarr_format=3,
            consolidated=True,
            encoding=encoding,
            write_empty_chunks=False,
        )


#: the suffix of the folder a local skeleton is written in before it is renamed
_PARTIAL_SUFFIX = ".mfdsl-new-"


def partial_path(path: str) -> str:
    """Where :func:`create_store` writes a local skeleton before renaming it to ``path``."""
    return f"{path.rstrip(os.sep)}{_PARTIAL_SUFFIX}{os.getpid()}"


def clean_partial(path: str) -> list[str]:
    """Remove the skeletons of ``path`` left half-made by a ``create_store`` that was
    killed (``<path>.mfdsl-new-<pid>`` of a process that is gone, holding zarr's files
    alone); returns what was removed.  Call it while holding the store's lock."""
    if loc.is_url(path):
        return []
    folder, name = os.path.split(os.path.realpath(path.rstrip(os.sep)))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in names:
        if not entry.startswith(name + _PARTIAL_SUFFIX):
            continue
        pid = entry[len(name + _PARTIAL_SUFFIX) :]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        with contextlib.suppress(OSError, NotRemovable):
            remove_store(os.path.join(folder, entry), marker=False)
            removed.append(os.path.join(folder, entry))
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # no process has such an id
    except OSError:
        return True  # another user's
    return True


# ---- what mfdsl may delete -------------------------------------------------------------


class NotRemovable(Exception):
    """A path mfdsl refuses to delete: it is not (only) an mfdsl store.  The message says
    why, for the user."""


#: a file zarr's local store writes atomically: a temporary ``NAME.<hex>.partial``
_ZARR_TEMP = re.compile(r"^(zarr|\d+)\.[0-9a-f]{32}\.partial$")
_CHUNK_NAME = re.compile(r"^\d+$")
#: what ``mfdsl run`` writes to test that a store can be written (and removes again)
_WRITE_PROBE = re.compile(r"^\.mfdsl-write-test-\d+$")


def store_file(parts: Sequence[str]) -> bool:
    """Whether a file at ``parts`` (its path inside a store) is one zarr or mfdsl writes
    in an mfdsl store: the root's ``zarr.json``, an array's ``zarr.json``, a chunk
    (``NAME/c/i/j/…``, numbers), zarr's temporary files of those, ``mfdsl run``'s
    write probe."""
    if len(parts) == 1:
        return parts[0] == "zarr.json" or bool(_ZARR_TEMP.match(parts[0]) or _WRITE_PROBE.match(parts[0]))
    if len(parts) == 2:
        return parts[1] == "zarr.json" or bool(_ZARR_TEMP.match(parts[1]))
    if parts[1] != "c":
        return False
    *folders, last = parts[2:]
    return all(_CHUNK_NAME.match(p) for p in folders) and bool(
        _CHUNK_NAME.match(last) or _ZARR_TEMP.match(last)
    )


def removal_problem(path: str, *, marker: bool = True) -> str | None:
    """Why mfdsl will not delete ``path``, or ``None`` when it may: ``path`` is an mfdsl
    store (with ``marker``: its root ``zarr.json`` has ``mfdsl_store_format``; without,
    a skeleton mfdsl is making) holding only the files zarr and mfdsl write in one.
    Never a link, a regular file, the current folder, the home folder, or a folder
    holding either."""
    path = normalize(path)
    if not loc.is_url(path):
        local = path.rstrip(os.sep) or os.sep
        if os.path.islink(local):
            return "it is a symbolic link (mfdsl deletes a store itself, never what a link points to)"
        if not os.path.isdir(local):
            return "it is a file, not a store folder" if os.path.lexists(local) else None
        real = os.path.realpath(local)
        for place, what in (
            (os.getcwd(), "the current folder"),
            (os.path.expanduser("~"), "your home folder"),
        ):
            other = os.path.realpath(place)
            if real == other:
                return f"it is {what}"
            if other.startswith(real.rstrip(os.sep) + os.sep):
                return f"it holds {what}"
    elif not loc.exists(path):
        return None
    try:
        root = json.loads(loc.read_text(loc.join(path, "zarr.json")))
    except FileNotFoundError:
        root = None
        if marker:
            return "it has no zarr.json: it is not a zarr store"
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"its zarr.json cannot be read ({type(error).__name__}), so it cannot be told to be an mfdsl store"
    if marker:
        attrs = root.get("attributes") if isinstance(root, dict) else None
        version = attrs.get("mfdsl_store_format") if isinstance(attrs, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            return "its zarr.json has no 'mfdsl_store_format' attribute: it was not written by mfdsl"
    foreign = _foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = "a file" if len(foreign) == 1 else f"{len(foreign)} files"
        return f"it holds {what} mfdsl does not write in a store ({shown})"
    return None


def _foreign_files(path: str) -> list[str]:
    """The paths inside the store folder ``path`` that are no file of an mfdsl store
    (links and special files included), relative to it."""
    foreign: list[str] = []
    if loc.is_url(path):
        fs, root = loc._fs(path)
        root = root.rstrip("/")
        for name in sorted(fs.find(root, withdirs=False)):
            rel = str(name)[len(root) :].lstrip("/")
            if rel and not store_file(rel.split("/")):
                foreign.append(rel)
        return foreign

    def unreadable(error: OSError) -> None:
        foreign.append(f"{os.path.relpath(error.filename or path, path)} (unreadable)")

    for folder, dirs, files in os.walk(path, onerror=unreadable):
        rel = os.path.relpath(folder, path)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        for name in sorted(dirs):
            if os.path.islink(os.path.join(folder, name)):
                foreign.append(os.path.join(*parts, name) + " (a link)")
        for name in sorted(files):
            full = os.path.join(folder, name)
            kind = (
                ""
                if os.path.isfile(full) and not os.path.islink(full)
                else " (a link)"
                if os.path.islink(full)
                else " (no regular file)"
            )
            if kind or not store_file((*parts, name)):
                foreign.append(os.path.join(*parts, name) + kind)
    return foreign


def remove_store(path: str | os.PathLike[str], *, marker: bool = True) -> None:
    """Delete the mfdsl store at ``path`` (nothing if there is none); anything else
    raises :class:`NotRemovable`, with nothing deleted (:func:`removal_problem`)."""
    path = normalize(path)
    problem = removal_problem(path, marker=marker)
    if problem is not None:
        raise NotRemovable(f"{path}: {problem}")
    loc.remove(path)


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
    update_attrs(path, {"finalized": _now()})


def update_attrs(path: str | os.PathLike[str], values: Mapping[str, Any]) -> None:
    """Set root attributes and rewrite the consolidated metadata to match.

    The root attributes are one file every writer shares: call it only while no run
    writes (before a sweep starts, or once it has ended).
    """
    path = normalize(path)
    group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    group.attrs.update(dict(values))
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
    from mfdsl.core.streams import STREAM_LAYOUT

    own = {
        "mfdsl_store_format": STORE_FORMAT,
        STREAM_LAYOUT_ATTR: STREAM_LAYOUT,
        "created": _now(),
        "host": socket.gethostname(),
    }
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
