"""Finite-width convolutional networks (``network cnn``): one plan → recorded arrays.

The geometry is :mod:`mfdsl._conv`'s; every weight layer is one matrix ``(fan_in,
fan_out)`` drawn by ``RunPlan.initial_weights`` (a conv layer's rows ordered ``(input
channel, kernel row, kernel column)``, the layout of ``torch.nn.functional.unfold``), so
a width-N network and the jax backend's N-particle system start from the same filters.
The forward pass, with ``m_ℓ = LayerPlan.forward_mult``::

    conv layer ℓ:  H_ℓ = m_ℓ · unfold(a_{ℓ-1}) @ W_ℓ (+ b_ℓ per channel),  a_ℓ = pool(φ(H_ℓ))
    head:          g = mean over positions of a (avg), or a flattened (flatten)
    dense layer ℓ: H_ℓ = m_ℓ · φ(H_{ℓ-1}) @ W_ℓ (+ b_ℓ)   (the first takes g, not φ(·))
    output:        z = m_{L+1} · φ(H_L) @ W_{L+1} (+ b),  ŷ = ψ(z)

SGD, the learning-rate multipliers, weight decay, momentum, Langevin noise, schedules,
frozen layers, the minibatch order, divergence and the observables ``train_loss``,
``test_loss``, ``test_accuracy``, ``output`` and ``weight_change`` follow the mlp engine
(:mod:`._engine`'s docstring) exactly; gradients come from autograd.
``particles(layer = ℓ, sample = S)`` follows S channels (neurons) of hidden layer ℓ chosen
from the stream ``PARTICLES``: ``mfdsl._conv.particle_table`` — the first two entries of
each one's incoming column, its ℓ2 norm (the whole filter), and its first outgoing
weight.  ``neuron_spread`` of a conv layer is the standard deviation across channels of
``H_ℓ[c, p]``, averaged over the probe inputs and the positions ``p`` (of a dense layer,
across its neurons, as for the mlp); ``preactivation_rms`` the root mean square of
``H_ℓ[c, p]`` over the probes, channels and positions (ℓ = L+1: the output before ψ).  The seeds of one network train together
(:func:`train_cnn_ensemble`: stacked parameters, one ``torch.func.vmap`` gradient pass,
each member what it gets alone up to rounding), never by the native C loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mfdsl.plugin import (
    ConvPlan,
    RunPlan,
    check_compatible,
    particle_sample,
    particle_table,
    record_arrays,
)

from ._engine import _DTYPES, Dataset, Result, _activation, _example_losses, _output_map, _prepare_targets
from ._noise import NoiseSource, slot
from ._options import option

__all__ = ["CnnNetwork", "ensemble_key", "train_cnn", "train_cnn_ensemble"]

# input entries per chunk of minibatches moved to the device
_CHUNK_ELEMENTS = 1 << 22
# test rows per evaluation block
_EVAL_ROWS = 512
# a step with fewer activations than this runs on one thread
_SMALL_STEP = 1 << 22


class CnnNetwork:
    """The parameters of one finite cnn and its forward pass."""

    def __init__(self, plan: RunPlan, *, device: str | torch.device = "cpu", dtype: str = "float64") -> None:
        if plan.conv is None:
            raise ValueError("CnnNetwork needs a plan of a cnn network (plan.conv)")
        self.plan = plan
        self.conv: ConvPlan = plan.conv
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.layers = plan.layers
        self.phi = _activation(plan.activation)
        self.psi = _output_map(plan.output)
        self.W = [
            torch.as_tensor(w).to(device=self.device, dtype=self.dtype).requires_grad_(not layer.frozen)
            for w, layer in zip(plan.initial_weights(), plan.layers, strict=True)
        ]
        self.b: list[Tensor | None] = [
            torch.zeros(layer.fan_out, device=self.device, dtype=self.dtype).requires_grad_(not layer.frozen)
            if layer.bias
            else None
            for layer in plan.layers
        ]

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Hidden pre-activations ``[H_1 … H_L]`` (conv: ``(B, C, h, w)``) and the output
        before ψ, ``(B, K)``, for flat inputs ``x`` ``(B, C·H·W)``."""
        return self.forward_with(self.W, self.b, x)

    def forward_with(self, W: list[Tensor], b: list[Tensor | None], x: Tensor) -> tuple[list[Tensor], Tensor]:
        """:meth:`forward` with the weights ``W`` and biases ``b`` (a member's slice of
        an ensemble's stacked parameters, under ``torch.func.vmap``)."""
        conv = self.conv
        a = x.reshape(x.shape[0], conv.channels, conv.height, conv.width)
        hs: list[Tensor] = []
        n_conv = len(conv.layers)
        for i, geo in enumerate(conv.layers):
            h = _conv(a, W[i], geo.kernel, geo.stride, geo.padding)
            h = self._affine(i, h, b[i], channel_axis=True)
            hs.append(h)
            a = self.phi(h)
            if geo.pool > 1:
                a = F.avg_pool2d(a, geo.pool)
        g = a.mean(dim=(2, 3)) if conv.head == "avg" else a.reshape(a.shape[0], -1)
        for i in range(n_conv, self.depth + 1):
            h = self._affine(i, g @ W[i], b[i], channel_axis=False)
            if i == self.depth:
                return hs, h
            hs.append(h)
            g = self.phi(h)
        raise AssertionError("unreachable")

    def _affine(self, i: int, h: Tensor, b: Tensor | None, *, channel_axis: bool) -> Tensor:
        m = self.layers[i].forward_mult
        if m != 1.0:
            h = h * m
        if b is not None:
            h = h + (b[:, None, None] if channel_axis else b)
        return h

    def parameters(self) -> list[tuple[str, Tensor]]:
        """The trainable parameters, named ``W1``, ``b1``, … ."""
        out = []
        for i, layer in enumerate(self.layers):
            if layer.frozen:
                continue
            out.append((f"W{i + 1}", self.W[i]))
            b = self.b[i]
            if b is not None:
                out.append((f"b{i + 1}", b))
        return out


