"""The torch backend's options: their one declaration (``TorchBackend.options``), and
how the backend reads them from a plan."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mfdsl.plugin import Choice, Option, RunPlan, Span, SpecError

_GPU = re.compile(r"(?:cuda|gpu):(\d+)")


@dataclass(frozen=True)
class Device(Choice):
    """``cpu``, ``cuda``, or one GPU: ``"cuda:N"`` (a string, N a GPU's index)."""

    def describe(self) -> str:
        return "'cpu', 'cuda' or \"cuda:N\" (N a GPU's index)"

    def plural(self) -> str:
        return f"devices, each {self.describe()}"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if isinstance(value, str) and ":" in value:
            match = _GPU.fullmatch(value.strip())
            if match is None:
                raise SpecError(
                    f"unknown {key} '{value}'; a GPU is \"cuda:N\" with N its index, an integer from 0",
                    span,
                    hint='e.g. device = "cuda:1"; device = cuda spreads the workers over every GPU',
                )
            index = int(match.group(1))
            if not value.startswith("cuda:"):
                raise SpecError(f"unknown {key} '{value}'", span, hint=f"did you mean 'cuda:{index}'?")
            return f"cuda:{index}"
        return super().check(value, span, key)


OPTIONS: tuple[Option, ...] = (
    Option(
        name="device",
        kind=Device(("cpu", "cuda"), aliases=(("gpu", "cuda"),)),
        default="cpu",
        help="where to train: `cpu`, `cuda` (with several GPUs and `--workers`, worker k trains on GPU k mod "
        'their number) or one GPU, `"cuda:N"`',
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
    Option(
        name="noise",
        kind=Choice(("philox", "torch")),
        default="philox",
        help="the generator of Langevin noise (`philox`: counter-based, each entry a function of the run's "
        "seed, the step, the parameter and the entry, the same on every step loop and device, and faster "
        "to draw than torch's; `torch`: torch's generator drawn in order, as mfdsl drew it before stream "
        "layout 3, to reproduce such runs bit for bit)",
    ),
)


def option(plan: RunPlan, name: str) -> Any:
    """The value of the option ``name`` for ``plan``: the compiler fills in every
    declared default; a plan built by hand may leave them out."""
    if name in plan.options:
        return plan.options[name]
    return next(o.default for o in OPTIONS if o.name == name)
