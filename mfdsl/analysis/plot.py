"""``mfdsl plot``: figures of a results store (matplotlib, the optional ``plot`` extra).

Five kinds:

* ``curves`` (default) — a panel per scalar variable (per layer for ``weight_change``,
  ``neuron_spread`` and ``preactivation_rms``) and per slice of the other sweep
  variables, against mean-field time.  One line per width: the mean over the done
  seeds, coloured on viridis by log-width, the limit (``width = inf``) in black; the
  band around it is ±1 standard deviation over seeds.  Log-spaced records get a symlog
  time axis.
* ``convergence`` — per variable and slice, ``sup_t |seed mean − limit|`` (or − the
  widest run, without a limit) against width on log–log axes, with an ``n^{-1/2}``
  guide and, against the limit, the least-squares line and its slope (95 % interval)
  in the legend: the rate ``mfdsl report`` gives (:meth:`~mfdsl.analysis.report.Series.rate`),
  and, where it gives none, its reason.
* ``particles`` — the ``particles`` sample as scatter plots, incoming weight
  ``w_in_1`` against outgoing ``w_out``, coloured by ``‖w_in‖``, at the first, middle
  and last recorded time: a row per width, for the first done seed of the first slice.
* ``transfer`` — μP's transfer figure: the final (or best) loss against a swept
  learning rate, one curve per width, the optimum of each marked by a star; log x.
  The learning-rate variable is found from the store (:func:`learning_rate_variable`)
  or named (``x``).  :func:`transfer_data` gives its numbers.
* ``coord`` — mup's coordinate check: ``preactivation_rms`` of each layer against
  width at a few record steps, log–log, a panel per layer (the limit's value, where
  stored, as a dotted level): flat lines mean activations of a width-independent size.
  A diverged run counts with the records it made before diverging: its blow-up is
  what the check is for.

Panels wrap into a near-square grid (:func:`wrap_shape`), or are faceted by sweep
variables with ``row`` / ``col`` (:func:`layout`).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot: nothing opens a window, and the process's backend is left alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfdsl.analysis.report import (
    STATUS,
    STEP,
    SWEEP_FIXED,
    TIME,
    Curve,
    Series,
    Slice,
    StoreError,
    open_results,
    scalar_variables,
    select_variables,
    slices,
)
from mfdsl.core.errors import count, did_you_mean
from mfdsl.store.status import Status

KINDS = ("curves", "convergence", "particles", "transfer", "coord")
FORMATS = (".png", ".svg", ".pdf")
INSTALL_HINT = "pip install 'mfdsl[plot]'"


class PlotError(Exception):
    """A plot that cannot be made: matplotlib missing, or a bad output name or kind."""


def default_output(store: str | os.PathLike[str], kind: str = "curves") -> str:
    """``<store name>.png`` in the current directory (``<name>-<kind>.png`` for the
    other kinds), the store name without its ``.zarr``."""
    name = os.path.basename(os.path.normpath(os.fspath(store)))
    if name.endswith(".zarr"):
        name = name[: -len(".zarr")]
    return f"{name}.png" if kind == "curves" else f"{name}-{kind}.png"


def plot_store(
    store: str | os.PathLike[str],
    *,
    kind: str = "curves",
    variables: Sequence[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    row: str | None = None,
    col: str | None = None,
    x: str | None = None,
    best: bool = False,
    steps: Sequence[int] | None = None,
) -> str:
    """Draw ``kind`` for ``store`` into ``output`` (format from its extension: png, svg
    or pdf; default :func:`default_output`) and return the path written.  The keywords
    are :func:`make_figure`'s."""
    out = os.fspath(output) if output is not None else default_output(store, kind)
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise PlotError(f"cannot tell the format of {out!r}: give a file ending in {', '.join(FORMATS)}")
    fig = make_figure(store, kind=kind, variables=variables, row=row, col=col, x=x, best=best, steps=steps)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def make_figure(
    store: str | os.PathLike[str],
    *,
    kind: str = "curves",
    variables: Sequence[str] | None = None,
    row: str | None = None,
    col: str | None = None,
    x: str | None = None,
    best: bool = False,
    steps: Sequence[int] | None = None,
) -> Any:
    """The ``matplotlib.figure.Figure`` of ``kind`` for ``store`` (not saved).

    ``row`` / ``col`` facet the panels by a sweep variable (:func:`layout`); ``x`` and
    ``best`` are the transfer plot's (the swept variable on its x axis, the best value
    over the records instead of the final one), ``steps`` the coordinate check's (the
    record steps drawn)."""
    if kind not in KINDS:
        raise PlotError(f"unknown plot kind {kind!r} (one of {', '.join(KINDS)})")
    for flag, given, own in (
        ("--x", x is not None, "transfer"),
        ("--best", best, "transfer"),
        ("--step", bool(steps), "coord"),
    ):
        if given and kind != own:
            raise PlotError(f"{flag} belongs to --kind {own}, not {kind}")
    if kind == "particles" and (row is not None or col is not None):
        raise PlotError(
            "the particles plot has a row per width and a column per time: it takes no --row or --col"
        )
    figure_cls = _figure_class()
    ds = open_results(store)
    try:
        if kind == "particles":
            return _particles(figure_cls, ds)
        if kind == "transfer":
            if variables is not None and len(variables) > 1:
                raise PlotError("the transfer plot shows one variable: give --var once")
            return _transfer(figure_cls, ds, variables[0] if variables else None, x, best, row, col)
        if kind == "coord":
            return _coord(figure_cls, ds, variables, steps, row, col)
        others = [*(str(d) for d in ds[STATUS].dims if d not in SWEEP_FIXED), "seed"]
        check_facets(others, row, col, {"width": "one line per width"})
        parts = seed_slices(ds, variables, by_seed="seed" in (row, col))
        if not parts or not parts[0].series:
            raise StoreError(f"{os.fspath(store)} has no scalar variable to plot")
        if not any(np.isfinite(c.mean).any() for p in parts for s in p.series for c in s.curves):
            raise StoreError(f"{os.fspath(store)} has no finished run to plot")
        draw = _curves if kind == "curves" else _convergence
        return draw(figure_cls, parts, row, col)
    finally:
        ds.close()


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    return Figure


