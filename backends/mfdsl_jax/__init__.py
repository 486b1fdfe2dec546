"""mfdsl's JAX backend: the infinite-width (mean-field) limit, computed directly.

This module imports no jax; the solver is imported when a run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, final

from mfdsl import Backend, BackendUnavailable, Option, SpecError
from mfdsl._ir import Spec
from mfdsl._options import Choice, Float, Int
from mfdsl._plan import RunPlan


@final
class JaxBackend(Backend):
    """The mean-field limit of the spec's network, integrated with particles (JAX)."""

    name: ClassVar[str] = "jax"
    limit: ClassVar[bool] = True
    description: ClassVar[str] = "the infinite-width mean-field limit, computed with JAX"
    options: ClassVar[tuple[Option, ...]] = (
        Option(name="particles", kind=Int(min=1), default=4096, help="particles N per layer"),
        Option(
            name="data_samples",
            kind=Int(min=1),
            default=1024,
            help="data points per step for the expectation E_Z (online data)",
        ),
        Option(
            name="dt",
            kind=Float(min=0, open_min=True),
            default=None,
            help="Euler step in mean-field time (default: the learning rate)",
        ),
        Option(name="solver", kind=Choice(("euler", "heun")), default="euler", help="time stepper"),
        Option(
            name="reduce",
            kind=Choice(("auto", "none")),
            default="auto",
            help="exact reductions R1/R2 when the init allows (none: plain particles)",
        ),
        Option(
            name="dtype",
            kind=Choice(("float32", "float64")),
            default="float32",
            help="floating-point precision",
        ),
    )

    def require(self) -> None:
        try:
            import jax  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                "the jax backend needs JAX: pip install 'mfdsl[jax]' (or pip install jax)"
            ) from None

    def check(self, spec: Spec) -> None:
        if spec.scaling != "mean_field" and not (
            isinstance(spec.network.hidden, int) and spec.network.hidden == 1
        ):
            raise SpecError(
                f"the jax backend computes the mean-field limit, and '{spec.scaling}' scaling has none "
                f"beyond two layers (this network has {spec.network.hidden} hidden layers)",
                spec.where("scaling"),
                hint="use 'scaling mean_field', or drop jax from 'backends' for this spec",
            )

    def run(
        self,
        plan: RunPlan,
        *,
        progress: Callable[[int, float], None] | None = None,
    ) -> Mapping[str, Any]:
        self.require()
        raise BackendUnavailable("the jax mean-field solver is not implemented yet (issue #4)")
