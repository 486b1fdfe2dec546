"""The activations in numpy (the reference every backend agrees with), and the constants
of those that are not a library function, shared by the data (teacher networks), the
backends and ``mfdsl check``'s science checks so that every implementation agrees.

``piecewise_linear`` is the activation of Mei, Montanari & Nguyen (PNAS 2018), in their
isotropic-Gaussian example::

    σ(h) = s1                                  h ≤ t1
    σ(h) = s1 + (s2 − s1) (h − t1) / (t2 − t1)   t1 < h < t2
    σ(h) = s2                                  h ≥ t2

with ``t1 = 0.5``, ``t2 = 1.5``, ``s1 = −2.5``, ``s2 = 7.5``.  Its derivative is the
slope ``(s2 − s1) / (t2 − t1) = 10`` strictly inside ``(t1, t2)`` and 0 elsewhere (the
kinks take 0, as ``relu'(0) = 0``), in every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

PL_T1, PL_T2 = 0.5, 1.5
PL_S1, PL_S2 = -2.5, 7.5
PL_SLOPE = (PL_S2 - PL_S1) / (PL_T2 - PL_T1)


def piecewise_linear(h: np.ndarray) -> np.ndarray:
    """``σ(h)`` in numpy: ``s1 + slope · (clip(h, t1, t2) − t1)`` (exact at the ends:
    ``slope · (t2 − t1) = s2 − s1`` in floating point for these constants)."""
    return PL_S1 + PL_SLOPE * (np.clip(h, PL_T1, PL_T2) - PL_T1)


def _erf(z: np.ndarray) -> np.ndarray:
    # numpy has no erf and scipy is not a dependency; math.erf is exact to float64
    return np.asarray(np.frompyfunc(math.erf, 1, 1)(z), dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


_NUMPY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "erf": _erf,
    "identity": lambda z: z,
    "piecewise_linear": piecewise_linear,
}

_DERIVATIVES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: (z > 0.0).astype(np.float64),
    "tanh": lambda z: 1.0 - np.tanh(z) ** 2,
    "sigmoid": lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)),
    "gelu": lambda z: (
        0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    ),
    "erf": lambda z: 2.0 / math.sqrt(math.pi) * np.exp(-z * z),
    "identity": np.ones_like,
    "piecewise_linear": lambda z: np.where((z > PL_T1) & (z < PL_T2), PL_SLOPE, 0.0),
}


def numpy_activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The activation ``name`` as a numpy function (float64), the reference every
    backend agrees with."""
    return _NUMPY[name]


def derivative(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The derivative of activation ``name`` in numpy (kinks take 0, as ``relu'(0)``)."""
    return _DERIVATIVES[name]
