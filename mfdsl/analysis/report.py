"""``mfdsl report``: the numbers a paper shows, computed from a results store.

For every slice of the sweep's other variables (everything but ``width`` and ``seed``)
and every scalar observable (``train_loss``, ``test_loss``, ``test_accuracy``, and each
layer of ``weight_change`` / ``neuron_spread``, labelled ``weight_change[layer=1]``):

* **final values** per width: each done run's last finite record, mean ± sample std
  (``ddof = 1``; none with one run) over seeds, and how many runs are done, failed,
  diverged and pending (a diverged or failed run is counted, never averaged);
* **distance to the limit** per width: ``sup_t |m_n(t) − m_∞(t)|`` with ``m_n`` the seed
  mean of the done runs at width ``n`` and ``m_∞`` that of the limit (``width = inf``);
  without a limit, the widest width that has results stands in for it (and is left out
  of the fit).  Trajectories are compared on the reference's recorded times (a run
  recorded elsewhere is interpolated linearly in time);
* **rate**: the least-squares slope ``b`` of ``log distance = a + b log width`` over the
  finite widths, with a 95 % confidence interval ``b ± t_{0.975, n−2} · se(b)``,
  ``se(b)² = RSS / ((n − 2) Σ (log n_i − mean)²)``.  Two widths give a slope without an
  interval; fewer give none.  Only distances to the limit are fitted: against the
  widest run, the distance shrinks to 0 at that width whatever the true rate, so its
  slope is not a rate to the limit — the report then gives no rate and says why (as
  it does when the distance is 0 everywhere, or too few widths have one).

:func:`summarize_dataset` is the one place these numbers are computed: ``mfdsl
report``, its ``--json``, ``mfdsl plot`` and the table ``mfdsl run`` prints when the
sweep ends (:func:`final_table`) all read them from it.

Only runs with status *done* count: a diverged run's records stop where it diverged, a
failed or pending run has none.  Everything here is numpy; the t quantile comes from
:func:`t_quantile_975`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mfdsl.language.ir import OBSERVABLES
from mfdsl.store.status import Status
from mfdsl.store.verify import NotAStore, open_attrs
from mfdsl.store.zarr import STATUS, STEP, TIME

SWEEP_FIXED = ("width", "seed")

# t_{0.975, df} for df = 1 … 30 (two-sided 95 %), to 6 decimals; checked in the tests
# against a numerical integral of the t density.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054


class StoreError(Exception):
    """A store that cannot be reported on: missing, not mfdsl's, too new, or lacking
    what was asked for."""


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (so ``±`` it
    spans 95 %).

    A table for ``df ≤ 30``; beyond, the Cornish–Fisher expansion in ``1/df``
    (Abramowitz & Stegun 26.7.5, four terms), whose error there is below 1e-7 — no scipy.
    """
    if df < 1:
        raise ValueError(f"the t distribution needs df >= 1 (got {df})")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


# ---- opening a store -------------------------------------------------------------------


def open_results(path: str | os.PathLike[str]) -> Any:
    """The store at ``path`` as an ``xarray.Dataset``, after checking it is an mfdsl
    store of a format this version reads (``mfdsl_store_format`` ≤ ``STORE_FORMAT``)."""
    import xarray as xr

    from mfdsl.core import location as loc

    where = loc.normalize(os.fspath(path))
    try:
        open_attrs(where)  # mfdsl's, and a format this version reads
    except NotAStore as error:
        raise StoreError(str(error)) from None
    try:
        ds = xr.open_zarr(where, consolidated=True)
    except Exception as error:  # noqa: BLE001 - a damaged store: say so, no traceback
        raise StoreError(
            f"{where} cannot be opened ({type(error).__name__}: {error}); 'mfdsl verify {where}' says more"
        ) from None
    missing = [name for name in (STATUS, STEP, TIME, *SWEEP_FIXED) if name not in ds.variables]
    if missing:
        raise StoreError(f"{where} lacks {', '.join(missing)}: not a complete mfdsl store")
    return ds


