"""Hostile inputs: small files and values that used to take the machine.

Each case runs ``mfdsl`` (or a reader) in a subprocess whose address space is capped
(``RLIMIT_AS``) and whose time is bounded, and asserts a clean error — exit 2, the
message, no traceback, no ``MemoryError`` — and that nothing was created beside it.
The bombs are generated here, each a few kB to a few hundred kB on disk.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_spec

from mfdsl.core.errors import SpecError
from mfdsl.core.resources import format_bytes
from mfdsl.language.expand import MAX_POINTS, expand
from mfdsl.language.load import MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml_bounded
from mfdsl.language.syntax import MAX_TOKENS
from mfdsl.plan.estimate import CONFIRM_RUNS, estimate

# The quickstart as it was when these figures were measured (bias-free: its science
# warning is silenced); a copy, so that the library's quickstart can change.
QUICKSTART = ROOT / "tests" / "data" / "quickstart.mf"
GIB = 1 << 30
#: the address space of a hostile call: mfdsl check or run (refused before any backend
#: is imported) peaks at ~0.3 GiB of it, verify (xarray, zarr) at ~0.8 GiB
LIMIT = 2 * GIB
#: the memory the estimate is told this machine has, so that refusals do not depend on
#: the machine running the tests
MEMORY = "16GiB"

# The child reports its own peak resident set (and its children's, the workers'): the
# parent's ``wait4`` would count the pytest process the child was forked from.
_PEAK = r"""
import atexit, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _peak():
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sys.stderr.write(f"\nMFDSL-PEAK {1024 * max(own, children)}\n")


atexit.register(_peak)
"""
_CLI = _PEAK + "from mfdsl.cli import main\nsys.exit(main(sys.argv[2:]))\n"


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str
    seconds: float
    peak: int  # the largest resident set of the process and its children, bytes

    @property
    def text(self) -> str:
        return " ".join((self.out + self.err).split())  # rich wraps long lines


def _bounded(
    args: list[str],
    cwd: Path,
    *,
    code: str = _CLI,
    limit: int = LIMIT,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Outcome:
    """``code`` (by default ``mfdsl ARGS``) in a subprocess with ``limit`` bytes of
    address space, killed after ``timeout`` seconds; its output and peak memory."""
    environ = {**os.environ, "COLUMNS": "1000", "MFDSL_MEMORY": MEMORY, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(limit), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=environ,
            start_new_session=True,
        )

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
            kill()  # anything the process left behind
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        errors, marker, peak = err.read().decode("utf-8", "replace").rpartition("\nMFDSL-PEAK ")
        return Outcome(
            code=proc.returncode,
            out=out.read().decode("utf-8", "replace"),
            err=errors if marker else peak,
            seconds=seconds,
            peak=int(peak) if marker else -1,  # killed: no report
        )


def _listing(root: Path) -> dict[str, int]:
    """Every path under ``root`` and its modification time."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")}


@contextlib.contextmanager
def _untouched(root: Path) -> Iterator[None]:
    """Assert that nothing under ``root`` is created, removed or modified."""
    before = _listing(root)
    yield
    assert _listing(root) == before, "files were created or touched"


def _refused(outcome: Outcome, *messages: str, within: float = 30.0) -> None:
    """A clean refusal: exit 2, the messages, no traceback, quickly."""
    assert outcome.code == 2, outcome.out + outcome.err
    assert "Traceback" not in outcome.err and "MemoryError" not in outcome.text, outcome.err
    for message in messages:
        assert message in outcome.text, f"{message!r} not in: {outcome.text}"
    assert outcome.seconds < within, f"took {outcome.seconds:.1f} s"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def yaml_spec(tmp_path: Path) -> str:
    """The quickstart as YAML (what ``mfdsl show`` prints)."""
    result = run_cli("show", QUICKSTART)
    assert result.code == 0, result.err
    return result.out


# ---- YAML: aliases, nesting, size, integers, YAML 1.1 oddities -------------------------------


