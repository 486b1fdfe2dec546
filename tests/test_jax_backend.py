"""The jax backend as a plugin: the backend contract (``tests/backend_contract.py``) at
``width = inf``, and ``mfdsl run`` writing finite widths and the limit into one store."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from backend_contract import BackendContract
from conftest import SweepStore, finite, open_store, run_sweep, tiny_spec

import mfdsl
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

jax = pytest.importorskip("jax")

#: The contract's tiny spec with a jax block that keeps each limit run to a fraction of
#: a second: its two hidden layers keep a pairwise (N × N) state, whose default size
#: (4096² weights, 1024 samples per step) is sized for real runs, not tests.
JAX_OPTIONS = "jax { particles = 64, data_samples = 64, dtype = float64 }\n"


class TestJaxContract(BackendContract):
    backend_name = "jax"

    @classmethod
    def spec_text(cls) -> str:
        return tiny_spec(cls.backend_name) + JAX_OPTIONS

    def plans(self) -> list[RunPlan]:
        spec = mfdsl.parse(self.spec_text())
        out = []
        for point in mfdsl.expand(spec):
            if point.index[0] != 0:
                continue
            plan = compile_point(point.spec, {**point.coords, "width": math.inf}, self.backend_name)
            out.append(dataclasses.replace(plan, width=math.inf))
        return out

    @pytest.fixture(scope="class")
    @classmethod
    def made(cls, tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
        folder = tmp_path_factory.mktemp("sweep-jax")
        spec = folder / "tiny.mf"
        spec.write_text(cls.spec_text(), encoding="utf-8")
        store = folder / "tiny.zarr"
        result = run_sweep(spec, store, "--backend", cls.backend_name)
        assert result.code == 0, result.out + result.err
        return SweepStore(spec=spec, store=store, result=result)

    def test_store_values(self, ds: Any) -> None:
        """The contract's checks, where the limit is not degenerate.  The tiny spec's
        layer 2 is centred (N(0, 1)), so in the limit H_2 ≡ 0: for ``relu`` that is the
        kink, where the limit's equations are ill-posed and the solver (relu'(0) = 0)
        moves nothing — it says so in ``limit_warnings``; for ``tanh`` it is a saddle
        that only the sampling noise of E_Z (64 samples per step) leaves."""
        tanh = ds.sel(width=self.widths, act="tanh")
        super().test_store_values(tanh)
        relu = ds.sel(width=self.widths, act="relu")
        for name in ("train_loss", "test_loss", "test_accuracy", "output"):
            assert finite(relu[name].values), name
        assert (relu["weight_change"].sel(layer=[1, 3]) == 0).all()
        assert all("kink" in w[0] for w in ds.attrs["limit_warnings"].values())
        assert all("act=relu" in key for key in ds.attrs["limit_warnings"])

    def test_store_attrs_name_the_reductions(self, ds: Any) -> None:
        keys = [f"jax:width=inf,seed={s},act={a}" for s in (0, 1) for a in ("tanh", "relu")]
        assert sorted(ds.attrs["limit_reductions"]) == sorted(keys)
        assert set(ds.attrs["limit_reductions"].values()) == {"R1"}
        assert all(v == [64, 64] for v in ds.attrs["limit_particles"].values())
        assert all(v == [] for v in ds.attrs["limit_collapsed_layers"].values())


TWO_BACKENDS = """\
experiment both
data isotropic_gaussian { dim = 4, delta = 0.5, train = 32, test = 64 }
network mlp { hidden = 4, activation = relu }
scaling mean_field
init {
  layer 1    ~ normal(0, 1)
  layer 2..4 ~ normal(1, 0.5)
  layer 5    ~ constant(0)
}
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 32, steps = 20 }
record every 5 { train_loss, test_loss, neuron_spread(probes = 4) }
sweep { width = [8, 16], seed = 0..1 }
backends torch, jax
jax { particles = 128, dtype = float64 }
"""


def test_mfdsl_run_writes_finite_widths_and_the_limit(tmp_path: Path) -> None:
    spec = tmp_path / "both.mf"
    spec.write_text(TWO_BACKENDS, encoding="utf-8")
    store = tmp_path / "both.zarr"
    result = run_sweep(spec, store)
    assert result.code == 0, result.out + result.err
    with open_store(store) as ds:
        assert ds["width"].values.tolist() == [8.0, 16.0, math.inf]
        assert (ds["status"] == 1).all()
        assert list(ds.attrs["backends"]) == ["torch", "jax"]
        limit = ds.sel(width=np.inf)
        assert finite(limit["test_loss"].values)
        # the limit lands on the finite runs' steps and times
        np.testing.assert_array_equal(ds["time"].values, 0.1 * ds["step"].values)
        # five layers with a constant last layer: R1 + R2 + top collapse, and the data
        # say so: layers 2..4 are collapsed and their spread is exactly 0
        keys = ["jax:width=inf,seed=0", "jax:width=inf,seed=1"]
        assert sorted(ds.attrs["limit_reductions"]) == keys
        assert set(ds.attrs["limit_reductions"].values()) == {"R1 + R2 + top collapse"}
        assert all(v == [2, 3, 4] for v in ds.attrs["limit_collapsed_layers"].values())
        spread = limit["neuron_spread"]
        assert (spread.sel(layer=[2, 3, 4]) == 0).all() and (spread.sel(layer=1) > 0).all()
        # finite networks have a small, non-zero spread there
        assert (ds["neuron_spread"].sel(width=16.0, layer=3).isel(step=slice(1, None)) > 0).all()
    assert not Path(f"{store}.attrs").exists()  # the per-run files were merged


def test_jax_module_imports_no_jax() -> None:
    import subprocess
    import sys

    code = "import sys, mfdsl_jax, mfdsl; mfdsl.available_backends(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
