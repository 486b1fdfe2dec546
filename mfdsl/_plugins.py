"""Backends as plugins: the abstract base class and entry-point discovery.

A backend is a class registered under the entry-point group ``mfdsl.backends``.  Its
module must import cheaply: the heavy library (torch, jax) is imported inside
:meth:`Backend.run` / :meth:`Backend.require`, so ``mfdsl check`` validates a spec's
backend options without either installed.
"""

from __future__ import annotations

import abc
import importlib
import warnings
from collections.abc import Callable, Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from ._options import Option

if TYPE_CHECKING:
    from ._ir import Spec
    from ._plan import RunPlan

GROUP = "mfdsl.backends"

# Used when the package's own entry points are not installed (a bare source checkout).
_BUILTIN = {"torch": "mfdsl_torch:TorchBackend", "jax": "mfdsl_jax:JaxBackend"}


class BackendUnavailable(RuntimeError):
    """A backend's dependency is missing; the message says what to install."""


class Backend(abc.ABC):
    """What a backend must provide.

    ``name`` is the name specs use (``backends torch``); ``options`` declares the keys of
    its options block (``torch { device = cuda }``), which the core validates; ``limit``
    says whether it computes the infinite-width limit (its results are stored at
    ``width = inf``) rather than finite networks.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    limit: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def require(self) -> None:
        """Import the backend's dependencies; raise :class:`BackendUnavailable` with an
        actionable message if they are missing."""

    @abc.abstractmethod
    def run(
        self,
        plan: RunPlan,
        *,
        progress: Callable[[int, float], None] | None = None,
    ) -> Mapping[str, Any]:
        """Train (or integrate) one sweep point.

        Returns ``{"records": {name: array}, "status": "done"|"diverged",
        "message": str}``; arrays have the record steps as their first axis.
        """

    def check(self, spec: Spec) -> None:  # noqa: B027 - optional hook
        """Reject constructs this backend cannot compute, raising ``SpecError``."""


@cache
def available_backends() -> Mapping[str, type[Backend]]:
    """Every installed backend, by name.  A plugin that fails to load is skipped with a
    warning (one broken plugin must not break mfdsl)."""
    found: dict[str, type[Backend]] = {}
    specs: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        specs.setdefault(ep.name, ep.value)
    for name, target in _BUILTIN.items():
        specs.setdefault(name, target)
    for name, target in specs.items():
        try:
            cls = _load(target)
        except ModuleNotFoundError as error:
            if name in _BUILTIN and error.name and error.name.startswith("mfdsl_"):
                continue  # a built-in backend that is simply not installed
            warnings.warn(f"mfdsl backend plugin '{name}' ({target}) failed to load: {error}", stacklevel=2)
            continue
        except Exception as error:  # noqa: BLE001 - any plugin failure becomes a warning
            warnings.warn(f"mfdsl backend plugin '{name}' ({target}) failed to load: {error}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            warnings.warn(f"mfdsl backend plugin '{name}' ({target}) is not an mfdsl.Backend", stacklevel=2)
            continue
        found[name] = cls
    return found


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_backend(name: str) -> Backend:
    """An instance of backend ``name``."""
    backends = available_backends()
    if name not in backends:
        from ._errors import did_you_mean

        hint = did_you_mean(name, backends) or f"installed backends: {', '.join(sorted(backends)) or 'none'}"
        raise BackendUnavailable(f"unknown backend '{name}'; {hint}")
    return backends[name]()
