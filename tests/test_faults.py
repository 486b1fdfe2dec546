"""Faults injected into ``mfdsl run``, each ending in the store an uninterrupted run
writes (bit for bit on CPU) or in a clear message before anything is trained: a worker
process killed mid-run, the driver killed, Ctrl-C, a chunk cut off mid-write, a
read-only or full target, two runs on one store; the driver killed while its pool starts
(no worker may outlive it), one run that kills its worker every time (it fails alone),
SIGTERM (handled as Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    SweepStore,
    assert_same_data,
    cell_files,
    open_store,
    process_group,
    run_cli,
    run_sweep,
)

from mfdsl.store import lock as _lock
from mfdsl.store.zarr import read_status

pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("wide_console")


def one_line(text: str) -> str:
    return " ".join(text.split())


def script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


def assert_whole(store: Path, reference: Path) -> None:
    with open_store(store) as got, open_store(reference) as whole:
        assert_same_data(got, whole)
        assert "finalized" in got.attrs
    assert run_cli("verify", store).code == 0


# ---- a worker process killed mid-run ------------------------------------------------------

# ``mfdsl run`` whose worker processes SIGKILL themselves at step 20 of a run, once
# (a marker file says it happened).  Spawned workers run this file's top level too, so
# the patch reaches them.
KILLING_WORKER = """\
import os
import signal
import sys

import mfdsl.execution.worker as worker

MARK = os.environ["MFDSL_TEST_MARK"]
_get_backend = worker.get_backend


