"""The finite-width training engine's pieces: one :class:`~mfdsl.plugin.RunPlan` → a
network (forward pass, hand-derived backward pass fused into the update), its
observers and recorded arrays.  The training loop itself is :mod:`._ensemble`
(:func:`~._single.train` is an ensemble of one).  Design notes — the scalings as
per-layer numbers, lazy updates, the compiled step loop — are
``backends/mfdsl_torch/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from mfdsl.plugin import (
    PL_S1,
    PL_SLOPE,
    PL_T1,
    PL_T2,
    LayerPlan,
    ObservablePlan,
    RunPlan,
    Stream,
    record_arrays,
)
from mfdsl.plugin import streams as _streams

__all__ = ["Dataset", "MemberNet", "Result"]

# A data chunk holds at most this many input entries, so a large batch × dim input
# (MNIST) does not pull hundreds of MB per chunk.
_CHUNK_ELEMENTS = 1 << 23
# Rows per block when evaluating the test set, times the widest layer: a block's
# activations (2 MiB in float64) stay in cache between one layer's product and the next.
_EVAL_ELEMENTS = 1 << 18

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
    if name == "piecewise_linear":
        return piecewise_linear
    raise ValueError(f"unknown activation {name!r}")


def _identity(h: Tensor) -> Tensor:
    return h


def piecewise_linear(h: Tensor) -> Tensor:
    """Mei–Montanari–Nguyen's σ (``mfdsl.core.activations``): ``(clamp(h, t1, t2) − t1) ·
    slope + s1``, the ensemble's forward pass op for op (its backward pass takes the
    slope strictly inside ``(t1, t2)``, 0 elsewhere)."""
    return (h.clamp(PL_T1, PL_T2) - PL_T1) * PL_SLOPE + PL_S1


def _output_map(name: str) -> Callable[[Tensor], Tensor]:
    if name == "identity":
        return _identity
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"unknown output map {name!r}")


def _example_losses(loss: str, yhat: Tensor, y: Tensor) -> Tensor:
    """Per-example loss, shape ``(B,)``; ``y`` as prepared by :func:`_prepare_targets`."""
    if loss == "mse":
        return 0.5 * (yhat - y).square().sum(dim=1)
    if loss == "logistic":
        return torch.nn.functional.softplus(-(y * yhat)).sum(dim=1)
    logp = torch.log_softmax(yhat, dim=1)
    return -logp.gather(1, y[:, None])[:, 0]


def _prepare_targets(
    y: np.ndarray,
    *,
    lead: int,
    loss: str,
    task: str,
    outputs: int,
    device: torch.device,
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


class MemberNet:
    """The parameters of one finite network and its forward pass (plain 2-D products):
    one member of an :class:`~._ensemble.Ensemble`, as the observables see it.

    ``W[i]``/``b[i]`` hold weight layer ``i + 1`` (views into the ensemble, so they
    follow its training); ``b[i]`` is ``None`` without a bias.
    """

    def __init__(
        self,
        *,
        layers: tuple[LayerPlan, ...],
        W: list[Tensor],
        b: list[Tensor | None],
        activation: str,
        output: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layers = layers
        self.W = W
        self.b = b
        self.activation = activation
        self.output = output
        self.phi = _activation(activation)
        self.psi = _output_map(output)
        self.device = device
        self.dtype = dtype

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
        """The output before and after ψ: ``(z, ŷ)``."""
        z = self.forward(x)[0][-1]
        return z, self.psi(z)


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- observing


@dataclass
class _Observer:
    """Computes the records at one record point."""

    net: MemberNet
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
    probes_rms: int = 0
    rms_layers: tuple[int, ...] = ()
    eval_rows: int = 1
    eval_buffers: list[Tensor] = field(default_factory=list)
    #: evaluate the test set by the native loop's forward pass (``_native.evaluate``)
    native_eval: bool = False

    def observe(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        names = {o.name for o in self.observables}
        with torch.no_grad():
            if "test_loss" in names or "test_accuracy" in names:
                loss, acc = self._test()
                out["test_loss"] = np.asarray(loss)
                out["test_accuracy"] = np.asarray(acc)
            n_probe = max(
                self.probes_output if "output" in names else 0,
                self.probes_spread if "neuron_spread" in names else 0,
                self.probes_rms if "preactivation_rms" in names else 0,
            )
            if n_probe:
                hs, _ = self.net.forward(self.test_x[:n_probe])
                if "output" in names:
                    yhat = self.net.psi(hs[-1][: self.probes_output])
                    if self.outputs == 1:
                        yhat = yhat[:, 0]
                    out["output"] = _host(yhat)
                if "neuron_spread" in names:
                    spread = [
                        hs[ell - 1][: self.probes_spread].std(dim=1, correction=0).mean()
                        for ell in self.spread_layers
                    ]
                    out["neuron_spread"] = _host(torch.stack(spread))
                if "preactivation_rms" in names:
                    rms = [hs[ell - 1][: self.probes_rms].square().mean().sqrt() for ell in self.rms_layers]
                    out["preactivation_rms"] = _host(torch.stack(rms))
            if "weight_change" in names:
                out["weight_change"] = _host(torch.stack([self._change(ell) for ell in self.change_layers]))
            if "particles" in names:
                out["particles"] = self._particles()
        return out

    def _test(self) -> tuple[float, float]:
        """Test loss and accuracy, block by block into buffers kept between records
        (no large temporaries: they would cost page faults at every record)."""
        n = self.test_x.shape[0]
        if n == 0:
            return math.nan, math.nan
        if self.native_eval:
            from . import _native

            net = self.net
            got = _native.evaluate(
                list(net.W),
                list(net.b),
                [layer.forward_mult for layer in net.layers],
                net.activation,
                net.output,
                self.loss,
                self.test_x,
                self.test_y,
                self.test_labels,
                self.task,
                self.eval_rows,
            )
            if got is not None:
                return got[0] / n, (got[1] / n if self.test_labels is not None else math.nan)
        loss_sum = torch.zeros((), device=self.net.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.net.device, dtype=torch.int64)
        for s in range(0, n, self.eval_rows):
            z = self._eval_block(self.test_x[s : s + self.eval_rows])
            losses = _example_losses(self.loss, self.net.psi(z), self.test_y[s : s + self.eval_rows])
            loss_sum += losses.sum(dtype=torch.float64)
            if self.test_labels is not None:
                labels = self.test_labels[s : s + self.eval_rows]
                if self.task == "binary":
                    correct += (torch.sign(z[:, 0]) == labels).sum()
                else:
                    correct += (torch.argmax(z, dim=1) == labels).sum()
        acc = correct.item() / n if self.test_labels is not None else math.nan
        return loss_sum.item() / n, acc

    def _eval_block(self, x: Tensor) -> Tensor:
        """The output before ψ on the rows ``x``: :meth:`MemberNet.forward`'s
        arithmetic, each layer into its buffer (ReLU in place)."""
        net = self.net
        if not self.eval_buffers:
            self.eval_buffers = [
                torch.empty((self.eval_rows, layer.fan_out), device=net.device, dtype=net.dtype)
                for layer in net.layers
            ]
        last = len(net.layers) - 1
        a = x
        for i, layer in enumerate(net.layers):
            h = self.eval_buffers[i][: x.shape[0]]
            m = layer.forward_mult
            b = net.b[i]
            if b is not None:
                torch.addmm(b, a, net.W[i], alpha=m, out=h)
            else:
                torch.mm(a, net.W[i], out=h)
                if m != 1.0:
                    h.mul_(m)
            if i < last:
                a = h.clamp_min_(0.0) if net.activation == "relu" else net.phi(h)
        return h

    def _change(self, ell: int) -> Tensor:
        """The root-mean-square change per entry of ``W_ℓ`` since initialisation."""
        diff = self.net.W[ell - 1] - self.w0[ell]
        return torch.linalg.vector_norm(diff) / math.sqrt(diff.numel())

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
        parts = [sel[:rows].t(), torch.linalg.vector_norm(sel, dim=0)[:, None], w_out[cols, :1]]
        block = _host(torch.cat(parts, dim=1))
        filled = out[: take.size]
        filled[:, :rows] = block[:, :rows]
        filled[:, 2:] = block[:, rows:]
        return out


def _host(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


# --------------------------------------------------------------------------- train


def _make_observer(net: MemberNet, plan: RunPlan, dataset: Dataset, task: str, outputs: int) -> _Observer:
    seen: set[str] = set()
    for obs in plan.observables:
        if obs.name in seen:
            raise ValueError(f"observable {obs.name} appears twice")
        seen.add(obs.name)
    test_x_np = np.asarray(dataset.test_x, dtype=np.float64)
    if test_x_np.ndim != 2 or test_x_np.shape[1] != net.layers[0].fan_in:
        raise ValueError(f"test_x has shape {test_x_np.shape}, expected (n, {net.layers[0].fan_in})")
    n_test = test_x_np.shape[0]
    test_x = torch.as_tensor(test_x_np).to(device=net.device, dtype=net.dtype)
    test_y = _prepare_targets(
        dataset.test_y, lead=1, loss=plan.loss, task=task, outputs=outputs, device=net.device, dtype=net.dtype
    )
    if test_y.shape[0] != n_test:
        raise ValueError("test_x and test_y differ in length")
    test_labels: Tensor | None = None
    if task == "binary":
        test_labels = torch.as_tensor(np.asarray(dataset.test_y, np.float64).reshape(-1)).to(
            device=net.device, dtype=net.dtype
        )
    elif task == "multiclass":
        test_labels = torch.as_tensor(np.asarray(dataset.test_y, np.int64).reshape(-1), device=net.device)
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
        probes_output = by_name["output"].probe_count(n_test)
    if "neuron_spread" in by_name:
        obs = by_name["neuron_spread"]
        probes_spread = obs.probe_count(n_test)
        spread_layers = obs.layers_in(L)
    if "weight_change" in by_name:
        change_layers = by_name["weight_change"].layers_in(L)
    probes_rms = 0
    rms_layers: tuple[int, ...] = ()
    if "preactivation_rms" in by_name:
        obs = by_name["preactivation_rms"]
        probes_rms = obs.probe_count(n_test)
        rms_layers = obs.layers_in(L)
    if "particles" in by_name:
        obs = by_name["particles"]
        chosen = obs.layers_in(L)
        if len(chosen) != 1:
            raise ValueError("particles takes a single layer")
        particle_layer = chosen[0]
        width = net.layers[particle_layer - 1].fan_out
        if obs.sample < 0:
            raise ValueError("particles: sample must be ≥ 0")
        size = int(obs.sample) or width
        rng = _streams.rng(plan.seed_of_init, Stream.PARTICLES)
        take = np.sort(rng.choice(width, size=min(size, width), replace=False))
        particle_idx = np.full(size, -1, dtype=np.int64)
        particle_idx[: take.size] = take
    w0 = {ell: net.W[ell - 1].clone() for ell in change_layers}
    return _Observer(
        net=net,
        plan=plan,
        loss=plan.loss,
        task=task,
        outputs=outputs,
        test_x=test_x,
        test_y=test_y,
        test_labels=test_labels,
        observables=tuple(plan.observables),
        w0=w0,
        particle_idx=particle_idx,
        particle_layer=particle_layer,
        probes_output=probes_output,
        probes_spread=probes_spread,
        spread_layers=spread_layers,
        change_layers=change_layers,
        probes_rms=probes_rms,
        rms_layers=rms_layers,
        eval_rows=max(1, min(n_test, _EVAL_ELEMENTS // max(layer.fan_out for layer in net.layers))),
    )


def _allocate(obs: _Observer, n: int) -> dict[str, np.ndarray]:
    return record_arrays(
        obs.observables,
        n,
        probes=obs.probes_output,
        outputs=obs.outputs,
        layers={
            "neuron_spread": obs.spread_layers,
            "weight_change": obs.change_layers,
            "preactivation_rms": obs.rms_layers,
        },
        particles=0 if obs.particle_idx is None else len(obs.particle_idx),
    )
