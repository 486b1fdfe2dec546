"""``make validate``: run the spec library's larger experiments, draw their figures and
write ``docs/validation.md`` — the predictions P1–P6 of ``mean-field.md`` checked
against what the papers report.

    python validation/run.py                    # everything (≈ 20–25 min on 2 cores)
    python validation/run.py --only fig5 --only degeneracy
    python validation/run.py --reuse            # keep finished stores, redo figures
    python validation/run.py --mnist-root ~/data/mnist   # also Nguyen 2019 Fig. 1

Every experiment is a spec of ``specs/`` run with ``mfdsl run`` (a subprocess, exactly
as a user runs it), shortened by ``--set`` overrides where the spec as shipped takes
longer than this report's budget; the overrides are printed in the report.  Stores go
to ``runs/validation/`` (``--runs``); figures (PNG) to ``docs/figures/``.  Figures are
drawn with ``mfdsl plot``'s machinery (:mod:`mfdsl.analysis.plot`) and the numbers come from
``mfdsl report``'s (:func:`mfdsl.report`, what ``mfdsl report --json``
prints, and :func:`mfdsl.analysis.fit_rate`), plus the per-run statistics each
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
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, as cli.py does

import mfdsl  # noqa: E402
from mfdsl.analysis import STATUS, figure, fit_rate, width_colours  # noqa: E402

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
        note="shortened to t = 10 (test accuracy reaches ≈ 1 by t ≈ 3), 3 seeds, a test set "
        "of 2000, float32 networks",
    ),
    Experiment(
        key="degeneracy",
        spec="specs/pham_nguyen2020_degeneracy.mf",
        title="P3 — Pham & Nguyen (2020): degeneracy of the middle layers at depth ≥ 4",
    ),
    Experiment(
        key="diversity",
        spec="specs/pham_nguyen2020_diversity.mf",
        title="P3b — Pham & Nguyen (2020): bidirectional diversity, an embedded initialisation does not degenerate",
    ),
    Experiment(
        key="mmn",
        spec="specs/mmn2018_isotropic.mf",
        title="P6 — Mei, Montanari & Nguyen (2018): isotropic Gaussians, noiseless and noisy SGD",
    ),
    Experiment(
        key="quickstart",
        spec="specs/quickstart.mf",
        title="Quickstart — two layers, ReLU with biases: it learns, and the widths close on the limit",
    ),
    Experiment(
        key="frozen",
        spec="specs/frozen_ends.mf",
        title="Araújo, Oliveira & Yukimura (2019): frozen ends — the middle layers learn, and the widths follow the limit",
        overrides=("sweep.width=[64, 128, 256, 512, 1024]", "sweep.seed=0..7"),
        note="widths 64 … 1024 and 8 seeds (the spec: 64, 256, 1024 and 4 seeds)",
    ),
    Experiment(
        key="frozen_saddle",
        spec="specs/frozen_ends_saddle.mf",
        title="Counter-example: frozen ends on a saddle (centred middle weights and read-out)",
    ),
    Experiment(
        key="cnn",
        spec="specs/cnn_synthetic.mf",
        title="Convolutional networks: distance to the infinite-channel limit (Nguyen 2019's CNN-like "
        "networks, on synthetic textures)",
        overrides=(
            "data.train=64",
            "data.test=64",
            "train.batch=64",
            "train.steps=40",
            "sweep.seed=0..7",
        ),
        note="64 training images and t = 4 (the early, feature-learning part of the run, where "
        "the losses of all widths are still apart), 8 seeds — the run of tests/test_cnn.py, which compares with one limit at another seed (slope −0.44 there)",
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
        ds = mfdsl.open_store(path)
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


def final_accuracy(ds: Any, select: dict[str, Any] | None = None) -> dict[float, float]:
    """``{width: mean over seeds of the last recorded test accuracy}`` (the limit at
    ``inf``), over the done runs; empty when the store records no accuracy."""
    if "test_accuracy" not in ds:
        return {}
    acc = ds["test_accuracy"].where(ds[STATUS] == 1)
    if select:
        acc = acc.sel(select)
    last = acc.isel(step=-1).load()
    return {float(w): float(last.sel(width=w).mean("seed")) for w in ds["width"].values}


#: accuracies inside this band count as chance (binary tasks; a test set of ≥ 1000
#: points has a sampling s.d. of at most 0.016 around a class share near 1/2)
CHANCE = (0.4, 0.6)


def accuracy_note(
    accuracies: Sequence[float],
    evidence: str = "how the distance to the limit falls with the width along the whole trajectory",
) -> str:
    """What the final accuracies say: the experiment classifies, or it sits at chance —
    and then why, and what that makes of an agreement between widths."""
    values = [a for a in accuracies if np.isfinite(a)]
    if not values:
        return ""
    if all(CHANCE[0] <= a <= CHANCE[1] for a in values):
        return (
            f"**Test accuracy stays at chance** ({min(values):.3f} … {max(values):.3f}: the network predicts "
            "one class).  The network has no biases, so it is positively homogeneous, f(cx) = c·f(x), and "
            "its sign depends only on the direction of x, while the two classes differ only in norm "
            '(mean-field.md §3, "Homogeneity").  This experiment tests dynamics, not classification; a '
            "loss plateau that every width and the limit share is then forced by the data (the loss of "
            "the best homogeneous predictor a·‖x‖), not evidence of convergence — the evidence is "
            f"{evidence}."
        )
    return f"Final test accuracy {min(values):.3f} … {max(values):.3f}: the networks classify."


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
    fig, axes = figure(1, 1, size=(5.2, 3.8))
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
    ds = mfdsl.open_store(store)
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
    ds = mfdsl.open_store(store)
    try:
        accuracy = final_accuracy(ds)
    finally:
        ds.close()
    sec.numbers["final_accuracy"] = {f"{w:g}": a for w, a in accuracy.items()}
    summary = mfdsl.report(store)
    curves = mfdsl.plot(
        store, output=figs / "width_convergence-curves.png", variables=["train_loss", "test_loss"]
    )
    conv = mfdsl.plot(
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
        *(
            [
                "| final test accuracy (seed mean) | "
                + " | ".join(fmt(accuracy.get(w), 3) for w in widths)
                + " |"
            ]
            if accuracy
            else []
        ),
        "",
        *([accuracy_note(list(accuracy.values())), ""] if accuracy else []),
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
    summary = mfdsl.report(store)
    curves = mfdsl.plot(
        store, output=figs / "nguyen2019_fig5-curves.png", variables=["test_loss", "neuron_spread"]
    )
    conv = mfdsl.plot(
        store, kind="convergence", output=figs / "nguyen2019_fig5-convergence.png", variables=["test_loss"]
    )
    ds = mfdsl.open_store(store)
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
        accuracy = {t: final_accuracy(ds, {"tau2": t}) for t in taus}
        start = float(loss.isel(step=0).mean())
        # a figure: both rows, seed means, on one axis per width
        fig, axes = figure(1, len(widths), size=(2.6, 2.6), share=True)
        colours = width_colours([*widths, math.inf])
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
    accuracies = [a for t in taus for a in accuracy[t].values()]
    sec.numbers.update(
        row_gap_rate=rate_dict(gap_rate),
        limit_gap=limit_gap,
        final_accuracy={f"tau2={t:g}": {f"{w:g}": a for w, a in accuracy[t].items()} for t in taus},
        final_loss={f"tau2={t:g}": {f"{w:g}": finals[(w, t)] for w in [*widths, math.inf]} for t in taus},
        report_rates={f"tau2={t:g}": summary_rate(summary, "test_loss", {"tau2": t}) for t in taus},
    )
    dist = {t: distance_row(summary, "test_loss", {"tau2": t}) for t in taus}
    sec.add(
        "Five layers (four hidden), ReLU with biases, isotropic Gaussians in d = 50, SGD with batch 1; "
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
            f"| final test accuracy, τ₂ = {t:g} | "
            + " | ".join(fmt(accuracy[t].get(w), 4) for w in [*widths, math.inf])
            + " |"
            for t in taus
            if accuracy[t]
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
        f"The test loss falls from {start:.3g} to {finals[(math.inf, taus[0])]:.3g} in the limit.  "
        + accuracy_note(accuracies),
        "",
        "**By construction, not evidence:** the limit is computed by R1, which replaces the "
        "i.i.d. part of the middle weights by its mean, so the two limits are equal by "
        "construction (the independent check of R1 against plain particles is "
        "`tests/test_jax_solver.py`).  **Evidence:** the finite networks — at the same seed (same "
        "data stream, same draws scaled by τ₂) the two rows differ by an amount that falls with "
        "the width, and both approach the limit (the table's distances).  The "
        "gap between the rows falls like 1/n, faster than n^-1/2: a middle layer's i.i.d. "
        "part moves each neuron's pre-activation by O(τ₂ n^-1/2) with independent signs, "
        "and the layer above averages over those neurons, so the output feels it at "
        "O(τ₂²/n) — the finite-width form of R1 (`tests/test_predictions.py` checks the "
        "same slope, −1, on a full-batch problem).  The distance to the limit also carries "
        "the first layer's sampling error, O(n^-1/2), shared by both rows, and with "
        "batch-1 SGD every run carries SGD noise of its own, which does not fall with the "
        "width: it is a floor for the distance to the limit at large widths, while the "
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
    curves = mfdsl.plot(
        store, output=figs / "degeneracy-curves.png", variables=["test_loss", "neuron_spread"]
    )
    ds = mfdsl.open_store(store)
    try:
        spread = ds["neuron_spread"].sel(layer=2).where(ds[STATUS] == 1).load()
        widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
        depths = [int(h) for h in ds["h"].values]
        final = {h: np.array([spread.sel(width=w, h=h).isel(step=-1).values for w in widths]) for h in depths}
        initial = {
            h: np.array([spread.sel(width=w, h=h).isel(step=0).values for w in widths]) for h in depths
        }
        growth = {h: float(np.nanmax(spread.sel(h=h) / spread.sel(h=h).isel(step=0))) for h in depths}
        accuracy = {h: final_accuracy(ds, {"h": h}) for h in depths}
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
        final_accuracy={str(h): {f"{w:g}": a for w, a in accuracy[h].items()} for h in depths},
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
        *[
            f"| final test accuracy, depth {h + 1} | "
            + " | ".join(fmt(accuracy[h].get(w), 3) for w in widths)
            + " |"
            for h in depths
            if accuracy[h]
        ],
        "",
        *(
            [
                accuracy_note(
                    [a for h in depths for a in accuracy[h].values()],
                    "the spread across neurons, which needs no classifier",
                ),
                "",
            ]
            if any(accuracy.values())
            else []
        ),
        "The spread at initialisation falls like n^-1/2 by construction (it is the sampling "
        "fluctuation of an average of n i.i.d. terms); the evidence is what training does to "
        "it: it stays O(n^-1/2) at depth 4 and grows to a width-independent value at depth 3.",
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
    summary = mfdsl.report(store)
    curves = mfdsl.plot(store, output=figs / "mmn2018-curves.png", variables=["test_loss"])
    ds = mfdsl.open_store(store)
    try:
        temps = [float(t) for t in ds["temp"].values]
        widths = [float(w) for w in ds["width"].values]
        norm = ds["particles"].sel(component="w_in_norm").where(ds[STATUS] == 1).load()
        ks = {}
        means = {}
        fig, axes = figure(1, len(temps), size=(4.2, 3.0))
        colours = width_colours(widths)
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


def analyse_generic(
    name: str, variables: Sequence[str] | None = None
) -> Callable[[Path, Path, Section], None]:
    """The table every experiment gets: final values per width (accuracy included where
    the spec records it), each width's distance to the reference, the fitted rates."""

    def analyse(store: Path, figs: Path, sec: Section) -> None:
        summary = mfdsl.report(store)
        curves = mfdsl.plot(store, output=figs / f"{name}-curves.png", variables=variables)
        conv = mfdsl.plot(
            store,
            kind="convergence",
            output=figs / f"{name}-convergence.png",
            variables=[v for v in (variables or ()) if not v.startswith("weight_change")] or None,
        )
        labels = summary["variables"]
        sec.numbers["report_rates"] = {label: summary_rate(summary, label) for label in labels}
        part = summary["slices"][0]
        ref = part["reference"][labels[0]]
        widths = [row["width"] for row in part["widths"]]
        sec.numbers["final"] = {
            label: {str(row["width"]): row["final"][label]["mean"] for row in part["widths"]}
            for label in labels
        }
        sec.numbers["distance"] = {
            label: {str(row["width"]): row["distance"][label] for row in part["widths"]} for label in labels
        }
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


