"""A third-party backend written only against ``mfdsl.plugin`` (tests/test_api.py).

A plain numpy loop: a ReLU or tanh network with an identity output, the ``mse`` loss,
SGD without momentum, weight decay or biases, recording ``train_loss`` and
``test_loss``.  What it cannot compute it rejects at ``mfdsl check`` time.  It is what
an outside author would write: the plan carries every multiplier of the scaling, the
initial weights come from :func:`mfdsl.plugin.initial_weights` and the data from
:func:`mfdsl.plugin.make_dataset`, so its numbers are the torch backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from mfdsl.plugin import Backend, Choice, Option, RunPlan, Spec, SpecError, make_dataset

_ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "relu": (lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(np.float64)),
    "tanh": (np.tanh, lambda h: 1.0 - np.tanh(h) ** 2),
}


class ToyBackend(Backend):
    """Finite networks in numpy (a test of the plugin face)."""

    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "a numpy loop, written against mfdsl.plugin only"
    options: ClassVar[tuple[Option, ...]] = (
        Option(name="order", kind=Choice(("forward",)), default="forward", help="the only order there is"),
    )

    def require(self) -> None:
        """numpy is mfdsl's own dependency: nothing to import."""

    def check(self, spec: Spec) -> None:
        opt = spec.train.optimizer
        if spec.network.activation not in _ACTIVATIONS:
            raise SpecError(
                f"the toy backend knows only {sorted(_ACTIVATIONS)}", spec.network.where("activation")
            )
        if spec.train.loss != "mse" or type(opt).__name__ != "SGD" or getattr(opt, "momentum", 0):
            raise SpecError("the toy backend trains only mse with plain sgd", spec.train.where("optimizer"))

    def run(
        self, plan: RunPlan, *, progress: Callable[[int, float], None] | None = None
    ) -> Mapping[str, Any]:
        assert plan.options["order"] == "forward"  # the declared default reaches the plan
        data = make_dataset(plan.data, plan.seed)
        phi, dphi = _ACTIVATIONS[plan.activation]
        weights = plan.initial_weights()
        mults = [layer.forward_mult for layer in plan.layers]
        rates = [plan.optimizer.lr * layer.lr_mult for layer in plan.layers]

        def forward(x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
            pre = [x @ weights[0] * mults[0]]
            for w, m in zip(weights[1:], mults[1:], strict=True):
                pre.append(phi(pre[-1]) @ w * m)
            return pre[-1][:, 0], pre

        def test_loss() -> float:
            return float(np.mean(0.5 * (forward(data.test_x)[0] - data.test_y) ** 2))

        steps = [int(s) for s in plan.record_steps]
        out = {"train_loss": np.full(len(steps), np.nan), "test_loss": np.full(len(steps), np.nan)}
        wanted = {o.name for o in plan.observables}
        x0, y0 = data.train_chunk(0, 1, plan.batch)
        out["train_loss"][0] = float(np.mean(0.5 * (forward(x0[0])[0] - y0[0]) ** 2))
        out["test_loss"][0] = test_loss()
        k, running, count = 1, 0.0, 0
        for step in range(steps[-1]):
            xs, ys = data.train_chunk(step, 1, plan.batch)
            x, y = xs[0], ys[0]
            z, pre = forward(x)
            running += float(np.mean(0.5 * (z - y) ** 2))
            count += 1
            # backward: d loss / d pre-activation of the output, then layer by layer
            delta = ((z - y) / len(y))[:, None]
            grads = []
            for ell in range(len(weights) - 1, -1, -1):
                below = x if ell == 0 else phi(pre[ell - 1])
                grads.append(below.T @ delta * mults[ell])
                if ell:
                    delta = (delta @ weights[ell].T * mults[ell]) * dphi(pre[ell - 1])
            for ell, g in enumerate(reversed(grads)):
                if not plan.layers[ell].frozen:
                    weights[ell] = weights[ell] - rates[ell] * plan.schedule(step, plan.steps) * g
            if step + 1 == steps[k]:
                out["train_loss"][k] = running / count
                out["test_loss"][k] = test_loss()
                running, count, k = 0.0, 0, k + 1
                if progress is not None:
                    progress(step + 1, out["train_loss"][k - 1])
        return {"records": {n: v for n, v in out.items() if n in wanted}, "status": "done", "message": ""}