@dataclass
class _Rates:
    lr_mult: float
    decay: float  # decay/noise rate d (per entry at lr · ξ · d)
    noise: float


def _rates(net: CnnNetwork) -> dict[str, _Rates]:
    out = {}
    for i, layer in enumerate(net.layers):
        d = layer.lr_mult if layer.decay_mult is None else layer.decay_mult
        out[f"W{i + 1}"] = _Rates(layer.lr_mult, d, layer.noise_rate)
        bd = layer.bias_lr_mult if layer.bias_decay_mult is None else layer.bias_decay_mult
        out[f"b{i + 1}"] = _Rates(layer.bias_lr_mult, bd, layer.bias_noise_rate)
    return out


def train_cnn(
    plan: RunPlan,
    dataset: Dataset,
    *,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
) -> Result:
    """Train the finite cnn of ``plan`` on ``dataset`` and record its observables
    (the module docstring gives the semantics): :func:`train_cnn_ensemble` with one
    member."""
    member_progress = None
    if progress is not None:
        report = progress

        def member_progress(member: int, step: int, loss: float) -> None:
            report(step, loss)

    return train_cnn_ensemble([plan], [dataset], progress=member_progress, device=device, dtype=dtype)[0]


def ensemble_key(plan: RunPlan) -> tuple[Any, ...]:
    """What the members of one cnn ensemble share: everything but the seed (and the
    sweep coordinates), so their shapes, rates, data sizes and record steps agree."""
    return (
        plan.layers,
        plan.conv,
        plan.activation,
        plan.output,
        plan.loss,
        repr(plan.data),
        plan.batch,
        plan.steps,
        plan.optimizer,
        plan.schedule,
        tuple(int(s) for s in plan.record_steps),
        plan.observables,
        tuple(sorted((k, str(v)) for k, v in plan.options.items())),
    )


