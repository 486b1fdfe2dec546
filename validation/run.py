"""``make validate``: run the spec library's larger experiments, draw their figures and
write ``docs/validation.md`` — the predictions P1–P6 of ``mean-field.md`` checked
against what the papers report.

    python validation/run.py                    # everything (≈ 25 min on 2 cores)
    python validation/run.py --only fig5 --only degeneracy
    python validation/run.py --reuse            # keep finished stores, redo figures
    python validation/run.py --mnist-root ~/data/mnist   # also Nguyen 2019 Fig. 1

Every experiment is a spec of ``specs/`` run with ``mfdsl run`` (a subprocess, exactly
as a user runs it), shortened by ``--set`` overrides where the spec as shipped takes
longer than this report's budget; the overrides are printed in the report.  Stores go
to ``runs/validation/`` (``--runs``); figures (PNG) to ``docs/figures/``.  Figures are
drawn with ``mfdsl plot``'s machinery (:mod:`mfdsl._plot`) and the numbers come from
``mfdsl report``'s (:func:`mfdsl._report.summarize`, what ``mfdsl report --json``
prints, and :func:`~mfdsl._report.fit_rate`), plus the per-run statistics each
prediction needs, computed here.

Experiments whose data is not on the machine (MNIST) are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, as cli.py does

from mfdsl._plot import _colours, _figure_class, _grid, plot_store  # noqa: E402
from mfdsl._report import STATUS, fit_rate, open_results, summarize  # noqa: E402

FIGURES = "figures"


# ---- the experiments -------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """A spec of ``specs/`` and the overrides that size it for this report."""

    key: str
    spec: str
    title: str
    overrides: tuple[str, ...] = ()
    needs: str | None = None  # a data kind whose files must be given (--mnist-root)
    note: str = ""


EXPERIMENTS = (
    Experiment(
        key="width",
        spec="specs/width_convergence.mf",
        title="P1 — width convergence at rate n^-1/2",
    ),
    Experiment(
        key="fig5",
        spec="specs/nguyen2019_fig5.mf",
        title="P2 — Nguyen (2019) Fig. 5: the limit does not depend on τ₂",
        overrides=(
            "train.steps=10000",
            "record.every=250",
            "data.test=2000",
            "sweep.seed=0..2",
            "torch.dtype=float32",
        ),
        note="shortened to t = 10 (the loss reaches its plateau by t ≈ 4), 3 seeds, a test set "
        "of 2000, float32 networks",
    ),
    Experiment(
        key="degeneracy",
        spec="specs/pham_nguyen2020_degeneracy.mf",
        title="P3 — Pham & Nguyen (2020): degeneracy of the middle layers at depth ≥ 4",
    ),
    Experiment(
        key="mmn",
        spec="specs/mmn2018_isotropic.mf",
        title="P6 — Mei, Montanari & Nguyen (2018): isotropic Gaussians, noiseless and noisy SGD",
    ),
    Experiment(
        key="quickstart",
        spec="specs/quickstart.mf",
        title="Quickstart — two layers, ReLU, trained output weights",
    ),
    Experiment(
        key="frozen",
        spec="specs/frozen_ends.mf",
        title="Araújo, Oliveira & Yukimura (2019): frozen ends",
        overrides=("sweep.width=[64, 128, 256, 512, 1024]",),
        note="widths 64 … 1024 (the spec: 128, 512)",
    ),
    Experiment(
        key="fig1",
        spec="specs/nguyen2019_fig1.mf",
        title="Nguyen (2019) Fig. 1: four layers on MNIST",
        needs="mnist",
    ),
)


# ---- running ----------------------------------------------------------------------------


def store_is_complete(path: Path) -> bool:
    """A finalized store whose every run is done (or diverged: a result)."""
    if not path.exists():
        return False
    try:
        ds = open_results(path)
    except Exception:  # noqa: BLE001 - anything unreadable is redone
        return False
    try:
        status = np.asarray(ds[STATUS].values)
        return "finalized" in ds.attrs and bool(np.isin(status, (1, 3)).all())
    finally:
        ds.close()


def run_experiment(exp: Experiment, store: Path, extra: Sequence[str], workers: int, log: Path) -> float:
    """``mfdsl run`` the experiment into ``store``; returns the wall time (s)."""
    args = [sys.executable, "-m", "mfdsl", "run", str(ROOT / exp.spec), "-o", str(store), "--overwrite"]
    args += ["--workers", str(workers)]
    for override in (*exp.overrides, *extra):
        args += ["--set", override]
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(args) + "\n")
        out.flush()
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code not in (0, 1):  # 1: some run failed, which the report shows
        raise RuntimeError(f"mfdsl run failed for {exp.key} (exit {code}); see {log}")
    return time.perf_counter() - start


# ---- numbers -----------------------------------------------------------------------------


def per_run_distance(
    ds: Any, var: str, select: dict[str, Any] | None = None
) -> tuple[list[float], np.ndarray]:
    """``(widths, d)`` with ``d[i, s] = sup_t |var(width_i, seed_s, t) − var(∞, seed_s, t)|``
    over the done runs (NaN where a run is not done): P1's statistic, run by run."""
    da = ds[var]
    status = ds[STATUS]
    if select:
        da, status = da.sel(select), status.sel(select)
    da = da.where(status == 1).load()
    widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
    limit = da.sel(width=np.inf)
    out = []
    for w in widths:
        diff = np.abs((da.sel(width=w) - limit).transpose("seed", "step").values)
        with np.errstate(invalid="ignore"):
            sup = np.where(
                np.isfinite(diff).any(axis=1),
                np.nanmax(np.where(np.isfinite(diff), diff, -1), axis=1),
                np.nan,
            )
        out.append(sup)
    return widths, np.array(out)


