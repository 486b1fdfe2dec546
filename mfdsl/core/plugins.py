"""Backends as plugins: the abstract base class and entry-point discovery.

A backend is a class registered under the entry-point group ``mfdsl.backends``.  It
trains one sweep point per :meth:`Backend.run` call, or, through the optional hooks
:meth:`Backend.group` and :meth:`Backend.run_group`, several points as one unit.  Its
module must import cheaply: the heavy library (torch, jax) is imported inside
:meth:`Backend.run` / :meth:`Backend.require`, so ``mfdsl check`` validates a spec's
backend options without either installed.
"""

from __future__ import annotations

import abc
import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mfdsl.language.ir import Spec
    from mfdsl.language.options import Option
    from mfdsl.plan.types import RunPlan

GROUP = "mfdsl.backends"
#: the environment variable that numbers the workers of ``mfdsl run``'s local pool (0, 1, …),
#: for a backend that spreads them over devices
WORKER_ENV = "MFDSL_WORKER_INDEX"

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

    Three checks, from the spec alone to this machine: :meth:`check` (what the backend
    cannot compute, wherever it runs), :meth:`preflight` (what this machine lacks for
    the spec: a dependency, a device; ``mfdsl check`` and ``mfdsl run`` call it before
    anything is created) and :meth:`require` (imports the dependencies, before runs).
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

        The result may also carry ``"attrs"``: a mapping of JSON-able facts about the
        run (the jax backend reports ``limit_reductions``, ``limit_collapsed_layers``,
        ``limit_particles``, ``limit_solver`` and, when there are any,
        ``limit_warnings``).  ``mfdsl run`` gathers them per run and, when the sweep
        ends, writes each ``NAME`` as the store's root attribute ``NAME = {run key:
        value}`` (run keys such as ``"jax:width=inf,seed=0"``), merged with what a
        resumed store already holds (``docs/store.md``).  Every backend of a sweep
        shares the root attributes: give the names a distinctive prefix (the jax
        backend's start with ``limit_``).
        """

    def check(self, spec: Spec) -> None:  # noqa: B027 - optional hook
        """Reject constructs this backend cannot compute, raising ``SpecError``."""

    def preflight(self, spec: Spec) -> None:
        """Whether this machine can run ``spec`` (one sweep point, as :meth:`check`
        gets it) on this backend: called by ``mfdsl check`` and by ``mfdsl run`` for
        every point, before the store is created.

        Raise :class:`BackendUnavailable` when a dependency is missing here (``mfdsl
        run`` then skips the backend, or stops if it was asked for with ``--backend``;
        ``mfdsl check`` warns), and ``SpecError``, located at the option, when the spec
        asks this machine for something it lacks (the torch backend: ``device = cuda``
        where torch sees no GPU) — ``mfdsl check`` and ``mfdsl run`` stop on it, exit 2.

        It must be cheap: ``mfdsl check`` runs it for every point.  The default calls
        :meth:`require`; a backend whose dependencies are slow to import overrides it to
        find them without importing them (``importlib.util.find_spec``), and imports
        only what a point's options need checking.
        """
        self.require()

    # ---- optional: several sweep points as one unit of work --------------------------

    def group(self, plans: Sequence[RunPlan], workers: int) -> list[list[int]]:
        """Cut the sweep points still to run into units of work for ``workers`` worker
        processes: lists of indices into ``plans``, every index exactly once.  Each
        unit goes to :meth:`run_group` in one worker.  The runner hands the units out
        largest first (by the sum of its members' sizes), whatever their order here.

        The default runs every point alone.  A backend that trains several points
        faster together (the torch backend batches the seeds of a width into one
        network) returns them together; it should keep a unit below a worker's share of
        the whole, so that the sweep still spreads over the workers.
        """
        return [[i] for i in range(len(plans))]

    def run_group(
        self,
        plans: Sequence[RunPlan],
        *,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> list[Mapping[str, Any]]:
        """Train one unit of :meth:`group`: a result per plan, in order, each what
        :meth:`run` returns for that plan alone.  ``progress(i, step, loss)`` reports on
        ``plans[i]``.  If it raises, the runner runs the unit's points one by one with
        :meth:`run_group` again, so that a failure is charged only to the points that
        fail.

        The default calls :meth:`run` for each plan in turn.
        """
        results: list[Mapping[str, Any]] = []
        for i, plan in enumerate(plans):
            member_progress = None
            if progress is not None:
                member_progress = partial(progress, i)
            results.append(self.run(plan, progress=member_progress))
        return results


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
        from mfdsl.core.errors import did_you_mean

        hint = did_you_mean(name, backends) or f"installed backends: {', '.join(sorted(backends)) or 'none'}"
        raise BackendUnavailable(f"unknown backend '{name}'; {hint}")
    return backends[name]()
