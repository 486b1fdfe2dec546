"""The hand-written training loop a researcher would write: the baseline of bench_torch.

One network at a time; an explicit mean-field forward pass (no ``nn.Linear``) with
autograd; ``torch.optim.SGD`` with one parameter group per layer for the per-layer
learning rates; the test loss (and accuracy) computed at each record step under
``torch.no_grad``.  It does the training ``mfdsl`` does for the same plan: the same
initial weights (``RunPlan.initial_weights``, from the streams of ``mfdsl.core.streams``),
the same data stream (``mfdsl.data.make``: minibatch ``s`` is ``train_chunk(s, 1, batch)``),
the same per-layer multipliers, so its records agree with ``mfdsl``'s up to
floating-point reassociation.  It covers what the benchmark needs: SGD without momentum or weight
decay, no biases, the ``mse`` loss, ReLU, an identity output map.

Usage as a script (one plan, for a quick look)::

    python bench/baseline_loop.py --width 200 --seed 0 --steps 2000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from mfdsl.data.make import make_dataset
from mfdsl.plan.types import RunPlan


def train_baseline(plan: RunPlan, dtype: torch.dtype = torch.float64) -> dict[str, np.ndarray]:
    """Train ``plan`` the plain way; returns ``train_loss``, ``test_loss`` and
    ``test_accuracy`` at ``plan.record_steps``."""
    assert plan.loss == "mse" and plan.output == "identity" and plan.activation == "relu"
    assert plan.optimizer.kind == "sgd" and not plan.optimizer.momentum
    assert not plan.optimizer.weight_decay and plan.schedule.kind == "constant"
    data = make_dataset(plan.data, plan.seed)

    # The initial weights, exactly as mfdsl draws them.
    assert not any(layer.bias or layer.frozen for layer in plan.layers)
    weights = [torch.tensor(w, dtype=dtype, requires_grad=True) for w in plan.initial_weights()]
    mults = [layer.forward_mult for layer in plan.layers]

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x @ weights[0] * mults[0]
        for w, m in zip(weights[1:], mults[1:], strict=True):
            h = torch.relu(h) @ w * m
        return h[:, 0]

    lr = plan.optimizer.lr
    opt = torch.optim.SGD(
        [{"params": [w], "lr": lr * layer.lr_mult} for w, layer in zip(weights, plan.layers, strict=True)],
        lr=lr,
    )

    test_x = torch.as_tensor(data.test_x, dtype=dtype)
    test_y = torch.as_tensor(data.test_y, dtype=dtype)
    record_steps = [int(s) for s in plan.record_steps]
    out = {name: np.full(len(record_steps), np.nan) for name in ("train_loss", "test_loss", "test_accuracy")}

    def evaluate(k: int) -> None:
        with torch.no_grad():
            z = forward(test_x)
            out["test_loss"][k] = float((0.5 * (z - test_y) ** 2).mean())
            out["test_accuracy"][k] = float((torch.sign(z) == test_y).double().mean())

    k = 0
    if record_steps and record_steps[0] == 0:
        x, y = data.train_chunk(0, 1, plan.batch)
        with torch.no_grad():
            z = forward(torch.as_tensor(x[0], dtype=dtype))
            out["train_loss"][0] = float((0.5 * (z - torch.as_tensor(y[0], dtype=dtype)) ** 2).mean())
        evaluate(0)
        k = 1
    running, count = 0.0, 0
    chunk = 1000  # minibatches fetched at a time, like a prefetching data loader
    xs: Any = None
    ys: Any = None
    for step in range(record_steps[-1]):
        if step % chunk == 0:
            xa, ya = data.train_chunk(step, chunk, plan.batch)
            xs, ys = torch.as_tensor(xa, dtype=dtype), torch.as_tensor(ya, dtype=dtype)
        x, y = xs[step % chunk], ys[step % chunk]
        loss = (0.5 * (forward(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        count += 1
        if step + 1 == record_steps[k]:
            out["train_loss"][k] = running / count
            running, count = 0.0, 0
            evaluate(k)
            k += 1
    return out


def main() -> None:
    import dataclasses

    import mfdsl
    from mfdsl.plan.compile import compile_point

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500)
    args = parser.parse_args()
    spec = mfdsl.load(
        "specs/nguyen2019_fig5.mf",
        overrides=[
            f"train.steps={args.steps}",
            f"record.every={args.every}",
            f"sweep.width=[{args.width}]",
            f"sweep.seed=[{args.seed}]",
            "sweep.tau2=[0.1]",
        ],
    )
    point = next(iter(mfdsl.expand(spec)))
    plan = compile_point(point.spec, dict(point.coords), "torch")
    plan = dataclasses.replace(
        plan,
        observables=tuple(
            o for o in plan.observables if o.name in ("train_loss", "test_loss", "test_accuracy")
        ),
    )
    t = time.perf_counter()
    rec = train_baseline(plan)
    print(f"{time.perf_counter() - t:.2f} s")
    for name, arr in rec.items():
        print(name, arr)


if __name__ == "__main__":
    main()