class Killing:
    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name not in ("run", "run_group"):
            return attr

        def call(*args, progress=None, **kwargs):
            def report(*values):
                if values[-2] >= 20 and not os.path.exists(MARK):  # (..., step, loss)
                    open(MARK, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                if progress is not None:
                    progress(*values)

            return attr(*args, progress=report, **kwargs)

        return call


worker.get_backend = lambda name: Killing(_get_backend(name))

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_killed_mid_run_is_run_again(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    mark = tmp_path / "killed"
    runner = script(tmp_path, "killing_worker.py", KILLING_WORKER)
    args = [sys.executable, str(runner), "run", str(tiny.spec), "-o", str(store), "--workers", "2"]
    with process_group(args, tmp_path, {"MFDSL_TEST_MARK": str(mark)}) as proc:
        out, err = proc.communicate(timeout=300)
    assert mark.exists(), "no worker was killed"
    assert proc.returncode == 0, out + err
    assert "a worker process died" in one_line(out)
    assert_whole(store, tiny.store)


# ---- the driver killed ----------------------------------------------------------------------

# ``mfdsl run`` whose driver SIGKILLs itself (alone: its workers are orphaned) once the
# first unit of work has finished: the lock stays behind, owned by a dead pid.
KILLED_DRIVER = """\
import concurrent.futures as cf
import os
import signal
import sys

from mfdsl.cli import main

_as_completed = cf.as_completed


def as_completed(*args, **kwargs):
    for future in _as_completed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
        yield future


if __name__ == "__main__":
    cf.as_completed = as_completed
    sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_the_driver_was_killed(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    runner = script(tmp_path, "killed_driver.py", KILLED_DRIVER)
    args = [sys.executable, str(runner), "run", str(tiny.spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        # the orphaned workers leave by themselves, closing the pipes communicate reads
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, out + err
        deadline = time.monotonic() + 60
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline, "the dead driver's workers are still running"
            time.sleep(0.1)
        owner = json.loads(Path(f"{store}.lock").read_text(encoding="utf-8"))
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
        status = read_status(store)
        assert (status == 0).any(), "the kill should leave runs pending"

        result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert f"taking over the stale lock of pid {proc.pid}" in one_line(result.err)
    assert not Path(f"{store}.lock").exists()
    assert_whole(store, tiny.store)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- Ctrl-C ------------------------------------------------------------------------------------

# ``mfdsl run`` that gets Ctrl-C (SIGINT to its whole process group, as a terminal sends
# it) once the first unit of work has finished.
INTERRUPTED = """\
import concurrent.futures as cf
import os
import signal
import sys

from mfdsl.cli import main

_as_completed = cf.as_completed


def as_completed(*args, **kwargs):
    first = True
    for future in _as_completed(*args, **kwargs):
        if first:
            os.killpg(0, signal.SIGINT)
            first = False
        yield future


if __name__ == "__main__":
    cf.as_completed = as_completed
    sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_keeps_finished_runs_for_resume(tiny: SweepStore, tmp_path: Path) -> None:
    """After Ctrl-C, the hint repeats every option the run was given (a --set whose value
    needs quoting included): pasted, it resumes the same store to the whole sweep."""
    import shlex

    store = tmp_path / "tiny.zarr"
    runner = script(tmp_path, "interrupted.py", INTERRUPTED)
    options = ["-o", str(store), "--set", "sweep.act=[tanh, relu]", "--backend", "torch", "--workers", "1"]
    args = [sys.executable, str(runner), "run", str(tiny.spec), *options]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert not Path(f"{store}.lock").exists()  # released on the way out
    status = read_status(store)
    assert np.all((status == 0) | (status == 1)) and (status == 0).any()
    (hint,) = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    prefix = "interrupted: finished runs are kept; finish with "
    assert hint.startswith(prefix), hint
    command = hint[len(prefix) :]
    assert command == shlex.join(["mfdsl", "run", str(tiny.spec), *options, "--resume"])
    words = shlex.split(command)
    assert words[:2] == ["mfdsl", "run"]
    result = run_cli(*words[1:])  # what the shell would run
    assert result.code == 0, result.out + result.err
    assert "resuming:" in result.out
    assert_whole(store, tiny.store)


# ---- a write cut off mid-chunk -------------------------------------------------------------------


def chunk_of(store: Path, variable: str, cell: tuple[int, ...]) -> Path:
    (path,) = [store / name for name in cell_files(store, cell) if name.startswith(f"{variable}/")]
    return path


def test_a_chunk_cut_off_mid_write_is_run_again(tiny: SweepStore, tmp_path: Path) -> None:
    """A done cell whose data chunk was cut short (a crash of the machine before the
    file reached the disk, a full disk on a store that does not write atomically) and
    a cell whose status chunk was: ``verify`` names both, ``--resume`` runs both again."""
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    data = chunk_of(store, "test_loss", (0, 1, 1))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    status = store / "status" / "c" / "1" / "0" / "1"
    status.write_bytes(status.read_bytes()[:-3])
    untouched = cell_files(store, (1, 1, 0))

    check = run_cli("verify", store)
    assert check.code == 1
    text = one_line(check.out)
    assert "cell width=8, seed=1, act=relu: test_loss: chunk unreadable" in text
    assert "cell width=16, seed=0, act=relu: status unreadable" in text

    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert "2 finished runs do not read back intact and run again" in one_line(result.err)
    assert "6 runs already finished, 2 to go" in one_line(result.out)
    assert cell_files(store, (1, 1, 0)) == untouched  # the intact cells were not rewritten
    assert_whole(store, tiny.store)


def test_a_writer_stopped_between_data_and_status(tiny: SweepStore, tmp_path: Path) -> None:
    """Data written, status not (the writer died in between): the cell is pending, so
    ``verify`` calls it out and ``--resume`` runs it."""
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    (store / "status" / "c" / "0" / "0" / "0").unlink()  # pending again, its data kept
    check = run_cli("verify", store)
    assert check.code == 1
    assert "cell width=8, seed=0, act=tanh: pending, but holds data" in one_line(check.out)
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert "7 runs already finished, 1 to go" in one_line(result.out)
    assert_whole(store, tiny.store)


# ---- a read-only or full target ----------------------------------------------------------------


def test_a_full_disk_is_refused_before_training(
    tiny: SweepStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    store = tmp_path / "full.zarr"
    result = run_sweep(tiny.spec, store)
    assert result.code == 2, result.out + result.err
    err = one_line(result.err)
    assert "not enough space for" in err and "19.5 KiB are free" in err
    assert not store.exists() and not Path(f"{store}.lock").exists()


def _namespaces() -> bool:
    """Whether this machine lets a process mount a tmpfs in namespaces of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=16k none /mnt"], capture_output=True
    )
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or not _namespaces(), reason="needs user and mount namespaces (unshare)"
)


def in_tmpfs(folder: Path, options: str, command: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    """``command`` run with a tmpfs (``options``) mounted on ``folder``, in private
    user and mount namespaces: nothing is mounted outside the command."""
    mfdsl = f"{sys.executable} -m mfdsl"
    line = f"mount -t tmpfs -o {options} none {folder} && {setup} {command.replace('mfdsl ', mfdsl + ' ')}"
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-c", line],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "1000"},
    )


@needs_namespaces
def test_a_read_only_target_is_refused_before_training(tiny: SweepStore, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    proc = in_tmpfs(target, "ro,size=1m", f"mfdsl run {tiny.spec} -o {target}/x.zarr")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot write to {target}: it is on a read-only file system" in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@needs_namespaces
def test_resume_on_a_read_only_store_is_refused(tiny: SweepStore, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    copy = f"cp -r {tiny.store} {target}/x.zarr && mount -o remount,ro {target} &&"
    proc = in_tmpfs(target, "size=4m", f"mfdsl run {tiny.spec} -o {target}/x.zarr --resume", setup=copy)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "read-only file system" in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@needs_namespaces
def test_a_full_file_system_is_refused_before_training(tiny: SweepStore, tmp_path: Path) -> None:
    target = tmp_path / "small"
    target.mkdir()
    proc = in_tmpfs(target, "size=64k", f"mfdsl run {tiny.spec} -o {target}/x.zarr && ls {target}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not enough space for" in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr


# ``mfdsl run`` whose disk fills up after two runs are written: from the third on,
# every cell write (in whichever worker process) fails with ENOSPC.
FILLING_DISK = """\
import errno
import os
import sys

import mfdsl.store.zarr as store_module

COUNT = os.environ["MFDSL_TEST_COUNT"]
_write_run = store_module.write_run


def write_run(*args, **kwargs):
    with open(COUNT, "a") as f:
        f.write("x")
    with open(COUNT) as f:
        if len(f.read()) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
    return _write_run(*args, **kwargs)


store_module.write_run = write_run

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_that_fills_up_mid_run_stops_the_sweep_and_keeps_what_is_written(
    tiny: SweepStore, tmp_path: Path
) -> None:
    store = tmp_path / "tiny.zarr"
    runner = script(tmp_path, "filling_disk.py", FILLING_DISK)
    args = [sys.executable, str(runner), "run", str(tiny.spec), "-o", str(store), "--workers", "2"]
    with process_group(args, tmp_path, {"MFDSL_TEST_COUNT": str(tmp_path / "count")}) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    message = one_line(err)
    assert f"cannot write to {store}: the disk is full" in message
    assert "Finished runs are kept" in message and "--resume" in message
    assert "Traceback" not in err
    assert not Path(f"{store}.lock").exists()
    status = read_status(store)
    assert (status == 1).sum() >= 1, "the runs written before the disk filled up are kept"
    assert (status != 1).any()
    # space freed: the resume finishes the sweep as one uninterrupted run would
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert_whole(store, tiny.store)


# ---- two runs on one store --------------------------------------------------------------------


def test_a_second_run_on_the_same_store_is_refused(tiny: SweepStore, tmp_path: Path) -> None:
    """A real ``mfdsl run`` in another process holds the lock; a second one refuses
    with its pid and host, and touches nothing."""
    slow = tmp_path / "slow.mf"
    slow.write_text(tiny.spec.read_text(encoding="utf-8").replace("steps     = 40", "steps     = 100000"))
    store = tmp_path / "slow.zarr"
    lock = Path(f"{store}.lock")
    args = [sys.executable, "-m", "mfdsl", "run", str(slow), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.stat().st_size) and proc.poll() is None:
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        result = run_sweep(slow, store, "--resume")
        assert result.code == 2, result.out + result.err
        err = one_line(result.err)
        assert f"is being written by another mfdsl run: pid {proc.pid} on host {socket.gethostname()}" in err
        assert f"delete {lock}" in err
        assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == proc.pid  # still the first's


def test_lock_file_rules(tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    path = Path(f"{store}.lock")
    warnings: list[str] = []

    held = _lock.acquire(store, warnings.append)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(_lock.StoreLocked, match=f"pid {os.getpid()} on host"):
        _lock.acquire(store, warnings.append)  # a live owner, even this very process
    held.release()
    assert not path.exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    taken = _lock.acquire(store, warnings.append)
    assert warnings == [
        f"taking over the stale lock of pid {dead.pid} on host {socket.gethostname()} (since then), which is no longer running"
    ]
    taken.release()

    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(_lock.StoreLocked, match=r"pid 1 on host elsewhere\.example"):
        _lock.acquire(store, warnings.append)  # another host's: cannot be checked, so obeyed
    path.write_text("")
    with pytest.raises(_lock.StoreLocked, match="cannot be read"):
        _lock.acquire(store, warnings.append)

    # a lock someone else took over meanwhile is not removed by its former owner
    path.unlink()
    mine = _lock.acquire(store, warnings.append)
    path.write_text(json.dumps({"pid": os.getpid(), "host": "other", "started": "now"}))
    mine.release()
    assert path.exists()


# ---- the driver killed while its pool starts ------------------------------------------------------

# ``mfdsl run`` that SIGKILLs its driver (alone) ``MFDSL_TEST_KILL_AFTER`` seconds after
# its pool spawned a worker: the worker may still be importing, before its initializer
# has run — the window in which a worker that read its parent's pid itself would find
# init, watch it forever and outlive the driver.
KILLED_AT_START = """\
import concurrent.futures.process as process
import os
import signal
import sys
import threading

DELAY = float(os.environ["MFDSL_TEST_KILL_AFTER"])
_spawn = process.ProcessPoolExecutor._spawn_process


def spawn(self):
    _spawn(self)
    threading.Timer(DELAY, os.kill, (os.getpid(), signal.SIGKILL)).start()


if __name__ == "__main__":
    process.ProcessPoolExecutor._spawn_process = spawn
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""

LONG = """\
experiment long
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 16 }
network mlp { hidden = 1, activation = relu, bias = true }
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 4, steps = 1000000 }
record every 500000 { train_loss }
sweep { width = [8, 16], seed = [0] }
backends torch
"""


def test_workers_die_with_a_driver_killed_while_its_pool_starts(tmp_path: Path) -> None:
    """Five drivers (at once, to keep the test short), each SIGKILLed at another small
    delay after its pool spawned its workers: within seconds no process of theirs is
    left (each runs in a session of its own: its process group holds its workers)."""
    spec = script(tmp_path, "long.mf", LONG)
    runner = script(tmp_path, "killed_at_start.py", KILLED_AT_START)
    procs = []
    for i, delay in enumerate([0.0, 0.05, 0.2, 0.5, 1.0]):
        args = [
            sys.executable,
            str(runner),
            "run",
            str(spec),
            "-o",
            str(tmp_path / f"{i}.zarr"),
            "--workers",
            "2",
        ]
        env = {**os.environ, "MFDSL_TEST_KILL_AFTER": str(delay)}
        procs.append(
            subprocess.Popen(
                args,
                cwd=tmp_path,
                start_new_session=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for proc in procs:
            assert proc.wait(timeout=120) == -signal.SIGKILL
        deadline = time.monotonic() + 45  # a worker still importing leaves once it is done
        while any(_group_members(p.pid) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [members for members in (_group_members(p.pid) for p in procs) if members]
        assert not left, f"workers outlived their driver: {left}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _group_members(pgid: int) -> list[str]:
    """The command lines of the live processes of a process group (/proc scan; a
    zombie, dead but not yet reaped, is not live)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


# ---- one bad run does not fail the sweep -----------------------------------------------------------

# ``mfdsl run`` whose worker SIGKILLs itself at step 20 of one run (width 16, seed 0),
# every time that run trains: it is run again until its third death, then failed.
KILLED_BY_ONE_RUN = """\
import os
import signal
import sys

import mfdsl.execution.worker as worker

_get_backend = worker.get_backend


class Killing:
    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name != "run_group":
            return attr

        def call(plans, progress=None, **kwargs):
            bad = [i for i, p in enumerate(plans) if p.coords["width"] == 16 and p.coords["seed"] == 0]

            def report(i, step, loss):
                if i in bad and step >= 20:
                    os.kill(os.getpid(), signal.SIGKILL)
                if progress is not None:
                    progress(i, step, loss)

            return attr(plans, progress=report, **kwargs)

        return call


worker.get_backend = lambda name: Killing(_get_backend(name))

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""

PAIRS = """\
experiment pairs
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 16 }
network mlp { hidden = 1, activation = relu, bias = true }
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 4, steps = 40 }
record every 20 { train_loss }
sweep { width = [8, 16], seed = 0..1 }
backends torch
"""


def test_a_run_that_kills_its_worker_fails_alone(tmp_path: Path) -> None:
    """The widest unit (width 16, seeds 0 and 1 as one ensemble) goes first; its worker
    dies three times over seed 0.  The first death is charged to both runs of the unit
    (both were running), which then run one by one: seed 1 finishes, seed 0 is failed
    after its third.  The width-8 unit, queued behind it each time, is never charged:
    it finishes.  (Charging every unit a broken pool lost failed all four.)"""
    spec = script(tmp_path, "pairs.mf", PAIRS)
    store = tmp_path / "pairs.zarr"
    runner = script(tmp_path, "killed_by_one_run.py", KILLED_BY_ONE_RUN)
    args = [sys.executable, str(runner), "run", str(spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert one_line(out).count("a worker process died (killed by SIGKILL, out of memory?)") == 3
    assert "1 run failed" in one_line(err) and "Traceback" not in err
    with open_store(store) as ds:
        assert ds["status"].sel(width=16).values.tolist() == [2, 1]
        assert (ds["status"].sel(width=8) == 1).all()
        message = str(ds["message"].sel(width=16, seed=0).values)
        assert (
            message
            == "its worker process died while running it, 3 times (the last killed by SIGKILL, out of memory?)"
        )
    log = Path(f"{store}.log").read_text(encoding="utf-8")
    assert "torch:width=16,seed=0: failed: its worker process died while running it, 3 times" in log
    assert run_cli("verify", store).code == 0


def test_which_units_a_broken_pool_is_charged_to() -> None:
    """Slots of the units a broken pool lost -> the pid running each (0: not started)."""
    from types import SimpleNamespace

    from mfdsl.execution.local import _charged, _death

    dead = {101: SimpleNamespace(exitcode=-9), 102: SimpleNamespace(exitcode=-15)}
    started = [101, 102, 0]
    broken = [(0, 7), (1, 8), (2, 9)]  # (slot, unit)
    assert _charged(broken, started, dead) == {7: -9}  # not the worker the pool stopped, nor the queued
    stopped = {101: SimpleNamespace(exitcode=-15), 102: SimpleNamespace(exitcode=-15)}
    assert _charged(broken, started, stopped) == {7: -15, 8: -15}  # can't tell: those running
    assert _charged(broken, [0, 0, 0], dead) == {7: None, 8: None, 9: None}  # none started: all
    assert _death(-9) == "killed by SIGKILL, out of memory?"
    assert _death(3) == "exit code 3"


# ---- SIGTERM -------------------------------------------------------------------------------------

# ``mfdsl run`` whose process group gets SIGTERM (as a batch system ends a job) once the
# first unit of work has finished.
TERMINATED = INTERRUPTED.replace("signal.SIGINT", "signal.SIGTERM")


def test_sigterm_keeps_finished_runs_for_resume(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    runner = script(tmp_path, "terminated.py", TERMINATED)
    args = [sys.executable, str(runner), "run", str(tiny.spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err
    assert not Path(f"{store}.lock").exists()  # released on the way out
    status = read_status(store)
    assert np.all((status == 0) | (status == 1)) and (status == 1).any() and (status == 0).any()
    prefix = "terminated (SIGTERM): finished runs are kept; finish with "
    (hint,) = [line for line in err.splitlines() if line.startswith(prefix)]
    assert hint[len(prefix) :] == f"mfdsl run {tiny.spec} -o {store} --workers 1 --resume"
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert_whole(store, tiny.store)
