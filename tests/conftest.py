"""Shared fixtures: a tiny spec that records every observable, the store one run of it
writes (made once per session and backend), and helpers to run the CLI and compare
stores."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Small enough that one run of the whole sweep takes well under a second of training:
#: 8 runs (width × seed × act) of 40 SGD steps, every observable recorded, and the
#: shared ``layer`` dimension covered only in part by each layered observable.
TINY_SPEC = """\
# A tiny sweep for the tests: every observable, a categorical sweep variable.
experiment tiny

data isotropic_gaussian {{ dim = 4, delta = 0.5, train = online, test = 64 }}

network mlp {{ hidden = 2, activation = act }}

scaling mean_field

train {{
  optimizer = sgd(lr = 0.05)
  loss      = mse
  batch     = 4
  steps     = 40
}}

record every 10 {{
  train_loss, test_loss, test_accuracy
  output(probes = 3)
  neuron_spread
  weight_change(layer = [1, last])
  particles(sample = 5)
}}

sweep {{ width = [8, 16], seed = 0..1, act = [tanh, relu] }}

backends {backend}
"""

TINY_LR = 0.05
TINY_WIDTHS = (8, 16)
TINY_SEEDS = (0, 1)
TINY_ACTS = ("tanh", "relu")
TINY_STEPS = (0, 10, 20, 30, 40)
TINY_PROBES = 3
TINY_SAMPLE = 5
#: neuron_spread covers hidden layers 1, 2; weight_change layers 1 and last (3)
TINY_LAYERS = (1, 2, 3)


def tiny_spec(backend: str = "torch") -> str:
    """The tiny spec's text, for ``backend``."""
    return TINY_SPEC.format(backend=backend)


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str | Path) -> CliResult:
    """``mfdsl ARGS`` in-process: the exit code (``SystemExit`` from argparse included)
    and what it printed."""
    from mfdsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return CliResult(code=code, out=out.getvalue(), err=err.getvalue())


def run_sweep(spec: Path, store: Path, *extra: str) -> CliResult:
    """``mfdsl run SPEC -o STORE --workers 1 EXTRA…``."""
    return run_cli("run", spec, "-o", store, "--workers", "1", *extra)


@dataclass(frozen=True)
class SweepStore:
    """A spec file and the store ``mfdsl run`` made of it."""

    spec: Path
    store: Path
    result: CliResult


@pytest.fixture(scope="session")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SweepStore]:
    """``sweep_store(backend)``: the tiny spec run once (per session) with ``backend``.
    Read it, never write it: several tests share it."""
    made: dict[str, SweepStore] = {}

    def get(backend: str) -> SweepStore:
        if backend not in made:
            folder = tmp_path_factory.mktemp(f"sweep-{backend}")
            spec = folder / "tiny.mf"
            spec.write_text(tiny_spec(backend), encoding="utf-8")
            store = folder / "tiny.zarr"
            result = run_sweep(spec, store, "--backend", backend)
            assert result.code == 0, result.out + result.err
            made[backend] = SweepStore(spec=spec, store=store, result=result)
        return made[backend]

    return get


@contextlib.contextmanager
def open_store(path: Path) -> Iterator[object]:
    """The store as an xarray Dataset, loaded, with every warning an error."""
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
        ds.load()
    try:
        yield ds
    finally:
        ds.close()


def assert_same_data(a: object, b: object, names: Sequence[str] | None = None) -> None:
    """Two stores (xarray Datasets) hold bitwise the same coordinates and variables."""
    import xarray as xr

    assert isinstance(a, xr.Dataset) and isinstance(b, xr.Dataset)
    assert sorted(a.data_vars) == sorted(b.data_vars)
    assert sorted(a.coords) == sorted(b.coords)
    for name in names or [*a.coords, *a.data_vars]:
        x, y = a[name], b[name]
        assert x.dims == y.dims, name
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert x.dtype == y.dtype, name
            assert x.values.tobytes() == y.values.tobytes(), f"{name} differs"
        else:
            assert x.values.tolist() == y.values.tolist(), f"{name} differs"


def cell_files(store: Path, index: Sequence[int]) -> dict[str, int]:
    """The chunk files of one sweep cell (every variable over the sweep dims), with
    their modification times in ns.  Chunks are 1 along each sweep dimension, so a
    cell's chunk keys start with its sweep index (zarr v3: ``VAR/c/i/j/…``)."""
    prefix = [str(i) for i in index]
    out: dict[str, int] = {}
    for path in store.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(store).parts
        if len(parts) < 2 + len(prefix) or parts[1] != "c":
            continue
        if list(parts[2 : 2 + len(prefix)]) == prefix:
            out["/".join(parts)] = path.stat().st_mtime_ns
    return out


def finite(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)))


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps at the terminal width (80 without one): keep messages on one line."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def tiny(sweep_store: Callable[[str], SweepStore]) -> SweepStore:
    """The tiny spec's store, run once with torch (read it, never write it)."""
    pytest.importorskip("torch")
    return sweep_store("torch")


@contextlib.contextmanager
def process_group(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A subprocess in a session of its own, whose whole group is killed on exit."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "1000", **(env or {})},
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