def _billion_laughs(levels: int = 9) -> str:
    lines = ["experiment: x", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_the_first_alias(tmp_path: Path) -> None:
    spec = _write(tmp_path / "bomb.yaml", _billion_laughs())
    assert spec.stat().st_size < 1000  # 9⁹ strings once expanded
    with _untouched(tmp_path):
        outcome = _bounded(["check", spec.name], tmp_path)
    _refused(
        outcome, "bomb.yaml:3:10: error: YAML aliases (*name) are not supported in specs: *a0", within=10
    )
    assert "3 | a1: &a1 [*a0" in outcome.err and "^^^" in outcome.err
    assert outcome.peak < 300 << 20


def test_a_self_referencing_yaml_alias_is_refused(tmp_path: Path) -> None:
    spec = _write(tmp_path / "cycle.yaml", "experiment: x\nsweep: &s {width: [64], seed: *s}\n")
    with _untouched(tmp_path):
        outcome = _bounded(["check", spec.name], tmp_path)
    _refused(outcome, "cycle.yaml:2:31: error: YAML aliases (*name) are not supported in specs: *s")
    assert "RecursionError" not in outcome.text


def test_deep_yaml_nesting_is_refused_where_it_gets_too_deep(tmp_path: Path, yaml_spec: str) -> None:
    spec = _write(tmp_path / "deep.yaml", yaml_spec + "x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    outcome = _bounded(["check", spec.name], tmp_path)
    _refused(outcome, f"error: YAML nested more than {MAX_YAML_DEPTH} levels deep")
    assert "RecursionError" not in outcome.text


def test_a_yaml_spec_of_too_many_values_is_refused_early(tmp_path: Path, yaml_spec: str) -> None:
    many = ", ".join(map(str, range(MAX_YAML_NODES + 10)))
    spec = _write(tmp_path / "many.yaml", yaml_spec.replace("seed: [0, 1, 2]", f"seed: [{many}]"))
    outcome = _bounded(["check", spec.name], tmp_path)
    _refused(
        outcome, f"error: the YAML spec holds more than {MAX_YAML_NODES} values", "hint: a spec has a few"
    )
    assert outcome.peak < 500 << 20


@pytest.mark.parametrize("tag", ["", "!!int "], ids=["plain", "tagged"])
def test_yaml_integers_have_the_digit_limit_of_mf_specs(tmp_path: Path, yaml_spec: str, tag: str) -> None:
    spec = _write(tmp_path / "digits.yaml", yaml_spec.replace("dim: 20", f"dim: {tag}{'9' * 5000}"))
    outcome = _bounded(["check", spec.name], tmp_path)
    _refused(outcome, "digits.yaml:2:39: error: number too large (5000 digits)")
    assert "ValueError" not in outcome.text


@pytest.mark.parametrize(
    ("value", "meaning"),
    [("59:59", "3599"), ("1:00:00", "3600"), ("1_000", "1000"), ("-1:30", "-90")],
)
def test_yaml_11_numbers_are_not_read_silently(
    yaml_spec: str, tmp_path: Path, value: str, meaning: str
) -> None:
    spec = _write(tmp_path / "old.yaml", yaml_spec.replace("dim: 20", f"dim: {value}"))
    result = run_cli("check", spec)
    assert result.code == 2
    err = " ".join(result.err.split())
    assert f"old.yaml:2:39: error: '{value}' is not a number here: specs read YAML's core schema" in err
    assert f"hint: write the number itself ({value} is {meaning} in YAML 1.1)" in err


def test_yaml_tags_beyond_the_core_schema_are_refused(yaml_spec: str, tmp_path: Path) -> None:
    for value, tag in (
        ("!!timestamp 2001-12-14", "!!timestamp"),
        ("!!set {a, b}", "!!set"),
        ("!!binary AAAA", "!!binary"),
    ):
        spec = _write(tmp_path / "tag.yaml", yaml_spec.replace("dim: 20", f"dim: {value}"))
        result = run_cli("check", spec)
        assert result.code == 2 and "Traceback" not in result.err
        assert f"tag.yaml:2:39: error: YAML tag {tag} is not supported in specs" in " ".join(
            result.err.split()
        )


def test_yaml_core_schema_values() -> None:
    text = "a: [1, -2, 0o17, 0x1f, 1.5, 1e3, .5, true, False, null, ~, yes, on, 2001-12-14, '0777']\nb: '59:59'\n"
    assert load_yaml_bounded(text, "x.yaml") == {
        "a": [1, -2, 15, 31, 1.5, 1000.0, 0.5, True, False, None, None, "yes", "on", "2001-12-14", "0777"],
        "b": "59:59",
    }
    for bad, message in (
        ("a: &x 1\nb: *x\n", "x.yaml:2:4: YAML aliases (*name) are not supported in specs: *x"),
        ("a: " + "1" * 1001 + "\n", "x.yaml:1:4: number too large (1001 digits)"),
        ("a: 1e999\n", "x.yaml:1:4: number too large: 1e999"),
        ("a: .nan\n", "x.yaml:1:4: '.nan' is not a finite number"),
        ("a: 1\na: 2\n", "x.yaml:2:1: duplicate key 'a'"),
        ("a: 0777\n", "x.yaml:1:4: '0777' is ambiguous: YAML 1.2 reads it as 777, YAML 1.1 as octal"),
    ):
        with pytest.raises(SpecError) as caught:
            load_yaml_bounded(bad, "x.yaml")
        assert caught.value.render().startswith(message), caught.value.render()


def test_a_bomb_in_a_stored_spec_is_refused_by_verify(
    tiny: object, tmp_path: Path, sweep_store: object
) -> None:
    import json
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(tiny.store, store)  # type: ignore[attr-defined]
    meta = json.loads((store / "zarr.json").read_text(encoding="utf-8"))
    meta["attributes"]["spec_ir"] = _billion_laughs()
    (store / "zarr.json").write_text(json.dumps(meta), encoding="utf-8")
    with _untouched(tmp_path):
        outcome = _bounded(["verify", store.name], tmp_path)
    assert outcome.code == 1, outcome.err  # a problem of the store, reported as one
    assert "Traceback" not in outcome.err
    assert (
        "the stored spec (spec_ir) does not parse: store.zarr:spec_ir:3:10: YAML aliases (*name) are not "
        "supported in specs: *a0" in outcome.text
    )
    assert outcome.peak < 1 * GIB


# ---- .mf size ---------------------------------------------------------------------------------


def test_a_spec_of_too_many_tokens_is_refused_before_parsing(tmp_path: Path) -> None:
    values = ",".join(["1"] * MAX_TOKENS)
    spec = _write(tmp_path / "long.mf", f"experiment x\nsweep {{ width = [{values}] }}\n")
    outcome = _bounded(["check", spec.name], tmp_path)
    _refused(
        outcome,
        "long.mf:2:",
        f"error: spec text too long: more than {MAX_TOKENS} names, numbers and symbols",
        "hint: a spec has a few hundred; write long sweeps as ranges",
        within=10,
    )
    assert outcome.peak < 300 << 20


def test_a_spec_file_too_large_is_refused_unread(tmp_path: Path) -> None:
    spec = tmp_path / "huge.mf"
    with spec.open("w", encoding="utf-8") as handle:
        for _ in range(200):
            handle.write("# " + "x" * 10_000 + "\n")
    outcome = _bounded(["check", spec.name], tmp_path)
    _refused(outcome, "huge.mf: error: file too large (more than 1000000 bytes)", within=10)


# ---- the sweep's size ----------------------------------------------------------------------------


def test_a_sweep_of_a_trillion_points_is_refused_at_once(tmp_path: Path) -> None:
    with _untouched(tmp_path):
        outcome = _bounded(
            ["check", str(QUICKSTART), "--set", "sweep.width=1..1000000", "--set", "sweep.seed=0..999999"],
            tmp_path,
        )
    _refused(
        outcome,
        "--set:1:13: error: the sweep has 1,000,000,000,000 points (1000000 width × 1000000 seed), "
        f"more than the {MAX_POINTS:,} a sweep may have",
        "hint: sweep fewer values, or split the sweep",
        within=15,
    )


def test_a_large_sweep_needs_yes_without_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "run", QUICKSTART, "-o", out / "s.zarr", "--set", "sweep.seed=0..499", "--set", "backends=torch"
    )
    assert result.code == 2, result.err
    err = " ".join(result.err.split())
    assert re.search(
        r"--set:1:12: error: this sweep is 1,500 runs \(width: 3 × seed: 500\), roughly \d+ (s|min|h) on "
        rf"\d+ workers?, more than {CONFIRM_RUNS:,} runs: 'mfdsl run' asks before starting it, and there is "
        "no terminal to ask",
        err,
    ), err
    assert "hint: pass --yes to run it" in err
    assert not out.exists()


def test_a_large_sweep_declined_at_the_prompt_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mfdsl import cli as _cli

    asked: list[str] = []
    monkeypatch.setattr(_cli, "_interactive", lambda: True)
    monkeypatch.setattr(_cli, "_ask", lambda question: asked.append(question) or False)
    out = tmp_path / "out"
    result = run_cli(
        "run", QUICKSTART, "-o", out / "s.zarr", "--set", "sweep.seed=0..499", "--set", "backends=torch"
    )
    assert result.code == 1 and "not started" in result.err
    assert len(asked) == 1
    assert re.fullmatch(
        r"This sweep is 1,500 runs \(width: 3 × seed: 500\), roughly \d+ (s|min|h) on \d+ workers?\. "
        r"Start it\? \[y/N\] ",
        asked[0],
    ), asked
    assert not out.exists()


# ---- memory: refused by the estimate before anything is allocated or created ---------------------

# (overrides, what the error says): the location, the run, the largest part
_TOO_LARGE = [
    pytest.param(
        ["backends=torch", "sweep.width=[1000000000]"],
        [
            "--set:1:14: error: a run at width = 1000000000, seed = ",
            "needs about 686 GiB of memory, more than this machine's 16 GiB; the largest part is the "
            "activations of a step: batch 8 × 1,000,000,001 units (six buffers), 358 GiB",
        ],
        id="width",
    ),
    pytest.param(
        ["data.dim=1000000000"],
        [
            "--set:1:10: error: a run at width = inf, seed = 0 needs about 126 TiB of memory",
            "the largest part is the particles: 4,096,000,004,096 weights (particles per hidden layer 4,096; "
            "dim 1,000,000,000)",
        ],
        id="dim",
    ),
    pytest.param(
        ["backends=torch", "data.test=1000000000"],
        [
            "--set:1:11: error: ",
            "at width = 1024",
            "the largest part is the test set: 1,000,000,000 examples × 20 inputs (float64)",
        ],
        id="test",
    ),
    pytest.param(
        ["backends=torch", "train.batch=1000000000"],
        [
            "--set:1:13: error: ",
            "the largest part is the activations of a step: batch 1,000,000,000 × 1,025 units",
        ],
        id="batch",
    ),
    pytest.param(
        ["backends=torch", "train.steps=1000000000000"],
        [
            "quickstart.mf:37:14: error: ",
            "TiB of memory, more than this machine's 16 GiB",
            "20,000,000,001 records",
        ],
        id="steps",
    ),
    pytest.param(
        ["backends=torch", "record.log=1000000000000"],
        [
            "--set:1:12: error: planning the sweep needs about 21.8 TiB of memory",
            "the largest part is the record-step grid of one run",
        ],
        id="record-log",
    ),
]


@pytest.mark.parametrize(("overrides", "messages"), _TOO_LARGE)
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_spec_too_large_for_the_machine_is_refused(
    tmp_path: Path, overrides: list[str], messages: list[str], command: str
) -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    extra = ["-o", "out/s.zarr"] if command == "run" else []
    with _untouched(tmp_path):
        outcome = _bounded([command, str(QUICKSTART), *extra, *sets], tmp_path)
    _refused(outcome, *messages, "or pass --force to run anyway", within=20)
    assert outcome.peak < 500 << 20


def test_force_turns_the_memory_error_into_a_warning(tmp_path: Path) -> None:
    sets = ["--set", "backends=torch"]
    small = {"MFDSL_MEMORY": "100MiB"}
    refused = _bounded(["check", str(QUICKSTART), *sets], tmp_path, env=small)
    _refused(
        refused,
        "error: ",
        "more than this machine's 100 MiB",
        "hint: this machine has less memory than one worker needs",
    )
    forced = _bounded(["check", str(QUICKSTART), "--force", *sets], tmp_path, env=small)
    assert forced.code == 0, forced.err
    assert "warning: " in forced.text and "more than this machine's 100 MiB" in forced.text
    assert "running anyway (--force)" in forced.text and "is valid" in forced.text


def test_too_many_workers_for_the_memory_names_a_number_that_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = ["backends=torch", "data.test=1000000"]
    args = [a for o in sets for a in ("--set", o)]
    with _untouched(tmp_path):
        result = _bounded(
            ["run", str(QUICKSTART), "-o", "out/s.zarr", "--workers", "8", *args],
            tmp_path,
            env={"MFDSL_MEMORY": "2GiB"},
        )
    _refused(
        result,
        "error: 8 workers together need about",
        "more than this machine's 2 GiB",
        "hint: run with fewer workers",
    )
    fit = int(re.search(r"'mfdsl run --workers (\d+)'", result.text).group(1))  # type: ignore[union-attr]
    assert 1 <= fit < 8
    from mfdsl import load
    from mfdsl.plan.estimate import check_machine

    monkeypatch.setenv("MFDSL_MEMORY", "2GiB")
    spec = load(QUICKSTART, overrides=sets)
    points = list(expand(spec))
    assert check_machine(estimate(spec, points, spec.backends, workers=fit), spec) == []
    with pytest.raises(SpecError, match="workers together need"):
        check_machine(estimate(spec, points, spec.backends, workers=fit + 1), spec)


def test_a_bad_memory_setting_is_a_clean_error(tmp_path: Path) -> None:
    outcome = _bounded(["check", str(QUICKSTART)], tmp_path, env={"MFDSL_MEMORY": "lots"})
    _refused(
        outcome,
        "MFDSL_MEMORY: error: MFDSL_MEMORY='lots' is not an amount of memory",
        "hint: e.g. MFDSL_MEMORY=16GiB",
    )


@pytest.mark.parametrize(
    "sets",
    [
        ["sweep.width=[64]", "data.dim=500", "data.test=100000"],
        [
            "sweep.width=[4096]",
            "network.hidden=2",
            "data.test=100",
            "train.optimizer=sgd(lr = 0.01, momentum = 0.9)",
        ],
    ],
    ids=["test-set", "parameters"],
)
def test_the_estimate_is_within_a_factor_two_of_a_real_run(tmp_path: Path, sets: list[str]) -> None:
    """A run whose memory is mostly its test set, and one whose memory is mostly its
    parameters and momentum: the estimate of the unit of work against the measured
    peak (of the driver and the worker, the larger)."""
    pytest.importorskip("torch")
    from mfdsl import load

    text = QUICKSTART.read_text(encoding="utf-8")
    start = text.index("init {")
    base = _write(tmp_path / "base.mf", text[:start] + text[text.index("}", start) + 1 :])
    sets = ["backends=torch", "sweep.seed=[0]", "train.steps=5", *sets]
    spec = load(base, overrides=sets)
    est = estimate(spec, list(expand(spec)), spec.backends, workers=1)
    assert est.largest is not None
    outcome = _bounded(
        [
            "run",
            str(base),
            "-o",
            str(tmp_path / "s.zarr"),
            "--workers",
            "1",
            *[a for s in sets for a in ("--set", s)],
        ],
        tmp_path,
        limit=16 * GIB,
        timeout=300,
    )
    assert outcome.code == 0, outcome.err
    ratio = est.largest.nbytes / outcome.peak
    shown = f"estimated {format_bytes(est.largest.nbytes)}, measured {format_bytes(outcome.peak)}"
    assert 0.5 <= ratio <= 2.0, shown


def test_the_store_estimate_bounds_what_mfdsl_run_checks_the_disk_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mfdsl check``'s store size is at least what ``mfdsl run`` asks of the disk
    (``_check_space``), and not twice as much."""
    from mfdsl import load
    from mfdsl.core.plugins import get_backend
    from mfdsl.execution import runner as _runner

    spec = load(_write(tmp_path / "tiny.mf", tiny_spec("torch")))
    points = list(expand(spec))
    est = estimate(spec, points, spec.backends)
    layout, tasks = _runner.plan_tasks(spec, points, [get_backend("torch")])
    said: list[str] = []

    class Err:
        def print(self, text: str) -> None:
            said.append(text)

    def fits(free: int) -> bool:
        monkeypatch.setattr(_runner.loc, "free_bytes", lambda _: free)
        return _runner._check_space(str(tmp_path / "s.zarr"), layout, len(tasks), True, Err())

    assert fits(est.store)
    assert not fits(est.store // 2) and "not enough space" in said[-1]


# ---- image data: bombs and lying headers -----------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(int(n).to_bytes(4, "big") for n in shape)


def _mnist(folder: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """A tiny, valid MNIST (plain IDX files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n, images in (
        ("train-images-idx3-ubyte", n_train, True),
        ("train-labels-idx1-ubyte", n_train, False),
        ("t10k-images-idx3-ubyte", n_test, True),
        ("t10k-labels-idx1-ubyte", n_test, False),
    ):
        array = rng.integers(0, 256, (n, 28, 28)) if images else np.arange(n) % 10
        (folder / name).write_bytes(_idx(np.asarray(array)))
    return folder


def _gzip_bomb(path: Path, header: bytes, megabytes: int) -> None:
    """A gzipped file: ``header`` then ``megabytes`` MiB of zeros (~1 kB per MiB on disk)."""
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header)
        for _ in range(megabytes):
            handle.write(zeros)


def _image_spec(folder: Path, root: Path) -> Path:
    return _write(
        folder / "img.mf",
        f'experiment img\ndata mnist {{ root = "{root}", train = 20, test = 10 }}\n'
        "network mlp { hidden = 1, activation = tanh }\n"
        "train { optimizer = sgd(lr = 0.1), loss = cross_entropy, batch = 5, steps = 5 }\n"
        "sweep { width = [8] }\nbackends torch\n",
    )


def _swap(root: Path, name: str, make: object) -> Path:
    (root / name).unlink()
    path = root / f"{name}.gz"
    make(path)  # type: ignore[operator]
    return path


def _load_images_code(root: Path) -> str:
    return (
        "from mfdsl.data.make import DataError\nfrom mfdsl.data.images import load_images\n"
        f"try:\n    load_images('mnist', {str(root)!r})\nexcept DataError as error:\n"
        "    print('DataError:', error)\n    sys.exit(2)\n"
    )


def test_a_gzip_bomb_as_the_image_file_is_read_no_further_than_its_header_says(tmp_path: Path) -> None:
    root = _mnist(tmp_path / "mnist")
    bomb = _swap(root, "train-images-idx3-ubyte", lambda p: _gzip_bomb(p, _idx_header((60, 28, 28)), 400))
    assert bomb.stat().st_size < 1 << 20  # 400 MiB once decompressed
    spec = _image_spec(tmp_path, root)
    expected = f"{bomb} is corrupt: its header announces 47040 bytes of data, the file has more than 47040"
    with _untouched(tmp_path):
        check = _bounded(["check", spec.name], tmp_path, limit=GIB)
        run = _bounded(["run", spec.name, "-o", "out/s.zarr", "--workers", "1"], tmp_path, limit=GIB)
        direct = _bounded([], tmp_path, code=_PEAK + _load_images_code(root), limit=GIB)
    for outcome in (check, run):
        _refused(outcome, expected, "Replace the file with a fresh download", within=20)
        assert outcome.peak < 300 << 20
    _refused(direct, expected, within=20)  # the reader itself, as a worker calls it


def test_a_gzip_bomb_as_the_label_file_is_read_no_further_than_its_header_says(tmp_path: Path) -> None:
    root = _mnist(tmp_path / "mnist")
    bomb = _swap(root, "t10k-labels-idx1-ubyte", lambda p: _gzip_bomb(p, _idx_header((20,)), 400))
    outcome = _bounded(["check", _image_spec(tmp_path, root).name], tmp_path, limit=GIB)
    _refused(outcome, f"{bomb} is corrupt: its header announces 20 bytes of data, the file has more than 20")
    assert outcome.peak < 300 << 20


def test_a_header_claiming_a_billion_images_allocates_nothing(tmp_path: Path) -> None:
    root = _mnist(tmp_path / "mnist")
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(_idx_header((10**9, 28, 28)) + bytes(1000))
    spec = _image_spec(tmp_path, root)
    expected = f"{images} is truncated: its header announces 1000000000×28×28 = 784000000000 bytes of data, the file has 1000"
    check = _bounded(["check", spec.name], tmp_path, limit=GIB)
    direct = _bounded([], tmp_path, code=_PEAK + _load_images_code(root), limit=GIB)
    _refused(check, expected, within=10)
    _refused(direct, expected, within=10)


def test_a_gzipped_header_claiming_more_than_the_file_can_hold_is_refused_undecompressed(
    tmp_path: Path,
) -> None:
    root = _mnist(tmp_path / "mnist")
    bomb = _swap(root, "train-images-idx3-ubyte", lambda p: _gzip_bomb(p, _idx_header((10**6, 28, 28)), 1))
    size = bomb.stat().st_size
    expected = (
        f"{bomb} is corrupt: its header announces 1000000×28×28 = 784000000 bytes of data, more than a "
        f"gzipped file of {size} bytes can hold (at most {1032 * size})"
    )
    check = _bounded(["check", _image_spec(tmp_path, root).name], tmp_path, limit=GIB)
    direct = _bounded([], tmp_path, code=_PEAK + _load_images_code(root), limit=GIB)
    _refused(check, expected, within=10)
    _refused(direct, expected, within=10)


def test_an_image_file_larger_than_the_machine_is_refused_unread(tmp_path: Path) -> None:
    root = _mnist(tmp_path / "mnist")
    images = root / "train-images-idx3-ubyte"
    n = 30_000  # 23.5 MB of images, against a machine said to have 10 MB
    images.write_bytes(_idx_header((n, 28, 28)) + bytes(n * 784))
    code = _PEAK + _load_images_code(root)
    outcome = _bounded([], tmp_path, code=code, env={"MFDSL_MEMORY": "10MB"})
    _refused(outcome, f"{images} announces 22.4 MiB of data, more than this machine's memory (9.54 MiB)")


def _cifar(folder: Path, test_batch: object) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for i in range(1, 6):
        batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
        (batches / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (batches / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    return folder


class _CallsNdarray:
    def __reduce__(self) -> tuple[object, ...]:
        return (np.ndarray, ((10**12,),))


class _HugeReconstruct:
    def __reduce__(self) -> tuple[object, ...]:
        from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]

        return (_reconstruct, (np.ndarray, (10**12,), b"b"))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_CallsNdarray(), "refusing to call numpy.ndarray"),
        (_HugeReconstruct(), "_reconstruct with shape (1000000000000,)"),
    ],
    ids=["ndarray", "reconstruct"],
)
def test_a_cifar_pickle_cannot_allocate_what_it_does_not_hold(
    tmp_path: Path, payload: object, message: str
) -> None:
    root = _cifar(tmp_path / "cifar", {b"data": payload, b"labels": [0]})
    code = _PEAK + (
        "from mfdsl.data.make import DataError\nfrom mfdsl.data.images import load_labels\n"
        f"try:\n    load_labels('cifar10', {str(root)!r})\nexcept DataError as error:\n"
        "    print('DataError:', error)\n    sys.exit(2)\n"
    )
    outcome = _bounded([], tmp_path, code=code, limit=GIB)
    _refused(outcome, "test_batch is not a CIFAR-10 python batch: cannot unpickle it", message)