# ---- curves ------------------------------------------------------------------------------


def _colours(widths: Sequence[float]) -> dict[float, Any]:
    """Viridis over log-width for the finite widths; the limit black."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    finite = sorted(w for w in widths if math.isfinite(w))
    out: dict[float, Any] = {}
    lo, hi = (math.log(finite[0]), math.log(finite[-1])) if finite else (0.0, 0.0)
    for w in finite:
        # Stop short of viridis' pale yellow end, which vanishes on white.
        out[w] = cmap(0.0 if hi == lo else 0.9 * (math.log(w) - lo) / (hi - lo))
    for w in widths:
        if not math.isfinite(w):
            out[w] = "black"
    return out


def _width_label(width: float) -> str:
    return "limit (width ∞)" if math.isinf(width) else f"width {width:g}"


def _grid(
    figure_cls: Any, rows: int, cols: int, size: tuple[float, float] = (3.6, 2.8), share: bool = False
) -> tuple[Any, np.ndarray]:
    fig = figure_cls(figsize=(size[0] * cols, size[1] * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(np.asarray(fig.subplots(rows, cols, squeeze=False, sharex=share, sharey=share)))
    return fig, axes


# ---- panels: wrapped grid or facets ------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One panel: what it shows (``key``, e.g. a variable or a layer), the sweep slice
    it shows it for, and what the drawing function needs."""

    key: str
    coords: dict[str, Any]
    payload: Any

    @property
    def title(self) -> str:
        where = ", ".join(f"{k} = {_fmt(v)}" for k, v in self.coords.items())
        return f"{self.key}\n{where}" if where else self.key


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def wrap_shape(n: int) -> tuple[int, int]:
    """``(rows, columns)`` of a near-square grid for ``n`` panels: ``ceil(√n)`` columns,
    as few rows as hold them (12 panels: 3 × 4; 5: 2 × 3)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def seed_slices(
    ds: Any, variables: Sequence[str] | None, *, by_seed: bool, diverged: bool = False
) -> list[Slice]:
    """:func:`~mfdsl.analysis.report.slices`, or with ``by_seed`` the slices of each seed
    apart (``seed`` the last of their coordinates), for a facet by seed: each panel
    then shows one seed's runs instead of the mean over seeds."""
    if not by_seed:
        return slices(ds, variables, diverged=diverged)
    out = []
    for i, seed in enumerate(ds["seed"].values):
        for part in slices(ds.isel(seed=[i]), variables, diverged=diverged):
            out.append(Slice(coords={**part.coords, "seed": int(seed)}, series=part.series))
    return out


