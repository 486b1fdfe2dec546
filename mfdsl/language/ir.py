"""The typed IR: frozen, keyword-only dataclasses that validate themselves.

A value that refers to ``dim``, ``width`` or a sweep variable stays an expression
(``mfdsl.language.expr``) until :func:`mfdsl.expand` evaluates it at each sweep point; every
other value is concrete and checked as the node is built.  Updating a node with
``dataclasses.replace`` re-runs the checks, so an expanded point is validated exactly
like a literal spec.  This module imports neither torch nor jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from mfdsl.core.errors import Span, SpecError
from mfdsl.language import expr as ex
from mfdsl.language import latent as _latent
from mfdsl.language.latent import LatentFunction
from mfdsl.language.options import (
    REQUIRED,
    AnyValue,
    Bool,
    Choice,
    Either,
    Float,
    Int,
    Kind,
    Layers,
    ListOf,
    Nested,
    Option,
    Str,
    option_field,
)

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "erf", "identity", "piecewise_linear")
OUTPUT_MAPS = ("identity", "tanh", "sigmoid")
SCALINGS = ("mean_field", "ntk", "standard", "mup")
LOSSES = ("mse", "logistic", "cross_entropy")


@dataclass(frozen=True)
class ObservableKind:
    """What an observable is, in one place: the arguments it takes, what it measures (a
    store variable's ``long_name``), whether it is stored per layer (along the store's
    ``layer`` dimension), which layers it observes by default (``"all"``: 1 … L+1,
    ``"hidden"``: 1 … L, ``"first"``: layer 1; ``None``: none), and whether it reads the
    probe inputs (the first test points)."""

    args: tuple[str, ...]
    long_name: str
    per_layer: bool = False
    default_layers: str | None = None
    probes: bool = False

    def layers(self, depth: int) -> tuple[int, ...]:
        """The default layers of a network with ``depth`` hidden layers."""
        return {
            "all": tuple(range(1, depth + 2)),
            "hidden": tuple(range(1, depth + 1)),
            "first": (1,),
            None: (),
        }[self.default_layers]


#: every observable the language records, in the order reports list them
OBSERVABLE_KINDS: dict[str, ObservableKind] = {
    "train_loss": ObservableKind(
        args=(), long_name="training loss (mean over the steps since the last record)"
    ),
    "test_loss": ObservableKind(args=(), long_name="test loss"),
    "test_accuracy": ObservableKind(args=(), long_name="test accuracy"),
    "output": ObservableKind(args=("probes",), long_name="network output on the probe inputs", probes=True),
    "neuron_spread": ObservableKind(
        args=("layer", "probes"),
        long_name="std across neurons of the pre-activation H_l on the probes",
        per_layer=True,
        default_layers="hidden",
        probes=True,
    ),
    "preactivation_rms": ObservableKind(
        args=("layer", "probes"),
        long_name="root-mean-square over neurons and probes of the pre-activation H_l",
        per_layer=True,
        default_layers="all",
        probes=True,
    ),
    "weight_change": ObservableKind(
        args=("layer",),
        long_name="root-mean-square change per entry of W_l since initialisation",
        per_layer=True,
        default_layers="all",
    ),
    "particles": ObservableKind(
        args=("layer", "sample"),
        long_name="sampled neurons: incoming weights (2 directions, norm) and outgoing weight",
        default_layers="first",
    ),
}
OBSERVABLES = tuple(OBSERVABLE_KINDS)
IMAGE_DIMS = {"mnist": 784, "fashion_mnist": 784, "cifar10": 3072}
IMAGE_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000)}

Value = Any  # a concrete value or an ``mfdsl.language.expr`` expression awaiting expansion


def _meta() -> Any:
    return field(default=None, compare=False, repr=False)


def _spans() -> Any:
    # A plain dict (never mutated) so nodes pickle to worker processes.
    return field(default_factory=dict, compare=False, repr=False)


def is_expr(value: Any) -> bool:
    return isinstance(value, ex.EXPR_TYPES)


@dataclass(frozen=True, kw_only=True)
class Node:
    """Base of every IR node: source spans and field-level validation.

    ``span`` covers the node's source; ``spans`` maps a field name to the span of its
    value, so a check can point at the exact offending text.
    """

    span: Span | None = _meta()
    spans: Mapping[str, Span] = _spans()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            opt: Option | None = f.metadata.get("option")
            if opt is None:
                continue
            value = getattr(self, f.name)
            if value is None and opt.default is None:
                continue
            if is_expr(value) or isinstance(value, Node):
                continue
            checked = opt.kind.check(value, self.where(f.name), self.label(f.name))
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; run when every field involved is concrete."""

    def label(self, name: str) -> str:
        """What the spec calls field ``name`` in messages."""
        return name

    def where(self, name: str) -> Span | None:
        """The span of field ``name``'s value, or of the node."""
        return self.spans.get(name, self.span)

    def fail(self, name: str | None, message: str, hint: str | None = None) -> NoReturn:
        raise SpecError(message, self.where(name) if name else self.span, hint=hint)

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        """The keys this node accepts, in declaration order."""
        return tuple(
            dataclasses.replace(f.metadata["option"], name=f.name)
            for f in dataclasses.fields(cls)
            if "option" in f.metadata
        )

    def concrete(self, *names: str) -> bool:
        """True when none of the named fields is still an expression."""
        return not any(is_expr(getattr(self, n)) for n in names)


