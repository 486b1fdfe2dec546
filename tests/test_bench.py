"""The benchmark scripts of ``bench/`` run, in a reduced size (``--smoke``: tiny widths and
a few steps), end to end: a smoke test that they still work against the current code.
No timing is asserted — only that each script finishes and prints its sections (and,
where the script cross-checks results, that the contenders agree)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run(script: str, *args: str, timeout: float = 900) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_bench_peers_smoke() -> None:
    pytest.importorskip("jax")
    out = run("bench_peers.py", "--smoke", "--threads", "1")
    for section in (
        "Fig. 5 (batch 1, SGD): widths",
        "wide batch",
        "MMN two-layer",
        "step loops",
        "Langevin steps",
    ):
        assert section in out, section
    # the peers train what mfdsl trains: without noise, the same test losses to float32 rounding
    checks = [float(x) for x in re.findall(r"final test loss vs mfdsl: ([0-9.e+-]+)", out)]
    assert len(checks) == 4 and max(checks) < 1e-4, checks
    assert "total" in out and "GFLOP/s" in out
    assert "| network | dtype | before | native, torch noise | ATen, philox | native, philox |" in out


def test_bench_torch_smoke() -> None:
    out = run("bench_torch.py", "--smoke")
    for section in ("speed-up (wall)", "bandwidth at width", "recording cost"):
        assert section in out, section
    rel = float(re.search(r"max relative test-loss difference baseline vs mfdsl ([0-9.e+-]+)", out).group(1))  # type: ignore[union-attr]
    assert rel < 1e-4


def test_bench_limit_smoke() -> None:
    pytest.importorskip("jax")
    out = run(
        "bench_limit.py",
        "--steps",
        "40",
        "--record",
        "20",
        "--test",
        "50",
        "--particles",
        "200",
        "--ref-particles",
        "400",
        "--widths",
        "16",
    )
    assert "| torch, width 16 |" in out and "target" in out


def test_bench_gpu_smoke() -> None:
    # without a GPU the script measures the CPU rows only (and the jax limit on the CPU)
    out = run("bench_gpu.py", "--smoke")
    assert "| width | batch | members | CPU |" in out
    assert "torch.float32: equal to the numpy reference bit for bit: True" in out
    assert "torch.float64: equal to the numpy reference bit for bit: True" in out
    assert "jax limit" in out
