"""mfdsl: declarative width sweeps of neural networks and their mean-field limit.

A ``.mf`` spec describes data, network, scaling, initialisation, training, what to
record and the sweep; :func:`load` checks it into a typed IR, :func:`expand` yields
one concrete point per sweep combination, and backends (plugins under the entry-point
group ``mfdsl.backends``) train them.
"""

from ._api import apply_overrides, load, parse, to_dict, to_yaml
from ._errors import Span, SpecError
from ._expand import Point, check_all, expand, size
from ._ir import (
    SGD,
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
from ._options import Option
from ._plugins import Backend, BackendUnavailable, available_backends, get_backend

__version__ = "0.1.0"

__all__ = [
    "SGD",
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
    "Network",
    "Normal",
    "Observable",
    "Option",
    "Point",
    "Record",
    "Span",
    "Spec",
    "SpecError",
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
    "check_all",
    "expand",
    "get_backend",
    "load",
    "parse",
    "size",
    "to_dict",
    "to_yaml",
]