# ---- data ------------------------------------------------------------------------------

_TRAIN = Either((Choice(("online",)), Int(min=1)))


@dataclass(frozen=True, kw_only=True)
class TeacherNet(Node):
    """``mlp(hidden = 1, width = 4, activation = tanh, bias = false)``: the teacher."""

    constructor: ClassVar[str] = "mlp"
    hidden: Value = option_field(Int(min=1), default=1, help="hidden layers of the teacher")
    width: Value = option_field(Int(min=1), default=4, help="width of every hidden layer")
    activation: Value = option_field(Choice(ACTIVATIONS), default="tanh", help="activation")
    bias: Value = option_field(Bool(), default=False, help="biases on every layer")


@dataclass(frozen=True, kw_only=True)
class IsotropicGaussian(Node):
    """Two classes y = ±1, x | y ~ N(0, (1 + y·delta)² I_dim) (Mei, Montanari & Nguyen)."""

    kind: ClassVar[str] = "isotropic_gaussian"
    dim: Value = option_field(Int(min=1), help="input dimension d")
    delta: Value = option_field(
        Float(min=0, max=1, open_max=True), default=0.5, help="the classes' std are 1 ± delta"
    )
    train: Value = option_field(
        _TRAIN, default="online", help="'online' (fresh samples every step) or a training-set size"
    )
    test: Value = option_field(Int(min=1), default=10000, help="test-set size")


@dataclass(frozen=True, kw_only=True)
class Teacher(Node):
    """x ~ N(0, I_dim), y = a random mean-field mlp of x plus Gaussian noise."""

    kind: ClassVar[str] = "teacher"
    dim: Value = option_field(Int(min=1), help="input dimension d")
    teacher: Any = option_field(
        Nested(("mlp",), bare=True), default=TeacherNet(), help="the teacher network, mlp(...)"
    )
    noise: Value = option_field(Float(min=0), default=0.0, help="std of the label noise")
    train: Value = option_field(_TRAIN, default="online", help="'online' or a training-set size")
    test: Value = option_field(Int(min=1), default=10000, help="test-set size")


@dataclass(frozen=True, kw_only=True)
class ImageData(Node):
    """MNIST, Fashion-MNIST or CIFAR-10 read from local files under ``root``."""

    kind: str = field(default="mnist")
    root: Value = option_field(Str(), default="", help="folder holding the dataset's files")
    classes: Value = option_field(
        ListOf(Int(min=0, max=9), min_length=2), default=tuple(range(10)), help="classes to keep"
    )
    train: Value = option_field(
        Either((Int(min=1), Choice(("all",)))), default="all", help="training-set size (seeded subsample)"
    )
    test: Value = option_field(Either((Int(min=1), Choice(("all",)))), default="all", help="test-set size")

    def __post_init__(self) -> None:
        if not self.root:
            object.__setattr__(self, "root", f"~/data/{self.kind}")
        super().__post_init__()

    def validate(self) -> None:
        full_train, full_test = IMAGE_SIZES[self.kind]
        for name, full in (("train", full_train), ("test", full_test)):
            value = getattr(self, name)
            if isinstance(value, int) and value > full:
                self.fail(name, f"{self.kind} has only {full} {name} images, asked for {value}")


