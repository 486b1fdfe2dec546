"""μP's picture on ``specs/mup_transfer.mf`` (shrunk to one seed and six learning rates):
under ``standard`` the best learning rate moves with the width and a wide network's
activations blow up at a rate a narrow one trains with; under ``mup`` and ``mean_field``
neither happens.  Asserted on the stored numbers, through the functions ``mfdsl plot
--kind transfer`` and ``--kind coord`` draw from.

Theory (Yang & Hu 2021): under the standard parametrisation with SGD the output
layer's update moves the output by O(lr · n), so the largest stable (and, at a few
hundred steps, the best) learning rate falls with the width; μP and mean-field scale
each layer's learning rate so that every update moves every pre-activation by O(lr),
whatever the width.  The learning rates are a grid of factors of 2, so the optima are
too: each assertion below sits one grid step (a factor 2) from what was measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import xarray as xr
from conftest import ROOT, run_cli

from mfdsl.analysis.plot import make_figure, transfer_data
from mfdsl.analysis.report import open_results

LRS = [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
WIDTHS = (32.0, 128.0, 512.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mup") / "mup.zarr"
    result = run_cli(
        "run",
        ROOT / "specs" / "mup_transfer.mf",
        "-o",
        out,
        "--yes",
        "--set",
        "sweep.seed=[2]",
        "--set",
        f"sweep.lr=[{', '.join(f'{lr:g}' for lr in LRS)}]",
    )
    assert result.code == 0, result.err
    return out


def test_the_best_learning_rate_moves_with_the_width_only_under_standard(store: Path) -> None:
    ds = open_results(store)
    try:
        data = transfer_data(ds)  # final test loss against lr, found from the store
    finally:
        ds.close()
    assert data.x == "lr" and data.is_lr
    optima = {coords["scale"]: best for coords, best in data.optima()}
    assert set(optima) == {"standard", "mup", "mean_field"}
    for scale, best in optima.items():
        assert set(best) == set(WIDTHS), (scale, best)
    # measured here: standard 1, 0.5, 0.125 at widths 32, 128, 512 (×8; over seeds 0–3
    # ×4 to ×8); mup and mean_field 1 at every width (over seeds 0–3 at most ×2)
    standard = optima["standard"]
    assert standard[32.0] >= standard[128.0] >= standard[512.0]
    assert standard[32.0] / standard[512.0] >= 4, standard
    for scale in ("mup", "mean_field"):
        values = list(optima[scale].values())
        assert max(values) / min(values) <= 2, (scale, optima[scale])


def test_the_learning_rate_tuned_at_width_32_transfers_to_512_only_under_mup_and_mean_field(
    store: Path,
) -> None:
    ds = xr.open_zarr(store)
    final = ds.test_loss.isel(step=-1).where(ds.status == 1).sel(seed=2)
    for scale in ("standard", "mup", "mean_field"):
        narrow = final.sel(scale=scale, width=32.0)
        tuned = float(narrow.lr[int(np.nanargmin(narrow.values))])
        wide = final.sel(scale=scale, width=512.0)
        at_tuned, best = float(wide.sel(lr=tuned)), float(wide.min())
        if scale == "standard":
            # measured: width 512 diverges at the rate width 32 likes (every seed 0–3)
            assert np.isnan(at_tuned), (tuned, at_tuned, best)
        else:
            # measured: the same optimum (1.0 × the best loss; ≤ 1.4 × over seeds 0–3)
            assert at_tuned <= 2 * best, (scale, tuned, at_tuned, best)


def test_coordinates_blow_up_with_the_width_only_under_standard(store: Path) -> None:
    """The coordinate check at lr = 0.25, which trains width 32 under every scaling."""
    ds = xr.open_zarr(store)
    rms = ds.preactivation_rms.sel(lr=0.25, seed=2)
    early = rms.sel(step=slice(0, 13))  # before standard's width 512 is all inf
    ratio = early.sel(width=512.0) / early.sel(width=32.0)
    # measured: the output's RMS at step 3 is 33 × larger at width 512 (8.9–82 × over
    # seeds 0–3), and it diverges from step 5 on
    assert float(ratio.sel(scale="standard", step=3, layer=3)) >= 4
    assert ds.status.sel(scale="standard", lr=0.25, seed=2, width=512.0) == 3  # diverged
    # measured: no layer at any step grows by more than 1.17 × from 32 to 512
    for scale in ("mup", "mean_field"):
        assert float(ratio.sel(scale=scale).max()) <= 1.5, scale
    # and the coord plot draws that run's records from before it diverged
    fig = make_figure(
        store, kind="coord", variables=["preactivation_rms[layer=3]"], steps=[3], row="scale", col="lr"
    )
    panel = next(
        ax for ax in fig.get_axes() if ax.get_title() == "RMS of H_3 (layer 3)\nscale = standard, lr = 0.25"
    )
    (line,) = [line for line in panel.get_lines() if line.get_gid() == "step=3"]
    np.testing.assert_allclose(line.get_ydata(), rms.sel(scale="standard", step=3, layer=3).values)
