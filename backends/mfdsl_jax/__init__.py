"""mfdsl's JAX backend: the infinite-width (mean-field) limit, computed directly.

This module imports no jax; the solver (``_solver``, whose docstring gives the
semantics: particles, reductions, time, data, observables) is imported when a run
starts.  ``run`` returns, beside the records, ``attrs``: JSON-able facts about the
computation (``limit_reductions``, ``limit_collapsed_layers``, ``limit_particles``,
``limit_solver``) that ``mfdsl run`` writes into the store's root attributes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, final

from mfdsl.plugin import (
    Backend,
    BackendUnavailable,
    Choice,
    ConvNetwork,
    Float,
    Int,
    Langevin,
    Option,
    RunPlan,
    Spec,
    SpecError,
    is_expr,
    limit_problem,
    make_dataset,
)

_NEEDS_JAX = "the jax backend needs JAX: pip install 'mfdsl[jax]' (or pip install jax)"


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
        Option(
            name="noise",
            kind=Choice(("jax", "philox")),
            default="jax",
            help="the generator of Langevin noise (`jax`: jax.random, the fastest in XLA; `philox`: the torch "
            "backend's counter-based noise, entry for entry, so that N particles with reduce = none and dt = lr "
            "take the noise of the width-N network, for an exact comparison; about 2× slower to draw)",
        ),
    )

    def __init__(self) -> None:
        self._installed: bool | None = None  # what preflight found

    def require(self) -> None:
        try:
            import jax  # noqa: F401
        except ImportError:
            raise BackendUnavailable(_NEEDS_JAX) from None

    def preflight(self, spec: Spec) -> None:
        """JAX is installed (found, not imported: ``mfdsl check`` stays fast; once per
        instance, not per point).  The backend has no device option: JAX picks its
        default device itself."""
        if self._installed is None:
            self._installed = importlib.util.find_spec("jax") is not None
        if not self._installed:
            raise BackendUnavailable(_NEEDS_JAX)

    def check(self, spec: Spec) -> None:
        """Reject what has no mean-field limit (the core decides which specs have one:
        :func:`mfdsl.plugin.limit_problem`), and option combinations the solver cannot
        integrate, at ``mfdsl check`` time."""
        problem = limit_problem(spec)
        if problem is not None:
            raise problem
        if isinstance(spec.network, ConvNetwork):
            self._check_cnn(spec)  # the infinite-channel limit: what its particle solver computes
            return
        self._check_options(spec)

    def _check_cnn(self, spec: Spec) -> None:
        """What the cnn limit (``_cnn``) cannot compute: it integrates the mean-field
        limit over channels with plain particles, by Euler steps, without noise (which
        scalings have a limit at all: :func:`mfdsl.plugin.limit_problem`)."""
        from mfdsl.plugin import is_expr

        opt = spec.train.optimizer
        if isinstance(opt, Langevin):
            raise SpecError(
                "the jax backend's cnn limit has no Langevin noise (the McKean–Vlasov noise on filters "
                "is not implemented for convolutions)",
                opt.span,
                hint="use sgd(...) with jax, or drop jax from 'backends' for this spec",
            )
        block = spec.options_for(self.name)
        if block is None:
            return
        if block.get("solver", "euler") == "heun":
            raise SpecError(
                "the jax backend integrates a cnn limit with Euler steps only",
                block.where("solver"),
                hint="drop 'solver' (or set solver = euler) and make dt smaller for accuracy",
            )
        if "reduce" in dict(block.values) and block.get("reduce") == "auto":
            raise SpecError(
                "the reductions R1/R2 are derived for dense middle layers, not for convolutions: "
                "a cnn limit is computed with plain particles (each channel a particle carrying its filter)",
                block.where("reduce"),
                hint="write reduce = none, or leave 'reduce' out",
            )
        momentum = getattr(opt, "momentum", 0.0)
        dt = block.get("dt")
        concrete = not (is_expr(momentum) or is_expr(dt) or is_expr(opt.lr))
        if momentum and concrete and dt is not None and abs(dt - opt.lr) > 1e-12 * opt.lr:
            raise SpecError(
                "momentum is a discrete recursion with step lr: the jax backend integrates it only with dt = lr",
                block.where("dt"),
                hint="drop 'dt' from the jax block, or use momentum = 0",
            )

    def _check_options(self, spec: Spec) -> None:
        block = spec.options_for(self.name)
        opt = spec.train.optimizer
        momentum = getattr(opt, "momentum", 0.0)
        if block is None or is_expr(momentum) or not momentum:
            return
        dt, solver = block.get("dt"), block.get("solver", "euler")
        lr = opt.lr
        bad_dt = dt is not None and not is_expr(dt) and not is_expr(lr) and abs(dt - lr) > 1e-12 * lr
        if bad_dt or solver == "heun":
            raise SpecError(
                "momentum is a discrete recursion with step lr: the jax backend integrates it only "
                "with solver = euler and dt = lr",
                block.where("dt" if bad_dt else "solver"),
                hint="drop 'dt' and 'solver' from the jax block, or use momentum = 0",
            )

    def run(
        self,
        plan: RunPlan,
        *,
        progress: Callable[[int, float], None] | None = None,
    ) -> Mapping[str, Any]:
        self.require()
        from ._solver import solve

        options = plan.options
        dataset = make_dataset(plan.data, plan.seed_of_data)
        if plan.conv is not None:
            from ._cnn import solve_cnn

            result = solve_cnn(
                plan,
                dataset,
                particles=int(options["particles"]),
                data_samples=int(options["data_samples"]),
                dt=options["dt"],
                dtype=str(options["dtype"]),
                progress=progress,
            )
            return {
                "records": result.records,
                "status": result.status,
                "message": result.message,
                "attrs": result.attrs,
            }
        result = solve(
            plan,
            dataset,
            particles=int(options["particles"]),
            data_samples=int(options["data_samples"]),
            dt=options["dt"],
            solver=str(options["solver"]),
            reduce=str(options["reduce"]),
            dtype=str(options["dtype"]),
            noise=str(options.get("noise", "jax")),
            progress=progress,
        )
        return {
            "records": result.records,
            "status": result.status,
            "message": result.message,
            "attrs": result.attrs,
        }