@dataclass(frozen=True, kw_only=True)
class Textures(Node):
    """A built-in synthetic image task for convolutional networks (no files): class
    ``k`` of ``classes`` is a sinusoidal grating at the angle ``π k / classes`` with a
    random phase per channel, in white Gaussian noise of std ``noise``
    (``mfdsl.data.make`` has the exact draws)."""

    kind: ClassVar[str] = "textures"
    channels: Value = option_field(Int(min=1, max=64), default=3, help="image channels C")
    size: Value = option_field(Int(min=2, max=256), default=8, help="image height and width in pixels")
    classes: Value = option_field(Int(min=2, max=16), default=2, help="number of classes (2: a binary task)")
    frequency: Value = option_field(
        Float(min=0, open_min=True), default=2.0, help="cycles of the grating across the image"
    )
    noise: Value = option_field(Float(min=0), default=1.0, help="std of the white Gaussian noise")
    train: Value = option_field(_TRAIN, default="online", help="'online' or a training-set size")
    test: Value = option_field(Int(min=1), default=1000, help="test-set size")


Data = IsotropicGaussian | Teacher | ImageData | Textures
DATA_KINDS: dict[str, type[Node]] = {
    "isotropic_gaussian": IsotropicGaussian,
    "teacher": Teacher,
    "mnist": ImageData,
    "fashion_mnist": ImageData,
    "cifar10": ImageData,
    "textures": Textures,
}
#: (channels, height, width) of the image data sets read from files
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def image_shape(data: Data) -> tuple[Value, Value, Value] | None:
    """``(channels, height, width)`` of image data (expressions while the textures'
    sizes are), or ``None`` for data that are not images."""
    if isinstance(data, ImageData):
        return IMAGE_SHAPES[data.kind]
    if isinstance(data, Textures):
        return (data.channels, data.size, data.size)
    return None


def data_dim(data: Data) -> Value:
    """The input dimension (an expression if ``dim`` is one)."""
    if isinstance(data, ImageData):
        return IMAGE_DIMS[data.kind]
    if isinstance(data, Textures):
        if is_expr(data.channels) or is_expr(data.size):
            return ex.BinOp(
                op="*",
                left=_as_expr(data.channels),
                right=ex.BinOp(op="*", left=_as_expr(data.size), right=_as_expr(data.size)),
            )
        return int(data.channels) * int(data.size) ** 2
    return data.dim


def _as_expr(value: Value) -> ex.Expr:
    return value if is_expr(value) else ex.Num(value=value)


def task(data: Data) -> str:
    """``binary``, ``multiclass`` or ``regression``."""
    if isinstance(data, Teacher):
        return "regression"
    if isinstance(data, ImageData) and not is_expr(data.classes) and len(data.classes) > 2:
        return "multiclass"
    if isinstance(data, Textures) and not is_expr(data.classes) and data.classes > 2:
        return "multiclass"
    return "binary"


def task_known(data: Data) -> bool:
    """Whether :func:`task` is final (not while image classes are an expression)."""
    return not (isinstance(data, (ImageData, Textures)) and is_expr(data.classes))


def static_test_size(data: Data) -> int | None:
    """The test-set size where the spec alone tells it: ``None`` while it is an
    expression; for image data with ``test = all``, the full test split (an upper bound
    when ``classes`` keeps only some)."""
    if is_expr(data.test):
        return None
    if data.test == "all":
        return IMAGE_SIZES[data.kind][1] if isinstance(data, ImageData) else None
    return int(data.test)


# ---- network ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Network(Node):
    """``network mlp { ... }``: a fully-connected network; every hidden layer has the
    sweep's ``width``."""

    kind: str = "mlp"
    hidden: Value = option_field(Int(min=1, max=64), default=1, help="number of hidden layers L")
    activation: Value = option_field(Choice(ACTIVATIONS), default="relu", help="activation φ")
    output: Value = option_field(Choice(OUTPUT_MAPS), default="identity", help="output map ψ")
    bias: Value = option_field(Bool(), default=False, help="biases on every layer")
    outputs: Value = option_field(
        Either((Int(min=1), Choice(("auto",)))),
        default="auto",
        help="outputs K; auto: the number of classes for multiclass data, else 1",
    )


@dataclass(frozen=True, kw_only=True)
class ConvLayer(Node):
    """``conv(kernel, stride = 1, padding = 0, pool = 1)``: one convolution layer with
    ``width`` output channels, then average pooling over ``pool × pool`` windows."""

    constructor: ClassVar[str] = "conv"
    kernel: Value = option_field(Int(min=1, max=64), help="kernel size k (square k × k)")
    stride: Value = option_field(Int(min=1, max=64), default=1, help="stride")
    padding: Value = option_field(Int(min=0, max=64), default=0, help="zero padding on each side")
    pool: Value = option_field(
        Int(min=1, max=64), default=1, help="average pooling window (and stride) after φ; 1: none"
    )

    def validate(self) -> None:
        if self.concrete("kernel", "padding") and self.padding >= self.kernel:
            self.fail(
                "padding",
                f"padding {self.padding} is not smaller than the kernel size {self.kernel}: the outer "
                "outputs would see only padding",
                hint=f"use padding ≤ {self.kernel - 1} ({self.kernel // 2} keeps the size at stride 1)",
            )


