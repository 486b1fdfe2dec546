"""The mean-field limit by particles, in JAX: one limit :class:`~mfdsl.plugin.RunPlan` →
recorded arrays.  ``docs/mean-field.md`` §2–3 is the mathematics; the contract of the
numbers this module produces (the particle system, initial weights, the reductions R1
and R2, time, data, observables) is ``backends/mfdsl_jax/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mfdsl.plugin import (
    PL_S1,
    PL_SLOPE,
    PL_T1,
    PL_T2,
    DistPlan,
    RunPlan,
    Stream,
    check_compatible,
    initial_weights,
)
from mfdsl.plugin import streams as _streams

from . import _noise

__all__ = ["Result", "System", "build_system", "solve"]

# Online data: at most this many input entries per chunk of steps sent to the device.
_CHUNK_ELEMENTS = 1 << 22
# The most steps per chunk (one compiled loop runs any chunk up to it).
_MAX_CHUNK = 512
# Test-set evaluation: rows per block times the widest layer.
_EVAL_ELEMENTS = 1 << 22
# Refuse a pairwise (N × N) state larger than this many bytes.
_MAX_PAIR_BYTES = 8 << 30


@dataclass(frozen=True)
class Result:
    """What one limit computation produced (``attrs``: JSON-able facts for the store)."""

    records: dict[str, np.ndarray]
    status: str
    message: str
    attrs: dict[str, Any]


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class System:
    """The particle system of one plan: particle counts and effective initial laws.

    ``widths = (d, n_1 … n_L, K)``; ``laws[ℓ-1]`` is weight layer ℓ's effective initial
    law; ``iid_std[ℓ-1]`` the std of the i.i.d. part R1 dropped from it (0 if none);
    ``collapsed`` the hidden layers held by one particle.
    """

    widths: tuple[int, ...]
    laws: tuple[DistPlan, ...]
    iid_std: tuple[float, ...]
    collapsed: tuple[int, ...]
    reductions: tuple[str, ...]
    note: str
    warnings: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        return len(self.widths) - 2

    def describe(self) -> str:
        if not self.reductions:
            return f"none ({self.note})" if self.note else "none"
        return " + ".join(self.reductions)


def _constant(law: DistPlan) -> bool:
    # an embedded law with no i.i.d. part still varies with the coordinates
    return law.std == 0.0 and not law.varies


def build_system(plan: RunPlan, particles: int, reduce: str = "auto") -> System:
    """The particle system that computes ``plan``'s limit with ``particles`` per layer."""
    if particles < 1:
        raise ValueError("particles must be ≥ 1")
    if reduce not in ("auto", "none"):
        raise ValueError(f"reduce must be auto or none, not {reduce!r}")
    L = plan.depth
    if L < 1:
        raise ValueError("a network needs at least one hidden layer")
    if plan.scaling not in ("mean_field", "mup"):
        raise ValueError(f"'{plan.scaling}' scaling has no mean-field limit")
    if plan.scaling == "mup" and (L > 1 or math.isfinite(plan.width)):
        raise ValueError("mup reaches the jax backend only as a two-layer limit plan (width = inf)")
    d, k = int(plan.layers[0].fan_in), int(plan.layers[-1].fan_out)
    laws = [layer.init for layer in plan.layers]
    iid = [0.0] * (L + 1)
    noisy = plan.optimizer.kind == "langevin" and plan.optimizer.temperature > 0
    hidden = [particles] * L
    reductions: list[str] = []
    collapsed: list[int] = []
    note = ""
    if reduce == "none":
        note = "reduce = none"
    elif noisy:
        note = "Langevin noise breaks the neuron symmetry the reductions need"
    else:
        if L == 1:
            note = "one hidden layer: nothing to reduce"
        if L >= 2:
            for ell in range(2, L + 1):
                law = laws[ell - 1].iid()
                iid[ell - 1] = float(law.std)
                # an embedded layer keeps its weight function on particle pairs and drops
                # only its i.i.d. part, which averages out of the limit as an i.i.d. law's does
                laws[ell - 1] = (
                    replace(law, b=0.0) if law.varies else DistPlan(kind="constant", a=float(law.mean))
                )
            reductions.append("R1")
        const = [_constant(law) for law in laws]
        collapsed = [ell for ell in range(1, L + 1) if const[ell - 1] and const[ell]]
        for ell in collapsed:
            hidden[ell - 1] = 1
        if any(2 <= ell <= L - 1 for ell in collapsed):
            reductions.append("R2")
        if L >= 2 and L in collapsed:
            reductions.append("top collapse")
        if 1 in collapsed:
            reductions.append("bottom collapse")
        if collapsed == [1] and L == 1:
            note = ""
    warnings = []
    if plan.activation == "relu":
        kinks = [ell for ell in range(2, L + 1) if laws[ell - 1] == DistPlan(kind="constant", a=0.0)]
        if kinks:
            warnings.append(
                f"layer {kinks[0]} starts at w ≡ 0, so H_{kinks[0]} ≡ 0 sits on ReLU's kink: the limit's "
                "equations are ill-posed there (in finite networks the O(n^-1/2) fluctuations decide "
                "which side each neuron is on) and this solver, with relu'(0) = 0, does not move the "
                f"layers around it; give layer {kinks[0]} a non-zero mean, or use reduce = none"
            )
    widths = (d, *hidden, k)
    for ell in range(2, L + 1):
        if widths[ell - 1] > 1 and widths[ell] > 1:
            size = widths[ell - 1] * widths[ell] * 8
            if size > _MAX_PAIR_BYTES:
                raise ValueError(
                    f"layer {ell} keeps a pairwise state of {widths[ell - 1]} × {widths[ell]} "
                    f"particles ({size / 2**30:.0f} GiB); use fewer particles"
                    + ("" if reduce == "auto" else " or reduce = auto")
                )
    return System(
        widths=widths,
        laws=tuple(laws),
        iid_std=tuple(iid),
        collapsed=tuple(collapsed),
        reductions=tuple(reductions),
        note=note,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- maths


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "relu":
        return jax.nn.relu
    if name == "tanh":
        return jnp.tanh
    if name == "sigmoid":
        return jax.nn.sigmoid
    if name == "gelu":
        return lambda h: jax.nn.gelu(h, approximate=False)
    if name == "erf":
        return jax.scipy.special.erf
    if name == "identity":
        return lambda h: h
    if name == "piecewise_linear":
        return _piecewise_linear
    raise ValueError(f"unknown activation {name!r}")


def _piecewise_linear(h: jax.Array) -> jax.Array:
    # torch's op order; a jnp.where keeps the derivative 0 at the kinks (the torch
    # engine's convention) where jnp.clip's would be split between the branches.
    inside = (h > PL_T1) & (h < PL_T2)
    ramp = jnp.where(inside, h, jnp.where(h <= PL_T1, PL_T1, PL_T2))
    return (ramp - PL_T1) * PL_SLOPE + PL_S1


def _output_map(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "identity":
        return lambda z: z
    if name == "tanh":
        return jnp.tanh
    if name == "sigmoid":
        return jax.nn.sigmoid
    raise ValueError(f"unknown output map {name!r}")


@jax.custom_jvp
def _softplus(x: jax.Array) -> jax.Array:
    # torch's softplus (threshold 20) for the value, σ(x) for the gradient: exactly
    # what the torch engine computes.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


@_softplus.defjvp
def _softplus_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    return _softplus(x), jax.nn.sigmoid(x) * t


def _example_losses(loss: str, yhat: jax.Array, y: jax.Array, k: int) -> jax.Array:
    """Per-example losses ``(B,)``; ``y``: ``(B, K)`` floats, or ``(B,)`` int labels."""
    if loss == "cross_entropy":
        logp = jax.nn.log_softmax(yhat, axis=1)
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    if y.ndim == 1:  # multiclass labels under mse: one-hot targets
        y = jax.nn.one_hot(y, k, dtype=yhat.dtype)
    if loss == "mse":
        return 0.5 * jnp.sum(jnp.square(yhat - y), axis=1)
    return jnp.sum(_softplus(-(y * yhat)), axis=1)


@dataclass(frozen=True)
class _Cfg:
    """Everything static about one particle system (hashable: keys compiled code)."""

    widths: tuple[int, ...]
    bias: bool
    trainable: tuple[bool, ...]
    activation: str
    output: str
    loss: str
    outputs: int
    online: bool
    solver: str
    momentum: float
    weight_decay: float
    temperature: float
    dtype: str
    #: the Langevin noise rate of each parameter, in ``names()``' order (0: no noise)
    noise_rates: tuple[float, ...]
    #: the noise's generator: ``jax`` (``jax.random``) or ``philox`` (the torch backend's)
    noise: str = "jax"

    @property
    def depth(self) -> int:
        return len(self.widths) - 2

    def hidden(self, i: int) -> int:
        """``n_i`` with ``n_0 = n_{L+1} = 1`` (only hidden widths scale the rates)."""
        return 1 if i in (0, len(self.widths) - 1) else self.widths[i]

    def names(self) -> list[str]:
        out = []
        for ell in range(1, self.depth + 2):
            out.append(f"W{ell}")
            if self.bias:
                out.append(f"b{ell}")
        return out

    def rate(self, name: str) -> float:
        """The mean-field multiplier of a parameter's gradient."""
        ell = int(name[1:])
        if name[0] == "W":
            return float(self.hidden(ell - 1) * self.hidden(ell))
        return float(self.hidden(ell))

    def is_trainable(self, name: str) -> bool:
        return self.trainable[int(name[1:]) - 1]

    def noise_rate(self, name: str) -> float:
        """The Langevin noise rate of a parameter (per entry, variance ``2 h ξ T r``)."""
        return self.noise_rates[self.names().index(name)]


def _forward(cfg: _Cfg, params: dict[str, jax.Array], x: jax.Array) -> list[jax.Array]:
    """Pre-activations ``[H_1 … H_L, z]``."""
    phi = _activation(cfg.activation)
    a = x
    hs = []
    last = cfg.depth
    for i in range(last + 1):
        h = a @ params[f"W{i + 1}"]
        if i > 0 and cfg.widths[i] != 1:
            h = h * (1.0 / cfg.widths[i])
        if cfg.bias:
            h = h + params[f"b{i + 1}"]
        hs.append(h)
        if i < last:
            a = phi(h)
    return hs


def _mean_loss(cfg: _Cfg, params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    yhat = _output_map(cfg.output)(_forward(cfg, params, x)[-1])
    return jnp.mean(_example_losses(cfg.loss, yhat, y, cfg.outputs))


@dataclass(frozen=True)
class _Functions:
    step_chunk: Callable[..., Any]


@lru_cache(maxsize=32)
def _functions(cfg: _Cfg) -> _Functions:
    """The jitted time stepper of a particle system (cached: same system, same code)."""
    names = cfg.names()
    train_names = [n for n in names if cfg.is_trainable(n)]
    rates = {n: cfg.rate(n) for n in train_names}
    lam, beta, temp = cfg.weight_decay, cfg.momentum, cfg.temperature
    # per weight layer: does its i.i.d. scale s decay (trainable layers only)
    s_mask = np.array([1.0 if t else 0.0 for t in cfg.trainable])

    def loss_fn(
        train: dict[str, jax.Array], fixed: dict[str, jax.Array], x: jax.Array, y: jax.Array
    ) -> jax.Array:
        return _mean_loss(cfg, {**train, **fixed}, x, y)

    value_and_grad = jax.value_and_grad(loss_fn)

    def velocity(
        params: dict[str, jax.Array], x: jax.Array, y: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        train = {n: params[n] for n in train_names}
        fixed = {n: params[n] for n in names if n not in rates}
        loss, grads = value_and_grad(train, fixed, x, y)
        vel = {}
        for n in train_names:
            g = grads[n] * rates[n] if rates[n] != 1.0 else grads[n]
            vel[n] = g + lam * params[n] if lam else g
        return loss, vel

    def body(
        carry: Any, inp: dict[str, jax.Array], data: tuple[jax.Array, jax.Array], key: jax.Array
    ) -> tuple[Any, jax.Array]:
        params, mom, s, s_mom = carry
        x, y = (inp["x"], inp["y"]) if cfg.online else data
        h, xi0, xi1 = inp["h"], inp["xi0"], inp["xi1"]
        loss, v0 = velocity(params, x, y)
        params = dict(params)
        mask = jnp.asarray(s_mask, s.dtype)
        if cfg.solver == "heun":
            trial = dict(params)
            for n in train_names:
                trial[n] = params[n] - (h * xi0) * v0[n]
            _, v1 = velocity(trial, x, y)
            for n in train_names:
                params[n] = params[n] - (0.5 * h) * (xi0 * v0[n] + xi1 * v1[n])
            s_trial = s - (h * xi0 * lam) * s * mask
            s = s - (0.5 * h * lam) * (xi0 * s + xi1 * s_trial) * mask
        elif beta:
            mom = {n: beta * mom[n] + v0[n] for n in train_names}
            for n in train_names:
                params[n] = params[n] - (h * xi0) * mom[n]
            s_mom = beta * s_mom + lam * s * mask
            s = s - (h * xi0) * s_mom
        else:
            for n in train_names:
                params[n] = params[n] - (h * xi0) * v0[n]
            s = s - (h * xi0 * lam) * s * mask
        if temp > 0:
            scale = jnp.sqrt(2.0 * h * xi0 * temp)
            step_key = None if cfg.noise == "philox" else jax.random.fold_in(key, inp["i"])
            for j, n in enumerate(train_names):
                rate = cfg.noise_rate(n)
                if rate == 0.0:  # a shared parameter (the output bias): no noise
                    continue
                if step_key is None:  # the torch backend's noise of the parameter of this name
                    noise = _noise.normal(key, _noise.slot(n), inp["i"], params[n].shape, params[n].dtype)
                else:
                    noise = jax.random.normal(
                        jax.random.fold_in(step_key, j), params[n].shape, params[n].dtype
                    )
                params[n] = params[n] + (scale if rate == 1.0 else scale * math.sqrt(rate)) * noise
        return (params, mom, s, s_mom), loss

    @jax.jit
    def step_chunk(
        state: Any,
        inputs: dict[str, jax.Array],
        n: jax.Array,
        data: tuple[jax.Array, jax.Array],
        key: jax.Array,
    ) -> tuple[Any, jax.Array]:
        # The first n entries of the input buffers, one step each: the trip count is
        # dynamic, so one compilation serves chunks of any length.
        size = inputs["h"].shape[0]

        def one(j: jax.Array, carry: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
            st, losses = carry
            inp = {name: lax.dynamic_index_in_dim(v, j, keepdims=False) for name, v in inputs.items()}
            st, loss = body(st, inp, data, key)
            return st, lax.dynamic_update_index_in_dim(losses, loss.astype(losses.dtype), j, 0)

        losses0 = jnp.full(size, jnp.nan, inputs["h"].dtype)
        return lax.fori_loop(0, n, one, (state, losses0))

    return _Functions(step_chunk=step_chunk)


# --------------------------------------------------------------------------- observing


@dataclass(frozen=True)
class _ObsCfg:
    names: tuple[str, ...]
    task: str
    probes_output: int
    probes_spread: int
    spread_layers: tuple[int, ...]
    change_layers: tuple[int, ...]
    particle_layer: int
    block: int
    probes_rms: int = 0
    rms_layers: tuple[int, ...] = ()


@lru_cache(maxsize=32)
def _observer(cfg: _Cfg, ocfg: _ObsCfg) -> Callable[..., Any]:
    psi = _output_map(cfg.output)
    widths = cfg.widths
    L = cfg.depth

    @jax.jit
    def observe(
        params: dict[str, jax.Array],
        w0: dict[str, jax.Array],
        s: jax.Array,
        iid: jax.Array,
        test: dict[str, jax.Array],
        part: dict[str, jax.Array],
    ) -> dict[str, jax.Array]:
        out: dict[str, jax.Array] = {}
        names = ocfg.names
        if "test_loss" in names or "test_accuracy" in names:

            def block(args: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
                xb, yb, lb, mb = args
                z = _forward(cfg, params, xb)[-1]
                losses = _example_losses(cfg.loss, psi(z), yb, cfg.outputs)
                if ocfg.task == "binary":
                    ok = jnp.sign(z[:, 0]) == lb
                elif ocfg.task == "multiclass":
                    ok = jnp.argmax(z, axis=1) == lb
                else:
                    ok = jnp.zeros(z.shape[0], bool)
                return jnp.sum(losses * mb), jnp.sum(ok.astype(mb.dtype) * mb)

            loss_sums, correct = lax.map(block, (test["x"], test["y"], test["labels"], test["mask"]))
            out["test_loss_sum"] = jnp.sum(loss_sums)
            out["test_correct"] = jnp.sum(correct)
        n_probe = max(
            ocfg.probes_output if "output" in names else 0,
            ocfg.probes_spread if "neuron_spread" in names else 0,
            ocfg.probes_rms if "preactivation_rms" in names else 0,
        )
        if n_probe:
            hs = _forward(cfg, params, test["probes"][:n_probe])
            if "output" in names:
                yhat = psi(hs[-1][: ocfg.probes_output])
                out["output"] = yhat[:, 0] if cfg.outputs == 1 else yhat
            if "neuron_spread" in names:
                out["neuron_spread"] = jnp.stack(
                    [
                        jnp.mean(jnp.std(hs[ell - 1][: ocfg.probes_spread], axis=1))
                        for ell in ocfg.spread_layers
                    ]
                )
            if "preactivation_rms" in names:
                out["preactivation_rms"] = jnp.stack(
                    [
                        jnp.sqrt(jnp.mean(jnp.square(hs[ell - 1][: ocfg.probes_rms])))
                        for ell in ocfg.rms_layers
                    ]
                )
        if "weight_change" in names:
            changes = []
            for ell in ocfg.change_layers:
                w, w_0 = params[f"W{ell}"], w0[f"W{ell}"]
                # the mean over the array's entries is the L2 mean over the particles
                # (pairs), a collapsed side being one value for all of its particles
                mean2 = jnp.mean(jnp.square(w - w_0)) + iid[ell - 1] ** 2 * (s[ell - 1] - 1.0) ** 2
                changes.append(jnp.sqrt(mean2))
            out["weight_change"] = jnp.stack(changes)
        if "particles" in names:
            ell = ocfg.particle_layer
            w_in, w_out = params[f"W{ell}"], params[f"W{ell + 1}"]
            idx = part["idx"]
            valid = idx >= 0
            j = jnp.where(valid, idx, 0)
            eps = part["eps"]
            sd_in = iid[ell - 1] * s[ell - 1]
            sd_out = iid[ell] * s[ell]
            rows_in = widths[ell - 1]
            if ell == 1:
                first = w_in[0, j]
                second = w_in[1, j] if rows_in >= 2 else jnp.full_like(first, jnp.nan)
                norm = jnp.sqrt(jnp.sum(jnp.square(w_in[:, j]), axis=0))
            else:
                first = w_in[0, j] + sd_in * eps[:, 0]
                second = w_in[1 if rows_in >= 2 else 0, j] + sd_in * eps[:, 1]
                norm = jnp.sqrt(jnp.mean(jnp.square(w_in[:, j]), axis=0) + sd_in**2)
            last = w_out[j, 0] + (sd_out * eps[:, 2] if ell + 1 <= L else 0.0)
            table = jnp.stack([first, second, norm, last], axis=1)
            out["particles"] = jnp.where(valid[:, None], table, jnp.nan)
        return out

    return observe


# --------------------------------------------------------------------------- solving


def _targets(y: np.ndarray, task: str, loss: str, outputs: int, dtype: Any, lead: int) -> np.ndarray:
    """Labels as the loss takes them: int32 class labels (multiclass) or floats with a
    trailing output axis."""
    if task == "multiclass":
        return np.asarray(y, dtype=np.int32)
    t = np.asarray(y, dtype=np.float64)
    if t.ndim == lead:
        t = t[..., None]
    if t.shape[-1] != outputs:
        raise ValueError(f"targets have {t.shape[-1]} outputs, the network {outputs}")
    return t.astype(dtype)


def _pieces(m: int, cap: int) -> list[int]:
    """``m`` steps as chunks of at most ``cap``."""
    return [cap] * (m // cap) + ([m % cap] if m % cap else [])


def _intervals(record_times: np.ndarray, dt: float) -> list[tuple[int, float]]:
    """Per interval between consecutive record times: (Euler steps, step size)."""
    out = []
    for span in np.diff(record_times):
        span = float(span)
        if span <= 0:
            out.append((0, 0.0))
            continue
        ratio = span / dt
        m = round(ratio)
        if m >= 1 and abs(m * dt - span) <= 1e-9 * span:
            out.append((m, dt))
        else:
            m = max(1, math.ceil(ratio - 1e-9))
            out.append((m, span / m))
    return out


def solve(
    plan: RunPlan,
    dataset: Any,
    *,
    particles: int = 4096,
    data_samples: int = 1024,
    dt: float | None = None,
    solver: str = "euler",
    reduce: str = "auto",
    dtype: str = "float64",
    noise: str = "jax",
    progress: Callable[[int, float], None] | None = None,
) -> Result:
    """Compute ``plan``'s mean-field limit on ``dataset`` and record its observables.

    See the module docstring for the semantics.  Nothing global changes: float64 is
    enabled only inside this call (``jax.enable_x64``)."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, not {dtype}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be euler or heun, not {solver!r}")
    if noise not in ("jax", "philox"):
        raise ValueError(f"noise must be jax or philox, not {noise!r}")
    with _x64(dtype == "float64"):
        return _solve(
            plan,
            dataset,
            particles=int(particles),
            data_samples=int(data_samples),
            dt=dt,
            solver=solver,
            reduce=reduce,
            dtype=dtype,
            noise=noise,
            progress=progress,
        )


def _x64(on: bool) -> Any:
    """A context with float64 on or off (``jax.enable_x64``; older jax: the experimental
    context managers)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import disable_x64, enable_x64  # type: ignore[attr-defined]  # jax < 0.6

    return enable_x64() if on else disable_x64()


def _solve(
    plan: RunPlan,
    dataset: Any,
    *,
    particles: int,
    data_samples: int,
    dt: float | None,
    solver: str,
    reduce: str,
    dtype: str,
    noise: str,
    progress: Callable[[int, float], None] | None,
) -> Result:
    np_dtype = np.dtype(dtype)
    task = str(dataset.task)
    outputs = int(dataset.outputs)
    check_compatible(plan.loss, task, outputs)
    system = build_system(plan, particles, reduce)
    if system.widths[0] != int(dataset.dim):
        raise ValueError(f"layer 1 has fan_in {system.widths[0]}, the data dim {dataset.dim}")
    if system.widths[-1] != outputs:
        raise ValueError(f"the last layer has fan_out {system.widths[-1]}, the data {outputs} outputs")
    opt = plan.optimizer
    if opt.kind not in ("sgd", "langevin"):
        raise ValueError(f"unknown optimizer {opt.kind!r}")
    lr = float(opt.lr)
    step_dt = lr if dt is None else float(dt)
    if not step_dt > 0:
        raise ValueError("dt must be > 0")
    momentum = float(opt.momentum) if opt.kind == "sgd" else 0.0
    temperature = float(opt.temperature) if opt.kind == "langevin" else 0.0
    if temperature < 0:
        raise ValueError("the Langevin temperature must be ≥ 0")
    if momentum and (solver != "euler" or not math.isclose(step_dt, lr, rel_tol=1e-12)):
        raise ValueError("momentum is a discrete recursion: use solver = euler and dt = lr")
    online = getattr(dataset, "train_x", None) is None
    if data_samples < 1:
        raise ValueError("data_samples must be ≥ 1")
    L = plan.depth
    bias = bool(plan.layers[0].bias)
    if any(layer.bias != bias for layer in plan.layers):
        raise ValueError("biases are all or none")
    cfg = _Cfg(
        widths=system.widths,
        bias=bias,
        trainable=tuple(not layer.frozen for layer in plan.layers),
        activation=plan.activation,
        output=plan.output,
        loss=plan.loss,
        outputs=outputs,
        online=online,
        solver=solver,
        momentum=momentum,
        weight_decay=float(opt.weight_decay),
        temperature=temperature,
        dtype=dtype,
        noise_rates=tuple(
            rate
            for layer in plan.layers
            for rate in ((layer.noise_rate, layer.bias_noise_rate) if bias else (layer.noise_rate,))
        ),
        noise=noise,
    )
    fns = _functions(cfg)

    # initial particles
    layer_shapes = [(system.widths[ell - 1], system.widths[ell]) for ell in range(1, L + 2)]
    params: dict[str, jax.Array] = {}
    for ell, w in enumerate(initial_weights(plan.seed_of_init, system.laws, layer_shapes), start=1):
        params[f"W{ell}"] = jnp.asarray(w.astype(np_dtype))
        if cfg.bias:
            params[f"b{ell}"] = jnp.zeros(system.widths[ell], np_dtype)
    train_names = [n for n in cfg.names() if cfg.is_trainable(n)]
    mom = {n: jnp.zeros_like(params[n]) for n in train_names} if momentum else {}
    s = jnp.ones(L + 1, np_dtype)
    state: Any = (params, mom, s, jnp.zeros(L + 1, np_dtype))
    if noise == "philox":
        key = _noise.key_array(plan.seed_of_data)
    else:
        key = jax.random.key(_streams.jax_seed(plan.seed_of_data, Stream.NOISE))
    iid = jnp.asarray(np.asarray(system.iid_std, np.float64).astype(np_dtype))

    # data
    if online:
        fixed_data: tuple[Any, Any] = (jnp.zeros((), np_dtype), jnp.zeros((), np_dtype))
        batch = data_samples
    else:
        tx = np.asarray(dataset.train_x, np.float64).astype(np_dtype)
        ty = _targets(dataset.train_y, task, plan.loss, outputs, np_dtype, lead=1)
        fixed_data = (jnp.asarray(tx), jnp.asarray(ty))
        batch = tx.shape[0]

    def chunk_data(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = dataset.train_chunk(start, n, batch)
        x = np.asarray(x, np.float64)
        if x.shape != (n, batch, system.widths[0]):
            raise ValueError(f"train_chunk({start}, {n}, {batch}) gave x of shape {x.shape}")
        return x.astype(np_dtype), _targets(y, task, plan.loss, outputs, np_dtype, lead=2)

    observe, test, part, ocfg, shapes = _make_observer(plan, dataset, system, cfg, task, outputs, np_dtype)
    w0 = {f"W{ell}": params[f"W{ell}"] for ell in ocfg.change_layers}

    record_steps = np.asarray(plan.record_steps, dtype=np.int64).reshape(-1)
    if record_steps.size and (
        np.any(np.diff(record_steps) < 0) or record_steps[0] < 0 or record_steps[-1] > plan.steps
    ):
        raise ValueError(f"record_steps must be sorted within [0, {plan.steps}]")
    steps_u, inverse = np.unique(record_steps, return_inverse=True)
    records = {name: np.full((len(steps_u), *shape), np.nan) for name, shape in shapes.items()}
    n_test = int(np.asarray(dataset.test_x).shape[0])

    def record(k: int, params_now: dict[str, jax.Array], s_now: jax.Array, train_loss: float) -> None:
        values = jax.device_get(observe(params_now, w0, s_now, iid, test, part))
        out: dict[str, Any] = {"train_loss": train_loss}
        if "test_loss_sum" in values:
            out["test_loss"] = float(values["test_loss_sum"]) / n_test if n_test else math.nan
            out["test_accuracy"] = (
                float(values["test_correct"]) / n_test if n_test and task != "regression" else math.nan
            )
        for name in ("output", "neuron_spread", "preactivation_rms", "weight_change", "particles"):
            if name in values:
                out[name] = np.asarray(values[name], np.float64)
        for name, arr in records.items():
            arr[k] = out[name]
        if progress is not None:
            progress(int(steps_u[k]), float(train_loss))

    # time grid: record step k ↔ time lr·k
    times = lr * steps_u.astype(np.float64)
    start_time = 0.0
    intervals = _intervals(np.concatenate([[start_time], times]), step_dt)
    cap = _MAX_CHUNK
    if online:
        # online buffers hold data: no longer than memory allows, nor than needed
        longest = max((m for m, _ in intervals), default=1)
        cap = max(1, min(cap, longest, _CHUNK_ELEMENTS // max(1, batch * system.widths[0])))

    status, message = "done", ""
    euler_index = 0
    t_now = start_time

    def buffers(start_index: int, piece: int, t_start: float, h: float, offset: int) -> dict[str, Any]:
        # inputs of the fixed length cap (one compilation), the first `piece` used
        js = np.arange(offset, offset + cap, dtype=np.float64)
        t0 = t_start + js * h
        xi0 = np.asarray(plan.schedule(t0 / lr, plan.steps), np.float64)
        xi1 = np.asarray(plan.schedule((t0 + h) / lr, plan.steps), np.float64)
        inputs: dict[str, Any] = {
            "h": jnp.full(cap, h, np_dtype),
            "xi0": jnp.asarray(xi0.astype(np_dtype)),
            "xi1": jnp.asarray(xi1.astype(np_dtype)),
            "i": jnp.arange(start_index, start_index + cap, dtype=jnp.int32),
        }
        if online:
            x, y = chunk_data(start_index, piece)
            if piece < cap:
                x = np.concatenate([x, np.zeros((cap - piece, *x.shape[1:]), x.dtype)])
                y = np.concatenate([y, np.zeros((cap - piece, *y.shape[1:]), y.dtype)])
            inputs["x"], inputs["y"] = jnp.asarray(x), jnp.asarray(y)
        return inputs

    # The loss at initialisation: the first step's loss (its update is discarded).
    _, first = fns.step_chunk(state, buffers(0, 1, 0.0, step_dt, 0), 1, fixed_data, key)
    loss0 = float(np.asarray(jax.device_get(first))[0])
    losses_since: list[np.ndarray] = []
    for k, (m, h) in enumerate(intervals):
        if m == 0:  # the record at time 0 (record steps are distinct)
            record(k, state[0], state[2], loss0)
            continue
        done = 0
        failed = False
        for piece in _pieces(m, cap):
            inputs = buffers(euler_index, piece, t_now, h, done)
            new_state, losses = fns.step_chunk(state, inputs, piece, fixed_data, key)
            losses = np.asarray(jax.device_get(losses), np.float64)[:piece]
            bad = ~np.isfinite(losses)
            if bad.any():
                first_bad = int(np.argmax(bad))
                t_bad = t_now + (done + first_bad) * h
                status = "diverged"
                message = (
                    f"diverged: the E_Z loss at time {t_bad:.6g} (step {t_bad / lr:.6g}) is "
                    f"{losses[first_bad]}; records after it are NaN"
                )
                failed = True
                break
            state = new_state
            losses_since.append(losses)
            euler_index += piece
            done += piece
        if failed:
            break
        t_now = float(times[k])
        record(k, state[0], state[2], float(np.concatenate(losses_since).mean()))
        losses_since = []
    if status == "done":
        message = f"integrated to t = {t_now:.6g} in {euler_index} {solver} steps with {system.describe()}"
    if system.warnings:
        message += "; warning: " + "; ".join(system.warnings)
    attrs = {
        "limit_reductions": system.describe(),
        "limit_collapsed_layers": [int(ell) for ell in system.collapsed],
        "limit_particles": [int(n) for n in system.widths[1:-1]],
        "limit_solver": (
            f"{solver}, dt = {step_dt:g}, "
            + (
                "E_Z over the training set"
                if not online
                else f"E_Z over {data_samples} fresh samples per step"
            )
            + f", {dtype}"
        ),
    }
    if system.warnings:
        attrs["limit_warnings"] = list(system.warnings)
    return Result(
        records={name: arr[inverse] for name, arr in records.items()},
        status=status,
        message=message,
        attrs=attrs,
    )


def _make_observer(
    plan: RunPlan, dataset: Any, system: System, cfg: _Cfg, task: str, outputs: int, np_dtype: np.dtype
) -> tuple[Any, Any, Any, _ObsCfg, dict[str, tuple[int, ...]]]:
    seen: set[str] = set()
    for obs in plan.observables:
        if obs.name in seen:
            raise ValueError(f"observable {obs.name} appears twice")
        seen.add(obs.name)
    test_x = np.asarray(dataset.test_x, np.float64)
    d = system.widths[0]
    if test_x.ndim != 2 or test_x.shape[1] != d:
        raise ValueError(f"test_x has shape {test_x.shape}, expected (n, {d})")
    n_test = test_x.shape[0]
    if "test_accuracy" in seen and task == "regression":
        raise ValueError("test_accuracy is undefined for a regression dataset")
    L = system.depth
    by_name = {obs.name: obs for obs in plan.observables}
    probes_output = probes_spread = 0
    spread_layers: tuple[int, ...] = ()
    change_layers: tuple[int, ...] = ()
    particle_layer = 1
    idx = np.zeros(0, np.int32)
    shapes: dict[str, tuple[int, ...]] = {}
    for obs in plan.observables:
        if obs.name in ("train_loss", "test_loss", "test_accuracy"):
            shapes[obs.name] = ()
    if "output" in by_name:
        probes_output = by_name["output"].probe_count(n_test)
        shapes["output"] = (probes_output,) if outputs == 1 else (probes_output, outputs)
    if "neuron_spread" in by_name:
        obs = by_name["neuron_spread"]
        probes_spread = obs.probe_count(n_test)
        spread_layers = obs.layers_in(L)
        shapes["neuron_spread"] = (len(spread_layers),)
    if "weight_change" in by_name:
        change_layers = by_name["weight_change"].layers_in(L)
        shapes["weight_change"] = (len(change_layers),)
    probes_rms = 0
    rms_layers: tuple[int, ...] = ()
    if "preactivation_rms" in by_name:
        obs = by_name["preactivation_rms"]
        probes_rms = obs.probe_count(n_test)
        rms_layers = obs.layers_in(L)
        shapes["preactivation_rms"] = (len(rms_layers),)
    eps = np.zeros((0, 3))
    if "particles" in by_name:
        obs = by_name["particles"]
        chosen = obs.layers_in(L)
        if len(chosen) != 1:
            raise ValueError("particles takes a single layer")
        particle_layer = chosen[0]
        width = system.widths[particle_layer]
        if obs.sample < 0:
            raise ValueError("particles: sample must be ≥ 0")
        size = int(obs.sample) or width
        idx = np.full(size, -1, dtype=np.int32)
        if width == 1:
            idx[:] = 0  # a collapsed layer: every sampled neuron is its one particle
        else:
            rng = _streams.rng(plan.seed_of_init, Stream.PARTICLES)
            take = np.sort(rng.choice(width, size=min(size, width), replace=False))
            idx[: take.size] = take
        eps = _streams.rng(plan.seed_of_init, Stream.IID).standard_normal((size, 3))
        shapes["particles"] = (size, 4)
    for name in seen:
        if name not in shapes:
            raise ValueError(f"unknown observable {name!r}")

    widest = max(system.widths)
    block = max(1, min(max(n_test, 1), _EVAL_ELEMENTS // widest))
    n_blocks = max(1, -(-n_test // block))
    pad = n_blocks * block - n_test
    xb = np.concatenate([test_x, np.zeros((pad, d))]).astype(np_dtype).reshape(n_blocks, block, d)
    if task == "multiclass":
        labels = np.asarray(dataset.test_y, np.int32).reshape(-1)
        y_t = labels
        lab = np.concatenate([labels, np.zeros(pad, np.int32)])
    else:
        y_t = _targets(dataset.test_y, task, plan.loss, outputs, np_dtype, lead=1)
        lab = np.concatenate(
            [np.asarray(dataset.test_y, np.float64).reshape(n_test, -1)[:, 0], np.zeros(pad)]
        ).astype(np_dtype)
    yb = np.concatenate([y_t, np.zeros((pad, *y_t.shape[1:]), y_t.dtype)])
    yb = yb.reshape(n_blocks, block, *y_t.shape[1:])
    mask = np.concatenate([np.ones(n_test), np.zeros(pad)]).astype(np_dtype).reshape(n_blocks, block)
    n_probe = max(probes_output, probes_spread, probes_rms, 1)
    test = {
        "x": jnp.asarray(xb),
        "y": jnp.asarray(yb),
        "labels": jnp.asarray(lab.reshape(n_blocks, block)),
        "mask": jnp.asarray(mask),
        "probes": jnp.asarray(test_x[:n_probe].astype(np_dtype)),
    }
    part = {"idx": jnp.asarray(idx), "eps": jnp.asarray(eps.astype(np_dtype))}
    ocfg = _ObsCfg(
        names=tuple(sorted(seen)),
        task=task,
        probes_output=probes_output,
        probes_spread=probes_spread,
        spread_layers=spread_layers,
        change_layers=change_layers,
        particle_layer=particle_layer,
        block=block,
        probes_rms=probes_rms,
        rms_layers=rms_layers,
    )
    return _observer(cfg, ocfg), test, part, ocfg, shapes


def replace_options(plan: RunPlan, **options: Any) -> RunPlan:
    """``plan`` with some of its backend options changed (for tests and benchmarks)."""
    return replace(plan, options={**plan.options, **options})
