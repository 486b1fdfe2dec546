"""``mfdsl run`` end to end: determinism, resume after a kill, refusals, divergence,
failure, the store against training by hand; and the CLI's exit codes."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY_SPEC,
    SweepStore,
    assert_same_data,
    cell_files,
    open_store,
    process_group,
    run_cli,
    run_sweep,
)

import mfdsl
from mfdsl.plan.compile import compile_point
from mfdsl.store.zarr import read_status

#: the tests that train (every ``mfdsl run``); the CLI's other commands need no torch
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")

EXAMPLES = sorted((ROOT / "specs").glob("*.mf"))


pytestmark = pytest.mark.usefixtures("wide_console")


def spec_file(folder: Path, text: str, name: str = "spec.mf") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(store: Path) -> dict[str, int]:
    """Every file of a store with its modification time (ns)."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- determinism and --overwrite -------------------------------------------------------


@pytest.fixture(scope="module")
def second_run(
    sweep_store: Callable[[str], SweepStore], tmp_path_factory: pytest.TempPathFactory
) -> tuple[SweepStore, Path]:
    """The tiny spec run a second time, with --overwrite onto a copy of the first store
    that carries what a killed writer leaves in a store (a temporary chunk file of
    zarr's, mfdsl's write probe) and a stale log.  (A file mfdsl does not write makes
    --overwrite refuse: tests/test_hostile_store.py.)"""
    pytest.importorskip("torch")
    first = sweep_store("torch")
    folder = tmp_path_factory.mktemp("second")
    store = folder / "tiny.zarr"
    shutil.copytree(first.store, store)
    (store / "test_loss" / "c" / "0" / "0" / "0" / f"0.{'ab' * 16}.partial").write_bytes(b"cut off")
    (store / ".mfdsl-write-test-12345").write_text("", encoding="utf-8")
    Path(f"{store}.log").write_text(
        "# mfdsl run, 2024-01-01 00:00:00\ntorch:width=8: failed: an old failure\n", encoding="utf-8"
    )
    result = run_sweep(first.spec, store, "--overwrite")
    assert result.code == 0, result.out + result.err
    return first, store


def test_same_spec_twice_gives_bitwise_identical_data(second_run: tuple[SweepStore, Path]) -> None:
    first, store = second_run
    with open_store(first.store) as a, open_store(store) as b:
        assert_same_data(a, b)
        assert (b["status"] == 1).all()


def test_overwrite_replaces_the_store(second_run: tuple[SweepStore, Path]) -> None:
    _, store = second_run
    assert not (store / ".mfdsl-write-test-12345").exists()
    assert not list(store.rglob("*.partial"))
    assert not Path(f"{store}.log").exists()  # the replaced store's log went with it
    with open_store(store) as ds:
        assert "finalized" in ds.attrs


# ---- refusals ------------------------------------------------------------------------


def test_existing_store_is_refused(tiny: SweepStore) -> None:
    before = snapshot(tiny.store)
    result = run_sweep(tiny.spec, tiny.store)
    assert result.code == 2
    assert "already exists" in one_line(result.err)
    assert "--resume" in result.err and "--overwrite" in result.err
    assert snapshot(tiny.store) == before


def test_resume_with_a_different_spec_is_refused(tiny: SweepStore) -> None:
    before = snapshot(tiny.store)
    result = run_sweep(tiny.spec, tiny.store, "--resume", "--set", "train.steps=30")
    assert result.code == 2
    assert "differs" in one_line(result.err)
    assert "steps" in result.err  # the diff shows what changed
    assert snapshot(tiny.store) == before


