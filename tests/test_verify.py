"""``mfdsl verify``: a store's cells against their statuses, its spec and attributes;
and stores that are not mfdsl's (or too new) refused with a message by verify, report
and plot alike."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import SweepStore, cell_files, run_cli, run_sweep

from mfdsl.store.zarr import _quiet_consolidation, write_run

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")


pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture
def copy(tiny: SweepStore, tmp_path: Path) -> Path:
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    return store


def one_line(text: str) -> str:
    return " ".join(text.split())


def problems(store: Path) -> str:
    result = run_cli("verify", store)
    assert result.code == 1, result.out + result.err
    return one_line(result.out)


def test_a_finished_store_verifies(tiny: SweepStore) -> None:
    result = run_cli("verify", tiny.store)
    assert result.code == 0, result.out + result.err
    assert one_line(result.out) == f"✓ {tiny.store}: no problems (8 done)"


def test_every_kind_of_disagreement_is_listed(copy: Path) -> None:
    group = zarr.open_group(copy, mode="r+")
    group["test_loss"][0, 0, 0, 2] = np.inf  # done, not finite
    (copy / "output" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # done, data lost
    group["train_loss"][1, 1, 1, 0] = np.nan  # one recorded value lost
    group["weight_change"][0, 1, 0, 1, 1] = 0.5  # a layer weight_change does not record
    write_run(copy, index={"width": 0, "seed": 1, "act": 1}, records={}, steps=[0], status=2)  # no message
    write_run(copy, index={"width": 1, "seed": 1, "act": 0}, records={}, steps=[0], status=0, message="x")
    text = problems(copy)
    for line in [
        "cell width=8, seed=0, act=tanh: test_loss: 1 infinite",
        "cell width=16, seed=0, act=tanh: output: 15 of 15 recorded values missing",
        "cell width=16, seed=1, act=relu: train_loss: 1 of 5 recorded values missing",
        "cell width=8, seed=1, act=tanh: weight_change: 1 value where the run records none",
        "cell width=8, seed=1, act=relu: failed without a message",
        "cell width=16, seed=1, act=tanh: pending, but has a message",
        "6 problems (6 done, 1 failed, 1 pending)",
    ]:
        assert line in text, text


def test_attributes_and_the_stored_spec(copy: Path) -> None:
    group = zarr.open_group(copy, mode="r+")
    del group.attrs["host"]
    group.attrs["spec_ir"] = "experiment: [unclosed"
    group.attrs["spec_source"] = "experiment tiny\nsweep {"
    del group["status"].attrs["flag_meanings"]
    text = problems(copy)
    assert "root attribute 'host' is missing" in text
    assert "the stored spec (spec_ir) does not parse" in text
    assert "the stored spec (spec_source) does not parse" in text
    assert "'status' lacks its flag_values/flag_meanings attributes" in text


def test_a_store_that_does_not_match_its_spec(copy: Path) -> None:
    group = zarr.open_group(copy, mode="r+")
    group.attrs["spec_ir"] = group.attrs["spec_ir"].replace("steps: 40", "steps: 50")
    assert "coordinate 'step' does not match the stored spec's record steps" in problems(copy)


def test_an_unfinished_store_is_fine_with_a_note(copy: Path) -> None:
    group = zarr.open_group(copy, mode="r+")
    del group.attrs["finalized"]
    for cell in [(0, 0, 0), (1, 1, 1)]:
        for name in cell_files(copy, cell):
            (copy / name).unlink()  # never written
    result = run_cli("verify", copy)
    assert result.code == 0, result.out
    text = one_line(result.out)
    assert "note: not finalized" in text and "no problems (6 done, 2 pending)" in text


@needs_torch
def test_diverged_runs_and_ragged_probes_verify(tmp_path: Path) -> None:
    from test_run import DIVERGING

    spec = tmp_path / "diverging.mf"
    spec.write_text(DIVERGING, encoding="utf-8")
    store = tmp_path / "diverging.zarr"
    assert run_sweep(spec, store).code == 0
    result = run_cli("verify", store)
    assert result.code == 0, result.out
    assert "(4 diverged, 4 done)" in result.out
    group = zarr.open_group(store, mode="r+")
    group["message"][0, 0, 1, 0] = ""
    assert "cell width=8, seed=0, lr=1e+06, p=2: diverged without a message" in problems(store)


def test_limit_cells_verify(tmp_path: Path) -> None:
    """A jax-only sweep fills the width = inf cells (one run, kept small); the finite
    widths, which no run of it fills, stay pending."""
    pytest.importorskip("jax")
    from conftest import tiny_spec

    text = tiny_spec("jax").replace(
        "width = [8, 16], seed = 0..1, act = [tanh, relu]", "width = [8], seed = [0], act = [tanh]"
    )
    spec = tmp_path / "limit.mf"
    spec.write_text(text + "jax { particles = 64, data_samples = 64, dtype = float64 }\n", encoding="utf-8")
    store = tmp_path / "limit.zarr"
    assert run_sweep(spec, store).code == 0
    result = run_cli("verify", store)
    assert result.code == 0, result.out + result.err
    assert "(1 done, 1 pending)" in result.out
    write_run(store, index={"width": 0, "seed": 0, "act": 0}, records={}, steps=[0], status=2, message="x")
    assert "cell width=8, seed=0, act=tanh: failed, but no run of the spec belongs to this cell" in problems(
        store
    )


# ---- padding is no loss -------------------------------------------------------------------------

#: particles samples more neurons than the narrow width has, from a layer with one input:
#: rows beyond width 4, and w_in_2 everywhere, are NaN padding (docs/language.md)
PADDED = """\
experiment padded
data isotropic_gaussian { dim = 1, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 1, activation = tanh }
train { optimizer = sgd(lr = 0.05), loss = mse, batch = 4, steps = 20 }
record every 10 { train_loss, particles(sample = 8) }
sweep { width = [4, 16] }
backends torch
"""


def chunk_mtimes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*") if "/c/" in str(p)}


@needs_torch
def test_the_padding_of_narrow_widths_is_no_loss(tmp_path: Path) -> None:
    """A width-4 run cannot give 8 particles: its last 4 rows are NaN by design, as is
    w_in_2 of a layer with one input.  ``verify`` and ``--resume`` tell that padding,
    derived from the plan, from lost values."""
    spec = tmp_path / "padded.mf"
    spec.write_text(PADDED, encoding="utf-8")
    store = tmp_path / "padded.zarr"
    assert run_sweep(spec, store).code == 0
    result = run_cli("verify", store)
    assert result.code == 0, result.out
    assert one_line(result.out) == f"✓ {store}: no problems (2 done)"
    particles = zarr.open_group(store)["particles"][...]  # (width, seed, step, particle, component)
    assert np.isnan(particles[0, 0, :, 4:]).all() and np.isnan(particles[:, :, :, :, 1]).all()
    assert np.isfinite(particles[0, 0, :, :4][..., [0, 2, 3]]).all()
    assert np.isfinite(particles[1, 0][..., [0, 2, 3]]).all()

    before = chunk_mtimes(store)
    resumed = run_sweep(spec, store, "--resume")
    assert resumed.code == 0, resumed.out + resumed.err
    assert "2 runs already finished, 0 to go" in one_line(resumed.out)
    assert "read back" not in resumed.err
    assert chunk_mtimes(store) == before  # no finished run was written again

    group = zarr.open_group(store, mode="r+")
    group["particles"][0, 0, 1, 2, 0] = np.nan  # a neuron the width-4 run has: lost
    group["particles"][0, 0, 2, 6, 3] = 0.5  # a row beyond width 4: not the run's
    group["particles"][1, 0, 0, 0, 1] = 0.5  # w_in_2 of a one-input layer: not the run's
    text = problems(store)
    assert "cell width=4, seed=0: particles: 1 value where the run records none" in text
    assert "cell width=4, seed=0: particles: 1 of 36 recorded values missing" in text  # 3 steps × 4 × 3
    assert "cell width=16, seed=0: particles: 1 value where the run records none" in text
    assert "3 problems (2 done)" in text


def test_padding_is_derived_from_the_plan() -> None:
    """Rows beyond a finite layer's width are padding; the limit's layer is infinitely
    wide, but a limit backend holding fewer particles than ``sample`` may pad (unless
    the layer collapses onto one particle, which fills every row); w_in_2 is padding
    where the layer has one input (the limit's deeper layers have infinitely many)."""
    import mfdsl
    from mfdsl.plan.layout import plan_tasks
    from mfdsl.store.verify import expected, particle_extent

    deep = (
        PADDED.replace("hidden = 1", "hidden = 2")
        .replace("particles(sample = 8)", "particles(layer = 2, sample = 8)")
        .replace("backends torch", "backends torch, jax\njax { particles = 6 }")
    )
    spec = mfdsl.parse(deep)
    backends = [mfdsl.get_backend(n) for n in ("torch", "jax")]
    layout, tasks = plan_tasks(spec, mfdsl.check_all(spec), backends)
    by_width = {t.plan.width: t.plan for t in tasks}
    (obs,) = [o for o in by_width[4.0].observables if o.name == "particles"]
    assert particle_extent(by_width[4.0], obs) == (4, 4, True)  # layer 2 has 4 inputs
    assert particle_extent(by_width[16.0], obs) == (8, 8, True)
    assert particle_extent(by_width[np.inf], obs) == (6, 8, True)

    shallow = mfdsl.parse(PADDED.replace("backends torch", "backends torch, jax"))
    _, shallow_tasks = plan_tasks(shallow, mfdsl.check_all(shallow), backends)
    limit = next(t.plan for t in shallow_tasks if np.isinf(t.plan.width))
    (obs,) = [o for o in limit.observables if o.name == "particles"]
    assert particle_extent(limit, obs) == (8, 8, False)  # the limit's layer 1: the data's one input

    steps = layout.steps
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    where = expected(by_width[np.inf], steps, [], shapes)
    assert where is not None
    required, allowed = where.required["particles"], where.allowed["particles"]
    assert required.shape == allowed.shape == (len(steps), 8, 4)
    assert required[:, :6].all() and not required[:, 6:].any() and allowed.all()
    narrow = expected(by_width[4.0], steps, [], shapes)
    assert narrow is not None
    assert (narrow.required["particles"] == narrow.allowed["particles"]).all()
    assert narrow.required["particles"][:, :4].all() and not narrow.allowed["particles"][:, 4:].any()


# ---- the random-stream layout ---------------------------------------------------------------


def set_root_attr(store: Path, name: str, value: object) -> None:
    group = zarr.open_group(store, mode="r+")
    if value is None:
        del group.attrs[name]
    else:
        group.attrs[name] = value
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(store))