HEADS = ("avg", "flatten")


@dataclass(frozen=True, kw_only=True)
class ConvNetwork(Node):
    """``network cnn { layers = [conv(...), ...], ... }``: convolution layers with
    ``width`` channels each, a head (global average pooling, or flattening), ``dense``
    mean-field dense layers of ``width`` neurons, and the output layer.  Its hidden
    layers are numbered conv layers first: 1 … len(layers), then the dense ones."""

    kind: str = "cnn"
    layers: tuple[ConvLayer, ...] = ()
    head: Value = option_field(
        Choice(HEADS), default="avg", help="avg: global average pooling over positions; flatten"
    )
    dense: Value = option_field(Int(min=0, max=64), default=0, help="dense hidden layers after the head")
    activation: Value = option_field(Choice(ACTIVATIONS), default="relu", help="activation φ")
    output: Value = option_field(Choice(OUTPUT_MAPS), default="identity", help="output map ψ")
    bias: Value = option_field(Bool(), default=False, help="biases on every layer (one per channel)")
    outputs: Value = option_field(
        Either((Int(min=1), Choice(("auto",)))),
        default="auto",
        help="outputs K; auto: the number of classes for multiclass data, else 1",
    )

    @property
    def hidden(self) -> Value:
        """The number of hidden layers L: conv layers plus dense layers."""
        return self.dense if is_expr(self.dense) else len(self.layers) + int(self.dense)

    def validate(self) -> None:
        if not self.layers:
            self.fail(None, "a cnn needs at least one conv layer", hint="layers = [conv(3, padding = 1)]")


# ---- init ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Normal(Node):
    """``normal(mean, std)``."""

    constructor: ClassVar[str] = "normal"
    mean: Value = option_field(Float(), help="mean")
    std: Value = option_field(Float(min=0), help="standard deviation")


@dataclass(frozen=True, kw_only=True)
class Uniform(Node):
    """``uniform(low, high)``."""

    constructor: ClassVar[str] = "uniform"
    low: Value = option_field(Float(), help="lower end")
    high: Value = option_field(Float(), help="upper end")

    def validate(self) -> None:
        if self.concrete("low", "high") and self.high < self.low:
            self.fail("high", f"uniform({self.low:g}, {self.high:g}): high is below low")


@dataclass(frozen=True, kw_only=True)
class Constant(Node):
    """``constant(v)``: every entry equal to ``v``."""

    constructor: ClassVar[str] = "constant"
    value: Value = option_field(Float(), help="the value")


@dataclass(frozen=True, kw_only=True)
class Embedded(Node):
    """``embedded(mean, std = 0)``: a neuronal-embedding initialisation (Pham & Nguyen
    2020, :mod:`mfdsl.language.latent`).  Every neuron has a latent coordinate uniform on
    ``[0, 1]``; the weight from a neuron with coordinate ``u_in`` to one with ``u_out``
    is ``mean(u_in, u_out) + std · ε``, ``ε ~ N(0, 1)`` i.i.d.  The first layer's inputs
    and the read-out's outputs are not neurons: ``u_in`` is undefined in layer 1 and
    ``u_out`` in the last layer (checked by :class:`Spec`)."""

    constructor: ClassVar[str] = "embedded"
    mean: Value = option_field(LatentFunction(), help="the weight's mean, a function of u_in and u_out")
    std: Value = option_field(
        Float(min=0), default=0.0, help="std of the i.i.d. Gaussian part of every weight"
    )

    def validate(self) -> None:
        mean = self.mean
        if is_expr(mean) and all(n.id in _latent.LATENT or n.id in ex.CONSTANTS for n in ex.names(mean)):
            # only coordinates left (a literal spec, or a sweep point): the function must
            # be finite where the coordinates live
            _latent.check_finite(_latent.bind(mean, {}), self.where("mean"))


Dist = Normal | Uniform | Constant | Embedded
DISTRIBUTIONS: dict[str, type[Node]] = {
    "normal": Normal,
    "uniform": Uniform,
    "constant": Constant,
    "embedded": Embedded,
}


