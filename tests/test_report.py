"""``mfdsl report``: statistics, distances, rates and their intervals, on synthetic stores."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from mfdsl.analysis.report import Counts, Curve, Series, fit_rate, summarize, t_quantile_975
from mfdsl.cli import main
from mfdsl.plan.layout import VariableSpec
from mfdsl.store.status import Status
from mfdsl.store.zarr import _quiet_consolidation, create_store, write_run

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
    diverged: tuple[int, int] | None = None,
    widths: list[float] | None = None,
) -> dict[str, Any]:
    """A store as ``mfdsl run`` writes it, filled with known numbers, no training:
    ``loss_n(t) = loss_∞(t) + n^{-1/2} (C·bump(t) + noise)``, so the distance to the limit
    falls like ``n^{-1/2}``.  Run ``failed`` = (width index, seed) is marked failed and
    must be ignored; so must run ``diverged``, whose records (100 + the loss, far from
    every other run) stop halfway."""
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
                if diverged is not None and (wi, si) == diverged:
                    status[cell] = Status.DIVERGED
                    half = STEPS.size // 2
                    arrays["train_loss"][cell][:half] = 100.0 + loss[:half]
                    arrays["test_accuracy"][cell][:half] = 0.0
                    continue
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
        assert set(part) == {"coords", "reference", "widths", "rates", "rate_notes"}
        assert [row["width"] for row in part["widths"]] == [16, 64, 256, 1024, "inf"]
        for wi, row in enumerate(part["widths"]):
            assert set(row) == {"width", "status", "runs_done", "runs", "final", "distance"}
            expected = truth["finals"][(li, wi)]
            assert row["runs"] == 3 and row["runs_done"] == len(expected) == (2 if wi == 0 else 3)
            assert row["status"] == {
                "done": len(expected),
                "failed": 3 - len(expected),
                "diverged": 0,
                "pending": 0,
            }
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
        assert set(part["rate_notes"].values()) == {None}


def test_without_a_limit_the_widest_run_is_the_reference_and_there_is_no_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distances to the widest run are shown, but not fitted: they vanish at that width
    whatever the rate, so their slope is no rate to the limit."""
    path = tmp_path / "nolimit.zarr"
    make_store(path, limit=False, lrs=[0.1], failed=None)
    (part,) = summarize(path)["slices"]
    assert part["coords"] == {}
    assert part["reference"]["train_loss"] == {"kind": "widest", "width": 1024}
    assert part["widths"][-1]["distance"]["train_loss"] is None
    assert part["widths"][0]["distance"]["train_loss"] > 0
    assert set(part["rates"].values()) == {None}
    assert set(part["rate_notes"].values()) == {"no limit (width ∞) in the store, so no rate to it"}
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ref = the widest run with results (width 1024)" in out
    assert (
        "no rate for train_loss, test_accuracy, weight_change[layer=1], weight_change[layer=2]: "
        "no limit (width ∞) in the store" in out
    )


def test_a_limit_without_finished_runs_gives_no_rate(tmp_path: Path) -> None:
    path = tmp_path / "lostlimit.zarr"
    make_store(path, lrs=[0.1], failed=None)
    group = zarr.open_group(path, mode="r+")
    group["status"][-1, :] = Status.FAILED  # width = inf, every seed
    group["train_loss"][-1, :, :] = np.nan
    (part,) = summarize(path)["slices"]
    assert part["reference"]["train_loss"] == {"kind": "widest", "width": 1024}
    assert part["rates"]["train_loss"] is None
    assert part["rate_notes"]["train_loss"] == "the limit (width ∞) has no finished run of this variable"
    assert part["widths"][-1]["status"] == {"done": 0, "failed": 3, "diverged": 0, "pending": 0}


def _curve(width: float, values: np.ndarray) -> Curve:
    t = np.arange(values.size, dtype=np.float64)
    return Curve(width=width, time=t, runs=values[None, :], counts=Counts(done=1))


def test_rate_says_why_there_is_none() -> None:
    limit = np.array([1.0, 0.5, 0.25])
    same = Series(
        label="x", variable="x", layer=None, curves=tuple(_curve(w, limit) for w in (16.0, 64.0, math.inf))
    )
    assert same.rate() == (None, "the distance to the limit is 0 at every width")
    one = Series(
        label="x",
        variable="x",
        layer=None,
        curves=(_curve(16.0, limit + 0.1), _curve(64.0, np.full(3, np.nan)), _curve(math.inf, limit)),
    )
    assert one.rate() == (None, "only 1 width has a distance to the limit; a rate needs two")
    fitted = Series(
        label="x",
        variable="x",
        layer=None,
        curves=(*(_curve(w, limit + w**-0.5) for w in (16.0, 64.0, 256.0)), _curve(math.inf, limit)),
    )
    rate, note = fitted.rate()
    assert note is None and rate is not None and rate.slope == pytest.approx(-0.5)
    assert rate.points == 3


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


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the rich tables in ``text`` (headers use ┃)."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")
    ]