def train_cnn_ensemble(
    plans: Sequence[RunPlan],
    datasets: Sequence[Dataset],
    *,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
) -> list[Result]:
    """Train several seeds of one cnn together: their parameters are stacked along a
    leading member axis and a step's gradients of every member come from one batched
    pass (``torch.func.vmap``), each member on its own data.  A member's numbers are
    those it gets alone up to rounding (batched and single products may sum in another
    order); one member alone takes plain autograd.  A member that diverges stops
    recording; the others go on.

    A small network trains on one CPU thread (the thread count is restored after):
    its ops are too small to split, and splitting them costs ten times the arithmetic
    on a busy machine."""
    if not plans or len(plans) != len(datasets):
        raise ValueError("train_cnn_ensemble needs one dataset per plan")
    keys = {ensemble_key(p) for p in plans}
    if len(keys) > 1:
        raise ValueError("an ensemble's plans may differ in their seed only")
    threads = torch.get_num_threads()
    elements = _step_elements(plans[0]) * len(plans)
    small = torch.device(device).type == "cpu" and elements < _SMALL_STEP
    if small and threads > 1:
        torch.set_num_threads(1)
    try:
        return _train(list(plans), list(datasets), progress=progress, device=device, dtype=dtype)
    finally:
        if small and threads > 1:
            torch.set_num_threads(threads)


def _step_elements(plan: RunPlan) -> int:
    """The activations of one step: batch × Σ_ℓ (channels × positions) of the conv layers."""
    assert plan.conv is not None
    width = max(layer.fan_out for layer in plan.layers)
    return plan.batch * width * sum(hc * wc for hc, wc, _, _ in plan.conv.sizes())


@dataclass
class _Member:
    plan: RunPlan
    dataset: Dataset
    net: CnnNetwork
    obs: _Observer
    records: dict[str, np.ndarray]
    noise: NoiseSource | None
    status: str = "done"
    message: str = ""
    steps_done: int = 0