@dataclass(frozen=True, kw_only=True)
class InitRule(Node):
    """``layer SEL ~ DIST``."""

    layers: Value = option_field(Layers(), help="the layers this rule initialises")
    dist: Dist


@dataclass(frozen=True, kw_only=True)
class Init(Node):
    """``init { layer SEL ~ DIST ... }``; every weight layer covered exactly once."""

    rules: tuple[InitRule, ...] = ()


# ---- training --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SGD(Node):
    """``sgd(lr, momentum = 0, weight_decay = 0)``."""

    constructor: ClassVar[str] = "sgd"
    lr: Value = option_field(Float(min=0, open_min=True), help="base learning rate α")
    momentum: Value = option_field(
        Float(min=0, max=1, open_max=True), default=0.0, help="heavy-ball momentum"
    )
    weight_decay: Value = option_field(Float(min=0), default=0.0, help="L2 penalty λ")


@dataclass(frozen=True, kw_only=True)
class Langevin(Node):
    """``langevin(lr, temperature, weight_decay = 0)``: noisy SGD."""

    constructor: ClassVar[str] = "langevin"
    lr: Value = option_field(Float(min=0, open_min=True), help="base learning rate α")
    temperature: Value = option_field(Float(min=0), help="temperature 1/β of the noise")
    weight_decay: Value = option_field(Float(min=0), default=0.0, help="L2 penalty λ")


@dataclass(frozen=True, kw_only=True)
class Adam(Node):
    """``adam(lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0)``: Adam with
    decoupled weight decay (AdamW), at each scaling's per-layer Adam rates (finite width
    only: no mean-field limit of Adam is implemented)."""

    constructor: ClassVar[str] = "adam"
    lr: Value = option_field(Float(min=0, open_min=True), help="base learning rate α")
    beta1: Value = option_field(
        Float(min=0, max=1, open_max=True), default=0.9, help="decay rate of the gradient's running mean"
    )
    beta2: Value = option_field(
        Float(min=0, max=1, open_max=True),
        default=0.999,
        help="decay rate of the squared gradient's running mean",
    )
    eps: Value = option_field(Float(min=0, open_min=True), default=1e-8, help="ε added to the denominator")
    weight_decay: Value = option_field(
        Float(min=0), default=0.0, help="decoupled weight decay λ (AdamW: p ← p − lr·λ·p)"
    )


OPTIMIZERS: dict[str, type[Node]] = {"sgd": SGD, "langevin": Langevin, "adam": Adam}


@dataclass(frozen=True, kw_only=True)
class ConstantSchedule(Node):
    """``constant``: ξ = 1."""

    constructor: ClassVar[str] = "constant"


@dataclass(frozen=True, kw_only=True)
class CosineSchedule(Node):
    """``cosine(final = 0)``: ξ falls from 1 to ``final`` along a half cosine."""

    constructor: ClassVar[str] = "cosine"
    final: Value = option_field(Float(min=0), default=0.0, help="the factor at the last step")


@dataclass(frozen=True, kw_only=True)
class LinearSchedule(Node):
    """``linear(final = 0)``: ξ falls linearly from 1 to ``final``."""

    constructor: ClassVar[str] = "linear"
    final: Value = option_field(Float(min=0), default=0.0, help="the factor at the last step")


@dataclass(frozen=True, kw_only=True)
class StepSchedule(Node):
    """``step(every, factor = 0.1)``: ξ multiplied by ``factor`` every ``every`` steps."""

    constructor: ClassVar[str] = "step"
    every: Value = option_field(Int(min=1), help="steps between decays")
    factor: Value = option_field(Float(min=0, open_min=True), default=0.1, help="decay factor")


@dataclass(frozen=True, kw_only=True)
class InverseTimeSchedule(Node):
    """``inverse_time(rate = 1)``: ξ = 1 / (1 + rate · step / steps)."""

    constructor: ClassVar[str] = "inverse_time"
    rate: Value = option_field(Float(min=0), default=1.0, help="decay rate over the run")


Schedule = ConstantSchedule | CosineSchedule | LinearSchedule | StepSchedule | InverseTimeSchedule
SCHEDULES: dict[str, type[Node]] = {
    c.constructor: c
    for c in (ConstantSchedule, CosineSchedule, LinearSchedule, StepSchedule, InverseTimeSchedule)
}