def test_end_of_run_table_and_report_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table ``mfdsl run`` prints when the sweep ends and ``mfdsl report`` show the
    same numbers: mean ± sample std (ddof 1) over the done runs, a failed and a diverged
    run counted apart and never averaged."""
    from rich.console import Console

    from mfdsl.analysis.report import print_summary

    path = tmp_path / "mixed.zarr"
    truth = make_store(path, failed=(0, 2), diverged=(1, 1))
    console = Console(record=True, width=200, highlight=False)
    print_summary(console, str(path))
    table = console.export_text()
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["report", str(path)]) == 0
    report = capsys.readouterr().out

    # the end-of-run table: lr, width, train_loss, test_accuracy, runs
    assert "final values (mean ± std over the done seeds)" in table
    assert "diverged, failed and pending runs counted apart, never averaged" in table
    ended: dict[tuple[str, str], list[str]] = {}
    lr = ""
    for cells in _table_rows(table):
        lr = cells[0] or lr
        ended[(lr, cells[1])] = cells[2:]
    # the report: a table per slice (lr), a section per variable, a row per width
    reported: dict[tuple[str, str, str], list[str]] = {}
    for block in report.split("lr = ")[1:]:
        lr, variable = block.split("\n", 1)[0].strip(), ""
        for cells in _table_rows(block):
            variable = cells[0] or variable
            if cells[1] != "rate":
                reported[(lr, variable, cells[1])] = [cells[2], cells[3]]
    assert len(ended) == 10 and len(reported) == 40  # 2 lrs × 5 widths (× 4 variables)
    for (lr, width), (loss, accuracy, runs) in ended.items():
        assert reported[(lr, "train_loss", width)] == [runs, loss]
        assert reported[(lr, "test_accuracy", width)] == [runs, accuracy]

    assert ended[("0.1", "16")][2] == "2/3 (1 failed)"
    assert ended[("0.2", "64")][2] == "2/3 (1 diverged)"
    assert ended[("0.1", "256")][2] == "3/3"
    for li, lr in enumerate(["0.1", "0.2"]):
        for wi, width in enumerate(["16", "64", "256", "1024", "∞"]):
            finals = truth["finals"][(li, wi)]
            assert len(finals) == (2 if wi in (0, 1) else 3)
            expected = f"{np.mean(finals):.4g} ± {np.std(finals, ddof=1):.2g}"
            assert ended[(lr, width)][0] == expected  # the diverged run's 100 + loss left out

    data = summarize(path)
    row = data["slices"][1]["widths"][1]
    assert row["status"] == {"done": 2, "failed": 0, "diverged": 1, "pending": 0}
    assert row["final"]["train_loss"]["n"] == 2


def test_a_damaged_store_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A chunk that does not decode: the sweep's last words, mfdsl report and plot
    say so, no traceback."""
    from rich.console import Console

    from mfdsl.analysis.report import print_summary

    path = tmp_path / "damaged.zarr"
    make_store(path, lrs=[0.1], failed=None)
    for chunk in (path / "train_loss" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"\x00garbage")
    console = Console(record=True, width=200, highlight=False)
    print_summary(console, str(path))
    text = " ".join(console.export_text().split())
    assert "no table of final values: 'train_loss' cannot be read (" in text
    assert "'mfdsl verify STORE' names the damaged chunks" in text and f"results: {path}" in text
    # mfdsl report and plot: the same message, exit 2
    commands = [["report", str(path)]]
    if importlib.util.find_spec("matplotlib") is not None:
        commands.append(["plot", str(path), "-o", str(tmp_path / "f.png")])
    for command in commands:
        assert main(command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "error: 'train_loss' cannot be read (" in err and "Traceback" not in err


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
    assert part["widths"][0]["status"] == {"done": 0, "failed": 0, "diverged": 0, "pending": 1}
    assert part["rate_notes"]["train_loss"] == "no limit (width ∞) in the store, so no rate to it"
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not finalized" in out and "0/1 (1 pending)" in out


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