# ---- trajectories ----------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """How the runs of one width in one slice (its seeds) ended."""

    done: int = 0
    failed: int = 0
    diverged: int = 0
    pending: int = 0

    @property
    def total(self) -> int:
        return self.done + self.failed + self.diverged + self.pending

    @classmethod
    def of(cls, status: np.ndarray) -> Counts:
        """The counts of an array of ``status`` values."""
        values = np.asarray(status)
        return cls(
            done=int(np.count_nonzero(values == Status.DONE)),
            failed=int(np.count_nonzero(values == Status.FAILED)),
            diverged=int(np.count_nonzero(values == Status.DIVERGED)),
            pending=int(np.count_nonzero(values == Status.PENDING)),
        )

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed, "diverged": self.diverged, "pending": self.pending}


@dataclass(frozen=True)
class Curve:
    """One width of one variable in one slice: the seed statistics of the done runs
    over the store's steps (NaN where no done run recorded)."""

    width: float
    time: np.ndarray
    runs: np.ndarray  # (done runs, steps)
    counts: Counts

    @property
    def done(self) -> int:
        return self.counts.done

    @property
    def total(self) -> int:
        return self.counts.total

    @property
    def mean(self) -> np.ndarray:
        """Mean over the done seeds at each step (NaN where none recorded)."""
        return _per_step(self.runs, 1, lambda v: np.nanmean(v, axis=0))

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation (``ddof = 1``) over the done seeds at each step, as
        in the report (NaN where fewer than two recorded)."""
        return _per_step(self.runs, 2, lambda v: np.nanstd(v, axis=0, ddof=1))

    @property
    def finals(self) -> np.ndarray:
        """Each done run's last finite value."""
        out = []
        for row in self.runs:
            finite = np.flatnonzero(np.isfinite(row))
            if finite.size:
                out.append(row[finite[-1]])
        return np.array(out, dtype=np.float64)


@dataclass(frozen=True)
class Series:
    """A scalar variable (one layer of a per-layer one) in one slice, every width."""

    label: str
    variable: str
    layer: int | None
    curves: tuple[Curve, ...]

    def reference(self) -> tuple[str, Curve] | None:
        """``("limit", curve)`` for the width-inf curve if it has results, else
        ``("widest", curve)`` for the widest finite one that has, else ``None``."""
        with_data = [c for c in self.curves if np.isfinite(c.mean).any()]
        limit = [c for c in with_data if math.isinf(c.width)]
        if limit:
            return "limit", limit[0]
        if len(with_data) >= 2:
            return "widest", max(with_data, key=lambda c: c.width)
        return None

    def distances(self) -> tuple[str | None, float | None, dict[float, float]]:
        """``(reference kind, reference width, {width: sup_t |mean − reference|})`` over
        the finite widths other than the reference."""
        ref = self.reference()
        if ref is None:
            return None, None, {}
        kind, reference = ref
        out = {}
        for curve in self.curves:
            if curve is reference or math.isinf(curve.width):
                continue
            d = sup_distance(curve.time, curve.mean, reference.time, reference.mean)
            if d is not None:
                out[curve.width] = d
        return kind, reference.width, out

    def rate(self) -> tuple[Rate | None, str | None]:
        """The fitted rate of the distance to the limit, or ``None`` and why there is
        none.  Distances to the widest run are never fitted: they vanish at that width
        whatever the true rate, so their slope would read as a rate it is not."""
        kind, _, dist = self.distances()
        if kind != "limit":
            if any(math.isinf(c.width) for c in self.curves):
                return None, "the limit (width ∞) has no finished run of this variable"
            return None, "no limit (width ∞) in the store, so no rate to it"
        positive = [w for w, d in dist.items() if d > 0]
        if dist and not positive:
            return None, "the distance to the limit is 0 at every width"
        if len(positive) < 2:
            have = "no width has" if not positive else "only 1 width has"
            return None, f"{have} a distance to the limit; a rate needs two"
        rate = fit_rate(list(dist), list(dist.values()))
        return rate, None if rate is not None else "the distances to the limit admit no fit"


