"""``mfdsl run --extend``: grow a store by new values of its sweep variables.

A sweep grows when the spec lists more values of its sweep variables than the store was
made with (more seeds, more widths, another learning rate) and nothing else changed.
The store is rebuilt with the new sweep — every coordinate in the spec's order, exactly
as a new ``mfdsl run`` of the spec would lay it out, so ``report``, ``plot`` and
``verify`` read it as any other — and every cell of the old store is copied into its
place value for value (float64 to float64: bit for bit); the new cells are pending and
train as ``--resume`` trains pending cells.

The rebuilt store is written beside the old one and swapped in by two renames once it
is complete, so a sweep killed while it copies leaves the old store as it was (and a
folder ``<store>.mfdsl-new-<pid>`` that the next ``mfdsl run`` removes).  An object
store (``s3://…``) has no rename: ``--extend`` needs a store on a file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mfdsl.core import location as loc
from mfdsl.language import ir as ir

#: root attributes the store sets itself (:func:`mfdsl.store.zarr.create_store`)
_OWN = ("mfdsl_store_format", "stream_layout", "created", "host", "finalized")


@dataclasses.dataclass(frozen=True)
class Growth:
    """How a spec grows a store's sweep: the values each variable gains (in the
    spec's order), or why it cannot (``problem``, with a ``diff`` of the specs)."""

    added: dict[str, list[Any]]
    problem: str | None = None
    diff: list[str] = dataclasses.field(default_factory=list)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def _contains(values: Sequence[Any], value: Any) -> bool:
    return any(_same(value, v) for v in values)


def growth(stored: ir.Spec, stored_yaml: str, spec: ir.Spec, spec_yaml_of: Any) -> Growth:
    """Whether ``spec`` grows the store made with ``stored`` (its IR as YAML,
    ``stored_yaml``): the same sweep variables in the same order, each keeping every
    stored value, and nothing else changed (``spec_yaml_of(spec with the stored
    sweep) == stored_yaml``; :func:`mfdsl.language.load.to_yaml`)."""
    old = {v.name: v.values for v in stored.sweep.variables}
    new = {v.name: v.values for v in spec.sweep.variables}
    if list(old) != list(new):
        return Growth(
            {},
            f"--extend adds values to the sweep's variables; it cannot change which variables are swept "
            f"(the store sweeps {', '.join(old)}; the spec sweeps {', '.join(new)})",
        )
    for name, values in old.items():
        dropped = [v for v in values if not _contains(new[name], v)]
        if dropped:
            shown = ", ".join(map(str, dropped[:5]))
            return Growth(
                {},
                f"--extend only adds values: the spec drops {shown} from '{name}', which the store holds "
                "(keep every stored value in the sweep; drop runs with xarray's sel when reading)",
            )
    same_sweep = dataclasses.replace(spec, sweep=stored.sweep)
    rest = spec_yaml_of(same_sweep)
    if rest != stored_yaml:
        diff = list(
            difflib.unified_diff(
                stored_yaml.splitlines(), rest.splitlines(), "stored", "now", lineterm="", n=0
            )
        )
        return Growth(
            {},
            "the spec differs from the one the store was made with in more than the values of its sweep; "
            "--extend adds sweep values and changes nothing else (or use --overwrite, or -o NEW.zarr)",
            diff[2:12],
        )
    added = {name: [v for v in new[name] if not _contains(old[name], v)] for name in new}
    return Growth({name: values for name, values in added.items() if values})


def position_maps(old: Mapping[str, Sequence[Any]], new: Mapping[str, Sequence[Any]]) -> list[np.ndarray]:
    """For each sweep dimension (in the order of ``old``), the position in ``new`` of
    every position of ``old``; a ``KeyError`` if a value is missing."""
    maps = []
    for dim, values in old.items():
        target = list(new[dim])
        where = []
        for value in values:
            hits = [j for j, v in enumerate(target) if _same(value, v) or _both_inf(value, v)]
            if not hits:
                raise KeyError(f"{dim}={value}")
            where.append(hits[0])
        maps.append(np.asarray(where, dtype=np.int64))
    return maps


def _both_inf(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isinf(a) and a == b


def copy_cells(source: str, target: str, maps: Sequence[np.ndarray]) -> int:
    """Copy every array over the sweep dimensions (the variables, ``status``,
    ``message``) of the store ``source`` into ``target``, old position ``i`` of each
    sweep dimension to ``maps[d][i]``; other dimensions are the same in both.  Values
    are read and written in their own dtype, so they arrive bit for bit; chunks that
    hold only the fill value stay unwritten, as in a new store.  Returns the arrays
    copied."""
    import zarr

    old = zarr.open_group(source, mode="r", zarr_format=3, use_consolidated=False)
    new = zarr.open_group(target, mode="r+", zarr_format=3, use_consolidated=False)
    dims = len(maps)
    status: Any = old["status"]
    sweep = tuple(status.metadata.dimension_names or ())
    copied = 0
    for name, array in old.arrays():
        names = tuple(getattr(array.metadata, "dimension_names", None) or ())
        if names[:dims] != sweep or name in sweep or name == "time":
            continue  # a coordinate: the new skeleton has the spec's
        into: Any = new[name]
        for i in range(array.shape[0]):
            block = array[i]
            into.oindex[(int(maps[0][i]), *maps[1:], *(slice(None),) * (len(names) - dims))] = block
        copied += 1
    return copied


def swap_in(store: str, grown: str) -> None:
    """Put the complete store ``grown`` in the place of ``store`` (two renames), and
    delete the old one."""
    from mfdsl.store.zarr import NotRemovable, remove_store

    old = f"{store.rstrip(os.sep)}.mfdsl-old-{os.getpid()}"
    os.rename(store, old)
    try:
        os.rename(grown, store)
    except BaseException:
        os.rename(old, store)
        raise
    # the grown store is in place: an old copy that cannot be removed is only litter
    with contextlib.suppress(OSError, NotRemovable):
        remove_store(old)


def kept_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The root attributes of the old store: those a new skeleton takes (``attrs``
    of :func:`mfdsl.store.zarr.create_store`) and the store's own it must keep."""
    given = {k: v for k, v in attrs.items() if k not in _OWN}
    own = {k: attrs[k] for k in ("created", "host") if k in attrs}
    return given, own


def refuse_url(store: str) -> str | None:
    """Why ``--extend`` cannot grow ``store`` in place, if it cannot."""
    if loc.is_url(store):
        return (
            f"--extend rebuilds {store} beside itself and renames it into place, and an object store has no "
            "rename; copy it to a local disk, extend it there and copy it back, or write the grown sweep to a "
            "new store (-o NEW.zarr)"
        )
    return None
