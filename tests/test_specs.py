"""The spec library (``specs/``): every spec checks, is formatted, and says what it is
for; the shared examples are all there; the MNIST spec runs (shrunk) on fake files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli

SPECS = sorted((ROOT / "specs").glob("*.mf"))
SHARED = ROOT.parent / "shared" / "examples"


def test_the_library_is_there() -> None:
    names = {p.stem for p in SPECS}
    assert {
        "quickstart",
        "nguyen2019_fig1",
        "nguyen2019_fig5",
        "mmn2018_isotropic",
        "pham_nguyen2020_degeneracy",
        "frozen_ends",
        "frozen_ends_saddle",
        "regimes",
        "width_convergence",
    } <= names
    if SHARED.is_dir():  # the project's shared examples all have a copy here
        assert {p.stem for p in SHARED.glob("*.mf")} <= names


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_spec_checks(spec: Path) -> None:
    # a warning (data files not on this machine) is fine; an error is not
    result = run_cli("check", spec)
    assert result.code == 0, result.out + result.err
    assert "is valid" in result.out


SHARED_SPECS = sorted(SHARED.glob("*.mf")) if SHARED.is_dir() else []


@pytest.mark.parametrize("spec", SHARED_SPECS, ids=[p.name for p in SHARED_SPECS])
def test_shared_example_checks(spec: Path) -> None:
    """The project's shared examples (read-only copies kept elsewhere) stay valid specs."""
    result = run_cli("check", spec)
    assert result.code == 0, result.out + result.err
    assert "is valid" in result.out


def _classifying() -> list[Path]:
    import mfdsl

    return [p for p in SPECS if mfdsl.load(p).data.kind != "teacher"]


CLASSIFYING = _classifying()


def test_most_specs_classify() -> None:
    # the parametrised test below covers every spec whose data has classes
    assert {p.stem for p in CLASSIFYING} >= {"quickstart", "nguyen2019_fig5", "regimes"}


@pytest.mark.parametrize("spec", CLASSIFYING, ids=[p.name for p in CLASSIFYING])
def test_classifying_spec_records_accuracy(spec: Path) -> None:
    """A spec on classification data records test_accuracy (or omits ``record``, whose
    default has it): whether a network classifies is the first thing a reader must be
    able to judge — a bias-free ReLU network on isotropic Gaussians, for one, cannot."""
    import mfdsl

    record = mfdsl.load(spec).record
    names = {"test_accuracy"} if record is None else {o.name for o in record.observables}
    assert "test_accuracy" in names, f"{spec.name} classifies but does not record test_accuracy"


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_spec_is_formatted(spec: Path) -> None:
    result = run_cli("fmt", "--check", spec)
    assert result.code == 0, f"{spec.name} is not formatted: run 'mfdsl fmt --write {spec}'"


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_spec_header_says_what_and_how_long(spec: Path) -> None:
    """Each spec opens with a comment: what it reproduces, and its run time on a 2-core
    CPU (the brief of the library)."""
    text = spec.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{spec.name} has no header comment"
    assert "2-core CPU" in "\n".join(header), f"{spec.name}'s header does not give its run time"


def test_mnist_figure_one_runs_on_fake_files(tmp_path: Path) -> None:
    """specs/nguyen2019_fig1.mf as shipped, shrunk by overrides, on tiny fake IDX files
    (the real ones are not on CI): the data root is the only thing to give."""
    pytest.importorskip("torch")
    import numpy as np
    import xarray as xr
    from test_datasets import write_mnist

    write_mnist(tmp_path / "mnist")
    store = tmp_path / "fig1.zarr"
    overrides = [
        f'data.root="{tmp_path / "mnist"}"',
        "data.train=20",
        "data.test=10",
        "train.steps=4",
        "train.batch=5",
        "sweep.width=[4, 8]",
        "sweep.seed=0",
    ]
    args: list[str | Path] = ["run", ROOT / "specs" / "nguyen2019_fig1.mf", "-o", store, "--workers", "1"]
    result = run_cli(*args, *[a for o in overrides for a in ("--set", o)])
    assert result.code == 0, result.out + result.err
    with xr.open_zarr(store) as ds:
        assert (ds.status.values == 1).all()
        assert np.isfinite(ds.test_accuracy.values).all()
