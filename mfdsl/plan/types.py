"""The backend-neutral run plan: one sweep point, fully resolved, as plain data.

A backend receives a :class:`RunPlan` and nothing else; it never looks at the spec's
syntax.  The plan holds numbers and names only (numpy at most) so it pickles cheaply
to worker processes and imports neither torch nor jax.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mfdsl.core import streams as _streams
from mfdsl.plan.conv import ConvPlan

if TYPE_CHECKING:
    from mfdsl.language.ir import Data

# probe inputs of output/neuron_spread when the spec names none
DEFAULT_PROBES = 16

DistKind = Literal["normal", "uniform", "constant", "embedded"]


@dataclass(frozen=True, kw_only=True)
class DistPlan:
    """The initial law of the entries of one weight matrix.

    I.i.d. laws: ``normal``: ``a`` = mean, ``b`` = std; ``uniform``: ``a`` = low, ``b`` =
    high; ``constant``: ``a`` = value.

    ``embedded`` (a neuronal embedding, :mod:`mfdsl.language.latent`): the entry joining a
    neuron of latent coordinate ``u_in`` to one of coordinate ``u_out`` is ``a ·
    fn(u_in, u_out) + b · ε`` with ``ε ~ N(0, 1)`` i.i.d.; ``fn`` is an ``mfdsl.language.expr``
    expression whose only names are ``u_in`` and ``u_out`` (a ``Num`` if it has none).
    Its entries are not i.i.d., so it is drawn by :func:`initial_weights`, which knows
    the coordinates, not by :meth:`sample`; ``std`` is the std of its i.i.d. part and it
    has no single ``mean``.
    """

    kind: DistKind
    a: float
    b: float = 0.0
    fn: Any = None

    @property
    def embedded(self) -> bool:
        """Whether the weights are functions of the neurons' latent coordinates."""
        return self.kind == "embedded"

    @property
    def varies(self) -> bool:
        """Whether this is an ``embedded`` law whose mean function takes more than one
        value on ``[0, 1]²`` (on a grid: ``mfdsl.language.latent.varies``).  One that does not,
        ``embedded(mean = 1 + a * cos(u_in), …)`` at ``a = 0`` say, is an i.i.d. law."""
        from mfdsl.language.latent import varies

        return self.kind == "embedded" and varies(self.fn)

    def iid(self) -> DistPlan:
        """The same law as an i.i.d. one where it is one: an ``embedded`` law whose mean
        function does not vary becomes ``normal`` (or ``constant``) with that mean; every
        other law is itself.  (Its draws differ: use it where the law, not the sample,
        matters.)"""
        if self.kind != "embedded" or self.varies:
            return self
        from mfdsl.language.latent import evaluate

        mean = self.a * float(np.ravel(evaluate(self.fn, 0.5, 0.5))[0])
        return DistPlan(kind="normal", a=mean, b=self.b) if self.b > 0 else DistPlan(kind="constant", a=mean)

    @property
    def mean(self) -> float:
        if self.kind == "embedded":
            raise ValueError("an embedded law has no single mean: it is a function of the coordinates")
        if self.kind == "uniform":
            return 0.5 * (self.a + self.b)
        return self.a

    @property
    def std(self) -> float:
        if self.kind in ("normal", "embedded"):
            return self.b
        if self.kind == "uniform":
            return (self.b - self.a) / math.sqrt(12.0)
        return 0.0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draw float64 samples of the given shape (an i.i.d. law)."""
        if self.kind == "embedded":
            raise ValueError("an embedded law needs the neurons' coordinates: draw it with initial_weights")
        if self.kind == "normal":
            return rng.normal(self.a, self.b, size=shape)
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b, size=shape)
        return np.full(shape, float(self.a))

    def sample_embedded(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int],
        u_in: np.ndarray | None,
        u_out: np.ndarray | None,
    ) -> np.ndarray:
        """Draw a ``(fan_in, fan_out)`` matrix of an ``embedded`` law: ``u_in`` are the
        coordinates of the ``fan_in`` neurons below (``None`` for the inputs), ``u_out``
        of the ``fan_out`` neurons above (``None`` for the outputs).  The i.i.d. part is
        ``rng.standard_normal(shape)``, drawn only when ``b > 0``."""
        from mfdsl.language.latent import evaluate

        rows = None if u_in is None else np.asarray(u_in, np.float64)[:, None]
        cols = None if u_out is None else np.asarray(u_out, np.float64)[None, :]
        m = np.broadcast_to(evaluate(self.fn, rows, cols), shape)
        if not np.all(np.isfinite(m)):
            raise ValueError("the embedded mean function is not finite at some neurons' coordinates")
        w = self.a * m
        if self.b > 0.0:
            w = w + self.b * rng.standard_normal(shape)
        return np.array(w, np.float64)


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """Weight layer ``index`` (1 … L+1): ``W`` has shape ``(fan_in, fan_out)``.

    The forward pass computes ``forward_mult * (φ(H_prev) @ W) (+ b)``; SGD moves ``W`` by
    ``-lr * schedule * lr_mult * grad``.  A bias, when present, is initialised to 0 and
    takes ``bias_lr_mult``.  Weight decay and Langevin noise act per entry at the rate
    ``lr * schedule * decay_mult`` (``None``: the learning-rate multiplier).  Under
    mean-field scaling this is 1, not ``lr_mult``: ``lr_mult`` only undoes the 1/n factors
    of the gradient, and the limit's drift -λθ and noise β⁻¹Δρ do not depend on the width.

    Under ``adam`` ``lr_mult`` and ``bias_lr_mult`` are the scaling's Adam rates (a
    different table from SGD's, ``docs/language.md``), and ``eps_mult`` and
    ``bias_eps_mult`` scale Adam's ε with the gradient's scale where the scaling says so.

    ``bias_noise_mult`` overrides the bias's noise rate (``None``: its decay rate).  The
    compiler sets it to 0 for the output bias: that bias is one coordinate shared by all
    neurons at every width, so noise on it never averages out and would leave the
    mean-field limit a random path (``docs/mean-field.md``, "Shared parameters").  The
    backends read the rates from :attr:`noise_rate` and :attr:`bias_noise_rate`.
    """

    index: int
    fan_in: int
    fan_out: int
    forward_mult: float
    lr_mult: float
    init: DistPlan
    bias: bool = False
    bias_lr_mult: float = 1.0
    decay_mult: float | None = None
    bias_decay_mult: float | None = None
    bias_noise_mult: float | None = None
    eps_mult: float = 1.0
    bias_eps_mult: float = 1.0
    frozen: bool = False

    @property
    def noise_rate(self) -> float:
        """The weights' Langevin noise rate ``r``: per step and entry, noise of variance
        ``2 · lr · schedule · r · temperature``."""
        return self.lr_mult if self.decay_mult is None else self.decay_mult

    @property
    def bias_noise_rate(self) -> float:
        """The bias's Langevin noise rate (0 for a parameter shared by all neurons)."""
        if self.bias_noise_mult is not None:
            return self.bias_noise_mult
        return self.bias_lr_mult if self.bias_decay_mult is None else self.bias_decay_mult


