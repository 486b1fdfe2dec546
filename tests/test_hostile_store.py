"""Hostile targets and damaged stores: ``--overwrite`` deletes an mfdsl store and nothing
else; ``verify`` and ``--resume`` meet a half-made or damaged layout with a message or a
repair, never a traceback; coordinates carry checksums; the lock is keyed on the
resolved path and survives a damaged pid; a blown-up run is diverged, not done; a
Dask cluster's lost runs agree with the store (docs/store.md, *Guarantees*)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import (
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
from mfdsl.store import lock as _lock
from mfdsl.store.zarr import (
    NotRemovable,
    _quiet_consolidation,
    clean_partial,
    partial_path,
    read_status,
    removal_problem,
    remove_store,
    store_file,
)

pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("wide_console")

#: a spec that draws no warning and runs in a blink: refusals are told before any run
LIGHT = """\
experiment light
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 16 }
network mlp { hidden = 1, activation = relu, bias = true }
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 4, steps = 10 }
record every 5 { train_loss }
sweep { width = [8], seed = [0] }
backends torch
"""


def one_line(text: str) -> str:
    return " ".join(text.split())


def tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``root`` (links not followed): whether a folder, size, mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            info = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), info.st_size, info.st_mtime_ns)
    return out


def clean(result: Any) -> None:
    """No traceback anywhere in what a command printed."""
    assert "Traceback" not in result.out + result.err, result.out + result.err


@pytest.fixture
def light(tmp_path: Path) -> Path:
    spec = tmp_path / "light.mf"
    spec.write_text(LIGHT, encoding="utf-8")
    return spec


@pytest.fixture
def copy(tiny: SweepStore, tmp_path: Path) -> Path:
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    return store


# ---- --overwrite deletes an mfdsl store, nothing else ------------------------------------------


def _targets(
    tmp_path: Path, tiny: SweepStore, monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[Path, str]]:
    """Targets ``--overwrite`` must refuse, and the words of the refusal."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\section{years of work}", encoding="utf-8")
    plain = tmp_path / "results.txt"
    plain.write_text("keep me", encoding="utf-8")
    stray = tmp_path / "stray.zarr"
    shutil.copytree(tiny.store, stray)
    (stray / "notes.txt").write_text("my notes, inside the store", encoding="utf-8")
    inner_link = tmp_path / "linked.zarr"
    shutil.copytree(tiny.store, inner_link)
    (inner_link / "step" / "c" / "7").symlink_to(plain)
    link = tmp_path / "link.zarr"
    link.symlink_to(stray)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("step", np.arange(3.0))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("alias ll='ls -l'", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    here = tmp_path / "work"
    here.mkdir()
    (here / "data.csv").write_text("1,2\n", encoding="utf-8")
    monkeypatch.chdir(here)
    return {
        "a folder of files": (folder, "it has no zarr.json: it is not a zarr store"),
        "a regular file": (plain, "it is a file, not a store folder"),
        "a store holding another file": (stray, "holds a file mfdsl does not write in a store (notes.txt)"),
        "a store holding a link": (inner_link, "step/c/7 (a link)"),
        "a link to a store": (link, "it is a symbolic link"),
        "another program's zarr store": (foreign, "has no 'mfdsl_store_format' attribute"),
        "the home folder": (home, "it is your home folder"),
        "the current folder": (Path("."), "it is the current folder"),
        "a folder holding the current one": (tmp_path, "it holds the current folder"),
    }


def test_overwrite_refuses_whatever_is_not_an_mfdsl_store(
    tiny: SweepStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each target is refused with exit 2 before anything is created (not even a lock
    file beside it), and every file under the test's folder is as it was."""
    spec = tmp_path / "tiny.mf"
    shutil.copy(tiny.spec, spec)
    targets = _targets(tmp_path, tiny, monkeypatch)
    before = tree(tmp_path)
    for what, (target, words) in targets.items():
        result = run_cli("run", spec, "-o", target, "--overwrite", "--workers", "1")
        assert result.code == 2, (what, result.out, result.err)
        err = one_line(result.err)
        assert f"error: refusing to replace {target}: " in err and words in err, (what, err)
        assert "--overwrite replaces an mfdsl store and nothing else" in err
        clean(result)
        assert tree(tmp_path) == before, what
    # without --overwrite the same targets are refused too, as existing paths
    for what in ("a folder of files", "another program's zarr store"):
        result = run_cli("run", spec, "-o", targets[what][0], "--workers", "1")
        assert result.code == 2
        assert "already exists, and is no mfdsl store" in one_line(result.err), what
        clean(result)
    assert tree(tmp_path) == before


def test_what_mfdsl_may_delete(tiny: SweepStore, tmp_path: Path) -> None:
    """The rule behind every deletion (:func:`mfdsl.store.zarr.removal_problem`)."""
    assert store_file(["zarr.json"]) and store_file(["test_loss", "zarr.json"])
    assert store_file(["test_loss", "c", "0", "1", "12"])
    assert store_file(["test_loss", "c", "0", f"3.{'0f' * 16}.partial"])  # zarr's atomic write
    assert store_file([".mfdsl-write-test-42"])
    for parts in (["notes.txt"], ["test_loss", "notes"], ["test_loss", "c", "x"], ["a", "b", "0"]):
        assert not store_file(parts), parts

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny.store, store)
    assert removal_problem(str(store)) is None
    (store / "status" / "zarr.json").write_text("{", encoding="utf-8")  # damaged, still mfdsl's
    assert removal_problem(str(store)) is None
    (store / "zarr.json").write_text("{", encoding="utf-8")  # its marker no longer reads
    assert "cannot be read" in str(removal_problem(str(store)))
    with pytest.raises(NotRemovable, match="cannot be told to be an mfdsl store"):
        remove_store(store)
    assert store.exists()
    # a skeleton being made has no marker yet: removable only as such (marker=False)
    skeleton = tmp_path / "skeleton"
    (skeleton / "width" / "c").mkdir(parents=True)
    (skeleton / "zarr.json").write_text("{}", encoding="utf-8")
    (skeleton / "width" / "c" / "0").write_bytes(b"x")
    assert removal_problem(str(skeleton)) is not None
    remove_store(skeleton, marker=False)
    assert not skeleton.exists()


def test_what_mfdsl_may_delete_at_a_url() -> None:
    pytest.importorskip("fsspec")
    from mfdsl.core import location as loc
    from mfdsl.store.zarr import create_store

    url = "memory://mfdsl-hostile/a.zarr"
    create_store(
        url, sweep={"width": [8.0], "seed": [0]}, steps=[0], time=(("step",), np.zeros(1)), variables=[]
    )
    try:
        loc.write_text(f"{url}/notes.txt", "mine")
        with pytest.raises(NotRemovable, match=r"notes\.txt"):
            remove_store(url)
        loc.remove(f"{url}/notes.txt")
        remove_store(url)
        assert not loc.exists(url)
    finally:
        loc.remove("memory://mfdsl-hostile")


def test_overwrite_keeps_what_mfdsl_did_not_write_beside_the_store(tiny: SweepStore, tmp_path: Path) -> None:
    """--overwrite replaces the store; beside it, a log mfdsl did not write is kept (with
    a note), and so is a file in the store's attribute folder that is not mfdsl's."""
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny.store, store)
    log = Path(f"{store}.log")
    log.write_text("my own notes on this sweep\n", encoding="utf-8")
    attrs = Path(f"{store}.attrs")
    attrs.mkdir()
    (attrs / "readme.txt").write_text("not mfdsl's", encoding="utf-8")
    (attrs / "0-0-0.json").write_text('{"key": "old", "attrs": {}}', encoding="utf-8")  # mfdsl's
    result = run_sweep(tiny.spec, store, "--overwrite")
    assert result.code == 0, result.out + result.err
    clean(result)
    assert f"kept {log}: it is not a log mfdsl wrote" in one_line(result.err)
    assert log.read_text(encoding="utf-8") == "my own notes on this sweep\n"
    assert sorted(p.name for p in attrs.iterdir()) == ["readme.txt"]
    with open_store(store) as got, open_store(tiny.store) as whole:
        assert_same_data(got, whole)


