"""mfdsl's PyTorch backend: trains finite-width networks at every width of a sweep.

The seeds of a width (and any sweep variable that leaves the network's shapes alone)
train together as one batched ensemble (:mod:`._ensemble`), each with the results it
gets alone: :meth:`TorchBackend.group` forms the ensembles, :meth:`TorchBackend.run_group`
trains one.

This module imports no torch: the engine (``_engine``) is imported when a run starts,
so specs naming this backend check without torch installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, final

from mfdsl import Backend, BackendUnavailable, Option
from mfdsl._options import Choice
from mfdsl._plan import RunPlan


@final
class TorchBackend(Backend):
    """Finite networks trained by SGD with the spec's scaling (PyTorch)."""

    name: ClassVar[str] = "torch"
    description: ClassVar[str] = "finite-width networks trained with PyTorch"
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            name="device",
            kind=Choice(("cpu", "cuda"), aliases=(("gpu", "cuda"),)),
            default="cpu",
            help="where to train",
        ),
        Option(
            name="dtype",
            kind=Choice(("float32", "float64")),
            default="float64",
            help="floating-point precision",
        ),
        Option(
            name="lazy_updates",
            kind=Choice(("auto", "off")),
            default="auto",
            help="defer large layers' plain SGD updates and apply them every 32 steps "
            "(`auto`: where that saves memory traffic; `off`: every update at once, summed as plain SGD sums it)",
        ),
        Option(
            name="native",
            kind=Choice(("auto", "off")),
            default="auto",
            help="run SGD steps (momentum and weight decay included; not Langevin noise) on the CPU in a "
            "compiled loop, built with the system's C compiler on first use (`auto`: where it applies and a "
            "compiler is at hand; `off`: always ATen ops)",
        ),
    )

    def require(self) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                "the torch backend needs PyTorch: pip install 'mfdsl[torch]' (or pip install torch)"
            ) from None

    def run(
        self,
        plan: RunPlan,
        *,
        progress: Callable[[int, float], None] | None = None,
    ) -> Mapping[str, Any]:
        member_progress = None
        if progress is not None:
            report = progress

            def member_progress(member: int, step: int, loss: float) -> None:
                report(step, loss)

        return self.run_group([plan], progress=member_progress)[0]

    def group(self, plans: Sequence[RunPlan], workers: int) -> list[list[int]]:
        """Ensembles: the points that differ only in what leaves the shapes alone (seed,
        initial laws, learning rate, …) train as one batched network, as many as fit
        in cache and a worker's share of the sweep (``_ensemble.group_plans``)."""
        self.require()
        from ._ensemble import group_plans

        return group_plans(plans, workers=workers)

    def run_group(
        self,
        plans: Sequence[RunPlan],
        *,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> list[Mapping[str, Any]]:
        """One ensemble (``_ensemble.train_ensemble``): each plan's result is, bit for
        bit on CPU, what training it alone gives."""
        self.require()
        if not plans:
            return []
        options = {
            (
                p.options.get("device", "cpu"),
                p.options.get("dtype", "float64"),
                p.options.get("lazy_updates", "auto"),
                p.options.get("native", "auto"),
            )
            for p in plans
        }
        if len(options) > 1:  # not one ensemble: train each alone
            return super().run_group(plans, progress=progress)
        from mfdsl._data import make_dataset

        from ._ensemble import train_ensemble

        device, dtype, lazy, native = options.pop()
        results = train_ensemble(
            plans,
            [make_dataset(plan.data, plan.seed) for plan in plans],
            progress=progress,
            device=str(device),
            dtype=str(dtype),
            lazy=lazy != "off",
            native=native != "off",
        )
        return [{"records": r.records, "status": r.status, "message": r.message} for r in results]
