"""The researcher's workflow around a sweep (issue 19): progress without a terminal,
growing a finished store (``--extend``), geometric ranges and the size of a sweep,
separate data and init seeds, devices."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_sweep

from mfdsl._progress import Estimate, Tracker, clock, summary_period

pytestmark = pytest.mark.usefixtures("wide_console")

SMALL = """\
experiment small

data isotropic_gaussian {{ dim = 4, delta = 0.5, train = online, test = 32 }}

network mlp {{ hidden = 1, activation = tanh, bias = true }}

scaling mean_field

train {{
  optimizer = sgd(lr = {lr})
  loss      = mse
  batch     = 4
  steps     = 20
}}

record every 10 {{ train_loss, test_loss }}

sweep {{ width = {widths}, seed = {seeds} }}

backends torch
"""


def small_spec(folder: Path, *, widths: str = "[8]", seeds: str = "0..1", lr: str = "0.05") -> Path:
    path = folder / "small.mf"
    path.write_text(SMALL.format(widths=widths, seeds=seeds, lr=lr), encoding="utf-8")
    return path


# ---- progress ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fake_task(key: str, width: float, steps: int = 100, backend: str = "torch") -> SimpleNamespace:
    layers = [SimpleNamespace(fan_in=10, fan_out=width), SimpleNamespace(fan_in=width, fan_out=1)]
    plan = SimpleNamespace(steps=steps, batch=1, width=width, layers=layers)
    return SimpleNamespace(key=key, backend=backend, plan=plan)


def test_the_estimate_weighs_runs_by_their_cost() -> None:
    # two units, the second four times the work of the first (width 4 × 8), one worker
    now = FakeClock()
    small, large = [fake_task("a", 8)], [fake_task("b", 32)]
    estimate = Estimate([large, small], workers=1, now=now)
    assert estimate.left() is None  # nothing to go by yet
    estimate.started("b")
    now.t = 10.0
    estimate.step("b", 50)  # half of the large unit in 10 s
    # the large unit's own pace: 10 s left; the small one at the large one's rate, a
    # quarter of the work (8 × 11 against 32 × 11 weights): 5 s
    assert estimate.left() == pytest.approx(15.0)
    now.t = 20.0
    assert estimate.finished("b") == pytest.approx(20.0)
    # 20 s for the large unit: the small one, a quarter of its work, takes 5 s
    assert estimate.left() == pytest.approx(5.0)
    estimate.started("a")
    now.t = 23.0
    estimate.step("a", 50)
    assert estimate.left() == pytest.approx(3.0)  # a unit in flight goes by its own pace
    now.t = 26.0
    estimate.finished("a")
    assert estimate.left() == 0.0


def test_requeued_runs_lose_their_progress() -> None:
    now = FakeClock()
    estimate = Estimate([[fake_task("a", 8), fake_task("b", 8)]], workers=2, now=now)
    estimate.started("a")
    now.t = 5.0
    estimate.step("a", 100)
    estimate.finished("a")
    estimate.requeued(["a", "b"])
    assert estimate.finished_runs == 0 and estimate.running() == 0


def test_clock_and_period(monkeypatch: pytest.MonkeyPatch) -> None:
    assert clock(None) == "?" and clock(3725.4) == "1:02:05"
    monkeypatch.setenv("MFDSL_PROGRESS_EVERY", "0.5")
    assert summary_period() == 0.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("MFDSL_PROGRESS_EVERY", bad)
        assert summary_period() == 30.0


def test_a_terminal_shows_the_time_left_of_runs_and_sweep() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    with Tracker(console, [[fake_task("torch:width=8", 8)]], 1, live=True) as tracker:
        tracker.started("torch:width=8")
        tracker.step("torch:width=8", 50, 0.25)
        tracker.finished("torch:width=8", "done")
    assert re.search(r"sweep .* 1/1 .* eta 0:00:00", out.getvalue())


def test_a_run_redirected_to_a_file_logs_progress_with_an_eta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("MFDSL_PROGRESS_EVERY", "0.05")
    spec = small_spec(tmp_path, widths="[8, 16]")
    result = run_sweep(spec, tmp_path / "s.zarr")
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert lines[0] == "running 4 runs on 1 worker; a progress line every 0.05 s"
    finished = [line for line in lines if re.match(r"\[\d/4\] done +torch:width=", line)]
    assert len(finished) == 4
    assert all(re.search(r"elapsed \d:\d\d:\d\d · eta \d:\d\d:\d\d$", line) for line in finished)
    summaries = [line for line in lines if line.startswith("progress: ")]
    assert summaries[-1].startswith("progress: 4/4 runs finished (4 done) · elapsed ")
    assert summaries[-1].endswith("eta 0:00:00")