# ---- a store half made, or damaged --------------------------------------------------------------

# ``mfdsl run`` killed (SIGKILL) while it writes the store's skeleton: at the moment zarr
# writes the metadata of ``status``.
KILLED_IN_SKELETON = """\
import os
import signal
import sys

import zarr.storage._local as local

_set = local.LocalStore.set


async def set_(self, key, value, *args, **kwargs):
    if key == "status/zarr.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return await _set(self, key, value, *args, **kwargs)


local.LocalStore.set = set_

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_the_skeleton_is_written_leaves_no_half_store(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    script = tmp_path / "killed_in_skeleton.py"
    script.write_text(KILLED_IN_SKELETON, encoding="utf-8")
    args = [sys.executable, str(script), "run", str(tiny.spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        proc.communicate(timeout=300)
    assert proc.returncode == -9
    assert not store.exists()  # written beside the store, renamed once complete
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.zarr.mfdsl-new-")]
    assert (leftover / "zarr.json").exists()
    assert run_cli("verify", store).code == 2
    # as an older mfdsl left it: the half skeleton at the store's path
    half = tmp_path / "half.zarr"
    shutil.copytree(leftover, half)
    check = run_cli("verify", half)
    assert check.code == 1 and "variable 'status' is missing" in one_line(check.out)
    clean(check)
    before = tree(half)
    resumed = run_sweep(tiny.spec, half, "--resume")
    assert resumed.code == 2, resumed.out + resumed.err
    assert f"cannot resume {half}: it is damaged (" in one_line(resumed.err)
    clean(resumed)
    assert tree(half) == before
    assert removal_problem(str(half)) is None  # --overwrite may replace it

    # the next run on the path clears the leftover and makes the whole store
    result = run_sweep(tiny.spec, store, "--resume")
    assert result.code == 0, result.out + result.err
    assert f"removed {leftover}, a skeleton a killed run left half-made" in one_line(result.err)
    assert not leftover.exists()
    with open_store(store) as got, open_store(tiny.store) as whole:
        assert_same_data(got, whole)


def test_clean_partial_leaves_a_live_writer_and_foreign_files_alone(tmp_path: Path) -> None:
    store = str(tmp_path / "x.zarr")
    mine = Path(partial_path(store))  # this process's: alive
    mine.mkdir()
    dead = tmp_path / "x.zarr.mfdsl-new-999999999"
    (dead / "width").mkdir(parents=True)
    (dead / "width" / "zarr.json").write_text("{}", encoding="utf-8")
    odd = tmp_path / "x.zarr.mfdsl-new-999999998"
    odd.mkdir()
    (odd / "thesis.tex").write_text("x", encoding="utf-8")
    assert clean_partial(store) == [str(dead)]
    assert mine.exists() and odd.exists() and not dead.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _reshape_status(store: Path) -> None:
    meta = json.loads((store / "status" / "zarr.json").read_text(encoding="utf-8"))
    meta["shape"] = [3, 2, 2]
    (store / "status" / "zarr.json").write_text(json.dumps(meta), encoding="utf-8")


def _restamp(store: Path, name: str, value: Any) -> None:
    zarr.open_group(store, mode="r+").attrs[name] = value
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(store))


DAMAGE = {
    "status removed": (lambda s: shutil.rmtree(s / "status"), "variable 'status' is missing"),
    "status metadata cut off": (
        lambda s: _truncate(s / "status" / "zarr.json"),
        "variable 'status': its metadata (status/zarr.json) cannot be read (JSONDecodeError",
    ),
    "a variable's metadata emptied": (
        lambda s: (s / "test_loss" / "zarr.json").write_text("{}", encoding="utf-8"),
        "variable 'test_loss': its metadata (test_loss/zarr.json) cannot be read",
    ),
    "status reshaped": (
        _reshape_status,
        "variable 'status' has shape (3, 2, 2), its dimensions' coordinates give (2, 2, 2)",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_layout_is_named_by_verify_and_refused_by_resume(
    copy: Path, tiny: SweepStore, damage: str
) -> None:
    harm, words = DAMAGE[damage]
    harm(copy)
    check = run_cli("verify", copy)
    assert check.code == 1, check.out + check.err
    assert words in one_line(check.out), check.out
    clean(check)
    before = tree(copy)
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 2, result.out + result.err
    err = one_line(result.err)
    assert f"error: cannot resume {copy}: it is damaged (" in err and words in err, err
    assert f"'mfdsl verify {copy}' lists every problem" in err
    clean(result)
    assert tree(copy) == before


@pytest.mark.parametrize(
    ("harm", "verify_code", "words"),
    [
        ("root cut off", 2, "is not a zarr store (JSONDecodeError"),
        ("spec_ir a number", 1, "root attribute 'spec_ir' is a int"),
        ("diverge_above a string", 1, "root attribute 'diverge_above' is 'x', not a positive number"),
    ],
)
def test_damaged_root_metadata(copy: Path, tiny: SweepStore, harm: str, verify_code: int, words: str) -> None:
    if harm == "root cut off":
        _truncate(copy / "zarr.json")
    elif harm == "spec_ir a number":
        _restamp(copy, "spec_ir", 5)
    else:
        _restamp(copy, "diverge_above", "x")
    check = run_cli("verify", copy)
    assert check.code == verify_code, check.out + check.err
    assert words in one_line(check.out + check.err)
    clean(check)
    before = tree(copy)
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 2, result.out + result.err
    assert "cannot resume" in result.err or "the spec differs" in result.err
    clean(result)
    assert tree(copy) == before


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["time", "step", "width", "act", "layer"])
def test_a_flipped_byte_in_a_coordinate_is_caught_and_repaired(
    copy: Path, tiny: SweepStore, name: str
) -> None:
    """Coordinates carry the checksum data chunks carry: ``verify`` names the one that
    does not decode; ``--resume`` writes it again from the spec, runs nothing else, and
    leaves every run's chunks as they were."""
    meta = json.loads((copy / name / "zarr.json").read_text(encoding="utf-8"))
    assert {"name": "zstd", "configuration": {"level": 0, "checksum": True}} in meta["codecs"]
    _flip(copy / name / "c" / "0")
    check = run_cli("verify", copy)
    assert check.code == 1
    assert f"coordinate '{name}' cannot be read (RuntimeError: Zstd decompression error" in one_line(
        check.out
    )
    clean(check)
    runs = {cell: cell_files(copy, cell) for cell in np.ndindex(2, 2, 2)}
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 0, result.out + result.err
    assert f"repaired: coordinate '{name}' of {copy} was damaged" in one_line(result.err)
    assert "8 runs already finished, 0 to go" in one_line(result.out)
    clean(result)
    assert {cell: cell_files(copy, cell) for cell in np.ndindex(2, 2, 2)} == runs
    assert run_cli("verify", copy).code == 0
    with open_store(copy) as got, open_store(tiny.store) as whole:
        assert_same_data(got, whole)


