"""The finite-width training engine: one :class:`~mfdsl._plan.RunPlan` → recorded arrays.

The network, its scaling and SGD follow ``docs/mean-field.md`` §1, with every
scaling already resolved into per-layer numbers by the plan::

    H_1 = m_1 · x @ W_1 (+ b_1)
    H_ℓ = m_ℓ · φ(H_{ℓ-1}) @ W_ℓ (+ b_ℓ)            2 ≤ ℓ ≤ L
    z   = m_{L+1} · φ(H_L) @ W_{L+1} (+ b_{L+1}),    ŷ = ψ(z)

where ``m_ℓ = LayerPlan.forward_mult``.  The backward pass is derived by hand (no
autograd), runs under ``torch.no_grad`` and fuses each weight gradient into its update
(``W.addmm_``), so a step costs one pass over each weight matrix beyond the matmuls.

Conventions that are this engine's choices (the plan leaves them open):

* **Seeding.**  Weights are drawn in float64 with numpy,
  ``rng = np.random.default_rng([plan.seed, 1])``, layer by layer (1 … L+1), each as
  ``LayerPlan.init.sample(rng, (fan_in, fan_out))``, then cast; the same seed therefore
  gives the same initial network on any device and dtype.  The neurons sampled by the
  ``particles`` observable come from ``np.random.default_rng([plan.seed, 2])``; the
  Langevin noise from a ``torch.Generator`` on the run's device seeded with
  ``np.random.SeedSequence([plan.seed, 3])`` (its stream differs between CPU and CUDA).
* **Activations** φ: ``relu``, ``tanh``, ``sigmoid``, ``gelu`` (exact: h·Φ(h)), ``erf``
  (erf(h), not erf(h/√2)) and ``identity``.  **Output maps** ψ: ``identity``, ``tanh``,
  ``sigmoid``.  Biases start at 0 and sit inside ψ.
* **Losses** per example, averaged over the minibatch: ``mse`` = ½‖y − ŷ‖² (summed
  over outputs; integer multiclass labels become one-hot targets), ``logistic`` =
  softplus(−y·ŷ) for y = ±1 and one output, ``cross_entropy`` = −log softmax(ŷ)[y]
  for integer labels.
* **Optimiser.**  For every parameter ``p`` of a trainable layer with multiplier ``r``
  (``lr_mult`` for weights, ``bias_lr_mult`` for biases) and ``η = lr · ξ(step) · r``,
  ``ξ = plan.schedule(step, plan.steps)``::

      g = ∂(batch-mean loss)/∂p + weight_decay · (d / r) · p
      v = momentum · v + g          (v = g when momentum is 0; v starts at 0)
      p ← p − η v  (+ √(2 lr ξ d temperature) · N(0, 1) per entry, for ``langevin``)

  with ``d`` the layer's ``decay_mult`` (``bias_decay_mult``), ``r`` when unset: decay
  and noise act per entry at the rate lr · ξ · d.

  Weight decay and noise apply to biases too.  Frozen layers (weights and biases)
  never move and get no noise.
* **Steps.**  Step ``s`` is the state after ``s`` updates; the update from ``s`` to
  ``s+1`` uses minibatch ``s`` of ``dataset.train_chunk``.  Training stops after the last
  record step, since nothing later is observed.

Observables (``records[name]``, leading axis = ``len(plan.record_steps)``, float64):

* ``train_loss`` — at a record step ``r``, the mean of the minibatch losses of the
  updates since the previous record step (each computed in that update's forward
  pass, before it); at step 0, the loss of minibatch 0 at initialisation.
* ``test_loss``, ``test_accuracy`` — over ``dataset.test_x/test_y``.  Binary accuracy is
  ``sign(z) == y`` with z the output before ψ (this is ``sign(ŷ)`` for identity and
  tanh, and thresholds a sigmoid at ½); multiclass accuracy is ``argmax ŷ == y``.
  Accuracy is undefined for regression (a ``ValueError``).
* ``output(probes=P)`` — ŷ on the first P test inputs: ``(n, P)``, or ``(n, P, K)``.
* ``neuron_spread(layer=…)`` — for each hidden layer ℓ listed (default all 1 … L) the
  population standard deviation across the neurons of H_ℓ, averaged over the probe
  inputs: ``(n, len(layers))``.
* ``weight_change(layer=…)`` — ``‖W_ℓ(t) − W_ℓ(0)‖_F / ‖W_ℓ(0)‖_F`` for each layer listed
  (default all 1 … L+1); where ``W_ℓ(0) = 0`` (e.g. a ``constant(0)`` last layer) the
  absolute change ``‖W_ℓ(t)‖_F`` instead.  Biases are not included.
* ``particles(layer=ℓ, sample=S)`` — S neurons j of hidden layer ℓ (default ℓ = 1),
  fixed for the run; per neuron ``(W_ℓ[0,j], W_ℓ[1,j], ‖W_ℓ[:,j]‖₂, W_{ℓ+1}[j,0])``:
  ``(n, S, 4)``.  ``S = 0`` takes every neuron; rows beyond the layer's width, and the
  second column when ``fan_in == 1``, are NaN, so shapes agree across a width sweep.

``probes = 0`` means 16 probe inputs (or all test points if fewer).

Divergence: the per-step losses stay on the device and are checked once per data chunk
(chunks end at record steps and hold at most ``chunk_steps`` steps).  The first
non-finite minibatch loss at step ``s`` stops the run: records after step ``s`` stay NaN,
``status = "diverged"`` and ``steps_done = s`` (the number of updates whose loss was
finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from mfdsl._plan import LayerPlan, ObservablePlan, RunPlan

__all__ = ["Dataset", "Network", "Result", "Trainer", "train"]

# The numpy/torch streams derived from plan.seed; fixed so tests and other backends
# can rebuild the exact same initial weights and neuron samples.
INIT_STREAM = 1
PARTICLE_STREAM = 2
NOISE_STREAM = 3

DEFAULT_PROBES = 16
# A data chunk holds at most this many input entries, so a large batch × dim input
# (MNIST) does not pull hundreds of MB per chunk.
_CHUNK_ELEMENTS = 1 << 23
# Rows per block when evaluating the test set, times the widest layer.
_EVAL_ELEMENTS = 1 << 22

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}

Task = Literal["binary", "multiclass", "regression"]


class Dataset(Protocol):
    """What the engine needs from a dataset (``mfdsl.make_dataset`` provides it).

    Read-only members, so a dataset may narrow them (e.g. ``task`` to a Literal)."""

    @property
    def dim(self) -> int: ...
    @property
    def outputs(self) -> int: ...
    @property
    def task(self) -> str: ...  # "binary" | "multiclass" | "regression"
    @property
    def test_x(self) -> np.ndarray: ...
    @property
    def test_y(self) -> np.ndarray: ...

    def train_chunk(self, start: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Minibatches for steps ``start … start+n-1``: x ``(n, batch, dim)``, y
        ``(n, batch)`` or ``(n, batch, K)``."""
        ...