#: the quickstart "learns": final test accuracy at the widest width and in the limit
LEARNS_ACCURACY = 0.9


def analyse_quickstart(store: Path, figs: Path, sec: Section) -> None:
    """The first thing a user runs must demonstrate what it claims: the network learns
    (test accuracy ≥ 0.9 at the widest width and in the limit, from chance) and the widths
    close on the limit (the widest run's test-loss distance below the narrowest's)."""
    analyse_generic("quickstart")(store, figs, sec)
    acc = sec.numbers["final"].get("test_accuracy", {})
    dist = sec.numbers["distance"]["test_loss"]
    finite = [w for w in dist if w != "inf"]
    widest = max(finite, key=float)
    narrowest = min(finite, key=float)
    ds = mfdsl.open_store(store)
    try:
        start = float(ds["test_accuracy"].where(ds[STATUS] == 1).isel(step=0).mean())
    finally:
        ds.close()
    learns = acc.get(widest, 0.0) >= LEARNS_ACCURACY and acc.get("inf", 0.0) >= LEARNS_ACCURACY
    closes = dist[widest] < dist[narrowest]
    sec.numbers.update(
        accuracy_start=start,
        accuracy_widest=acc.get(widest),
        accuracy_limit=acc.get("inf"),
        learns=learns,
        closes=closes,
        widest=widest,
        narrowest=narrowest,
    )
    sec.add(
        "",
        f"**It learns.**  Test accuracy goes from {start:.2f} (chance) to {fmt(acc.get(widest), 4)} at width "
        f"{widest} and {fmt(acc.get('inf'), 4)} in the limit (asked: ≥ {LEARNS_ACCURACY}).  The biases "
        "are what makes this possible: the classes differ only in norm, and a bias-free ReLU network "
        "is positively homogeneous, so its sign would depend only on the direction of x and stay at "
        "chance at every width (mean-field.md §3).",
        "",
        f"**The widths close on the limit.**  The seed mean's test-loss distance to the limit is "
        f"{fmt(dist[narrowest])} at width {narrowest} and {fmt(dist[widest])} at width {widest}.  It "
        "does not fall like n^-1/2 all the way: with online SGD (batch 32, lr 0.025) every finite run "
        "carries SGD noise that does not shrink with the width, while the limit integrates the "
        "expected flow; the remaining gap at the widest width is mostly that noise.  The "
        "test-accuracy distance is a sup over time of a step-like curve and is dominated by the few "
        "records where the accuracy jumps from chance; read the final accuracies instead.",
    )