def test_verify_reports_the_stream_layout(copy: Path) -> None:
    from mfdsl.core.streams import STREAM_LAYOUT

    assert zarr.open_group(copy).attrs["stream_layout"] == STREAM_LAYOUT
    for value, words in [
        (None, "written by an older mfdsl, whose random streams differ (it records no 'stream_layout'"),
        (1, "written by an older mfdsl, whose random streams differ (random-stream layout 1;"),
        (
            STREAM_LAYOUT + 1,
            f"written by a newer mfdsl, whose random streams differ (random-stream layout {STREAM_LAYOUT + 1};",
        ),
    ]:
        set_root_attr(copy, "stream_layout", value)
        result = run_cli("verify", copy)
        assert result.code == 0, result.out  # the data are intact: a note, not a problem
        text = one_line(result.out)
        assert f"note: the store was {words}" in text, text
        assert "mfdsl run --resume cannot add runs to it" in text
    set_root_attr(copy, "stream_layout", "two")
    assert "root attribute 'stream_layout' is a str" in problems(copy)


# ---- a store several mfdsl run calls filled, one backend each -------------------------------


def both_backends_spec(folder: Path) -> Path:
    from conftest import tiny_spec

    text = tiny_spec("torch, jax").replace(
        "width = [8, 16], seed = 0..1, act = [tanh, relu]", "width = [8], seed = [0], act = [tanh]"
    )
    spec = folder / "both.mf"
    spec.write_text(text + "jax { particles = 64, data_samples = 64, dtype = float64 }\n", encoding="utf-8")
    return spec


