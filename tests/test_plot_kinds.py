"""``mfdsl plot``: the wrapped grid, facets, the transfer plot and the coordinate check,
each read back from the figure and from the image written (synthetic stores, no
training)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import zarr
from matplotlib.image import imread
from test_report import make_store  # tests/ is on sys.path under pytest

from mfdsl.analysis.plot import (
    PlotError,
    coord_steps,
    learning_rate_variable,
    make_figure,
    plot_store,
    transfer_data,
    wrap_shape,
)
from mfdsl.analysis.report import open_results
from mfdsl.cli import main
from mfdsl.plan.layout import VariableSpec
from mfdsl.store.status import Status
from mfdsl.store.zarr import create_store

DPI = 120  # plot_store's
LRS = [0.01, 0.03, 0.1, 0.3, 1.0]
ACTS = ["relu", "tanh"]
T_WIDTHS = [32.0, 128.0, 512.0, math.inf]
T_STEPS = np.arange(0, 11)


def lr_star(width: float, act: str) -> float:
    """The synthetic optimum: moves with the width (as under standard scaling) for relu,
    stays at 0.1 for tanh; the limit's is 0.1."""
    if math.isinf(width) or act == "tanh":
        return 0.1
    return {32.0: 1.0, 128.0: 0.3, 512.0: 0.1}[width]


@pytest.fixture(scope="module")
def transfer_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sweep width × seed × lr × act.  The final loss is ``0.1 + (log10 lr − log10
    lr*)²`` plus a seed offset; every run's loss decreases to it, except at lr = 1,
    whose loss dips to 0 at step 5 before ending there (so ``--best`` picks lr = 1)."""
    path = tmp_path_factory.mktemp("transfer") / "transfer.zarr"
    seeds = [0, 1]
    create_store(
        path,
        sweep={"width": T_WIDTHS, "seed": seeds, "lr": LRS, "act": ACTS},
        steps=T_STEPS,
        time=(("lr", "step"), np.outer(LRS, T_STEPS).astype(np.float64)),
        variables=[
            VariableSpec(name="train_loss", long_name="training loss"),
            VariableSpec(name="test_loss", long_name="test loss"),
        ],
        attrs={"experiment": "transfer"},
    )
    shape = (len(T_WIDTHS), len(seeds), len(LRS), len(ACTS), T_STEPS.size)
    loss = np.full(shape, np.nan)
    for wi, width in enumerate(T_WIDTHS):
        for si in range(len(seeds)):
            for li, lr in enumerate(LRS):
                for ai, act in enumerate(ACTS):
                    final = 0.1 + (math.log10(lr) - math.log10(lr_star(width, act))) ** 2 + 0.001 * si
                    curve = final + np.exp(-T_STEPS / 3.0)
                    if lr == 1.0:
                        curve[5] = 0.0
                    loss[wi, si, li, ai] = curve
    group = zarr.open_group(path, mode="r+")
    fill(group, "train_loss", loss)
    fill(group, "test_loss", loss)
    fill(group, "status", np.full(shape[:-1], int(Status.DONE), dtype=np.int8))
    return path


def fill(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """Write a whole variable at once (as if every run had called write_run)."""
    array = group[name]
    assert isinstance(array, zarr.Array)
    array[...] = values


def rms_value(width: float, layer: int, step: int) -> float:
    """Layer 1 is width-independent; layer 2 grows like n^(step/10) (a standard network
    blowing up once trained); the output layer shrinks like n^-1/2 at step 0."""
    if layer == 1:
        return 1.0
    if math.isinf(width):
        return 0.5 if layer == 3 else math.nan
    if layer == 2:
        return width ** (step / 10)
    return width**-0.5 + 0.01 * step


@pytest.fixture(scope="module")
def coord_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("coord") / "coord.zarr"
    seeds = [0, 1, 2]
    layers = [1, 2, 3]
    create_store(
        path,
        sweep={"width": T_WIDTHS, "seed": seeds},
        steps=T_STEPS,
        time=(("step",), 0.1 * T_STEPS.astype(np.float64)),
        variables=[
            VariableSpec(name="train_loss", long_name="training loss"),
            VariableSpec(name="preactivation_rms", dims=("layer",), long_name="rms of H"),
        ],
        extra_coords={"layer": layers},
        attrs={"experiment": "coord"},
    )
    rms = np.full((len(T_WIDTHS), len(seeds), T_STEPS.size, len(layers)), np.nan)
    for wi, width in enumerate(T_WIDTHS):
        for si in range(len(seeds)):
            for k, step in enumerate(T_STEPS):
                for j, layer in enumerate(layers):
                    # seeds ± 1 %, whose mean is the value itself
                    rms[wi, si, k, j] = rms_value(width, layer, int(step)) * (1 + 0.01 * (si - 1))
    status = np.full(rms.shape[:2], int(Status.DONE), dtype=np.int8)
    # width 512, seed 1 blows up (× 100 at steps 1 … 5), then diverges
    status[2, 1] = Status.DIVERGED
    rms[2, 1, 1:6] *= 100.0
    rms[2, 1, 6:] = np.nan
    group = zarr.open_group(path, mode="r+")
    fill(group, "preactivation_rms", rms)
    fill(group, "train_loss", np.ones(rms.shape[:-1]))
    fill(group, "status", status)
    return path


@pytest.fixture(scope="module")
def lr_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_report's synthetic store at three learning rates: 4 panels per slice."""
    path = tmp_path_factory.mktemp("grid") / "grid.zarr"
    make_store(path, lrs=[0.1, 0.2, 0.3], widths=[16.0, 64.0])
    return path


