"""Where a sweep's units of work run: one interface (as Hydra's ``Launcher.launch``) for
the local process pool (:class:`mfdsl.execution.local.LocalPool`) and a Dask cluster
(:class:`mfdsl.execution.cluster.DaskLauncher`).  The runner prepares the store and
picks a launcher; a launcher runs every unit (each through
:func:`mfdsl.execution.worker.execute_group`, which writes its cells) and says how each
run ended."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfdsl.plan.layout import Task

#: how one run ended: ``(key, status, message)``, status one of done, diverged, failed, lost
Outcome = tuple[str, str, str]


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every unit needs wherever it runs: the store, its layer coordinates and
    variables' shapes, the divergence threshold, the store lock's fence (a cell is
    written only while the sweep that started the unit holds the store), and where to
    print."""

    store: str
    layer_coord: Sequence[int]
    shapes: Mapping[str, tuple[int, ...]]
    diverge_above: float
    fence: Mapping[str, Any] | None = None
    console: Any = None
    err: Any = None


class Launcher(abc.ABC):
    """Runs a sweep's units of work."""

    @abc.abstractmethod
    def launch(self, units: list[list[Task]], job: Job) -> tuple[list[Outcome], bool]:
        """Run every unit of ``units`` (the tasks of one unit train together, as
        :meth:`mfdsl.Backend.group` cut them); return each run's outcome and whether the
        sweep was interrupted (Ctrl-C, SIGTERM) before all of them ran."""
