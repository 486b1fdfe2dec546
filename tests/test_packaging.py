"""The package works however it is installed, and the README's commands are CI's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_setup_and_test_commands() -> None:
    commands = _readme_commands()
    assert any(c.endswith("mfdsl run specs/quickstart.mf") for c in commands)
    assert any(c.endswith("python -m pytest -q") for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    assert test_command in ci.splitlines()


def test_core_imports_neither_torch_nor_jax() -> None:
    code = (
        "import sys, mfdsl;"
        "spec = mfdsl.load('specs/nguyen2019_fig5.mf'); mfdsl.check_all(spec);"
        "import mfdsl.cli, mfdsl.plan.compile, mfdsl.execution.runner;"
        "print(sorted(m for m in ('torch', 'jax', 'xarray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_are_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="mfdsl.backends")}
    assert names.get("torch") == "mfdsl_torch:TorchBackend"
    assert names.get("jax") == "mfdsl_jax:JaxBackend"


def test_broken_plugin_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import mfdsl.core.plugins as plugins

    broken = EntryPoint(name="broken", value="no_such_module_xyz:Backend", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken])
    plugins.available_backends.cache_clear()
    try:
        with pytest.warns(UserWarning, match="broken"):
            found = plugins.available_backends()
        assert "broken" not in found
        assert "torch" in found  # built-ins still load
    finally:
        plugins.available_backends.cache_clear()


def test_checkout_launcher() -> None:
    out = subprocess.run(
        [sys.executable, "cli.py", "check", "specs/quickstart.mf"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout


def test_wheel_ships_grammar_and_backends(tmp_path: Path) -> None:
    """A wheel works on its own: grammar inside the package, backends as packages,
    entry points declared, and a spec checks from a directory far from the source."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    wheel = next(tmp_path.glob("mfdsl-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "mfdsl/grammars/mfdsl.lark" in names
    assert "mfdsl_torch/__init__.py" in names and "mfdsl_jax/__init__.py" in names
    assert "mfdsl_torch/_native.c" in names  # compiled on the user's machine
    assert "mfdsl_torch/_noise.c" in names
    assert "mfdsl/py.typed" in names
    for package in sorted({p.parent.name for p in (ROOT / "mfdsl").glob("*/__init__.py")}):
        assert f"mfdsl/{package}/__init__.py" in names, f"the wheel lacks mfdsl.{package}"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mfdsl_torch:TorchBackend" in zipfile.ZipFile(wheel).read(entry).decode()
    spec = tmp_path / "spec.mf"
    spec.write_text((ROOT / "specs" / "quickstart.mf").read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = "import mfdsl, sys; print(mfdsl.__file__); print(len(mfdsl.check_all(mfdsl.load(sys.argv[1]))))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    where, count = out.stdout.split()
    assert where.startswith(str(tmp_path / "site"))
    assert count == "9"
