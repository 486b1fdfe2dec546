"""Where the files shipped beside the code live, in every way mfdsl can be installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_GRAMMAR = "mfdsl.lark"


def grammar_path() -> Path:
    """The grammar file.

    A wheel ships ``grammars/`` inside the package (``mfdsl/grammars``); a source
    checkout — editable install, or ``python -m pytest`` from the repository root, where
    the source folder shadows any installed copy — has it at the repository's top level.
    Both are tried so neither layout can lose it.
    """
    candidates = [
        Path(str(resources.files("mfdsl"))) / "grammars" / _GRAMMAR,
        Path(__file__).resolve().parent.parent / "grammars" / _GRAMMAR,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mfdsl's grammar {_GRAMMAR} is missing (looked in {', '.join(map(str, candidates))}); "
        "reinstall mfdsl"
    )