@dataclass(frozen=True, kw_only=True)
class Train(Node):
    """``train { ... }``: optimizer, loss, batch size, duration, frozen layers, schedule."""

    optimizer: Any = option_field(Nested(tuple(OPTIMIZERS)), help="sgd(...), langevin(...) or adam(...)")
    loss: Value = option_field(Choice(LOSSES), default="mse", help="loss function")
    batch: Value = option_field(Int(min=1), default=1, help="minibatch size B")
    steps: Value = option_field(Int(min=1), default=None, help="number of SGD steps")
    epochs: Value = option_field(Int(min=1), default=None, help="passes over a finite training set")
    freeze: Value = option_field(Layers(allow_empty=True), default=(), help="layers that never move")
    schedule: Any = option_field(
        Nested(tuple(SCHEDULES), bare=True), default=ConstantSchedule(), help="learning-rate schedule ξ"
    )

    def validate(self) -> None:
        if self.steps is not None and self.epochs is not None:
            self.fail("epochs", "give either 'steps' or 'epochs', not both")
        if self.steps is None and self.epochs is None:
            self.fail(None, "'train' needs 'steps' or 'epochs'", hint="e.g. steps = 1000")


# ---- record ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Observable(Node):
    """One recorded quantity, e.g. ``output(probes = 32)``.  Arguments an observable
    does not take are ``None``; ``layer = None`` means its default (all layers it
    applies to; the first hidden layer for ``particles``)."""

    name: str = option_field(Choice(OBSERVABLES), help="observable")
    probes: Value = option_field(Int(min=1, max=100000), default=None, help="number of probe inputs")
    layer: Value = option_field(Layers(), default=None, help="layers observed")
    sample: Value = option_field(Int(min=1, max=100000), default=None, help="neurons sampled")

    @classmethod
    def accepted(cls, name: str) -> tuple[str, ...]:
        """The arguments observable ``name`` takes."""
        kind = OBSERVABLE_KINDS.get(name)
        return kind.args if kind is not None else ()

    def validate(self) -> None:
        if (
            self.name == "particles"
            and self.layer is not None
            and not is_expr(self.layer)
            and len(self.layer) != 1
        ):
            self.fail("layer", "particles(layer = N) observes a single hidden layer")


@dataclass(frozen=True, kw_only=True)
class Record(Node):
    """``record every N { ... }`` (every N steps) or ``record log N { ... }`` (N
    log-spaced steps)."""

    mode: str = option_field(Choice(("every", "log")), default="every", help="spacing")
    count: Value = option_field(Int(min=1), default=100, help="interval (every) or number of records (log)")
    observables: tuple[Observable, ...] = ()

    def label(self, name: str) -> str:
        return self.mode if name == "count" and isinstance(self.mode, str) else name

    def validate(self) -> None:
        seen: dict[str, Observable] = {}
        for obs in self.observables:
            if obs.name in seen:
                raise SpecError(f"'{obs.name}' is recorded twice", obs.span)
            seen[obs.name] = obs
        if not self.observables:
            self.fail(None, "'record' lists no observables", hint="e.g. record every 100 { train_loss }")


# ---- sweep, backends, spec -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SweepVar(Node):
    """One swept variable and its values, in order."""

    name: str
    values: tuple[Any, ...]


@dataclass(frozen=True, kw_only=True)
class Sweep(Node):
    """``sweep { width = [...], seed = [...], NAME = [...] }``: the Cartesian product,
    ``width`` first, then ``seed``, then the others in the order written."""

    variables: tuple[SweepVar, ...] = ()

    def __getitem__(self, name: str) -> tuple[Any, ...]:
        for var in self.variables:
            if var.name == name:
                return var.values
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def validate(self) -> None:
        names = self.names
        if "width" not in names:
            self.fail(None, "the sweep has no 'width'", hint="add e.g. sweep { width = [64, 256, 1024] }")
        seed = Int(min=0, max=2**32 - 1)
        kinds: dict[str, Kind] = {"width": Int(min=1), "seed": seed, "data_seed": seed, "init_seed": seed}
        for var in self.variables:
            # Each value is checked where it is written (``spans["values[i]"]``, set for
            # a list), so ``width = [64, 0]`` points at the 0.
            kind = kinds.get(var.name, AnyValue())
            seen: set[Any] = set()
            for i, value in enumerate(var.values):
                where = var.spans.get(f"values[{i}]") or var.where("values")
                value = kind.check(value, where, var.name)
                if value in seen:
                    raise SpecError(f"'{var.name}' lists {ex.describe(value)} twice", where)
                seen.add(value)
            ListOf(AnyValue(), min_length=1).check(var.values, var.where("values"), var.name)


