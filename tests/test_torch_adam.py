"""Adam at finite width: the language's ``adam(...)``, each scaling's per-layer Adam rates,
the torch backend's steps (exactly ``torch.optim.AdamW`` with those rates as parameter
groups), ensembles bit-identical to solo runs, and the jax backend's refusal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfdsl_torch._ensemble import EnsembleTrainer, train_ensemble
from mfdsl_torch._single import Network, Trainer, train
from test_torch_engine import ACTS, FakeData

import mfdsl
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

SPEC = """\
experiment adam_small

data isotropic_gaussian {{ dim = 5, delta = 0.5, train = online, test = 20 }}

network mlp {{ hidden = {hidden}, activation = {act}, bias = true }}

scaling {scaling}

train {{
  optimizer = adam(lr = {lr}, beta1 = 0.8, beta2 = 0.95, eps = {eps}, weight_decay = {wd})
  loss      = mse
  batch     = 3
  steps     = 6
}}

record every 3 {{ train_loss, test_loss }}

sweep {{ width = [{width}], seed = [0] }}

backends {backends}
"""


def spec_text(**kw: object) -> str:
    args: dict[str, object] = {
        "hidden": 2,
        "act": "tanh",
        "scaling": "standard",
        "lr": 0.01,
        "eps": 1e-8,
        "wd": 0.0,
        "width": 16,
        "backends": "torch",
    }
    args.update(kw)
    return SPEC.format(**args)


def plan_of(tmp_path: Path, **kw: object) -> RunPlan:
    path = tmp_path / "adam.mf"
    path.write_text(spec_text(**kw))
    spec = mfdsl.load(path)
    point = next(iter(mfdsl.expand(spec)))
    return compile_point(point.spec, dict(point.coords), "torch")


def reference_adam(plan: RunPlan, data: FakeData, steps: int) -> tuple[list[Any], list[Any]]:
    """``steps`` steps of torch.optim.AdamW (autograd) on the plan's network, each layer's
    weights and bias a parameter group with the compiled rates: lr · lr_mult, eps ·
    eps_mult (bias: bias_lr_mult, bias_eps_mult)."""
    net = Network(plan)
    opt = plan.optimizer
    W = [w.detach().clone().requires_grad_(True) for w in net.W]
    b = [bb.detach().clone().requires_grad_(True) for bb in net.b if bb is not None]
    groups = []
    for ly, w, bb in zip(plan.layers, W, b, strict=True):
        groups.append({"params": [w], "lr": opt.lr * ly.lr_mult, "eps": opt.eps * ly.eps_mult})
        groups.append({"params": [bb], "lr": opt.lr * ly.bias_lr_mult, "eps": opt.eps * ly.bias_eps_mult})
    cls = torch.optim.AdamW if opt.weight_decay else torch.optim.Adam
    ref = cls(groups, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)
    act = ACTS[plan.activation]
    for s in range(steps):
        x, y = (torch.from_numpy(a) for a in data.train_chunk(s, 1, plan.batch))
        a = x[0]
        for i, ly in enumerate(plan.layers):
            h = ly.forward_mult * (a @ W[i]) + b[i]
            a = act(h) if i < len(plan.layers) - 1 else h
        loss = 0.5 * ((a[:, 0] - y[0]) ** 2).mean()
        ref.zero_grad()
        loss.backward()
        ref.step()
    return [w.detach() for w in W], [bb.detach() for bb in b]


@pytest.mark.parametrize(
    ("scaling", "wd"),
    [("standard", 0.0), ("standard", 0.05), ("mean_field", 0.05), ("mup", 0.05), ("ntk", 0.0)],
)
def test_adam_steps_are_torch_adamw_with_the_compiled_rates(tmp_path: Path, scaling: str, wd: float) -> None:
    # float64, 6 steps of a two-hidden-layer network with biases: every layer's weights
    # and bias equal torch's optimizer's to rounding (the same operations, grouped
    # differently: a few ulps a step)
    plan = plan_of(tmp_path, scaling=scaling, wd=wd, lr=0.02)
    data = FakeData(dim=5)
    net = Network(plan)
    trainer = Trainer(net, plan, data.task, data.outputs)
    assert not trainer.core.native  # Adam runs on ATen ops
    xs, ys = trainer.prepare_chunk(*data.train_chunk(0, 4, plan.batch))
    trainer.run(xs, ys, 0)
    xs, ys = trainer.prepare_chunk(*data.train_chunk(4, 2, plan.batch))
    trainer.run(xs, ys, 4)  # a second chunk: the step count (bias correction) goes on
    W, b = reference_adam(plan, data, 6)
    w0 = Network(plan).W
    for i in range(len(W)):
        moved = float(torch.linalg.vector_norm(W[i] - w0[i]))
        assert moved > 1e-4  # every layer moved
        err = float(torch.linalg.vector_norm(net.W[i] - W[i])) / float(torch.linalg.vector_norm(W[i]))
        assert err < 1e-12, (i, err)
        bias = net.b[i]
        assert bias is not None
        np.testing.assert_allclose(bias.numpy(), b[i].numpy(), rtol=1e-12, atol=1e-15)


def test_adam_rates_per_scaling(tmp_path: Path) -> None:
    # the table of docs/language.md: (lr_mult, bias_lr_mult, eps_mult, bias_eps_mult)
    # of the input, hidden and output layers at width n
    def table(scaling: str, n: int) -> list[tuple[float, float, float, float]]:
        rows: dict[str, list[tuple[float, float, float, float]]] = {
            "mean_field": [(1, 1, 1 / n, 1 / n), (1, 1, 1 / n**2, 1 / n), (1, 1, 1 / n, 1)],
            "mup": [(1, 1, 1, 1), (1 / n, 1, 1, 1), (1 / n, 1, 1, 1)],
            "ntk": [(1, 1, 1, 1)] * 3,
            "standard": [(1, 1, 1, 1)] * 3,
        }
        return rows[scaling]

    for scaling in ("mean_field", "mup", "ntk", "standard"):
        for n in (16, 64):
            plan = plan_of(tmp_path, scaling=scaling, width=n, wd=0.1)
            got = [(ly.lr_mult, ly.bias_lr_mult, ly.eps_mult, ly.bias_eps_mult) for ly in plan.layers]
            assert got == [tuple(float(v) for v in row) for row in table(scaling, n)], (scaling, n)
            # Adam's decay is decoupled, at the layer's Adam rate (no mean-field decay_mult)
            assert all(ly.decay_mult is None and ly.bias_decay_mult is None for ly in plan.layers)
            assert plan.optimizer.kind == "adam"
            assert (plan.optimizer.beta1, plan.optimizer.beta2) == (0.8, 0.95)


def _function_change(tmp_path: Path, scaling: str, width: int) -> float:
    """The RMS change of the network's output on the test inputs in one Adam step."""
    plan = plan_of(tmp_path, scaling=scaling, width=width, hidden=2, lr=0.01)
    data = FakeData(dim=5, n_test=200)
    net = Network(plan)
    x = torch.from_numpy(data.test_x)
    before = net.predict(x)[0].clone()
    trainer = Trainer(net, plan, data.task, data.outputs)
    trainer.run(*trainer.prepare_chunk(*data.train_chunk(0, 1, plan.batch)), 0)
    return float(torch.sqrt(torch.mean((net.predict(x)[0] - before) ** 2)))