@dataclass(frozen=True)
class Slice:
    """One combination of the other sweep variables, and its series."""

    coords: dict[str, Any]
    series: tuple[Series, ...] = field(default=())

    @property
    def title(self) -> str:
        return ", ".join(f"{k} = {_fmt_value(v)}" for k, v in self.coords.items())


def _per_step(runs: np.ndarray, least: int, fn: Any) -> np.ndarray:
    # Only where enough runs recorded: numpy warns on an all-NaN (or 1-value ddof=1) column.
    out = np.full(runs.shape[1], np.nan)
    enough = np.isfinite(runs).sum(axis=0) >= least
    if enough.any():
        out[enough] = fn(runs[:, enough])
    return out


def sup_distance(
    time: np.ndarray, values: np.ndarray, ref_time: np.ndarray, ref_values: np.ndarray
) -> float | None:
    """``max |values − ref_values|`` over the reference's finite records; ``values`` is
    interpolated linearly in time when recorded at other times (never extrapolated)."""
    have = np.isfinite(time) & np.isfinite(values)
    want = np.isfinite(ref_time) & np.isfinite(ref_values)
    if not have.any() or not want.any():
        return None
    if time.shape == ref_time.shape and np.array_equal(time[have & want], ref_time[have & want]):
        both = have & want
        if both.any():
            return float(np.max(np.abs(values[both] - ref_values[both])))
    t, v = time[have], values[have]
    order = np.argsort(t)
    t, v = t[order], v[order]
    rt, rv = ref_time[want], ref_values[want]
    inside = (rt >= t[0]) & (rt <= t[-1])
    if not inside.any():
        return None
    return float(np.max(np.abs(np.interp(rt[inside], t, v) - rv[inside])))


def scalar_variables(ds: Any) -> list[str]:
    """The store's variables with one number per step (optionally per ``layer``)."""
    sweep = tuple(ds[STATUS].dims)
    out = []
    for name in ds.data_vars:
        dims = tuple(ds[name].dims)
        if (
            name != STATUS
            and dims[: len(sweep) + 1] == (*sweep, STEP)
            and dims[len(sweep) + 1 :] in ((), ("layer",))
        ):
            out.append(str(name))
    # The language's order (losses, then accuracy, then per-layer ones), not the store's
    # alphabetical one; names it does not know go last.
    return sorted(out, key=lambda n: (OBSERVABLES.index(n) if n in OBSERVABLES else len(OBSERVABLES), n))


def slices(ds: Any, variables: Sequence[str] | None = None, *, diverged: bool = False) -> list[Slice]:
    """Every slice of the other sweep variables, with the seed statistics of the chosen
    scalar variables (default: all) at every width: over the done runs, and with
    ``diverged`` also over the finite records a diverged run left before it diverged
    (the coordinate check's blow-up is what it is there to show)."""
    chosen = select_variables(ds, variables)
    sweep = [str(d) for d in ds[STATUS].dims]
    others = [d for d in sweep if d not in SWEEP_FIXED]
    status = np.asarray(_load(ds, STATUS).values)
    widths = [float(w) for w in ds["width"].values]
    time = _load(ds, TIME)
    data = {name: _load(ds, name) for name in {c[0] for c in chosen}}
    out = []
    for combo in _product([list(ds[d].values) for d in others]):
        coords = {d: _plain(v) for d, v in zip(others, combo, strict=True)}
        index = {d: int(np.flatnonzero(ds[d].values == v)[0]) for d, v in zip(others, combo, strict=True)}
        series = []
        for name, layer, label in chosen:
            curves = []
            for wi, width in enumerate(widths):
                sel = {"width": wi, **index}
                cell = status[tuple(sel.get(d, slice(None)) for d in sweep)]  # (seed,)
                done = np.flatnonzero((cell == Status.DONE) | (diverged & (cell == Status.DIVERGED)))
                var = data[name].isel(sel)
                if layer is not None:
                    var = var.sel(layer=layer)
                runs = np.asarray(var.transpose("seed", STEP).values)[done]
                curves.append(Curve(width=width, time=_time(time, sel), runs=runs, counts=Counts.of(cell)))
            series.append(Series(label=label, variable=name, layer=layer, curves=tuple(curves)))
        out.append(Slice(coords=coords, series=tuple(series)))
    return out


