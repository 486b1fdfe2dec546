"""``mfdsl report``: statistics, distances, rates and their intervals, on synthetic stores."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from mfdsl._cli import main
from mfdsl._report import fit_rate, summarize, t_quantile_975
from mfdsl._store import Status, VariableSpec, _quiet_consolidation, create_store, write_run

WIDTHS = [16.0, 64.0, 256.0, 1024.0]
SEEDS = [0, 1, 2]
STEPS = np.arange(0, 101, 10)
LRS = [0.1, 0.2]
C = 2.0
PARTICLES = 6
COMPONENTS = ["w_in_1", "w_in_2", "w_in_norm", "w_out"]


def limit_loss(t: np.ndarray) -> np.ndarray:
    return 0.2 + np.exp(-t)


def bump(t: np.ndarray) -> np.ndarray:
    return t * np.exp(-t)  # 0 at t = 0, peak e^{-1} at t = 1


def make_store(
    path: Path,
    *,
    limit: bool = True,
    lrs: list[float] | None = None,
    failed: tuple[int, int] | None = (0, 2),
    widths: list[float] | None = None,
) -> dict[str, Any]:
    """A store as ``mfdsl run`` writes it, filled with known numbers, no training:
    ``loss_n(t) = loss_∞(t) + n^{-1/2} (C·bump(t) + noise)``, so the distance to the limit
    falls like ``n^{-1/2}``.  Run ``failed`` = (width index, seed) is marked failed and
    must be ignored."""
    lrs = LRS if lrs is None else lrs
    finite = WIDTHS if widths is None else widths
    widths = [*finite, math.inf] if limit else list(finite)
    sweep: dict[str, Any] = {"width": widths, "seed": SEEDS}
    if len(lrs) > 1:
        sweep["lr"] = lrs
        time: tuple[tuple[str, ...], np.ndarray] = (("lr", "step"), np.outer(lrs, STEPS).astype(np.float64))
    else:
        time = (("step",), lrs[0] * STEPS.astype(np.float64))
    create_store(
        path,
        sweep=sweep,
        steps=STEPS,
        time=time,
        variables=[
            VariableSpec(name="train_loss", long_name="training loss"),
            VariableSpec(name="test_accuracy", long_name="test accuracy"),
            VariableSpec(name="weight_change", dims=("layer",), long_name="weight change"),
            VariableSpec(name="particles", dims=("particle", "component"), long_name="particles"),
        ],
        extra_coords={"layer": [1, 2], "particle": np.arange(PARTICLES), "component": COMPONENTS},
        attrs={"experiment": "synthetic"},
    )
    rng = np.random.default_rng(0)
    finals: dict[tuple[int, int], list[float]] = {}
    shape = (len(widths), len(SEEDS), *((len(lrs),) if len(lrs) > 1 else ()), STEPS.size)
    arrays = {
        "train_loss": np.full(shape, np.nan),
        "test_accuracy": np.full(shape, np.nan),
        "weight_change": np.full((*shape, 2), np.nan),
        "particles": np.full((*shape, PARTICLES, 4), np.nan),
    }
    status = np.full(shape[:-1], int(Status.DONE), dtype=np.int8)
    for li, lr in enumerate(lrs):
        t = lr * STEPS
        for wi, width in enumerate(widths):
            for si, _ in enumerate(SEEDS):
                cell = (wi, si, li) if len(lrs) > 1 else (wi, si)
                if failed is not None and (wi, si) == failed:
                    status[cell] = Status.FAILED
                    continue
                scale = 0.0 if math.isinf(width) else width**-0.5
                loss = limit_loss(t) + scale * (C * bump(t) + 0.02 * rng.standard_normal(t.size))
                arrays["train_loss"][cell] = loss
                arrays["test_accuracy"][cell] = 1.0 - 0.5 * loss
                arrays["weight_change"][cell] = np.stack([scale * t, 2 * scale * t], axis=1)
                particles = rng.standard_normal((t.size, PARTICLES, 4))
                particles[..., 2] = np.abs(particles[..., 2])
                arrays["particles"][cell] = particles
                finals.setdefault((li, wi), []).append(float(loss[-1]))
    # One write per variable (as if every run had called write_run, which takes ~50 ms
    # a cell); one cell goes through write_run itself, so the layout is the real one.
    group = zarr.open_group(path, mode="r+")
    for name, values in arrays.items():
        group[name][...] = values
    group["status"][...] = status
    first = {"width": 1, "seed": 0, **({"lr": 0} if len(lrs) > 1 else {})}
    cell = (1, 0, 0) if len(lrs) > 1 else (1, 0)
    write_run(
        path, index=first, records={n: v[cell] for n, v in arrays.items()}, steps=STEPS, status=Status.DONE
    )
    return {"finals": finals, "widths": widths}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("report") / "synthetic.zarr"
    return path, make_store(path)


def test_summary_structure_and_final_values(store: tuple[Path, dict[str, Any]]) -> None:
    path, truth = store
    summary = summarize(path)
    assert set(summary) == {
        "store",
        "experiment",
        "store_format",
        "finalized",
        "variables",
        "sweep",
        "slices",
    }
    assert summary["experiment"] == "synthetic" and summary["store_format"] == 1
    assert summary["variables"] == [
        "train_loss",
        "test_accuracy",
        "weight_change[layer=1]",
        "weight_change[layer=2]",
    ]
    assert summary["sweep"]["width"] == [16, 64, 256, 1024, "inf"]
    assert [s["coords"] for s in summary["slices"]] == [{"lr": 0.1}, {"lr": 0.2}]
    for li, part in enumerate(summary["slices"]):
        assert set(part) == {"coords", "reference", "widths", "rates"}
        assert [row["width"] for row in part["widths"]] == [16, 64, 256, 1024, "inf"]
        for wi, row in enumerate(part["widths"]):
            assert set(row) == {"width", "runs_done", "runs", "final", "distance"}
            expected = truth["finals"][(li, wi)]
            assert row["runs"] == 3 and row["runs_done"] == len(expected) == (2 if wi == 0 else 3)
            final = row["final"]["train_loss"]
            assert final["n"] == len(expected)
            assert final["mean"] == pytest.approx(np.mean(expected), rel=1e-12)
            assert final["std"] == pytest.approx(np.std(expected, ddof=1), rel=1e-12)
        assert part["widths"][-1]["distance"]["train_loss"] is None  # the limit itself


def test_distances_and_rates(store: tuple[Path, dict[str, Any]]) -> None:
    path, _ = store
    for part in summarize(path)["slices"]:
        assert part["reference"]["train_loss"] == {"kind": "limit", "width": "inf"}
        peak = C * max(bump(np.asarray(part["coords"]["lr"]) * STEPS))
        for row in part["widths"][:-1]:
            # sup_t of C·bump(t)/√n, up to the seed noise
            assert row["distance"]["train_loss"] == pytest.approx(peak / math.sqrt(row["width"]), rel=0.1)
        rate = part["rates"]["train_loss"]
        assert set(rate) == {"slope", "intercept", "stderr", "ci95", "points", "df"}
        assert rate["points"] == 4 and rate["df"] == 2
        assert rate["slope"] == pytest.approx(-0.5, abs=0.02)
        lo, hi = rate["ci95"]
        assert lo < -0.5 < hi and hi - lo < 0.2
        # weight_change: layer 2 moves twice as much, same rate
        assert part["rates"]["weight_change[layer=2]"]["slope"] == pytest.approx(-0.5, abs=1e-9)


def test_without_a_limit_the_widest_run_is_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "nolimit.zarr"
    make_store(path, limit=False, lrs=[0.1], failed=None)
    (part,) = summarize(path)["slices"]
    assert part["coords"] == {}
    assert part["reference"]["train_loss"] == {"kind": "widest", "width": 1024}
    assert part["widths"][-1]["distance"]["train_loss"] is None
    assert part["rates"]["train_loss"]["points"] == 3


def test_report_cli_table_and_json(
    store: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = store
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.1" in out and "lr = 0.2" in out
    assert "2/3" in out and "∞" in out and "weight_change[layer=2]" in out
    assert "ref = the limit (width ∞)" in out and "rate" in out and "-0.50" in out
    assert main(["report", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(summarize(path)))


def test_report_of_an_unfinished_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.zarr"
    create_store(
        path,
        sweep={"width": [8.0, 16.0], "seed": [0]},
        steps=[0, 1],
        time=(("step",), np.array([0.0, 0.1])),
        variables=[VariableSpec(name="train_loss", long_name="training loss")],
    )
    assert main(["report", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (part,) = data["slices"]
    assert part["rates"]["train_loss"] is None
    assert part["widths"][0]["final"]["train_loss"] == {"mean": None, "std": None, "n": 0}
    assert main(["report", str(path)]) == 0
    assert "not finalized" in capsys.readouterr().out


def test_foreign_and_future_stores_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("step", np.arange(3.0))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    assert main(["report", str(foreign)]) == 2
    assert "was not written by mfdsl (it has no 'mfdsl_store_format' attribute)" in capsys.readouterr().err

    future = tmp_path / "future.zarr"
    make_store(future, lrs=[0.1], failed=None)
    zarr.open_group(future, mode="r+").attrs["mfdsl_store_format"] = 99
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(future))
    assert main(["report", str(future), "--json"]) == 2
    captured = capsys.readouterr()
    assert "store format 99, newer than this mfdsl reads (1)" in captured.err and captured.out == ""

    assert main(["report", str(tmp_path / "missing.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["report", str(tmp_path / "plain")]) == 2
    assert "is not a zarr store" in capsys.readouterr().err


# ---- the statistics ------------------------------------------------------------------------


def _t_cdf(t: float, df: int) -> float:
    x = np.linspace(0.0, t, 200_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return 0.5 + float(np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 13, 30, 31, 45, 100, 1000])
def test_t_quantile(df: int) -> None:
    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-7)


def test_t_quantile_limits() -> None:
    assert t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_fit_rate() -> None:
    n = np.array([50.0, 100, 200, 400, 800, 1600])
    exact = fit_rate(n, 3.0 * n**-0.5)
    assert (
        exact is not None
        and exact.slope == pytest.approx(-0.5)
        and exact.intercept == pytest.approx(math.log(3))
    )
    assert exact.stderr == pytest.approx(0.0, abs=1e-12)
    noisy = 3.0 * n**-0.5 * np.exp(0.05 * np.array([1, -1, 0.5, -0.5, 1, -1]))
    rate = fit_rate(n, noisy)
    assert rate is not None and rate.ci95 is not None and rate.df == 4
    # the textbook formula, spelled out
    lx, ly = np.log(n), np.log(noisy)
    b, a = np.polyfit(lx, ly, 1)
    se = math.sqrt(np.sum((ly - a - b * lx) ** 2) / 4 / np.sum((lx - lx.mean()) ** 2))
    assert rate.slope == pytest.approx(b) and rate.stderr == pytest.approx(se)
    assert rate.ci95 == pytest.approx((b - 2.776445 * se, b + 2.776445 * se))
    two = fit_rate([10, 40], [1.0, 0.5])
    assert two is not None and two.slope == pytest.approx(-0.5) and two.ci95 is None
    assert fit_rate([10], [1.0]) is None
    assert fit_rate([10, 20, 40], [0.0, np.nan, 1.0]) is None  # one usable point