def output_distance(ds: Any) -> tuple[list[float], np.ndarray, np.ndarray, np.ndarray]:
    """``(widths, sup, end, start)``: per run (width × seed) the rms over the probes of
    ``output_n − output_∞`` (the learned functions), its sup over time, its value at the
    last record and at t = 0."""
    out = ds["output"].where(ds[STATUS] == 1).load()
    widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
    limit = out.sel(width=np.inf)
    sup, end, start = [], [], []
    for w in widths:
        rms = np.sqrt(((out.sel(width=w) - limit) ** 2).mean("probe")).transpose("seed", "step").values
        sup.append(np.nanmax(rms, axis=1))
        end.append(rms[:, -1])
        start.append(rms[:, 0])
    return widths, np.array(sup), np.array(end), np.array(start)


#: frozen ends "learn": the limit's test loss falls by at least this fraction
LIMIT_FALL = 0.5


def analyse_frozen(store: Path, figs: Path, sec: Section) -> None:
    analyse_generic("frozen_ends", ["test_loss", "weight_change"])(store, figs, sec)
    ds = mfdsl.open_store(store)
    try:
        loss = ds["test_loss"].where(ds[STATUS] == 1).load()
        limit = loss.sel(width=np.inf)
        first, last = float(limit.isel(step=0).mean("seed")), float(limit.isel(step=-1).mean("seed"))
        widths, sup, end, start = output_distance(ds)
        loss_runs = np.array(
            [
                np.nanmax(np.abs((loss.sel(width=w) - limit).transpose("seed", "step").values), axis=1)
                for w in widths
            ]
        )
        seeds = int(ds.sizes["seed"])
        t_end = float(np.asarray(ds["time"].values, dtype=np.float64).reshape(-1)[-1])
        # {run: particles per layer}: the most any layer holds (collapsed layers hold 1)
        counts = ds.attrs.get("limit_particles") or {}
        particles = max((max(v) for v in counts.values()), default=None) if isinstance(counts, dict) else None
    finally:
        ds.close()
    fall = 1 - last / first
    rates = {
        name: fit_rate(widths, np.nanmean(v, axis=1))
        for name, v in (("sup", sup), ("end", end), ("start", start))
    }
    loss_rate = fit_rate(widths, np.nanmean(loss_runs, axis=1))
    mean_sup = np.nanmean(sup, axis=1)
    falls = rates["sup"] is not None and rates["sup"].ci95 is not None and rates["sup"].ci95[1] < 0
    sec.numbers.update(
        limit_loss_start=first,
        limit_loss_end=last,
        limit_fall=fall,
        learns=fall >= LIMIT_FALL,
        output_sup_rate=rate_dict(rates["sup"]),
        output_end_rate=rate_dict(rates["end"]),
        output_start_rate=rate_dict(rates["start"]),
        output_sup={f"{w:g}": float(v) for w, v in zip(widths, mean_sup, strict=True)},
        test_loss_per_run_rate=rate_dict(loss_rate),
        distance_falls=bool(falls and mean_sup[-1] < mean_sup[0]),
    )
    fig = loglog_figure(
        f"rms_probes |output_n − output_∞|: dots {seeds} seeds, markers their mean",
        [("sup over t", widths, sup, "C0"), ("at the end", widths, end, "C2")],
        "distance of the learned function to the limit's",
    )
    rel = save(fig, figs / "frozen_ends-output-distance.png")
    sec.add(
        "",
        "Three hidden tanh layers; layer 1 (random features) and the read-out layer 4 are frozen, "
        "layers 2 and 3 train (Araújo, Oliveira & Yukimura 2019).  Middle weights and frozen read-out "
        "are N(1, 1): not centred, so the limit is off the saddle of mean-field.md §3 (the centred "
        "version is the counter-example below).  Online SGD on a random tanh teacher (regression), "
        f"t = {t_end:g}; the limit (jax)" + (f" with {particles} particles." if particles else "."),
        "",
        "| width | " + " | ".join(f"{w:g}" for w in widths) + " |",
        "|---|" + "---:|" * len(widths),
        "| sup_t rms \\|output − limit\\|, mean over seeds | " + " | ".join(fmt(v) for v in mean_sup) + " |",
        f"| … at the end (t = {t_end:g}) | " + " | ".join(fmt(v) for v in np.nanmean(end, axis=1)) + " |",
        "| … at t = 0 | " + " | ".join(fmt(v) for v in np.nanmean(start, axis=1)) + " |",
        "| per run sup_t \\|test loss − limit\\|, mean over seeds | "
        + " | ".join(fmt(v) for v in np.nanmean(loss_runs, axis=1))
        + " |",
        "",
        "| quantity | this run | theory / paper |",
        "|---|---|---|",
        f"| the limit's test loss, t = 0 → end (seed mean) | {first:.4g} → {last:.4g}: **−{100 * fall:.0f} %** "
        f"| the middle layers learn in the limit (asked: ≥ {100 * LIMIT_FALL:.0f} %) |",
        f"| slope in n of the learned function's sup_t distance | **{rate_text(rates['sup'])}** | −1/2 "
        "(finite networks converge to the McKean–Vlasov limit; mean-field.md P1) |",
        f"| … of its distance at the end of training | **{rate_text(rates['end'])}** | −1/2 |",
        f"| … at t = 0 | {rate_text(rates['start'])} | −1/2 by construction (see below) |",
        f"| slope of the per-run test-loss distance | {rate_text(loss_rate)} | −1/2, noisily |",
        "",
        "**What is evidence here.**  At t = 0 the limit's output is exactly 0 (its middle "
        "pre-activations are the means of symmetric first-layer features), and a finite network's is "
        "its own O(n^-1/2) sampling fluctuation: the distance at t = 0 falls like n^-1/2 by the central "
        "limit theorem, whatever the dynamics.  The evidence that the finite networks follow the "
        "limit's *training* is the distance at the end, after the loss has fallen by "
        f"{100 * fall:.0f} %, and the sup over the whole run.  The test-loss distance is a signed "
        "projection of the same error (the sign of ⟨y, output_n − output_∞⟩ varies run to run), so its "
        "per-run values scatter more; the seed mean's distance that `mfdsl report` fits falls faster "
        "than n^-1/2 because the seeds' errors partly cancel.",
        "",
        figure_line("distance of the learned function to the limit's against width", rel),
    )


