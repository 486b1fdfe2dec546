"""One name, one quantity: every observable of a finite network converges to the value
the jax backend records for the limit under the same name.

Mean-field theory (mean-field.md §4, P1) says a width-n network's distance to the limit
falls like C·n^-1/2, so from width 64 to 256 the distance of every observable should
shrink by about 2. A quantity that meant something else in the limit (a norm that grows
with the width, a different normalisation) would not shrink at all, or would grow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

import xarray as xr
from conftest import run_cli

# Three hidden layers (the jax limit reduces them with R1 + R2, so 16 384 particles are
# cheap), biases, non-centred middle and read-out weights (the limit moves), full-batch
# steps on a finite training set (no SGD noise: each seed's limit is deterministic).
SPEC = """\
# mfdsl: allow degenerate
experiment observables
data teacher {
  dim     = 5
  teacher = mlp(hidden = 1, width = 4, activation = tanh)
  noise   = 0.0
  train   = 64
  test    = 256
}
network mlp { hidden = 3, activation = tanh, bias = true }
scaling mean_field
init {
  layer 1    ~ normal(0, 1)
  layer 2..3 ~ normal(1, 1)
  layer last ~ normal(1, 1)
}
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 64, steps = 100 }
record every 25 {
  train_loss, test_loss, output(probes = 4), neuron_spread, preactivation_rms, weight_change
}
sweep { width = [64, 256], seed = 0..3 }
backends torch, jax
jax { particles = 16384 }
"""

NAMES = ("train_loss", "test_loss", "output", "neuron_spread", "preactivation_rms", "weight_change")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    folder = tmp_path_factory.mktemp("observables")
    spec = folder / "observables.mf"
    spec.write_text(SPEC, encoding="utf-8")
    out = folder / "o.zarr"
    result = run_cli("run", spec, "-o", out, "--workers", "2")
    assert result.code == 0, result.err
    return xr.open_zarr(out).load()


def sup_distance(ds: xr.Dataset, name: str, width: float) -> np.ndarray:
    """Per seed: the largest |finite − limit| over the record steps and the variable's
    other dimensions (layers, probes)."""
    gap = abs(ds[name].sel(width=width) - ds[name].sel(width=np.inf))
    return gap.max([d for d in gap.dims if d != "seed"], skipna=True).values


@pytest.mark.parametrize("name", NAMES)
def test_each_observable_converges_to_its_limit_at_the_mean_field_rate(store: xr.Dataset, name: str) -> None:
    assert (store.status == 1).all(), store.message.values
    near = sup_distance(store, name, 64.0)
    far = sup_distance(store, name, 256.0)
    assert np.isfinite(near).all() and np.isfinite(far).all()
    # theory: 2 (= √(256/64)); measured 1.8–2.6 over these seeds. A shrink below 1.4
    # in the seed mean means the two backends do not compute one quantity.
    ratio = float(near.mean() / far.mean())
    assert ratio > 1.4, f"{name}: distance to the limit {near.mean():.4g} at 64, {far.mean():.4g} at 256"


def test_observables_have_the_same_shape_and_scale_in_the_limit(store: xr.Dataset) -> None:
    """weight_change, neuron_spread and preactivation_rms are O(1) per-entry quantities at
    every width: their finite values at width 256 are within a factor of the limit's,
    layer by layer."""
    for name in ("weight_change", "neuron_spread", "preactivation_rms"):
        final = store[name].isel(step=-1).mean("seed")
        limit = final.sel(width=np.inf)
        wide = final.sel(width=256.0)
        for layer in final.layer.values:
            lim, fin = float(limit.sel(layer=layer)), float(wide.sel(layer=layer))
            if not np.isfinite(lim):
                continue  # neuron_spread has no output layer
            # a relative 25 % plus the O(n^-1/2) fluctuation (a degenerate layer's spread
            # is 0 in the limit and about 0.8/√n here)
            assert abs(fin - lim) <= 0.25 * abs(lim) + 1.0 / np.sqrt(256.0), (name, int(layer), fin, lim)


def test_the_spec_checks_cleanly(tmp_path: Path) -> None:
    """The spec above is valid as it stands (its allow comment names a real check)."""
    path = tmp_path / "s.mf"
    path.write_text(SPEC, encoding="utf-8")
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "warning" not in result.err
