"""mfdsl: declarative width sweeps of neural networks and their mean-field limit.

A ``.mf`` spec describes data, network, scaling, initialisation, training, what to
record and the sweep.  The verbs are the command line's, as functions::

    ds = mfdsl.run("specs/quickstart.mf", "runs/q.zarr")   # an xarray.Dataset
    mfdsl.report("runs/q.zarr"); mfdsl.plot("runs/q.zarr"); mfdsl.verify("runs/q.zarr")

:func:`load` checks a spec into its typed IR, :func:`expand` yields one concrete point
per sweep combination, and backends (plugins under the entry-point group
``mfdsl.backends``, written against :mod:`mfdsl.plugin`) train them.  Where each stage
lives: docs/architecture.md.
"""

from mfdsl.api import MfdslWarning, RunError, check, open_store, plot, report, run, verify
from mfdsl.core.errors import Span, SpecError, SpecWarning
from mfdsl.core.plugins import Backend, BackendUnavailable, available_backends, get_backend
from mfdsl.core.version import __version__
from mfdsl.language.expand import Point, expand, size
from mfdsl.language.ir import (
    SGD,
    Adam,
    BackendOptions,
    Constant,
    ConvLayer,
    ConvNetwork,
    ImageData,
    Init,
    InitRule,
    IsotropicGaussian,
    Langevin,
    Network,
    Normal,
    Observable,
    Record,
    Spec,
    Sweep,
    SweepVar,
    Teacher,
    TeacherNet,
    Textures,
    Train,
    Uniform,
)
from mfdsl.language.load import apply_overrides, load, parse, to_dict, to_yaml
from mfdsl.language.options import Option
from mfdsl.plan.check import check_all

__all__ = [
    "SGD",
    "Adam",
    "Backend",
    "BackendOptions",
    "BackendUnavailable",
    "Constant",
    "ConvLayer",
    "ConvNetwork",
    "ImageData",
    "Init",
    "InitRule",
    "IsotropicGaussian",
    "Langevin",
    "MfdslWarning",
    "Network",
    "Normal",
    "Observable",
    "Option",
    "Point",
    "Record",
    "RunError",
    "Span",
    "Spec",
    "SpecError",
    "SpecWarning",
    "Sweep",
    "SweepVar",
    "Teacher",
    "TeacherNet",
    "Textures",
    "Train",
    "Uniform",
    "__version__",
    "apply_overrides",
    "available_backends",
    "check",
    "check_all",
    "expand",
    "get_backend",
    "load",
    "open_store",
    "parse",
    "plot",
    "report",
    "run",
    "size",
    "to_dict",
    "to_yaml",
    "verify",
]