def _without_checksum(store: Path, name: str) -> None:
    """``name`` as an mfdsl from before coordinates had checksums wrote it."""
    path = store / name / "zarr.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    values = np.asarray(zarr.open_array(store, path=name, mode="r")[...])
    for codec in meta["codecs"]:
        if codec["name"] == "zstd":
            codec["configuration"]["checksum"] = False
    path.write_text(json.dumps(meta), encoding="utf-8")
    zarr.open_array(store, path=name, mode="r+")[...] = values
    with _quiet_consolidation():
        zarr.consolidate_metadata(str(store))


def test_old_stores_without_coordinate_checksums(copy: Path, tiny: SweepStore) -> None:
    """Without a checksum a flipped byte decodes to another value: ``verify`` compares
    every coordinate with the spec's; ``--resume`` rewrites ``time`` (derived, it labels
    no cell) and refuses an index coordinate that disagrees (exit 2), touching nothing."""
    for name in ("time", "step"):
        _without_checksum(copy, name)
        data = bytearray((copy / name / "c" / "0").read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name / "c" / "0").write_bytes(bytes(data))
    text = one_line(run_cli("verify", copy).out)
    assert "coordinate 'step' does not match the stored spec's record steps" in text
    before = tree(copy)
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 2, result.out + result.err
    assert (
        f"cannot resume {copy}: its coordinate 'step' does not match the record steps of the spec"
        in one_line(result.err)
    )
    assert tree(copy) == before
    zarr.open_array(copy, path="step", mode="r+")[...] = np.asarray(mfdsl_steps())  # step put right
    check = run_cli("verify", copy)
    assert "coordinate 'time' does not match the stored spec's (lr × step)" in one_line(check.out)
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 0, result.out + result.err
    assert (
        f"repaired: coordinate 'time' of {copy} was damaged (its values are not the spec's lr × step)"
        in one_line(result.err)
    )
    assert run_cli("verify", copy).code == 0