def _load(ds: Any, name: str) -> Any:
    """``ds[name]`` read into memory; a chunk that does not decode is a :class:`StoreError`."""
    try:
        return ds[name].load()
    except Exception as error:  # noqa: BLE001 - a damaged chunk: say so, no traceback
        raise StoreError(
            f"'{name}' cannot be read ({type(error).__name__}: {error}); "
            "'mfdsl verify STORE' names the damaged chunks"
        ) from None


def select_variables(ds: Any, wanted: Sequence[str] | None = None) -> list[tuple[str, int | None, str]]:
    """``(variable, layer, label)`` of the chosen scalar variables, in store order.

    ``wanted`` names variables (``weight_change``: all its layers) or single layers
    (``weight_change[layer=2]``); ``None`` chooses all.  A per-layer variable
    contributes the layers it recorded somewhere in the store.
    """
    entries: list[tuple[str, int | None, str]] = []
    for name in scalar_variables(ds):
        if "layer" in ds[name].dims:
            recorded = ds[name].notnull().any([d for d in ds[name].dims if d != "layer"]).values
            for layer, has in zip(ds["layer"].values, np.asarray(recorded), strict=True):
                if has:
                    entries.append((name, int(layer), f"{name}[layer={int(layer)}]"))
        else:
            entries.append((name, None, name))
    if not wanted:
        return entries
    unknown = [w for w in wanted if not any(w in (name, label) for name, _, label in entries)]
    if unknown:
        names = ", ".join(dict.fromkeys(n for n, _, _ in entries)) or "none"
        raise StoreError(f"no scalar variable {', '.join(map(repr, unknown))} in the store (it has: {names})")
    return [e for e in entries if e[0] in wanted or e[2] in wanted]


def _time(time: Any, sel: dict[str, int]) -> np.ndarray:
    t = time.isel({d: i for d, i in sel.items() if d in time.dims})
    extra = [d for d in t.dims if d != STEP]
    values = np.asarray(t.transpose(*extra, STEP).values, dtype=np.float64).reshape(-1, t.sizes[STEP])
    # The same times for every seed (the learning rate never depends on it): take the
    # first row that has them.
    for row in values:
        if np.isfinite(row).any():
            return row
    return values[0]


def _product(values: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
    import itertools

    return itertools.product(*values)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value) if not isinstance(value, (int, float, str)) else value


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- rates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """A log–log least-squares fit ``log y = intercept + slope · log x``."""

    slope: float
    intercept: float
    stderr: float | None  # None with two points (no residual degrees of freedom)
    ci95: tuple[float, float] | None
    points: int

    @property
    def df(self) -> int:
        return self.points - 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "stderr": self.stderr,
            "ci95": list(self.ci95) if self.ci95 is not None else None,
            "points": self.points,
            "df": self.df,
        }


