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
``neuron_spread`` of a conv layer is the standard deviation across channels of
``H_ℓ[c, p]``, averaged over the probe inputs and the positions ``p`` (of a dense layer,
across its neurons, as for the mlp).  Seeds are trained one at a time (no ensemble
batching) and never by the native C loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mfdsl import _streams
from mfdsl._conv import ConvPlan
from mfdsl._plan import RunPlan, check_compatible
from mfdsl._streams import Stream

from ._engine import _DTYPES, Dataset, Result, _activation, _example_losses, _output_map, _prepare_targets

__all__ = ["CnnNetwork", "train_cnn"]

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
        conv = self.conv
        a = x.reshape(x.shape[0], conv.channels, conv.height, conv.width)
        hs: list[Tensor] = []
        n_conv = len(conv.layers)
        for i, geo in enumerate(conv.layers):
            h = _conv(a, self.W[i], geo.kernel, geo.stride, geo.padding)
            h = self._affine(i, h, channel_axis=True)
            hs.append(h)
            a = self.phi(h)
            if geo.pool > 1:
                a = F.avg_pool2d(a, geo.pool)
        g = a.mean(dim=(2, 3)) if conv.head == "avg" else a.reshape(a.shape[0], -1)
        for i in range(n_conv, self.depth + 1):
            h = self._affine(i, g @ self.W[i], channel_axis=False)
            if i == self.depth:
                return hs, h
            hs.append(h)
            g = self.phi(h)
        raise AssertionError("unreachable")

    def _affine(self, i: int, h: Tensor, *, channel_axis: bool) -> Tensor:
        m = self.layers[i].forward_mult
        if m != 1.0:
            h = h * m
        b = self.b[i]
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
    (the module docstring gives the semantics).

    A small network trains on one CPU thread (the thread count is restored after):
    its ops are too small to split, and splitting them costs ten times the arithmetic
    on a busy machine."""
    threads = torch.get_num_threads()
    small = torch.device(device).type == "cpu" and _step_elements(plan) < _SMALL_STEP
    if small and threads > 1:
        torch.set_num_threads(1)
    try:
        return _train_cnn(plan, dataset, progress=progress, device=device, dtype=dtype)
    finally:
        if small and threads > 1:
            torch.set_num_threads(threads)


def _step_elements(plan: RunPlan) -> int:
    """The activations of one step: batch × Σ_ℓ (channels × positions) of the conv layers."""
    assert plan.conv is not None
    width = max(layer.fan_out for layer in plan.layers)
    return plan.batch * width * sum(hc * wc for hc, wc, _, _ in plan.conv.sizes())


def _train_cnn(
    plan: RunPlan,
    dataset: Dataset,
    *,
    progress: Callable[[int, float], None] | None,
    device: str | torch.device,
    dtype: str,
) -> Result:
    task = str(dataset.task)
    outputs = int(dataset.outputs)
    check_compatible(plan.loss, task, outputs)
    net = CnnNetwork(plan, device=device, dtype=dtype)
    if net.layers[-1].fan_out != outputs:
        raise ValueError(f"the plan has {net.layers[-1].fan_out} outputs, the dataset {outputs}")
    obs = _Observer(net, plan, dataset, task, outputs)
    steps_rec = np.asarray(plan.record_steps, dtype=np.int64)
    records = obs.allocate(len(steps_rec))
    rates = _rates(net)
    params = net.parameters()
    opt = plan.optimizer
    momentum = {name: torch.zeros_like(p) for name, p in params} if opt.momentum else {}
    noise_gen: torch.Generator | None = None
    if opt.kind == "langevin" and opt.temperature > 0:
        noise_gen = torch.Generator(device=net.device)
        noise_gen.manual_seed(_streams.torch_seed(plan.seed, Stream.NOISE))
    batch = plan.batch
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * dataset.dim))

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        _, z = net.forward(x)
        return _example_losses(plan.loss, net.psi(z), y).mean()

    def fetch(start: int, n: int) -> tuple[Tensor, Tensor]:
        x, y = dataset.train_chunk(start, n, batch)
        xs = torch.as_tensor(np.asarray(x, np.float64)).to(device=net.device, dtype=net.dtype)
        ys = _prepare_targets(
            y, lead=2, loss=plan.loss, task=task, outputs=outputs, device=net.device, dtype=net.dtype
        )
        return xs, ys

    status, message, steps_done = "done", "", 0
    step = 0
    losses: list[float] = []
    last = int(steps_rec[-1]) if steps_rec.size else 0
    for r, target in enumerate(steps_rec):
        target = int(target)
        if target == 0:
            xs, ys = fetch(0, 1)
            with torch.no_grad():
                first = float(loss_of(xs[0], ys[0]))
            obs.record(records, r, first)
            if progress is not None:
                progress(0, first)
            continue
        losses = []
        while step < target:
            n = min(chunk, target - step)
            xs, ys = fetch(step, n)
            for j in range(n):
                loss = loss_of(xs[j], ys[j])
                value = float(loss.detach())
                if not math.isfinite(value):
                    status = "diverged"
                    message = f"the minibatch loss became non-finite at step {step}"
                    break
                grads = torch.autograd.grad(loss, [p for _, p in params])
                xi = float(plan.schedule(step, plan.steps))
                with torch.no_grad():
                    for (name, p), g in zip(params, grads, strict=True):
                        rate = rates[name]
                        if opt.weight_decay:
                            g = g + (opt.weight_decay * rate.decay / rate.lr_mult) * p
                        if opt.momentum:
                            momentum[name].mul_(opt.momentum).add_(g)
                            g = momentum[name]
                        p.sub_((opt.lr * xi * rate.lr_mult) * g)
                        if noise_gen is not None and rate.noise > 0:
                            scale = math.sqrt(2.0 * opt.lr * xi * rate.noise * opt.temperature)
                            noise = torch.randn(
                                p.shape, generator=noise_gen, device=net.device, dtype=net.dtype
                            )
                            p.add_(scale * noise)
                losses.append(value)
                step += 1
                steps_done = step
            if status != "done":
                break
        if status != "done":
            break
        mean_loss = float(np.mean(losses)) if losses else math.nan
        obs.record(records, r, mean_loss)
        if progress is not None:
            progress(target, mean_loss)
        if target >= last:
            break
    return Result(records=records, status=status, message=message, steps_done=steps_done)


class _Observer:
    """What a record step records (the module docstring's observables)."""

    def __init__(self, net: CnnNetwork, plan: RunPlan, dataset: Dataset, task: str, outputs: int) -> None:
        self.net, self.plan, self.task, self.outputs = net, plan, task, outputs
        self.names = {o.name for o in plan.observables}
        if "particles" in self.names:
            raise ValueError("particles is not recorded for cnn networks")
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
            self.spread_layers = o.layers_or(range(1, L + 1), 1, L)
        self.change_layers: tuple[int, ...] = ()
        if "weight_change" in by_name:
            self.change_layers = by_name["weight_change"].layers_or(range(1, L + 2), 1, L + 1)
        self.w0 = {ell: net.W[ell - 1].detach().clone() for ell in self.change_layers}

    def allocate(self, n: int) -> dict[str, np.ndarray]:
        shapes: dict[str, tuple[int, ...]] = {}
        for o in self.plan.observables:
            if o.name in ("train_loss", "test_loss", "test_accuracy"):
                shapes[o.name] = ()
            elif o.name == "output":
                k = self.outputs
                shapes[o.name] = (self.probes_output,) if k == 1 else (self.probes_output, k)
            elif o.name == "neuron_spread":
                shapes[o.name] = (len(self.spread_layers),)
            elif o.name == "weight_change":
                shapes[o.name] = (len(self.change_layers),)
        return {name: np.full((n, *shape), np.nan) for name, shape in shapes.items()}

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
            n_probe = max(self.probes_output, self.probes_spread)
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