@dataclass(frozen=True)
class Result:
    """What one run produced.

    ``records`` maps each observable's name to a float64 array whose leading axis
    follows ``plan.record_steps``; ``status`` is ``"done"`` or ``"diverged"``;
    ``steps_done`` counts the updates performed with a finite loss.
    """

    records: dict[str, np.ndarray]
    status: str
    message: str
    steps_done: int


# --------------------------------------------------------------------------- maths


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name == "relu":
        return torch.relu
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    if name == "gelu":
        return torch.nn.functional.gelu
    if name == "erf":
        return torch.erf
    if name == "identity":
        return _identity
    raise ValueError(f"unknown activation {name!r}")


def _identity(h: Tensor) -> Tensor:
    return h


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _backprop_activation(name: str, g: Tensor, h: Tensor, a: Tensor) -> Tensor:
    """``g · φ'(h)`` in place on ``g`` (a fresh matmul result), given ``a = φ(h)``."""
    if name == "relu":
        # autograd's own relu backward: one fused kernel, 0 where h ≤ 0
        out: Tensor = torch.ops.aten.threshold_backward(g, h, 0.0)
        return out
    if name == "tanh":
        return g.mul_(1.0 - a * a)
    if name == "sigmoid":
        return g.mul_(a * (1.0 - a))
    if name == "gelu":
        cdf = torch.erf(h * _SQRT_HALF).add_(1.0).mul_(0.5)
        pdf = torch.exp(h * h * -0.5).mul_(_INV_SQRT_2PI)
        return g.mul_(cdf.addcmul_(h, pdf))
    if name == "erf":
        return g.mul_(torch.exp(-(h * h)).mul_(_TWO_OVER_SQRT_PI))
    return g