def test_resume_of_a_finished_store_runs_nothing(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    chunks = {k: v for k, v in snapshot(store).items() if "/c/" in k}
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.err
    assert re.search(r"\b8 runs already finished, 0 to go", one_line(result.out)), result.out
    assert {k: v for k, v in snapshot(store).items() if "/c/" in k} == chunks


def restamp(store: Path, name: str, value: object) -> None:
    """Set (``None``: delete) a root attribute of ``store``, metadata consolidated again."""
    import zarr

    from mfdsl.store.zarr import _quiet_consolidation

    group = zarr.open_group(store, mode="r+")
    if value is None:
        del group.attrs[name]
    else:
        group.attrs[name] = value
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(store))


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        (
            None,
            "it was written by an older mfdsl, whose random streams differ (it records no 'stream_layout';",
        ),
        ("older", "it was written by an older mfdsl, whose random streams differ (random-stream layout"),
        ("newer", "it was written by a newer mfdsl, whose random streams differ (random-stream layout"),
    ],
)
def test_resume_refuses_a_store_of_other_random_streams(
    tiny: SweepStore, tmp_path: Path, layout: str | None, words: str
) -> None:
    """Runs added to a store whose finished runs drew other random streams would not be
    the runs of its spec: ``--resume`` refuses before touching it, and says what to do."""
    from mfdsl.core.streams import STREAM_LAYOUT

    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    # layout 1 moved every draw (layout 2 only torch's Langevin noise, which tiny does not draw)
    number = {None: None, "older": 1, "newer": STREAM_LAYOUT + 1}[layout]
    restamp(store, "stream_layout", number)
    (store / "status" / "c" / "0" / "0" / "0").unlink()  # a pending run it would otherwise run
    before = snapshot(store)
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 2, result.out + result.err
    text = one_line(result.err)
    assert f"error: cannot resume {store}: {words}" in text
    assert "so runs added now would not draw the random numbers its finished runs drew" in text
    assert "a new store (-o NEW.zarr), or replace this one (--overwrite)" in text
    assert ("Upgrade mfdsl to resume it" in text) == (layout == "newer")
    assert "Traceback" not in result.err and result.out == ""
    assert snapshot(store) == before


def test_resume_takes_a_layout_2_store_whose_draws_did_not_move(tiny: SweepStore, tmp_path: Path) -> None:
    """Layout 3 moved only the torch backend's Langevin noise: a layout-2 store of a
    spec without it resumes (its runs draw what they drew), and the finished runs stay
    bit for bit; a spec with it would not."""
    from mfdsl.core.streams import same_draws
    from mfdsl.store.verify import stream_layout_mismatch

    assert same_draws(2, torch_noise=False) and not same_draws(2, torch_noise=True)
    assert not same_draws(1, torch_noise=False)
    assert stream_layout_mismatch({"stream_layout": 2}, torch_noise=False) is None
    assert "random-stream layout 2" in str(stream_layout_mismatch({"stream_layout": 2}, torch_noise=True))
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    restamp(store, "stream_layout", 2)
    (store / "status" / "c" / "0" / "0" / "0").unlink()
    import xarray as xr

    kept = xr.open_zarr(store)["train_loss"].values.copy()
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert "1 to go" in result.out
    # the pending run, trained again, draws what it drew: the whole array is as it was
    np.testing.assert_array_equal(xr.open_zarr(store)["train_loss"].values, kept)


@pytest.mark.parametrize("overwrite", [False, True])
def test_new_stores_record_the_stream_layout(tiny: SweepStore, tmp_path: Path, overwrite: bool) -> None:
    from mfdsl.core.streams import STREAM_LAYOUT

    store = tmp_path / "tiny.zarr"
    if overwrite:  # --overwrite replaces a store of other streams with one of this mfdsl's
        shutil.copytree(tiny.store, store)
        restamp(store, "stream_layout", None)
        assert run_sweep(tiny.spec, store, "--overwrite").code == 0
    with open_store(store if overwrite else tiny.store) as ds:
        assert ds.attrs["stream_layout"] == STREAM_LAYOUT


def test_a_limit_backend_cannot_join_a_store_without_limit_cells(tiny: SweepStore, tmp_path: Path) -> None:
    """The tiny store was made for torch alone (its spec names no other backend): it has
    no width = inf cells for the jax backend's runs."""
    pytest.importorskip("jax")
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    before = snapshot(store)
    result = run_sweep(tiny.spec, store, "--backend", "jax", "--resume")
    assert result.code == 2, result.out + result.err
    text = one_line(result.err)
    assert (
        f"error: cannot resume {store}: it has no width = inf cells for the limit runs of 'jax' "
        "(it was made without a limit backend)" in text
    )
    assert "new store (-o NEW.zarr), or replace this one (--overwrite)" in text
    assert "Traceback" not in result.err
    assert snapshot(store) == before


