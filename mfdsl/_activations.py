"""Constants of the activations that are not a library function, shared by the data
(teacher networks) and the backends so that every implementation agrees.

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

import numpy as np

PL_T1, PL_T2 = 0.5, 1.5
PL_S1, PL_S2 = -2.5, 7.5
PL_SLOPE = (PL_S2 - PL_S1) / (PL_T2 - PL_T1)


def piecewise_linear(h: np.ndarray) -> np.ndarray:
    """``σ(h)`` in numpy: ``s1 + slope · (clip(h, t1, t2) − t1)`` (exact at the ends:
    ``slope · (t2 − t1) = s2 − s1`` in floating point for these constants)."""
    return PL_S1 + PL_SLOPE * (np.clip(h, PL_T1, PL_T2) - PL_T1)