# ---- small holes: store URLs, fmt --write through a link ---------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_an_s3_store_without_s3fs_says_what_to_install(tmp_path: Path) -> None:
    with _untouched(tmp_path):
        result = run_cli("run", QUICKSTART, "-o", "s3://bucket/x.zarr", "--set", "backends=torch")
    assert result.code == 2 and "Traceback" not in result.err
    assert "error: s3://bucket/x.zarr: this machine cannot open s3:// URLs: pip install s3fs" in " ".join(
        result.err.split()
    )
    for command in ("report", "verify", "plot"):
        result = run_cli(command, "s3://bucket/x.zarr")
        assert result.code == 2 and "pip install s3fs" in result.err, command


def test_a_store_url_of_an_unknown_protocol_is_a_clean_error(tmp_path: Path) -> None:
    result = run_cli("run", QUICKSTART, "-o", "nosuch://bucket/x.zarr")
    assert result.code == 2 and "Traceback" not in result.err
    assert "nosuch://bucket/x.zarr: Protocol not known: nosuch" in " ".join(result.err.split())


def test_fmt_write_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = _write(tmp_path / "real" / "spec.mf", "experiment   x\nsweep{width=[8]}\n")
    target.chmod(0o640)
    link = tmp_path / "link.mf"
    link.symlink_to(target)
    result = run_cli("fmt", "--write", link)
    assert result.code == 0, result.err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text(encoding="utf-8") == "experiment x\n\nsweep { width = [8] }\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["spec.mf"]  # no temporary left


def test_fmt_write_into_a_read_only_folder_is_a_clean_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    spec = _write(folder / "spec.mf", "experiment   x\n")
    folder.chmod(0o555)
    try:
        result = run_cli("fmt", "--write", spec)
    finally:
        folder.chmod(0o755)
    assert result.code == 2 and "Traceback" not in result.err
    assert f"error: cannot write {spec}: Permission denied" in " ".join(result.err.split())
    assert spec.read_text(encoding="utf-8") == "experiment   x\n"


def test_the_tiny_spec_still_checks(tmp_path: Path) -> None:
    """The limits leave ordinary specs alone: the test suite's own spec, as .mf and as YAML."""
    spec = _write(tmp_path / "tiny.mf", tiny_spec("torch"))
    assert run_cli("check", spec).code == 0
    shown = run_cli("show", spec)
    yaml_spec = _write(tmp_path / "tiny.yaml", shown.out)
    assert run_cli("show", yaml_spec).out == shown.out