def fit_rate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Rate | None:
    """The slope of ``log y`` against ``log x`` over the points with ``x, y > 0`` finite,
    with its standard error and 95 % interval (t distribution, ``n − 2`` df).  ``None``
    with fewer than two points or a single distinct ``x``."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    n = lx.size
    if n < 2:
        return None
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    if sxx <= 0:
        return None
    slope = float(np.sum((lx - lx.mean()) * (ly - ly.mean())) / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    if n == 2:
        return Rate(slope=slope, intercept=intercept, stderr=None, ci95=None, points=n)
    rss = float(np.sum((ly - intercept - slope * lx) ** 2))
    stderr = math.sqrt(rss / (n - 2) / sxx)
    half = t_quantile_975(n - 2) * stderr
    return Rate(slope=slope, intercept=intercept, stderr=stderr, ci95=(slope - half, slope + half), points=n)


# ---- the report --------------------------------------------------------------------------

#: the variables of the table ``mfdsl run`` prints when a sweep ends (those the store has)
FINAL_TABLE = ("train_loss", "test_loss", "test_accuracy")


def summarize(path: str | os.PathLike[str], variables: Sequence[str] | None = None) -> dict[str, Any]:
    """The report of the store at ``path`` as plain data (what ``mfdsl report --json``
    prints): ``store`` (its absolute path), then what :func:`summarize_dataset` gives."""
    ds = open_results(path)
    try:
        return {"store": os.path.abspath(os.fspath(path)), **summarize_dataset(ds, variables)}
    finally:
        ds.close()


def summarize_dataset(ds: Any, variables: Sequence[str] | None = None) -> dict[str, Any]:
    """The numbers of a store opened with :func:`open_results`, as plain data.

    Keys: ``experiment``, ``store_format``, ``finalized`` (bool), ``variables`` (labels),
    ``sweep`` (values per dimension), and ``slices``: one per combination of the other
    sweep variables, each with

    * ``coords``: the slice's values of the other sweep variables;
    * ``widths``: a row per width: ``width``; ``status``, how its runs (the seeds)
      ended, ``{"done", "failed", "diverged", "pending"}`` counts; ``runs_done`` and
      ``runs`` (done and all); ``final`` {label: {``mean``, ``std``, ``n``}}: the mean and
      sample standard deviation (``ddof = 1``, ``null`` below two runs) of the ``n`` done
      runs' last finite records — diverged and failed runs never enter it; ``distance``
      {label: ``sup_t |seed mean − reference|`` or ``null``};
    * ``reference`` {label: ``{"kind": "limit" | "widest" | null, "width": …}``};
    * ``rates`` {label: the fit (:meth:`Rate.as_dict`) of the distance to the limit, or
      ``null``} and ``rate_notes`` {label: why there is no rate, or ``null``}.

    The limit's width is the string ``"inf"``; a missing number is ``null``.
    """
    parts = slices(ds, variables)
    labels = [s.label for s in parts[0].series] if parts else []
    return {
        "experiment": str(ds.attrs.get("experiment", "")),
        "store_format": int(ds.attrs["mfdsl_store_format"]),
        "finalized": "finalized" in ds.attrs,
        "variables": labels,
        "sweep": {
            str(d): [_json_width(v) if d == "width" else _plain(v) for v in ds[d].values]
            for d in ds[STATUS].dims
        },
        "slices": [_slice_summary(part) for part in parts],
    }


def _slice_summary(part: Slice) -> dict[str, Any]:
    rows: dict[float, dict[str, Any]] = {}
    references: dict[str, Any] = {}
    rates: dict[str, Any] = {}
    notes: dict[str, str | None] = {}
    for series in part.series:
        kind, ref_width, dist = series.distances()
        references[series.label] = {
            "kind": kind,
            "width": _json_width(ref_width) if ref_width is not None else None,
        }
        rate, note = series.rate()
        rates[series.label] = rate.as_dict() if rate is not None else None
        notes[series.label] = note
        for curve in series.curves:
            row = rows.setdefault(
                curve.width,
                {
                    "width": _json_width(curve.width),
                    "status": curve.counts.as_dict(),
                    "runs_done": curve.done,
                    "runs": curve.total,
                    "final": {},
                    "distance": {},
                },
            )
            finals = curve.finals
            row["final"][series.label] = {
                "mean": _num(finals.mean()) if finals.size else None,
                "std": _num(finals.std(ddof=1)) if finals.size > 1 else None,
                "n": int(finals.size),
            }
            row["distance"][series.label] = _num(dist[curve.width]) if curve.width in dist else None
    return {
        "coords": part.coords,
        "reference": references,
        "widths": list(rows.values()),
        "rates": rates,
        "rate_notes": notes,
    }


def _json_width(width: Any) -> float | int | str:
    w = float(width)
    if math.isinf(w):
        return "inf"
    return int(w) if w.is_integer() else w


def _num(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


# ---- tables ------------------------------------------------------------------------------


def final_text(final: dict[str, Any]) -> str:
    """A ``final`` entry of :func:`summarize_dataset` as the tables show it:
    ``mean ± std``, the mean alone from one run, ``—`` from none."""
    if final["mean"] is None:
        return "—"
    return f"{final['mean']:.4g}" + (f" ± {final['std']:.2g}" if final["std"] is not None else "")


def runs_text(status: dict[str, int]) -> str:
    """A row's ``status`` counts as the tables show them: ``done/all``, then the runs
    that did not finish, by how they ended (``2/3 (1 diverged)``)."""
    total = sum(status.values())
    rest = [f"{status[k]} {k}" for k in ("diverged", "failed", "pending") if status.get(k)]
    return f"{status['done']}/{total}" + (f" ({', '.join(rest)})" if rest else "")


_FINAL_NOTE = (
    "final: each done run's last record, mean ± sample std over seeds (ddof 1); "
    "runs: done/all, diverged, failed and pending runs counted apart, never averaged"
)


def final_table(path: str | os.PathLike[str], console: Any, variables: Sequence[str] = FINAL_TABLE) -> None:
    """The table ``mfdsl run`` prints when a sweep ends: per slice of the other sweep
    variables and width, the final values of ``variables`` (those the store has) and
    how the runs ended — the numbers of ``mfdsl report``, from :func:`summarize_dataset`.
    Raises :class:`StoreError` if the store cannot be read (the sweep that wrote it
    must not end on a traceback)."""
    ds = open_results(path)
    try:
        present = [v for v in variables if v in scalar_variables(ds)]
        if not present:
            return
        summary = summarize_dataset(ds, present)
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - the sweep that wrote it must not end on a traceback
        where = os.fspath(path)
        raise StoreError(
            f"{where} cannot be summarized ({type(error).__name__}: {error}); 'mfdsl verify {where}' says more"
        ) from None
    finally:
        ds.close()
    render_final(summary, console)


def render_final(summary: dict[str, Any], console: Any) -> None:
    """The final values of a :func:`summarize_dataset` summary as one table: a row per
    slice and width, a column per variable, and the runs' outcomes."""
    from rich.markup import escape
    from rich.table import Table

    labels = summary["variables"]
    if not labels or not summary["slices"]:
        return
    others = list(summary["slices"][0]["coords"])
    table = Table(title="final values (mean ± std over the done seeds)", title_justify="left")
    for name in [*others, "width"]:
        table.add_column(escape(name), justify="right", no_wrap=True)
    for label in labels:
        table.add_column(escape(label), justify="right", no_wrap=True)
    table.add_column("runs", justify="right")  # wraps before a number is cut short
    for i, part in enumerate(summary["slices"]):
        if i:
            table.add_section()
        for j, row in enumerate(part["widths"]):
            coords = [escape(_fmt_value(part["coords"][d])) if j == 0 else "" for d in others]
            finals = [final_text(row["final"][label]) for label in labels]
            table.add_row(*coords, _fmt_width(row["width"]), *finals, runs_text(row["status"]))
    console.print(table)
    console.print(f"{_FINAL_NOTE}; distances to the limit and rates: mfdsl report")