def analyse_saddle(store: Path, figs: Path, sec: Section) -> None:
    analyse_generic("frozen_ends_saddle", ["test_loss", "weight_change"])(store, figs, sec)
    ds = mfdsl.open_store(store)
    try:
        loss = ds["test_loss"].where(ds[STATUS] == 1).load()
        widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
        limit = loss.sel(width=np.inf)
        moved = float(np.nanmax(np.abs((limit - limit.isel(step=0)).values)))
        start = float(limit.isel(step=0).mean("seed"))
        falls = {
            w: float(
                1 - loss.sel(width=w).isel(step=-1).mean("seed") / loss.sel(width=w).isel(step=0).mean("seed")
            )
            for w in widths
        }
    finally:
        ds.close()
    sec.numbers.update(
        limit_moved=moved, limit_loss=start, finite_fall={f"{w:g}": v for w, v in falls.items()}
    )
    sec.add(
        "",
        "**A counter-example, on purpose.**  The frozen-ends network above with centred middle "
        "weights and a centred frozen read-out (N(0, 1)): the saddle of mean-field.md §3.  In the "
        f"limit the test loss moves by at most {moved:.1g} from {start:.4g} over the whole run, and "
        "the middle weights not at all; the finite networks lower their loss by "
        + ", ".join(f"{100 * v:.1f} % (n = {w:g})" for w, v in falls.items())
        + " — less the wider they are, since they leave the saddle only through their O(n^-1/2) "
        "fluctuations.  The widths do converge to the limit, but to a network that learns nothing: "
        "convergence to the limit is evidence about a spec only once the limit is seen to move.  "
        "`mfdsl check` warns of this spec's saddle (the spec silences the warning with "
        "`# mfdsl: allow saddle`).",
    )