@dataclass(frozen=True, kw_only=True)
class OptimizerPlan:
    """``sgd`` (heavy-ball momentum, L2 weight decay), ``langevin`` or ``adam``.

    ``langevin`` adds, per step and per entry, Gaussian noise of variance
    ``2 * lr * schedule * rate * temperature`` (the parameter's noise rate, see
    :class:`LayerPlan`; 0 for the shared output bias) to an SGD step with weight decay.

    ``adam`` is ``torch.optim.AdamW`` per parameter tensor, with the learning rate
    ``lr * schedule * lr_mult`` (the layer's Adam rate, see :class:`LayerPlan`), ε
    ``eps * eps_mult`` and the decoupled weight decay ``p ← (1 − lr · schedule · lr_mult
    · weight_decay) p`` before the step (with ``weight_decay = 0``, ``torch.optim.Adam``).
    """

    kind: Literal["sgd", "langevin", "adam"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    temperature: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True, kw_only=True)
class SchedulePlan:
    """The learning-rate factor ξ as a function of the step (0-based, of ``total``)."""

    kind: Literal["constant", "cosine", "linear", "step", "inverse_time"] = "constant"
    final: float = 0.0  # cosine, linear: the factor reached at the last step
    every: int = 1  # step: decay period in steps
    factor: float = 1.0  # step: multiply by this every ``every`` steps
    rate: float = 0.0  # inverse_time: ξ = 1 / (1 + rate * step / total)

    def __call__(self, step: np.ndarray | int, total: int) -> np.ndarray:
        s = np.asarray(step, dtype=np.float64)
        frac = s / max(total, 1)
        if self.kind == "constant":
            return np.ones_like(s)
        if self.kind == "cosine":
            return self.final + (1.0 - self.final) * 0.5 * (1.0 + np.cos(np.pi * frac))
        if self.kind == "linear":
            return 1.0 + (self.final - 1.0) * frac
        if self.kind == "step":
            return np.power(self.factor, np.floor(s / self.every))
        return 1.0 / (1.0 + self.rate * frac)