def check_facets(
    available: Sequence[str], row: str | None, col: str | None, drawn: dict[str, str] | None = None
) -> None:
    """A :class:`PlotError` unless ``row`` and ``col`` (when given) are two different
    variables of ``available``; ``drawn`` maps the sweep variables a plot draws inside
    each panel to how (``{"width": "one line per width"}``), for the message."""
    if row is not None and row == col:
        raise PlotError(
            f"--row and --col are both {row!r}: facet rows and columns by two different variables"
        )
    for flag, name in (("--row", row), ("--col", col)):
        if name is None or name in available:
            continue
        if drawn and name in drawn:
            raise PlotError(
                f"cannot facet by {name!r} ({flag}): this plot draws it in every panel ({drawn[name]})"
            )
        have = ", ".join(available) if available else "none besides those drawn in each panel"
        hint = did_you_mean(name, available)
        raise PlotError(
            f"cannot facet by {name!r} ({flag}): not a sweep variable of the store "
            f"(it can facet by: {have})" + (f"; {hint}" if hint else "")
        )


def layout(
    figure_cls: Any,
    panels: Sequence[Panel],
    row: str | None = None,
    col: str | None = None,
    size: tuple[float, float] = (3.6, 2.8),
) -> tuple[Any, list[tuple[Any, Panel]], tuple[int, int]]:
    """A figure with one axes per panel, and the grid's ``(rows, columns)``.

    Without facets the panels wrap into a near-square grid (:func:`wrap_shape`), in
    order.  ``col = VAR`` gives a column per value of the sweep variable VAR and a row
    per remaining panel key (the variable or layer shown, and the other sweep variables'
    values); ``row = VAR`` the transpose; both, a row per (key, row value) and a column
    per column value.  Panels of one key share their y axis across facets, so values
    compare at a glance.  Unfilled cells of the grid get no axes.
    """

    def values(name: str) -> list[Any]:
        return list(dict.fromkeys(p.coords[name] for p in panels))

    def rest(p: Panel) -> tuple[Any, ...]:
        return (p.key, *((k, v) for k, v in p.coords.items() if k not in (row, col)))

    if row is None and col is None:
        nrows, ncols = wrap_shape(len(panels))
        cells = [divmod(i, ncols) for i in range(len(panels))]
    else:
        keys = list(dict.fromkeys(rest(p) for p in panels))
        rvals = values(row) if row is not None else [None]
        cvals = values(col) if col is not None else [None]
        cells = []
        for p in panels:
            k = keys.index(rest(p))
            r = rvals.index(p.coords[row]) if row is not None else 0
            c = cvals.index(p.coords[col]) if col is not None else 0
            if col is None:  # rows = row values, columns = keys
                cells.append((r, k))
            else:  # rows = keys (× row values), columns = column values
                cells.append((k * len(rvals) + r, c))
        nrows = max(r for r, _ in cells) + 1
        ncols = max(c for _, c in cells) + 1
    fig = figure_cls(figsize=(size[0] * ncols, size[1] * nrows + 0.6), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    placed: list[tuple[Any, Panel]] = []
    first: dict[str, Any] = {}
    for (r, c), panel in zip(cells, panels, strict=True):
        share = first.get(panel.key) if (row is not None or col is not None) else None
        ax = fig.add_subplot(grid[r, c], sharey=share)
        first.setdefault(panel.key, ax)
        placed.append((ax, panel))
    return fig, placed, (nrows, ncols)


def _log_spaced(times: np.ndarray) -> bool:
    positive = np.unique(times[np.isfinite(times) & (times > 0)])
    if positive.size < 4:
        return False
    gaps = np.diff(positive)
    # Records every N steps have equal gaps; log-spaced ones, gaps growing with time.
    return bool(positive[-1] / positive[0] > 50 and gaps[-1] > 5 * gaps[0])


def _curves(figure_cls: Any, parts: list[Slice], row: str | None, col: str | None) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = [Panel(series.label, part.coords, series) for part in parts for series in part.series]
    fig, placed, (_, cols) = layout(figure_cls, panels, row, col)
    widths = [c.width for c in parts[0].series[0].curves]
    colours = _colours(widths)
    seeds = max((c.done for p in parts for s in p.series for c in s.curves), default=1)
    all_times = np.concatenate([c.time for p in parts for s in p.series for c in s.curves])
    symlog = _log_spaced(all_times)
    for ax, panel in placed:
        for curve in panel.payload.curves:
            mean, std = curve.mean, curve.std
            ok = np.isfinite(mean) & np.isfinite(curve.time)
            if not ok.any():
                continue
            colour = colours[curve.width]
            lw = 2.0 if math.isinf(curve.width) else 1.4
            ax.plot(curve.time[ok], mean[ok], color=colour, lw=lw, zorder=3 if math.isinf(curve.width) else 2)
            if curve.runs.shape[0] > 1:
                ax.fill_between(
                    curve.time[ok], (mean - std)[ok], (mean + std)[ok], color=colour, alpha=0.18, lw=0
                )
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("time (lr × step)")
        if symlog:
            positive = all_times[np.isfinite(all_times) & (all_times > 0)]
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.grid(alpha=0.3)
    handles: list[Any] = [
        Line2D([], [], color=colours[w], lw=2.0 if math.isinf(w) else 1.4, label=_width_label(w))
        for w in widths
    ]
    handles.append(
        Patch(
            color="grey",
            alpha=0.3,
            label=f"mean over the done seeds ± 1 sample std (up to {seeds} seed{'s' * (seeds > 1)})",
        )
    )
    _legend(fig, handles, cols)
    return fig


def _legend(fig: Any, handles: list[Any], cols: int) -> None:
    # At most two legend entries per column of panels: a narrow figure's legend would
    # otherwise run off its sides.
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=max(1, min(len(handles), 6, 2 * cols)),
        fontsize=8,
        frameon=False,
    )