def analyse_diversity(store: Path, figs: Path, sec: Section) -> None:
    curves = mfdsl.plot(store, output=figs / "diversity-curves.png", variables=["test_loss", "neuron_spread"])
    ds = mfdsl.open_store(store)
    try:
        done = ds[STATUS] == 1
        spread = ds["neuron_spread"].where(done).load()
        loss = ds["test_loss"].where(done).load()
        widths = [float(w) for w in ds["width"].values if math.isfinite(float(w))]
        limit = [float(w) for w in ds["width"].values if not math.isfinite(float(w))]
        kinds = [int(v) for v in ds["diversity"].values]
        layers = [int(v) for v in ds["layer"].values]
        seeds = ds.sizes["seed"]

        def per_run(d: int, layer: int, step: int) -> np.ndarray:
            return np.array(
                [spread.sel(width=w, diversity=d, layer=layer).isel(step=step).values for w in widths]
            )  # (widths, seeds)

        final = {(d, ell): per_run(d, ell, -1) for d in kinds for ell in layers}
        initial = {(d, ell): per_run(d, ell, 0) for d in kinds for ell in layers}
        xs = np.repeat(widths, seeds)
        rates = {key: fit_rate(xs, v.ravel()) for key, v in final.items()}
        rates0 = {key: fit_rate(xs, v.ravel()) for key, v in initial.items()}
        limit_spread = (
            {
                (d, ell): float(spread.sel(width=limit[0], diversity=d, layer=ell).isel(step=-1).mean("seed"))
                for d in kinds
                for ell in layers
            }
            if limit
            else {}
        )
        final_loss = {
            d: {w: float(loss.sel(width=w, diversity=d).isel(step=-1).mean("seed")) for w in widths + limit}
            for d in kinds
        }
        loss_sd = {
            d: {
                w: float(loss.sel(width=w, diversity=d).isel(step=-1).std("seed", ddof=1))
                for w in widths + limit
            }
            for d in kinds
        }
        accuracy = {d: final_accuracy(ds, {"diversity": d}) for d in kinds}
        fig = loglog_figure(
            "neuron_spread of H_2 at the end of training (dots: runs)",
            [
                (f"{'i.i.d.' if d == 0 else f'embedded (diversity = {d})'}, final", widths, final[(d, 2)], c)
                for d, c in zip(kinds, ("C1", "C0"), strict=True)
            ]
            + [("i.i.d., at initialisation", widths, initial[(kinds[0], 2)], "grey")],
            "std across neurons of H_2",
            guide=False,
        )
        rel = save(fig, figs / "diversity-final-spread.png")
    finally:
        ds.close()
    iid, emb = kinds[0], kinds[-1]
    sec.numbers.update(
        final_rate={f"{d}/{ell}": rate_dict(r) for (d, ell), r in rates.items()},
        initial_rate={f"{d}/{ell}": rate_dict(r) for (d, ell), r in rates0.items()},
        limit_spread={f"{d}/{ell}": v for (d, ell), v in limit_spread.items()},
        final_loss={str(d): {f"{w:g}": v for w, v in row.items()} for d, row in final_loss.items()},
        final_accuracy={str(d): {f"{w:g}": a for w, a in accuracy[d].items()} for d in kinds},
    )
    name = {iid: "i.i.d.", emb: "embedded"}
    columns = widths + limit
    sec.add(
        "Four-layer ReLU networks with biases (h = 3 hidden layers) on isotropic Gaussians (online SGD, "
        "t = 30), initialised from one spec: `embedded(mean = 1 + diversity · cos(2π(u_in − u_out)), std = 1)` "
        "for the middle layers and `diversity · cos(2π u_out)/√d` as the first layer's mean.  At "
        "`diversity = 0` this is the i.i.d. N(1, 1) initialisation of P3; at `diversity = 2` every neuron's "
        "weights depend on its latent coordinate (a neuronal embedding with bidirectional diversity).  "
        "`neuron_spread` of layer ℓ is the standard deviation across its neurons of the pre-activation H_ℓ; "
        "layer 2 is the middle layer that degenerates under i.i.d. weights.  The limit (jax, 256 particles) "
        "is collapsed under i.i.d. weights (its spread is 0 by construction) and keeps a 256 × 256 pairwise "
        "state for each embedded middle layer.",
        "",
        "| width | " + " | ".join(f"{w:g}" for w in columns) + " |",
        "|---|" + "---:|" * len(columns),
        *[
            f"| final spread of H_{ell}, {name[d]} | "
            + " | ".join(fmt(v) for v in np.nanmean(final[(d, ell)], axis=1))
            + (f" | {fmt(limit_spread[(d, ell)])}" if limit else "")
            + " |"
            for ell in layers
            for d in kinds
        ],
        *[
            f"| final test loss, {name[d]} | "
            + " | ".join(f"{fmt(final_loss[d][w], 3)} ± {fmt(loss_sd[d][w], 1)}" for w in columns)
            + " |"
            for d in kinds
        ],
        *[
            f"| final test accuracy, {name[d]} | "
            + " | ".join(fmt(accuracy[d].get(w), 3) for w in columns)
            + " |"
            for d in kinds
        ],
        "",
        "| quantity | this run | theory / paper |",
        "|---|---|---|",
        f"| slope of the final spread of H_2 in n, i.i.d. | **{rate_text(rates[(iid, 2)])}** | −1/2: the middle "
        "layer degenerates (Pham & Nguyen 2020; P3) |",
        f"| slope of the final spread of H_2 in n, embedded | **{rate_text(rates[(emb, 2)])}** | ≈ 0: "
        "bidirectional diversity keeps the neurons apart at every width (Pham & Nguyen 2020) |",
        f"| slope of the final spread of H_3 in n, i.i.d. / embedded | {rate_text(rates[(iid, 3)])} / "
        f"{rate_text(rates[(emb, 3)])} | ≈ 0 for both: the last hidden layer does not degenerate |",
        f"| slope at initialisation of H_2, i.i.d. / embedded | {rate_text(rates0[(iid, 2)])} / "
        f"{rate_text(rates0[(emb, 2)])} | −1/2 (sampling) / 0 (by construction) |",
        "",
        "Slopes are least-squares fits of log spread against log n over every run (widths × seeds), "
        "with 95 % t intervals (`mfdsl.analysis.report.fit_rate`; the figure fits the seed means, hence its "
        "narrower intervals).  The embedded spread's small negative "
        "slope is the finite-width part: the spread is about √(s∞² + c²/n), the limit's O(1) "
        "spread s∞ with the O(n^-1/2) fluctuation of the i.i.d. part added in quadrature; the limit "
        "column is s∞ itself, within the particle system's own N^-1/2 error.  The limit is "
        "gradient flow on the population loss, while the networks run SGD with batch 16, whose "
        "noise does not vanish with the width: their final test losses sit "
        + (
            " and ".join(
                f"{final_loss[d][widths[-1]] - final_loss[d][limit[0]]:.3f} ({name[d]})" for d in kinds
            )
            if limit
            else "—"
        )
        + f" above the limit's at n = {widths[-1]:g}, so the widths are compared with each other here, "
        "and the limit for its spread.  The embedded "
        "networks reach a lower mean test loss than the i.i.d. ones at every width and in the limit: "
        "their middle layer carries a function of x per neuron rather than one shared scalar.",
        "",
        figure_line("final neuron spread against width, i.i.d. and embedded", rel),
        "",
        figure_line(
            "test loss and neuron spread over time, a row per initialisation",
            f"{FIGURES}/{Path(curves).name}",
        ),
    )