def mfdsl_steps() -> list[int]:
    from conftest import TINY_STEPS

    return list(TINY_STEPS)


def test_missing_consolidated_metadata_and_unreadable_run_attributes(copy: Path, tiny: SweepStore) -> None:
    root = json.loads((copy / "zarr.json").read_text(encoding="utf-8"))
    del root["consolidated_metadata"]
    (copy / "zarr.json").write_text(json.dumps(root), encoding="utf-8")
    attrs = Path(f"{copy}.attrs")
    attrs.mkdir()
    (attrs / "0-0-0.json").write_text('{"key": "torch:width=8', encoding="utf-8")  # cut off
    assert "no consolidated metadata" in one_line(run_cli("verify", copy).out)
    result = run_sweep(tiny.spec, copy, "--resume")
    assert result.code == 0, result.out + result.err
    err = one_line(result.err)
    assert f"repaired: the consolidated metadata of {copy} was missing or out of date" in err
    assert f"1 file of the attributes runs reported cannot be read and is left in {attrs}: 0-0-0.json" in err
    clean(result)
    assert (attrs / "0-0-0.json").exists()
    assert run_cli("verify", copy).code == 0


# ---- the lock ---------------------------------------------------------------------------------


def test_the_lock_is_keyed_on_the_resolved_path(tmp_path: Path, light: Path) -> None:
    real = tmp_path / "real.zarr"
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    assert _lock.lock_path(str(link)) == _lock.lock_path(str(real)) == f"{real}.lock"
    assert _lock.lock_path(f"{tmp_path}/./sub/../real.zarr/") == f"{real}.lock"
    held = _lock.acquire(str(real), lambda text: None)
    try:
        with pytest.raises(_lock.StoreLocked, match=f"pid {os.getpid()}"):
            _lock.acquire(str(link), lambda text: None)
        result = run_cli("run", light, "-o", link, "--workers", "1")  # a second writer, through the link
        assert result.code == 2
        assert "is being written by another mfdsl run" in one_line(result.err)
        assert not real.exists()
    finally:
        held.release()