def test_the_resume_command_repeats_every_option(tmp_path: Path) -> None:
    """What the hints after Ctrl-C and storage errors print: pasted into a shell, it is the
    same ``mfdsl run`` with ``--resume``, whatever its words hold."""
    import shlex

    from mfdsl.cli import build_parser
    from mfdsl.execution.runner import resume_command

    argv = [
        "run",
        "my specs/it's.mf",
        "-o",
        "/data/runs $HOME/x.zarr",
        "--set",
        "sweep.width=[50, 100]",
        "--set",
        'data.root="/a b"',
        "--backend",
        "torch",
        "--backend",
        "jax",
        "--workers",
        "3",
        "--scheduler",
        "tcp://host:8786",
        "--diverge-above",
        "1234567.5",  # repeated exactly: --resume refuses another threshold
    ]
    args = build_parser().parse_args(argv)
    spec = mfdsl.parse(TINY_SPEC.format(backend="torch"))
    command = resume_command(args, spec)
    words = shlex.split(command)
    assert words == ["mfdsl", *argv, "--resume"]
    assert build_parser().parse_args(words[1:]).resume
    # no options: the spec and the store, nothing else
    plain = build_parser().parse_args(["run", "spec.mf", "-o", "runs/x.zarr"])
    assert resume_command(plain, spec) == "mfdsl run spec.mf -o runs/x.zarr --resume"


# ---- resume after a kill ---------------------------------------------------------------

# ``mfdsl run`` that SIGKILLs its whole process group (driver, workers) the moment the
# first run of the sweep has finished: a kill at a known point, with runs in flight.
KILLED_RUN = """\
import concurrent.futures as cf
import os
import signal
import sys

from mfdsl.cli import main

_as_completed = cf.as_completed


def as_completed(*args, **kwargs):
    for future in _as_completed(*args, **kwargs):
        os.killpg(0, signal.SIGKILL)
        yield future


if __name__ == "__main__":
    cf.as_completed = as_completed
    sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_gives_the_uninterrupted_store(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    script = spec_file(tmp_path, KILLED_RUN, "killed_run.py")
    args = [sys.executable, str(script), "run", str(tiny.spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out + err

    status = read_status(store)
    done = [tuple(int(i) for i in idx) for idx in np.argwhere(status == 1)]
    assert done, "the first run should have finished before the kill"
    assert np.all((status == 0) | (status == 1))
    assert (status == 0).any(), "the kill should leave runs pending"
    with open_store(store) as ds:
        assert "finalized" not in ds.attrs
    before = {cell: cell_files(store, cell) for cell in done}
    assert all(before.values())

    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    runs = "run" if len(done) == 1 else "runs"
    assert f"resuming: {len(done)} {runs} already finished" in one_line(result.out)
    # finished runs were not written again
    assert {cell: cell_files(store, cell) for cell in done} == before
    with open_store(store) as resumed, open_store(tiny.store) as whole:
        assert_same_data(resumed, whole)
        assert "finalized" in resumed.attrs


# ---- divergence and failure ------------------------------------------------------------

# ``p`` also sweeps the number of probe inputs: the store's ``probe`` dimension is the
# largest, a run with fewer probes reads NaN beyond its own.
DIVERGING = """\
experiment diverging
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 2, activation = tanh }
train { optimizer = sgd(lr = lr), loss = mse, batch = 4, steps = 40 }
record every 10 { train_loss, test_loss, output(probes = p) }
sweep { width = [8, 16], lr = [0.05, 1e6], p = [2, 3] }
"""


@needs_torch
def test_diverged_runs_are_results(tmp_path: Path) -> None:
    store = tmp_path / "diverging.zarr"
    result = run_sweep(spec_file(tmp_path, DIVERGING), store)
    assert result.code == 0, result.out + result.err
    assert "4 runs diverged" in one_line(result.out)
    with open_store(store) as ds:
        status = ds["status"]
        assert (status.sel(lr=0.05) == 1).all()
        assert (status.sel(lr=1e6) == 3).all()
        for message in ds["message"].sel(lr=1e6).values.ravel():
            assert "diverged" in str(message)
        # time follows each run's learning rate, over (lr, step) only
        assert ds["time"].dims == ("lr", "step")
        np.testing.assert_array_equal(ds["time"].values, np.outer([0.05, 1e6], ds["step"].values))
        done = ds.sel(lr=0.05)
        for name in ("train_loss", "test_loss"):
            assert np.isfinite(done[name].values).all(), name
        assert ds["probe"].values.tolist() == [0, 1, 2]
        assert np.isfinite(done["output"].sel(p=3).values).all()
        assert np.isfinite(done["output"].sel(p=2, probe=[0, 1]).values).all()
        assert np.isnan(ds["output"].sel(p=2, probe=2).values).all()
        bad = ds.sel(lr=1e6, probe=[0, 1])
        for name in ("train_loss", "test_loss", "output"):
            values = bad[name].transpose("step", ...).values
            values = values.reshape(values.shape[0], -1)  # step × (runs, probes)
            nan = np.isnan(values)
            assert np.isfinite(values[0]).all(), name  # recorded before diverging
            assert nan[-1].all(), name  # NaN after
            # once NaN, NaN for good
            assert (np.diff(nan.astype(int), axis=0) >= 0).all(), name
    assert "diverged" in Path(f"{store}.log").read_text(encoding="utf-8")


FAILING = """\
experiment failing
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 1, activation = tanh }
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 4, steps = 10 }
record every 5 { train_loss, test_accuracy }
sweep { width = [8, 16], seed = [0, 1] }
"""

# ``mfdsl run`` whose backend raises in every run (``mfdsl run`` checks the spec and its
# data before the sweep, so a spec alone cannot make runs fail once they have started).
# Spawned workers run this file's top level too, so the patch reaches them.
FAILING_BACKEND = """\
import sys