@dataclass(frozen=True, kw_only=True)
class BackendOptions(Node):
    """A backend's options block, ``NAME { key = value, ... }``, checked against the
    options that backend declares."""

    backend: str
    values: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.values).get(key, default)


@dataclass(frozen=True, kw_only=True)
class Spec(Node):
    """A whole experiment.  Built by :func:`mfdsl.parse` / :func:`mfdsl.load`."""

    experiment: str
    data: Data
    network: Network | ConvNetwork = field(default_factory=Network)
    scaling: Value = option_field(Choice(SCALINGS), default="mean_field", help="parametrisation")
    init: Init | None = None
    train: Train
    record: Record | None = None
    sweep: Sweep
    backends: tuple[str, ...] = ("torch",)
    backend_options: tuple[BackendOptions, ...] = ()
    source: str | None = field(default=None, compare=False, repr=False)
    path: str | None = field(default=None, compare=False, repr=False)

    @property
    def dim(self) -> Value:
        """The input dimension."""
        return data_dim(self.data)

    def options_for(self, backend: str) -> BackendOptions | None:
        """The options block of ``backend``, if the spec has one."""
        return next((o for o in self.backend_options if o.backend == backend), None)

    def validate(self) -> None:
        net, train = self.network, self.train
        depth = net.hidden if not is_expr(net.hidden) else None
        if depth is not None:
            self._check_layers(depth)
        if isinstance(net, ConvNetwork):
            self._check_cnn(net)
        kind = task(self.data)
        if not is_expr(train.loss):
            if train.loss == "logistic" and kind != "binary":
                train.fail("loss", f"the logistic loss needs two classes, but this data is {kind}")
            if train.loss == "cross_entropy" and kind == "regression":
                train.fail("loss", "cross_entropy needs class labels; the teacher task is regression")
            if train.loss == "cross_entropy" and kind == "binary" and task_known(self.data):
                two = (
                    f"classes = {list(self.data.classes)} makes"
                    if isinstance(self.data, ImageData)
                    else f"{self.data.kind} is"
                )
                train.fail(
                    "loss",
                    f"cross_entropy needs three or more classes, but {two} a binary task (labels ±1, one output)",
                    hint="use loss = logistic or mse for two classes"
                    + (", or keep three or more classes" if isinstance(self.data, ImageData) else ""),
                )
            self._check_outputs(kind)
        if train.epochs is not None and not is_expr(self.data.train) and self.data.train == "online":
            train.fail(
                "epochs", "'epochs' needs a finite training set, but the data is online", hint="use 'steps'"
            )
        if self.record is not None and kind == "regression":
            for obs in self.record.observables:
                if obs.name == "test_accuracy":
                    raise SpecError(
                        "test_accuracy needs class labels; the teacher task is regression", obs.span
                    )
        n_test = static_test_size(self.data)
        if self.record is not None and n_test is not None:
            for obs in self.record.observables:
                if obs.probes is not None and not is_expr(obs.probes) and obs.probes > n_test:
                    obs.fail(
                        "probes",
                        f"{obs.name} asks for {obs.probes} probe inputs, but the test set has only {n_test} points",
                        hint=f"the probes are the first test points: use at most {n_test}, or a larger 'test'",
                    )

    def _check_outputs(self, kind: str) -> None:
        """The network's outputs fit the task: one for binary and regression data, one
        per class for multiclass data (``cross_entropy``'s logits, ``mse``'s one-hot
        targets)."""
        net, loss = self.network, self.train.loss
        if is_expr(net.outputs) or not task_known(self.data):
            return
        if kind != "multiclass":
            if net.outputs not in ("auto", 1):
                net.fail(
                    "outputs",
                    f"{kind} data has one target per example, so the network has one output, not {net.outputs}",
                    hint="outputs = 1, or leave it out (auto)",
                )
            return
        assert isinstance(self.data, (ImageData, Textures))
        k = self.data.classes if isinstance(self.data, Textures) else len(self.data.classes)
        if net.outputs != "auto" and net.outputs != k:
            targets = "one-hot targets" if loss == "mse" else "logits"
            net.fail(
                "outputs",
                f"the data has {k} classes, so the network needs {k} outputs ({loss}'s {targets}), "
                f"not {net.outputs}",
                hint=f"outputs = {k}, or leave it out (auto)",
            )

    def _check_cnn(self, net: ConvNetwork) -> None:
        """A cnn reads images and its layers fit the image."""
        shape = image_shape(self.data)
        if shape is None:
            net.fail(
                None,
                f"a cnn network needs image data (textures, mnist, fashion_mnist or cifar10), "
                f"but the data is {self.data.kind}",
                hint="use 'data textures { ... }' for a synthetic image task, or 'network mlp'",
            )
        if any(is_expr(v) for v in shape):
            return
        from mfdsl.core.geometry import ConvLayerPlan, conv_size, shape_problem

        _, h, w = (int(v) for v in shape)
        for i, layer in enumerate(net.layers, start=1):
            if not layer.concrete("kernel", "stride", "padding", "pool"):
                return
            plan = ConvLayerPlan(
                kernel=layer.kernel, stride=layer.stride, padding=layer.padding, pool=layer.pool
            )
            problem = shape_problem(plan, h, w)
            if problem:
                layer.fail(None, f"conv layer {i} (layer {i} of the network): {problem}")
            h, w = conv_size(h, plan) // plan.pool, conv_size(w, plan) // plan.pool

    def _check_layers(self, depth: int) -> None:
        last = depth + 1

        def resolve(sel: Any, node: Node, name: str, allowed: range, what: str) -> list[int]:
            layers = [last if s == "last" else s for s in sel]
            for layer in layers:
                if layer not in allowed:
                    node.fail(
                        name,
                        f"layer {layer} is not {what}: the network has {_count(depth, 'hidden layer')}, "
                        f"so its {what.removeprefix('a ')}s are {allowed.start}..{allowed.stop - 1}",
                    )
            return layers

        weights = range(1, last + 1)
        if self.init is not None:
            covered: dict[int, InitRule] = {}
            for rule in self.init.rules:
                if is_expr(rule.layers):
                    return
                for layer in resolve(rule.layers, rule, "layers", weights, "a weight layer"):
                    if layer in covered:
                        first = covered[layer].span
                        at = f" (first at line {first.line})" if first else ""
                        rule.fail("layers", f"layer {layer} is initialised twice{at}")
                    covered[layer] = rule
                    if isinstance(rule.dist, Embedded):
                        _check_embedded(rule.dist, layer, last)
            missing = [layer for layer in weights if layer not in covered]
            if missing:
                self.init.fail(
                    None,
                    f"no init rule for layer{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))}; every weight layer 1..{last} needs exactly one",
                    hint=f"add e.g. 'layer {missing[0]} ~ normal(0, 1)'",
                )
        if not is_expr(self.train.freeze):
            resolve(self.train.freeze, self.train, "freeze", weights, "a weight layer")
        if self.record is not None:
            hidden = range(1, last)
            for obs in self.record.observables:
                if obs.layer is None or is_expr(obs.layer):
                    continue
                if obs.name in ("weight_change", "preactivation_rms"):
                    resolve(obs.layer, obs, "layer", weights, "a weight layer")
                else:
                    resolve(obs.layer, obs, "layer", hidden, "a hidden layer")


