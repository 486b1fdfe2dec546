"""The infinite-channel limit of a convolutional network (``network cnn``), by particles.

**Particles.**  In the mean-field limit of a cnn each channel of a conv layer is a point
``c_ℓ`` of a neuronal embedding and carries its filter: ``w_1(c_1) ∈ R^{C k²}`` from the
image, and for ℓ ≥ 2 the pair function ``w_ℓ(c_{ℓ-1}, c_ℓ) ∈ R^{k²}`` (one value per
kernel offset).  A conv layer's forward pass is an expectation over the previous
layer's channels — a sum over the k² offsets and the positions it sees, an average over
channels::

    H_1(x)[c_1, p] = Σ_{i, δ} x[i, s p + δ] w_1(c_1)[i, δ]
    H_ℓ(x)[c_ℓ, p] = E_{C_{ℓ-1}} Σ_δ a_{ℓ-1}(x)[C_{ℓ-1}, s p + δ] w_ℓ(C_{ℓ-1}, c_ℓ)[δ]

with ``a_ℓ = pool(φ(H_ℓ))``; the head averages (``avg``) or keeps (``flatten``) the
positions of each channel, and the dense layers and the output are the mlp's
(``docs/mean-field.md`` §2) with the channel expectation in place of the neuron
expectation.  Sampling ``N`` channels per layer turns the limit into a width-N cnn in
mean-field scaling trained by gradient flow on ``E_Z`` (``mfdsl_torch._cnn``'s network with
the same matrices): weight ``W_ℓ`` moves at ``-ξ(t) (n_{ℓ-1} n_ℓ ∂E_Z loss/∂W_ℓ + λ W_ℓ)``,
``n_0 = n_{L+1} = 1``, a bias at ``n_ℓ`` (the output bias 1).  The initial weights are
drawn by ``mfdsl._plan.initial_weights`` with the shapes of the torch network of width
N, so ``particles = N`` with the same seed starts from torch's filters exactly.

**No reductions.**  R1/R2 (``docs/mean-field.md`` §3) are derived for dense middle
layers; for convolutions they are not derived nor tested here, so a cnn is always
solved with plain particles (``reduce = auto`` means ``none``; the result's attrs say
so).

**Memory per particle.**  The state is ``C k²`` numbers for a channel of the first
layer, ``N k²`` for a channel of a later conv layer (its pair function with every
channel below), ``N`` (``N S`` after a ``flatten`` head) for a dense neuron; the
forward pass holds, per data sample and per channel, its feature map: ``h_ℓ w_ℓ`` numbers
for conv layer ℓ (``h_ℓ × w_ℓ`` its output size), plus, for the first layer and each
later one, an unfolded copy of the input of ``C_{ℓ-1} k² h_ℓ w_ℓ`` numbers.  The
backward pass keeps these for every sample of the ``E_Z`` batch: with ``B`` samples the
activations take about ``B Σ_ℓ (N + N k²) h_ℓ w_ℓ`` numbers.

**Time, data, observables** are the mlp solver's (:mod:`._solver`): Euler steps of
``dt`` (default ``lr``) cut to land on record times, ``E_Z`` over the training set or
``data_samples`` fresh examples per step, momentum only at ``dt = lr``;
``train_loss``, ``test_loss``, ``test_accuracy``, ``output`` and ``weight_change`` as
there, ``neuron_spread`` as ``mfdsl_torch._cnn`` defines it (across channels, averaged
over probes and positions).  Not supported for cnns (``mfdsl check`` rejects them):
Langevin noise, ``solver = heun`` and every scaling but ``mean_field``.  ``particles``
is :func:`mfdsl._conv.particle_table` of the sampled channels, as torch records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mfdsl.plugin import (
    ConvPlan,
    RunPlan,
    check_compatible,
    cnn_fans,
    initial_weights,
    particle_sample,
    particle_table,
    record_arrays,
)

from ._solver import Result, _activation, _example_losses, _intervals, _output_map, _targets, _x64

__all__ = ["solve_cnn"]


def _conv(a: jax.Array, w: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """``Σ_{i, δ} a[:, i, s p + δ − pad] w[(i, δ), c]``: ``w`` is the layer's matrix
    ``(C k², C_out)``, rows ``(channel, kernel row, kernel column)`` (the layout of
    ``torch.nn.functional.unfold``), given to XLA as an ``OIHW`` filter."""
    c_out = w.shape[1]
    filt = w.T.reshape(c_out, -1, kernel, kernel)
    return lax.conv_general_dilated(
        a,
        filt,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )


def _pool(a: jax.Array, pool: int) -> jax.Array:
    b, c, hh, ww = a.shape
    ho, wo = hh // pool, ww // pool
    a = a[:, :, : ho * pool, : wo * pool].reshape(b, c, ho, pool, wo, pool)
    return a.mean(axis=(3, 5))


def _forward(
    conv: ConvPlan, act: str, n: int, depth: int, params: dict[str, jax.Array], x: jax.Array, bias: bool
) -> tuple[list[jax.Array], jax.Array]:
    """Hidden pre-activations and the output before ψ, for ``N = n`` channels."""
    phi = _activation(act)
    a = x.reshape(x.shape[0], conv.channels, conv.height, conv.width)
    hs = []
    n_conv = len(conv.layers)
    for i, geo in enumerate(conv.layers):
        h = _conv(a, params[f"W{i + 1}"], geo.kernel, geo.stride, geo.padding)
        if i > 0:
            h = h * (1.0 / n)
        if bias:
            h = h + params[f"b{i + 1}"][:, None, None]
        hs.append(h)
        a = phi(h)
        if geo.pool > 1:
            a = _pool(a, geo.pool)
    g = a.mean(axis=(2, 3)) if conv.head == "avg" else a.reshape(a.shape[0], -1)
    for i in range(n_conv, depth + 1):
        h = (g @ params[f"W{i + 1}"]) * (1.0 / n)
        if bias:
            h = h + params[f"b{i + 1}"]
        if i == depth:
            return hs, h
        hs.append(h)
        g = phi(h)
    raise AssertionError("unreachable")


def solve_cnn(
    plan: RunPlan,
    dataset: Any,
    *,
    particles: int = 256,
    data_samples: int = 1024,
    dt: float | None = None,
    dtype: str = "float64",
    progress: Callable[[int, float], None] | None = None,
) -> Result:
    """Compute the infinite-channel limit of ``plan``'s cnn with ``particles`` channels
    (and neurons) per hidden layer (see the module docstring)."""
    with _x64(dtype == "float64"):
        return _solve_cnn(plan, dataset, particles, data_samples, dt, dtype, progress)


def _solve_cnn(
    plan: RunPlan,
    dataset: Any,
    particles: int,
    data_samples: int,
    dt: float | None,
    dtype: str,
    progress: Callable[[int, float], None] | None,
) -> Result:
    conv = plan.conv
    if conv is None:
        raise ValueError("solve_cnn needs a plan of a cnn network")
    if plan.scaling != "mean_field":
        raise ValueError(f"'{plan.scaling}' scaling has no mean-field limit for a cnn")
    opt = plan.optimizer
    if opt.kind == "langevin" and opt.temperature > 0:
        raise ValueError("Langevin noise is not supported for cnn limits")
    if particles < 1:
        raise ValueError("particles must be ≥ 1")
    np_dtype = np.dtype(dtype)
    task, outputs = str(dataset.task), int(dataset.outputs)
    check_compatible(plan.loss, task, outputs)
    n, L = int(particles), plan.depth
    bias = bool(plan.layers[0].bias)
    lr = float(opt.lr)
    step_dt = lr if dt is None else float(dt)
    momentum = float(opt.momentum) if opt.kind == "sgd" else 0.0
    if momentum and not math.isclose(step_dt, lr, rel_tol=1e-12):
        raise ValueError("momentum is a discrete recursion: use dt = lr")
    lam = float(opt.weight_decay)
    fans = cnn_fans(conv, L, n, outputs)
    if fans[0][0] != conv.channels * conv.layers[0].kernel ** 2:
        raise AssertionError("first-layer fan")
    names: list[str] = []
    rates: dict[str, float] = {}
    params: dict[str, jax.Array] = {}
    laws = [layer.init for layer in plan.layers]
    widths = [1] + [n] * L + [1]
    for ell, w in enumerate(initial_weights(plan.seed_of_init, laws, fans), start=1):
        params[f"W{ell}"] = jnp.asarray(w.astype(np_dtype))
        trainable = not plan.layers[ell - 1].frozen
        if trainable:
            names.append(f"W{ell}")
            rates[f"W{ell}"] = float(widths[ell - 1] * widths[ell])
        if bias:
            params[f"b{ell}"] = jnp.zeros(fans[ell - 1][1], np_dtype)
            if trainable:
                names.append(f"b{ell}")
                rates[f"b{ell}"] = float(widths[ell])

    def mean_loss(
        train: dict[str, jax.Array], fixed: dict[str, jax.Array], x: jax.Array, y: jax.Array
    ) -> Any:
        _, z = _forward(conv, plan.activation, n, L, {**fixed, **train}, x, bias)
        return jnp.mean(_example_losses(plan.loss, _output_map(plan.output)(z), y, outputs))

    value_and_grad = jax.value_and_grad(mean_loss)

    @jax.jit
    def step(
        params: dict[str, jax.Array], mom: dict[str, jax.Array], x: jax.Array, y: jax.Array, h: Any, xi: Any
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
        train = {k: params[k] for k in names}
        fixed = {k: v for k, v in params.items() if k not in rates}
        loss, grads = value_and_grad(train, fixed, x, y)
        new, new_mom = dict(params), dict(mom)
        for k in names:
            v = grads[k] * rates[k]
            if lam:
                v = v + lam * params[k]
            if momentum:
                v = momentum * mom[k] + v
                new_mom[k] = v
            new[k] = params[k] - (h * xi) * v
        return new, new_mom, loss

    online = getattr(dataset, "train_x", None) is None
    if online:
        batch = int(data_samples)
    else:
        full_x = jnp.asarray(np.asarray(dataset.train_x, np.float64).astype(np_dtype))
        full_y = jnp.asarray(_targets(dataset.train_y, task, plan.loss, outputs, np_dtype, lead=1))
        batch = int(full_x.shape[0])

    def data(i: int) -> tuple[jax.Array, jax.Array]:
        if not online:
            return full_x, full_y
        x, y = dataset.train_chunk(i, 1, batch)
        return (
            jnp.asarray(np.asarray(x[0], np.float64).astype(np_dtype)),
            jnp.asarray(_targets(y[0], task, plan.loss, outputs, np_dtype, lead=1)),
        )

    observer = _Observer(plan, dataset, conv, n, L, bias, task, outputs, np_dtype)
    w0 = {ell: params[f"W{ell}"] for ell in observer.change_layers}
    mom = {k: jnp.zeros_like(params[k]) for k in names} if momentum else {}
    steps_u, inverse = np.unique(np.asarray(plan.record_steps, np.int64), return_inverse=True)
    records = observer.allocate(len(steps_u))
    times = lr * steps_u.astype(np.float64)
    intervals = _intervals(np.concatenate([[0.0], times]), step_dt)
    status, message = "done", ""
    index, t_now = 0, 0.0
    x0, y0 = data(0)
    # the loss at initialisation: the first step's loss (its update is discarded)
    loss0 = float(step(params, mom, x0, y0, step_dt, 1.0)[2])
    for k, (m, h) in enumerate(intervals):
        if m == 0:
            observer.record(records, k, params, w0, loss0)
            if progress is not None:
                progress(int(steps_u[k]), loss0)
            continue
        losses = []
        for j in range(m):
            xi = float(plan.schedule(np.asarray((t_now + j * h) / lr), plan.steps))
            x, y = data(index)
            new, new_mom, loss = step(params, mom, x, y, h, xi)
            value = float(loss)
            if not math.isfinite(value):
                status = "diverged"
                t_bad = t_now + j * h
                message = f"diverged: the E_Z loss at time {t_bad:.6g} (step {t_bad / lr:.6g}) is {value}"
                break
            params, mom = new, new_mom
            losses.append(value)
            index += 1
        if status != "done":
            break
        t_now = float(times[k])
        mean = float(np.mean(losses))
        observer.record(records, k, params, w0, mean)
        if progress is not None:
            progress(int(steps_u[k]), mean)
    if status == "done":
        message = f"integrated to t = {t_now:.6g} in {index} euler steps with {n} particles per layer"
    attrs = {
        "limit_reductions": "none (convolutional network: the reductions are not derived for convolutions)",
        "limit_collapsed_layers": [],
        "limit_particles": [n] * L,
        "limit_solver": f"euler, dt = {step_dt:g}, "
        + ("E_Z over the training set" if not online else f"E_Z over {data_samples} fresh samples per step")
        + f", {dtype}",
    }
    return Result(
        records={name: arr[inverse] for name, arr in records.items()},
        status=status,
        message=message,
        attrs=attrs,
    )


class _Observer:
    def __init__(
        self,
        plan: RunPlan,
        dataset: Any,
        conv: ConvPlan,
        n: int,
        depth: int,
        bias: bool,
        task: str,
        outputs: int,
        np_dtype: np.dtype,
    ) -> None:
        self.plan, self.task, self.outputs = plan, task, outputs
        names = {o.name for o in plan.observables}
        self.n_test = int(np.asarray(dataset.test_x).shape[0])
        self.labels = np.asarray(dataset.test_y)
        by_name = {o.name: o for o in plan.observables}
        self.probes_output = by_name["output"].probe_count(self.n_test) if "output" in by_name else 0
        self.probes_spread = 0
        self.spread_layers: tuple[int, ...] = ()
        if "neuron_spread" in by_name:
            o = by_name["neuron_spread"]
            self.probes_spread = o.probe_count(self.n_test)
            self.spread_layers = o.layers_in(depth)
        self.probes_rms = 0
        self.rms_layers: tuple[int, ...] = ()
        if "preactivation_rms" in by_name:
            o = by_name["preactivation_rms"]
            self.probes_rms = o.probe_count(self.n_test)
            self.rms_layers = o.layers_in(depth)
        self.change_layers: tuple[int, ...] = ()
        if "weight_change" in by_name:
            self.change_layers = by_name["weight_change"].layers_in(depth)
        self.conv, self.depth = conv, depth
        self.particle_layer, self.particle_idx = 1, np.zeros(0, np.int64)
        if "particles" in by_name:
            o = by_name["particles"]
            (self.particle_layer,) = o.layers_in(depth)
            self.particle_idx = particle_sample(plan.seed_of_init, n, o.sample)
        self.names = names

        self.psi = _output_map(plan.output)
        loss_name = plan.loss

        spread_layers, change_layers, rms_layers = self.spread_layers, self.change_layers, self.rms_layers
        probes_output, probes_spread, probes_rms = self.probes_output, self.probes_spread, self.probes_rms
        psi = self.psi

        def evaluate(
            params: dict[str, jax.Array], w0: dict[int, jax.Array], x: jax.Array, y: jax.Array
        ) -> dict[str, jax.Array]:
            # everything one record needs from a test block, in one compiled call (the
            # probes are the block's first rows; only the first block's are used)
            hs, z = _forward(conv, plan.activation, n, depth, params, x, bias)
            out = {"z": z, "loss_sum": jnp.sum(_example_losses(loss_name, psi(z), y, outputs))}
            out["output"] = psi(z[:probes_output])
            out["spread"] = jnp.stack(
                [jnp.mean(jnp.std(hs[ell - 1][:probes_spread], axis=1)) for ell in spread_layers]
                or [jnp.zeros(())]
            )
            pre = [*hs, z]  # over the probes, the units and (conv layers) the positions; L+1: z
            out["rms"] = jnp.stack(
                [jnp.sqrt(jnp.mean(jnp.square(pre[ell - 1][:probes_rms]))) for ell in rms_layers]
                or [jnp.zeros(())]
            )
            out["change"] = jnp.stack(
                [jnp.sqrt(jnp.mean(jnp.square(params[f"W{ell}"] - w0[ell]))) for ell in change_layers]
                or [jnp.zeros(())]
            )
            return out

        self.evaluate = jax.jit(evaluate)
        # the probes come from the first test block, which holds them all
        self.block = max(512, self.probes_output, self.probes_spread, self.probes_rms)
        blocks = range(0, max(self.n_test, 1), self.block)
        test_x_np = np.asarray(dataset.test_x, np.float64).astype(np_dtype)
        test_y_np = _targets(dataset.test_y, task, plan.loss, outputs, np_dtype, lead=1)
        self.blocks = [
            (jnp.asarray(test_x_np[s : s + self.block]), jnp.asarray(test_y_np[s : s + self.block]), s)
            for s in blocks
        ]

    def allocate(self, count: int) -> dict[str, np.ndarray]:
        return record_arrays(
            self.plan.observables,
            count,
            probes=self.probes_output,
            outputs=self.outputs,
            layers={
                "neuron_spread": self.spread_layers,
                "preactivation_rms": self.rms_layers,
                "weight_change": self.change_layers,
            },
            particles=len(self.particle_idx),
        )

    def record(
        self,
        records: dict[str, np.ndarray],
        k: int,
        params: dict[str, jax.Array],
        w0: dict[int, jax.Array],
        train_loss: float,
    ) -> None:
        if "train_loss" in records:
            records["train_loss"][k] = train_loss
        want_test = "test_loss" in records or "test_accuracy" in records
        loss_sum, correct = 0.0, 0
        first: dict[str, Any] = {}
        for x, y, start in self.blocks if want_test else self.blocks[:1]:
            got = jax.device_get(self.evaluate(params, w0, x, y))
            if start == 0:
                first = got
            loss_sum += float(got["loss_sum"])
            z_np = np.asarray(got["z"], np.float64)
            labels = self.labels[start : start + self.block]
            if self.task == "binary":
                correct += int(np.sum(np.sign(z_np[:, 0]) == labels))
            elif self.task == "multiclass":
                correct += int(np.sum(np.argmax(z_np, axis=1) == labels))
        if "test_loss" in records:
            records["test_loss"][k] = loss_sum / self.n_test if self.n_test else math.nan
        if "test_accuracy" in records:
            ok = self.n_test and self.task != "regression"
            records["test_accuracy"][k] = correct / self.n_test if ok else math.nan
        if "output" in records:
            yhat = np.asarray(first["output"], np.float64)
            records["output"][k] = yhat[:, 0] if self.outputs == 1 else yhat
        if "neuron_spread" in records:
            records["neuron_spread"][k] = np.asarray(first["spread"], np.float64)
        if "preactivation_rms" in records:
            records["preactivation_rms"][k] = np.asarray(first["rms"], np.float64)
        if "weight_change" in records:
            records["weight_change"][k] = np.asarray(first["change"], np.float64)
        if "particles" in records:
            ell = self.particle_layer
            w_in = np.asarray(params[f"W{ell}"], np.float64)
            w_out = np.asarray(params[f"W{ell + 1}"], np.float64)
            records["particles"][k] = particle_table(
                self.conv, self.depth, ell, w_in, w_out, self.particle_idx
            )
