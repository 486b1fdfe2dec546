"""The native step loop (``mfdsl_torch._native``): plain SGD with the mse loss, compiled
from C on first use.  It agrees with the ATen path up to rounding, ensembles stay
bit-identical to solo runs (one or several threads, a diverging member included), the
chunking changes nothing, and without a compiler training falls back to ATen ops with
one warning."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfdsl_torch import _native
from mfdsl_torch._engine import train
from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer, train_ensemble
from test_torch_engine import FakeData, make_plan

from mfdsl._plan import ObservablePlan, OptimizerPlan, RunPlan, SchedulePlan

if _native._compiler() is None:  # pragma: no cover - CI machines have gcc
    pytest.skip("no C compiler here: the native step loop cannot be built", allow_module_level=True)
# with a compiler, a build failure is a bug in _native.c: fail, don't skip
assert _native.library() is not None, _native.unavailable_reason()

OBS = tuple(
    ObservablePlan(name=n) for n in ("train_loss", "test_loss", "output", "weight_change", "neuron_spread")
)
ACTIVATIONS = list(_native.ACTIVATIONS)


def plan_of(**kw: object) -> RunPlan:
    args: dict[str, object] = {
        "widths": (12, 300),  # 300: the dot products' tails (not a multiple of the lanes)
        "activation": "relu",
        "batch": 1,
        "steps": 60,
        "record_steps": np.array([0, 7, 30, 60]),
        "optimizer": OptimizerPlan(kind="sgd", lr=0.01),
        "observables": OBS,
    }
    args.update(kw)
    return make_plan(**args)  # type: ignore[arg-type]


def trainer_of(plan: RunPlan, **kw: bool) -> EnsembleTrainer:
    return EnsembleTrainer(Ensemble([plan]), ["binary"], 1, **kw)


def test_native_takes_sgd_and_not_langevin_noise() -> None:
    assert trainer_of(plan_of()).native
    assert trainer_of(plan_of(bias=True, frozen=(1,), batch=3, activation="gelu")).native
    assert trainer_of(plan_of(loss="logistic", output="tanh")).native
    assert trainer_of(plan_of(optimizer=OptimizerPlan(kind="sgd", lr=0.01, momentum=0.9))).native
    assert trainer_of(plan_of(optimizer=OptimizerPlan(kind="sgd", lr=0.01, weight_decay=1e-3))).native
    assert not trainer_of(plan_of(), native=False).native
    # the noise comes from torch generators, stream by stream as a solo run draws it
    assert not trainer_of(plan_of(optimizer=OptimizerPlan(kind="langevin", lr=0.01, temperature=1e-4))).native
    # a native trainer has no lazy layers: it updates every layer at once
    assert not trainer_of(plan_of(widths=(520, 520))).lazy_on


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_native_equals_the_aten_path_up_to_rounding(act: str, batch: int, bias: bool) -> None:
    # Both paths compute the same sums in different orders: each step's rounding
    # (~1e-16 relative) is carried, mildly amplified, through 60 small-lr steps, so
    # 1e-10 has margin over the ~1e-13 seen while staying far below any real error
    # (a wrong term changes the records at the 1e-3 level).
    plan = plan_of(activation=act, batch=batch, bias=bias, frozen=(2,) if bias else ())
    data = FakeData()
    native = train(plan, data)
    aten = train(plan, data, native=False, lazy=False)
    assert native.status == aten.status == "done"
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)
    assert np.all(native.records["weight_change"][-1][[0, 2]] > 0)  # trained; layer 2 frozen or not
    if bias:
        assert np.all(native.records["weight_change"][:, 1] == 0)


@pytest.mark.parametrize(
    ("loss", "output", "task", "outputs"),
    [
        ("logistic", "identity", "binary", 1),
        ("logistic", "tanh", "binary", 1),
        ("mse", "sigmoid", "regression", 2),
        ("mse", "tanh", "multiclass", 3),  # one-hot targets
        ("cross_entropy", "identity", "multiclass", 3),
        ("cross_entropy", "sigmoid", "multiclass", 4),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_native_losses_and_output_maps_equal_the_aten_path(
    loss: str, output: str, task: str, outputs: int, batch: int
) -> None:
    plan = plan_of(loss=loss, output=output, outputs=outputs, batch=batch, bias=True, activation="tanh")
    data = FakeData(outputs=outputs, task=task)
    native = train_ensemble([plan], [data])[0]
    aten = train_ensemble([plan], [data], native=False, lazy=False)[0]
    assert native.status == aten.status == "done"
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)
    assert np.all(native.records["weight_change"][-1] > 0)


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerPlan(kind="sgd", lr=0.01, momentum=0.9),
        OptimizerPlan(kind="sgd", lr=0.01, weight_decay=1e-2),
        OptimizerPlan(kind="sgd", lr=0.01, momentum=0.5, weight_decay=1e-2),
        OptimizerPlan(kind="langevin", lr=0.01, weight_decay=1e-2, temperature=0.0),  # no noise: SGD
    ],
    ids=["momentum", "decay", "momentum-decay", "langevin-cold"],
)
@pytest.mark.parametrize(("batch", "act"), [(1, "relu"), (3, "relu"), (1, "tanh")])
def test_native_momentum_and_weight_decay_equal_the_aten_path(
    opt: OptimizerPlan, batch: int, act: str
) -> None:
    # every row moves under momentum and decay, ReLU's off units included
    plan = plan_of(optimizer=opt, batch=batch, activation=act, bias=True, frozen=(2,))
    data = FakeData()
    native = train(plan, data)
    aten = train(plan, data, native=False)
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)
    plans = [plan, replace(plan, seed=3, optimizer=replace(opt, lr=0.02))]
    datas = [data, FakeData(seed=2)]
    together = train_ensemble(plans, datas, chunk_steps=7)
    for p, d, got in zip(plans, datas, together, strict=True):
        alone = train(p, d)
        for name, arr in alone.records.items():
            assert got.records[name].tobytes() == arr.tobytes(), name


def test_native_float32_equals_the_aten_path_to_single_precision() -> None:
    plan = plan_of(bias=True)
    data = FakeData()
    native = train(plan, data, dtype="float32")
    aten = train(plan, data, dtype="float32", native=False, lazy=False)
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_ensemble_with_a_diverging_member_equals_solo_runs(threads: int) -> None:
    # tanh: a huge step kills every ReLU unit (a finite, constant output), but sends
    # tanh's weights to overflow
    base = plan_of(steps=120, record_steps=np.array([0, 50, 120]), activation="tanh")
    plans = [replace(base, seed=s) for s in range(4)]
    plans[1] = replace(plans[1], optimizer=OptimizerPlan(kind="sgd", lr=1e6))
    plans[2] = replace(plans[2], schedule=SchedulePlan(kind="cosine", final=0.1))
    plans[3] = replace(plans[3], optimizer=OptimizerPlan(kind="sgd", lr=0.004))
    datas = [FakeData(seed=s) for s in range(4)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = train_ensemble(plans, datas, chunk_steps=9)
    finally:
        torch.set_num_threads(old)
    assert [r.status for r in together] == ["done", "diverged", "done", "done"]
    for p, d, got in zip(plans, datas, together, strict=True):
        alone = train(p, d)
        assert (got.status, got.steps_done) == (alone.status, alone.steps_done)
        for name, arr in alone.records.items():
            assert got.records[name].tobytes() == arr.tobytes(), name


def test_native_results_do_not_depend_on_the_chunking() -> None:
    plan = plan_of(batch=2, bias=True)
    data = FakeData()
    a, b = train(plan, data), train(plan, data, chunk_steps=4)
    for name in a.records:
        assert a.records[name].tobytes() == b.records[name].tobytes(), name


@pytest.mark.parametrize(("option", "attribute"), [("native", "native"), ("lazy_updates", "allow_lazy")])
def test_the_torch_options_reach_the_trainer(
    option: str, attribute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import ROOT
    from mfdsl_torch import _ensemble

    import mfdsl
    from mfdsl._compile import compile_point

    seen: list[bool] = []
    real = _ensemble.EnsembleTrainer.__init__

    def spy(self: EnsembleTrainer, *args: object, **kw: object) -> None:
        real(self, *args, **kw)  # type: ignore[arg-type]
        seen.append(getattr(self, attribute))

    monkeypatch.setattr(_ensemble.EnsembleTrainer, "__init__", spy)
    for value, expected in (("off", False), ("auto", True)):
        spec = mfdsl.load(
            ROOT / "specs" / "quickstart.mf",
            overrides=[f"torch.{option}={value}", "train.steps=4", "sweep.width=[8]", "sweep.seed=[0]"],
        )
        point = next(p for p in mfdsl.expand(spec) if p.coords.get("width", 0) != float("inf"))
        plan = compile_point(point.spec, dict(point.coords), "torch")
        assert plan.options[option] == value
        mfdsl.get_backend("torch").run_group([plan])
        assert seen[-1] is expected


# --------------------------------------------------------------------------- building


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The module as in a new process, with an empty cache directory."""
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_reason", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv("MFDSL_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_the_library_is_built_once_into_the_cache(fresh_state: Path) -> None:
    assert _native.library() is not None
    built = list(fresh_state.glob("native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _native._load()  # a new process: loads the cached library, builds nothing
    assert [p.stat().st_mtime_ns for p in fresh_state.glob("native-*.so")] == [stamp]
    assert not [p for p in fresh_state.iterdir() if not p.name.endswith(".so")]  # no leftovers


def test_without_a_compiler_training_falls_back_with_one_warning(
    fresh_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    plan = plan_of()
    with pytest.warns(RuntimeWarning, match="install a C compiler") as caught:
        trainer = trainer_of(plan)
        trainer_of(plan)
    assert len(caught) == 1
    assert not trainer.native and "no C compiler" in str(_native.unavailable_reason())
    fallback = train(plan, FakeData())
    aten = train(plan, FakeData(), native=False)
    for name, arr in aten.records.items():
        assert fallback.records[name].tobytes() == arr.tobytes(), name


def test_a_failing_compiler_is_reported(fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_compiler", lambda: "false")  # runs, exits 1
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _native.library() is None
    assert not list(fresh_state.glob("native-*.so"))


def test_mfdsl_native_0_turns_it_off(fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFDSL_NATIVE", "0")
    assert _native.library() is None and _native.unavailable_reason() == "MFDSL_NATIVE=0"
    assert not os.listdir(fresh_state)


def test_an_unusable_cache_directory_builds_for_the_process(
    fresh_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = fresh_state / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MFDSL_CACHE_DIR", str(blocker / "cache"))  # cannot be made
    assert _native.library() is not None
    assert _native.unavailable_reason() is None