def _train(
    plans: list[RunPlan],
    datasets: list[Dataset],
    *,
    progress: Callable[[int, int, float], None] | None,
    device: str | torch.device,
    dtype: str,
) -> list[Result]:
    plan = plans[0]
    task = str(datasets[0].task)
    outputs = int(datasets[0].outputs)
    check_compatible(plan.loss, task, outputs)
    steps_rec = np.asarray(plan.record_steps, dtype=np.int64)
    opt = plan.optimizer
    members = []
    for p, data in zip(plans, datasets, strict=True):
        net = CnnNetwork(p, device=device, dtype=dtype)
        if net.layers[-1].fan_out != outputs or int(data.outputs) != outputs:
            raise ValueError(f"the plan has {net.layers[-1].fan_out} outputs, the dataset {data.outputs}")
        obs = _Observer(net, p, data, task, outputs)
        noise = None
        if opt.kind == "langevin" and opt.temperature > 0:
            noise = NoiseSource(str(option(p, "noise")), p.seed_of_data, net.device, net.dtype)
        members.append(_Member(p, data, net, obs, obs.allocate(len(steps_rec)), noise))
    E = len(members)
    first_net = members[0].net
    rates = _rates(first_net)
    names = [name for name, _ in first_net.parameters()]
    # the noise's parameter slots: W1, b1, W2, … as the mlp's weight layers
    slots = {name: slot(int(name[1:]) - 1, bias=name[0] == "b") for name in names}
    # the parameters: one tensor per member (alone), or stacked with views per member
    stacked: dict[str, Tensor] = {}
    if E > 1:
        for i in range(len(first_net.layers)):
            for kind in ("W", "b"):
                tensors = [getattr(m.net, kind)[i] for m in members]
                if tensors[0] is None:
                    continue
                big = torch.stack([t.detach() for t in tensors])
                stacked[f"{kind}{i + 1}"] = big
                for e, m in enumerate(members):
                    getattr(m.net, kind)[i] = big[e]
                    if kind == "W" and i + 1 in m.obs.w0:
                        m.obs.w0[i + 1] = big[e].detach().clone()
    momentum: list[dict[str, Tensor]] = [
        {name: torch.zeros_like(p) for name, p in m.net.parameters()} if opt.momentum else {} for m in members
    ]
    batch = plan.batch
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * int(datasets[0].dim) * E))
    grad_fn = _batched_grad(first_net, plan.loss) if E > 1 else None

    def fetch(m: _Member, start: int, n: int) -> tuple[Tensor, Tensor]:
        x, y = m.dataset.train_chunk(start, n, batch)
        xs = torch.as_tensor(np.asarray(x, np.float64)).to(device=m.net.device, dtype=m.net.dtype)
        ys = _prepare_targets(
            y, lead=2, loss=plan.loss, task=task, outputs=outputs, device=m.net.device, dtype=m.net.dtype
        )
        return xs, ys

    def step_grads(xs: list[Tensor], ys: list[Tensor]) -> tuple[list[float], list[dict[str, Tensor]]]:
        """Each member's minibatch loss and gradients (of its trainable parameters)."""
        if grad_fn is None:
            m = members[0]
            _, z = m.net.forward(xs[0])
            loss = _example_losses(plan.loss, m.net.psi(z), ys[0]).mean()
            params = m.net.parameters()
            grads = torch.autograd.grad(loss, [p for _, p in params]) if params else ()
            return [float(loss.detach())], [dict(zip([n for n, _ in params], grads, strict=True))]
        train = {n: stacked[n] for n in names}
        fixed = {n: t for n, t in stacked.items() if n not in train}
        with warnings.catch_warnings():
            # unfold's backward has no batching rule yet: vmap loops over the members
            # there (correct, a little slower), and says so at every step
            warnings.filterwarnings("ignore", message=".*batching rule for aten::unfold_backward")
            grads, losses = grad_fn(train, fixed, torch.stack(xs), torch.stack(ys))
        values = losses.detach().cpu().tolist()
        return values, [{n: grads[n][e] for n in names} for e in range(E)]

    step = 0
    last = int(steps_rec[-1]) if steps_rec.size else 0
    for r, target in enumerate(steps_rec):
        target = int(target)
        active = [m for m in members if m.status == "done"]
        if not active:
            break
        if target == 0:
            for e, m in enumerate(members):
                xs, ys = fetch(m, 0, 1)
                with torch.no_grad():
                    _, z = m.net.forward(xs[0])
                    first = float(_example_losses(plan.loss, m.net.psi(z), ys[0]).mean())
                m.obs.record(m.records, r, first)
                if progress is not None:
                    progress(e, 0, first)
            continue
        losses: list[list[float]] = [[] for _ in members]
        while step < target:
            n = min(chunk, target - step)
            batches = [fetch(m, step, n) for m in members]
            for j in range(n):
                values, grads = step_grads([bx[j] for bx, _ in batches], [by[j] for _, by in batches])
                xi = float(plan.schedule(step, plan.steps))
                with torch.no_grad():
                    for e, m in enumerate(members):
                        if m.status != "done":
                            continue
                        if not math.isfinite(values[e]):
                            m.status = "diverged"
                            m.message = f"the minibatch loss became non-finite at step {step}"
                            continue
                        for name, param in m.net.parameters():
                            rate = rates[name]
                            g = grads[e][name]
                            if opt.weight_decay:
                                g = g + (opt.weight_decay * rate.decay / rate.lr_mult) * param
                            if opt.momentum:
                                momentum[e][name].mul_(opt.momentum).add_(g)
                                g = momentum[e][name]
                            param.sub_((opt.lr * xi * rate.lr_mult) * g)
                            if m.noise is not None and rate.noise > 0:
                                scale = math.sqrt(2.0 * opt.lr * xi * rate.noise * opt.temperature)
                                draw = torch.empty_like(param)
                                m.noise.fill(draw, slots[name], step)
                                param.add_(scale * draw)
                        losses[e].append(values[e])
                        m.steps_done = step + 1
                step += 1
                if all(m.status != "done" for m in members):
                    break
            if all(m.status != "done" for m in members):
                break
        for e, m in enumerate(members):
            if m.status != "done":
                continue
            mean_loss = float(np.mean(losses[e])) if losses[e] else math.nan
            m.obs.record(m.records, r, mean_loss)
            if progress is not None:
                progress(e, target, mean_loss)
        if target >= last:
            break
    return [
        Result(records=m.records, status=m.status, message=m.message, steps_done=m.steps_done)
        for m in members
    ]


