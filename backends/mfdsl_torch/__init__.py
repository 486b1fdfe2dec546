"""mfdsl's PyTorch backend: trains finite-width networks at every width of a sweep.

This module imports no torch: the engine (``_engine``) is imported when a run starts,
so specs naming this backend check without torch installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
        self.require()
        from mfdsl._data import make_dataset

        from ._engine import train

        dataset = make_dataset(plan.data, plan.seed)
        result = train(
            plan,
            dataset,
            progress=progress,
            device=str(plan.options.get("device", "cpu")),
            dtype=str(plan.options.get("dtype", "float64")),
        )
        return {"records": result.records, "status": result.status, "message": result.message}
