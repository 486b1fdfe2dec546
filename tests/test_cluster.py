"""``mfdsl run --scheduler``: the sweep as tasks of a Dask cluster, equal to the local
run bit for bit; the cluster's refusals (no Dask, no scheduler, no GPU worker); a
scheduler that dies mid-sweep (the log, the exit code and the store agree)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SweepStore, assert_same_data, open_store, run_cli

from mfdsl.execution import cluster as _cluster

pytest.importorskip("torch")

#: the tests that need Dask's distributed scheduler (the 'dask' extra; 'dev' has it)
needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="needs dask")


pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture(scope="module")
def threads_cluster() -> Iterator[str]:
    """A scheduler with one in-process worker thread, reached by its tcp:// address
    (cheap: no process to start, torch already imported)."""
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield str(cluster.scheduler_address)


def consolidated(store: Path) -> bool:
    root = json.loads((store / "zarr.json").read_text(encoding="utf-8"))
    return bool(root.get("consolidated_metadata"))


@needs_dask
def test_two_worker_local_cluster_matches_the_local_run(tiny: SweepStore, tmp_path: Path) -> None:
    """The issue's acceptance test: a LocalCluster of two worker processes (one thread
    each), the store given as a file:// URL; every value equal to the local pool's."""
    store = tmp_path / "dask.zarr"
    result = run_cli("run", tiny.spec, "-o", f"file://{store}", "--scheduler", "local", "--workers", "2")
    assert result.code == 0, result.out + result.err
    assert "on a local Dask cluster" in result.out
    assert "8/8" in result.out  # progress counted every run
    with open_store(store) as on_dask, open_store(tiny.store) as local:
        assert_same_data(on_dask, local)
        assert "finalized" in on_dask.attrs
    assert consolidated(store)
    assert not Path(f"{store}.lock").exists()
    assert run_cli("verify", store).code == 0


@needs_dask
def test_existing_scheduler_by_address(tiny: SweepStore, tmp_path: Path, threads_cluster: str) -> None:
    store = tmp_path / "tcp.zarr"
    result = run_cli("run", tiny.spec, "-o", store, "--scheduler", threads_cluster)
    assert result.code == 0, result.out + result.err
    assert f"on the Dask cluster at {threads_cluster}" in result.out
    with open_store(store) as on_dask, open_store(tiny.store) as local:
        assert_same_data(on_dask, local)
    # --resume on a cluster: nothing left to do
    again = run_cli("run", tiny.spec, "-o", store, "--scheduler", threads_cluster, "--resume")
    assert again.code == 0, again.err
    assert "8 runs already finished, 0 to go" in again.out