# ---- convergence -------------------------------------------------------------------------


def _convergence(figure_cls: Any, parts: list[Slice], row: str | None, col: str | None) -> Any:
    panels = [Panel(series.label, part.coords, (series, part)) for part in parts for series in part.series]
    fig, placed, _ = layout(figure_cls, panels, row, col, size=(3.6, 3.0))
    for ax, panel in placed:
        _convergence_panel(ax, *panel.payload)
    return fig


def _convergence_panel(ax: Any, series: Series, part: Slice) -> None:
    kind, ref_width, dist = series.distances()
    against = "limit" if kind == "limit" else f"width {ref_width:g}" if ref_width is not None else "—"
    title = f"{series.label}: sup_t |mean − {against}|"
    ax.set_title(title if not part.coords else f"{title}\n{part.title}", fontsize=9)
    ax.set_xlabel("width n")
    widths = np.array(sorted(dist), dtype=np.float64)
    values = np.array([dist[w] for w in widths], dtype=np.float64)
    positive = values > 0
    if not positive.any():
        ax.text(
            0.5, 0.5, "no distance to compute", ha="center", va="center", transform=ax.transAxes, fontsize=8
        )
        return
    ax.loglog(widths[positive], values[positive], "o", color="C0", label="seed mean")
    rate, note = series.rate()
    grid = np.geomspace(widths[positive].min(), widths[positive].max(), 50)
    if rate is not None:
        if rate.ci95 is not None:
            label = f"slope {rate.slope:.2f} (95% CI {rate.ci95[0]:.2f} … {rate.ci95[1]:.2f})"
        else:
            label = f"slope {rate.slope:.2f} (two widths, no CI)"
        ax.loglog(grid, np.exp(rate.intercept) * grid**rate.slope, "-", color="C3", label=label)
    elif note is not None:
        # An empty entry carries the reason (wrapped: a panel is narrow).
        ax.plot([], [], " ", label=textwrap.fill(f"no rate: {note}", 44))
    first = np.flatnonzero(positive)[0]
    ax.loglog(grid, values[first] * (grid / widths[first]) ** -0.5, ":", color="grey", label="n^-1/2 (guide)")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, which="both")


# ---- transfer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferCurve:
    """One width of a transfer panel: the swept values ``x``, the seed mean (and sample
    std) of each run's final or best value there (NaN where no run is done), and the
    optimum: the ``x`` of the lowest mean (highest, for an accuracy)."""

    width: float
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    done: np.ndarray  # done runs per x

    def optimum(self, maximize: bool = False) -> tuple[float, float] | None:
        """``(x, value)`` at the best seed mean, or ``None`` with no done run."""
        ok = np.flatnonzero(np.isfinite(self.mean))
        if not ok.size:
            return None
        pick = ok[np.argmax(self.mean[ok]) if maximize else np.argmin(self.mean[ok])]
        return float(self.x[pick]), float(self.mean[pick])


@dataclass(frozen=True)
class Transfer:
    """The numbers of ``mfdsl plot --kind transfer``: per slice of the sweep variables
    other than width, seed and ``x``, a :class:`TransferCurve` per width."""

    variable: str
    x: str
    is_lr: bool
    best: bool
    maximize: bool
    panels: tuple[tuple[dict[str, Any], tuple[TransferCurve, ...]], ...]

    def optima(self) -> list[tuple[dict[str, Any], dict[float, float]]]:
        """Per slice, ``{width: x at the optimum}`` (widths without a done run left out)."""
        out = []
        for coords, curves in self.panels:
            best = {c.width: opt[0] for c in curves if (opt := c.optimum(self.maximize)) is not None}
            out.append((coords, best))
        return out