def rate_text(rate: Any) -> str:
    if rate is None:
        return "—"
    if rate.ci95 is None:
        return f"{rate.slope:.2f} (no CI)"
    return f"{rate.slope:.2f} [{rate.ci95[0]:.2f}, {rate.ci95[1]:.2f}]"


def rate_dict(rate: Any) -> dict[str, Any] | None:
    return None if rate is None else rate.as_dict()


def summary_rate(
    summary: dict[str, Any], label: str, coords: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The fitted rate of ``label`` in the slice with ``coords`` of ``mfdsl report --json``."""
    for part in summary["slices"]:
        if coords is None or all(part["coords"].get(k) == v for k, v in coords.items()):
            return part["rates"].get(label)
    return None


def summary_rate_text(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "—"
    if rate["ci95"] is None:
        return f"{rate['slope']:.2f} (no CI)"
    return f"{rate['slope']:.2f} [{rate['ci95'][0]:.2f}, {rate['ci95'][1]:.2f}]"


def distance_row(summary: dict[str, Any], label: str, coords: dict[str, Any] | None = None) -> dict[Any, Any]:
    """``{width: distance}`` of ``label`` in a slice of the report."""
    for part in summary["slices"]:
        if coords is None or all(part["coords"].get(k) == v for k, v in coords.items()):
            return {row["width"]: row["distance"][label] for row in part["widths"]}
    return {}


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov distance (sup of the difference of the empirical
    distribution functions)."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


# ---- figures -----------------------------------------------------------------------------


def save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return f"{FIGURES}/{path.name}"


def loglog_figure(
    title: str,
    series: Sequence[tuple[str, Sequence[float], np.ndarray, Any]],
    ylabel: str,
    guide: bool = True,
) -> Any:
    """Log–log points (per-run values as faint dots, their mean as markers) with the
    least-squares fit of the mean and an ``n^-1/2`` guide."""
    fig, axes = _grid(_figure_class(), 1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for label, widths, values, colour in series:
        w = np.asarray(widths, dtype=np.float64)
        v = np.asarray(values, dtype=np.float64).reshape(len(w), -1)
        for j in range(v.shape[1]):
            ax.loglog(w, v[:, j], ".", color=colour, alpha=0.25, ms=4)
        mean = np.nanmean(v, axis=1)
        rate = fit_rate(w, mean)
        ax.loglog(w, mean, "o", color=colour, label=f"{label}: slope {rate_text(rate)}")
        if rate is not None:
            ax.loglog(w, np.exp(rate.intercept) * w**rate.slope, "-", color=colour, lw=1)
        if guide:
            ax.loglog(w, mean[0] * (w / w[0]) ** -0.5, ":", color="grey")
    if guide:
        ax.plot([], [], ":", color="grey", label="n^-1/2 (guide)")
    ax.set_xlabel("width n")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, frameon=False)
    return fig


# ---- one section per experiment ---------------------------------------------------------


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.text.extend(lines)


def figure_line(alt: str, rel: str) -> str:
    return f"![{alt}]({rel})"


def analyse_width(store: Path, figs: Path, sec: Section) -> None:
    ds = open_results(store)
    try:
        rows = {}
        colours = {"train_loss": "C0", "test_loss": "C3"}
        series = []
        for var in ("train_loss", "test_loss"):
            widths, d = per_run_distance(ds, var)
            mean = np.nanmean(d, axis=1)
            rate = fit_rate(widths, mean)
            rows[var] = (widths, d, mean, rate)
            series.append((var, widths, d, colours[var]))
            sec.numbers[f"{var}_per_run_rate"] = rate_dict(rate)
        seeds = int(ds.sizes["seed"])
        fig = loglog_figure(
            f"sup_t |loss_n − loss_∞|: dots {seeds} seeds, markers their mean",
            series,
            "distance to the limit",
        )
        rel = save(fig, figs / "width_convergence-per-run.png")
    finally:
        ds.close()
    summary = summarize(store)
    curves = plot_store(
        store, output=figs / "width_convergence-curves.png", variables=["train_loss", "test_loss"]
    )
    conv = plot_store(
        store,
        kind="convergence",
        output=figs / "width_convergence-convergence.png",
        variables=["train_loss", "test_loss"],
    )
    report = {v: summary_rate(summary, v) for v in ("train_loss", "test_loss")}
    sec.numbers["report_rates"] = report
    widths, _, mean_test, rate_test = rows["test_loss"]
    _, _, mean_train, rate_train = rows["train_loss"]
    sec.add(
        "A four-layer ReLU network trained by full-batch gradient descent on 64 points "
        f"(no SGD noise), at widths {widths[0]:g} … {widths[-1]:g}, {seeds} seeds each, against "
        "the jax limit of each seed (R1 + R2 collapse: an O(N) state).",
        "",
        "| width | " + " | ".join(f"{w:g}" for w in widths) + " |",
        "|---|" + "---:|" * len(widths),
        "| mean over seeds of sup_t \\|train loss − limit\\| | "
        + " | ".join(fmt(v) for v in mean_train)
        + " |",
        "| mean over seeds of sup_t \\|test loss − limit\\| | "
        + " | ".join(fmt(v) for v in mean_test)
        + " |",
        "",
        "| fitted log–log slope (95 % CI) | this run | theory / papers |",
        "|---|---|---|",
        f"| per run, train loss | **{rate_text(rate_train)}** | −1/2 (mean-field.md P1; MMN 2018 Thm. 3: "
        "error ≲ √(1/N ∨ ε); Pham & Nguyen 2020) |",
        f"| per run, test loss | **{rate_text(rate_test)}** | −1/2 |",
        f"| `mfdsl report`: seed mean's distance, train loss | {summary_rate_text(report['train_loss'])} | "
        "between −1/2 and −1 (the seeds' errors partly cancel) |",
        f"| `mfdsl report`: seed mean's distance, test loss | {summary_rate_text(report['test_loss'])} | |",
        "",
        figure_line("per-run distance to the limit against width", rel),
        "",
        figure_line("loss curves, a colour per width, the limit in black", f"{FIGURES}/{Path(curves).name}"),
        "",
        figure_line("mfdsl plot --kind convergence", f"{FIGURES}/{Path(conv).name}"),
    )


def analyse_fig5(store: Path, figs: Path, sec: Section) -> None:
    summary = summarize(store)
    curves = plot_store(
        store, output=figs / "nguyen2019_fig5-curves.png", variables=["test_loss", "neuron_spread"]
    )
    conv = plot_store(
        store, kind="convergence", output=figs / "nguyen2019_fig5-convergence.png", variables=["test_loss"]
    )
    ds = open_results(store)
    try:
        taus = [float(t) for t in ds["tau2"].values]
        status = ds[STATUS]
        loss = ds["test_loss"].where(status == 1).load()
        widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
        # the two rows, run by run: same seed = same data and the same draws, scaled
        rows = np.array(
            [
                np.nanmax(
                    np.abs(
                        (loss.sel(width=w, tau2=taus[1]) - loss.sel(width=w, tau2=taus[0]))
                        .transpose("seed", "step")
                        .values
                    ),
                    axis=1,
                )
                for w in widths
            ]
        )
        limit_gap = float(
            np.nanmax(
                np.abs(loss.sel(width=np.inf, tau2=taus[1]) - loss.sel(width=np.inf, tau2=taus[0])).values
            )
        )
        finals = {
            (w, t): float(loss.sel(width=w, tau2=t).isel(step=-1).mean("seed"))
            for w in [*widths, math.inf]
            for t in taus
        }
        # a figure: both rows, seed means, on one axis per width
        fig, axes = _grid(_figure_class(), 1, len(widths), size=(2.6, 2.6), share=True)
        colours = _colours([*widths, math.inf])
        time_ = np.asarray(ds["time"].values, dtype=np.float64).reshape(-1)
        for k, w in enumerate(widths):
            ax = axes[0, k]
            for t, style in zip(taus, ("-", "--"), strict=True):
                ax.plot(
                    time_,
                    loss.sel(width=w, tau2=t).mean("seed"),
                    style,
                    color=colours[w],
                    label=f"τ₂ = {t:g}",
                )
            ax.plot(
                time_,
                loss.sel(width=np.inf, tau2=taus[0]).mean("seed"),
                "-",
                color="black",
                lw=1,
                label="limit",
            )
            ax.set_title(f"width {w:g}", fontsize=9)
            ax.set_xlabel("time")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("test loss (seed mean)")
        axes[0, 0].legend(fontsize=7, frameon=False)
        rel_rows = save(fig, figs / "nguyen2019_fig5-rows.png")
        fig = loglog_figure(
            "sup_t |loss(τ₂ = 3) − loss(τ₂ = 0.1)|, same seed",
            [("rows apart", widths, rows, "C2")],
            "distance between the rows",
        )
        rel_gap = save(fig, figs / "nguyen2019_fig5-row-gap.png")
    finally:
        ds.close()
    gap_rate = fit_rate(widths, np.nanmean(rows, axis=1))
    sec.numbers.update(
        row_gap_rate=rate_dict(gap_rate),
        limit_gap=limit_gap,
        report_rates={f"tau2={t:g}": summary_rate(summary, "test_loss", {"tau2": t}) for t in taus},
    )
    dist = {t: distance_row(summary, "test_loss", {"tau2": t}) for t in taus}
    sec.add(
        "Five layers (four hidden), ReLU, isotropic Gaussians in d = 50, SGD with batch 1; "
        "middle weights i.i.d. N(1, τ₂²) with τ₂ = 0.1 (Fig. 5, top row) and τ₂ = 3 (bottom row).",
        "",
        "| width | " + " | ".join(f"{w:g}" for w in widths) + " | limit |",
        "|---|" + "---:|" * (len(widths) + 1),
        *[
            f"| final test loss, τ₂ = {t:g} | "
            + " | ".join(fmt(finals[(w, t)], 4) for w in [*widths, math.inf])
            + " |"
            for t in taus
        ],
        *[
            f"| sup_t \\|seed mean − limit\\|, τ₂ = {t:g} | "
            + " | ".join(fmt(dist[t].get(int(w) if float(w).is_integer() else w)) for w in widths)
            + " | ref |"
            for t in taus
        ],
        "| sup_t \\|τ₂ = 3 − τ₂ = 0.1\\|, mean over seeds | "
        + " | ".join(fmt(v) for v in np.nanmean(rows, axis=1))
        + " | "
        f"{fmt(limit_gap)} |",
        "",
        "| quantity | this run | paper |",
        "|---|---|---|",
        f"| gap between the τ₂ rows, log–log slope in n | **{rate_text(gap_rate)}** | the rows meet as n grows "
        "(Nguyen 2019, Fig. 5: the bottom row, τ₂ = 3, reaches the top row's curves); −1 here: see below |",
        f"| the two limits' sup distance | {fmt(limit_gap)} | 0: the limit does not depend on τ₂ (R1) |",
        *[
            f"| `mfdsl report` rate to the limit, τ₂ = {t:g} | {summary_rate_text(sec.numbers['report_rates'][f'tau2={t:g}'])} | "
            "−1/2 until the distance meets the runs' own SGD noise, where it flattens |"
            for t in taus
        ],
        "",
        "The limit is computed by R1, which replaces the i.i.d. part of the middle weights by "
        "its mean: the two limits are equal by construction (the independent check of R1 "
        "against plain particles is `tests/test_jax_solver.py`).  What this experiment adds "
        "is the finite networks: at the same seed (same data stream, same draws scaled by τ₂) "
        "the two rows differ by an amount that falls with the width, both approach the "
        "limit, and at the end they sit on the same plateau to three or four digits.  The "
        "gap between the rows falls like 1/n, faster than n^-1/2: a middle layer's i.i.d. "
        "part moves each neuron's pre-activation by O(τ₂ n^-1/2) with independent signs, "
        "and the layer above averages over those neurons, so the output feels it at "
        "O(τ₂²/n) — the finite-width form of R1 (`tests/test_predictions.py` checks the "
        "same slope, −1, on a full-batch problem).  The distance to the limit also carries "
        "the first layer's sampling error, O(n^-1/2), shared by both rows, and with "
        "batch-1 SGD every run carries SGD noise of its own (peak std ≈ 4·10⁻³ in the test "
        "loss, `docs/performance.md`; ≈ 2·10⁻³ for a mean over 3 seeds), which does not "
        "fall with the width: the distance to the limit flattens at that level, while the "
        "gap between the rows, where the noise is shared, keeps falling.",
        "",
        figure_line("both τ₂ rows and the limit, per width", rel_rows),
        "",
        figure_line("gap between the τ₂ rows against width", rel_gap),
        "",
        figure_line("test loss and neuron spread, a row per τ₂", f"{FIGURES}/{Path(curves).name}"),
        "",
        figure_line("mfdsl plot --kind convergence", f"{FIGURES}/{Path(conv).name}"),
    )


def analyse_degeneracy(store: Path, figs: Path, sec: Section) -> None:
    curves = plot_store(
        store, output=figs / "degeneracy-curves.png", variables=["test_loss", "neuron_spread"]
    )
    ds = open_results(store)
    try:
        spread = ds["neuron_spread"].sel(layer=2).where(ds[STATUS] == 1).load()
        widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
        depths = [int(h) for h in ds["h"].values]
        final = {h: np.array([spread.sel(width=w, h=h).isel(step=-1).values for w in widths]) for h in depths}
        initial = {
            h: np.array([spread.sel(width=w, h=h).isel(step=0).values for w in widths]) for h in depths
        }
        growth = {h: float(np.nanmax(spread.sel(h=h) / spread.sel(h=h).isel(step=0))) for h in depths}
        fig = loglog_figure(
            "neuron_spread of H_2 at the end of training (dots: runs)",
            [
                (f"depth {h + 1} (h = {h}), final", widths, final[h], c)
                for h, c in zip(depths, ("C1", "C0"), strict=True)
            ]
            + [("at initialisation (both depths)", widths, initial[depths[-1]], "grey")],
            "std across neurons of H_2",
            guide=False,
        )
        rel = save(fig, figs / "degeneracy-final-spread.png")
    finally:
        ds.close()
    rates = {h: fit_rate(widths, np.nanmean(final[h], axis=1)) for h in depths}
    rate0 = fit_rate(widths, np.nanmean(initial[depths[-1]], axis=1))
    sec.numbers.update(
        final_rate={str(h): rate_dict(r) for h, r in rates.items()},
        initial_rate=rate_dict(rate0),
        max_growth={str(h): float(g) for h, g in growth.items()},
    )
    sec.add(
        "ReLU networks with i.i.d. N(1, 1) middle weights on isotropic Gaussians (online SGD, "
        "t = 50), depth 3 (h = 2 hidden layers) against depth 4 (h = 3); `neuron_spread` of "
        "layer 2 is the standard deviation across its neurons of the pre-activation H_2.",
        "",
        "| width | " + " | ".join(f"{w:g}" for w in widths) + " |",
        "|---|" + "---:|" * len(widths),
        *[
            f"| final spread, depth {h + 1} | "
            + " | ".join(fmt(v) for v in np.nanmean(final[h], axis=1))
            + " |"
            for h in depths
        ],
        "| spread at initialisation | "
        + " | ".join(fmt(v) for v in np.nanmean(initial[depths[-1]], axis=1))
        + " |",
        "",
        "| quantity | this run | theory / paper |",
        "|---|---|---|",
        f"| slope of the final spread in n, depth 4 | **{rate_text(rates[depths[-1]])}** | −1/2: middle layers "
        "degenerate at depth ≥ 4 (Pham & Nguyen 2020; mean-field.md P3) |",
        f"| largest growth over training, depth 4 | {growth[depths[-1]]:.2f}× | stays small (O(n^-1/2) throughout) |",
        f"| slope of the final spread in n, depth 3 | **{rate_text(rates[depths[0]])}** | ≈ 0: not degenerate "
        "(layer 2 is the last hidden layer; w_3's i.i.d. part differentiates its neurons) |",
        f"| slope at initialisation | {rate_text(rate0)} | −1/2 (the sampling fluctuation) |",
        "",
        figure_line("final neuron spread against width, both depths", rel),
        "",
        figure_line(
            "test loss and neuron spread over time, a row per depth", f"{FIGURES}/{Path(curves).name}"
        ),
    )


def analyse_mmn(store: Path, figs: Path, sec: Section) -> None:
    summary = summarize(store)
    curves = plot_store(store, output=figs / "mmn2018-curves.png", variables=["test_loss"])
    ds = open_results(store)
    try:
        temps = [float(t) for t in ds["temp"].values]
        widths = [float(w) for w in ds["width"].values]
        norm = ds["particles"].sel(component="w_in_norm").where(ds[STATUS] == 1).load()
        ks = {}
        means = {}
        fig, axes = _grid(_figure_class(), 1, len(temps), size=(4.2, 3.0))
        colours = _colours(widths)
        for k, t in enumerate(temps):
            ref = norm.sel(width=np.inf, temp=t).isel(step=-1).values.ravel()
            ax = axes[0, k]
            bins = np.linspace(
                np.nanmin(norm.sel(temp=t).isel(step=-1)), np.nanmax(norm.sel(temp=t).isel(step=-1)), 40
            )
            for w in widths:
                sample = norm.sel(width=w, temp=t).isel(step=-1).values.ravel()
                means[(w, t)] = float(np.nanmean(sample))
                if math.isfinite(w):
                    ks[(w, t)] = ks_statistic(sample, ref)
                ax.hist(
                    sample[np.isfinite(sample)],
                    bins=bins,
                    density=True,
                    histtype="step",
                    color=colours[w],
                    lw=2.0 if math.isinf(w) else 1.2,
                    label="limit" if math.isinf(w) else f"width {w:g}",
                )
            ax.set_title(
                f"law of ‖w‖ at t = {float(ds['time'].values.reshape(-1)[-1]):g}, temp = {t:g}", fontsize=9
            )
            ax.set_xlabel("‖w_i‖")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7, frameon=False)
        rel_hist = save(fig, figs / "mmn2018-norm-law.png")
        n_ref = int(np.isfinite(norm.sel(width=np.inf, temp=temps[0]).isel(step=-1).values).sum())
    finally:
        ds.close()
    finite = [w for w in widths if math.isfinite(w)]
    ks_rates = {t: fit_rate(finite, [ks[(w, t)] for w in finite]) for t in temps}
    sec.numbers.update(
        report_rates={f"temp={t:g}": summary_rate(summary, "test_loss", {"temp": t}) for t in temps},
        ks={f"temp={t:g}": {f"{w:g}": ks[(w, t)] for w in finite} for t in temps},
        mean_norm={f"temp={t:g}": {f"{w:g}": means[(w, t)] for w in widths} for t in temps},
    )
    dist = {t: distance_row(summary, "test_loss", {"temp": t}) for t in temps}
    # the KS distance two samples of the same law reach at 95 % (pooled sizes)
    floor = 1.36 * math.sqrt(2 / n_ref)
    sec.numbers["ks_floor_95"] = floor
    sec.add(
        "Two layers, ŷ = (1/n) Σ σ(⟨w_i, x⟩) with the piecewise-linear σ of the paper (output "
        "weights frozen at 1), isotropic Gaussians in d = 40 with Δ = 0.8, online SGD (batch 32, "
        "lr = 0.005, t = 50); noiseless (temp = 0) and noisy (Langevin, temperature 2·10⁻⁴, "
        "ℓ2 penalty 4·10⁻³).  The limit (jax): 10⁴ particles, Euler dt = 0.02, 512 fresh "
        "samples per step.",
        "",
        "| width | " + " | ".join(f"{w:g}" for w in finite) + " | limit |",
        "|---|" + "---:|" * (len(finite) + 1),
        *[
            f"| sup_t \\|risk − limit\\| (seed mean), temp = {t:g} | "
            + " | ".join(fmt(dist[t].get(int(w))) for w in finite)
            + " | ref |"
            for t in temps
        ],
        *[
            f"| mean ‖w‖ at the end, temp = {t:g} | "
            + " | ".join(fmt(means[(w, t)], 4) for w in widths)
            + " |"
            for t in temps
        ],
        *[
            f"| KS distance of the law of ‖w‖ to the limit's, temp = {t:g} | "
            + " | ".join(fmt(ks[(w, t)], 2) for w in finite)
            + " | — |"
            for t in temps
        ],
        "",
        f"(Samples: {n_ref} neurons per width, pooled over the seeds; two samples of this size from "
        f"one law are within a KS distance of {floor:.2f} 95 % of the time.)",
        "",
        "| quantity | this run | paper |",
        "|---|---|---|",
        *[
            f"| `mfdsl report` rate of the risk to the limit, temp = {t:g} | "
            f"{summary_rate_text(sec.numbers['report_rates'][f'temp={t:g}'])} | SGD follows the distributional "
            "dynamics with error ≲ √(1/N ∨ ε) (MMN 2018, Thm. 3) |"
            for t in temps
        ],
        *[
            f"| KS distance to the limit's law of ‖w‖, slope in n, temp = {t:g} | {rate_text(ks_rates[t])} | "
            "falls to the sampling floor: the law of the weights matches (MMN 2018, Figs. 1–2) |"
            for t in temps
        ],
        "",
        figure_line("law of the neurons' norms at the end of training", rel_hist),
        "",
        figure_line(
            "risk curves, a colour per width, the limit in black, a row per temperature",
            f"{FIGURES}/{Path(curves).name}",
        ),
    )


def analyse_generic(name: str) -> Callable[[Path, Path, Section], None]:
    def analyse(store: Path, figs: Path, sec: Section) -> None:
        summary = summarize(store)
        curves = plot_store(store, output=figs / f"{name}-curves.png")
        conv = plot_store(store, kind="convergence", output=figs / f"{name}-convergence.png")
        labels = summary["variables"]
        sec.numbers["report_rates"] = {label: summary_rate(summary, label) for label in labels}
        part = summary["slices"][0]
        ref = part["reference"][labels[0]]
        widths = [row["width"] for row in part["widths"]]
        sec.add(
            "| width | " + " | ".join("limit" if w == "inf" else str(w) for w in widths) + " |",
            "|---|" + "---:|" * len(widths),
            *[
                f"| final {label} | "
                + " | ".join(fmt(row["final"][label]["mean"], 4) for row in part["widths"])
                + " |"
                for label in labels
            ],
            *[
                f"| sup_t \\|seed mean − ref\\|, {label} | "
                + " | ".join(
                    "ref" if row["width"] == ref["width"] else fmt(row["distance"][label])
                    for row in part["widths"]
                )
                + " |"
                for label in labels
            ],
            "",
            "Reference: "
            + (
                "the limit (width ∞)."
                if ref["kind"] == "limit"
                else f"the widest run (width {ref['width']}); no limit in the store."
            )
            + "  Fitted rates (`mfdsl report`): "
            + "; ".join(
                f"{label} {summary_rate_text(sec.numbers['report_rates'][label])}" for label in labels
            )
            + ".",
            "",
            figure_line(f"{name} curves", f"{FIGURES}/{Path(curves).name}"),
            "",
            figure_line(f"{name} convergence", f"{FIGURES}/{Path(conv).name}"),
        )

    return analyse


def analyse_frozen(store: Path, figs: Path, sec: Section) -> None:
    analyse_generic("frozen_ends")(store, figs, sec)
    sec.add(
        "",
        "**What this shows.**  The spec's middle weights are centred (N(0, 1)) and its "
        "activation odd (tanh): in the mean-field limit every pre-activation beyond layer 1 "
        "is 0 and stays 0 — the saddle of mean-field.md §3 — so the limit learns nothing, "
        "and a finite network leaves the saddle only through its O(n^-1/2) fluctuations, "
        "later the wider it is.  The curves show that: the loss hardly moves, and less "
        "at larger widths.  Araújo et al.'s theorem (a McKean–Vlasov limit for the middle "
        "layers) is not contradicted — its limit is this trivial one for this "
        "initialisation; a non-centred init (e.g. `layer 2..3 ~ normal(1, 1)`) gives a "
        "limit that learns.",
    )


ANALYSES: dict[str, Callable[[Path, Path, Section], None]] = {
    "width": analyse_width,
    "fig5": analyse_fig5,
    "degeneracy": analyse_degeneracy,
    "mmn": analyse_mmn,
    "quickstart": analyse_generic("quickstart"),
    "frozen": analyse_frozen,
    "fig1": analyse_generic("nguyen2019_fig1"),
}


# ---- the report ------------------------------------------------------------------------


def header(times: dict[str, float | None]) -> list[str]:
    import platform

    return [
        "# Validation: mfdsl against the mean-field papers",
        "",
        "Generated by `make validate` (`python validation/run.py`; `--reuse` to redraw from "
        "the stores in `runs/validation/`) — do not edit by hand.  It "
        "runs the larger specs of `specs/` with `mfdsl run`, draws the figures with "
        "`mfdsl plot`'s machinery and takes the fitted numbers from `mfdsl report --json` "
        "(plus the per-run statistics each prediction needs).  The predictions P1–P6 are "
        "those of `../shared/docs/mean-field.md`; P4 (particle solver at N^-1/2, Euler error "
        "∝ dt) and P5 (exactness) are checked by `tests/test_jax_convergence.py` and "
        "`tests/test_jax_solver.py`, P1–P3 and P6 also, CI-sized, by `tests/test_predictions.py`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "time per experiment (`mfdsl run`, 2 workers): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items() if v)
        + f" — {sum(v for v in times.values() if v) / 60:.1f} min in all.",
        "",
        "| prediction | experiment | verdict |",
        "|---|---|---|",
    ]


def verdicts(numbers: dict[str, dict[str, Any]]) -> list[str]:
    """One table row per prediction, from the numbers."""

    def slope(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        ci = r.get("ci95")
        return f"{r['slope']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    def contains(r: dict[str, Any] | None, value: float) -> bool:
        # and a CI narrow enough to tell −1/2 from 0 and from −1
        return (
            r is not None
            and r.get("ci95") is not None
            and r["ci95"][0] <= value <= r["ci95"][1]
            and r["ci95"][1] - r["ci95"][0] < 0.8
        )

    out = []
    if "width" in numbers:
        r = numbers["width"].get("test_loss_per_run_rate")
        out.append(
            f"| P1 width convergence ~ n^-1/2 | width_convergence | slope {slope(r)} — "
            + (
                "−1/2 inside the 95 % CI ✓"
                if contains(r, -0.5)
                else "**not shown: CI misses −1/2 or too wide**"
            )
            + " |"
        )
    if "fig5" in numbers:
        r = numbers["fig5"].get("row_gap_rate")
        falls = r is not None and r["slope"] < 0 and (r.get("ci95") is None or r["ci95"][1] < 0)
        out.append(
            f"| P2 τ₂-independence | Nguyen 2019 Fig. 5 | limits equal (gap {numbers['fig5']['limit_gap']:.1g}); "
            f"rows meet as n grows, slope {slope(r)} " + ("✓" if falls else "**not falling**") + " |"
        )
    if "degeneracy" in numbers:
        r4 = numbers["degeneracy"]["final_rate"].get("3")
        r3 = numbers["degeneracy"]["final_rate"].get("2")
        ok = contains(r4, -0.5) and r3 is not None and r3["slope"] > -0.25
        out.append(
            f"| P3 degeneracy at depth ≥ 4 | Pham–Nguyen | depth 4 slope {slope(r4)}, depth 3 slope {slope(r3)} "
            + ("✓" if ok else "**check**")
            + " |"
        )
    if "mmn" in numbers:
        ks = numbers["mmn"]["ks"]
        last = {t: list(v.values())[-1] for t, v in ks.items()}
        rates = numbers["mmn"]["report_rates"]
        out.append(
            "| P6 two layers: risk and law of ‖w‖ | MMN 2018 | risk to the limit at slope "
            + ", ".join(f"{slope(r)} ({t})" for t, r in rates.items())
            + "; KS distance of the law of ‖w‖ at the widest width: "
            + ", ".join(f"{v:.2f} ({t})" for t, v in last.items())
            + ", inside two samples' 95 % band "
            + ("✓" if all(v < numbers["mmn"]["ks_floor_95"] for v in last.values()) else "**no**")
            + " |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=[e.key for e in EXPERIMENTS], help="run only these"
    )
    parser.add_argument("--reuse", action="store_true", help="keep stores whose runs are all finished")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "validation"), help="where the stores go")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where validation.md and figures/ go")
    parser.add_argument("--workers", type=int, default=2, help="mfdsl run --workers (default 2)")
    parser.add_argument("--mnist-root", help="an MNIST folder: also run Nguyen 2019 Fig. 1")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="an extra override for every run"
    )
    args = parser.parse_args(argv)

    runs, docs = Path(args.runs), Path(args.docs)
    figs = docs / FIGURES
    runs.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    numbers_path = runs / "numbers.json"
    previous: dict[str, dict[str, Any]] = (
        json.loads(numbers_path.read_text()) if numbers_path.exists() else {}
    )
    numbers: dict[str, dict[str, Any]] = {}
    sections: dict[str, Section] = {}
    start = time.perf_counter()
    # Run what was asked for (everything by default) ...
    for exp in EXPERIMENTS:
        store = runs / f"{exp.key}.zarr"
        if (args.only and exp.key not in args.only) or (exp.needs == "mnist" and not args.mnist_root):
            continue
        if args.reuse and store_is_complete(store):
            print(f"[{exp.key}] reusing {store}", flush=True)
            continue
        extra = list(args.extra)
        if exp.needs == "mnist":
            extra.append(f'data.root="{os.path.expanduser(args.mnist_root)}"')
        print(f"[{exp.key}] mfdsl run {exp.spec} …", flush=True)
        seconds = run_experiment(exp, store, extra, args.workers, runs / f"{exp.key}.log")
        previous[exp.key] = {"seconds": seconds, "extra": [o for o in extra if not o.startswith("data.root")]}
        numbers_path.write_text(json.dumps(previous, indent=1, default=float))  # survives a crash below
        print(f"[{exp.key}] done in {seconds:.0f} s", flush=True)
    # ... then report on every finished store, so that a partial rerun keeps the rest.
    for exp in EXPERIMENTS:
        store = runs / f"{exp.key}.zarr"
        sec = Section(title=exp.title)
        sections[exp.key] = sec
        if not store_is_complete(store):
            hint = " --mnist-root DIR" if exp.needs == "mnist" else f" --only {exp.key}"
            why = "needs the MNIST files" if exp.needs == "mnist" else "not run yet"
            sec.add(
                f"Skipped: {why} (`python validation/run.py{hint}`); `mfdsl check {exp.spec}` passes"
                + (" without them." if exp.needs else ".")
            )
            continue
        took = previous.get(exp.key, {}).get("seconds")
        overrides = [*exp.overrides, *previous.get(exp.key, {}).get("extra", [])]
        sec.add(
            f"Spec: `{exp.spec}`"
            + (f", with `--set {' --set '.join(overrides)}`" if overrides else " as shipped")
            + (f" — {exp.note}" if exp.note else "")
            + (f"; ran in {took / 60:.1f} min on this machine." if took else "."),
            "",
        )
        print(f"[{exp.key}] figures and numbers", flush=True)
        ANALYSES[exp.key](store, figs, sec)
        numbers[exp.key] = {**sec.numbers, "seconds": took, "extra": overrides[len(exp.overrides) :]}
    numbers_path.write_text(json.dumps(numbers, indent=1, default=float))
    total = time.perf_counter() - start
    times = {k: v.get("seconds") for k, v in numbers.items()}
    lines = header(times) + verdicts(numbers) + [""]
    for exp in EXPERIMENTS:
        done = sections.get(exp.key)
        if done is not None:
            lines += [f"## {done.title}", "", *done.text, ""]
    out = docs / "validation.md"
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {out} ({total / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
