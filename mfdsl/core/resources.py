"""What mfdsl has to work with: the files shipped beside the code (in every way mfdsl can
be installed) and the memory of this machine."""

from __future__ import annotations

import contextlib
import math
import os
from importlib import resources
from pathlib import Path

from mfdsl.core.errors import SpecError

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
        Path(__file__).resolve().parents[2] / "grammars" / _GRAMMAR,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mfdsl's grammar {_GRAMMAR} is missing (looked in {', '.join(map(str, candidates))}); "
        "reinstall mfdsl"
    )


#: the memory mfdsl assumes this machine has, instead of what it finds (bytes, or with
#: a unit: ``16GiB``, ``512MB``): for a machine shared with others, and for tests
MEMORY_ENV = "MFDSL_MEMORY"


def machine_memory() -> int | None:
    """The memory this process may use: the physical memory, or a cgroup's limit
    when lower (a container), or :data:`MEMORY_ENV` when set; ``None`` if unknown."""
    told = os.environ.get(MEMORY_ENV, "").strip()
    if told:
        return parse_bytes(told, MEMORY_ENV)
    found: list[int] = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        found.append(int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            found.append(int(text))
    return min(found) if found else None


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text: str, name: str) -> int:
    """``16GiB``, ``512 MB``, ``1e9`` as bytes; a ``SpecError`` naming ``name`` else."""
    number = text.strip().rstrip("bB") if text.strip().lower().endswith("ib") else text.strip()
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text.strip()[len(digits) :].strip().lower()
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise SpecError(
            f"{name}={text!r} is not an amount of memory",
            path=name,
            hint=f"e.g. {name}=16GiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
        )
    return int(value * _UNITS[unit])


def format_bytes(nbytes: int) -> str:
    """``1.5 GiB``, ``300 MiB``, ``12 kiB``, ``800 bytes``; a size too large for a
    float as a power of ten."""
    if nbytes >= 1000 << 60:  # beyond EiB; also too large for a float
        return f"10^{len(str(nbytes)) - 1} bytes"
    if nbytes < 1024:
        return f"{nbytes} bytes"
    size = float(nbytes)
    for unit in ("kiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        size /= 1024
        if size < 1000 or unit == "EiB":
            return f"{size:.3g} {unit}" if size < 1000 else f"{size:,.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
