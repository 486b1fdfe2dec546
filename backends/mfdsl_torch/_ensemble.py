"""Ensembles: many finite networks of one shape trained as one batched network, each
member getting, bit for bit, the numbers it gets alone (``mfdsl_torch._single.train``
*is* :func:`train_ensemble` with one member: one code path).  How that holds — ATen's
batched routes, lazy updates, the compiled loop — is ``backends/mfdsl_torch/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mfdsl.plugin import PL_S1, PL_SLOPE, PL_T1, PL_T2, LayerPlan, RunPlan, check_compatible

from ._engine import (
    _CHUNK_ELEMENTS,
    _DTYPES,
    Dataset,
    MemberNet,
    Result,
    _allocate,
    _make_observer,
    _prepare_targets,
)
from ._noise import NoiseSource, slot
from ._options import option

__all__ = ["Ensemble", "EnsembleTrainer", "ensemble_key", "group_plans", "is_batched", "train_ensemble"]

#: member strides are multiples of this many elements (512 bytes in float64)
_ALIGN = 64
#: ATen's CPU bmm uses a plain loop kernel below this m·n·k (LinearAlgebra.cpp)
_BMM_NAIVE = 400
#: ATen's element-wise grain: an op over fewer elements runs on one thread
_GRAIN = 32768
#: row blocks of this many bytes per member for the fused backward product + update
_BLOCK_BYTES = 1 << 20
#: layers with more weight bytes per member than this are processed in row blocks, or
#: take lazy updates
_BLOCK_MIN_BYTES = 1 << 21
#: a lazy layer folds its pending updates into its weights every this many steps
_LAZY_STEPS = 32
#: lazy updates only for minibatches of at most this many examples
_LAZY_MAX_BATCH = 4
#: the native step loop draws a member's Langevin noise in pieces of at most this many
#: entries (several steps' worth, or one step's)
_NOISE_ELEMENTS = 1 << 20
#: networks whose largest weight matrix has at most this many entries train in batched
#: mode (one MKL batched gemm for all members), the others member by member
_BATCHED_MAX = 1 << 16


#: a lazy product's operands for one member (see EnsembleTrainer._make_lazy_views)
_Views5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]

# --------------------------------------------------------------------------- kernels


def padded(
    E: int, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype, fill: float = 0.0
) -> Tensor:
    """A zeroed ``(E, *shape)`` tensor whose members are contiguous but ``S`` elements
    apart, ``S`` a multiple of :data:`_ALIGN` larger than a member (so the whole is never
    contiguous when ``E > 1``)."""
    shape = tuple(int(s) for s in shape)
    per = math.prod(shape)
    stride = -(-(per + 1) // _ALIGN) * _ALIGN
    buf = torch.full((E * stride,), fill, device=device, dtype=dtype)
    strides: list[int] = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return buf.as_strided((E, *shape), (stride, *reversed(strides)))


class _Gemm:
    """One matrix-product site of the step, ``out ← β·out + α·(a @ b)`` per member, its
    operands fixed views of the step's buffers.

    In batched mode ``out`` is contiguous and ATen calls MKL's batched gemm once for all
    members (at least two: a one-member ensemble carries a dummy).  Otherwise ``out`` is
    padded and ATen calls ``addmm_`` member by member; a one-member ensemble calls that
    ``addmm_`` on the 2-D views itself (ATen would take the batched gemm, which rounds
    differently).  Products with ``m·n·k < 400`` take ATen's plain loop kernel in either
    mode, whatever the number of members."""

    __slots__ = ("a", "a2", "b", "b2", "beta", "o2", "out")

    def __init__(self, out: Tensor, a: Tensor, b: Tensor, *, beta: float) -> None:
        self.out, self.a, self.b, self.beta = out, a, b, beta
        self.o2: Tensor | None = None
        if (
            out.shape[0] == 1
            and out.device.type == "cpu"
            and a.shape[1] * a.shape[2] * b.shape[2] >= _BMM_NAIVE
        ):
            self.o2, self.a2, self.b2 = out[0], a[0], b[0]

    def __call__(self, alpha: float) -> None:
        if self.o2 is not None:
            self.o2.addmm_(self.a2, self.b2, beta=self.beta, alpha=alpha)
        elif self.beta == 0.0:
            torch.baddbmm(self.out, self.a, self.b, beta=0.0, alpha=alpha, out=self.out)
        else:
            self.out.baddbmm_(self.a, self.b, beta=self.beta, alpha=alpha)


def _native_mode(native: bool | str) -> str:
    """The ``native`` option's value (``True``: ``auto``, ``False``: ``off``)."""
    from ._native import MODES

    mode = {True: "auto", False: "off"}.get(native, native) if isinstance(native, bool) else str(native)
    if mode not in MODES:
        raise ValueError(f"native must be one of {', '.join(MODES)}, not {native!r}")
    return mode


def _split(t: Tensor) -> bool:
    """Whether an element-wise op over ``t`` must run member by member to stay
    member-invariant (ATen may cut a large op across threads inside a member)."""
    return t.shape[0] > 1 and t.device.type == "cpu" and t.numel() >= _GRAIN and torch.get_num_threads() > 1


def _each(fn: Callable[..., Any], t: Tensor, *args: Any, **kw: Any) -> None:
    """``fn(t, *args, **kw)`` on the ensemble, or on each member when :func:`_split`
    says so (tensor arguments and ``out=`` split likewise)."""
    if _split(t):
        out = kw.pop("out", None)
        for e in range(t.shape[0]):
            rest = [a[e] if isinstance(a, Tensor) else a for a in args]
            if out is None:
                fn(t[e], *rest, **kw)
            else:
                fn(t[e], *rest, out=out[e], **kw)
    else:
        fn(t, *args, **kw)


def _relu(h: Tensor, out: Tensor) -> None:
    torch.clamp_min(h, 0.0, out=out)


def _gelu(h: Tensor, out: Tensor) -> None:
    torch.ops.aten.gelu.out(h, out=out)


_ACT_OUT: dict[str, Callable[[Tensor, Tensor], Any]] = {
    "relu": _relu,
    "tanh": lambda h, out: torch.tanh(h, out=out),
    "sigmoid": lambda h, out: torch.sigmoid(h, out=out),
    "gelu": _gelu,
    "erf": lambda h, out: torch.erf(h, out=out),
}

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


# --------------------------------------------------------------------------- members


def ensemble_key(plan: RunPlan) -> tuple[Any, ...]:
    """What members of one ensemble must share: layer shapes, multipliers of the
    forward pass, biases, frozen layers, activation, output map, loss, batch, steps,
    record steps, and which optional update terms are on (momentum, weight decay per
    layer, Langevin noise, Adam).  Seeds, initial laws, learning rates, schedules, the
    optimiser's numbers, data and observables may differ."""
    opt = plan.optimizer
    wd_layers = tuple(
        (_layer_decay(ly, opt.weight_decay) != 0.0, ly.bias and _bias_decay(ly, opt.weight_decay) != 0.0)
        for ly in plan.layers
    )
    return (
        tuple((ly.fan_in, ly.fan_out, ly.forward_mult, ly.bias, ly.frozen) for ly in plan.layers),
        plan.activation,
        plan.output,
        plan.loss,
        int(plan.batch),
        int(plan.steps),
        tuple(int(s) for s in np.asarray(plan.record_steps).reshape(-1)),
        opt.momentum != 0.0,
        wd_layers,
        opt.kind == "langevin" and opt.temperature > 0,
        opt.kind == "adam",
    )


def _layer_decay(layer: LayerPlan, weight_decay: float) -> float:
    decay = layer.lr_mult if layer.decay_mult is None else layer.decay_mult
    return weight_decay * decay / layer.lr_mult


def _bias_decay(layer: LayerPlan, weight_decay: float) -> float:
    decay = layer.bias_lr_mult if layer.bias_decay_mult is None else layer.bias_decay_mult
    return weight_decay * decay / layer.bias_lr_mult


def _check_layers(plan: RunPlan) -> None:
    layers = tuple(plan.layers)
    if len(layers) < 2:
        raise ValueError("a network needs at least one hidden layer")
    for i, layer in enumerate(layers):
        if layer.index != i + 1:
            raise ValueError(f"layer {i + 1} has index {layer.index}")
        if i and layer.fan_in != layers[i - 1].fan_out:
            raise ValueError(
                f"layer {i + 1}: fan_in {layer.fan_in} does not match "
                f"fan_out {layers[i - 1].fan_out} of layer {i}"
            )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    dt = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if dt not in _DTYPES.values():
        raise ValueError(f"dtype must be float32 or float64, not {dtype}")
    assert isinstance(dt, torch.dtype)
    return dt


