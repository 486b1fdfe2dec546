"""The torch backend's options: their one declaration (``TorchBackend.options``), and
how the backend reads them from a plan."""

from __future__ import annotations

from typing import Any

from mfdsl.plugin import Choice, Option, RunPlan

OPTIONS: tuple[Option, ...] = (
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
        kind=Choice(("auto", "rows", "gemm", "off")),
        default="auto",
        help="run SGD and Langevin steps on the CPU in a compiled loop, built with the system's C compiler "
        "on first use (`auto`: where a compiler is at hand, each layer by row loops or by BLAS matrix "
        "products, whichever a cost model says is faster for its shape and the batch; `rows`, `gemm`: every "
        "layer that way; `off`: always ATen ops; Adam always runs on ATen ops)",
    ),
)


def option(plan: RunPlan, name: str) -> Any:
    """The value of the option ``name`` for ``plan``: the compiler fills in every
    declared default; a plan built by hand may leave them out."""
    if name in plan.options:
        return plan.options[name]
    return next(o.default for o in OPTIONS if o.name == name)