@needs_torch
@pytest.mark.parametrize("order", [("jax", "torch"), ("torch", "jax")])
def test_a_store_filled_backend_by_backend_verifies(tmp_path: Path, order: tuple[str, str]) -> None:
    pytest.importorskip("jax")
    spec = both_backends_spec(tmp_path)
    store = tmp_path / "both.zarr"
    first = run_sweep(spec, store, "--backend", order[0])
    assert first.code == 0, first.out + first.err
    result = run_cli("verify", store)
    assert result.code == 0, result.out
    assert "(1 done, 1 pending)" in result.out  # the other backend's cell waits for it
    assert zarr.open_group(store).attrs["backends"] == [order[0]]

    second = run_sweep(spec, store, "--backend", order[1], "--resume")
    assert second.code == 0, second.out + second.err
    assert "resuming" not in second.out  # none of the second backend's runs had finished
    result = run_cli("verify", store)
    assert result.code == 0, result.out
    assert one_line(result.out) == f"✓ {store}: no problems (2 done)"
    assert zarr.open_group(store).attrs["backends"] == list(order)  # in the order of first write
    with xr.open_zarr(store) as ds:
        assert ds["width"].values.tolist() == [8.0, np.inf]
        assert (ds["status"] == 1).all()
        assert "jax:width=inf,seed=0,act=tanh" in ds.attrs["limit_reductions"]

    # a run of the first backend damaged: --resume with the second sets it pending, says
    # which backend runs it, and does not run it itself
    cell = (0, 0, 0) if order[0] == "torch" else (1, 0, 0)  # width 8 is torch's, inf jax's
    zarr.open_group(store, mode="r+")["train_loss"][(*cell, 1)] = np.nan
    again = run_sweep(spec, store, "--backend", order[1], "--resume")
    assert again.code == 0, again.out + again.err
    assert (
        f"1 finished run of backend '{order[0]}' does not read back intact and is pending again; "
        f"--resume with --backend {order[0]} runs it:" in one_line(again.err)
    )
    result = run_cli("verify", store)
    assert result.code == 0 and "(1 done, 1 pending)" in result.out, result.out
    assert zarr.open_group(store).attrs["backends"] == list(order)


