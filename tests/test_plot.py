"""``mfdsl plot``: every kind draws a figure from a synthetic store (no training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from test_report import make_store  # tests/ is on sys.path under pytest

from mfdsl.analysis.plot import default_output, make_figure, plot_store
from mfdsl.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plot") / "synthetic.zarr"
    make_store(path)  # widths 16 … 1024 and the limit, 3 seeds, lr = 0.1, 0.2
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fewer panels for the tests that draw: drawing is what makes them slow."""
    path = tmp_path_factory.mktemp("plot") / "small.zarr"
    make_store(path, lrs=[0.1], widths=[16.0, 64.0, 256.0])
    return path


@pytest.fixture(scope="module")
def store_without_limit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plot") / "nolimit.zarr"
    make_store(path, limit=False, lrs=[0.1], failed=None)
    return path


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("kind", ["curves", "convergence", "particles"])
def test_each_kind_writes_a_png(
    small: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(small), "--kind", kind, "-o", str(out)]) == 0
    assert _is_png(out)
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["curves", "convergence"])
def test_without_a_limit(store_without_limit: Path, tmp_path: Path, kind: str) -> None:
    out = plot_store(store_without_limit, kind=kind, variables=["test_accuracy"], output=tmp_path / "f.png")
    assert _is_png(Path(out))


def test_convergence_without_a_limit_fits_no_slope(store_without_limit: Path) -> None:
    """The distances to the widest run are drawn, but not fitted (as in mfdsl report)."""
    fig = make_figure(store_without_limit, kind="convergence", variables=["train_loss"])
    (ax,) = fig.get_axes()
    assert ax.get_title() == "train_loss: sup_t |mean − width 1024|"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any(text.startswith("slope") for text in legend)
    assert " ".join(legend[1].split()) == "no rate: no limit (width ∞) in the store, so no rate to it"
    assert len(ax.get_lines()[0].get_xdata()) == 3  # widths 16, 64, 256 against 1024


def test_default_output_is_the_store_name_here(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(small) + "/", "--var", "train_loss"]) == 0
    assert _is_png(tmp_path / "small.png")
    assert "small.png" in capsys.readouterr().out
    assert default_output("runs/x.zarr", "convergence") == "x-convergence.png"


def test_svg_and_pdf(small: Path, tmp_path: Path) -> None:
    svg = Path(plot_store(small, variables=["train_loss"], output=tmp_path / "f.svg"))
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")
    pdf = Path(plot_store(small, kind="convergence", variables=["test_accuracy"], output=tmp_path / "f.pdf"))
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_curves_layout(store: Path) -> None:
    fig = make_figure(store, variables=["train_loss", "weight_change[layer=2]"])
    axes = fig.get_axes()
    assert len(axes) == 4  # 2 slices (lr) × 2 panels
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "train_loss\nlr = 0.1" and titles[3] == "weight_change[layer=2]\nlr = 0.2"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:5] == ["width 16", "width 64", "width 256", "width 1024", "limit (width ∞)"]
    assert "mean over the done seeds ± 1 sample std (up to 3 seeds)" in legend[-1]
    # the limit is drawn in black, last
    lines = axes[0].get_lines()
    assert len(lines) == 5 and lines[-1].get_color() == "black"
    np.testing.assert_allclose(lines[-1].get_xdata(), 0.1 * np.arange(0, 101, 10))


def test_convergence_fit_recovers_the_slope(store: Path) -> None:
    fig = make_figure(store, kind="convergence", variables=["train_loss"])
    for ax in fig.get_axes():
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        (label,) = [t.get_text() for t in ax.get_legend().get_texts() if t.get_text().startswith("slope")]
        slope = float(label.split()[1])
        assert slope == pytest.approx(-0.5, abs=0.02)
        assert "95% CI" in label


def test_particles_layout(store: Path) -> None:
    fig = make_figure(store, kind="particles")
    scatters = [ax for ax in fig.get_axes() if ax.get_title()]  # not the colour bar
    assert len(scatters) == 15  # 5 widths × first, middle, last record
    assert scatters[0].get_title() == "width 16, seed 0\nt = 0 (step 0)"
    assert scatters[2].get_title() == "width 16, seed 0\nt = 10 (step 100)"
    assert scatters[-1].get_title().startswith("limit (width ∞), seed 0")
    assert len(scatters[0].collections[0].get_offsets()) == 6
    assert fig._suptitle.get_text() == "lr = 0.1"


def test_errors_exit_2(
    store: Path,
    store_without_limit: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases: list[tuple[list[str], str]] = [
        (
            ["--var", "nonsense"],
            "no scalar variable 'nonsense' in the store (it has: train_loss, test_accuracy, weight_change)",
        ),
        (["-o", str(tmp_path / "f.jpeg")], "give a file ending in .png, .svg, .pdf"),
    ]
    for extra, message in cases:
        assert main(["plot", str(store), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err
    # matplotlib missing: the install hint
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", str(store), "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install 'mfdsl[plot]'" in capsys.readouterr().err


def test_particles_need_a_particles_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdsl.plan.layout import VariableSpec
    from mfdsl.store.zarr import create_store, write_run

    path = tmp_path / "s.zarr"
    create_store(
        path,
        sweep={"width": [8.0, math.inf], "seed": [0]},
        steps=[0, 1],
        time=(("step",), np.array([0.0, 0.1])),
        variables=[VariableSpec(name="train_loss", long_name="training loss")],
    )
    assert main(["plot", str(path), "-o", str(tmp_path / "a.png")]) == 2
    assert "no finished run to plot" in capsys.readouterr().err
    write_run(
        path,
        index={"width": 1, "seed": 0},
        records={"train_loss": np.array([1.0, 0.5])},
        steps=[0, 1],
        status=1,
    )
    assert main(["plot", str(path), "-o", str(tmp_path / "a.png")]) == 0
    assert main(["plot", str(path), "--kind", "particles", "-o", str(tmp_path / "b.png")]) == 2
    assert "no 'particles' record" in capsys.readouterr().err