def _batched_grad(net: CnnNetwork, loss: str) -> Callable[..., Any]:
    """``(train, fixed, xs, ys) → (grads, losses)`` for stacked members: the gradient of
    each member's minibatch loss in its own trainable parameters, in one vmapped pass."""
    from torch.func import grad_and_value, vmap

    depth = len(net.layers)

    def member_loss(train: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        params = {**fixed, **train}
        W = [params[f"W{i + 1}"] for i in range(depth)]
        b = [params.get(f"b{i + 1}") for i in range(depth)]
        _, z = net.forward_with(W, b, x)
        return _example_losses(loss, net.psi(z), y).mean()

    fn: Callable[..., Any] = vmap(grad_and_value(member_loss))
    return fn


class _Observer:
    """What a record step records (the module docstring's observables)."""

    def __init__(self, net: CnnNetwork, plan: RunPlan, dataset: Dataset, task: str, outputs: int) -> None:
        self.net, self.plan, self.task, self.outputs = net, plan, task, outputs
        self.names = {o.name for o in plan.observables}
        test_x = np.asarray(dataset.test_x, dtype=np.float64)
        self.n_test = test_x.shape[0]
        self.test_x = torch.as_tensor(test_x).to(device=net.device, dtype=net.dtype)
        self.test_y = _prepare_targets(
            dataset.test_y,
            lead=1,
            loss=plan.loss,
            task=task,
            outputs=outputs,
            device=net.device,
            dtype=net.dtype,
        )
        self.labels: Tensor | None = None
        if task == "binary":
            self.labels = torch.as_tensor(np.asarray(dataset.test_y, np.float64)).to(net.device, net.dtype)
        elif task == "multiclass":
            self.labels = torch.as_tensor(np.asarray(dataset.test_y, np.int64), device=net.device)
        if "test_accuracy" in self.names and self.labels is None:
            raise ValueError("test_accuracy is undefined for a regression dataset")
        L = net.depth
        by_name = {o.name: o for o in plan.observables}
        self.probes_output = by_name["output"].probe_count(self.n_test) if "output" in by_name else 0
        self.probes_spread = 0
        self.spread_layers: tuple[int, ...] = ()
        if "neuron_spread" in by_name:
            o = by_name["neuron_spread"]
            self.probes_spread = o.probe_count(self.n_test)
            self.spread_layers = o.layers_in(L)
        self.probes_rms = 0
        self.rms_layers: tuple[int, ...] = ()
        if "preactivation_rms" in by_name:
            o = by_name["preactivation_rms"]
            self.probes_rms = o.probe_count(self.n_test)
            self.rms_layers = o.layers_in(L)
        self.change_layers: tuple[int, ...] = ()
        if "weight_change" in by_name:
            self.change_layers = by_name["weight_change"].layers_in(L)
        self.w0 = {ell: net.W[ell - 1].detach().clone() for ell in self.change_layers}
        self.particle_layer, self.particle_idx = 1, np.zeros(0, np.int64)
        if "particles" in by_name:
            o = by_name["particles"]
            (self.particle_layer,) = o.layers_in(L)
            self.particle_idx = particle_sample(
                plan.seed_of_init, net.layers[self.particle_layer - 1].fan_out, o.sample
            )

    def allocate(self, n: int) -> dict[str, np.ndarray]:
        return record_arrays(
            self.plan.observables,
            n,
            probes=self.probes_output,
            outputs=self.outputs,
            layers={
                "neuron_spread": self.spread_layers,
                "preactivation_rms": self.rms_layers,
                "weight_change": self.change_layers,
            },
            particles=len(self.particle_idx),
        )

    def record(self, records: dict[str, np.ndarray], r: int, train_loss: float) -> None:
        net = self.net
        if "train_loss" in records:
            records["train_loss"][r] = train_loss
        with torch.no_grad():
            if "test_loss" in records or "test_accuracy" in records:
                loss, acc = self._test()
                if "test_loss" in records:
                    records["test_loss"][r] = loss
                if "test_accuracy" in records:
                    records["test_accuracy"][r] = acc
            n_probe = max(self.probes_output, self.probes_spread, self.probes_rms)
            if n_probe:
                hs, z = net.forward(self.test_x[:n_probe])
                if "output" in records:
                    yhat = net.psi(z[: self.probes_output])
                    records["output"][r] = _host(yhat[:, 0] if self.outputs == 1 else yhat)
                if "neuron_spread" in records:
                    records["neuron_spread"][r] = [
                        float(hs[ell - 1][: self.probes_spread].std(dim=1, correction=0).mean())
                        for ell in self.spread_layers
                    ]
                if "preactivation_rms" in records:
                    # over the probes, the units and (conv layers) the positions; L+1: z
                    pre = [*hs, z]
                    records["preactivation_rms"][r] = [
                        float(pre[ell - 1][: self.probes_rms].square().mean().sqrt())
                        for ell in self.rms_layers
                    ]
            if "particles" in records:
                ell = self.particle_layer
                records["particles"][r] = particle_table(
                    net.conv, net.depth, ell, _host(net.W[ell - 1]), _host(net.W[ell]), self.particle_idx
                )
            if "weight_change" in records:
                records["weight_change"][r] = [
                    float(
                        torch.linalg.vector_norm(net.W[ell - 1] - self.w0[ell])
                        / math.sqrt(self.w0[ell].numel())
                    )
                    for ell in self.change_layers
                ]

    def _test(self) -> tuple[float, float]:
        n = self.n_test
        if n == 0:
            return math.nan, math.nan
        loss_sum, correct = 0.0, 0
        for s in range(0, n, _EVAL_ROWS):
            _, z = self.net.forward(self.test_x[s : s + _EVAL_ROWS])
            loss_sum += float(
                _example_losses(self.plan.loss, self.net.psi(z), self.test_y[s : s + _EVAL_ROWS]).sum()
            )
            if self.labels is not None:
                labels = self.labels[s : s + _EVAL_ROWS]
                if self.task == "binary":
                    correct += int((torch.sign(z[:, 0]) == labels).sum())
                else:
                    correct += int((torch.argmax(z, dim=1) == labels).sum())
        return loss_sum / n, (correct / n if self.labels is not None else math.nan)


def _conv(a: Tensor, w: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """``Σ_{i, δ} a[:, i, s p + δ − pad] w[(i, δ), c]`` as ``(B, C_out, h, w)``: the
    windows are a strided view of the padded input (``Tensor.unfold``), contracted with
    ``w`` seen as ``(C, k, k, C_out)`` — rows ``(channel, kernel row, kernel column)``,
    ``F.unfold``'s order — by one matrix product (``F.unfold`` itself is far slower on
    the CPU in float64).  In float32, and on a GPU, ``F.conv2d`` with ``w`` as an
    ``OIHW`` filter (oneDNN, cuDNN) is faster still; both are the same sum."""
    if a.dtype != torch.float64 or a.device.type != "cpu":
        filt = w.t().reshape(w.shape[1], a.shape[1], kernel, kernel)
        return F.conv2d(a, filt, stride=stride, padding=padding)
    if padding:
        a = F.pad(a, (padding, padding, padding, padding))
    windows = a.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, h, w, k, k)
    b, c, ho, wo = windows.shape[:4]
    flat = windows.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kernel * kernel)
    return (flat @ w).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)


def _host(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()
