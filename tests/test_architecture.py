"""The shape of the code: the import-linter contracts of pyproject.toml hold (stages
layered, backends through ``mfdsl.plugin`` only, no torch or jax in the core), they do
catch a backend that reaches into a private module, no two modules import each other,
and every file the code and docs refer to exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")


def _lint_imports(config: Path, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe is not None, "import-linter's lint-imports is not installed (pip install -e '.[dev]')"
    env = {"PYTHONPATH": ":".join(map(str, pythonpath)), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [exe, "--config", str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_hold() -> None:
    done = _lint_imports(ROOT / "pyproject.toml", ROOT, [ROOT, ROOT / "backends"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "Contracts: 4 kept, 0 broken" in done.stdout, done.stdout


def test_a_backend_importing_a_private_module_breaks_the_contract(tmp_path: Path) -> None:
    """The plugin-face contract, applied to a backend that imports ``mfdsl.plan``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    face = next(c for c in config["contracts"] if c["id"] == "plugin-face")
    package = tmp_path / "rogue_backend"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from mfdsl.plugin import Backend\nfrom mfdsl.plan.types import RunPlan\n"
    )
    forbidden = ", ".join(f'"{m}"' for m in face["forbidden_modules"])
    (tmp_path / "contracts.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["mfdsl", "rogue_backend"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "face"\ntype = "forbidden"\nsource_modules = ["rogue_backend"]\n'
        f"forbidden_modules = [{forbidden}]\nallow_indirect_imports = true\n"
    )
    done = _lint_imports(tmp_path / "contracts.toml", tmp_path, [tmp_path, ROOT])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rogue_backend -> mfdsl.plan.types" in done.stdout


def test_no_import_cycles() -> None:
    sys.path[:0] = [str(ROOT / "backends")]
    graph = grimp.build_graph("mfdsl", "mfdsl_torch", "mfdsl_jax", exclude_type_checking_imports=True)
    cycles = sorted(
        {
            tuple(sorted((a, b)))
            for a in graph.modules
            for b in graph.find_modules_directly_imported_by(a)
            if a != b and graph.find_shortest_chain(importer=b, imported=a)
        }
    )
    assert not cycles, f"modules that import each other (through any chain): {cycles}"


_REFERENCE = re.compile(
    r"\b((?:mfdsl|backends|docs|specs|bench|validation|grammars|tests)/[\w./-]+\.(?:py|md|mf|lark|c|json))\b"
)


def test_every_file_referred_to_exists() -> None:
    """Docstrings, comments and docs name files by their path in the repository: each
    must be there (a module moved without its references fails here)."""
    texts = [
        *ROOT.glob("mfdsl/**/*.py"),
        *ROOT.glob("backends/**/*.py"),
        *ROOT.glob("docs/*.md"),
        ROOT / "README.md",
    ]
    missing = []
    for path in texts:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for ref in _REFERENCE.findall(line):
                if not (ROOT / ref).exists() and "*" not in ref:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {ref}")
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_the_mathematics_is_the_shared_copy() -> None:
    """docs/mean-field.md is the project's shared mathematics, copied into the
    repository so that every reference resolves; where the shared folder is beside
    the checkout, the two agree."""
    shared = ROOT.parent / "shared" / "docs" / "mean-field.md"
    if not shared.is_file():
        pytest.skip("no shared folder beside this checkout")
    assert (ROOT / "docs" / "mean-field.md").read_bytes() == shared.read_bytes()


def test_the_readme_layout_matches_the_tree() -> None:
    """Every folder and file the README's Layout block names exists, and every package
    of mfdsl/ is named there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = set()
    parent = ""
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        first = line.split()[0]
        indented = line.startswith("  ")
        for entry in first.split() + line.split()[1:2] * (
            first.endswith(".py") and line.split()[1].endswith(".py")
        ):
            path = (parent + entry) if indented else entry
            named.add(path.rstrip("/"))
        if not indented:
            parent = first if first.endswith("/") else ""
    for path in named:
        assert (ROOT / path).exists(), f"README's Layout names {path}, which is not in the tree"
    packages = {f"mfdsl/{p.parent.name}" for p in ROOT.glob("mfdsl/*/__init__.py")}
    assert packages <= named, f"packages the Layout does not show: {sorted(packages - named)}"


def test_observables_are_declared_once() -> None:
    """Every observable is one entry of ``ir.OBSERVABLE_KINDS``: the plan's type, the
    store's names and per-layer variables, and the docs' observables follow it."""
    import typing

    from mfdsl.language import ir
    from mfdsl.plan.layout import LAYERED, LONG_NAMES
    from mfdsl.plan.types import ObservablePlan

    names = tuple(ir.OBSERVABLE_KINDS)
    assert names == ir.OBSERVABLES
    assert typing.get_args(typing.get_type_hints(ObservablePlan)["name"]) == names
    assert list(LONG_NAMES) == list(names)
    assert LAYERED == ("neuron_spread", "preactivation_rms", "weight_change")
    for name, kind in ir.OBSERVABLE_KINDS.items():
        assert ir.Observable.accepted(name) == kind.args
        assert ("layer" in kind.args) == (kind.default_layers is not None), name
        assert ("probes" in kind.args) == kind.probes, name