def _output_map(name: str) -> Callable[[Tensor], Tensor]:
    if name == "identity":
        return _identity
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"unknown output map {name!r}")


def _output_map_grad(name: str, g: Tensor, yhat: Tensor) -> Tensor:
    """``g · ψ'(z)`` in place, from ``ŷ = ψ(z)``."""
    if name == "tanh":
        return g.mul_(1.0 - yhat * yhat)
    if name == "sigmoid":
        return g.mul_(yhat * (1.0 - yhat))
    return g


def _example_losses(loss: str, yhat: Tensor, y: Tensor) -> Tensor:
    """Per-example loss, shape ``(B,)``; ``y`` as prepared by :func:`_prepare_targets`."""
    if loss == "mse":
        return 0.5 * (yhat - y).square().sum(dim=1)
    if loss == "logistic":
        return torch.nn.functional.softplus(-(y * yhat)).sum(dim=1)
    logp = torch.log_softmax(yhat, dim=1)
    return -logp.gather(1, y[:, None])[:, 0]


def _loss_and_grad(loss: str, yhat: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Batch-mean loss (0-d) and its gradient in ŷ, ``(B, K)``."""
    inv_b = 1.0 / yhat.shape[0]
    if loss == "mse":
        r = yhat - y
        return r.square().sum().mul_(0.5 * inv_b), r.mul_(inv_b)
    if loss == "logistic":
        margin = -(y * yhat)
        value = torch.nn.functional.softplus(margin).sum().mul_(inv_b)
        return value, torch.sigmoid(margin).mul_(y).mul_(-inv_b)
    logp = torch.log_softmax(yhat, dim=1)
    value = logp.gather(1, y[:, None]).sum().mul_(-inv_b)
    grad = logp.exp_()
    grad.scatter_add_(1, y[:, None], torch.full_like(grad[:, :1], -1.0))
    return value, grad.mul_(inv_b)


def _check_compatible(loss: str, task: str, outputs: int) -> None:
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


def _prepare_targets(
    y: np.ndarray, *, lead: int, loss: str, task: str, outputs: int, device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Targets as the loss functions take them: integer labels for cross-entropy,
    otherwise floats with a trailing output axis.  ``lead`` is the number of axes of a
    target array without an output axis: 1 for test data ``(n,)``, 2 for a chunk
    ``(n, batch)``."""
    if task == "multiclass":
        labels = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
        if loss == "cross_entropy":
            return labels
        return torch.nn.functional.one_hot(labels, outputs).to(dtype)
    t = torch.as_tensor(np.asarray(y, dtype=np.float64)).to(device=device, dtype=dtype)
    if t.dim() == lead:
        t = t.unsqueeze(-1)
    if t.shape[-1] != outputs:
        raise ValueError(f"targets have {t.shape[-1]} outputs, the network {outputs}")
    return t


# --------------------------------------------------------------------------- network


class Network:
    """The parameters of one finite network and its forward pass.

    ``W[i]``/``b[i]`` hold weight layer ``i + 1``; ``b[i]`` is ``None`` without a bias.
    """

    def __init__(self, plan: RunPlan, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float64") -> None:
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, not {dtype}")
        self.layers: tuple[LayerPlan, ...] = tuple(plan.layers)
        if len(self.layers) < 2:
            raise ValueError("a network needs at least one hidden layer")
        for i, layer in enumerate(self.layers):
            if layer.index != i + 1:
                raise ValueError(f"layer {i + 1} has index {layer.index}")
            if i and layer.fan_in != self.layers[i - 1].fan_out:
                raise ValueError(f"layer {i + 1}: fan_in {layer.fan_in} does not match "
                                 f"fan_out {self.layers[i - 1].fan_out} of layer {i}")
        self.activation = plan.activation
        self.output = plan.output
        self.phi = _activation(plan.activation)
        self.psi = _output_map(plan.output)
        rng = np.random.default_rng([plan.seed, INIT_STREAM])
        self.W: list[Tensor] = []
        self.b: list[Tensor | None] = []
        for layer in self.layers:
            w = np.asarray(layer.init.sample(rng, (layer.fan_in, layer.fan_out)), np.float64)
            self.W.append(torch.as_tensor(w).to(device=self.device, dtype=self.dtype))
            self.b.append(torch.zeros(layer.fan_out, device=self.device, dtype=self.dtype)
                          if layer.bias else None)

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def layer_out(self, i: int, a: Tensor) -> Tensor:
        """``m · a @ W (+ b)`` for weight layer ``i + 1``."""
        m = self.layers[i].forward_mult
        b = self.b[i]
        if b is not None:
            return torch.addmm(b, a, self.W[i], alpha=m)
        h = torch.mm(a, self.W[i])
        return h if m == 1.0 else h.mul_(m)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Pre-activations ``[H_1 … H_L, z]`` and activations ``[x, φ(H_1) … φ(H_L)]``."""
        hs: list[Tensor] = []
        acts = [x]
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            h = self.layer_out(i, acts[-1])
            hs.append(h)
            if i < last:
                acts.append(self.phi(h))
        return hs, acts

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, ŷ)`` for inputs ``x`` of shape ``(n, dim)``."""
        z = self.forward(x)[0][-1]
        return z, self.psi(z)


# --------------------------------------------------------------------------- training


class Trainer:
    """SGD / Langevin on a :class:`Network`, chunk by chunk, without host syncs."""

    def __init__(self, net: Network, plan: RunPlan, task: str, outputs: int) -> None:
        self.net = net
        self.loss = plan.loss
        self.task = task
        self.outputs = outputs
        opt = plan.optimizer
        if opt.kind not in ("sgd", "langevin"):
            raise ValueError(f"unknown optimizer {opt.kind!r}")
        self.lr = float(opt.lr)
        self.momentum = float(opt.momentum)
        self.weight_decay = float(opt.weight_decay)
        self.temperature = float(opt.temperature) if opt.kind == "langevin" else 0.0
        if self.temperature < 0:
            raise ValueError("the Langevin temperature must be ≥ 0")
        self.schedule = plan.schedule
        self.total_steps = int(plan.steps)
        trainable = [i for i, layer in enumerate(net.layers) if not layer.frozen]
        # Backpropagation stops below the lowest layer that learns.
        self.lowest = min(trainable) if trainable else len(net.layers)
        self.vW: list[Tensor | None] = [None] * len(net.layers)
        self.vb: list[Tensor | None] = [None] * len(net.layers)
        if self.momentum:
            for i in trainable:
                self.vW[i] = torch.zeros_like(net.W[i])
                bias = net.b[i]
                if bias is not None:
                    self.vb[i] = torch.zeros_like(bias)
        self.generator: torch.Generator | None = None
        if self.temperature > 0:
            seed = int(np.random.SeedSequence([plan.seed, NOISE_STREAM])
                       .generate_state(1, np.uint64)[0]) & (2**63 - 1)
            self.generator = torch.Generator(device=net.device)
            self.generator.manual_seed(seed)

    def prepare_chunk(self, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """Move one chunk of minibatches to the device in the engine's layout."""
        net = self.net
        xt = torch.as_tensor(np.asarray(x)).to(device=net.device, dtype=net.dtype)
        if xt.dim() != 3 or xt.shape[2] != net.layers[0].fan_in:
            raise ValueError(f"train_chunk gave x of shape {tuple(xt.shape)}, expected "
                             f"(n, batch, {net.layers[0].fan_in})")
        yt = _prepare_targets(y, lead=2, loss=self.loss, task=self.task,
                              outputs=self.outputs, device=net.device, dtype=net.dtype)
        if yt.shape[:2] != xt.shape[:2]:
            raise ValueError(f"train_chunk gave y of shape {tuple(np.shape(y))} for x of "
                             f"shape {tuple(xt.shape)}")
        return xt, yt

    def minibatch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Batch-mean loss of one minibatch at the current weights (0-d tensor)."""
        yhat = self.net.predict(x)[1]
        return _example_losses(self.loss, yhat, y).mean()

    def run(self, xs: Tensor, ys: Tensor, start: int) -> Tensor:
        """Do ``len(xs)`` updates from step ``start``; return their losses (device)."""
        n = xs.shape[0]
        xi = np.asarray(self.schedule(np.arange(start, start + n), self.total_steps),
                        dtype=np.float64) * self.lr
        losses = torch.empty(n, device=self.net.device, dtype=self.net.dtype)
        with torch.no_grad():
            for k in range(n):
                losses[k] = self.step(xs[k], ys[k], float(xi[k]))
        return losses

    def step(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        """One update at base rate ``lr`` (= lr · ξ); returns the loss before it."""
        net = self.net
        hs, acts = net.forward(x)
        yhat = net.psi(hs[-1])
        value, g = _loss_and_grad(self.loss, yhat, y)
        g = _output_map_grad(net.output, g, yhat)
        for i in range(len(net.layers) - 1, self.lowest - 1, -1):
            layer = net.layers[i]
            # The gradient below must see W_i before its update.
            g_below = None
            if i > self.lowest:
                g_below = torch.mm(g, net.W[i].t())
                if layer.forward_mult != 1.0:
                    g_below.mul_(layer.forward_mult)
                g_below = _backprop_activation(net.activation, g_below, hs[i - 1],
                                               acts[i])
            if not layer.frozen:
                self._update(i, lr, acts[i], g)
            if g_below is None:
                break
            g = g_below
        return value

    def _update(self, i: int, lr: float, a: Tensor, g: Tensor) -> None:
        net = self.net
        layer = net.layers[i]
        eta = lr * layer.lr_mult
        decay = layer.lr_mult if layer.decay_mult is None else layer.decay_mult
        # Decay enters the gradient divided by lr_mult so that, after the step's η, it
        # acts at the per-entry rate lr · decay_mult.
        wd = self.weight_decay * decay / layer.lr_mult
        w = net.W[i]
        v = self.vW[i]
        if v is None:
            if wd:
                w.mul_(1.0 - eta * wd)
            w.addmm_(a.t(), g, alpha=-eta * layer.forward_mult)
        else:
            v.mul_(self.momentum).addmm_(a.t(), g, alpha=layer.forward_mult)
            if wd:
                v.add_(w, alpha=wd)
            w.add_(v, alpha=-eta)
        self._noise(w, lr * decay)
        bias = net.b[i]
        if bias is None:
            return
        eta_b = lr * layer.bias_lr_mult
        decay_b = layer.bias_lr_mult if layer.bias_decay_mult is None else layer.bias_decay_mult
        wd_b = self.weight_decay * decay_b / layer.bias_lr_mult
        gb = g.sum(dim=0)
        vb = self.vb[i]
        if vb is None:
            if wd_b:
                gb.add_(bias, alpha=wd_b)
            bias.add_(gb, alpha=-eta_b)
        else:
            vb.mul_(self.momentum).add_(gb)
            if wd_b:
                vb.add_(bias, alpha=wd_b)
            bias.add_(vb, alpha=-eta_b)
        self._noise(bias, lr * decay_b)

    def _noise(self, p: Tensor, eta: float) -> None:
        if self.generator is None or eta <= 0:
            return
        noise = torch.randn(p.shape, generator=self.generator, device=p.device,
                            dtype=p.dtype)
        p.add_(noise, alpha=math.sqrt(2.0 * eta * self.temperature))


# --------------------------------------------------------------------------- observing


@dataclass
class _Observer:
    """Computes the records at one record point."""

    net: Network
    plan: RunPlan
    loss: str
    task: str
    outputs: int
    test_x: Tensor
    test_y: Tensor
    test_labels: Tensor | None  # binary ±1 or multiclass labels, for accuracy
    observables: tuple[ObservablePlan, ...]
    w0: dict[int, Tensor]
    particle_idx: np.ndarray | None
    particle_layer: int
    probes_output: int
    probes_spread: int
    spread_layers: tuple[int, ...]
    change_layers: tuple[int, ...]

    def observe(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        names = {o.name for o in self.observables}
        with torch.no_grad():
            if "test_loss" in names or "test_accuracy" in names:
                loss, acc = self._test()
                out["test_loss"] = np.asarray(loss)
                out["test_accuracy"] = np.asarray(acc)
            n_probe = max(self.probes_output if "output" in names else 0,
                          self.probes_spread if "neuron_spread" in names else 0)
            if n_probe:
                hs, _ = self.net.forward(self.test_x[:n_probe])
                if "output" in names:
                    yhat = self.net.psi(hs[-1][: self.probes_output])
                    if self.outputs == 1:
                        yhat = yhat[:, 0]
                    out["output"] = _host(yhat)
                if "neuron_spread" in names:
                    spread = [hs[ell - 1][: self.probes_spread].std(dim=1, correction=0)
                              .mean() for ell in self.spread_layers]
                    out["neuron_spread"] = _host(torch.stack(spread))
            if "weight_change" in names:
                out["weight_change"] = _host(torch.stack(
                    [self._change(ell) for ell in self.change_layers]))
            if "particles" in names:
                out["particles"] = self._particles()
        return out

    def _test(self) -> tuple[float, float]:
        n = self.test_x.shape[0]
        if n == 0:
            return math.nan, math.nan
        width = max(max(layer.fan_out for layer in self.net.layers),
                    self.net.layers[0].fan_in)
        block = max(1, _EVAL_ELEMENTS // width)
        loss_sum = torch.zeros((), device=self.net.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.net.device, dtype=torch.int64)
        for s in range(0, n, block):
            z, yhat = self.net.predict(self.test_x[s:s + block])
            losses = _example_losses(self.loss, yhat, self.test_y[s:s + block])
            loss_sum += losses.sum(dtype=torch.float64)
            if self.test_labels is not None:
                labels = self.test_labels[s:s + block]
                if self.task == "binary":
                    correct += (torch.sign(z[:, 0]) == labels).sum()
                else:
                    correct += (torch.argmax(z, dim=1) == labels).sum()
        acc = correct.item() / n if self.test_labels is not None else math.nan
        return loss_sum.item() / n, acc

    def _change(self, ell: int) -> Tensor:
        w0 = self.w0[ell]
        diff = torch.linalg.vector_norm(self.net.W[ell - 1] - w0)
        base = torch.linalg.vector_norm(w0)
        return torch.where(base > 0, diff / base, diff)

    def _particles(self) -> np.ndarray:
        idx = self.particle_idx
        assert idx is not None
        size = len(idx)
        out = np.full((size, 4), np.nan)
        ell = self.particle_layer
        w_in = self.net.W[ell - 1]
        w_out = self.net.W[ell]
        take = idx[idx >= 0]
        if take.size == 0:
            return out
        cols = torch.as_tensor(take, device=w_in.device)
        sel = w_in[:, cols]
        rows = min(2, sel.shape[0])
        parts = [sel[:rows].t(), torch.linalg.vector_norm(sel, dim=0)[:, None],
                 w_out[cols, :1]]
        block = _host(torch.cat(parts, dim=1))
        filled = out[: take.size]
        filled[:, :rows] = block[:, :rows]
        filled[:, 2:] = block[:, rows:]
        return out


def _host(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _layers_or(obs: ObservablePlan, default: Sequence[int], lo: int, hi: int
               ) -> tuple[int, ...]:
    layers = tuple(int(ell) for ell in obs.layers) or tuple(default)
    for ell in layers:
        if not lo <= ell <= hi:
            raise ValueError(f"{obs.name}: layer {ell} is outside {lo} … {hi}")
    return layers


def _probes(obs: ObservablePlan, n_test: int) -> int:
    if obs.probes < 0:
        raise ValueError(f"{obs.name}: probes must be ≥ 0")
    if obs.probes == 0:
        return min(DEFAULT_PROBES, n_test)
    if obs.probes > n_test:
        raise ValueError(f"{obs.name}: {obs.probes} probes but only {n_test} test points")
    return int(obs.probes)


# --------------------------------------------------------------------------- train


def train(
    plan: RunPlan,
    dataset: Dataset,
    *,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float64",
    chunk_steps: int = 1024,
) -> Result:
    """Train the finite network of ``plan`` on ``dataset`` and record its observables.

    ``progress(step, train_loss)`` is called at each record step (in order) with the
    same value ``train_loss`` records.  ``chunk_steps`` caps the steps per
    ``train_chunk`` call (chunks also end at record steps).  Nothing global (threads,
    default dtype, RNG state) is changed.  See the module docstring for the semantics.
    """
    if chunk_steps < 1:
        raise ValueError("chunk_steps must be ≥ 1")
    task = str(dataset.task)
    outputs = int(dataset.outputs)
    _check_compatible(plan.loss, task, outputs)
    net = Network(plan, device=device, dtype=dtype)
    if net.layers[0].fan_in != int(dataset.dim):
        raise ValueError(f"layer 1 has fan_in {net.layers[0].fan_in}, the data dim "
                         f"{dataset.dim}")
    if net.layers[-1].fan_out != outputs:
        raise ValueError(f"the last layer has fan_out {net.layers[-1].fan_out}, the data "
                         f"{outputs} outputs")
    batch = int(plan.batch)
    if batch < 1:
        raise ValueError("batch must be ≥ 1")

    record_steps = np.asarray(plan.record_steps, dtype=np.int64).reshape(-1)
    if record_steps.size and (np.any(np.diff(record_steps) < 0) or record_steps[0] < 0
                              or record_steps[-1] > plan.steps):
        raise ValueError(f"record_steps must be sorted within [0, {plan.steps}]")
    # Repeated record steps are observed once and copied.
    steps_u, inverse = np.unique(record_steps, return_inverse=True)

    observer = _make_observer(net, plan, dataset, task, outputs)
    records = _allocate(observer, len(steps_u))
    trainer = Trainer(net, plan, task, outputs)

    def record(k: int, train_loss: float) -> None:
        values = observer.observe()
        values["train_loss"] = np.asarray(train_loss)
        for name, arr in records.items():
            arr[k] = values[name]
        if progress is not None:
            progress(int(steps_u[k]), float(train_loss))

    status, message, steps_done = "done", "", 0
    k = 0
    if steps_u.size and steps_u[0] == 0:
        x0, y0 = trainer.prepare_chunk(*dataset.train_chunk(0, 1, batch))
        with torch.no_grad():
            loss0 = float(trainer.minibatch_loss(x0[0], y0[0]).item())
        record(0, loss0)
        k = 1
    end = int(steps_u[-1]) if steps_u.size else 0
    step = 0
    interval: list[np.ndarray] = []
    per_chunk = max(1, min(chunk_steps, _CHUNK_ELEMENTS // max(1, batch * int(dataset.dim))))
    while step < end:
        target = int(steps_u[k])
        n = min(target - step, per_chunk)
        xs, ys = trainer.prepare_chunk(*dataset.train_chunk(step, n, batch))
        if xs.shape[0] != n or xs.shape[1] != batch:
            raise ValueError(f"train_chunk({step}, {n}, {batch}) gave x of shape "
                             f"{tuple(xs.shape)}")
        losses = trainer.run(xs, ys, step).to("cpu", torch.float64).numpy()
        bad = ~np.isfinite(losses)
        if bad.any():
            first = step + int(np.argmax(bad))
            status = "diverged"
            steps_done = first
            message = (f"diverged: the minibatch loss at step {first} is "
                       f"{losses[first - step]}; records after step {first} are NaN")
            break
        interval.append(losses)
        step += n
        steps_done = step
        if step == target:
            record(k, float(np.concatenate(interval).mean()))
            interval = []
            k += 1
    if status == "done":
        message = f"trained {steps_done} steps"
    return Result(records={name: arr[inverse] for name, arr in records.items()},
                  status=status, message=message, steps_done=steps_done)


def _make_observer(net: Network, plan: RunPlan, dataset: Dataset, task: str,
                   outputs: int) -> _Observer:
    seen: set[str] = set()
    for obs in plan.observables:
        if obs.name in seen:
            raise ValueError(f"observable {obs.name} appears twice")
        seen.add(obs.name)
    test_x_np = np.asarray(dataset.test_x, dtype=np.float64)
    if test_x_np.ndim != 2 or test_x_np.shape[1] != net.layers[0].fan_in:
        raise ValueError(f"test_x has shape {test_x_np.shape}, expected (n, "
                         f"{net.layers[0].fan_in})")
    n_test = test_x_np.shape[0]
    test_x = torch.as_tensor(test_x_np).to(device=net.device, dtype=net.dtype)
    test_y = _prepare_targets(dataset.test_y, lead=1, loss=plan.loss, task=task,
                              outputs=outputs, device=net.device, dtype=net.dtype)
    if test_y.shape[0] != n_test:
        raise ValueError("test_x and test_y differ in length")
    test_labels: Tensor | None = None
    if task == "binary":
        test_labels = torch.as_tensor(np.asarray(dataset.test_y, np.float64).reshape(-1)
                                      ).to(device=net.device, dtype=net.dtype)
    elif task == "multiclass":
        test_labels = torch.as_tensor(np.asarray(dataset.test_y, np.int64).reshape(-1),
                                      device=net.device)
    if "test_accuracy" in seen and test_labels is None:
        raise ValueError("test_accuracy is undefined for a regression dataset")

    L = net.depth
    by_name = {obs.name: obs for obs in plan.observables}
    probes_output = probes_spread = 0
    spread_layers: tuple[int, ...] = ()
    change_layers: tuple[int, ...] = ()
    particle_idx: np.ndarray | None = None
    particle_layer = 1
    if "output" in by_name:
        probes_output = _probes(by_name["output"], n_test)
    if "neuron_spread" in by_name:
        obs = by_name["neuron_spread"]
        probes_spread = _probes(obs, n_test)
        spread_layers = _layers_or(obs, range(1, L + 1), 1, L)
    if "weight_change" in by_name:
        change_layers = _layers_or(by_name["weight_change"], range(1, L + 2), 1, L + 1)
    if "particles" in by_name:
        obs = by_name["particles"]
        chosen = _layers_or(obs, (1,), 1, L)
        if len(chosen) != 1:
            raise ValueError("particles takes a single layer")
        particle_layer = chosen[0]
        width = net.layers[particle_layer - 1].fan_out
        if obs.sample < 0:
            raise ValueError("particles: sample must be ≥ 0")
        size = int(obs.sample) or width
        rng = np.random.default_rng([plan.seed, PARTICLE_STREAM])
        take = np.sort(rng.choice(width, size=min(size, width), replace=False))
        particle_idx = np.full(size, -1, dtype=np.int64)
        particle_idx[: take.size] = take
    w0 = {ell: net.W[ell - 1].clone() for ell in change_layers}
    return _Observer(
        net=net, plan=plan, loss=plan.loss, task=task, outputs=outputs, test_x=test_x,
        test_y=test_y, test_labels=test_labels, observables=tuple(plan.observables),
        w0=w0, particle_idx=particle_idx, particle_layer=particle_layer,
        probes_output=probes_output, probes_spread=probes_spread,
        spread_layers=spread_layers, change_layers=change_layers)


def _allocate(obs: _Observer, n: int) -> dict[str, np.ndarray]:
    shapes: dict[str, tuple[int, ...]] = {}
    for o in obs.observables:
        if o.name in ("train_loss", "test_loss", "test_accuracy"):
            shapes[o.name] = ()
        elif o.name == "output":
            shapes[o.name] = ((obs.probes_output,) if obs.outputs == 1
                              else (obs.probes_output, obs.outputs))
        elif o.name == "neuron_spread":
            shapes[o.name] = (len(obs.spread_layers),)
        elif o.name == "weight_change":
            shapes[o.name] = (len(obs.change_layers),)
        elif o.name == "particles":
            assert obs.particle_idx is not None
            shapes[o.name] = (len(obs.particle_idx), 4)
        else:
            raise ValueError(f"unknown observable {o.name!r}")
    return {name: np.full((n, *shape), np.nan) for name, shape in shapes.items()}