@pytest.mark.parametrize("pid", [10**30, 2**31, 0, -5, True])
def test_a_lock_whose_pid_is_no_process_id(tmp_path: Path, pid: object) -> None:
    """This host's lock with a pid no process can have is stale: taken over with a
    warning, no OverflowError; another host's is obeyed, as every foreign lock is."""
    store = str(tmp_path / "s.zarr")
    path = Path(f"{store}.lock")
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    warnings: list[str] = []
    if isinstance(pid, bool):
        with pytest.raises(_lock.StoreLocked, match="cannot be read"):
            _lock.acquire(store, warnings.append)
        return
    taken = _lock.acquire(store, warnings.append)
    assert warnings == [
        f"taking over the stale lock of pid {pid} on host {socket.gethostname()} (since then), "
        "whose pid is no process id (a damaged lock file)"
    ]
    taken.release()
    path.write_text(json.dumps({"pid": pid, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(_lock.StoreLocked, match="elsewhere"):
        _lock.acquire(store, warnings.append)


def test_a_fence_stops_holding_once_revoked(tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    lock = _lock.acquire(store, lambda text: None)
    fence = lock.fence()
    assert _lock.fence_holds(fence) and _lock.fence_holds(None)
    lock.revoke()
    assert not _lock.fence_holds(fence)
    assert _lock.fence_holds(lock.fence())
    lock.release()
    assert not Path(f"{store}.lock").exists()
    assert not _lock.fence_holds(lock.fence())  # released: no fence holds


# ---- divergence --------------------------------------------------------------------------------


def _tiny_task() -> tuple[Any, Any]:
    from mfdsl.plan.layout import plan_tasks

    spec = mfdsl.parse(TINY_SPEC.format(backend="torch"))
    layout, tasks = plan_tasks(spec, mfdsl.check_all(spec), [mfdsl.get_backend("torch")])
    return layout, tasks[0]


def _records(layout: Any, task: Any) -> dict[str, np.ndarray]:
    """Finite records of the tiny spec's first run, shaped as the store holds them
    (particles: 5 sampled rows, w_in_2 there: the layer has 4 inputs)."""
    n = len(task.plan.record_steps)
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    out = {name: np.full((n, *shape), 0.5) for name, shape in shapes.items()}
    out["weight_change"][:, 1] = np.nan  # layer 2: weight_change records layers 1 and 3 only
    return out


def test_judge_finds_the_first_blown_up_record() -> None:
    from mfdsl.execution.worker import judge

    layout, task = _tiny_task()
    shapes = {v.name: tuple(len(layout.extra[d]) for d in v.dims) for v in layout.variables}
    layers = [int(x) for x in layout.extra["layer"]]
    assert judge(task.plan, _records(layout, task), layers, shapes) is None

    records = _records(layout, task)
    records["test_loss"][2] = 1.4e18
    records["train_loss"][3] = 3e153
    message = judge(task.plan, records, layers, shapes)
    assert message == (
        "diverged: test_loss at step 20 is 1.4e+18, above the divergence threshold 1e+10 "
        "(--diverge-above); records after step 20 are NaN"
    )
    assert records["test_loss"][2] == 1.4e18  # the evidence is kept
    assert np.isnan(records["train_loss"][3:]).all() and np.isnan(records["particles"][3:]).all()
    assert np.isfinite(records["train_loss"][:3]).all()

    records = _records(layout, task)
    records["weight_change"][3, 0] = np.inf
    assert judge(task.plan, records, layers, shapes) == (
        "diverged: weight_change at step 30 is inf; records after step 30 are NaN"
    )
    records = _records(layout, task)
    records["output"][1, 2] = np.nan  # a value the run records
    assert "output at step 10 is nan" in str(judge(task.plan, records, layers, shapes))
    # a threshold of one's own; and a loss of 1e9 is fine by the default
    records = _records(layout, task)
    records["train_loss"][1] = 1e9
    assert judge(task.plan, dict(records), layers, shapes) is None
    assert "above the divergence threshold 1e+06" in str(judge(task.plan, records, layers, shapes, 1e6))


# ``mfdsl run`` whose backend reports two runs as done though they blew up: one with a
# huge finite loss, one with an infinite weight change.
BLOWING_UP = """\
import sys

import numpy as np

import mfdsl.execution.worker as worker

_get_backend = worker.get_backend


class BlowingUp:
    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name != "run_group":
            return attr

        def call(plans, **kwargs):
            results = attr(plans, **kwargs)
            for plan, result in zip(plans, results):
                records = result["records"]
                if plan.coords == {"width": 8, "seed": 0, "act": "tanh"}:
                    records["test_loss"] = np.array(records["test_loss"], dtype=float)
                    records["test_loss"][2:] = [1.4e18, 3e153, np.inf]
                if plan.coords == {"width": 16, "seed": 1, "act": "relu"}:
                    records["weight_change"] = np.array(records["weight_change"], dtype=float)
                    records["weight_change"][4, 0] = np.inf
            return results

        return call


worker.get_backend = lambda name: BlowingUp(_get_backend(name))

if __name__ == "__main__":
    from mfdsl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_blown_up_run_is_diverged_not_done(tiny: SweepStore, tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    script = tmp_path / "blowing_up.py"
    script.write_text(BLOWING_UP, encoding="utf-8")
    args = [sys.executable, str(script), "run", str(tiny.spec), "-o", str(store), "--workers", "1"]
    with process_group(args, tmp_path) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "2 runs diverged" in one_line(out)
    assert "Traceback" not in err
    with open_store(store) as ds:
        assert int((ds["status"] == 1).sum()) == 6
        bad = ds.sel(width=8, seed=0, act="tanh")
        assert int(bad["status"]) == 3
        assert str(bad["message"].values) == (
            "diverged: test_loss at step 20 is 1.4e+18, above the divergence threshold 1e+10 "
            "(--diverge-above); records after step 20 are NaN"
        )
        assert bad["test_loss"].values[2] == 1.4e18 and np.isnan(bad["test_loss"].values[3:]).all()
        inf = ds.sel(width=16, seed=1, act="relu")
        assert int(inf["status"]) == 3
        assert (
            str(inf["message"].values)
            == "diverged: weight_change at step 40 is inf; records after step 40 are NaN"
        )
        assert ds.attrs["diverge_above"] == 1e10
    assert "diverged: test_loss at step 20" in Path(f"{store}.log").read_text(encoding="utf-8")
    assert run_cli("verify", store).code == 0
    again = run_sweep(tiny.spec, store, "--resume")  # diverged is finished: nothing runs again
    assert again.code == 0, again.out + again.err
    assert "8 runs already finished, 0 to go" in one_line(again.out)
    other = run_sweep(tiny.spec, store, "--resume", "--diverge-above", "1e12")
    assert other.code == 2
    assert "its runs were judged with --diverge-above 1e+10" in one_line(other.err)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_divergence_threshold_is_refused(light: Path, tmp_path: Path, value: str) -> None:
    result = run_cli("run", light, "-o", tmp_path / "x.zarr", "--diverge-above", value)
    assert result.code == 2
    assert "--diverge-above takes a positive, finite loss" in one_line(result.err)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.lock").exists()


def test_verify_holds_a_done_run_to_the_threshold(copy: Path) -> None:
    zarr.open_group(copy, mode="r+")["train_loss"][0, 0, 0, 1] = 5e10
    text = one_line(run_cli("verify", copy).out)
    assert (
        "cell width=8, seed=0, act=tanh: train_loss: 1 value above the store's divergence threshold 1e+10 "
        "(diverge_above) in a done run" in text
    )


# ---- a Dask cluster that loses its runs ------------------------------------------------------------


class _Future:
    def __init__(self, status: str, result: Any = None, error: BaseException | None = None) -> None:
        self.status, self._result, self._error = status, result, error

    def result(self) -> Any:
        return self._result

    def exception(self) -> BaseException | None:
        if self.status == "cancelled":
            import asyncio

            raise asyncio.CancelledError()
        return self._error


def test_the_cluster_tells_a_failed_unit_from_a_lost_one() -> None:
    """A task that raised (or killed its workers) failed; a task whose scheduler went
    away, cancelled or lost with no exception, is lost — never 'NoneType: None'."""
    from mfdsl.execution.cluster import _outcome

    calls: list[tuple[str, str]] = []

    def failed(unit: Any, message: str) -> list[tuple[str, str, str]]:
        calls.append(("failed", message))
        return [("k", "failed", message)]

    def lost(unit: Any, message: str) -> list[tuple[str, str, str]]:
        calls.append(("lost", message))
        return [("k", "lost", message)]

    assert _outcome(_Future("finished", [("k", "done", "")]), ["k"], failed, lost) == [("k", "done", "")]
    _outcome(_Future("error", error=RuntimeError("KilledWorker: it killed 4 workers")), ["k"], failed, lost)
    _outcome(_Future("cancelled"), ["k"], failed, lost)
    _outcome(_Future("lost"), ["k"], failed, lost)
    assert calls == [
        ("failed", "failed on the cluster: RuntimeError: KilledWorker: it killed 4 workers"),
        ("lost", "lost on the cluster (its task is cancelled: the scheduler went away?)"),
        ("lost", "lost on the cluster (its task is lost: the scheduler went away?)"),
    ]
    assert not any("NoneType" in message for _, message in calls)


def test_a_lost_run_is_what_the_store_says_and_a_revoked_fence_writes_nothing(tmp_path: Path) -> None:
    """A unit run with a fence that no longer holds (its sweep gave it up) writes no
    cell; a lost run reads as the store has it: pending stays pending (``lost``)."""
    from mfdsl.execution.runner import _settle_lost
    from mfdsl.execution.worker import _as_stored, execute_group
    from mfdsl.plan.layout import plan_tasks
    from mfdsl.store.zarr import create_store

    spec = mfdsl.parse(LIGHT)
    layout, tasks = plan_tasks(spec, mfdsl.check_all(spec), [mfdsl.get_backend("torch")])
    store = str(tmp_path / "light.zarr")
    create_store(store, sweep=layout.sweep, steps=layout.steps, time=layout.time, variables=layout.variables)
    lock = _lock.acquire(store, lambda text: None)
    try:
        fence = lock.fence()
        lock.revoke()
        assert execute_group(tasks, store, [], {}, fence=fence) == [
            (
                tasks[0].key,
                "lost",
                "not written: the mfdsl run that started it has ended or given it up (its lock's token changed)",
            )
        ]
        assert read_status(store).tolist() == [[0]]
        assert _as_stored(store, tasks, "lost on the cluster") == [
            (tasks[0].key, "lost", "lost on the cluster; it is pending in the store")
        ]
        # a worker that wrote the run before the fence was revoked: the store says done
        assert execute_group(tasks, store, [], {}, fence=lock.fence())[0][1] == "done"
        settled = _settle_lost(
            store, [tasks], [(tasks[0].key, "lost", "lost on the cluster; it is pending")], lock
        )
        assert settled == [(tasks[0].key, "done", "")]
    finally:
        lock.release()