@dataclass(frozen=True, kw_only=True)
class ObservablePlan:
    """One recorded quantity.  ``layers`` for layered observables, ``probes`` for
    ``output``, ``neuron_spread`` and ``preactivation_rms`` (the probe inputs are the first ``probes`` test
    points), ``sample`` for ``particles``."""

    name: Literal[
        "train_loss",
        "test_loss",
        "test_accuracy",
        "output",
        "neuron_spread",
        "preactivation_rms",
        "weight_change",
        "particles",
    ]
    layers: tuple[int, ...] = ()
    probes: int = 0
    sample: int = 0

    def layers_or(self, default: Iterable[int], lo: int, hi: int) -> tuple[int, ...]:
        """The chosen layers, or ``default`` when none were; each must lie in ``lo … hi``."""
        layers = tuple(int(ell) for ell in self.layers) or tuple(default)
        for ell in layers:
            if not lo <= ell <= hi:
                raise ValueError(f"{self.name}: layer {ell} is outside {lo} … {hi}")
        return layers

    def layers_in(self, depth: int) -> tuple[int, ...]:
        """:meth:`layers_or` with the observable's own default layers and range in a
        network of ``depth`` hidden layers (``ir.OBSERVABLE_KINDS``): weight layers
        1 … L+1 for those observed on every weight layer, hidden layers 1 … L else."""
        from mfdsl.language.ir import OBSERVABLE_KINDS

        kind = OBSERVABLE_KINDS[self.name]
        return self.layers_or(kind.layers(depth), 1, depth + 1 if kind.default_layers == "all" else depth)

    def probe_count(self, n_test: int) -> int:
        """How many probe inputs (the first test points): ``probes``, or by default
        ``min(DEFAULT_PROBES, n_test)``."""
        if self.probes < 0:
            raise ValueError(f"{self.name}: probes must be ≥ 0")
        if self.probes == 0:
            return min(DEFAULT_PROBES, n_test)
        if self.probes > n_test:
            raise ValueError(f"{self.name}: {self.probes} probes but only {n_test} test points")
        return int(self.probes)


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """Everything a backend needs to train one network (or compute one limit)."""

    experiment: str
    coords: Mapping[str, Any]  # the sweep point: width, seed and every other variable
    width: float  # the nominal width (math.inf for a limit)
    seed: int
    scaling: str
    layers: tuple[LayerPlan, ...]
    activation: str
    output: str  # the output map ψ
    loss: Literal["mse", "logistic", "cross_entropy"]
    #: the concrete data node (every expression evaluated at the sweep point): what
    #: :func:`mfdsl.plugin.make_dataset` reads; its kinds are ``mfdsl.plugin.Data``
    data: Data
    batch: int
    steps: int
    optimizer: OptimizerPlan
    schedule: SchedulePlan
    record_steps: np.ndarray  # int64, sorted, within [0, steps]
    observables: tuple[ObservablePlan, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # this backend's options
    #: the seed of the data's draws and the Langevin noise, when the sweep sets it apart
    #: from ``seed`` (sweep variable ``data_seed``); ``None``: ``seed``
    data_seed: int | None = None
    #: the seed of the initial weights and the sampled particles, when the sweep sets it
    #: apart from ``seed`` (sweep variable ``init_seed``); ``None``: ``seed``
    init_seed: int | None = None

    @property
    def seed_of_data(self) -> int:
        """The seed of the data streams (:data:`mfdsl.core.streams.DATA_STREAMS`) and of
        ``NOISE``: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def seed_of_init(self) -> int:
        """The seed of ``INIT``, ``PARTICLES`` and ``IID``: ``init_seed``, else ``seed``."""
        return self.seed if self.init_seed is None else self.init_seed

    #: the convolutional part of a ``network cnn`` (``None`` for an mlp); its layers are
    #: weight layers 1 … len(conv.layers) of ``layers`` (``mfdsl.plan.conv``)
    conv: ConvPlan | None = None

    @property
    def depth(self) -> int:
        """The number of hidden layers L."""
        return len(self.layers) - 1

    def time(self, step: np.ndarray | int) -> np.ndarray:
        """Mean-field time ``t = lr * step``."""
        return self.optimizer.lr * np.asarray(step, dtype=np.float64)

    def initial_weights(self) -> list[np.ndarray]:
        """The finite network's initial weights, float64, one ``(fan_in, fan_out)`` array
        per weight layer (:func:`initial_weights` with the layers' laws and shapes)."""
        return initial_weights(
            self.seed_of_init,
            [layer.init for layer in self.layers],
            [(layer.fan_in, layer.fan_out) for layer in self.layers],
        )


def latent_coordinates(seed: int, layer: int, n: int) -> np.ndarray:
    """The latent coordinates of the ``n`` neurons of hidden layer ``layer`` (1 … L):
    ``uniform(0, 1, n)`` from stream ``LATENT``, index ``layer``.  They depend on the
    layer's width only, so a width-``N`` network and ``N`` particles share them."""
    return _streams.rng(seed, _streams.Stream.LATENT, layer).uniform(0.0, 1.0, size=n)


def initial_weights(
    seed: int, laws: Sequence[DistPlan], shapes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """Initial weights, float64: weight layer ℓ (1 … L+1) is ``laws[ℓ-1].sample(g,
    shapes[ℓ-1])`` with ``g`` the generator of stream ``INIT``, index ℓ
    (:mod:`mfdsl.core.streams`).  Each layer has its own stream, so a layer's draws depend
    on its own law and shape only: a width-``N`` network and a particle system with
    ``N`` particles share every layer whose shape they share, whatever the others.
    An ``embedded`` law is evaluated on the latent coordinates of the hidden layers it
    joins (:func:`latent_coordinates`; hidden layer ℓ is the ``fan_out`` of weight layer
    ℓ), its i.i.d. part drawn from ``g``.  Every backend initialises through this
    function."""
    if len(laws) != len(shapes):
        raise ValueError(f"{len(laws)} laws for {len(shapes)} layers")
    depth = len(laws) - 1
    coords: dict[int, np.ndarray] = {}

    def latent(layer: int) -> np.ndarray | None:
        if not 1 <= layer <= depth:
            return None  # the inputs and the outputs are not neurons
        if layer not in coords:
            coords[layer] = latent_coordinates(seed, layer, int(shapes[layer - 1][1]))
        return coords[layer]

    weights = []
    for ell, (law, shape) in enumerate(zip(laws, shapes, strict=True), start=1):
        g = _streams.rng(seed, _streams.Stream.INIT, ell)
        if law.embedded:
            fan_in, fan_out = (int(n) for n in shape)
            w = law.sample_embedded(g, (fan_in, fan_out), latent(ell - 1), latent(ell))
        else:
            w = law.sample(g, tuple(shape))
        weights.append(np.asarray(w, np.float64))
    return weights


def check_compatible(loss: str, task: str, outputs: int) -> None:
    """Raise ``ValueError`` unless ``loss`` suits a dataset of this task with ``outputs``
    network outputs (a backend's last guard; the spec's validation catches these first)."""
    if loss not in ("mse", "logistic", "cross_entropy"):
        raise ValueError(f"unknown loss {loss!r}")
    if task not in ("binary", "multiclass", "regression"):
        raise ValueError(f"unknown dataset task {task!r}")
    if loss == "logistic" and (task == "multiclass" or outputs != 1):
        raise ValueError("the logistic loss needs one output and ±1 targets")
    if loss == "cross_entropy" and task != "multiclass":
        raise ValueError(f"cross_entropy needs a multiclass dataset, not {task}")
    if task == "binary" and outputs != 1:
        raise ValueError("a binary dataset has one output")
