"""The researcher's workflow around a sweep (issue 19): progress without a terminal,
growing a finished store (``--extend``), geometric ranges and the size of a sweep,
separate data and init seeds, devices."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import open_store, run_cli, run_sweep

from mfdsl.execution.progress import Estimate, Tracker, clock, summary_period

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


# ---- growing a store -----------------------------------------------------------------


def bits(values: np.ndarray) -> bytes | list[str]:
    """Numbers as their bytes (NaN equals itself, -0.0 only -0.0); strings as a list."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind in "fiub":
        return values.view(np.uint8).tobytes()
    return [str(v) for v in values.ravel()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished store of the small spec (widths 8, 16; seeds 0, 1), and its spec."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("extend")
    spec = small_spec(folder, widths="[8, 16]")
    store = folder / "small.zarr"
    result = run_sweep(spec, store)
    assert result.code == 0, result.out + result.err
    return spec, store


def grown_copy(finished: tuple[Path, Path], folder: Path, **spec: str) -> tuple[Path, Path]:
    """A copy of the finished store, and a spec of the same sweep grown by ``spec``."""
    store = folder / "small.zarr"
    shutil.copytree(finished[1], store)
    return small_spec(folder, **{"widths": "[8, 16]", **spec}), store


def assert_old_cells_unchanged(before: Path, after: Path) -> None:
    with open_store(before) as old, open_store(after) as new:
        kept = new.sel(width=old.width, seed=old.seed)
        for name in [*old.data_vars, "message"]:
            assert bits(old[name].values) == bits(kept[name].values), name


def test_extending_by_a_seed_trains_only_its_runs(finished: tuple[Path, Path], tmp_path: Path) -> None:
    spec, store = grown_copy(finished, tmp_path, widths="[8, 16]", seeds="0..2")
    result = run_sweep(spec, store, "--extend")
    assert result.code == 0, result.out + result.err
    assert "extended" in result.err and "seed: 2" in result.err
    trained = re.findall(r"\] done +(\S+)", result.out)
    assert sorted(trained) == ["torch:width=16,seed=2", "torch:width=8,seed=2"]
    assert_old_cells_unchanged(finished[1], store)
    with open_store(store) as ds:
        assert ds.seed.values.tolist() == [0, 1, 2]
        assert (ds.status == 1).all()
        assert ds.attrs["extended"][-1]["added"] == {"seed": [2]}
    check = run_cli("verify", store)
    assert check.code == 0, check.out


def test_extending_by_a_width_keeps_the_spec_order(finished: tuple[Path, Path], tmp_path: Path) -> None:
    spec, store = grown_copy(finished, tmp_path, widths="[4, 8, 16]")
    result = run_sweep(spec, store, "--extend")
    assert result.code == 0, result.out + result.err
    assert sorted(re.findall(r"\] done +(\S+)", result.out)) == [
        "torch:width=4,seed=0",
        "torch:width=4,seed=1",
    ]
    assert_old_cells_unchanged(finished[1], store)
    with open_store(store) as ds:
        assert ds.width.values.tolist() == [4.0, 8.0, 16.0]
    assert run_cli("verify", store).code == 0
    report = run_cli("report", store, "--json")
    assert report.code == 0 and '"width": 4' in report.out.replace(".0", "")
    # extending again with nothing new finishes nothing and changes nothing
    again = run_sweep(spec, store, "--extend")
    assert again.code == 0 and "6 runs already finished, 0 to go" in again.out


def test_extending_refuses_a_changed_schedule_with_the_diff(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, store = grown_copy(finished, tmp_path, seeds="0..2")
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    result = run_sweep(spec, store, "--extend", "--set", "train.schedule=cosine(final = 0.1)")
    assert result.code == 2
    text = " ".join(result.err.split())
    assert "cannot extend" in text and "more than the values of its sweep" in text
    assert "schedule" in result.err and "cosine" in result.err  # the diff shows what changed
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_extending_refuses_to_drop_stored_values(finished: tuple[Path, Path], tmp_path: Path) -> None:
    spec, store = grown_copy(finished, tmp_path, widths="[8, 32]")
    result = run_sweep(spec, store, "--extend")
    assert result.code == 2
    assert "drops 16 from 'width'" in " ".join(result.err.split())


# ---- ranges and the size of a sweep ---------------------------------------------------


def sweep_of(values: str) -> object:
    """The spec :data:`SMALL` with ``sweep { width = [8], v = VALUES }``."""
    import mfdsl

    text = SMALL.format(widths="[8]", seeds="0", lr="0.05").replace(
        "seed = 0 }", f"seed = 0, v = {values} }}"
    )
    return mfdsl.parse(text, path="x.mf")


@pytest.mark.parametrize(
    ("written", "values"),
    [
        ("geom(64, 1024, 5)", (64, 128, 256, 512, 1024)),
        ("geom(1024, 64, 5)", (1024, 512, 256, 128, 64)),
        ("geom(10, 1000, 4)", (10, 46, 215, 1000)),
        ("geom(0.001, 0.1, 3)", (0.001, 0.01, 0.1)),
        ("geom(1e-4, 1.0, 5)", (1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
        ("geom(2, 2 ** 10, 10)", tuple(2**k for k in range(1, 11))),
    ],
)
def test_a_geometric_range(written: str, values: tuple[float, ...]) -> None:
    got = sweep_of(written).sweep["v"]  # type: ignore[attr-defined]
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]
    # each value is start · ratio^k, rounded: to the nearest integer, or to 12 digits
    n, start = len(got), float(got[0])
    ratio = (float(got[-1]) / start) ** (1 / (n - 1))
    for k, value in enumerate(got):
        exact = start * ratio**k
        if isinstance(value, int):
            assert abs(value - exact) <= 0.5
        else:
            assert value == pytest.approx(exact, rel=1e-11)


@pytest.mark.parametrize(
    ("written", "message", "column"),
    [
        ("geom(64, 1024)", "geom() takes three numbers: start, stop and count", 36),
        ("geom(64, 1024, 1)", "geom()'s count must be an integer of at least 2, got 1", 51),
        ("geom(64, 1024, 2.5)", "geom()'s count must be an integer of at least 2, got 2.5", 51),
        ("geom(0, 8, 3)", "geom()'s start and stop must be positive, got 0", 41),
        ("geom(1, 4, 10)", "geom(1, 4, 10) rounds to repeated integers (1, 1, 1, 2, 2, 2, 3, 3, …)", 36),
        ("geom(8, 8, 3)", "geom(8, 8, 3) repeats one value", 36),
    ],
)
def test_a_bad_geometric_range_is_reported_where_it_is_written(
    written: str, message: str, column: int
) -> None:
    from mfdsl.core.errors import SpecError

    with pytest.raises(SpecError) as caught:
        sweep_of(written)
    head = caught.value.render().splitlines()[0]
    assert head == f"x.mf:18:{column}: {message}"  # the call, or the argument at fault


def test_a_long_range_of_widths_is_warned_about_with_a_geometric_one(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    result = run_cli("check", spec, "--set", "sweep.width=64..1024")
    assert result.code == 0, result.err
    err = " ".join(result.err.split())
    assert "warning: 'width' is 961 values, every integer from 64 to 1024" in err
    assert "hint: for values spread over the range, a geometric range: width = geom(64, 1024, 5)" in err
    assert run_cli("check", spec, "--set", "sweep.width=64..1024", "--strict").code == 2
    quiet = run_cli("check", spec, "--set", "sweep.width=geom(64, 1024, 5)", "--set", "sweep.seed=0..199")
    assert quiet.code == 0 and "warning" not in quiet.err


def test_the_rough_time_of_a_sweep() -> None:
    from mfdsl.language.expand import expand
    from mfdsl.plan.estimate import ROUGH_FLOPS, ROUGH_RUN_S, ROUGH_STEP_S, duration, rough_seconds

    spec = sweep_of("[1, 2]")
    points = list(expand(spec))  # type: ignore[arg-type]
    from mfdsl.plan.compile import compile_point

    plan = compile_point(points[0].spec, dict(points[0].coords), "torch")
    weights = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
    one = ROUGH_RUN_S + 20 * (6.0 * 4 * weights / ROUGH_FLOPS + ROUGH_STEP_S)
    assert rough_seconds(points, ["torch"], workers=2) == pytest.approx(2 * one / 2)
    assert [duration(s) for s in (0.2, 61, 3600, 30 * 3600, 5 * 86400)] == [
        "1 s",
        "61 s",
        "60 min",
        "30.0 h",
        "5.0 days",
    ]


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_below_one_is_an_error(tmp_path: Path, workers: str) -> None:
    result = run_cli("run", small_spec(tmp_path), "-o", tmp_path / "s.zarr", "--workers", workers)
    assert result.code == 2
    assert f"--workers takes a number of worker processes of at least 1 (got {workers})" in " ".join(
        result.err.split()
    )
    assert not (tmp_path / "s.zarr").exists()


# ---- seeds apart ---------------------------------------------------------------------


def seeded_plans(sweep: str) -> dict[tuple[int, int], object]:
    """The small spec's plans at width 8 with ``sweep`` added, by (data seed, init seed)."""
    import mfdsl
    from mfdsl.language.expand import expand
    from mfdsl.plan.compile import compile_point

    text = SMALL.format(widths="[8]", seeds="0", lr="0.05").replace("seed = 0 }", f"seed = 0, {sweep} }}")
    plans = {}
    for point in expand(mfdsl.parse(text, path="x.mf")):
        plan = compile_point(point.spec, dict(point.coords), "torch")
        plans[(plan.seed_of_data, plan.seed_of_init)] = plan
    return plans


def first_examples(plan: object) -> np.ndarray:
    from mfdsl.data.make import make_dataset

    data = make_dataset(plan.data, plan.seed_of_data)  # type: ignore[attr-defined]
    x, y = data.train_chunk(0, 3, 4)
    return np.concatenate([x.ravel(), y.ravel(), data.test_x.ravel(), data.test_y.ravel()])


def test_init_seed_apart_changes_the_weights_and_not_the_data() -> None:
    plans = seeded_plans("data_seed = 5, init_seed = [0, 1]")
    a, b = plans[(5, 0)], plans[(5, 1)]
    assert np.array_equal(first_examples(a), first_examples(b))
    for wa, wb in zip(a.initial_weights(), b.initial_weights(), strict=True):  # type: ignore[attr-defined]
        assert wa.shape == wb.shape and not np.allclose(wa, wb)


def test_data_seed_apart_changes_the_data_and_not_the_weights() -> None:
    plans = seeded_plans("data_seed = [0, 1], init_seed = 7")
    a, b = plans[(0, 7)], plans[(1, 7)]
    assert not np.allclose(first_examples(a), first_examples(b))
    for wa, wb in zip(a.initial_weights(), b.initial_weights(), strict=True):  # type: ignore[attr-defined]
        assert np.array_equal(wa, wb)


def test_seeds_apart_default_to_seed() -> None:
    # seed 3 alone, and seed 3 with both seeds set to 3, draw the very same numbers
    alone = seeded_plans("v = 1").popitem()[1]
    spelled = seeded_plans("data_seed = 0, init_seed = 0").popitem()[1]
    assert alone.data_seed is None and alone.init_seed is None  # type: ignore[attr-defined]
    assert (alone.seed_of_data, alone.seed_of_init) == (0, 0)  # type: ignore[attr-defined]
    assert np.array_equal(first_examples(alone), first_examples(spelled))
    for wa, wb in zip(alone.initial_weights(), spelled.initial_weights(), strict=True):  # type: ignore[attr-defined]
        assert np.array_equal(wa, wb)


def test_seeds_apart_are_checked_as_seeds(tmp_path: Path) -> None:
    result = run_cli("check", small_spec(tmp_path), "--set", "sweep.init_seed=[0, -1]")
    assert result.code == 2
    assert "init_seed" in result.err and "-1" in result.err


def test_a_sweep_of_init_seeds_stores_the_same_data_and_other_weights(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    spec = small_spec(tmp_path)
    spec.write_text(
        spec.read_text(encoding="utf-8")
        .replace("{ train_loss, test_loss }", "{ train_loss, test_loss, particles(sample = 4) }")
        .replace("seed = 0..1 }", "seed = 0, data_seed = [0, 1], init_seed = [0, 1] }"),
        encoding="utf-8",
    )
    store = tmp_path / "s.zarr"
    result = run_sweep(spec, store)
    assert result.code == 0, result.out + result.err
    with open_store(store) as ds:
        start = (
            ds.particles.isel(width=0, seed=0).sel(step=0).values
        )  # (data_seed, init_seed, particle, component)
        assert np.array_equal(start[0, 0], start[1, 0]) and np.array_equal(start[0, 1], start[1, 1])
        assert not np.allclose(start[0, 0], start[0, 1])
        assert (ds.status == 1).all()


# ---- devices -------------------------------------------------------------------------


def torch_spec(device: str) -> str:
    return SMALL.format(widths="[8]", seeds="0", lr="0.05") + f"torch {{ device = {device} }}\n"


@pytest.mark.parametrize(
    ("written", "device"), [('"cuda:1"', "cuda:1"), ('"cuda:0"', "cuda:0"), ("cuda", "cuda")]
)
def test_a_gpu_by_its_index_is_accepted(written: str, device: str) -> None:
    import mfdsl

    spec = mfdsl.parse(torch_spec(written), path="x.mf")
    assert dict(spec.options_for("torch").values)["device"] == device


@pytest.mark.parametrize(
    ("written", "message", "hint"),
    [
        (
            '"cuda:x"',
            "unknown device 'cuda:x'; a GPU is \"cuda:N\" with N its index, an integer from 0",
            "cuda:1",
        ),
        (
            '"cuda:-1"',
            "unknown device 'cuda:-1'; a GPU is \"cuda:N\" with N its index, an integer from 0",
            "cuda:1",
        ),
        ('"gpu:2"', "unknown device 'gpu:2'", "did you mean 'cuda:2'?"),
        ("tpu", "unknown device 'tpu'; expected 'cpu' or 'cuda'", None),
    ],
)
def test_a_bad_device_is_reported_at_its_value(written: str, message: str, hint: str | None) -> None:
    import mfdsl
    from mfdsl.core.errors import SpecError

    with pytest.raises(SpecError) as caught:
        mfdsl.parse(torch_spec(written), path="x.mf")
    text = caught.value.render()
    assert text.splitlines()[0] == f"x.mf:21:18: {message}"
    if hint is not None:
        assert hint in text


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


@pytest.mark.parametrize(("device", "ok"), [('"cuda:1"', True), ('"cuda:2"', False), ("cuda", True)])
def test_preflight_checks_that_the_gpu_exists(monkeypatch: pytest.MonkeyPatch, device: str, ok: bool) -> None:
    import mfdsl
    from mfdsl.core.errors import SpecError
    from mfdsl.language.expand import expand
    from mfdsl.plan.check import preflight

    fake_gpus(monkeypatch, 2)
    spec = mfdsl.parse(torch_spec(device), path="x.mf")
    points = list(expand(spec))
    if ok:
        assert preflight(spec, points, ["torch"]) == []
        return
    with pytest.raises(SpecError) as caught:
        preflight(spec, points, ["torch"])
    assert caught.value.render().splitlines()[0] == (
        "x.mf:21:18: device = cuda:2, but torch sees 2 GPUs (cuda:0 … cuda:1): every run would fail"
    )


def test_workers_spread_over_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from mfdsl_torch import _worker_device, assign_device

    assert [assign_device("cuda", k, 3) for k in range(7)] == [f"cuda:{k % 3}" for k in range(7)]
    assert assign_device("cuda", 5, 1) == "cuda"  # one GPU: nothing to spread
    assert assign_device("cuda", None, 4) == "cuda"  # not a worker of the local pool
    assert assign_device("cuda:1", 2, 4) == "cuda:1"  # a GPU named is that GPU
    assert assign_device("cpu", 2, 4) == "cpu"
    fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("MFDSL_WORKER_INDEX", "6")
    assert _worker_device("cuda") == "cuda:2"
    assert _worker_device("cuda:3") == "cuda:3"
    monkeypatch.delenv("MFDSL_WORKER_INDEX")
    assert _worker_device("cuda") == "cuda"


def test_an_interrupted_extend_is_finished_by_extend() -> None:
    # stopped before its store has grown, the store still holds the old sweep: the
    # command printed must grow it, and --extend also finishes a grown store's runs
    import mfdsl
    from mfdsl.cli import build_parser
    from mfdsl.execution.runner import resume_command

    args = build_parser().parse_args(["run", "spec.mf", "-o", "runs/x.zarr", "--extend"])
    spec = mfdsl.parse(SMALL.format(widths="[8]", seeds="0", lr="0.05"))
    assert resume_command(args, spec) == "mfdsl run spec.mf -o runs/x.zarr --extend"
    with pytest.raises(SystemExit):  # one of --resume, --extend, --overwrite
        build_parser().parse_args(["run", "spec.mf", "--extend", "--resume"])


def test_an_object_store_cannot_be_extended_in_place() -> None:
    from mfdsl.store.extend import refuse_url

    assert refuse_url("/data/runs/x.zarr") is None
    problem = refuse_url("s3://bucket/x.zarr")
    assert problem is not None and "an object store has no rename" in problem


def test_extending_with_the_values_reordered_lays_the_store_out_again(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, store = grown_copy(finished, tmp_path, widths="[16, 8]")
    result = run_sweep(spec, store, "--extend")
    assert result.code == 0, result.out + result.err
    assert "4 runs already finished, 0 to go" in result.out
    assert_old_cells_unchanged(finished[1], store)
    with open_store(store) as ds:
        assert ds.width.values.tolist() == [16.0, 8.0]
    assert run_cli("verify", store).code == 0