def _check_embedded(dist: Embedded, layer: int, last: int) -> None:
    """The inputs and outputs have no latent coordinate: ``u_in`` is undefined in weight
    layer 1 and ``u_out`` in the read-out (the paper's ``w_1(c_1)``, ``w_{L+1}(c_L)``)."""
    for name in _latent.latent_names(dist.mean):
        if name.id == "u_in" and layer == 1:
            raise SpecError(
                "'u_in' is undefined in layer 1: its weights leave the data's input coordinates, "
                "which are not neurons and have no latent coordinate",
                name.span or dist.where("mean"),
                hint="layer 1's weights w_1(c_1) may depend on the coordinate of the neuron they enter: "
                "use u_out (or select layers 2.. for this rule)",
            )
        if name.id == "u_out" and layer == last:
            raise SpecError(
                f"'u_out' is undefined in layer {last}, the read-out: its weights enter the network's "
                "outputs, which are not neurons and have no latent coordinate",
                name.span or dist.where("mean"),
                hint="the read-out's weights w_{L+1}(c_L) may depend on the coordinate of the neuron they "
                "leave: use u_in (or select layers ..L for this rule)",
            )


def _count(n: int, noun: str) -> str:
    """``1 hidden layer``, ``3 hidden layers``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_options(options: tuple[Option, ...]) -> str:
    """One line per option, for help texts and docs."""
    lines = []
    for opt in options:
        default = "required" if opt.default is REQUIRED else f"default {opt.default!r}"
        lines.append(f"{opt.name}: {opt.kind.describe()} ({default}) — {opt.help}")
    return "\n".join(lines)