def test_the_rates_keep_a_step_of_the_function_o1_where_the_scaling_says(tmp_path: Path) -> None:
    # Adam's first step moves each entry by lr·sign(g), whatever the gradient's scale.
    # Under mup and mean_field the rates make the output's change per step width-
    # independent: it converges as n → ∞, the width-64 value within O(64^-1/2) of it
    # (bound: 3/√64; measured ratios 0.83 and 0.90).  With one global rate a hidden
    # layer's n aligned entries move the output ∝ n under standard (≥ 16× from width 64
    # to 1024; measured 22×) and ∝ √n under ntk (≥ 4×; measured 8×).
    for scaling in ("mup", "mean_field"):
        small, large = _function_change(tmp_path, scaling, 64), _function_change(tmp_path, scaling, 1024)
        assert abs(large / small - 1.0) < 3.0 / math.sqrt(64), (scaling, small, large)
    for scaling, least in (("standard", 16.0), ("ntk", 4.0)):
        small, large = _function_change(tmp_path, scaling, 64), _function_change(tmp_path, scaling, 1024)
        assert large / small > least, (scaling, small, large)


def test_an_adam_ensemble_is_its_members_alone(tmp_path: Path) -> None:
    # two learning rates and two seeds in one ensemble: each member's records are, bit
    # for bit, its solo run's
    base = plan_of(tmp_path, scaling="mup", width=12, wd=0.01)
    from dataclasses import replace

    plans = [
        replace(base, optimizer=replace(base.optimizer, lr=0.01)),
        replace(base, seed=1, optimizer=replace(base.optimizer, lr=0.03)),
    ]
    data = [FakeData(dim=5, seed=p.seed) for p in plans]
    together = train_ensemble(plans, data)
    for plan, d, got in zip(plans, data, together, strict=True):
        alone = train(plan, d)
        for name, arr in alone.records.items():
            assert got.records[name].tobytes() == arr.tobytes(), name