@needs_dask
def test_cuda_tasks_need_a_gpu_worker(
    tiny: SweepStore, tmp_path: Path, threads_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster without a worker that has a GPU resource refuses cuda tasks.  The torch
    backend's preflight, which asks the driver's torch for a GPU, is told there is one:
    the point is the cluster's answer, whatever this machine has."""
    import mfdsl_torch

    monkeypatch.setattr(mfdsl_torch, "_cuda_problem", lambda device: None)
    store = tmp_path / "gpu.zarr"
    result = run_cli(
        "run", tiny.spec, "-o", store, "--scheduler", threads_cluster, "--set", "torch.device=cuda"
    )
    assert result.code == 2, result.out + result.err
    err = " ".join(result.err.split())
    assert "asks for a 'GPU' resource" in err and "--resources GPU=1" in err
    assert "--resume" in err  # the store made so far is kept for later
    assert not Path(f"{store}.lock").exists()


def test_tasks_ask_for_a_gpu_when_the_device_is_cuda() -> None:
    assert _cluster.needs_gpu({"device": "cuda"})
    assert _cluster.needs_gpu({"device": "cuda:1"})
    assert not _cluster.needs_gpu({"device": "cpu"})
    assert not _cluster.needs_gpu({})


@needs_dask
def test_scheduler_refusals(tiny: SweepStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "never.zarr"
    monkeypatch.setattr(_cluster, "CONNECT_TIMEOUT", "0.5s")
    cases = [
        (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "--workers sets the size of a local"),
        (["--scheduler", "localhost:8786"], "a scheduler's address, e.g. tcp://HOST:8786"),
        (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
    ]
    for extra, message in cases:
        result = run_cli("run", tiny.spec, "-o", store, *extra)
        assert result.code == 2, result.out + result.err
        assert message in " ".join(result.err.split())
        assert not store.exists()


def test_without_dask_the_scheduler_says_how_to_install_it(
    tiny: SweepStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    store = tmp_path / "never.zarr"
    result = run_cli("run", tiny.spec, "-o", store, "--scheduler", "local")
    assert result.code == 2
    assert "pip install 'mfdsl[dask]'" in result.err
    assert not store.exists()


@needs_dask
def test_a_dask_worker_killed_mid_task_is_replaced_and_its_task_run_again(
    tiny: SweepStore, tmp_path: Path
) -> None:
    """A worker process of a LocalCluster SIGKILLs itself at step 20 of a run (once):
    its nanny starts a new one, the scheduler hands the lost task out again, and the
    store is the uninterrupted run's, bit for bit."""
    from conftest import process_group
    from test_faults import KILLING_WORKER, assert_whole, script

    store = tmp_path / "tiny.zarr"
    mark = tmp_path / "killed"
    runner = script(tmp_path, "killing_worker.py", KILLING_WORKER)
    args = [sys.executable, str(runner), "run", str(tiny.spec), "-o", str(store)]
    args += ["--scheduler", "local", "--workers", "2"]
    with process_group(args, tmp_path, {"MFDSL_TEST_MARK": str(mark)}) as proc:
        out, err = proc.communicate(timeout=300)
    assert mark.exists(), "no worker was killed"
    assert proc.returncode == 0, out + err
    assert "8/8" in out
    assert_whole(store, tiny.store)


class _Held:
    """A backend whose runs wait for :data:`HELD` ``.release`` (after saying they started)."""

    def __init__(self, backend: object) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._backend, name)
        if name != "run_group":
            return attr

        def call(*args: object, **kwargs: object) -> object:
            HELD.started.set()
            HELD.release.wait(60)
            return attr(*args, **kwargs)

        return call


def _held_execute(*args: object, **kwargs: object) -> object:
    """``execute_group`` (a task of the cluster), its outcomes kept in :data:`HELD`."""
    outcomes = HELD.execute(*args, **kwargs)
    HELD.finished.extend(outcomes)
    return outcomes


class _HeldState:
    def __init__(self) -> None:
        import threading

        self.started, self.release = threading.Event(), threading.Event()
        self.finished: list[tuple[str, str, str]] = []
        self.execute: Any = None


HELD = _HeldState()


@needs_dask
def test_a_scheduler_that_dies_mid_sweep_leaves_log_exit_code_and_store_in_agreement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler goes away while every task runs (in-process workers, held back
    until the driver has given up): the driver reports each run as the store has it
    — all pending, so ``lost``, never failed — exits 1 with the command that resumes
    the sweep, and the workers, which survive their scheduler and finish their runs
    afterwards, write nothing: the fence they were given no longer holds."""
    import asyncio
    import threading

    from distributed import LocalCluster

    import mfdsl.execution.worker as worker
    from mfdsl.store.zarr import read_status

    spec = tmp_path / "pairs.mf"
    spec.write_text(
        "experiment pairs\n"
        "data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 16 }\n"
        "network mlp { hidden = 1, activation = relu, bias = true }\n"
        "train { optimizer = sgd(lr = 0.1), loss = mse, batch = 4, steps = 20 }\n"
        "record every 10 { train_loss }\n"
        "sweep { width = [8, 16], seed = [0] }\n"
        "backends torch\n",
        encoding="utf-8",
    )
    store = tmp_path / "pairs.zarr"
    HELD.__init__()  # type: ignore[misc]
    HELD.execute = worker.execute_group
    get_backend = worker.get_backend
    monkeypatch.setattr(worker, "get_backend", lambda name: _Held(get_backend(name)))
    monkeypatch.setattr(worker, "execute_group", _held_execute)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    try:

        def kill_scheduler() -> None:
            HELD.started.wait(60)
            future = asyncio.run_coroutine_threadsafe(cluster.scheduler.close(), cluster.loop.asyncio_loop)
            future.result(30)

        killer = threading.Thread(target=kill_scheduler, daemon=True)
        killer.start()
        result = run_cli("run", spec, "-o", store, "--scheduler", cluster.scheduler_address)
        killer.join(30)
        assert result.code == 1, result.out + result.err
        err = " ".join(result.err.split())
        assert "2 runs lost by the cluster and still pending in the store" in err
        assert "--resume" in err and "Traceback" not in err and "NoneType" not in err
        log = Path(f"{store}.log").read_text(encoding="utf-8")
        assert log.count(": lost: ") == 2 and ": failed: " not in log
        assert (read_status(store) == 0).all()
        HELD.release.set()  # the tasks that started finish their runs now, after the driver gave up
        deadline = time.monotonic() + 60
        while not HELD.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert HELD.finished and all(state == "lost" for _, state, _ in HELD.finished), HELD.finished
        assert (read_status(store) == 0).all()  # nothing written behind the log's back
        assert run_cli("verify", store).code == 0
    finally:
        HELD.release.set()
        with contextlib.suppress(Exception):
            cluster.close(timeout=5)
