"""Tests of ensemble training (``mfdsl_torch._ensemble``): members batched into one
network must get, bit for bit, what they get trained alone."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfdsl_torch._ensemble import (
    Ensemble,
    ensemble_key,
    group_plans,
    is_batched,
    train_ensemble,
)
from mfdsl_torch._single import train
from test_torch_engine import FakeData, make_plan

from mfdsl.plan.types import ObservablePlan, OptimizerPlan, RunPlan, SchedulePlan

ALL_OBS = tuple(
    ObservablePlan(name=n)
    for n in (
        "train_loss",
        "test_loss",
        "test_accuracy",
        "output",
        "neuron_spread",
        "weight_change",
        "particles",
    )
)


def members(base: RunPlan, n: int = 3) -> list[RunPlan]:
    """``n`` plans that differ in seed, learning rate and schedule."""
    plans = [replace(base, seed=s) for s in range(n)]
    plans[1] = replace(plans[1], optimizer=replace(base.optimizer, lr=base.optimizer.lr * 0.5))
    if n > 2:
        plans[2] = replace(plans[2], schedule=SchedulePlan(kind="cosine", final=0.1))
    return plans


def assert_identical(plans: list[RunPlan], datas: list[Any], dtype: str = "float64") -> None:
    together = train_ensemble(plans, datas, dtype=dtype)
    assert len(together) == len(plans)
    for plan, data, got in zip(plans, datas, together, strict=True):
        alone = train(plan, data, dtype=dtype)
        assert (got.status, got.steps_done, got.message) == (alone.status, alone.steps_done, alone.message)
        assert list(got.records) == list(alone.records)
        for name, arr in alone.records.items():
            assert got.records[name].shape == arr.shape, name
            assert got.records[name].tobytes() == arr.tobytes(), name


CASES = {
    # name: (widths, activation, bias, batch, optimizer, loss, task, outputs, output)
    "L1-tanh": ((8,), "tanh", False, 8, OptimizerPlan(kind="sgd", lr=0.1), "mse", "binary", 1, "identity"),
    "L4-relu-batch1": (
        (16,) * 4,
        "relu",
        False,
        1,
        OptimizerPlan(kind="sgd", lr=0.05),
        "mse",
        "binary",
        1,
        "identity",
    ),
    "L4-bias-momentum-decay": (
        (16,) * 4,
        "relu",
        True,
        4,
        OptimizerPlan(kind="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
        "mse",
        "binary",
        1,
        "identity",
    ),
    "L2-langevin": (
        (12, 10),
        "tanh",
        True,
        5,
        OptimizerPlan(kind="langevin", lr=0.05, weight_decay=1e-3, temperature=1e-3),
        "mse",
        "regression",
        2,
        "tanh",
    ),
    "L4-langevin-momentum": (
        (10,) * 4,
        "gelu",
        True,
        3,
        OptimizerPlan(kind="langevin", lr=0.02, momentum=0.5, temperature=1e-4),
        "cross_entropy",
        "multiclass",
        3,
        "identity",
    ),
    "L2-sigmoid-logistic": (
        (12, 10),
        "sigmoid",
        True,
        5,
        OptimizerPlan(kind="sgd", lr=0.05),
        "logistic",
        "binary",
        1,
        "identity",
    ),
    "L2-piecewise_linear": (
        (12, 10),
        "piecewise_linear",
        True,
        5,
        OptimizerPlan(kind="sgd", lr=0.02),
        "mse",
        "binary",
        1,
        "identity",
    ),
    "L2-erf": (
        (12, 10),
        "erf",
        False,
        7,
        OptimizerPlan(kind="sgd", lr=0.05),
        "mse",
        "multiclass",
        3,
        "sigmoid",
    ),
    # member by member (not batched), lazy updates of the 520 × 520 layer (batch ≤ 4)
    "L2-wide-lazy": (
        (520, 520),
        "relu",
        False,
        2,
        OptimizerPlan(kind="sgd", lr=0.01),
        "mse",
        "binary",
        1,
        "identity",
    ),
    # member by member and row-blocked fused backward + update (batch > 4)
    "L2-wide-blocked": (
        (520, 520),
        "relu",
        False,
        8,
        OptimizerPlan(kind="sgd", lr=0.01),
        "mse",
        "binary",
        1,
        "identity",
    ),
}


@pytest.mark.parametrize("native", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_ensemble_members_equal_solo_runs_bitwise(
    name: str, threads: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:  # the ATen path where the native step loop would take the step
        from mfdsl_torch import _native

        monkeypatch.setattr(_native, "library", lambda: None)
    widths, act, bias, batch, opt, loss, task, k, out = CASES[name]
    datas = [FakeData(dim=4, outputs=k, task=task, seed=s) for s in range(3)]
    obs = tuple(o for o in ALL_OBS if task != "regression" or o.name != "test_accuracy")
    base = make_plan(
        widths=widths,
        outputs=k,
        bias=bias,
        activation=act,
        output=out,
        loss=loss,
        optimizer=opt,
        steps=12,
        record_steps=[0, 5, 5, 12],
        batch=batch,
        observables=obs,
    )
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_identical(members(base), datas)
    finally:
        torch.set_num_threads(old)


def test_float32_ensemble_equals_solo() -> None:
    datas = [FakeData(seed=s) for s in range(3)]
    base = make_plan(
        widths=(16, 16),
        bias=True,
        steps=8,
        record_steps=[0, 8],
        optimizer=OptimizerPlan(kind="sgd", lr=0.05, momentum=0.5),
        observables=ALL_OBS,
    )
    assert_identical(members(base), datas, dtype="float32")


def test_modes_follow_member_shapes_and_a_single_batched_member_has_a_dummy() -> None:
    small = make_plan(widths=(8, 8))
    wide = make_plan(widths=(300, 300))
    cpu = torch.device("cpu")
    assert is_batched(small.layers, cpu) and not is_batched(wide.layers, cpu)
    one = Ensemble([small])
    assert one.batched and (one.E, one.Ea) == (1, 2)
    assert one.W[1].shape == (2, 8, 8) and torch.all(one.W[1][1] == 0)
    three = Ensemble(members(small))
    assert (three.E, three.Ea) == (3, 3) and three.W[0].is_contiguous()
    w = Ensemble(members(wide, 2))
    assert not w.batched and w.Ea == 2 and not w.W[1].is_contiguous()
    assert w.W[1][1].is_contiguous()  # padded: members apart, each contiguous
    # initial weights: each member's from its own plan's seed (member 1: seed 1)
    for e, plan in enumerate(members(small)):
        for w, want in zip(three.W, plan.initial_weights(), strict=True):
            np.testing.assert_array_equal(w[e].numpy(), want)
    assert not np.array_equal(three.W[0][0].numpy(), three.W[0][1].numpy())


def test_diverging_member_is_dropped_and_the_others_go_on_unchanged() -> None:
    datas = [FakeData(task="regression", seed=s) for s in range(3)]
    obs = (
        ObservablePlan(name="train_loss"),
        ObservablePlan(name="test_loss"),
        ObservablePlan(name="weight_change"),
    )
    base = make_plan(
        widths=(8, 8),
        activation="relu",
        steps=200,
        record_steps=np.arange(0, 201, 10),
        observables=obs,
        batch=4,
        optimizer=OptimizerPlan(kind="sgd", lr=0.05),
    )
    plans = [replace(base, seed=s) for s in range(3)]
    plans[1] = replace(plans[1], optimizer=OptimizerPlan(kind="sgd", lr=1e4))
    calls: list[tuple[int, int, float]] = []
    res = train_ensemble(plans, datas, progress=lambda m, s, v: calls.append((m, s, v)), chunk_steps=16)
    bad = res[1]
    assert bad.status == "diverged" and 0 < bad.steps_done < 200
    assert f"step {bad.steps_done}" in bad.message
    rec = base.record_steps
    after = rec > bad.steps_done
    for arr in bad.records.values():
        assert np.all(np.isnan(arr[after])) and np.all(np.isfinite(arr[rec < bad.steps_done]))
    assert [s for m, s, _ in calls if m == 1] == list(rec[~after])
    for m in (0, 2):
        assert res[m].status == "done" and res[m].steps_done == 200
        assert [s for mm, s, _ in calls if mm == m] == list(rec)
        alone = train(plans[m], datas[m], chunk_steps=16)
        for name, arr in alone.records.items():
            assert res[m].records[name].tobytes() == arr.tobytes(), name
    # the solo run of the diverging plan agrees too
    alone = train(plans[1], datas[1], chunk_steps=16)
    assert (alone.status, alone.steps_done) == (bad.status, bad.steps_done)
    np.testing.assert_array_equal(alone.records["train_loss"], bad.records["train_loss"])


def test_progress_is_called_per_member_in_order_with_the_recorded_loss() -> None:
    datas = [FakeData(seed=s) for s in range(2)]
    base = make_plan(
        widths=(8,), steps=7, record_steps=[0, 3, 7], observables=(ObservablePlan(name="train_loss"),)
    )
    calls: list[tuple[int, int, float]] = []
    res = train_ensemble(members(base, 2), datas, progress=lambda m, s, v: calls.append((m, s, v)))
    assert [(m, s) for m, s, _ in calls] == [(0, 0), (1, 0), (0, 3), (1, 3), (0, 7), (1, 7)]
    for m, s, v in calls:
        assert res[m].records["train_loss"][[0, 3, 7].index(s)] == v


def test_members_must_share_shapes_and_terms() -> None:
    a = make_plan(widths=(8,))
    datas = [FakeData(), FakeData(seed=1)]
    with pytest.raises(ValueError, match="share"):
        train_ensemble([a, make_plan(widths=(9,))], datas)
    with pytest.raises(ValueError, match="share"):
        train_ensemble([a, replace(a, optimizer=OptimizerPlan(kind="sgd", lr=0.1, momentum=0.9))], datas)
    with pytest.raises(ValueError, match="datasets"):
        train_ensemble([a], datas)
    assert train_ensemble([], []) == []
    # what may differ
    b = replace(
        a,
        seed=3,
        optimizer=OptimizerPlan(kind="sgd", lr=0.3),
        schedule=SchedulePlan(kind="linear", final=0.5),
    )
    assert ensemble_key(a) == ensemble_key(b)


def test_group_plans_splits_by_shape_cache_and_workers() -> None:
    small = [make_plan(widths=(8, 8), seed=s) for s in range(5)]
    wide = [make_plan(widths=(800, 800), seed=s) for s in range(5)]
    groups = group_plans(small + wide, workers=2)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert [0, 1, 2, 3, 4] in groups  # small: one ensemble
    assert all(len(g) == 1 for g in groups if g[0] >= 5)  # 800-wide: 5 MB per matrix
    # largest cost first
    assert groups[0][0] >= 5


def test_the_wide_case_really_takes_the_member_by_member_blocked_path() -> None:
    from mfdsl_torch._ensemble import EnsembleTrainer

    plan = make_plan(widths=CASES["L2-wide-blocked"][0])
    ens = Ensemble(members(plan, 2))
    trainer = EnsembleTrainer(ens, ["binary"] * 2, 1)
    assert not ens.batched and trainer.blocks[1] is not None and len(trainer.blocks[1]) == 2
