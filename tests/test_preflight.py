"""Pre-flight: what this machine lacks for a spec is found by ``mfdsl check``, and by
``mfdsl run`` before it creates anything (``Backend.preflight``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

import mfdsl
from mfdsl import Backend, BackendUnavailable
from mfdsl.cli import main
from mfdsl.plan.check import preflight

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "specs" / "quickstart.mf")
SMALL = ["--set", "sweep.width=[8]", "--set", "sweep.seed=[0]", "--set", "train.steps=4"]
HINT = (
    "hint: install a CUDA build of torch (https://pytorch.org/get-started/locally/), "
    "or set torch.device = cpu (on the command line: --set torch.device=cpu)"
)

torch = pytest.importorskip("torch")


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-only torch, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


def test_check_refuses_cuda_on_a_cpu_only_torch(no_gpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", QUICKSTART, "--set", "torch.device=cuda"]) == 2
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert (
        f"--set:1:14: error: device = cuda, but the installed torch {torch.__version__} is a CPU-only build "
        "(torch.version.cuda is None): every run would fail" in err
    )
    assert HINT in err
    assert "Traceback" not in captured.err and "is valid" not in captured.out


def test_the_error_points_into_the_spec_file(
    no_gpu: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = Path(QUICKSTART).read_text(encoding="utf-8") + "\ntorch { device = cuda }\n"
    spec = tmp_path / "gpu.mf"
    spec.write_text(text, encoding="utf-8")
    line = text.count("\n", 0, text.index("torch { device")) + 1
    assert main(["check", str(spec)]) == 2
    err = _flat(capsys.readouterr().err)
    assert f"{spec}:{line}:18: error: device = cuda" in err and HINT in err


def test_run_refuses_cuda_before_anything_is_made(
    no_gpu: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    store = out / "s.zarr"
    code = main(["run", QUICKSTART, "-o", str(store), "--workers", "1", *SMALL, "--set", "torch.device=cuda"])
    assert code == 2
    captured = capsys.readouterr()
    assert "error: device = cuda" in _flat(captured.err) and "Traceback" not in captured.err
    assert not out.exists()  # no store, no lock, no log


def test_a_cuda_build_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    spec = mfdsl.load(QUICKSTART, overrides=["torch.device=cuda"])
    with pytest.raises(mfdsl.SpecError) as info:
        preflight(spec, list(mfdsl.expand(spec)), ["torch"])
    assert "sees no GPU: torch.cuda.is_available() is False" in info.value.message
    assert "CUDA 12.4" in info.value.message


def test_cuda_passes_where_torch_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["check", QUICKSTART, "--set", "torch.device=cuda"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_a_device_index_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from mfdsl_torch import _cuda_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _cuda_problem("cuda") is None and _cuda_problem("cuda:1") is None
    assert _cuda_problem("cuda:2") == "torch sees 2 GPUs (cuda:0 … cuda:1)"


def test_only_the_backends_that_run_are_asked(no_gpu: None) -> None:
    spec = mfdsl.load(QUICKSTART, overrides=["torch.device=cuda"])
    points = list(mfdsl.expand(spec))
    assert preflight(spec, points, ["jax"]) == []  # --backend jax: torch's device is not its business
    assert preflight(spec, points, ["nonesuch"]) == []  # the runner reports unknown names
    with pytest.raises(mfdsl.SpecError):
        preflight(spec, points, ["jax", "torch"])


def test_a_missing_dependency_is_a_warning_at_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found without importing: as if jax were not installed ('mfdsl run' skips it)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else find_spec(name, *a)
    )
    assert main(["check", QUICKSTART]) == 0
    captured = capsys.readouterr()
    assert (
        f"{QUICKSTART}: warning: backend 'jax' cannot run on this machine: the jax backend needs JAX: "
        "pip install 'mfdsl[jax]' (or pip install jax); 'mfdsl run' skips it" in _flat(captured.err)
    )
    assert "is valid" in captured.out


def test_check_of_a_cpu_spec_imports_neither_torch_nor_jax() -> None:
    code = (
        "import sys\n"
        "from mfdsl.cli import main\n"
        f"assert main(['check', {QUICKSTART!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'jax') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr


class _Needy(Backend):
    """A plugin that overrides nothing but ``require``."""

    name: ClassVar[str] = "needy"
    calls: ClassVar[list[str]] = []

    def require(self) -> None:
        self.calls.append("require")
        raise BackendUnavailable("needy needs a library: pip install needy-lib")

    def run(self, plan: Any, *, progress: Any = None) -> Any:  # pragma: no cover - never runs
        raise AssertionError


def test_the_default_preflight_is_require() -> None:
    spec = mfdsl.load(QUICKSTART)
    with pytest.raises(BackendUnavailable, match="pip install needy-lib"):
        _Needy().preflight(spec)
    assert _Needy.calls == ["require"]