def analyse_cnn(store: Path, figs: Path, sec: Section) -> None:
    """P1 for convolutions: each finite cnn's sup-distance to the jax limit of its seed
    (plain particles, one per channel), its fitted rate with a CI, and the curves."""
    ds = mfdsl.open_store(store)
    try:
        rows = {}
        series = []
        for var, colour in (("train_loss", "C0"), ("test_loss", "C3")):
            widths, d = per_run_distance(ds, var)
            mean = np.nanmean(d, axis=1)
            rate = fit_rate(widths, mean)
            rows[var] = (widths, mean, rate)
            series.append((var, widths, d, colour))
            sec.numbers[f"{var}_per_run_rate"] = rate_dict(rate)
        seeds = int(ds.sizes["seed"])
        fig = loglog_figure(
            f"cnn: sup_t |loss_n − loss_∞|: dots {seeds} seeds, markers their mean",
            series,
            "distance to the infinite-channel limit",
        )
        rel = save(fig, figs / "cnn_synthetic-per-run.png")
        accuracy = final_accuracy(ds)
    finally:
        ds.close()
    curves = mfdsl.plot(
        store, output=figs / "cnn_synthetic-curves.png", variables=["train_loss", "test_loss"]
    )
    widths, mean_train, rate_train = rows["train_loss"]
    _, mean_test, rate_test = rows["test_loss"]
    sec.numbers["final_accuracy"] = {f"{w:g}": a for w, a in accuracy.items()}
    sec.add(
        "A cnn on 3-channel 8×8 textures (one 3×3 conv layer with 2×2 average pooling, global "
        "average pooling, one mean-field dense layer, ReLU, biases), full-batch gradient descent "
        f"(no SGD noise), at {widths[0]:g} … {widths[-1]:g} channels, {seeds} seeds each, against the "
        "jax infinite-channel limit of each seed (512 particles, each a channel carrying its filter).",
        "",
        "| channels | " + " | ".join(f"{w:g}" for w in widths) + " |",
        "|---|" + "---:|" * len(widths),
        "| mean over seeds of sup_t \\|train loss − limit\\| | "
        + " | ".join(fmt(v) for v in mean_train)
        + " |",
        "| mean over seeds of sup_t \\|test loss − limit\\| | "
        + " | ".join(fmt(v) for v in mean_test)
        + " |",
        "",
        "| fitted log–log slope (95 % CI) | this run | theory |",
        "|---|---|---|",
        f"| per run, train loss | **{rate_text(rate_train)}** | −1/2 (Monte Carlo over channels) |",
        f"| per run, test loss | **{rate_text(rate_test)}** | −1/2 |",
        "",
        "The limit's own Monte Carlo error (512 particles) is about (n/512)^1/2 of width n's, so it "
        "flattens the fit a little at 64 channels; the CIs are wide with four widths and eight seeds. "
        "tests/test_cnn.py asserts the train-loss slope lies in [−0.8, −0.3].",
        "",
        figure_line("per-run distance to the limit against the channel count", rel),
        "",
        figure_line(
            "loss curves, a colour per channel count, the limit in black", f"{FIGURES}/{Path(curves).name}"
        ),
    )