def test_native_modes_and_adam(tmp_path: Path) -> None:
    from mfdsl_torch._ensemble import Ensemble

    plan = plan_of(tmp_path)
    for mode in ("auto", "off"):
        assert not EnsembleTrainer(Ensemble([plan]), ["binary"], 1, native=mode).native
    for mode in ("rows", "gemm"):
        with pytest.raises(
            ValueError, match=f"native = {mode} }}: the native step loop runs SGD and Langevin"
        ):
            EnsembleTrainer(Ensemble([plan]), ["binary"], 1, native=mode)
    # and at `mfdsl check`, pointing at the option
    path = tmp_path / "rows.mf"
    path.write_text(spec_text() + "\ntorch { native = rows }\n")
    with pytest.raises(mfdsl.SpecError, match="native = rows forces the compiled step loop") as caught:
        mfdsl.check_all(mfdsl.load(path))
    span = caught.value.span
    assert span is not None and span.line == len(spec_text().splitlines()) + 2


def test_jax_rejects_adam_at_check_pointing_at_the_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("mfdsl_jax")
    path = tmp_path / "adam.mf"
    text = spec_text(scaling="mean_field", hidden=1, backends="torch, jax")
    path.write_text(text)
    with pytest.raises(mfdsl.SpecError) as caught:
        mfdsl.check_all(mfdsl.load(path))
    err = caught.value
    assert "no mean-field limit of Adam is implemented" in str(err)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "optimizer = adam(" in ln)
    assert err.span is not None and err.span.line == line
    assert err.span.column == text.splitlines()[line - 1].index("adam(") + 1
    assert "drop jax" in str(err.hint)


def test_an_adam_spec_runs_end_to_end(tmp_path: Path) -> None:
    import xarray as xr

    from mfdsl.cli import main

    path = tmp_path / "adam.mf"
    path.write_text(spec_text(scaling="mup", width=8, hidden=1))
    store = tmp_path / "adam.zarr"
    assert main(["check", str(path)]) == 0
    assert main(["run", str(path), "-o", str(store), "--workers", "1"]) == 0
    ds = xr.open_zarr(store)
    loss = ds["train_loss"].values
    assert loss.shape[-1] == 3 and np.all(np.isfinite(loss))
    assert math.isfinite(float(ds["test_loss"].values.reshape(-1)[-1]))


def test_dropping_a_member_keeps_the_others_adam_state(tmp_path: Path) -> None:
    # what a diverged member's removal does (_subset): the kept member's running means
    # go along, and it ends where it ends alone, bit for bit
    from dataclasses import replace

    from mfdsl_torch._ensemble import Ensemble, _subset

    base = plan_of(tmp_path, scaling="mean_field", width=10, wd=0.01)
    plans = [base, replace(base, seed=1, optimizer=replace(base.optimizer, lr=0.02))]
    data = [FakeData(dim=5, seed=s) for s in (3, 4)]

    def chunk(trainer: EnsembleTrainer, members: list[int], start: int, n: int) -> None:
        xs, ys = trainer.prepare_chunk([data[e].train_chunk(start, n, base.batch) for e in members])
        trainer.run(xs, ys, start)

    both = EnsembleTrainer(Ensemble(plans), ["binary"] * 2, 1)
    chunk(both, [0, 1], 0, 3)
    kept = _subset(both, [1])
    chunk(kept, [1], 3, 3)
    alone = EnsembleTrainer(Ensemble([plans[1]]), ["binary"], 1)
    chunk(alone, [1], 0, 3)
    chunk(alone, [1], 3, 3)
    for got, want in zip(kept.ens.W + kept.ens.b, alone.ens.W + alone.ens.b, strict=True):
        assert got is not None and want is not None
        assert got[0].numpy().tobytes() == want[0].numpy().tobytes()
