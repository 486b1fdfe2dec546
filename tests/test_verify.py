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

from mfdsl._store import _quiet_consolidation, write_run

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