ANALYSES: dict[str, Callable[[Path, Path, Section], None]] = {
    "width": analyse_width,
    "fig5": analyse_fig5,
    "degeneracy": analyse_degeneracy,
    "diversity": analyse_diversity,
    "mmn": analyse_mmn,
    "quickstart": analyse_quickstart,
    "frozen": analyse_frozen,
    "frozen_saddle": analyse_saddle,
    "fig1": analyse_generic("nguyen2019_fig1"),
    "cnn": analyse_cnn,
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
        "those of `docs/mean-field.md`; P4 (particle solver at N^-1/2, Euler error "
        "∝ dt) and P5 (exactness) are checked by `tests/test_jax_convergence.py` and "
        "`tests/test_jax_solver.py`, P1–P3 and P6 also, CI-sized, by `tests/test_predictions.py`; "
        "the quickstart, frozen ends (and its saddle), Fig. 5's need for biases and the regimes' "
        "initial scales by `tests/test_examples.py`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "time per experiment (`mfdsl run`, 2 workers): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items() if v)
        + f" — {sum(v for v in times.values() if v) / 60:.1f} min in all.",
        "",
        "**Evidence, and what holds by construction.**  Some agreements between a finite "
        "network and the limit, or between two runs, hold whatever the theory says, and are not "
        "counted as evidence here: (1) quantities at t = 0 — the limit starts from the laws the "
        "finite networks sample, so their distance at t = 0 is the sampling fluctuation, "
        "O(n^-1/2) by the central limit theorem (the evidence is the distance during and after "
        "training); (2) the limit computed with N particles and no reductions *is* a width-N "
        "network trained by gradient flow on the same data (P5: a test of the implementation, "
        "not of the theory); (3) limits that R1 makes equal (Fig. 5's two τ₂ rows); (4) a loss "
        "plateau shared by every width when the network cannot classify — a bias-free ReLU "
        "network on classes that differ only in norm reaches at best the loss of a·‖x‖, at "
        "every width (each section reports its test accuracy, and says so when it is at "
        "chance); (5) convergence to a limit that does not move (the frozen-ends saddle below: "
        "a limit must be seen to learn before convergence to it means anything).",
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
    if "diversity" in numbers:
        iid = numbers["diversity"]["final_rate"].get("0/2")
        emb = numbers["diversity"]["final_rate"].get("2/2")
        ok = contains(iid, -0.5) and emb is not None and emb["slope"] > -0.25
        out.append(
            f"| P3b bidirectional diversity | Pham–Nguyen | H_2's spread: i.i.d. slope {slope(iid)}, "
            f"embedded slope {slope(emb)} " + ("✓" if ok else "**check**") + " |"
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
    if "quickstart" in numbers:
        q = numbers["quickstart"]
        out.append(
            f"| the quickstart learns | quickstart | test accuracy {q['accuracy_start']:.2f} → "
            f"{q['accuracy_widest']:.3f} (width {q['widest']}) and {q['accuracy_limit']:.3f} (limit), "
            f"asked ≥ {LEARNS_ACCURACY} " + ("✓" if q["learns"] else "**no**") + "; test-loss distance to "
            f"the limit {q['distance']['test_loss'][q['narrowest']]:.3g} (width {q['narrowest']}) → "
            f"{q['distance']['test_loss'][q['widest']]:.3g} (width {q['widest']}) "
            + ("✓" if q["closes"] else "**not falling**")
            + " |"
        )
    if "frozen" in numbers:
        f = numbers["frozen"]
        r = f.get("output_sup_rate")
        out.append(
            f"| frozen ends: the middle layers learn, the widths follow | Araújo et al. 2019 | the limit's test "
            f"loss falls {100 * f['limit_fall']:.0f} % (asked ≥ {100 * LIMIT_FALL:.0f} %) "
            + ("✓" if f["learns"] else "**no**")
            + f"; distance of the learned function to the limit's, slope {slope(r)} "
            + ("✓" if f["distance_falls"] else "**not falling**")
            + " |"
        )
    if "frozen_saddle" in numbers:
        s = numbers["frozen_saddle"]
        falls = list(s["finite_fall"].values())
        out.append(
            "| counter-example: a saddle | frozen ends, centred | the limit's loss moves by "
            f"{s['limit_moved']:.1g} (it cannot learn) "
            + ("✓" if s["limit_moved"] < 1e-3 * s["limit_loss"] else "**it moves**")
            + "; the finite networks' fall shrinks with the width ("
            + ", ".join(f"{100 * v:.1f} %" for v in falls)
            + ") "
            + ("✓" if all(a > b for a, b in pairwise(falls)) else "**check**")
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
