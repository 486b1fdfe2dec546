"""The public face a backend is written against (as ``xarray.backends.BackendEntrypoint``).

A backend is a subclass of :class:`Backend` registered under the entry-point group
``mfdsl.backends``::

    [project.entry-points."mfdsl.backends"]
    mine = "my_package:MyBackend"

and imports from mfdsl only this module (an import-linter contract checks that the
built-in backends do).  What it receives and uses:

- :class:`RunPlan` — one run, compiled from a sweep point: its :class:`LayerPlan` per
  weight layer (shapes, forward and learning-rate multipliers, the initial law as a
  :class:`DistPlan`), :class:`OptimizerPlan`, :class:`SchedulePlan`, the observables
  (:class:`ObservablePlan`), and ``options``: the backend's declared :class:`Option`
  values with their defaults filled in.  ``RunPlan.data`` is the concrete data node
  (:data:`Data`); :func:`make_dataset` turns it into arrays.
- the random streams (:mod:`streams`): every generator a backend seeds comes from
  ``streams.rng`` / ``streams.torch_seed`` / ``streams.jax_seed`` with a
  :class:`Stream`, so no two parts of a run share random numbers; :mod:`noise` defines
  the counter-based Langevin noise (a numpy reference a backend reproduces bit for bit).
- :func:`initial_weights`, which draws the finite network's initial weights exactly as
  every other backend does, and the activations' reference definitions.
- :class:`SpecError` to reject, at ``mfdsl check`` time, what the backend cannot compute
  (with the place in the spec), and :class:`BackendUnavailable` for a missing dependency.

``tests/toy_backend`` is a complete third-party backend written against this module.
"""

from __future__ import annotations

from mfdsl.core import activations, noise, streams
from mfdsl.core.activations import PL_S1, PL_SLOPE, PL_T1, PL_T2
from mfdsl.core.errors import Span, SpecError
from mfdsl.core.plugins import WORKER_ENV, Backend, BackendUnavailable
from mfdsl.core.streams import Stream
from mfdsl.data.make import Dataset, make_dataset
from mfdsl.language.ir import Adam, ConvNetwork, Data, Langevin, Spec, is_expr
from mfdsl.language.options import Bool, Choice, Float, Int, Option, Str
from mfdsl.plan.compile import cnn_fans, limit_problem
from mfdsl.plan.conv import ConvLayerPlan, ConvPlan, particle_sample, particle_table
from mfdsl.plan.layout import record_arrays
from mfdsl.plan.types import (
    DistPlan,
    LayerPlan,
    ObservablePlan,
    OptimizerPlan,
    RunPlan,
    SchedulePlan,
    check_compatible,
    initial_weights,
)

__all__ = [
    "PL_S1",
    "PL_SLOPE",
    "PL_T1",
    "PL_T2",
    "WORKER_ENV",
    "Adam",
    "Backend",
    "BackendUnavailable",
    "Bool",
    "Choice",
    "ConvLayerPlan",
    "ConvNetwork",
    "ConvPlan",
    "Data",
    "Dataset",
    "DistPlan",
    "Float",
    "Int",
    "Langevin",
    "LayerPlan",
    "ObservablePlan",
    "OptimizerPlan",
    "Option",
    "RunPlan",
    "SchedulePlan",
    "Span",
    "Spec",
    "SpecError",
    "Str",
    "Stream",
    "activations",
    "check_compatible",
    "cnn_fans",
    "initial_weights",
    "is_expr",
    "limit_problem",
    "make_dataset",
    "noise",
    "particle_sample",
    "particle_table",
    "record_arrays",
    "streams",
]