def learning_rate_variable(ds: Any) -> str | None:
    """The sweep variable the learning rate varies with, or ``None``: the store's
    ``time`` coordinate spans exactly the sweep dimensions over which the learning rate
    varies (``docs/store.md``), so this finds it whatever the variable is called and
    however the spec's ``lr`` is written in it.  A learning rate varying with the
    width alone, or with several other variables, has no single answer (``None``)."""
    dims = [str(d) for d in ds[TIME].dims if d not in (STEP, "width", "seed")]
    return dims[0] if len(dims) == 1 else None


def transfer_data(
    ds: Any,
    *,
    variable: str | None = None,
    x: str | None = None,
    best: bool = False,
    by_seed: bool = False,
) -> Transfer:
    """The transfer figure's numbers from an open store: each done run's final value of
    ``variable`` (default ``test_loss``, else ``train_loss``), or with ``best`` its
    lowest (an accuracy: highest) over the records, averaged over seeds (with
    ``by_seed``, each seed apart: its panels' coordinates name it), against the sweep
    variable ``x`` (default: :func:`learning_rate_variable`)."""
    sweep = [str(d) for d in ds[STATUS].dims]
    others = [d for d in sweep if d not in SWEEP_FIXED]
    lr_var = learning_rate_variable(ds)
    if x is None:
        if lr_var is None:
            varying = [str(d) for d in ds[TIME].dims if d != STEP]
            why = (
                "the learning rate is the same in every run"
                if not varying
                else f"the learning rate varies with {', '.join(varying)}, not with one other sweep variable"
            )
            raise PlotError(
                f"the transfer plot needs a swept learning rate, but {why}: sweep it "
                "(e.g. sweep { lr = [0.01, 0.03, 0.1, 0.3] } with optimizer = sgd(lr = lr)), "
                f"or name the variable for the x axis with --x VAR (sweep variables: {', '.join(others) or 'none'})"
            )
        x = lr_var
    elif x not in others:
        if x in SWEEP_FIXED:
            raise PlotError(f"--x {x}: the transfer plot draws one curve per width and averages the seeds")
        hint = did_you_mean(x, others)
        raise PlotError(
            f"--x {x!r} is not a sweep variable of the store (sweep variables besides width and seed: "
            f"{', '.join(others) or 'none'})" + (f"; {hint}" if hint else "")
        )
    names = scalar_variables(ds)
    if variable is None:
        variable = next((n for n in ("test_loss", "train_loss") if n in names), None)
        if variable is None:
            raise StoreError("the store records neither test_loss nor train_loss: name a variable with --var")
    chosen = select_variables(ds, [variable])
    if len(chosen) != 1:
        raise PlotError(f"the transfer plot shows one variable; {variable!r} has {len(chosen)} layers")
    maximize = "accuracy" in variable
    xs = list(ds[x].values)
    if not np.issubdtype(ds[x].dtype, np.number):
        raise PlotError(
            f"--x {x}: its values ({', '.join(map(str, xs))}) are not numbers; "
            "the transfer plot puts a numeric sweep variable on its x axis"
        )
    parts = seed_slices(ds, [variable], by_seed=by_seed)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    cells: dict[tuple[Any, ...], dict[float, dict[int, Curve]]] = {}
    for part in parts:
        coords = {k: v for k, v in part.coords.items() if k != x}
        key = tuple(coords.items())
        groups.setdefault(key, coords)
        xi = next(i for i, v in enumerate(xs) if _plain_eq(v, part.coords[x]))
        for curve in part.series[0].curves:
            cells.setdefault(key, {}).setdefault(curve.width, {})[xi] = curve
    panels = []
    for key, coords in groups.items():
        curves = []
        for width, by_x in cells[key].items():
            mean = np.full(len(xs), np.nan)
            std = np.full(len(xs), np.nan)
            done = np.zeros(len(xs), dtype=np.int64)
            for xi, curve in by_x.items():
                values = _run_values(curve.runs, best, maximize)
                done[xi] = values.size
                if values.size:
                    mean[xi] = float(values.mean())
                    std[xi] = float(values.std(ddof=1)) if values.size > 1 else math.nan
            curves.append(TransferCurve(width, np.asarray(xs, dtype=np.float64), mean, std, done))
        panels.append((coords, tuple(curves)))
    return Transfer(
        variable=chosen[0][2],
        x=x,
        is_lr=x == lr_var,
        best=best,
        maximize=maximize,
        panels=tuple(panels),
    )


