"""``mfdsl plot``: figures of a results store (matplotlib, the optional ``plot`` extra).

Three kinds:

* ``curves`` (default) — a panel per scalar variable (per layer for ``weight_change``
  and ``neuron_spread``) against mean-field time, one row of panels per slice of the
  other sweep variables.  One line per width: the mean over the done seeds, coloured
  on viridis by log-width, the limit (``width = inf``) in black; the band around it is
  ±1 standard deviation over seeds.  Log-spaced records get a symlog time axis.
* ``convergence`` — per variable and slice, ``sup_t |seed mean − limit|`` (or − the
  widest run, without a limit) against width on log–log axes, with an ``n^{-1/2}``
  guide and, against the limit, the least-squares line and its slope (95 % interval)
  in the legend: the rate ``mfdsl report`` gives (:meth:`~mfdsl.analysis.report.Series.rate`),
  and, where it gives none, its reason.
* ``particles`` — the ``particles`` sample as scatter plots, incoming weight
  ``w_in_1`` against outgoing ``w_out``, coloured by ``‖w_in‖``, at the first, middle
  and last recorded time: a row per width, for the first done seed of the first slice.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot: nothing opens a window, and the process's backend is left alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from mfdsl.analysis.report import STATUS, STEP, TIME, Series, Slice, StoreError, open_results, slices
from mfdsl.core.errors import count
from mfdsl.store.status import Status

KINDS = ("curves", "convergence", "particles")
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
) -> str:
    """Draw ``kind`` for ``store`` into ``output`` (format from its extension: png, svg
    or pdf; default :func:`default_output`) and return the path written."""
    out = os.fspath(output) if output is not None else default_output(store, kind)
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise PlotError(f"cannot tell the format of {out!r}: give a file ending in {', '.join(FORMATS)}")
    fig = make_figure(store, kind=kind, variables=variables)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def make_figure(
    store: str | os.PathLike[str], *, kind: str = "curves", variables: Sequence[str] | None = None
) -> Any:
    """The ``matplotlib.figure.Figure`` of ``kind`` for ``store`` (not saved)."""
    if kind not in KINDS:
        raise PlotError(f"unknown plot kind {kind!r} (one of {', '.join(KINDS)})")
    figure_cls = _figure_class()
    ds = open_results(store)
    try:
        if kind == "particles":
            return _particles(figure_cls, ds)
        parts = slices(ds, variables)
        if not parts or not parts[0].series:
            raise StoreError(f"{os.fspath(store)} has no scalar variable to plot")
        if not any(np.isfinite(c.mean).any() for p in parts for s in p.series for c in s.curves):
            raise StoreError(f"{os.fspath(store)} has no finished run to plot")
        return _curves(figure_cls, parts) if kind == "curves" else _convergence(figure_cls, parts)
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


def _log_spaced(times: np.ndarray) -> bool:
    positive = np.unique(times[np.isfinite(times) & (times > 0)])
    if positive.size < 4:
        return False
    gaps = np.diff(positive)
    # Records every N steps have equal gaps; log-spaced ones, gaps growing with time.
    return bool(positive[-1] / positive[0] > 50 and gaps[-1] > 5 * gaps[0])


def _curves(figure_cls: Any, parts: list[Slice]) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cols = len(parts[0].series)
    fig, axes = _grid(figure_cls, len(parts), cols)
    widths = [c.width for c in parts[0].series[0].curves]
    colours = _colours(widths)
    seeds = max((c.done for p in parts for s in p.series for c in s.curves), default=1)
    all_times = np.concatenate([c.time for p in parts for s in p.series for c in s.curves])
    symlog = _log_spaced(all_times)
    for r, part in enumerate(parts):
        for c, series in enumerate(part.series):
            ax = axes[r, c]
            for curve in series.curves:
                mean, std = curve.mean, curve.std
                ok = np.isfinite(mean) & np.isfinite(curve.time)
                if not ok.any():
                    continue
                colour = colours[curve.width]
                lw = 2.0 if math.isinf(curve.width) else 1.4
                ax.plot(
                    curve.time[ok], mean[ok], color=colour, lw=lw, zorder=3 if math.isinf(curve.width) else 2
                )
                if curve.runs.shape[0] > 1:
                    ax.fill_between(
                        curve.time[ok], (mean - std)[ok], (mean + std)[ok], color=colour, alpha=0.18, lw=0
                    )
            ax.set_title(series.label if not part.coords else f"{series.label}\n{part.title}", fontsize=9)
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
    # At most two legend entries per column of panels: a narrow figure's legend would
    # otherwise run off its sides.
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 6, 2 * cols),
        fontsize=8,
        frameon=False,
    )
    return fig


# ---- convergence -------------------------------------------------------------------------


def _convergence(figure_cls: Any, parts: list[Slice]) -> Any:
    cols = len(parts[0].series)
    fig, axes = _grid(figure_cls, len(parts), cols, size=(3.6, 3.0))
    for r, part in enumerate(parts):
        for c, series in enumerate(part.series):
            _convergence_panel(axes[r, c], series, part)
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