def is_batched(layers: Sequence[LayerPlan], device: torch.device) -> bool:
    """Whether an ensemble of these layers trains in batched mode (a property of one
    member's shapes, so a member takes the same kernels in any ensemble)."""
    return device.type != "cpu" or max(ly.fan_in * ly.fan_out for ly in layers) <= _BATCHED_MAX


class Ensemble:
    """The parameters of ``E`` networks of one shape: ``W[i]`` is ``(Ea, fan_in,
    fan_out)`` for weight layer ``i + 1``, ``b[i]`` ``(Ea, 1, fan_out)`` or ``None``;
    members ``0 … E−1`` are the plans', and ``Ea = 2`` for a one-member ensemble in
    batched mode (member 1 is a dummy that stays at zero input and is never read).

    Member ``e`` is initialised by ``plans[e].initial_weights()`` (the ``INIT`` streams of
    its seed), exactly as a network trained alone (float64 draws, then cast)."""

    def __init__(
        self,
        plans: Sequence[RunPlan],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        weights: Sequence[Tensor] | None = None,
        biases: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.plans = list(plans)
        if not self.plans:
            raise ValueError("an ensemble needs at least one member")
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype)
        for plan in self.plans:
            _check_layers(plan)
        key = ensemble_key(self.plans[0])
        for plan in self.plans[1:]:
            if ensemble_key(plan) != key:
                raise ValueError(
                    "ensemble members must share layer shapes, multipliers, "
                    "biases, frozen layers, activation, output, loss, batch, "
                    "steps, record steps and the optimiser's terms in use"
                )
        self.E = len(self.plans)
        first = self.plans[0]
        self.layers: tuple[LayerPlan, ...] = tuple(first.layers)
        self.activation = first.activation
        self.output = first.output
        self.batched = is_batched(self.layers, self.device)
        self.Ea = max(self.E, 2) if (self.batched and self.device.type == "cpu") else self.E
        self.W: list[Tensor] = []
        self.b: list[Tensor | None] = []
        for i, layer in enumerate(self.layers):
            w = self.out_buffer(layer.fan_in, layer.fan_out)
            if weights is not None:
                w[: self.E].copy_(weights[i])
            self.W.append(w)
            bias = None
            if layer.bias:
                bias = padded(self.Ea, (1, layer.fan_out), device=self.device, dtype=self.dtype)
                if biases is not None and biases[i] is not None:
                    bias[: self.E].copy_(biases[i])  # type: ignore[arg-type]
            self.b.append(bias)
        if weights is None:
            for e, plan in enumerate(self.plans):
                for i, init in enumerate(plan.initial_weights()):
                    self.W[i][e].copy_(torch.from_numpy(init))

    def out_buffer(self, *shape: int) -> Tensor:
        """A zeroed ``(Ea, *shape)`` buffer laid out as a product's output must be:
        contiguous in batched mode, padded otherwise."""
        if self.batched:
            return torch.zeros((self.Ea, *shape), device=self.device, dtype=self.dtype)
        return padded(self.Ea, shape, device=self.device, dtype=self.dtype)

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def member(self, e: int) -> MemberNet:
        """Member ``e`` as a network of its own (views of the ensemble's tensors)."""
        plan = self.plans[e]
        return MemberNet(
            layers=tuple(plan.layers),
            W=[w[e] for w in self.W],
            b=[None if b is None else b[e, 0] for b in self.b],
            activation=self.activation,
            output=self.output,
            device=self.device,
            dtype=self.dtype,
        )


# --------------------------------------------------------------------------- training


#: one row block of the fused backward product + update: (G_below block, g, W blockᵀ,
#: W block, Aᵀ block, c·g), all 2-D views of one member
_Block = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class _Coef:
    """A per-step coefficient of a chunk: a Python float when every member has the same
    value at every step, else a device tensor ``(n, Ea, 1, 1)`` indexed by step.  Both
    give the same products (a product is correctly rounded either way).  They are made
    on the first :meth:`at`: the native step loop reads only ``values``."""

    __slots__ = ("device", "dtype", "floats", "tensor", "values")

    def __init__(self, values: np.ndarray, device: torch.device, dtype: torch.dtype) -> None:
        self.values = values  # (n, Ea) float64
        self.device, self.dtype = device, dtype
        self.tensor: Tensor | None = None
        self.floats: list[float] | list[Tensor] | None = None

    def _convert(self) -> None:
        values, device, dtype = self.values, self.device, self.dtype
        if values.shape[1] == 1 or bool(np.all(values == values[:, :1])):
            if dtype == torch.float64 or device.type != "cpu":
                self.floats = values[:, 0].tolist()
            else:
                # ATen would convert a Python float to the tensors' dtype at every
                # product (an allocation and a copy); converted once here, the same way
                self.floats = list(torch.tensor(values[:, 0], dtype=torch.float64).to(dtype).unbind(0))
        else:
            self.tensor = torch.as_tensor(np.array(values[:, :, None, None])).to(device=device, dtype=dtype)

    def at(self, k: int) -> float | Tensor:
        if self.floats is None and self.tensor is None:
            self._convert()
        if self.floats is not None:
            return self.floats[k]
        assert self.tensor is not None
        return self.tensor[k]


