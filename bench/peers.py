"""The training loops a researcher would write instead of ``mfdsl run``: the peers of
``bench_peers.py``.

* :func:`train_torch`: a hand-written PyTorch loop, one network at a time — an explicit
  mean-field forward pass (no ``nn.Linear``) with autograd, ``torch.optim.SGD`` with one
  parameter group per layer (the per-layer learning rates and weight decays), the
  Langevin noise added after each step (``torch.randn_like``), ``loss.item()`` every
  step, the test loss under ``torch.no_grad`` at the record steps.
* :class:`JaxLoop`: a jitted JAX loop — all seeds of a width at once (``jax.vmap``),
  the steps between two records one ``jax.lax.scan``, the gradient by ``jax.grad``, the
  Langevin noise from ``jax.random``; compiled ahead of time (``jit(...).lower(...)
  .compile()``), so that the compilation is timed apart from the steady state.

Both train exactly what mfdsl trains for the same plan: the same initial weights
(``RunPlan.initial_weights``), the same data stream (``mfdsl.data.make``: minibatch ``s`` is
``train_chunk(s, 1, batch)``), the same per-layer multipliers, learning rates and
weight decays — so, without noise, their test losses agree with mfdsl's up to
floating-point reassociation (the benchmark prints the largest difference).  They cover
what the benchmark's workloads need: SGD or Langevin, a constant schedule, no
momentum, biases or none, the ``mse`` loss, an identity output map, frozen layers.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfdsl.core import streams as _streams
from mfdsl.core.activations import PL_S1, PL_SLOPE, PL_T1, PL_T2
from mfdsl.plan.types import RunPlan


@dataclass(frozen=True)
class Net:
    """What a loop needs of a plan, per layer: forward multiplier, learning rate, weight
    decay, noise scale per step (√(2 · lr · rate · T), 0 without noise), frozen; and the
    same for the biases (``bias``: whether the layers have them; they start at 0)."""

    mults: tuple[float, ...]
    lrs: tuple[float, ...]
    decays: tuple[float, ...]
    noise: tuple[float, ...]
    frozen: tuple[bool, ...]
    bias: bool
    bias_lrs: tuple[float, ...]
    bias_decays: tuple[float, ...]
    bias_noise: tuple[float, ...]
    activation: str
    batch: int
    record_steps: tuple[int, ...]


def net_of(plan: RunPlan) -> Net:
    opt = plan.optimizer
    assert plan.loss == "mse" and plan.output == "identity", "the peers train mse with an identity output"
    assert opt.kind in ("sgd", "langevin") and not opt.momentum and plan.schedule.kind == "constant"
    temp = opt.temperature if opt.kind == "langevin" else 0.0
    layers = plan.layers
    return Net(
        bias=bool(layers[0].bias),
        bias_lrs=tuple(opt.lr * ly.bias_lr_mult for ly in layers),
        bias_decays=tuple(
            opt.weight_decay
            * (ly.bias_lr_mult if ly.bias_decay_mult is None else ly.bias_decay_mult)
            / ly.bias_lr_mult
            for ly in layers
        ),
        bias_noise=tuple(
            math.sqrt(2.0 * opt.lr * ly.bias_noise_rate * temp) if temp > 0 and ly.bias else 0.0
            for ly in layers
        ),
        mults=tuple(float(ly.forward_mult) for ly in layers),
        lrs=tuple(opt.lr * ly.lr_mult for ly in layers),
        # mfdsl: W ← (1 − η wd) W − η ∇, wd = weight_decay · decay_mult / lr_mult
        decays=tuple(
            opt.weight_decay * (ly.lr_mult if ly.decay_mult is None else ly.decay_mult) / ly.lr_mult
            for ly in layers
        ),
        noise=tuple(math.sqrt(2.0 * opt.lr * ly.noise_rate * temp) if temp > 0 else 0.0 for ly in layers),
        frozen=tuple(bool(ly.frozen) for ly in layers),
        activation=plan.activation,
        batch=int(plan.batch),
        record_steps=tuple(int(s) for s in plan.record_steps),
    )


# --------------------------------------------------------------------------- torch


def train_torch(plan: RunPlan, data: Any, dtype: Any) -> dict[str, np.ndarray]:
    """Train ``plan`` on ``data`` (``mfdsl.data.make.make_dataset``) the plain way; returns
    ``train_loss`` and ``test_loss`` at the record steps."""
    import torch

    net = net_of(plan)
    weights = [
        torch.tensor(w, dtype=dtype, requires_grad=not frozen)
        for w, frozen in zip(plan.initial_weights(), net.frozen, strict=True)
    ]
    biases = [
        torch.zeros(w.shape[1], dtype=dtype, requires_grad=not frozen) if net.bias else None
        for w, frozen in zip(weights, net.frozen, strict=True)
    ]
    act = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "identity": lambda h: h,
        "piecewise_linear": lambda h: (h.clamp(PL_T1, PL_T2) - PL_T1) * PL_SLOPE + PL_S1,
    }[net.activation]

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (w, m, b) in enumerate(zip(weights, net.mults, biases, strict=True)):
            h = (act(h) if i else h) @ w * m
            if b is not None:
                h = h + b
        return h

    groups = [
        {"params": [w], "lr": lr, "weight_decay": wd}
        for w, lr, wd, frozen in zip(weights, net.lrs, net.decays, net.frozen, strict=True)
        if not frozen
    ] + [
        {"params": [b], "lr": lr, "weight_decay": wd}
        for b, lr, wd, frozen in zip(biases, net.bias_lrs, net.bias_decays, net.frozen, strict=True)
        if b is not None and not frozen
    ]
    opt = torch.optim.SGD(groups, lr=net.lrs[0])
    params: list[tuple[Any, float, bool]] = [
        *zip(weights, net.noise, net.frozen, strict=True),
        *zip(biases, net.bias_noise, net.frozen, strict=True),
    ]
    noisy = [(p, s) for p, s, frozen in params if p is not None and s > 0 and not frozen]
    gen = torch.Generator().manual_seed(_streams.torch_seed(plan.seed, _streams.Stream.NOISE))
    test_x = torch.as_tensor(data.test_x, dtype=dtype)
    test_y = torch.as_tensor(np.asarray(data.test_y).reshape(len(data.test_x), -1), dtype=dtype)
    record = list(net.record_steps)
    out = {name: np.full(len(record), np.nan) for name in ("train_loss", "test_loss")}

    def evaluate(k: int) -> None:
        with torch.no_grad():
            out["test_loss"][k] = float((0.5 * ((forward(test_x) - test_y) ** 2).sum(1)).mean())

    k = 0
    if record and record[0] == 0:
        evaluate(0)
        k = 1
    running, count, chunk = 0.0, 0, 1000
    xs: Any = None
    ys: Any = None
    for step in range(record[-1]):
        if step % chunk == 0:  # minibatches fetched at a time, like a prefetching loader
            xa, ya = data.train_chunk(step, chunk, net.batch)
            xs = torch.as_tensor(xa, dtype=dtype)
            ys = torch.as_tensor(np.asarray(ya).reshape(*xa.shape[:2], -1), dtype=dtype)
        x, y = xs[step % chunk], ys[step % chunk]
        loss = (0.5 * ((forward(x) - y) ** 2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if noisy:
            with torch.no_grad():
                for w, s in noisy:
                    w.add_(torch.randn(w.shape, generator=gen, dtype=dtype), alpha=s)
        running += loss.item()
        count += 1
        if step + 1 == record[k]:
            out["train_loss"][k] = running / count
            running, count = 0.0, 0
            evaluate(k)
            k += 1
    return out


# --------------------------------------------------------------------------- jax


class JaxLoop:
    """The seeds of one width trained at once: ``vmap`` over seeds, ``scan`` over the
    steps between records, compiled ahead of time.  :meth:`compile` builds (and times)
    the two programs, a segment of steps and the test loss; :meth:`run` trains."""

    def __init__(self, plans: list[RunPlan], datas: list[Any], dtype: str = "float32") -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.net = net = net_of(plans[0])
        self.plans, self.datas = plans, datas
        self.dtype = jnp.float32 if dtype == "float32" else jnp.float64
        record = net.record_steps
        gaps = {b - a for a, b in itertools.pairwise(record)}
        assert len(gaps) == 1 and record[0] == 0, "the JAX loop takes evenly spaced records from step 0"
        self.every = gaps.pop()
        act = {
            "relu": jax.nn.relu,
            "sigmoid": jax.nn.sigmoid,
            "tanh": jnp.tanh,
            "identity": lambda h: h,
            "piecewise_linear": lambda h: (jnp.clip(h, PL_T1, PL_T2) - PL_T1) * PL_SLOPE + PL_S1,
        }[net.activation]

        nl = len(net.mults)

        def forward(ps: list[Any], x: Any) -> Any:
            # ps: the weights, then (with biases) the biases
            h = x
            for i in range(nl):
                h = (act(h) if i else h) @ ps[i] * net.mults[i]
                if net.bias:
                    h = h + ps[nl + i]
            return h

        def loss_fn(ws: list[Any], x: Any, y: Any) -> Any:
            return jnp.mean(0.5 * jnp.sum((forward(ws, x) - y) ** 2, axis=-1))

        grad = jax.value_and_grad(loss_fn)
        noisy = any(s > 0 for s in net.noise)

        def step(carry: tuple[list[Any], Any], batch: tuple[Any, Any]) -> tuple[tuple[list[Any], Any], Any]:
            ws, key = carry
            x, y = batch
            loss, g = grad(ws, x, y)
            if noisy:
                key, sub = jax.random.split(key)
                subs = jax.random.split(sub, len(ws))
            new = []
            lrs, decays, noise = (
                (*net.lrs, *net.bias_lrs),
                (*net.decays, *net.bias_decays),
                (*net.noise, *net.bias_noise),
            )
            for j, (w, gw) in enumerate(zip(ws, g, strict=True)):
                if net.frozen[j % nl]:
                    new.append(w)
                    continue
                w = w - lrs[j] * (gw + decays[j] * w) if decays[j] else w - lrs[j] * gw
                if noise[j] > 0:
                    w = w + noise[j] * jax.random.normal(subs[j], w.shape, w.dtype)
                new.append(w)
            return (new, key), loss

        def segment(ws: list[Any], key: Any, xs: Any, ys: Any) -> tuple[list[Any], Any, Any]:
            (ws, key), losses = jax.lax.scan(step, (ws, key), (xs, ys))
            return ws, key, jnp.mean(losses)

        def test_loss(ws: list[Any], x: Any, y: Any) -> Any:
            return loss_fn(ws, x, y)

        self._segment = jax.jit(jax.vmap(segment))
        self._test = jax.jit(jax.vmap(test_loss))
        self.compiled: tuple[Any, Any] | None = None
        self.compile_seconds = 0.0

    def _inputs(self) -> tuple[list[Any], Any, Any, Any, Any, Any]:
        """The initial weights, keys, training data ``(S, steps, B, ·)`` and test sets
        of every seed, on the device."""
        jnp, jax, net = self.jnp, self.jax, self.net
        steps = net.record_steps[-1]
        ws = [
            jnp.asarray(np.stack(w), self.dtype)
            for w in zip(*(p.initial_weights() for p in self.plans), strict=True)
        ]
        if net.bias:  # biases start at 0
            ws += [jnp.zeros((len(self.plans), w.shape[2]), self.dtype) for w in ws]
        keys = jnp.stack(
            [
                jax.random.key_data(jax.random.key(_streams.jax_seed(p.seed, _streams.Stream.NOISE)))
                for p in self.plans
            ]
        )
        xs, ys = [], []
        for d in self.datas:
            x, y = d.train_chunk(0, steps, net.batch)
            xs.append(x)
            ys.append(np.asarray(y).reshape(*x.shape[:2], -1))
        tx = jnp.asarray(np.stack([d.test_x for d in self.datas]), self.dtype)
        ty = jnp.asarray(
            np.stack([np.asarray(d.test_y).reshape(len(d.test_x), -1) for d in self.datas]), self.dtype
        )
        return ws, keys, jnp.asarray(np.stack(xs), self.dtype), jnp.asarray(np.stack(ys), self.dtype), tx, ty

    def compile(self) -> float:
        """Compile the segment and the test loss for these shapes; the seconds it took."""
        jax = self.jax
        start = time.perf_counter()
        ws, keys, xs, ys, tx, ty = self._inputs()
        key = jax.vmap(jax.random.wrap_key_data)(keys)
        e = self.every
        seg = self._segment.lower(ws, key, xs[:, :e], ys[:, :e]).compile()
        test = self._test.lower(ws, tx, ty).compile()
        self.compiled = (seg, test)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def run(self) -> list[dict[str, np.ndarray]]:
        """Train every seed; ``train_loss`` and ``test_loss`` at the record steps, per seed."""
        if self.compiled is None:
            self.compile()
        assert self.compiled is not None
        seg, test = self.compiled
        jax = self.jax
        from mfdsl.data.make import make_dataset

        # the data made afresh, as mfdsl and the torch loop make it in their runs
        self.datas = [make_dataset(p.data, p.seed) for p in self.plans]
        ws, keys, xs, ys, tx, ty = self._inputs()
        key = jax.vmap(jax.random.wrap_key_data)(keys)
        record = self.net.record_steps
        S = len(self.plans)
        train = np.full((S, len(record)), np.nan)
        tests = np.full((S, len(record)), np.nan)
        tests[:, 0] = np.asarray(test(ws, tx, ty))
        e = self.every
        for k in range(1, len(record)):
            a = record[k - 1]
            ws, key, loss = seg(ws, key, xs[:, a : a + e], ys[:, a : a + e])
            train[:, k] = np.asarray(loss)
            tests[:, k] = np.asarray(test(ws, tx, ty))
        return [{"train_loss": train[s], "test_loss": tests[s]} for s in range(S)]
