"""The zarr results store: skeleton, per-run writes, concurrency and xarray reads."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from mfdsl.plan.layout import VariableSpec
from mfdsl.store import zarr as _store
from mfdsl.store.status import Status
from mfdsl.store.zarr import STORE_FORMAT, create_store, finalize, open_store, read_status, write_run

pytestmark = pytest.mark.filterwarnings("error")

WIDTHS = np.array([64.0, 256.0, np.inf])
SEEDS = np.array([0, 1])
SCALES = np.array(["mean_field", "ntk"])
LRS = np.array([0.05, 0.1])
STEPS = np.arange(0, 101, 10)
LAYERS = np.array([1, 2, 3])
PROBES = 4
PARTICLES = 5
COMPONENTS = ["w_in_1", "w_in_2", "w_in_norm", "w_out"]
SWEEP_SHAPE = (len(WIDTHS), len(SEEDS), len(SCALES), len(LRS))

VARIABLES = [
    VariableSpec(name="train_loss", long_name="training loss"),
    VariableSpec(name="test_accuracy", long_name="test accuracy"),
    VariableSpec(name="output", dims=("probe",), long_name="network output on the probes"),
    VariableSpec(name="neuron_spread", dims=("layer", "probe"), long_name="std across neurons of H"),
    VariableSpec(name="particles", dims=("particle", "component"), long_name="sampled neurons"),
]
EXTRA_SHAPES = {
    "train_loss": (),
    "test_accuracy": (),
    "output": (PROBES,),
    "neuron_spread": (len(LAYERS), PROBES),
    "particles": (PARTICLES, len(COMPONENTS)),
}


def make_store(path: Path) -> Path:
    create_store(
        path,
        sweep={"width": WIDTHS, "seed": SEEDS, "scale": SCALES, "lr": LRS},
        steps=STEPS,
        time=(("lr", "step"), np.outer(LRS, STEPS)),
        extra_coords={
            "probe": np.arange(PROBES),
            "layer": LAYERS,
            "particle": np.arange(PARTICLES),
            "component": COMPONENTS,
        },
        variables=VARIABLES,
        attrs={
            "spec_source": "experiment demo\n",
            "ir": "experiment: demo\n",
            "versions": {"mfdsl": "0.0.1"},
        },
    )
    return path


def records_for(cell: tuple[int, ...], n_steps: int = len(STEPS)) -> dict[str, np.ndarray]:
    """Records whose values encode the cell and position, so a misplaced write shows."""
    base = 1000.0 * np.ravel_multi_index(cell, SWEEP_SHAPE)
    out = {}
    for name, extra in EXTRA_SHAPES.items():
        size = n_steps * int(np.prod(extra))
        out[name] = (base + np.arange(size, dtype=np.float64)).reshape(n_steps, *extra)
    return out


def index_of(cell: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(["width", "seed", "scale", "lr"], cell, strict=True))


def metadata_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("zarr.json")}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "run.zarr")


def test_skeleton_opens_without_warnings(store: Path) -> None:
    ds = xr.open_zarr(store)
    assert dict(ds.sizes) == {
        "width": 3,
        "seed": 2,
        "scale": 2,
        "lr": 2,
        "step": len(STEPS),
        "probe": PROBES,
        "layer": 3,
        "particle": PARTICLES,
        "component": 4,
    }
    assert ds["width"].dtype == np.float64 and np.isinf(ds["width"].values[-1])
    assert ds["seed"].dtype == np.int64 and ds["step"].dtype == np.int64
    assert ds["lr"].dtype == np.float64 and ds["layer"].dtype == np.int64
    assert list(ds["scale"].values) == list(SCALES) and list(ds["component"].values) == COMPONENTS
    assert ds["time"].dims == ("lr", "step") and "time" in ds.coords
    np.testing.assert_allclose(ds["time"].values, np.outer(LRS, STEPS))

    for var in VARIABLES:
        da = ds[var.name]
        assert da.dims == ("width", "seed", "scale", "lr", "step", *var.dims)
        assert da.dtype == np.float64
        assert da.attrs == {"long_name": var.long_name, "units": var.units}
        assert np.isnan(da.values).all()
        assert da.encoding["chunks"][:4] == (1, 1, 1, 1)

    status = ds["status"]
    assert status.dims == ("width", "seed", "scale", "lr") and status.dtype == np.int8
    assert (status.values == Status.PENDING).all()
    assert list(status.attrs["flag_values"]) == [0, 1, 2, 3]
    assert status.attrs["flag_meanings"] == "pending done failed diverged"
    assert (ds["message"].values == "").all()

    attrs = ds.attrs
    assert attrs["mfdsl_store_format"] == STORE_FORMAT == 1
    assert attrs["spec_source"] == "experiment demo\n" and attrs["ir"] == "experiment: demo\n"
    assert set(attrs["versions"]) >= {"mfdsl", "numpy", "xarray", "zarr", "python"}
    assert attrs["versions"]["xarray"] == xr.__version__
    assert attrs["created"].endswith("+00:00") and attrs["host"]
    assert "finalized" not in attrs
    # No data chunks yet: the skeleton is metadata and coordinates only.
    for name in [*EXTRA_SHAPES, "status", "message"]:
        assert not (store / name / "c").exists()


def test_runs_land_in_their_cells(store: Path) -> None:
    cells = [(2, 1, 0, 1), (0, 0, 1, 0), (1, 1, 1, 1)]
    ctx = multiprocessing.get_context("spawn")  # zarr runs an event-loop thread: no fork
    children = [
        ctx.Process(
            target=write_run,
            args=(store,),
            kwargs={"index": index_of(c), "records": records_for(c), "steps": STEPS, "status": Status.DONE},
        )
        for c in cells[1:]
    ]
    for child in children:
        child.start()
    write_run(store, index=index_of(cells[0]), records=records_for(cells[0]), steps=STEPS, status=Status.DONE)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0

    ds = open_store(store)
    status = ds["status"].values
    for cell in cells:
        assert status[cell] == Status.DONE
        for name, values in records_for(cell).items():
            np.testing.assert_array_equal(ds[name].values[cell], values)
    written = np.zeros(SWEEP_SHAPE, dtype=bool)
    written[tuple(np.array(cells).T)] = True
    assert (status[~written] == Status.PENDING).all()
    for name in EXTRA_SHAPES:
        assert np.isnan(ds[name].values[~written]).all()

    limit = ds.sel(width=np.inf, seed=1, scale="mean_field", lr=0.1)
    np.testing.assert_array_equal(limit["train_loss"].values, records_for(cells[0])["train_loss"])
    assert int(limit["status"]) == Status.DONE
    np.testing.assert_array_equal(read_status(store), status)


def test_a_run_touches_only_its_own_chunks(store: Path) -> None:
    before_meta = metadata_files(store)
    before = {p for p in store.rglob("*") if p.is_file()}
    cell = (1, 0, 1, 1)
    write_run(store, index=index_of(cell), records=records_for(cell), steps=STEPS, status=Status.DONE)
    new = {p.relative_to(store) for p in store.rglob("*") if p.is_file()} - {
        p.relative_to(store) for p in before
    }
    assert metadata_files(store) == before_meta
    assert {p.parts[0] for p in new} == {*EXTRA_SHAPES, "status"}  # message '' writes nothing
    for p in new:
        assert p.parts[1] == "c" and tuple(int(i) for i in p.parts[2:6]) == cell


def test_partial_steps_failure_and_rewrite(store: Path) -> None:
    cell = (0, 1, 0, 0)
    run_steps = STEPS[2:5]
    records = records_for(cell, n_steps=len(run_steps))
    del records["particles"]
    write_run(
        store,
        index=index_of(cell),
        records=records,
        steps=run_steps,
        status=Status.DIVERGED,
        message="loss became nan at step 47",
    )
    ds = open_store(store)
    loss = ds["train_loss"].values[cell]
    np.testing.assert_array_equal(loss[2:5], records["train_loss"])
    assert np.isnan(loss[:2]).all() and np.isnan(loss[5:]).all()
    assert np.isnan(ds["particles"].values[cell]).all()
    assert ds["status"].values[cell] == Status.DIVERGED
    assert ds["message"].values[cell] == "loss became nan at step 47"

    # A rerun replaces the whole cell, message included.
    write_run(store, index=index_of(cell), records=records_for(cell), steps=STEPS, status=Status.DONE)
    ds = open_store(store)
    np.testing.assert_array_equal(ds["train_loss"].values[cell], records_for(cell)["train_loss"])
    assert ds["status"].values[cell] == Status.DONE and ds["message"].values[cell] == ""

    write_run(store, index=index_of(cell), records={}, steps=[], status=Status.FAILED, message="Traceback: ü")
    ds = open_store(store)
    assert np.isnan(ds["train_loss"].values[cell]).all()
    assert ds["status"].values[cell] == Status.FAILED and ds["message"].values[cell] == "Traceback: ü"


def test_status_is_written_last(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _store._write_region
    calls: list[list[str]] = []

    def dies_before_status(path: Any, ds: xr.Dataset, region: dict[str, slice]) -> None:
        calls.append([str(n) for n in ds.data_vars])
        if "status" in ds:
            raise KeyboardInterrupt
        real(path, ds, region)

    monkeypatch.setattr(_store, "_write_region", dies_before_status)
    cell = (0, 0, 0, 0)
    with pytest.raises(KeyboardInterrupt):
        write_run(store, index=index_of(cell), records=records_for(cell), steps=STEPS, status=Status.DONE)
    assert calls[-1] == ["status"] and "status" not in calls[0]
    ds = open_store(store)
    assert ds["status"].values[cell] == Status.PENDING
    assert not np.isnan(ds["train_loss"].values[cell]).any()


def test_finalize_consolidates(store: Path) -> None:
    cell = (2, 0, 0, 0)
    write_run(store, index=index_of(cell), records=records_for(cell), steps=STEPS, status=Status.DONE)
    finalize(store)
    ds = xr.open_zarr(store, consolidated=True)
    assert ds.attrs["finalized"] >= ds.attrs["created"]
    assert set(ds.data_vars) == {*EXTRA_SHAPES, "status"}
    assert "message" in ds.coords and ds["message"].dims == ds["status"].dims
    assert ds["status"].values[cell] == Status.DONE
    np.testing.assert_array_equal(ds["output"].values[cell], records_for(cell)["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(store).attrs["mfdsl_store_format"] == 1


def test_where_status_on_the_whole_dataset(store: Path) -> None:
    """``ds.where(ds.status == 1)`` masks every number of the runs not done and keeps
    the messages, which say why (a string variable would refuse the NaN fill)."""
    done, diverged, failed = (0, 1, 0, 1), (1, 0, 1, 0), (2, 1, 1, 1)
    write_run(store, index=index_of(done), records=records_for(done), steps=STEPS, status=Status.DONE)
    write_run(
        store,
        index=index_of(diverged),
        records=records_for(diverged),
        steps=STEPS,
        status=Status.DIVERGED,
        message="loss became inf at step 30",
    )
    write_run(store, index=index_of(failed), records={}, steps=STEPS, status=Status.FAILED, message="boom ü")
    ds = xr.open_zarr(store)
    kept = ds.where(ds.status == 1)  # lazily, as users write it
    loaded = kept.load()
    for name, extra in EXTRA_SHAPES.items():
        values = loaded[name].values
        np.testing.assert_array_equal(values[done], records_for(done)[name])
        others = np.ones(SWEEP_SHAPE, dtype=bool)
        others[done] = False
        assert np.isnan(values[others]).all(), name
        assert values.shape == (*SWEEP_SHAPE, len(STEPS), *extra)
    assert loaded["message"].values[diverged] == "loss became inf at step 30"
    assert loaded["message"].values[failed] == "boom ü"
    assert loaded["message"].values[done] == ""
    # and on data loaded first, and with drop=True
    assert ds.load().where(ds.status == 1)["train_loss"].notnull().sum() == len(STEPS)
    dropped = ds.where(ds.status == 1, drop=True)
    assert dict(dropped.sizes)["width"] == 1 and dropped["width"].values.tolist() == [WIDTHS[0]]


def test_the_store_records_its_stream_layout(store: Path) -> None:
    from mfdsl.core.streams import STREAM_LAYOUT

    assert xr.open_zarr(store).attrs["stream_layout"] == STREAM_LAYOUT
    with pytest.raises(ValueError, match="stream_layout"):
        create_store(
            store.parent / "other.zarr",
            sweep={"width": [8.0], "seed": [0]},
            steps=[0],
            time=(("step",), np.zeros(1)),
            variables=[],
            attrs={"stream_layout": 1},
        )


def test_update_attrs_keeps_the_consolidated_metadata_true(store: Path) -> None:
    _store.update_attrs(store, {"backends": ["jax", "torch"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(store, consolidated=True).attrs["backends"] == ["jax", "torch"]


def test_limit_only_sweep_and_scalar_time(tmp_path: Path) -> None:
    path = tmp_path / "limit.zarr"
    create_store(
        path,
        sweep={"width": [np.inf], "seed": [3]},
        steps=[0, 5],
        time=(("step",), np.array([0.0, 0.5])),
        variables=[VariableSpec(name="test_loss", long_name="test loss")],
    )
    write_run(
        path,
        index={"width": 0, "seed": 0},
        records={"test_loss": np.array([1.0, 0.5])},
        steps=[0, 5],
        status=Status.DONE,
    )
    ds = open_store(path)
    assert ds["time"].dims == ("step",)
    np.testing.assert_array_equal(ds.sel(width=np.inf, seed=3)["test_loss"].values, [1.0, 0.5])
    assert ds.attrs["versions"]["zarr"]


def test_existing_store_is_not_clobbered(store: Path) -> None:
    with pytest.raises(FileExistsError):
        make_store(store)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"index": {"width": 0, "seed": 0}}, ValueError, "sweep dims"),
        ({"index": {"width": 3, "seed": 0, "scale": 0, "lr": 0}}, IndexError, "width=3"),
        ({"records": {"nope": np.zeros(len(STEPS))}}, ValueError, "nope"),
        ({"records": {"output": np.zeros(len(STEPS))}}, ValueError, "shape"),
        ({"steps": STEPS + 1}, ValueError, "steps"),
        ({"status": 7}, ValueError, "status"),
    ],
)
def test_bad_writes_are_refused(
    store: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {
        "index": index_of((0, 0, 0, 0)),
        "records": {},
        "steps": STEPS,
        "status": Status.DONE,
    }
    with pytest.raises(error, match=match):
        write_run(store, **{**args, **kwargs})
    assert (read_status(store) == Status.PENDING).all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sweep": {"seed": [0], "width": [1.0]}}, "start with width, seed"),
        ({"sweep": {"width": [1.0, 1.0], "seed": [0]}}, "repeats"),
        ({"steps": [0, 10, 10]}, "increasing"),
        ({"time": (("seed", "step"), np.zeros((2, 2)))}, "shape"),
        ({"time": (("step", "seed"), np.zeros((2, 1)))}, "time dims"),
        ({"variables": [VariableSpec(name="seed", long_name="x")]}, "used twice"),
        ({"variables": [VariableSpec(name="output", dims=("probe",), long_name="x")]}, "without coordinates"),
        ({"attrs": {"host": "elsewhere"}}, "own keys"),
    ],
)
def test_bad_skeletons_are_refused(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "sweep": {"width": [1.0], "seed": [0]},
        "steps": [0, 10],
        "time": (("step",), np.zeros(2)),
        "variables": [],
    }
    with pytest.raises(ValueError, match=match):
        create_store(tmp_path / "bad.zarr", **{**args, **change})


# ---- where a store lives ---------------------------------------------------------------------


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    from mfdsl.core.location import normalize

    assert normalize(f"file://{tmp_path}/x.zarr") == f"{tmp_path}/x.zarr"
    assert normalize("file://localhost/a%20b.zarr") == "/a b.zarr"
    assert normalize("runs/x.zarr") == "runs/x.zarr"
    with pytest.raises(ValueError, match="a path on this machine"):
        normalize("file://otherhost/x.zarr")
    url = f"file://{tmp_path}/url.zarr"
    create_store(
        url, sweep={"width": [8.0], "seed": [0]}, steps=[0], time=(("step",), np.zeros(1)), variables=[]
    )
    assert (tmp_path / "url.zarr" / "zarr.json").is_file()  # zarr's local store, not fsspec's
    write_run(url, index={"width": 0, "seed": 0}, records={}, steps=[0], status=2, message="x")
    assert read_status(url).tolist() == [[2]]


def test_a_store_at_an_fsspec_url() -> None:
    """Any fsspec URL works end to end (memory:// here; s3:// and the like alike), and
    so do the runner's files beside the store."""
    pytest.importorskip("fsspec")
    from mfdsl.core import location as loc

    url = "memory://mfdsl-test/runs/a.zarr"
    create_store(
        url,
        sweep={"width": [8.0], "seed": [0, 1]},
        steps=[0, 1],
        time=(("step",), np.array([0.0, 0.1])),
        variables=[VariableSpec(name="train_loss", long_name="training loss")],
    )
    try:
        write_run(
            url,
            index={"width": 0, "seed": 1},
            records={"train_loss": np.array([1.0, 2.0])},
            steps=[0, 1],
            status=1,
        )
        finalize(url)
        assert read_status(url).tolist() == [[0, 1]]
        with open_store(url) as ds:
            assert ds["train_loss"].values[0, 1].tolist() == [1.0, 2.0]
            assert "finalized" in ds.attrs
        assert loc.exists(url) and loc.list_names("memory://mfdsl-test/runs") == ["a.zarr"]
        loc.append_text(f"{url}.log", "a\n")
        loc.append_text(f"{url}.log", "b\n")
        assert loc.read_text(f"{url}.log") == "a\nb\n"
        assert loc.create_text(f"{url}.lock", "me") and not loc.create_text(f"{url}.lock", "you")
        assert loc.read_text(f"{url}.lock") == "me"
    finally:
        loc.remove("memory://mfdsl-test")
    assert not loc.exists(url)