def render(summary: dict[str, Any], console: Any) -> None:
    """The report as rich tables, one per slice: for each variable a row per width
    (runs, final mean ± std, distance to the reference) and a row with the rate."""
    from rich.markup import escape
    from rich.table import Table

    labels = summary["variables"]
    console.print(f"[bold]{escape(summary['experiment'] or 'results')}[/bold]  ({escape(summary['store'])})")
    if not summary["finalized"]:
        console.print("[yellow]note:[/yellow] the store is not finalized: runs may still be writing")
    if not labels:
        console.print("no scalar variables recorded")
        return
    for part in summary["slices"]:
        title = escape(", ".join(f"{k} = {_fmt_value(v)}" for k, v in part["coords"].items()))
        console.print()
        table = Table(title=title or None, title_justify="left", title_style="bold")
        # Labels and numbers never wrap: a narrow terminal squeezes the final column.
        table.add_column("variable", no_wrap=True)
        table.add_column("width", justify="right", no_wrap=True)
        # The runs' outcomes wrap ("2/3 (1 diverged," over "1 failed)") before any number
        # is cut short.
        table.add_column("runs", justify="right")
        table.add_column("final", justify="right", no_wrap=True)
        table.add_column("dist. to ref", justify="right", no_wrap=True)
        for i, label in enumerate(labels):
            if i:
                table.add_section()
            ref = part["reference"][label]
            for j, row in enumerate(part["widths"]):
                dist = row["distance"][label]
                if dist is not None:
                    shown = f"{dist:.3g}"
                elif ref["kind"] is not None and row["width"] == ref["width"]:
                    shown = "ref"
                else:
                    shown = "—"
                table.add_row(
                    escape(label) if j == 0 else "",
                    _fmt_width(row["width"]),
                    runs_text(row["status"]),
                    final_text(row["final"][label]),
                    shown,
                )
            rate = part["rates"][label]
            if rate is None:
                cell = "—"
            elif rate["ci95"] is None:
                cell = f"{rate['slope']:.3f} (no CI)"
            else:
                cell = f"{rate['slope']:.3f} ± {(rate['ci95'][1] - rate['ci95'][0]) / 2:.3f}"
            table.add_row("", "rate", "", "", cell, style="bold")
        console.print(table)
        kinds = sorted({(r["kind"], str(r["width"])) for r in part["reference"].values() if r["kind"]})
        refs = ", ".join(
            "the limit (width ∞)" if k == "limit" else f"the widest run with results (width {w})"
            for k, w in kinds
        )
        console.print(
            f"{_FINAL_NOTE}; "
            "dist. to ref: sup over time of |seed mean − ref|, "
            f"ref = {refs or 'none (no limit with results, and fewer than two widths with results)'}; "
            "rate: least-squares slope of log dist. to the limit against log width ± its 95% CI "
            "(t distribution; none from two widths)"
        )
        missing: dict[str, list[str]] = {}
        for label in labels:
            note = part["rate_notes"][label]
            if note is not None:
                missing.setdefault(note, []).append(label)
        for note, which in missing.items():
            console.print(f"[yellow]no rate[/yellow] for {escape(', '.join(which))}: {escape(note)}")


def _fmt_width(width: Any) -> str:
    return "∞" if width == "inf" else f"{width:g}"


def print_summary(console: Any, store: str) -> None:
    """What ``mfdsl run`` prints at the end: the final values per slice and width, with
    how the runs ended (the numbers of ``mfdsl report``: :func:`final_table`), and how
    to open the store."""
    from rich.markup import escape

    try:
        final_table(store, console)
    except StoreError as error:  # the runs are in the store all the same
        console.print(f"[yellow]no table of final values:[/yellow] {escape(str(error))}")
    console.print(f"results: [bold]{store}[/bold] — open with  xarray.open_zarr({store!r})")