def _plain_eq(a: Any, b: Any) -> bool:
    a = a.item() if isinstance(a, np.generic) else a
    return bool(a == b) or str(a) == str(b)


def _run_values(runs: np.ndarray, best: bool, maximize: bool) -> np.ndarray:
    """Each run's last finite value, or its best over the records."""
    out = []
    for row in runs:
        finite = row[np.isfinite(row)]
        if finite.size:
            out.append((finite.max() if maximize else finite.min()) if best else finite[-1])
    return np.array(out, dtype=np.float64)


def _transfer(
    figure_cls: Any,
    ds: Any,
    variable: str | None,
    x: str | None,
    best: bool,
    row: str | None,
    col: str | None,
) -> Any:
    from matplotlib.lines import Line2D

    data = transfer_data(ds, variable=variable, x=x, best=best, by_seed="seed" in (row, col))
    if not any(np.isfinite(c.mean).any() for _, curves in data.panels for c in curves):
        raise StoreError("no finished run to plot")
    others = [*(str(d) for d in ds[STATUS].dims if d not in (*SWEEP_FIXED, data.x)), "seed"]
    check_facets(others, row, col, {"width": "one curve per width", data.x: "the x axis"})
    widths = sorted({c.width for _, curves in data.panels for c in curves})
    colours = _colours(widths)
    what = f"{'best' if best else 'final'} {data.variable}"
    panels = [Panel(what, coords, curves) for coords, curves in data.panels]
    fig, placed, (_, cols) = layout(figure_cls, panels, row, col, size=(4.0, 3.2))
    positive = all(float(v) > 0 for v in np.asarray(data.panels[0][1][0].x))
    means = np.concatenate([c.mean for _, curves in data.panels for c in curves])
    means = means[np.isfinite(means)]
    # Losses near a diverging learning rate can be orders of magnitude above the
    # optimum; a linear axis would flatten every curve's bottom, where it matters.
    # One choice for all panels: faceted panels share their y axis.
    log_y = bool(means.size and means.min() > 0 and means.max() / means.min() > 10)
    for ax, panel in placed:
        for curve in panel.payload:
            ok = np.isfinite(curve.mean)
            if not ok.any():
                continue
            colour = colours[curve.width]
            ax.plot(
                curve.x[ok], curve.mean[ok], "o-", color=colour, ms=3, lw=1.4, label=_width_label(curve.width)
            )
            bar = ok & np.isfinite(curve.std)
            if bar.any():
                ax.errorbar(
                    curve.x[bar],
                    curve.mean[bar],
                    yerr=curve.std[bar],
                    fmt="none",
                    ecolor=colour,
                    lw=0.8,
                    alpha=0.6,
                )
            opt = curve.optimum(data.maximize)
            if opt is not None:
                ax.plot(
                    [opt[0]],
                    [opt[1]],
                    marker="*",
                    ms=13,
                    ls="none",
                    color=colour,
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    zorder=4,
                    gid=f"optimum width={curve.width:g}",
                )
        if positive:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"{data.x} (learning rate)" if data.is_lr else data.x)
        ax.set_ylabel("seed mean ± 1 sample std", fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles: list[Any] = [
        Line2D([], [], color=colours[w], marker="o", ms=3, lw=1.4, label=_width_label(w)) for w in widths
    ]
    handles.append(
        Line2D(
            [], [], marker="*", ms=11, ls="none", color="grey", markeredgecolor="black",
            label="optimum of each width",
        )
    )  # fmt: skip
    _legend(fig, handles, cols)
    return fig


# ---- coordinate check --------------------------------------------------------------------

COORD_VARIABLE = "preactivation_rms"


def coord_steps(recorded: Sequence[int], wanted: Sequence[int] | None = None, most: int = 4) -> list[int]:
    """The record steps the coordinate check draws: ``wanted`` (each must be recorded),
    or step 0 and up to ``most − 1`` more, spread geometrically up to the last."""
    steps = sorted(int(s) for s in recorded)
    if wanted:
        missing = [s for s in wanted if s not in steps]
        if missing:
            near = ", ".join(str(min(steps, key=lambda r: abs(r - m))) for m in missing)
            raise PlotError(
                f"step {', '.join(map(str, missing))} is not a record step of the store "
                f"(nearest recorded: {near}; it records {count(len(steps), 'step')} from {steps[0]} to {steps[-1]})"
            )
        return sorted(set(int(s) for s in wanted))
    if len(steps) <= most:
        return steps
    picks = {steps[0], steps[-1]}
    later = [s for s in steps if s > 0] or steps
    for target in np.geomspace(later[0], later[-1], most - 1)[:-1]:
        picks.add(min(later, key=lambda s: abs(math.log(s / target)) if s > 0 else math.inf))
    return sorted(picks)


def _coord(
    figure_cls: Any,
    ds: Any,
    variables: Sequence[str] | None,
    steps: Sequence[int] | None,
    row: str | None,
    col: str | None,
) -> Any:
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    if COORD_VARIABLE not in ds.data_vars:
        raise StoreError(
            f"the store has no '{COORD_VARIABLE}' record: add {COORD_VARIABLE} to the spec's record block "
            "(the coordinate check plots it)"
        )
    wanted = [v for v in variables or () if not v.startswith(COORD_VARIABLE)]
    if wanted:
        raise PlotError(
            f"the coordinate check plots {COORD_VARIABLE}, one panel per layer: --var takes "
            f"e.g. {COORD_VARIABLE}[layer=1], not {', '.join(map(repr, wanted))}"
        )
    others = [*(str(d) for d in ds[STATUS].dims if d not in SWEEP_FIXED), "seed"]
    check_facets(others, row, col, {"width": "the x axis"})
    parts = seed_slices(
        ds, list(variables) if variables else [COORD_VARIABLE], by_seed="seed" in (row, col), diverged=True
    )
    recorded = [int(s) for s in ds[STEP].values]
    chosen = coord_steps(recorded, steps)
    at = [recorded.index(s) for s in chosen]
    cmap = colormaps["plasma"]
    colour = {s: cmap(0.85 * i / max(1, len(chosen) - 1)) for i, s in enumerate(chosen)}
    panels = [
        Panel(f"RMS of H_{series.layer} (layer {series.layer})", part.coords, series)
        for part in parts
        for series in part.series
    ]
    if not panels:
        raise StoreError(f"no layer has a {COORD_VARIABLE} record")
    fig, placed, (_, cols) = layout(figure_cls, panels, row, col, size=(3.6, 3.0))
    drawn = False
    values: dict[str, list[float]] = {}  # the y values of each key's panels (they share y)
    for ax, panel in placed:
        finite = [c for c in panel.payload.curves if math.isfinite(c.width)]
        limit = [c for c in panel.payload.curves if math.isinf(c.width) and np.isfinite(c.mean).any()]
        widths = np.array([c.width for c in finite], dtype=np.float64)
        for step, k in zip(chosen, at, strict=True):
            y = np.array([c.mean[k] for c in finite], dtype=np.float64)
            ok = np.isfinite(y) & (y > 0)
            if ok.any():
                drawn = True
                ax.plot(widths[ok], y[ok], "o-", color=colour[step], ms=3, lw=1.4, gid=f"step={step}")
                values.setdefault(panel.key, []).extend(y[ok].tolist())
            if limit and np.isfinite(limit[0].mean[k]) and limit[0].mean[k] > 0:
                values.setdefault(panel.key, []).append(float(limit[0].mean[k]))
                ax.axhline(
                    float(limit[0].mean[k]), color=colour[step], ls=":", lw=1.0, gid=f"limit step={step}"
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        _width_ticks(ax, widths)
        _y_range(ax, values.get(panel.key, []))
        ax.set_xlabel("width n")
        ax.set_title(panel.title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    if not drawn:
        raise StoreError(f"no finished run has a positive {COORD_VARIABLE} at the chosen steps")
    handles: list[Any] = [
        Line2D([], [], color=colour[s], marker="o", ms=3, lw=1.4, label=f"step {s}") for s in chosen
    ]
    handles.append(Line2D([], [], color="grey", ls=":", label="the limit (width ∞), where stored"))
    _legend(fig, handles, cols)
    fig.suptitle(
        "coordinate check: sqrt(mean over units and probes of H_ℓ²), seed mean (a diverged run up to its "
        "divergence); flat in n = width-independent",
        fontsize=9,
    )
    return fig


def _width_ticks(ax: Any, widths: np.ndarray) -> None:
    """The widths themselves as the x ticks: a log axis over less than a few decades
    would otherwise label crowded minor ticks."""
    from matplotlib.ticker import NullLocator

    if widths.size:
        ax.set_xticks(widths, [f"{w:g}" for w in widths])
        ax.xaxis.set_minor_locator(NullLocator())


def _y_range(ax: Any, values: Sequence[float]) -> None:
    """A log y range over ``values`` (every panel sharing this y axis), spanning at
    least a factor 10, so that a flat line (what the coordinate check hopes for) reads
    as flat, not as noise blown up; and at most 10⁴ × their median, so that a blow-up
    (a line leaving the top) does not squash the panels that stay put."""
    v = np.asarray([x for x in values if x > 0 and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return
    lo, hi = float(v.min()), float(min(v.max(), 1e4 * np.median(v)))
    if hi / lo < 10:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    ax.set_ylim(lo / 1.3, hi * 1.3)


# ---- particles ---------------------------------------------------------------------------

_COMPONENTS = ("w_in_1", "w_out", "w_in_norm")


def _particles(figure_cls: Any, ds: Any) -> Any:
    from matplotlib.colors import Normalize

    if "particles" not in ds.data_vars:
        raise StoreError(
            "the store has no 'particles' record: add e.g. particles(sample = 200) to the spec's record block"
        )
    sweep = [str(d) for d in ds[STATUS].dims]
    others = {d: 0 for d in sweep if d not in ("width", "seed")}
    status = np.asarray(ds[STATUS].isel(others).transpose("width", "seed").values)
    components = [str(c) for c in ds["component"].values]
    missing = [c for c in _COMPONENTS if c not in components]
    if missing:
        raise StoreError(
            f"the particles record lacks {count(len(missing), 'component')}: {', '.join(missing)}"
        )
    rows: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = []
    for wi, width in enumerate(ds["width"].values):
        done = np.flatnonzero(status[wi] == Status.DONE)
        if not done.size:
            continue
        sel = {"width": wi, "seed": int(done[0]), **others}
        cube = np.asarray(ds["particles"].isel(sel).transpose(STEP, "particle", "component").values)
        recorded = np.flatnonzero(np.isfinite(cube).any(axis=(1, 2)))
        if not recorded.size:
            continue
        rows.append((float(width), int(ds["seed"].values[done[0]]), cube, recorded, _times_at(ds, sel)))
    if not rows:
        raise StoreError("no finished run has a particles record to plot")
    # Shared axes: the point is to see the law move between times and widths.
    fig, axes = _grid(figure_cls, len(rows), 3, size=(3.2, 2.8), share=True)
    column = {c: components.index(c) for c in _COMPONENTS}
    norms = np.concatenate([row[2][..., column["w_in_norm"]].ravel() for row in rows])
    norms = norms[np.isfinite(norms)]
    norm = Normalize(vmin=float(norms.min()), vmax=float(norms.max())) if norms.size else Normalize()
    mappable = None
    for r, (width, seed, cube, recorded, times) in enumerate(rows):
        # The first, middle and last record this run has (the same one thrice if it has one).
        chosen = [recorded[0], recorded[len(recorded) // 2], recorded[-1]]
        for c, k in enumerate(chosen):
            ax = axes[r, c]
            x = cube[k, :, column["w_in_1"]]
            y = cube[k, :, column["w_out"]]
            z = cube[k, :, column["w_in_norm"]]
            ok = np.isfinite(x) & np.isfinite(y)
            mappable = ax.scatter(x[ok], y[ok], c=z[ok], cmap="viridis", norm=norm, s=8, linewidths=0)
            ax.set_title(
                f"{_width_label(width)}, seed {seed}\nt = {times[k]:.4g} (step {int(ds[STEP].values[k])})",
                fontsize=9,
            )
            if r == len(rows) - 1:
                ax.set_xlabel("w_in_1 (incoming weight, 1st direction)")
            if c == 0:
                ax.set_ylabel("w_out")
            ax.grid(alpha=0.3)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, label="‖w_in‖", shrink=0.6, aspect=40)
    if others:
        fig.suptitle(", ".join(f"{d} = {ds[d].values[0]}" for d in others), fontsize=10)
    return fig


def _times_at(ds: Any, sel: dict[str, int]) -> np.ndarray:
    t = ds[TIME].isel({d: i for d, i in sel.items() if d in ds[TIME].dims})
    return np.asarray(t.values, dtype=np.float64).reshape(-1)


def figure(
    rows: int, cols: int, size: tuple[float, float] = (3.6, 2.8), share: bool = False
) -> tuple[Any, np.ndarray]:
    """A matplotlib ``Figure`` (no pyplot state) with a ``rows × cols`` array of axes,
    each panel ``size`` inches, in the layout ``mfdsl plot`` uses."""
    return _grid(_figure_class(), rows, cols, size=size, share=share)


def width_colours(widths: Sequence[float]) -> dict[float, Any]:
    """The colour of each width in mfdsl's figures: viridis over log-width, the limit
    (``inf``) black."""
    return _colours(widths)