class EnsembleTrainer:
    """SGD / Langevin / Adam steps on an :class:`Ensemble` (the optimiser of the engine's
    docstring, for every member at once), with the backward pass derived by hand."""

    def __init__(
        self,
        ens: Ensemble,
        tasks: Sequence[str],
        outputs: int,
        state: dict[str, Any] | None = None,
        *,
        lazy: bool = True,
        native: bool | str = True,
    ) -> None:
        self.ens = ens
        self.allow_lazy = lazy
        self.allow_native = _native_mode(native)
        E, Ea = ens.E, ens.Ea
        dev, dt = ens.device, ens.dtype
        # The dummy of a one-member batched ensemble copies member 0's numbers (with
        # zero data its weights stay zero; it has no noise).
        plans = ens.plans + [ens.plans[0]] * (Ea - E)
        first = plans[0]
        self.tasks = list(tasks)
        self.outputs = int(outputs)
        self.loss = first.loss
        self.batch = int(first.batch)
        self.total_steps = int(first.steps)
        layers = ens.layers
        self.nl = len(layers)
        self.last = self.nl - 1
        self.mult = [float(layer.forward_mult) for layer in layers]
        self.trainable = [not layer.frozen for layer in layers]
        trainable = [i for i, t in enumerate(self.trainable) if t]
        self.lowest = min(trainable) if trainable else self.nl
        opts = [p.optimizer for p in plans]
        for opt in opts:
            if opt.kind not in ("sgd", "langevin", "adam"):
                raise ValueError(f"unknown optimizer {opt.kind!r}")
            if opt.kind == "adam" and not (0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1 and opt.eps > 0):
                raise ValueError("Adam needs 0 ≤ beta1, beta2 < 1 and eps > 0")
            if opt.momentum < 0 or opt.weight_decay < 0:
                raise ValueError("momentum and weight decay must be ≥ 0")
            if opt.kind == "langevin" and opt.temperature < 0:
                raise ValueError("the Langevin temperature must be ≥ 0")
        self.lr = np.array([o.lr for o in opts], np.float64)
        self.momentum = opts[0].momentum != 0.0
        self.mu = np.array([o.momentum for o in opts], np.float64)

        def per_layer(f: Callable[[RunPlan, int], float]) -> np.ndarray:
            return np.array([[f(p, i) for p in plans] for i in range(self.nl)], np.float64)

        self.wd = per_layer(lambda p, i: _layer_decay(p.layers[i], p.optimizer.weight_decay))
        self.wd_b = per_layer(
            lambda p, i: _bias_decay(p.layers[i], p.optimizer.weight_decay) if layers[i].bias else 0.0
        )
        self.lr_mult = per_layer(lambda p, i: p.layers[i].lr_mult)
        self.bias_lr_mult = per_layer(lambda p, i: p.layers[i].bias_lr_mult)
        self.noise_rate = per_layer(lambda p, i: p.layers[i].noise_rate)
        self.noise_rate_b = per_layer(lambda p, i: p.layers[i].bias_noise_rate if layers[i].bias else 0.0)
        # Adam (torch.optim.AdamW per parameter tensor): decoupled decay λ at the layer's
        # rate, the running means' decay rates, and ε scaled per layer
        self.adam = opts[0].kind == "adam"
        if self.adam:
            self.wd = per_layer(lambda p, i: p.optimizer.weight_decay)
            self.wd_b = per_layer(lambda p, i: p.optimizer.weight_decay if layers[i].bias else 0.0)
        self.beta1 = np.array([o.beta1 for o in opts], np.float64)
        self.beta2 = np.array([o.beta2 for o in opts], np.float64)
        self.eps = per_layer(lambda p, i: p.optimizer.eps * p.layers[i].eps_mult)
        self.eps_b = per_layer(lambda p, i: p.optimizer.eps * p.layers[i].bias_eps_mult)
        self.decay_on = [bool(np.any(self.wd[i] != 0)) for i in range(self.nl)]
        self.decay_b_on = [bool(np.any(self.wd_b[i] != 0)) for i in range(self.nl)]
        self.temperature = np.array(
            [o.temperature if o.kind == "langevin" else 0.0 for o in opts], np.float64
        )
        self.schedules = [p.schedule for p in plans]

        state = state or {}
        self.vW: list[Tensor | None] = [None] * self.nl
        self.vb: list[Tensor | None] = [None] * self.nl
        if self.momentum:
            for i in trainable:
                self.vW[i] = ens.out_buffer(*ens.W[i].shape[1:])
                if ens.b[i] is not None:
                    self.vb[i] = padded(Ea, (1, layers[i].fan_out), device=dev, dtype=dt)
            for name, vs in (("vW", self.vW), ("vb", self.vb)):
                for i, v in enumerate(state.get(name, ())):
                    if v is not None and vs[i] is not None:
                        vs[i][:E].copy_(v)  # type: ignore[index]
        # Adam's running means of the gradient and of its square, per weight and bias
        self.adam_m: list[Tensor | None] = [None] * self.nl
        self.adam_v: list[Tensor | None] = [None] * self.nl
        self.adam_mb: list[Tensor | None] = [None] * self.nl
        self.adam_vb: list[Tensor | None] = [None] * self.nl
        if self.adam:
            for i in trainable:
                self.adam_m[i] = ens.out_buffer(*ens.W[i].shape[1:])
                self.adam_v[i] = ens.out_buffer(*ens.W[i].shape[1:])
                if ens.b[i] is not None:
                    self.adam_mb[i] = padded(Ea, (1, layers[i].fan_out), device=dev, dtype=dt)
                    self.adam_vb[i] = padded(Ea, (1, layers[i].fan_out), device=dev, dtype=dt)
            for name in ("adam_m", "adam_v", "adam_mb", "adam_vb"):
                mine = getattr(self, name)
                for i, v in enumerate(state.get(name, ())):
                    if v is not None and mine[i] is not None:
                        mine[i][:E].copy_(v)
        # each member's Langevin noise (None without): counter-based or torch's generator
        self.noise: list[NoiseSource | None] = list(state.get("noise", ()))
        if not self.noise:
            for plan, temp in zip(ens.plans, self.temperature, strict=False):
                self.noise.append(
                    NoiseSource(str(option(plan, "noise")), plan.seed_of_data, dev, dt) if temp > 0 else None
                )
        self.noisy = any(g is not None for g in self.noise)

        # ---- step buffers, allocated once
        B = self.batch
        K = self.outputs
        d = layers[0].fan_in
        widths = [layer.fan_out for layer in layers]

        def pad(*shape: int) -> Tensor:
            return padded(Ea, shape, device=dev, dtype=dt)

        out = ens.out_buffer
        self.X = pad(B, d)  # the step's inputs
        self.H = [out(B, n) for n in widths]  # pre-activations
        # G[i] = ∂loss/∂H_i: the output of layer i+1's backward product
        self.G = [out(B, n) for n in widths[:-1]] + [pad(B, K)]
        self.A: list[Tensor] = [self.X]  # A[i]: input of layer i
        for i in range(1, self.nl):
            self.A.append(self.H[i - 1] if self.activation == "identity" else pad(B, widths[i - 1]))
        self.AT = [a.transpose(1, 2) for a in self.A]
        self.WT = [w.transpose(1, 2) for w in ens.W]
        self.GS = [pad(B, n) for n in widths]  # c · G (update operand)
        self.T1 = [pad(B, n) for n in widths]  # scratch (padded: keeps
        self.T2 = [pad(B, n) for n in widths]  # members apart)
        self.TG = pad(B, 1)
        self.GBias = [pad(1, n) if ens.b[i] is not None else None for i, n in enumerate(widths)]
        self.TBias = [pad(1, n) if ens.b[i] is not None else None for i, n in enumerate(widths)]
        self.Y = self.H[-1] if self.output == "identity" else pad(B, K)
        # a bias without noise (the shared output bias: rate 0) draws none
        self.bias_noise = [
            self.noisy and ens.b[i] is not None and bool(np.any(self.noise_rate_b[i] > 0))
            for i in range(self.nl)
        ]
        # The native step loop, where it covers the network and the optimiser: it
        # updates every layer at once, so no layer is lazy, and needs no ATen scratch.
        self.native_gemm: list[bool] = [False] * self.nl  # its layers in gemm mode
        self._noise_draws: list[tuple[int, int, int, int]] = []
        self._noise_merge = False  # whether a piece's noise may be drawn at once
        self._zstride = 0
        self._zbuf: list[Tensor | None] = []
        self._start = 0  # the step at which the ATen path's current chunk begins
        self._native = self._native_args() if self.allow_native != "off" else None
        self.TW: list[Tensor | None] = [None] * self.nl  # weight-sized scratch
        self.NZ: list[Tensor | None] = [None] * self.nl  # noise
        self.TW2: list[Tensor | None] = [None] * self.nl  # Adam: its denominator
        for i in trainable if self._native is None else ():
            if self.momentum or self.adam:
                self.TW[i] = out(*ens.W[i].shape[1:])
            if self.adam:
                self.TW2[i] = out(*ens.W[i].shape[1:])
            if self.noisy:
                self.NZ[i] = out(*ens.W[i].shape[1:])
        self.NZb = [
            pad(1, n) if on and self._native is None else None
            for on, n in zip(self.bias_noise, widths, strict=True)
        ]
        self.minus_ones = torch.full((Ea, B, 1), -1.0, device=dev, dtype=dt)

        # ---- product sites
        self.fwd = [_Gemm(self.H[i], self.A[i], ens.W[i], beta=0.0) for i in range(self.nl)]
        self.bwd: list[_Gemm | None] = [
            _Gemm(self.G[i - 1], self.G[i], self.WT[i], beta=0.0) if i > self.lowest else None
            for i in range(self.nl)
        ]
        self.upd: list[_Gemm | None] = [None] * self.nl
        self.mom: list[_Gemm | None] = [None] * self.nl
        for i in trainable:
            if self.momentum:
                v = self.vW[i]
                assert v is not None
                self.mom[i] = _Gemm(v, self.AT[i], self.G[i], beta=1.0)
            elif self.adam:
                grad = self.TW[i]
                assert grad is not None
                self.mom[i] = _Gemm(grad, self.AT[i], self.G[i], beta=0.0)  # the gradient m·AᵀG
            else:
                self.upd[i] = _Gemm(ens.W[i], self.AT[i], self.GS[i], beta=1.0)
        # Large layers (member mode) without momentum: lazy updates where the layer
        # takes plain SGD steps, else row blocks of the fused backward product + update.
        self.blocks: list[list[list[_Block]] | None] = [None] * self.nl
        # lazy[i] = (U, V, T): a member's pending updates are rows of U (its inputs A_i)
        # and V (its c·G_i), ``pending`` rows in all, W_i + UᵀV its current weights; T
        # is scratch for the B × pending products.
        self.lazy: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * self.nl
        self.pending = int(state.get("pending", 0))
        self.lazy_rows = _LAZY_STEPS * B
        item = torch.empty((), dtype=dt).element_size()
        for i in range(self.lowest, self.nl):
            fan_in, fan_out = layers[i].fan_in, layers[i].fan_out
            if (
                ens.batched
                or not self.trainable[i]
                or self.momentum
                or self.adam
                or fan_in * fan_out * item <= _BLOCK_MIN_BYTES
            ):
                continue
            if lazy and not self.decay_on[i] and not self.noisy and B <= _LAZY_MAX_BATCH:
                R = self.lazy_rows
                carried = state.get("lazy", [None] * self.nl)[i]
                u, v = pad(R, fan_in), pad(R, fan_out)
                if carried is not None:
                    u.copy_(carried[0])
                    v.copy_(carried[1])
                self.lazy[i] = (u, v, pad(B * R))
                continue
            if i == self.lowest:
                continue  # no backward product below the lowest trainable layer
            rows = max(1, _BLOCK_BYTES // (fan_out * item))
            per_member = []
            for e in range(E):
                w, g, gb, at, gs = (ens.W[i][e], self.G[i][e], self.G[i - 1][e], self.AT[i][e], self.GS[i][e])
                per_member.append(
                    [
                        (
                            gb[:, r0 : r0 + rows],
                            g,
                            w[r0 : r0 + rows].t(),
                            w[r0 : r0 + rows],
                            at[r0 : r0 + rows],
                            gs,
                        )
                        for r0 in range(0, fan_in, rows)
                    ]
                )
            self.blocks[i] = per_member
        if self._native is not None:
            assert self.pending == 0, "a trainer with pending lazy updates cannot go native"
            self.lazy = [None] * self.nl
        self._pool: Any = None
        self.lazy_on = any(lz is not None for lz in self.lazy)
        # The lazy products' operands for every pending count, made once: the step
        # would otherwise spend as long slicing views as multiplying at large width.
        self._lazy_views: list[list[tuple[list[_Views5], list[_Views5]]] | None] = [
            None if lz is None else [self._make_lazy_views(i, j) for j in range(0, self.lazy_rows, B)]
            for i, lz in enumerate(self.lazy)
        ]

        self._lrxi = np.zeros((0, Ea))
        none: list[_Coef | None] = [None] * self.nl
        self._c, self._factor, self._neg_eta, self._wd = (list(none), list(none), list(none), list(none))
        self._cb, self._wd_b = list(none), list(none)
        self._mu: _Coef | None = None
        # Adam: −η/(1 − β₁ᵗ), ε per layer (weights and biases), the bias's decay factor,
        # and per step β₁, 1 − β₁, β₂, 1 − β₂ and √(1 − β₂ᵗ)
        self._step_size, self._eps, self._step_size_b = list(none), list(none), list(none)
        self._eps_b, self._factor_b = list(none), list(none)
        self._adam_c: tuple[_Coef, _Coef, _Coef, _Coef, _Coef] | None = None

    def _native_args(self) -> list[Any] | None:
        """Per member, the native step loop's fixed arguments, or ``None`` where it does
        not apply (not the CPU, or no C compiler here) or where ATen's ops are faster:
        layers the cost model runs in gemm mode where torch exposes no BLAS gemm, and
        (``auto``) batch-1 plain SGD without ReLU on a layer over
        :data:`._native.ATEN_LAZY_MIN_BYTES`, where ATen's lazy updates save a pass."""
        from . import _native

        ens = self.ens
        if self.adam:
            if self.allow_native in ("rows", "gemm"):
                raise ValueError(
                    f"torch {{ native = {self.allow_native} }}: the native step loop runs SGD and Langevin "
                    "steps, not Adam; use native = auto or off (Adam trains on ATen ops)"
                )
            return None  # Adam trains on ATen ops
        if (
            ens.device.type != "cpu"
            or self.loss not in _native.LOSSES
            or self.output not in _native.OUTPUTS
            or self.activation not in _native.ACTIVATIONS
        ):
            return None
        if _native.library() is None:
            return None
        f64 = ens.dtype == torch.float64
        shapes = [(ly.fan_in, ly.fan_out) for ly in ens.layers]
        mode = self.allow_native
        item = 8 if f64 else 4
        if (
            mode == "auto"
            and self.batch == 1
            and self.activation != "relu"
            and self.allow_lazy
            and not ens.batched
            and not (self.momentum or self.noisy or any(self.decay_on))
            and max(fi * fo for fi, fo in shapes) * item > _native.ATEN_LAZY_MIN_BYTES
        ):
            return None  # ATen's lazy updates beat the rows on layers this large
        if mode == "auto":
            gemm = _native.choose_gemm(shapes, self.batch, f64, self.activation)
        else:
            gemm = [mode == "gemm"] * self.nl
        blas = _native.blas(f64) if any(gemm) else None
        if any(gemm) and blas is None:
            if mode == "gemm":
                raise ValueError("torch { native = gemm }: torch exposes no BLAS gemm here")
            # the matrix products of these layers are faster in ATen's ops than in rows
            return None
        self.native_gemm = gemm
        # the noise of a step: each trainable layer's weights, then its bias, from the
        # top layer down — the order the ATen path draws them in
        zoff = np.full(2 * self.nl, -1, np.int64)
        draws: list[tuple[int, int, int, int]] = []  # (layer, weights 0 / bias 1, offset, size)
        zstride = 0
        if self.noisy:
            for i in range(self.last, self.lowest - 1, -1):
                if not self.trainable[i]:
                    continue
                for part, on, size in (
                    (0, True, shapes[i][0] * shapes[i][1]),
                    (1, self.bias_noise[i], shapes[i][1]),
                ):
                    if on:
                        zoff[2 * i + part] = zstride
                        draws.append((i, part, zstride, size))
                        zstride += size
        self._noise_draws = draws
        self._zstride = zstride
        self._noise_merge = all(size % 16 == 0 for _, _, _, size in draws)
        self._zbuf = [None] * ens.E
        pl = (PL_T1, PL_T2, PL_S1, PL_SLOPE)
        return [
            _native.MemberArgs(
                [w[e] for w in ens.W],
                [None if b is None else b[e, 0] for b in ens.b],
                self.mult,
                self.trainable,
                self.lowest,
                self.activation,
                self.output,
                self.loss,
                pl,
                self.batch,
                [None if v is None else v[e] for v in self.vW] if self.momentum else None,
                [None if v is None else v[e, 0] for v in self.vb] if self.momentum else None,
                gemm=gemm,
                blas=blas,
                zoff=zoff,
                zstride=zstride,
            )
            for e in range(ens.E)
        ]

    @property
    def native(self) -> bool:
        """Whether the steps run in the native step loop (:mod:`._native`)."""
        return self._native is not None

    def _native_coefs(self, start: int, n: int, np_dt: type) -> np.ndarray:
        """The chunk's coefficients for the native step loop, ``(E, n, nl, NCOEF)``: those
        :meth:`_prepare_coefs` made for the ATen path, a factor of 1 and decays of 0
        where a term is off (exact no-ops), and the noise scales ``√(2 η r T)`` (0 where
        the ATen path draws no noise: ``η r ≤ 0``)."""
        from . import _native

        E = self.ens.E
        self._prepare_coefs(start, n)
        coef = np.zeros((E, n, self.nl, _native.NCOEF), np.float64)
        coef[..., _native.COEFS.index("factor")] = 1.0
        fields = {
            "c": self._c,
            "factor": self._factor,
            "cb": self._cb,
            "wd_b": self._wd_b,
            "neg_eta": self._neg_eta,
            "wd": self._wd,
        }
        for name, per_layer in fields.items():
            f = _native.COEFS.index(name)
            for i, cf in enumerate(per_layer):
                if cf is not None:
                    coef[:, :, i, f] = cf.values[:, :E].T
        if self._mu is not None:
            coef[..., _native.COEFS.index("mu")] = self._mu.values[:, :E].T[:, :, None]
        if self._noise_draws:
            lrxi = self._lrxi[:, :E].T  # (E, n)
            temp = self.temperature[:E, None]
            for i, part, _, _ in self._noise_draws:
                rate = (self.noise_rate_b if part else self.noise_rate)[i][:E, None]
                eta = lrxi * rate
                # as _noise: math.sqrt(2.0 * eta * T) where eta > 0
                scale = np.sqrt(np.where(eta > 0, 2.0 * eta * temp, 0.0))
                coef[:, :, i, _native.COEFS.index("noise_b" if part else "noise")] = scale
        return coef.astype(np_dt)

    def _draw_noise(self, e: int, coef: np.ndarray, start: int, s0: int, m: int) -> Tensor | None:
        """Member ``e``'s noise for steps ``s0 … s0 + m − 1`` of the chunk that begins at
        step ``start``, ``(m, zstride)``, laid out as ``zoff`` says.  Counter-based noise
        is each draw's block of steps at once; torch's generator is drawn step by step,
        each layer's weights then its bias from the top down, each draw of the shape the
        ATen path draws (a contiguous block of that size gives the same numbers),
        skipped where it draws none."""
        from . import _native

        src = self.noise[e]
        if not self._noise_draws or src is None:
            return None
        buf = self._zbuf[e]
        if buf is None or buf.shape[0] < m:
            buf = torch.empty((m, self._zstride), dtype=self.ens.dtype)
            self._zbuf[e] = buf
        z = buf[:m]
        if src.counter_based:
            for i, part, off, size in self._noise_draws:
                src.fill_steps(z[:, off : off + size], slot(i, bool(part)), start + s0)
            return z
        gen = src.generator
        fw, fb = _native.COEFS.index("noise"), _native.COEFS.index("noise_b")
        if self._noise_merge:
            scales = coef[s0 : s0 + m][
                :,
                [i for i, _, _, _ in self._noise_draws],
                [fb if p else fw for _, p, _, _ in self._noise_draws],
            ]
            if bool(np.all(scales > 0)):
                # torch's normal_ on a contiguous block of a multiple of 16 entries draws
                # its uniforms in order and transforms them 16 at a time, so one draw of
                # the whole piece gives the numbers of the draws one by one (tested)
                z.normal_(generator=gen)
                return z
        for k in range(m):
            row = z[k]
            ck = coef[s0 + k]
            for i, part, off, size in self._noise_draws:
                if ck[i, fb if part else fw] > 0:
                    row[off : off + size].normal_(generator=gen)
        return z

    def _run_native(self, xs: Tensor, ys: Tensor, start: int) -> Tensor:
        """:meth:`run` in the native step loop: member by member, each member's chunk in
        one call (with Langevin noise, in pieces of at most :data:`_NOISE_ELEMENTS` noise
        entries, drawn before each piece).  A member's gemm calls run on one BLAS thread
        or on all of torch's, by its shapes alone (:func:`._native.member_blas_threads`:
        the BLAS's sums may depend on its threads, a member's must not depend on the
        ensemble).  With one, members run side by side on torch's threads (the calls
        release the GIL, and a member's numbers do not depend on which thread runs it);
        with all, one after another."""
        from . import _native

        lib = _native.library()
        assert lib is not None and self._native is not None
        ens = self.ens
        E, n = ens.E, int(xs.shape[1])
        np_dt = np.float64 if ens.dtype == torch.float64 else np.float32
        coef = self._native_coefs(start, n, np_dt)
        loss = np.empty((E, n), np.float64)
        piece = n if not self._noise_draws else max(1, min(n, _NOISE_ELEMENTS // max(1, self._zstride)))

        threads = torch.get_num_threads()
        gemm = any(self.native_gemm)
        shapes = [(ly.fan_in, ly.fan_out) for ly in ens.layers]
        # a member's BLAS threads follow from its shapes alone (its numbers depend on them)
        blas_threads = (
            _native.member_blas_threads(shapes, self.native_gemm, self.batch, threads) if gemm else 1
        )

        def one(e: int) -> None:
            args = self._native[e]  # type: ignore[index]
            before = _native.set_blas_threads(blas_threads) if gemm else 0
            try:
                for s0 in range(0, n, piece):
                    m = min(piece, n - s0)
                    z = self._draw_noise(e, coef[e], start, s0, m)
                    _native.run_member(
                        lib,
                        args,
                        xs[e, s0 : s0 + m],
                        ys[e, s0 : s0 + m],
                        coef[e, s0 : s0 + m],
                        loss[e, s0 : s0 + m],
                        z,
                    )
            finally:
                if gemm:
                    _native.set_blas_threads(before)

        parallel = min(E, threads) if blas_threads == 1 else 1
        if parallel > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(parallel)
            list(self._pool.map(one, range(E)))
        else:
            for e in range(E):
                one(e)
        loss *= self._loss_scale()
        return torch.from_numpy(np.ascontiguousarray(loss.T))

    @property
    def activation(self) -> str:
        return self.ens.activation

    @property
    def output(self) -> str:
        return self.ens.output

    # ---- data

    def prepare_chunk(self, chunks: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
        """One chunk per member → inputs ``(Ea, n, B, d)`` and targets ``(Ea, n, B, K)``
        (integer labels ``(Ea, n, B)`` for cross-entropy); a dummy's slots are zero."""
        ens = self.ens
        E = ens.E
        if len(chunks) != E:
            raise ValueError(f"{len(chunks)} chunks for {E} members")
        d = ens.layers[0].fan_in
        x0 = np.asarray(chunks[0][0])
        if x0.ndim != 3 or x0.shape[2] != d:
            raise ValueError(f"train_chunk gave x of shape {tuple(x0.shape)}, expected (n, batch, {d})")
        n, B = x0.shape[0], x0.shape[1]
        xs = padded(ens.Ea, (n, B, d), device=ens.device, dtype=ens.dtype)
        labels = self.loss == "cross_entropy"
        yshape = (n, B) if labels else (n, B, self.outputs)
        ys = padded(ens.Ea, yshape, device=ens.device, dtype=torch.int64 if labels else ens.dtype)
        for e, (x, y) in enumerate(chunks):
            xa = np.asarray(x)
            if xa.shape != (n, B, d):
                raise ValueError(f"train_chunk gave x of shape {tuple(xa.shape)}, expected ({n}, {B}, {d})")
            xs[e].copy_(torch.from_numpy(np.asarray(xa, dtype=np.float64)))
            yt = _prepare_targets(
                y,
                lead=2,
                loss=self.loss,
                task=self.tasks[e],
                outputs=self.outputs,
                device=ens.device,
                dtype=ens.dtype,
            )
            if tuple(yt.shape[:2]) != (n, B):
                raise ValueError(
                    f"train_chunk gave y of shape {tuple(np.shape(y))} for x of shape {(n, B, d)}"
                )
            ys[e].copy_(yt)
        return xs, ys

    # ---- coefficients of a chunk

    def _prepare_coefs(self, start: int, n: int) -> None:
        """The chunk's per-step, per-member factors, in float64 numpy as for one member."""
        dev, dt, Ea = self.ens.device, self.ens.dtype, self.ens.Ea
        steps = np.arange(start, start + n)
        lrxi = np.stack(
            [
                np.asarray(s(steps, self.total_steps), dtype=np.float64) * lr
                for s, lr in zip(self.schedules, self.lr, strict=True)
            ],
            axis=1,
        )
        self._lrxi = lrxi  # (n, Ea): lr · ξ(step)

        def coef(values: np.ndarray) -> _Coef:
            return _Coef(np.ascontiguousarray(np.broadcast_to(values, (n, Ea))), dev, dt)

        if self.adam:
            self._prepare_adam(steps, lrxi, coef)
            return
        for i in range(self.nl):
            if not self.trainable[i]:
                continue
            eta = lrxi * self.lr_mult[i]
            if self.momentum:
                self._neg_eta[i] = coef(-eta)
                if self.decay_on[i]:
                    self._wd[i] = coef(self.wd[i])
            else:
                self._c[i] = coef(-eta * self.mult[i])
                if self.decay_on[i]:
                    self._factor[i] = coef(1.0 - eta * self.wd[i])
            if self.ens.b[i] is not None:
                self._cb[i] = coef(-(lrxi * self.bias_lr_mult[i]))
                if self.decay_b_on[i]:
                    self._wd_b[i] = coef(self.wd_b[i])
        self._mu = coef(self.mu) if self.momentum else None

    def _prepare_adam(self, steps: np.ndarray, lrxi: np.ndarray, coef: Callable[[np.ndarray], _Coef]) -> None:
        """Adam's factors of the chunk's steps (``t = step + 1``), as ``torch.optim.AdamW``
        computes them from the layer's learning rate ``η = lr · ξ · r``."""
        t = (steps + 1).astype(np.float64)[:, None]
        bc1 = 1.0 - self.beta1[None, :] ** t
        bc2 = 1.0 - self.beta2[None, :] ** t
        self._adam_c = (
            coef(self.beta1),
            coef(1.0 - self.beta1),
            coef(self.beta2),
            coef(1.0 - self.beta2),
            coef(bc2**0.5),
        )
        for i in range(self.nl):
            if not self.trainable[i]:
                continue
            eta = lrxi * self.lr_mult[i]
            self._step_size[i] = coef(-(eta / bc1))
            self._eps[i] = coef(self.eps[i])
            self._factor[i] = coef(1.0 - eta * self.wd[i]) if self.decay_on[i] else None
            if self.ens.b[i] is not None:
                eta_b = lrxi * self.bias_lr_mult[i]
                self._step_size_b[i] = coef(-(eta_b / bc1))
                self._eps_b[i] = coef(self.eps_b[i])
                self._factor_b[i] = coef(1.0 - eta_b * self.wd_b[i]) if self.decay_b_on[i] else None

    # ---- steps

    def run(self, xs: Tensor, ys: Tensor, start: int, *, fold: bool = True) -> Tensor:
        """``n`` updates from step ``start`` on a prepared chunk; the minibatch losses
        ``(n, E)`` (on the device).  With ``fold`` the weights are up to date at the end
        (lazy layers' pending updates applied); without, they may stay pending, to be
        applied on their own schedule, which the chunking then does not change."""
        if self._native is not None:
            return self._run_native(xs, ys, start)
        n = xs.shape[1]
        ens = self.ens
        losses = torch.empty((n, ens.Ea), device=ens.device, dtype=ens.dtype)
        self._prepare_coefs(start, n)
        self._start = start
        with torch.no_grad():
            if self.loss == "mse":
                # Residuals stay on the device; their squares are summed once per chunk.
                res = torch.empty((n, ens.Ea, self.batch, self.outputs), device=ens.device, dtype=ens.dtype)
                for k in range(n):
                    self._step(xs[:, k], ys[:, k], k, res[k])
                res.mul_(res)
                if _split(res):
                    for e in range(ens.Ea):
                        torch.sum(res[:, e], dim=(1, 2), out=losses[:, e])
                else:
                    torch.sum(res, dim=(2, 3), out=losses)
            else:
                for k in range(n):
                    self._step(xs[:, k], ys[:, k], k, losses[k])
            losses.mul_(self._loss_scale())
            if fold:
                self.fold()
        return losses[:, : ens.E]

    def fold(self) -> None:
        """Apply the lazy layers' pending updates: ``W ← W + UᵀV``, one product per
        member (on its 2-D views, as alone)."""
        j = self.pending
        if j:
            for i, lazy in enumerate(self.lazy):
                if lazy is not None:
                    u, v, _ = lazy
                    for e in range(self.ens.E):
                        self.ens.W[i][e].addmm_(u[e, :j].t(), v[e, :j])
        self.pending = 0

    def _make_lazy_views(self, i: int, j: int) -> tuple[list[_Views5], list[_Views5]]:
        """Per member, the operands of :meth:`_lazy_forward` and :meth:`_lazy_update`
        with ``j`` updates pending."""
        lazy = self.lazy[i]
        assert lazy is not None
        u, v, t = lazy
        B = self.batch
        fwd: list[_Views5] = []
        upd: list[_Views5] = []
        for e in range(self.ens.E):
            tj = t[e, : B * j].view(B, j)
            ue, ve = u[e, :j], v[e, :j]
            fwd.append((self.A[i][e], ue.t(), tj, self.H[i][e], ve))
            upd.append((self.G[i][e], ve.t(), tj, self.G[i - 1][e] if i > 0 else tj, ue))
        return fwd, upd

    def _lazy_forward(self, i: int) -> None:
        """``H_i += m·(A_i Uᵀ) V``: the pending updates' share of layer ``i``'s product."""
        views = self._lazy_views[i]
        assert views is not None
        m = self.mult[i]
        for a, ut, tj, h, v in views[self.pending // self.batch][0]:
            torch.mm(a, ut, out=tj)
            h.addmm_(tj, v, alpha=m)

    def _lazy_update(self, i: int, below: bool) -> None:
        """The pending updates' share of the backward product, ``G_{i-1} += m·(G_i Vᵀ)
        U``; then this step's update, ``A_i`` and ``c·G_i``, appended to ``U`` and ``V``."""
        lazy, views = self.lazy[i], self._lazy_views[i]
        assert lazy is not None and views is not None
        u, v, _ = lazy
        j, B = self.pending, self.batch
        if below and j:
            m = self.mult[i]
            for g, vt, tj, gb, ue in views[j // B][1]:
                torch.mm(g, vt, out=tj)
                gb.addmm_(tj, ue, alpha=m)
        # element-wise copies round nothing: all members in one call each
        E = self.ens.E
        u[:E, j : j + B].copy_(self.A[i][:E])
        v[:E, j : j + B].copy_(self.GS[i][:E])

    def minibatch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The batch-mean loss ``(E,)`` of one minibatch ``x`` ``(Ea, B, d)`` at the
        current weights, by the training step's own forward pass."""
        ens = self.ens
        out = torch.empty(ens.Ea, device=ens.device, dtype=ens.dtype)
        with torch.no_grad():
            self.X.copy_(x)
            yhat = self._forward()
            if self.loss == "mse":
                res = self.G[self.last]
                torch.sub(yhat, y, out=res)
                res.mul_(res)
                torch.sum(res, dim=(1, 2), out=out)
            else:
                self._loss_value(yhat, y, out)
            out.mul_(self._loss_scale())
        return out[: ens.E]

    def _loss_scale(self) -> float:
        inv_b = 1.0 / self.batch
        if self.loss == "mse":
            return 0.5 * inv_b
        if self.loss == "logistic":
            return inv_b
        return -inv_b

    def _forward(self) -> Tensor:
        ens = self.ens
        act = self.activation
        h = self.X
        for i in range(self.nl):
            h = self.H[i]
            self.fwd[i](self.mult[i])
            if self.pending and self.lazy[i] is not None:
                self._lazy_forward(i)
            bias = ens.b[i]
            if bias is not None:
                h.add_(bias)
            if i < self.last and act != "identity":
                if act == "relu":
                    torch.clamp_min(h, 0.0, out=self.A[i + 1])
                elif act == "piecewise_linear":
                    # clamp, −, ×, + are each correctly rounded: no member care needed
                    a = self.A[i + 1]
                    torch.clamp(h, PL_T1, PL_T2, out=a)
                    a.sub_(PL_T1).mul_(PL_SLOPE).add_(PL_S1)
                else:
                    _each(_ACT_OUT[act], h, self.A[i + 1])
        if self.output == "tanh":
            _each(torch.tanh, h, out=self.Y)
        elif self.output == "sigmoid":
            _each(torch.sigmoid, h, out=self.Y)
        return self.Y

    def _loss_value(self, yhat: Tensor, y: Tensor, out: Tensor) -> None:
        """The un-normalised loss sum per member into ``out`` (``(Ea,)``), for the
        logistic and cross-entropy losses; leaves what :meth:`_loss_grad` needs."""
        last = self.last
        t1, t2 = self.T1[last], self.T2[last]
        if self.loss == "logistic":
            torch.mul(y, yhat, out=t1)
            t1.neg_()  # the margin −y·ŷ
            _each(torch.ops.aten.softplus.out, t1, 1, 20, out=t2)
            _reduce(t2, out)
        else:
            # ATen's _log_softmax.out writes a non-contiguous output wrongly (only its
            # first member, torch 2.13): run it on each member's contiguous view.
            for e in range(yhat.shape[0]):
                torch.ops.aten._log_softmax.out(yhat[e], 1, False, out=t1[e])
            torch.gather(t1, 2, y.unsqueeze(2), out=self.TG)
            _reduce(self.TG, out)

    def _loss_grad(self, y: Tensor) -> Tensor:
        """∂(batch-mean loss)/∂ŷ into ``G[last]`` (after :meth:`_loss_value`)."""
        last = self.last
        inv_b = 1.0 / self.batch
        t1, g = self.T1[last], self.G[last]
        if self.loss == "logistic":
            _each(torch.sigmoid, t1, out=g)
            g.mul_(y).mul_(-inv_b)
        else:
            _each(torch.exp, t1, out=g)  # softmax from log-softmax
            g.scatter_add_(2, y.unsqueeze(2), self.minus_ones)
            g.mul_(inv_b)
        return g

    def _output_grad(self, g: Tensor) -> None:
        """``g ← g · ψ'(z)`` from ``ŷ = ψ(z)``."""
        if self.output == "identity":
            return
        yhat = self.Y
        t = self.T2[self.last]
        if self.output == "tanh":
            torch.mul(yhat, yhat, out=t)
            t.neg_().add_(1.0)
        else:
            torch.neg(yhat, out=t)
            t.add_(1.0).mul_(yhat)
        g.mul_(t)

    def _act_grad(self, i: int) -> None:
        """``G[i] ← G[i] · φ'(H[i])`` (``A[i+1] = φ(H[i])``)."""
        act = self.activation
        g, h = self.G[i], self.H[i]
        if act == "relu":
            torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g)
            return
        if act == "identity":
            return
        if act == "piecewise_linear":
            # φ' = slope strictly inside (t1, t2), else 0 (the kinks too, as relu'(0) = 0)
            g.masked_fill_((h <= PL_T1) | (h >= PL_T2), 0.0).mul_(PL_SLOPE)
            return
        a, t1, t2 = self.A[i + 1], self.T1[i], self.T2[i]
        if act == "tanh":
            torch.mul(a, a, out=t1)
            t1.neg_().add_(1.0)
        elif act == "sigmoid":
            torch.neg(a, out=t1)
            t1.add_(1.0).mul_(a)
        elif act == "gelu":
            torch.mul(h, _SQRT_HALF, out=t1)
            _each(torch.erf, t1, out=t1)
            t1.add_(1.0).mul_(0.5)  # Φ(h)
            torch.mul(h, h, out=t2)
            t2.mul_(-0.5)
            _each(torch.exp, t2, out=t2)
            t2.mul_(_INV_SQRT_2PI).mul_(h)  # h·φ(h)
            t1.add_(t2)
        else:  # erf
            torch.mul(h, h, out=t1)
            t1.neg_()
            _each(torch.exp, t1, out=t1)
            t1.mul_(_TWO_OVER_SQRT_PI)
        g.mul_(t1)

    def _step(self, x: Tensor, y: Tensor, k: int, loss_out: Tensor) -> None:
        """One update; ``loss_out`` takes the residual ``ŷ − y`` (mse) or the loss sum."""
        ens = self.ens
        self.X.copy_(x)
        yhat = self._forward()
        last = self.last
        if self.loss == "mse":
            torch.sub(yhat, y, out=loss_out)
            g = self.G[last]
            torch.mul(loss_out, 1.0 / self.batch, out=g)
        else:
            self._loss_value(yhat, y, loss_out)
            g = self._loss_grad(y)
        self._output_grad(g)
        for i in range(last, self.lowest - 1, -1):
            g = self.G[i]
            below = i > self.lowest
            W = ens.W[i]
            upd = self.upd[i]
            if upd is not None:
                gs = self.GS[i]
                torch.mul(g, self._c[i].at(k), out=gs)  # type: ignore[union-attr]
                fc = self._factor[i]
                blocks = self.blocks[i]
                if self.lazy[i] is not None:
                    if below:
                        self.bwd[i](self.mult[i])  # type: ignore[misc]
                    self._lazy_update(i, below)
                elif blocks is not None:
                    m = self.mult[i]
                    fcv = None if fc is None else fc.values[k]
                    for e, member in enumerate(blocks):
                        for gbb, ge, wbt, wb, abt, gse in member:
                            gbb.addmm_(ge, wbt, beta=0.0, alpha=m)
                            if fcv is not None:
                                wb.mul_(float(fcv[e]))
                            wb.addmm_(abt, gse)
                else:
                    if below:
                        self.bwd[i](self.mult[i])  # type: ignore[misc]
                    if fc is not None:
                        W.mul_(fc.at(k))
                    upd(1.0)
            else:
                if below:
                    self.bwd[i](self.mult[i])  # type: ignore[misc]
                if self.trainable[i]:
                    if self.adam:
                        mom = self.mom[i]
                        assert mom is not None
                        mom(self.mult[i])  # the gradient, into TW[i]
                        self._adam(i, k, ens.W[i], self.TW[i], self.TW2[i], bias=False)
                    else:
                        self._momentum_update(i, k)
            if self.trainable[i]:
                if self.noisy:
                    self._noise(W, self.NZ[i], k, self.noise_rate[i], slot(i))
                if ens.b[i] is not None:
                    self._bias_update(i, k, g)
            if below:
                self._act_grad(i - 1)
        if self.lazy_on:
            self.pending += self.batch
            if self.pending == self.lazy_rows:
                self.fold()

    def _momentum_update(self, i: int, k: int) -> None:
        """``v ← μ v + m·aᵀg (+ wd·W)``, ``W ← W − η v``."""
        W = self.ens.W[i]
        v, t, mom = self.vW[i], self.TW[i], self.mom[i]
        assert v is not None and t is not None and mom is not None and self._mu is not None
        v.mul_(self._mu.at(k))
        mom(self.mult[i])
        wd = self._wd[i]
        if wd is not None:
            torch.mul(W, wd.at(k), out=t)
            v.add_(t)
        torch.mul(v, self._neg_eta[i].at(k), out=t)  # type: ignore[union-attr]
        W.add_(t)

    def _adam(self, i: int, k: int, p: Tensor, g: Tensor | None, t: Tensor | None, *, bias: bool) -> None:
        """One Adam step of parameter ``p`` (layer ``i``'s weights or bias) from its
        gradient ``g``, as ``torch.optim.AdamW`` takes it (decay, running means, bias
        corrections); ``t`` is scratch.  Only correctly rounded element-wise ops (no
        lerp or fused ones): a member's numbers do not depend on how ATen splits an op."""
        assert g is not None and t is not None and self._adam_c is not None
        m, v = (self.adam_mb[i], self.adam_vb[i]) if bias else (self.adam_m[i], self.adam_v[i])
        factor = self._factor_b[i] if bias else self._factor[i]
        size = self._step_size_b[i] if bias else self._step_size[i]
        eps = self._eps_b[i] if bias else self._eps[i]
        assert m is not None and v is not None and size is not None and eps is not None
        b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt = self._adam_c
        if factor is not None:
            p.mul_(factor.at(k))
        # m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²
        torch.mul(g, one_minus_b1.at(k), out=t)
        m.mul_(b1.at(k))
        m.add_(t)
        torch.mul(g, g, out=t)
        t.mul_(one_minus_b2.at(k))
        v.mul_(b2.at(k))
        v.add_(t)
        torch.sqrt(v, out=t)  # denominator √v / √(1 − β₂ᵗ) + ε
        t.div_(bc2_sqrt.at(k))
        t.add_(eps.at(k))
        torch.div(m, t, out=t)
        t.mul_(size.at(k))
        p.add_(t)

    def _bias_update(self, i: int, k: int, g: Tensor) -> None:
        bias = self.ens.b[i]
        gb, t, cb, wd_b = self.GBias[i], self.TBias[i], self._cb[i], self._wd_b[i]
        assert bias is not None and gb is not None and t is not None
        if _split(g):
            for e in range(g.shape[0]):
                torch.sum(g[e], dim=0, keepdim=True, out=gb[e])
        else:
            torch.sum(g, dim=1, keepdim=True, out=gb)
        if self.adam:
            self._adam(i, k, bias, gb, t, bias=True)
            return
        assert cb is not None
        vb = self.vb[i]
        if vb is None:
            if wd_b is not None:
                torch.mul(bias, wd_b.at(k), out=t)
                gb.add_(t)
            gb.mul_(cb.at(k))
            bias.add_(gb)
        else:
            assert self._mu is not None
            vb.mul_(self._mu.at(k))
            vb.add_(gb)
            if wd_b is not None:
                torch.mul(bias, wd_b.at(k), out=t)
                vb.add_(t)
            torch.mul(vb, cb.at(k), out=t)
            bias.add_(t)
        if self.NZb[i] is not None:
            self._noise(bias, self.NZb[i], k, self.noise_rate_b[i], slot(i, bias=True))

    def _noise(self, p: Tensor, buf: Tensor | None, k: int, rate: np.ndarray, where: int) -> None:
        """Each member with noise draws its own, as alone: parameter slot ``where`` at the
        chunk's step ``k``."""
        assert buf is not None
        lrxi = self._lrxi[k]
        for e, src in enumerate(self.noise):
            if src is None:
                continue
            eta = float(lrxi[e] * rate[e])
            if eta <= 0:
                continue
            z = buf[e]
            src.fill(z, where, self._start + k)
            z.mul_(math.sqrt(2.0 * eta * float(self.temperature[e])))
            p[e].add_(z)


def _reduce(src: Tensor, out: Tensor) -> None:
    """``out[e] = Σ src[e]`` over all axes but the first, as each member alone sums."""
    if _split(src):
        for e in range(src.shape[0]):
            torch.sum(src[e], dim=tuple(range(src.dim() - 1)), out=out[e])
    else:
        torch.sum(src, dim=tuple(range(1, src.dim())), out=out)


def _subset(trainer: EnsembleTrainer, keep: Sequence[int]) -> EnsembleTrainer:
    """The trainer of the members ``keep`` (indices into the current ensemble), their
    weights, momenta, Adam's running means and noise sources carried over."""
    ens = trainer.ens
    idx = torch.as_tensor(list(keep), device=ens.device)
    sub = Ensemble(
        [ens.plans[j] for j in keep],
        device=ens.device,
        dtype=ens.dtype,
        weights=[w.index_select(0, idx) for w in ens.W],
        biases=[None if b is None else b.index_select(0, idx) for b in ens.b],
    )
    state = {
        "vW": [None if v is None else v.index_select(0, idx) for v in trainer.vW],
        "vb": [None if v is None else v.index_select(0, idx) for v in trainer.vb],
        "noise": [trainer.noise[j] for j in keep],
        **{
            name: [None if v is None else v.index_select(0, idx) for v in getattr(trainer, name)]
            for name in ("adam_m", "adam_v", "adam_mb", "adam_vb")
        },
        # lazy layers' pending updates go along unapplied: a member's fold schedule does
        # not depend on the others
        "lazy": [
            None if lz is None else (lz[0].index_select(0, idx), lz[1].index_select(0, idx))
            for lz in trainer.lazy
        ],
        "pending": trainer.pending,
    }
    return EnsembleTrainer(
        sub,
        [trainer.tasks[j] for j in keep],
        trainer.outputs,
        state,
        lazy=trainer.allow_lazy,
        native=trainer.allow_native,
    )


# --------------------------------------------------------------------------- driver


def train_ensemble(
    plans: Sequence[RunPlan],
    datasets: Sequence[Dataset],
    *,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float64",
    chunk_steps: int = 1024,
    lazy: bool = True,
    native: bool | str = True,
) -> list[Result]:
    """Train the networks of ``plans`` (member ``e`` on ``datasets[e]``) as one batched
    ensemble; one :class:`~._engine.Result` per plan, each the result of training that
    plan alone with :func:`~._single.train` (bit for bit on CPU).

    The plans must agree on :func:`ensemble_key` (a ``ValueError`` says so otherwise).
    ``progress(member, step, train_loss)`` is called at each record step of each member
    still training, members in order.  A member that diverges is dropped at the end of
    the data chunk in which it diverged; the others go on.  ``lazy=False`` turns lazy
    updates off (every layer takes its update at once, as a plain SGD step sums it);
    ``native`` is the ``native`` option (``True``: ``auto``, ``False``: ``off``): ``off``
    keeps to ATen ops where the native step loop would apply, ``rows`` and ``gemm`` run
    all its layers one way (``auto`` chooses per layer, :func:`._native.choose_gemm`).
    """
    plans = list(plans)
    datasets = list(datasets)
    if len(plans) != len(datasets):
        raise ValueError(f"{len(plans)} plans but {len(datasets)} datasets")
    if not plans:
        return []
    if chunk_steps < 1:
        raise ValueError("chunk_steps must be ≥ 1")
    tasks = [str(ds.task) for ds in datasets]
    outputs = {int(ds.outputs) for ds in datasets}
    if len(outputs) != 1:
        raise ValueError("ensemble members must have datasets with the same outputs")
    k_out = outputs.pop()
    for plan, task in zip(plans, tasks, strict=True):
        check_compatible(plan.loss, task, k_out)
    ens = Ensemble(plans, device=device, dtype=dtype)
    first = ens.layers[0]
    for ds in datasets:
        if first.fan_in != int(ds.dim):
            raise ValueError(f"layer 1 has fan_in {first.fan_in}, the data dim {ds.dim}")
    if ens.layers[-1].fan_out != k_out:
        raise ValueError(f"the last layer has fan_out {ens.layers[-1].fan_out}, the data {k_out} outputs")
    batch = int(plans[0].batch)
    if batch < 1:
        raise ValueError("batch must be ≥ 1")
    record_steps = np.asarray(plans[0].record_steps, dtype=np.int64).reshape(-1)
    steps_total = int(plans[0].steps)
    if record_steps.size and (
        np.any(np.diff(record_steps) < 0) or record_steps[0] < 0 or record_steps[-1] > steps_total
    ):
        raise ValueError(f"record_steps must be sorted within [0, {steps_total}]")
    # Repeated record steps are observed once and copied.
    steps_u, inverse = np.unique(record_steps, return_inverse=True)

    E = len(plans)
    observers = [_make_observer(ens.member(e), plans[e], datasets[e], tasks[e], k_out) for e in range(E)]
    records = [_allocate(obs, len(steps_u)) for obs in observers]
    trainer = EnsembleTrainer(ens, tasks, k_out, lazy=lazy, native=native)
    for obs in observers:  # the native loop's runs evaluate the test set natively too
        obs.native_eval = trainer.native
    active = list(range(E))  # active[j]: the plan index of ensemble member j
    status = ["done"] * E
    messages = [""] * E
    steps_done = [0] * E

    def record(k: int, losses: dict[int, float]) -> None:
        for j, m in enumerate(active):
            if m not in losses:
                continue
            obs = observers[m]
            obs.net = trainer.ens.member(j)
            values = obs.observe()
            values["train_loss"] = np.asarray(losses[m])
            for name, arr in records[m].items():
                arr[k] = values[name]
            if progress is not None:
                progress(m, int(steps_u[k]), float(losses[m]))

    k = 0
    if steps_u.size and steps_u[0] == 0:
        xs, ys = trainer.prepare_chunk([ds.train_chunk(0, 1, batch) for ds in datasets])
        loss0 = trainer.minibatch_loss(xs[:, 0], ys[:, 0]).to("cpu", torch.float64).numpy()
        record(0, {m: float(loss0[j]) for j, m in enumerate(active)})
        k = 1
    end = int(steps_u[-1]) if steps_u.size else 0
    step = 0
    intervals: dict[int, list[np.ndarray]] = {m: [] for m in active}
    dim = int(first.fan_in)
    per_chunk = max(1, min(chunk_steps, _CHUNK_ELEMENTS // max(1, batch * dim)))
    while step < end and active:
        target = int(steps_u[k])
        n = min(target - step, per_chunk)
        xs, ys = trainer.prepare_chunk([datasets[m].train_chunk(step, n, batch) for m in active])
        if xs.shape[1] != n or xs.shape[2] != batch:
            raise ValueError(f"train_chunk({step}, {n}, {batch}) gave x of shape {tuple(xs.shape[1:])}")
        losses = trainer.run(xs, ys, step, fold=step + n == target).to("cpu", torch.float64).numpy()
        keep: list[int] = []
        for j, m in enumerate(active):
            col = np.ascontiguousarray(losses[:, j])
            bad = ~np.isfinite(col)
            if bad.any():
                first_bad = step + int(np.argmax(bad))
                status[m] = "diverged"
                steps_done[m] = first_bad
                messages[m] = (
                    f"diverged: the minibatch loss at step {first_bad} is "
                    f"{col[first_bad - step]}; records after step {first_bad} "
                    f"are NaN"
                )
            else:
                intervals[m].append(col)
                steps_done[m] = step + n
                keep.append(j)
        step += n
        if len(keep) < len(active):
            new_active = [active[j] for j in keep]
            if keep:
                trainer = _subset(trainer, keep)
            active = new_active
        if step == target:
            record(k, {m: float(np.concatenate(intervals[m]).mean()) for m in active})
            for m in active:
                intervals[m] = []
            k += 1
    results = []
    for m in range(E):
        if status[m] == "done":
            messages[m] = f"trained {steps_done[m]} steps"
        results.append(
            Result(
                records={name: arr[inverse] for name, arr in records[m].items()},
                status=status[m],
                message=messages[m],
                steps_done=steps_done[m],
            )
        )
    return results


# --------------------------------------------------------------------------- grouping


def member_bytes(plan: RunPlan, dtype: str | torch.dtype = "float64") -> int:
    """The bytes of one member's weights."""
    item = torch.empty((), dtype=_resolve_dtype(dtype)).element_size()
    return item * sum(layer.fan_in * layer.fan_out for layer in plan.layers)


def group_plans(
    plans: Sequence[RunPlan],
    *,
    workers: int = 1,
    max_bytes: int = 1 << 23,
    max_members: int = 64,
) -> list[list[int]]:
    """Split ``plans`` into ensembles: lists of indices into ``plans``, largest cost
    first (the order to hand them to ``workers`` processes).

    Plans are grouped by :func:`ensemble_key` and their ``options`` (device, dtype).  A
    group is cut into near-equal ensembles so that each holds at most ``max_members``
    members and at most ``max_bytes`` of weights (a wide network gains nothing from
    batching, which only saves per-step overhead, and loses its cache residency; one
    member always fits), and, with several workers, so that no ensemble costs more than
    a worker's fair share of the whole.  Members keep their order.
    """
    groups: dict[Any, list[int]] = {}
    for idx, plan in enumerate(plans):
        key = (ensemble_key(plan), tuple(sorted((str(k), repr(v)) for k, v in plan.options.items())))
        groups.setdefault(key, []).append(idx)

    def cost(plan: RunPlan) -> float:
        params = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
        # a step costs its memory passes plus a fixed overhead (≈ 2·10⁴ parameters' worth)
        return float(plan.steps) * (float(plan.batch) * params + 2e4)

    total = sum(cost(p) for p in plans)
    share = total / max(1, workers)
    out: list[list[int]] = []
    for members in groups.values():
        plan = plans[members[0]]
        dtype = str(option(plan, "dtype"))
        per_bytes = max(1, member_bytes(plan, dtype))
        size = max(1, min(max_members, max_bytes // per_bytes))
        if workers > 1:
            size = min(size, max(1, int(share // max(cost(plan), 1.0))))
        count = -(-len(members) // size)
        base, extra = divmod(len(members), count)
        pos = 0
        for c in range(count):
            take = base + (1 if c < extra else 0)
            out.append(members[pos : pos + take])
            pos += take
    out.sort(key=lambda g: -sum(cost(plans[i]) for i in g))
    return out
