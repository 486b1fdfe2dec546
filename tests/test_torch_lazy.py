"""Lazy updates of large layers (``mfdsl_torch._ensemble``): a plain-SGD layer too large
for the cache keeps its last steps' rank-``B`` updates aside (``W + UᵀV``) and folds
them in every ``_LAZY_STEPS`` steps and at every record step.  The results equal the
immediate updates' up to rounding, do not depend on the chunking, and ensembles stay
bit-identical to solo runs, a diverging member included."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfdsl_torch import _ensemble, _native
from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer, train_ensemble
from mfdsl_torch._single import train
from test_torch_engine import FakeData, make_plan

from mfdsl.plan.types import ObservablePlan, OptimizerPlan, RunPlan

OBS = tuple(ObservablePlan(name=n) for n in ("train_loss", "test_loss", "weight_change", "output"))
WIDE = (520, 520)  # a 520 × 520 float64 layer: 2.2 MB, beyond _BLOCK_MIN_BYTES


@pytest.fixture(autouse=True)
def aten_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy updates belong to the ATen path: keep the native step loop out."""
    monkeypatch.setattr(_native, "library", lambda: None)


def wide_plan(**kw: object) -> RunPlan:
    args: dict[str, object] = {
        "widths": WIDE,
        "activation": "relu",
        "batch": 1,
        "steps": 100,
        "record_steps": np.array([0, 10, 45, 100]),
        "optimizer": OptimizerPlan(kind="sgd", lr=0.02),
        "observables": OBS,
    }
    args.update(kw)
    return make_plan(**args)  # type: ignore[arg-type]


def trainer_of(plan: RunPlan) -> EnsembleTrainer:
    return EnsembleTrainer(Ensemble([plan]), ["binary"], 1)


def test_large_plain_sgd_layers_are_lazy_and_the_others_not() -> None:
    lazy = trainer_of(wide_plan())
    assert lazy.lazy[1] is not None and lazy.blocks[1] is None
    assert lazy.lazy[0] is None and lazy.lazy[2] is None  # 4 × 520 and 520 × 1: small
    assert trainer_of(wide_plan(batch=8)).lazy[1] is None  # large minibatches: blocked
    decay = OptimizerPlan(kind="sgd", lr=0.02, weight_decay=1e-3)
    assert trainer_of(wide_plan(optimizer=decay)).blocks[1] is not None
    momentum = OptimizerPlan(kind="sgd", lr=0.02, momentum=0.9)
    assert not trainer_of(wide_plan(optimizer=momentum)).lazy_on
    noisy = OptimizerPlan(kind="langevin", lr=0.02, temperature=1e-4)
    assert not trainer_of(wide_plan(optimizer=noisy)).lazy_on
    assert not trainer_of(make_plan(widths=(16, 16), batch=1)).lazy_on  # batched mode


def test_lazy_updates_equal_immediate_updates_up_to_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = wide_plan()
    data = FakeData()
    lazy = train(plan, data)
    monkeypatch.setattr(_ensemble, "_LAZY_MAX_BATCH", 0)  # every layer updated at once
    assert not trainer_of(plan).lazy_on
    eager = train(plan, data)
    assert lazy.status == eager.status == "done"
    for name, arr in eager.records.items():
        np.testing.assert_allclose(lazy.records[name], arr, rtol=1e-12, atol=1e-14, err_msg=name)
    # the weights moved: the lazy share of the products was not a no-op
    assert np.all(lazy.records["weight_change"][-1] > 0)


def test_lazy_results_do_not_depend_on_the_chunking() -> None:
    plan = wide_plan()
    data = FakeData()
    a, b = train(plan, data), train(plan, data, chunk_steps=7)
    for name in a.records:
        assert a.records[name].tobytes() == b.records[name].tobytes(), name


@pytest.mark.parametrize("threads", [1, 2])
def test_lazy_ensemble_with_a_diverging_member_equals_solo_runs(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = wide_plan(steps=120, record_steps=np.array([0, 50, 120]))
    plans = [replace(plan, seed=s) for s in range(3)]
    plans[1] = replace(plans[1], optimizer=OptimizerPlan(kind="sgd", lr=1e6))
    datas = [FakeData(seed=s) for s in range(3)]
    # the diverged member leaves at a chunk's end with updates still pending: the
    # others carry theirs over
    pending: list[int] = []
    subset = _ensemble._subset

    def spy(trainer: EnsembleTrainer, keep: list[int]) -> EnsembleTrainer:
        pending.append(trainer.pending)
        return subset(trainer, keep)

    monkeypatch.setattr(_ensemble, "_subset", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = train_ensemble(plans, datas, chunk_steps=5)
        assert together[1].status == "diverged" and together[0].status == together[2].status == "done"
        assert pending and pending[0] > 0
        for p, d, got in zip(plans, datas, together, strict=True):
            alone = train(p, d, chunk_steps=5)
            assert (got.status, got.steps_done) == (alone.status, alone.steps_done)
            for name, arr in alone.records.items():
                assert got.records[name].tobytes() == arr.tobytes(), name
    finally:
        torch.set_num_threads(old)


def test_lazy_updates_off_is_the_immediate_path(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = wide_plan()
    data = FakeData()
    off = train_ensemble([plan], [data], lazy=False)[0]
    monkeypatch.setattr(_ensemble, "_LAZY_MAX_BATCH", 0)
    eager = train_ensemble([plan], [data])[0]
    for name, arr in eager.records.items():
        np.testing.assert_array_equal(off.records[name], arr, err_msg=name)
    assert not EnsembleTrainer(Ensemble([plan]), ["binary"], 1, lazy=False).lazy_on