import mfdsl.execution.worker as worker

_get_backend = worker.get_backend


class Failing:
    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name not in ("run", "run_group"):
            return attr

        def call(*args, **kwargs):
            raise OSError("the data server went away")

        return call


worker.get_backend = lambda name: Failing(_get_backend(name))

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


@needs_torch
def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    store = tmp_path / "failing.zarr"
    runner = spec_file(tmp_path, FAILING_BACKEND, "failing_backend.py")
    spec = spec_file(tmp_path, FAILING)
    args = [sys.executable, str(runner), "run", str(spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "4 runs failed" in one_line(err)
    assert "Traceback" not in err  # the tracebacks are in the store, not on the terminal
    log = Path(f"{store}.log").read_text(encoding="utf-8")
    assert log.count(": failed: ") == 4  # every run was tried: one failure did not stop the sweep
    with open_store(store) as ds:
        assert (ds["status"] == 2).all()  # failed, none left pending
        assert np.isnan(ds["train_loss"].values).all()
        for width in (8.0, 16.0):
            for seed in (0, 1):
                message = str(ds["message"].sel(width=width, seed=seed).values)
                assert "Traceback" in message  # the whole traceback is kept
                entry = f"torch:width={width:g},seed={seed}: failed: "
                assert log.count(entry) == 1
                error = log[log.index(entry) + len(entry) :].splitlines()[0]  # "ErrorType: what went wrong"
                kind, _, text = error.partition(": ")
                assert (kind, text) == ("OSError", "the data server went away"), error
                assert kind in message and text in message
    assert run_cli("verify", store).code == 0  # failed runs with their messages are no problem


@needs_torch
def test_default_probes_fit_a_small_test_set() -> None:
    """``output`` and ``neuron_spread`` probe the first test points: 16 by default, or
    all of a smaller test set (asking the engine for more would fail every run)."""
    text = TINY_SPEC.format(backend="torch").replace("test = 64", "test = 8")
    text = text.replace("output(probes = 3)", "output").replace("particles(sample = 5)", "particles")
    point = next(mfdsl.expand(mfdsl.parse(text)))
    plan = compile_point(point.spec, dict(point.coords), "torch")
    probes = {o.name: o.probes for o in plan.observables if o.name in ("output", "neuron_spread")}
    assert probes == {"output": 8, "neuron_spread": 8}
    result = mfdsl.get_backend("torch").run(plan)
    assert result["status"] == "done"
    assert result["records"]["output"].shape == (len(plan.record_steps), 8)


@needs_torch
def test_a_run_whose_records_cannot_be_written_is_failed(tmp_path: Path) -> None:
    """An error while writing a run's cell is that run's failure (traceback kept), not a
    dead worker."""
    from mfdsl.execution.worker import execute
    from mfdsl.plan.layout import plan_tasks
    from mfdsl.store.zarr import create_store

    spec = mfdsl.parse(TINY_SPEC.format(backend="torch"))
    layout, tasks = plan_tasks(spec, mfdsl.check_all(spec)[:1], [mfdsl.get_backend("torch")])
    store = tmp_path / "lacks-particles.zarr"
    create_store(
        store,
        sweep=layout.sweep,
        steps=layout.steps,
        time=layout.time,
        variables=[v for v in layout.variables if v.name != "particles"],
        extra_coords={k: v for k, v in layout.extra.items() if k not in ("particle", "component")},
    )
    key, status, message = execute(tasks[0], str(store), [1, 2, 3])
    assert (key, status) == (tasks[0].key, "failed")
    assert "particles" in message
    with open_store(store) as ds:
        cell = ds.isel(width=0, seed=0, act=0)
        assert int(cell["status"]) == 2
        assert "Traceback" in str(cell["message"].values)


# ---- the store holds what training by hand gives -----------------------------------------


def test_store_equals_training_by_hand(tiny: SweepStore) -> None:
    from mfdsl_torch._single import train

    from mfdsl.data.make import make_dataset

    spec = mfdsl.load(tiny.spec)
    with open_store(tiny.store) as ds:
        for point in mfdsl.expand(spec):
            plan = compile_point(point.spec, dict(point.coords), "torch")
            result = train(
                plan,
                make_dataset(plan.data, plan.seed),
                device=plan.options["device"],
                dtype=plan.options["dtype"],
            )
            assert result.status == "done"
            cell = ds.isel(dict(zip(["width", "seed", "act"], point.index, strict=True)))
            assert int(cell["status"]) == 1
            assert str(cell["message"].values) == result.message
            for obs in plan.observables:
                stored = cell[obs.name].sel(step=plan.record_steps)
                if obs.name in ("neuron_spread", "weight_change"):
                    stored = stored.sel(layer=list(obs.layers))
                mine = np.ascontiguousarray(result.records[obs.name], dtype=np.float64)
                assert stored.shape == mine.shape, obs.name
                assert np.ascontiguousarray(stored.values).tobytes() == mine.tobytes(), (
                    point.coords,
                    obs.name,
                )


# ---- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_the_examples(spec: Path) -> None:
    result = run_cli("check", spec)
    assert result.code == 0, result.err


def test_check_rejects_a_bad_spec_with_its_location(tmp_path: Path) -> None:
    bad = spec_file(
        tmp_path, TINY_SPEC.format(backend="torch").replace("activation = act", "activation = relux")
    )
    result = run_cli("check", bad)
    assert result.code == 2
    assert re.search(rf"{re.escape(str(bad))}:\d+:\d+", result.err), result.err
    assert "relux" in result.err


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.name)
def test_show_prints_yaml_that_loads_back_equal(spec: Path, tmp_path: Path) -> None:
    result = run_cli("show", spec)
    assert result.code == 0, result.err
    as_yaml = spec_file(tmp_path, result.out, "spec.yaml")
    again = mfdsl.load(as_yaml)
    assert mfdsl.to_dict(again) == mfdsl.to_dict(mfdsl.load(spec))
    assert mfdsl.to_yaml(again) == result.out


@pytest.mark.skipif(
    importlib.util.find_spec("mfdsl.language.fmt") is None, reason="mfdsl.language.fmt not written yet"
)
def test_fmt_check(tmp_path: Path) -> None:
    for spec in EXAMPLES:
        assert run_cli("fmt", "--check", spec).code == 0, spec
    messy = spec_file(
        tmp_path, re.sub(r"[ \t]+", "  ", (ROOT / "specs" / "quickstart.mf").read_text()) + "\n\n"
    )
    source = messy.read_text(encoding="utf-8")
    formatted = run_cli("fmt", messy)
    assert formatted.code == 0 and formatted.out != source
    assert run_cli("fmt", "--check", messy).code == 1
    assert messy.read_text(encoding="utf-8") == source  # --check changes nothing
    tidy = spec_file(tmp_path, formatted.out, "tidy.mf")
    assert run_cli("fmt", "--check", tidy).code == 0


def commands() -> list[str]:
    """Every subcommand the parser knows."""
    from mfdsl.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


@pytest.mark.parametrize("command", [[], *([c] for c in commands())], ids=lambda c: " ".join(c) or "mfdsl")
def test_help_exits_0(command: list[str]) -> None:
    assert {"check", "show", "fmt", "run"} <= set(commands())
    result = run_cli(*command, "--help")
    assert result.code == 0
    assert "usage:" in result.out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["run"],
        ["check"],
        ["run", "specs/quickstart.mf", "--resume", "--overwrite"],
        ["run", "specs/quickstart.mf", "--workers", "many"],
        ["fmt", "--check", "--write", "specs/quickstart.mf"],
        ["check", "specs/quickstart.mf", "--set", "no-equals-sign"],
        ["check", "/nonexistent/spec.mf"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_usage_errors_exit_2(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert run_cli(*args).code == 2


def test_python_m_mfdsl_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mfdsl", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mfdsl {mfdsl.__version__}"


def test_checkout_launcher_from_the_repo_root() -> None:
    proc = subprocess.run(
        [sys.executable, "cli.py", "check", "specs/quickstart.mf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