def cell(ax: object) -> tuple[int, int]:
    spec = ax.get_subplotspec()  # type: ignore[attr-defined]
    return spec.rowspan.start, spec.colspan.start


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in pixels of a PNG read back."""
    h, w = imread(str(path)).shape[:2]
    return h, w


# ---- the wrapped grid ------------------------------------------------------------------


def test_wrap_shape_is_near_square() -> None:
    assert [wrap_shape(n) for n in (1, 2, 3, 4, 5, 12, 13)] == [
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 2),
        (2, 3),
        (3, 4),
        (4, 4),
    ]


def test_twelve_panels_wrap_into_three_rows_of_four(lr_store: Path, tmp_path: Path) -> None:
    """3 learning rates × (train_loss, test_accuracy, weight_change at 2 layers) = 12
    panels: 3 rows × 4 columns, not a 12-panel strip."""
    fig = make_figure(lr_store)
    axes = fig.get_axes()
    assert len(axes) == 12
    assert sorted(cell(ax) for ax in axes) == [(r, c) for r in range(3) for c in range(4)]
    # in slice order, 4 panels a slice: here each row is one learning rate
    assert [ax.get_title() for ax in axes[:4]] == [
        "train_loss\nlr = 0.1",
        "test_accuracy\nlr = 0.1",
        "weight_change[layer=1]\nlr = 0.1",
        "weight_change[layer=2]\nlr = 0.1",
    ]
    out = plot_store(lr_store, output=tmp_path / "grid.png")
    h, w = image_size(out)
    assert (h, w) == (round(DPI * (2.8 * 3 + 0.6)), round(DPI * 3.6 * 4))
    assert 1.2 < w / h < 2.0  # the old one-row layout of 12 panels was 12.7 : 1


# ---- facets ------------------------------------------------------------------------------


def test_col_facet_puts_each_learning_rate_in_a_column(lr_store: Path, tmp_path: Path) -> None:
    fig = make_figure(lr_store, variables=["train_loss", "test_accuracy"], col="lr")
    axes = fig.get_axes()
    assert len(axes) == 6
    for ax in axes:
        r, c = cell(ax)
        name, where = ax.get_title().split("\n")
        assert name == ["train_loss", "test_accuracy"][r]
        assert where == f"lr = {[0.1, 0.2, 0.3][c]:g}"
    # one variable shares its y axis across the facets
    first = [ax for ax in axes if cell(ax)[0] == 0]
    assert first[0].get_shared_y_axes().joined(first[0], first[2])
    out = plot_store(lr_store, variables=["train_loss", "test_accuracy"], col="lr", output=tmp_path / "c.png")
    h, w = image_size(out)
    assert (h, w) == (round(DPI * (2.8 * 2 + 0.6)), round(DPI * 3.6 * 3))


def test_row_facet_is_the_transpose(lr_store: Path) -> None:
    fig = make_figure(lr_store, variables=["train_loss", "test_accuracy"], row="lr")
    for ax in fig.get_axes():
        r, c = cell(ax)
        name, where = ax.get_title().split("\n")
        assert name == ["train_loss", "test_accuracy"][c]
        assert where == f"lr = {[0.1, 0.2, 0.3][r]:g}"


def test_row_and_col_facets(transfer_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "rc.png"
    assert (
        main(
            ["plot", str(transfer_store), "--var", "test_loss", "--row", "act", "--col", "lr", "-o", str(out)]
        )
        == 0
    )
    assert image_size(out) == (round(DPI * (2.8 * 2 + 0.6)), round(DPI * 3.6 * 5))
    fig = make_figure(transfer_store, variables=["test_loss"], row="act", col="lr")
    for ax in fig.get_axes():
        r, c = cell(ax)
        assert ax.get_title().split("\n")[1] == f"lr = {LRS[c]:g}, act = {ACTS[r]}"


def test_facet_by_seed_shows_each_seeds_runs(lr_store: Path, transfer_store: Path) -> None:
    """A panel per seed instead of the mean over seeds: make_store marks width 16's
    seed 2 failed, so seed 2's panels have one line fewer (widths 16, 64, the limit)."""
    fig = make_figure(lr_store, variables=["train_loss"], col="seed")
    axes = fig.get_axes()
    assert len(axes) == 9  # 3 learning rates × 3 seeds
    for ax in axes:
        r, c = cell(ax)
        assert ax.get_title() == f"train_loss\nlr = {[0.1, 0.2, 0.3][r]:g}, seed = {c}"
        assert len(ax.get_lines()) == (2 if c == 2 else 3)
    fig = make_figure(transfer_store, kind="transfer", row="act", col="seed")
    for ax in fig.get_axes():
        r, c = cell(ax)
        assert ax.get_title().endswith(f"act = {ACTS[r]}, seed = {c}")
        stars = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("optimum")]
        # each seed's own final loss at its optimum: 0.1 + its offset 0.001 · seed
        assert len(stars) == len(T_WIDTHS)
        for line in stars:
            assert line.get_ydata()[0] == pytest.approx(0.1 + 0.001 * c + np.exp(-10 / 3.0))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--row", "lrr"],
            "cannot facet by 'lrr' (--row): not a sweep variable of the store (it can facet by: lr, seed); did you mean 'lr'?",
        ),
        (
            ["--col", "width"],
            "cannot facet by 'width' (--col): this plot draws it in every panel (one line per width)",
        ),
        (["--row", "lr", "--col", "lr"], "--row and --col are both 'lr'"),
        (["--kind", "particles", "--row", "lr"], "takes no --row or --col"),
        (["--best"], "--best belongs to --kind transfer, not curves"),
    ],
)
def test_bad_facets_exit_2_with_the_reason(
    lr_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["plot", str(lr_store), *args, "-o", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---- transfer ----------------------------------------------------------------------------


def test_the_learning_rate_variable_is_found_from_time(transfer_store: Path, lr_store: Path) -> None:
    for path, name in ((transfer_store, "lr"), (lr_store, "lr")):
        ds = open_results(path)
        try:
            assert learning_rate_variable(ds) == name
        finally:
            ds.close()


def test_transfer_marks_each_widths_optimum(transfer_store: Path, tmp_path: Path) -> None:
    fig = make_figure(transfer_store, kind="transfer", col="act")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["final test_loss\nact = relu", "final test_loss\nact = tanh"]
    for ax, act in zip(axes, ACTS, strict=True):
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "lr (learning rate)"
        stars = {
            line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("optimum")
        }
        assert sorted(stars) == sorted(f"optimum width={w:g}" for w in T_WIDTHS)
        for width in T_WIDTHS:
            star = stars[f"optimum width={width:g}"]
            assert star.get_marker() == "*"
            assert star.get_xdata()[0] == pytest.approx(lr_star(width, act))
            # at the seed mean of the final losses there: 0.1 + the mean seed offset
            assert star.get_ydata()[0] == pytest.approx(0.1 + 0.0005 + np.exp(-10 / 3.0))
        # one curve per width through the five learning rates
        curves = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert len(curves) == len(T_WIDTHS) and all(len(c.get_xdata()) == len(LRS) for c in curves)
    out = plot_store(transfer_store, kind="transfer", col="act", output=tmp_path / "t.png")
    assert image_size(out) == (round(DPI * (3.2 + 0.6)), round(DPI * 4.0 * 2))


def test_transfer_best_takes_each_runs_lowest_record(transfer_store: Path) -> None:
    ds = open_results(transfer_store)
    try:
        final = transfer_data(ds)
        best = transfer_data(ds, best=True)
    finally:
        ds.close()
    assert final.x == "lr" and final.is_lr and final.variable == "test_loss"
    for coords, optima in final.optima():
        assert optima == {w: lr_star(w, coords["act"]) for w in T_WIDTHS}
    for _, optima in best.optima():
        assert optima == {w: 1.0 for w in T_WIDTHS}  # lr = 1's loss touched 0 at step 5


def test_transfer_needs_a_swept_learning_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one_lr.zarr"
    make_store(path, lrs=[0.1], widths=[16.0, 64.0])
    assert main(["plot", str(path), "--kind", "transfer", "-o", str(tmp_path / "t.png")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "the transfer plot needs a swept learning rate, but the learning rate is the same in every run" in err
    )
    assert "--x VAR" in err


def test_transfer_x_is_checked(transfer_store: Path) -> None:
    with pytest.raises(PlotError, match=r"--x 'ac' is not a sweep variable .*did you mean 'act'\?"):
        make_figure(transfer_store, kind="transfer", x="ac")
    with pytest.raises(PlotError, match=r"--x act: its values \(relu, tanh\) are not numbers"):
        make_figure(transfer_store, kind="transfer", x="act")
    with pytest.raises(PlotError, match="one curve per width"):
        make_figure(transfer_store, kind="transfer", x="width")
    with pytest.raises(
        PlotError, match=r"cannot facet by 'lr' \(--row\): this plot draws it in every panel \(the x axis\)"
    ):
        make_figure(transfer_store, kind="transfer", row="lr")


# ---- the coordinate check ----------------------------------------------------------------


def test_coord_steps() -> None:
    assert coord_steps(range(11)) == [0, 1, 3, 10]
    assert coord_steps([0, 5, 10]) == [0, 5, 10]
    assert coord_steps(range(0, 1001, 10)) == [0, 10, 100, 1000]
    assert coord_steps(range(11), [10, 2]) == [2, 10]
    with pytest.raises(PlotError, match=r"step 12 is not a record step of the store \(nearest recorded: 10"):
        coord_steps(range(11), [12])


def test_coord_is_log_log_with_a_line_per_step(coord_store: Path, tmp_path: Path) -> None:
    fig = make_figure(coord_store, kind="coord")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [f"RMS of H_{k} (layer {k})" for k in (1, 2, 3)]
    steps = [0, 1, 3, 10]
    for ax, layer in zip(axes, (1, 2, 3), strict=True):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        lines = {line.get_gid(): line for line in ax.get_lines()}
        drawn = sorted(g for g in lines if g.startswith("step="))
        assert drawn == sorted(f"step={s}" for s in steps)
        for s in steps:
            line = lines[f"step={s}"]
            np.testing.assert_array_equal(line.get_xdata(), [32.0, 128.0, 512.0])
            want = [rms_value(w, layer, s) for w in (32.0, 128.0, 512.0)]
            if 1 <= s <= 5:  # the diverged run counts with its records before diverging
                want[2] *= (0.99 + 100.0 + 1.01) / 3
            np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)
        # the limit, where stored, as a level per step
        limits = [g for g in lines if g.startswith("limit")]
        assert len(limits) == (4 if layer in (1, 3) else 0)
    # layer 2's slope in log-log is the synthetic exponent step / 10
    line = {line.get_gid(): line for line in axes[1].get_lines()}["step=10"]  # no blow-up left
    slope = np.polyfit(np.log(line.get_xdata()), np.log(line.get_ydata()), 1)[0]
    assert slope == pytest.approx(1.0)
    out = plot_store(coord_store, kind="coord", output=tmp_path / "c.png")
    assert image_size(out) == (round(DPI * (3.0 * 2 + 0.6)), round(DPI * 3.6 * 2))  # 3 panels: 2 × 2


def test_coord_chosen_steps_and_layers(coord_store: Path) -> None:
    fig = make_figure(coord_store, kind="coord", steps=[5], variables=["preactivation_rms[layer=2]"])
    (ax,) = fig.get_axes()
    assert [line.get_gid() for line in ax.get_lines()] == ["step=5"]


def test_coord_needs_the_record(lr_store: Path, coord_store: Path) -> None:
    with pytest.raises(Exception, match="no 'preactivation_rms' record: add preactivation_rms"):
        make_figure(lr_store, kind="coord")
    with pytest.raises(PlotError, match=r"--var takes e\.g\. preactivation_rms"):
        make_figure(coord_store, kind="coord", variables=["train_loss"])
