"""The Python verbs (``mfdsl.run``, ``open_store``, ``report``, ``plot``, ``verify``,
``check``) as a notebook uses them, and the plugin face: a third-party backend
(``tests/toy_backend``), installed through an entry point, runs a sweep using only
``mfdsl.plugin``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_same_data, open_store, run_sweep, tiny_spec

import mfdsl

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
TOY = ROOT / "tests" / "toy_backend"


@needs_torch
def test_run_returns_the_dataset_the_cli_writes(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.mf"
    spec.write_text(tiny_spec("torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mfdsl.MfdslWarning)  # the tiny spec's science warnings
        ds = mfdsl.run(spec, tmp_path / "api.zarr", workers=1)
    assert int((ds.status == 1).sum()) == ds.status.size  # every run done
    assert run_sweep(spec, tmp_path / "cli.zarr").code == 0
    with open_store(tmp_path / "cli.zarr") as cli, open_store(tmp_path / "api.zarr") as api:
        assert_same_data(cli, api)
        assert_same_data(cli, ds.load())

    # the other verbs read it back
    summary = mfdsl.report(tmp_path / "api.zarr")
    assert summary["experiment"] == "tiny" and summary["finalized"]
    rows = [row for part in summary["slices"] for row in part["widths"]]
    assert sum(row["runs_done"] for row in rows) == ds.status.size
    assert mfdsl.verify(tmp_path / "api.zarr").ok
    image = mfdsl.plot(tmp_path / "api.zarr", output=tmp_path / "curves.png", variables=["test_loss"])
    assert Path(image).stat().st_size > 1000
    assert mfdsl.open_store(tmp_path / "api.zarr").sizes == ds.sizes


def test_check_returns_warnings_and_raises_errors(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.mf"
    spec.write_text(tiny_spec("torch").replace("act = [tanh, relu]", "act = [tanh, relu], unused = [1, 2]"))
    found = mfdsl.check(spec)
    assert any("'unused' is never used" in str(w) for w in found)
    spec.write_text(tiny_spec("torch").replace("steps     = 40", "stepz = 40"))
    with pytest.raises(mfdsl.SpecError, match="steps"):
        mfdsl.check(spec)


def test_run_refuses_nonsense_before_creating_anything(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.mf"
    spec.write_text(tiny_spec("torch"))
    with pytest.raises(ValueError, match="workers"):
        mfdsl.run(spec, tmp_path / "s.zarr", workers=0)
    assert not (tmp_path / "s.zarr").exists()


def _toy_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TOY), str(ROOT), str(ROOT / "backends"), env.get("PYTHONPATH", "")]
    )
    return env


TOY_SPEC = """\
experiment toy
data teacher {{ dim = 3, teacher = mlp(hidden = 1, width = 4, activation = tanh), train = online, test = 32 }}
network mlp {{ hidden = 1, activation = tanh }}
scaling mean_field
train {{ optimizer = sgd(lr = 0.1), loss = mse, batch = 2, steps = 30 }}
record every 10 {{ train_loss, test_loss }}
sweep {{ width = [4, 8], seed = 0..1 }}
backends {backend}
torch {{ dtype = float64 }}
"""


@needs_torch
def test_a_third_party_backend_runs_a_sweep_through_the_plugin_face(tmp_path: Path) -> None:
    """The toy backend is found through the entry point, validated like a built-in one,
    runs a sweep into a store, and — since the plan and the streams say everything —
    gives the torch backend's numbers."""
    stores = {}
    for backend in ("toy", "torch"):
        spec = tmp_path / f"{backend}.mf"
        spec.write_text(TOY_SPEC.format(backend=backend))
        store = tmp_path / f"{backend}.zarr"
        done = subprocess.run(
            [sys.executable, "-m", "mfdsl", "run", str(spec), "-o", str(store), "--workers", "1"],
            env=_toy_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        stores[backend] = store
    with open_store(stores["toy"]) as toy, open_store(stores["torch"]) as torch_:
        assert toy.attrs["backends"] == ["toy"]
        for name in ("train_loss", "test_loss"):
            np.testing.assert_allclose(toy[name].values, torch_[name].values, rtol=1e-10, atol=1e-12)

    # an option the toy backend does not declare is an error with its place
    bad = tmp_path / "bad.mf"
    bad.write_text(TOY_SPEC.format(backend="toy") + "toy { order = backward }\n")
    checked = subprocess.run(
        [sys.executable, "-m", "mfdsl", "check", str(bad)], env=_toy_env(), capture_output=True, text=True
    )
    assert checked.returncode == 2 and "order" in checked.stderr and "forward" in checked.stderr
