"""Shared helpers of the jax tests: specs as text, compiled to a finite (torch) plan and
a limit (jax) plan of the same sweep point, and a fixed dataset to train both on."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import mfdsl
from mfdsl.data.make import make_dataset
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

#: A small finite-data problem: full-batch gradient flow (batch = train), no SGD noise.
SPEC = """\
experiment t
data {data}
network mlp {{ hidden = {hidden}, activation = {act}, bias = {bias}, output = {out} }}
scaling {scaling}
init {{
{init}
}}
train {{
  optimizer = {optimizer}
  loss = {loss}
  batch = {batch}
  steps = {steps}
{extra}
}}
record every {every} {{ {observables} }}
sweep {{ width = [{width}], seed = [{seed}] }}
backends torch, jax
"""

ALL_OBSERVABLES = (
    "train_loss, test_loss, test_accuracy, output(probes = 5), neuron_spread(probes = 5), "
    "preactivation_rms(probes = 6), weight_change, particles(sample = 7)"
)


def spec_text(
    *,
    hidden: int = 1,
    act: str = "sigmoid",
    bias: bool = False,
    out: str = "identity",
    scaling: str = "mean_field",
    init: str | None = None,
    optimizer: str = "sgd(lr = 0.2)",
    loss: str = "mse",
    data: str = "isotropic_gaussian { dim = 4, delta = 0.5, train = 32, test = 64 }",
    batch: int | None = None,
    steps: int = 100,
    extra: str = "",
    every: int = 10,
    observables: str = ALL_OBSERVABLES,
    width: int = 16,
    seed: int = 0,
) -> str:
    if init is None:
        lines = ["  layer 1 ~ normal(0.2, 1 / sqrt(dim))"]
        lines += [f"  layer {ell} ~ normal(0.5, 1)" for ell in range(2, hidden + 1)]
        lines.append(f"  layer {hidden + 1} ~ normal(0, 1)")
        init = "\n".join(lines)
    if batch is None:
        batch = int(data.split("train = ")[1].split()[0].rstrip(","))
    return SPEC.format(
        data=data,
        hidden=hidden,
        act=act,
        bias=str(bias).lower(),
        out=out,
        scaling=scaling,
        init=init,
        optimizer=optimizer,
        loss=loss,
        batch=batch,
        steps=steps,
        extra=extra,
        every=every,
        observables=observables,
        width=width,
        seed=seed,
    )


def plans(text: str, **jax_options: Any) -> tuple[RunPlan, RunPlan]:
    """The torch plan (the spec's one width) and the jax limit plan of its first point."""
    spec = mfdsl.parse(text)
    point = next(iter(mfdsl.expand(spec)))
    finite = compile_point(point.spec, dict(point.coords), "torch")
    limit = compile_point(point.spec, {**point.coords, "width": math.inf}, "jax")
    if jax_options:
        limit = dataclasses.replace(limit, options={**limit.options, **jax_options})
    return finite, limit


def dataset(plan: RunPlan) -> Any:
    return make_dataset(plan.data, plan.seed)


def with_seed(plan: RunPlan, seed: int) -> RunPlan:
    """The same plan with another initialisation seed (the data stay those passed)."""
    return dataclasses.replace(plan, seed=seed, coords={**plan.coords, "seed": seed})


def sup_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mask = ~(np.isnan(a) & np.isnan(b))
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN patterns differ"
    scale = max(float(np.max(np.abs(b[mask]))), 1e-300) if mask.any() else 1.0
    return float(np.max(np.abs(a[mask] - b[mask]))) / scale if mask.any() else 0.0


def loglog_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS slope of log y on log x, and its standard error."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    a = np.vstack([lx, np.ones_like(lx)]).T
    coef, *_ = np.linalg.lstsq(a, ly, rcond=None)
    resid = ly - a @ coef
    dof = max(1, len(lx) - 2)
    s2 = float(resid @ resid) / dof
    se = math.sqrt(s2 / float(((lx - lx.mean()) ** 2).sum()))
    return float(coef[0]), se