def test_a_store_without_room_for_the_other_backends_still_verifies(copy: Path) -> None:
    """An older mfdsl gave a store cells for the backends that wrote it alone: one made
    with --backend torch of a spec naming torch and jax has no width = inf.  It is
    what that mfdsl wrote, not damage."""
    group = zarr.open_group(copy, mode="r+")
    assert "backends: [torch]\n" in group.attrs["spec_ir"]
    group.attrs["spec_ir"] = group.attrs["spec_ir"].replace("backends: [torch]\n", "backends: [torch, jax]\n")
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(copy))
    result = run_cli("verify", copy)
    assert result.code == 0, result.out
    assert "no problems (8 done)" in one_line(result.out)


# ---- stores that are not mfdsl's ------------------------------------------------------------


@pytest.fixture
def foreign_and_future(tmp_path: Path, copy: Path) -> dict[str, tuple[Path, str]]:
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("step", np.arange(3.0))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    zarr.open_group(copy, mode="r+").attrs["mfdsl_store_format"] = 99
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(copy))
    (tmp_path / "plain").mkdir()
    return {
        "foreign": (foreign, "was not written by mfdsl (it has no 'mfdsl_store_format' attribute)"),
        "future": (copy, "has store format 99, newer than this mfdsl reads (1)"),
        "missing": (tmp_path / "missing.zarr", "no such store"),
        "plain": (tmp_path / "plain", "is not a zarr store"),
    }


@pytest.mark.parametrize("command", [["verify"], ["report"], ["report", "--json"], ["plot"]])
def test_foreign_future_and_missing_stores_exit_2(
    command: list[str], foreign_and_future: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    for store, message in foreign_and_future.values():
        extra = ["-o", str(tmp_path / "figure.png")] if command == ["plot"] else []
        result = run_cli(command[0], store, *command[1:], *extra)
        assert result.code == 2, (store, result.out, result.err)
        assert message in one_line(result.err), result.err
        assert "Traceback" not in result.err and result.out == ""


def test_a_stored_spec_too_large_to_plan_again_is_a_problem_not_an_allocation(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile stored spec (2·10⁹ steps, recorded at every one) would make planning it
    again allocate tens of GB of record steps: verify reports it from the estimate."""
    monkeypatch.setenv("MFDSL_MEMORY", "4GiB")
    group = zarr.open_group(copy, mode="r+")
    ir_text = group.attrs["spec_ir"]
    assert "steps: 40" in ir_text
    group.attrs["spec_ir"] = ir_text.replace("steps: 40", "steps: 2000000000").replace(
        "count: 10", "count: 1"
    )
    text = problems(copy)
    assert "the stored spec is too large to plan again" in text, text
