"""The contract every mfdsl backend must meet.

A backend's test module subclasses :class:`BackendContract` and names the backend::

    class TestTorchContract(BackendContract):
        backend_name = "torch"

The tests discover the backend as a plugin, compile the tiny spec of ``conftest.py`` to
run plans, run them, and check the store ``mfdsl run`` writes: its dimensions, coordinate
dtypes, attributes, status flags and every observable's shape.  A limit backend
(``Backend.limit``) is held to the same contract at ``width = inf``.  When the backend's
dependencies are missing (``require()`` raises :class:`mfdsl.BackendUnavailable`), the
tests that need them are skipped.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml
from conftest import (
    TINY_ACTS,
    TINY_LAYERS,
    TINY_LR,
    TINY_PROBES,
    TINY_SAMPLE,
    TINY_SEEDS,
    TINY_STEPS,
    TINY_WIDTHS,
    SweepStore,
    finite,
    open_store,
    tiny_spec,
)

import mfdsl
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

PARTICLE_COMPONENTS = ["w_in_1", "w_in_2", "w_in_norm", "w_out"]


class BackendContract:
    """Tests every backend must pass; subclasses set :attr:`backend_name`."""

    backend_name: ClassVar[str]

    # ---- helpers ---------------------------------------------------------------------

    @property
    def backend_class(self) -> type[mfdsl.Backend]:
        return mfdsl.available_backends()[self.backend_name]

    @property
    def limit(self) -> bool:
        return bool(self.backend_class.limit)

    @property
    def widths(self) -> list[float]:
        """The widths this backend fills in the store."""
        return [math.inf] if self.limit else [float(w) for w in TINY_WIDTHS]

    def plans(self) -> list[RunPlan]:
        """The run plans of the tiny spec for this backend, as ``mfdsl run`` makes them."""
        spec = mfdsl.parse(tiny_spec(self.backend_name))
        out = []
        for point in mfdsl.expand(spec):
            if self.limit and point.index[0] != 0:
                continue  # one limit per point of the other variables
            coords = dict(point.coords)
            if self.limit:
                coords["width"] = math.inf
            plan = compile_point(point.spec, coords, self.backend_name)
            out.append(dataclasses.replace(plan, width=math.inf) if self.limit else plan)
        return out

    @pytest.fixture(autouse=True)
    def _requires(self, request: pytest.FixtureRequest) -> None:
        if request.node.name.startswith(("test_discovered", "test_declares_options")):
            return  # these need no dependency
        try:
            mfdsl.get_backend(self.backend_name).require()
        except mfdsl.BackendUnavailable as error:
            pytest.skip(f"backend {self.backend_name!r} unavailable: {error}")

    @pytest.fixture
    def made(self, sweep_store: Callable[[str], SweepStore]) -> SweepStore:
        return sweep_store(self.backend_name)

    @pytest.fixture
    def ds(self, made: SweepStore) -> Any:
        with open_store(made.store) as ds:
            yield ds

    # ---- the plugin ------------------------------------------------------------------

    def test_discovered(self) -> None:
        backends = mfdsl.available_backends()
        assert self.backend_name in backends
        cls = backends[self.backend_name]
        assert isinstance(cls, type) and issubclass(cls, mfdsl.Backend)
        assert cls.name == self.backend_name
        assert isinstance(cls.description, str) and cls.description
        assert isinstance(mfdsl.get_backend(self.backend_name), cls)

    def test_require(self) -> None:
        assert mfdsl.get_backend(self.backend_name).require() is None

    def test_declares_options(self) -> None:
        options = self.backend_class.options
        assert isinstance(options, tuple)
        names = [o.name for o in options]
        assert len(set(names)) == len(names), f"an option is declared twice: {names}"
        for option in options:
            assert isinstance(option, mfdsl.Option)
            assert option.name.isidentifier() and option.help, option
            if not option.required and option.default is not None:
                # the default passes the option's own check
                assert option.kind.check(option.default, None, option.name) == option.default

    # ---- compile and run -------------------------------------------------------------

    def test_runs_a_plan(self) -> None:
        backend = mfdsl.get_backend(self.backend_name)
        plan = self.plans()[0]
        calls: list[tuple[int, float]] = []
        result = backend.run(plan, progress=lambda step, loss: calls.append((step, loss)))
        assert result["status"] == "done"
        assert isinstance(result.get("message", ""), str)
        self.check_records(plan, result["records"])
        steps = [step for step, _ in calls]
        assert steps == sorted(steps) and all(0 <= s <= plan.steps for s in steps)

    def test_every_plan_runs(self) -> None:
        backend = mfdsl.get_backend(self.backend_name)
        for plan in self.plans()[1:]:
            result = backend.run(plan)
            assert result["status"] == "done", (plan.coords, result.get("message"))
            self.check_records(plan, result["records"])

    def check_records(self, plan: RunPlan, records: Any) -> None:
        """One run's records: one array per observable, first axis the record steps."""
        n = len(plan.record_steps)
        assert sorted(records) == sorted(o.name for o in plan.observables)
        k = plan.layers[-1].fan_out
        for obs in plan.observables:
            rec = np.asarray(records[obs.name])
            assert rec.dtype.kind == "f", obs.name
            if obs.name in ("train_loss", "test_loss", "test_accuracy"):
                shape: tuple[int, ...] = (n,)
            elif obs.name == "output":
                shape = (n, obs.probes) if k == 1 else (n, obs.probes, k)
            elif obs.name in ("neuron_spread", "weight_change"):
                shape = (n, len(obs.layers))
            else:
                shape = (n, obs.sample, len(PARTICLE_COMPONENTS))
            assert rec.shape == shape, (obs.name, rec.shape, shape)
            if obs.name == "particles":
                # rows beyond the layer's width are NaN; the layer's own are finite
                rows = min(obs.sample, int(plan.width)) if math.isfinite(plan.width) else obs.sample
                assert finite(rec[:, :rows]), obs.name
            else:
                assert finite(rec), obs.name
        acc = np.asarray(records["test_accuracy"])
        assert np.all((acc >= 0) & (acc <= 1))
        assert np.all(np.asarray(records["test_loss"]) >= 0)

    # ---- the store -------------------------------------------------------------------

    def test_exit_code(self, made: SweepStore) -> None:
        assert made.result.code == 0, made.result.err

    def test_store_opens_without_warnings(self, made: SweepStore) -> None:
        with open_store(made.store) as ds:
            assert "status" in ds

    def test_store_dims(self, ds: Any) -> None:
        sweep = ["width", "seed", "act"]
        assert list(ds["status"].dims) == sweep
        expected_widths = [float(w) for w in TINY_WIDTHS] + ([math.inf] if self.limit else [])
        assert ds["width"].dtype == np.float64
        assert ds["width"].values.tolist() == expected_widths
        assert ds["seed"].dtype == np.int64
        assert ds["seed"].values.tolist() == list(TINY_SEEDS)
        assert ds["act"].values.tolist() == list(TINY_ACTS)
        assert ds["step"].dtype == np.int64
        assert ds["step"].values.tolist() == list(TINY_STEPS)
        # the learning rate is fixed, so time is a coordinate over step alone
        assert ds["time"].dims == ("step",)
        assert ds["time"].dtype == np.float64
        np.testing.assert_array_equal(ds["time"].values, TINY_LR * np.asarray(TINY_STEPS, dtype=np.float64))
        assert ds["probe"].values.tolist() == list(range(TINY_PROBES))
        assert ds["layer"].dtype == np.int64
        assert ds["layer"].values.tolist() == list(TINY_LAYERS)
        assert ds["particle"].values.tolist() == list(range(TINY_SAMPLE))
        assert ds["component"].values.tolist() == PARTICLE_COMPONENTS
        own = {
            "train_loss": (),
            "test_loss": (),
            "test_accuracy": (),
            "output": ("probe",),
            "neuron_spread": ("layer",),
            "weight_change": ("layer",),
            "particles": ("particle", "component"),
        }
        assert sorted(ds.data_vars) == sorted([*own, "status"])
        assert "message" in ds.coords  # a label per run, like time (docs/store.md)
        for name, dims in own.items():
            assert ds[name].dims == (*sweep, "step", *dims), name
            assert ds[name].dtype == np.float64, name
            assert ds[name].attrs.get("long_name"), name
            assert ds[name].attrs.get("units") == "1", name
        assert ds["message"].dims == tuple(sweep)

    def test_store_attrs(self, ds: Any, made: SweepStore, tmp_path: Any) -> None:
        attrs = ds.attrs
        assert attrs["spec_source"] == made.spec.read_text(encoding="utf-8")
        spec = mfdsl.load(made.spec)
        assert attrs["spec_ir"] == mfdsl.to_yaml(spec)
        # the IR is a spec of its own: it loads back to the same spec
        yaml_file = tmp_path / "ir.yaml"
        yaml_file.write_text(attrs["spec_ir"], encoding="utf-8")
        assert mfdsl.to_dict(mfdsl.load(yaml_file)) == mfdsl.to_dict(spec)
        assert yaml.safe_load(attrs["spec_ir"])["experiment"] == "tiny"
        assert attrs["experiment"] == "tiny"
        assert list(attrs["backends"]) == [self.backend_name]
        versions = attrs["versions"]
        assert versions["mfdsl"] == mfdsl.__version__
        for package in ("python", "numpy", "xarray", "zarr"):
            assert versions.get(package), package
        assert attrs["mfdsl_store_format"] == 1
        assert attrs["host"] == socket.gethostname()
        created = datetime.fromisoformat(attrs["created"])
        finalized = datetime.fromisoformat(attrs["finalized"])
        assert created.tzinfo is not None and created <= finalized

    def test_status_flags(self, ds: Any) -> None:
        status = ds["status"]
        assert status.dtype == np.int8
        assert np.asarray(status.attrs["flag_values"]).tolist() == [0, 1, 2, 3]
        assert status.attrs["flag_meanings"].split() == ["pending", "done", "failed", "diverged"]
        filled = status.sel(width=self.widths)
        assert (filled == 1).all(), filled.values
        if self.limit:  # finite widths are no business of a limit backend
            assert (status.sel(width=[float(w) for w in TINY_WIDTHS]) == 0).all()

    def test_store_values(self, ds: Any) -> None:
        """Every run filled its cell: scalars finite at every step, layered observables
        NaN exactly on the layers they do not observe."""
        cells = ds.sel(width=self.widths)
        for name in ("train_loss", "test_loss", "test_accuracy", "output"):
            assert finite(cells[name].values), name
        spread = cells["neuron_spread"]
        assert finite(spread.sel(layer=[1, 2]).values)
        assert np.isnan(spread.sel(layer=3).values).all()
        change = cells["weight_change"]
        assert finite(change.sel(layer=[1, 3]).values)
        assert np.isnan(change.sel(layer=2).values).all()
        # weights move: the change is 0 at step 0 and positive after
        assert (change.sel(layer=[1, 3], step=0) == 0).all()
        assert (change.sel(layer=[1, 3]).isel(step=slice(1, None)) > 0).all()
        assert finite(cells["particles"].values)  # widths ≥ the 5 sampled neurons
