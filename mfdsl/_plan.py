"""The backend-neutral run plan: one sweep point, fully resolved, as plain data.

A backend receives a :class:`RunPlan` and nothing else; it never looks at the spec's
syntax.  The plan holds numbers and names only (numpy at most) so it pickles cheaply
to worker processes and imports neither torch nor jax.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import _streams
from ._conv import ConvPlan

# probe inputs of output/neuron_spread when the spec names none
DEFAULT_PROBES = 16

DistKind = Literal["normal", "uniform", "constant"]


@dataclass(frozen=True, kw_only=True)
class DistPlan:
    """An i.i.d. initial law for the entries of one weight matrix.

    ``normal``: ``a`` = mean, ``b`` = std; ``uniform``: ``a`` = low, ``b`` = high;
    ``constant``: ``a`` = value.
    """

    kind: DistKind
    a: float
    b: float = 0.0

    @property
    def mean(self) -> float:
        if self.kind == "uniform":
            return 0.5 * (self.a + self.b)
        return self.a

    @property
    def std(self) -> float:
        if self.kind == "normal":
            return self.b
        if self.kind == "uniform":
            return (self.b - self.a) / math.sqrt(12.0)
        return 0.0

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draw float64 samples of the given shape."""
        if self.kind == "normal":
            return rng.normal(self.a, self.b, size=shape)
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b, size=shape)
        return np.full(shape, float(self.a))


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """Weight layer ``index`` (1 … L+1): ``W`` has shape ``(fan_in, fan_out)``.

    The forward pass computes ``forward_mult * (φ(H_prev) @ W) (+ b)``; SGD moves ``W`` by
    ``-lr * schedule * lr_mult * grad``.  A bias, when present, is initialised to 0 and
    takes ``bias_lr_mult``.  Weight decay and Langevin noise act per entry at the rate
    ``lr * schedule * decay_mult`` (``None``: the learning-rate multiplier).  Under
    mean-field scaling this is 1, not ``lr_mult``: ``lr_mult`` only undoes the 1/n factors
    of the gradient, and the limit's drift -λθ and noise β⁻¹Δρ do not depend on the width.

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
    """``sgd`` (heavy-ball momentum, L2 weight decay) or ``langevin``.

    ``langevin`` adds, per step and per entry, Gaussian noise of variance
    ``2 * lr * schedule * rate * temperature`` (the parameter's noise rate, see
    :class:`LayerPlan`; 0 for the shared output bias) to an SGD step with weight decay.
    """

    kind: Literal["sgd", "langevin"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    temperature: float = 0.0


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
    ``output`` and ``neuron_spread`` (the probe inputs are the first ``probes`` test
    points), ``sample`` for ``particles``."""

    name: Literal[
        "train_loss",
        "test_loss",
        "test_accuracy",
        "output",
        "neuron_spread",
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
    data: Any  # an ``mfdsl._ir`` data node, concrete; ``mfdsl.make_dataset`` reads it
    batch: int
    steps: int
    optimizer: OptimizerPlan
    schedule: SchedulePlan
    record_steps: np.ndarray  # int64, sorted, within [0, steps]
    observables: tuple[ObservablePlan, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # this backend's options
    #: the convolutional part of a ``network cnn`` (``None`` for an mlp); its layers are
    #: weight layers 1 … len(conv.layers) of ``layers`` (``mfdsl._conv``)
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
            self.seed,
            [layer.init for layer in self.layers],
            [(layer.fan_in, layer.fan_out) for layer in self.layers],
        )


def initial_weights(
    seed: int, laws: Sequence[DistPlan], shapes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """Initial weights, float64: weight layer ℓ (1 … L+1) is ``laws[ℓ-1].sample(g,
    shapes[ℓ-1])`` with ``g`` the generator of stream ``INIT``, index ℓ
    (:mod:`mfdsl._streams`).  Each layer has its own stream, so a layer's draws depend
    on its own law and shape only: a width-``N`` network and a particle system with
    ``N`` particles share every layer whose shape they share, whatever the others.
    Every backend initialises through this function."""
    if len(laws) != len(shapes):
        raise ValueError(f"{len(laws)} laws for {len(shapes)} layers")
    return [
        np.asarray(law.sample(_streams.rng(seed, _streams.Stream.INIT, ell), tuple(shape)), np.float64)
        for ell, (law, shape) in enumerate(zip(laws, shapes, strict=True), start=1)
    ]


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
