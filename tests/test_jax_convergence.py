"""Convergence: finite torch networks approach the jax limit as the width grows (P1),
and the particle solver approaches its N → ∞ limit at N^{-1/2} (P4).

Both are designed so that nothing but the width (or the particle count) is measured:

* no SGD noise — a finite training set used full-batch (batch = its size), so every
  run is gradient flow (Euler, step lr) on the same empirical measure;
* no saddle — sigmoid, biases and a non-centred first layer (``docs/mean-field.md``,
  "Beware saddles"); the network at initialisation is not at a critical point;
* the error taken over several initialisation seeds at fixed data (root mean square),
  against a reference limit computed with far more particles than any width.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from jax_helpers import dataset, loglog_slope, plans, spec_text, with_seed
from mfdsl_jax._solver import solve
from mfdsl_torch._engine import train

import mfdsl
from mfdsl._compile import compile_point

SEEDS = range(6)
P1_SEEDS = range(12)  # torch runs are cheap: more seeds, a steadier error

#: two layers, sigmoid, biases, first layer centred at 0.3: a smooth, saddle-free flow
P1_TEXT = spec_text(
    hidden=1,
    act="sigmoid",
    bias=True,
    steps=60,
    every=6,
    init="  layer 1 ~ normal(0.3, 1)\n  layer 2 ~ normal(0, 1)",
    optimizer="sgd(lr = 0.5)",
    data="isotropic_gaussian { dim = 4, delta = 0.5, train = 32, test = 200 }",
    observables="train_loss, test_loss",
)


def _error(curves: list[np.ndarray], reference: np.ndarray) -> float:
    """sup over time of the root-mean-square over seeds of the distance to the
    reference: one number per width, far steadier than a single seed's sup."""
    diff = np.stack(curves) - reference
    return float(np.sqrt(np.mean(diff**2, axis=0)).max())


def test_p1_width_convergence_to_the_jax_limit() -> None:
    """Torch networks of width n = 50 … 1600 (12 seeds each, trained by gradient flow
    on the same data) against the jax limit (2^16 particles, whose own error is ~16 %
    of the widest network's, i.e. ~1 % in quadrature): the error's log–log slope lies
    between −0.8 and −0.3 (theory: −1/2)."""
    finite, limit = plans(P1_TEXT)
    data = dataset(finite)
    reference = solve(with_seed(limit, 100), data, particles=2**16).records["test_loss"]
    spec = mfdsl.parse(P1_TEXT)
    point = next(iter(mfdsl.expand(spec)))
    widths = [50, 100, 200, 400, 800, 1600]
    errors = []
    for width in widths:
        curves = []
        for seed in P1_SEEDS:
            plan = compile_point(point.spec, {**point.coords, "width": width, "seed": seed}, "torch")
            curves.append(train(plan, data).records["test_loss"])
        errors.append(_error(curves, reference))
    slope, se = loglog_slope(np.array(widths), np.array(errors))
    assert -0.8 < slope < -0.3, (slope, se, errors)
    assert errors[-1] < errors[0] / 3


def test_p4_particle_error_falls_like_n_to_the_minus_half() -> None:
    """The reduced solver (four layers: R1 + R2) at N = 2^7 … 2^13 particles, 6 seeds
    each, against N = 2^17: the fitted slope of the log error on log N is −1/2 within
    4 standard errors of the fit (plus 0.05)."""
    _, limit = plans(
        spec_text(
            hidden=3,
            act="sigmoid",
            bias=True,
            steps=40,
            every=4,
            optimizer="sgd(lr = 0.5)",
            init="  layer 1 ~ normal(0.3, 1)\n  layer 2 ~ normal(1, 1)\n  layer 3 ~ normal(0.5, 1)\n"
            "  layer 4 ~ normal(0, 1)",
            data="isotropic_gaussian { dim = 4, delta = 0.5, train = 32, test = 200 }",
            observables="train_loss, test_loss",
        )
    )
    data = dataset(limit)
    reference = solve(with_seed(limit, 1000), data, particles=2**17).records["test_loss"]
    ns = [2**7, 2**9, 2**11, 2**13]
    errors = []
    for n in ns:
        curves = [solve(with_seed(limit, seed), data, particles=n).records["test_loss"] for seed in SEEDS]
        errors.append(_error(curves, reference))
    slope, se = loglog_slope(np.array(ns), np.array(errors))
    assert se < 0.15, (slope, se, errors)
    assert abs(slope + 0.5) < 4 * se + 0.05, (slope, se, errors)
