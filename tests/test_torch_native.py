"""The native step loop (``mfdsl_torch._native``): SGD and Langevin steps compiled from C
on first use, each layer in rows or gemm mode.  Both modes agree with the ATen path up
to rounding (Langevin too: the same noise, drawn from the same generators), ensembles
stay bit-identical to solo runs (one or several threads, a diverging member included),
the chunking changes nothing, ``auto`` picks the modes the cost model documents, and
without a compiler (or a BLAS) training falls back to ATen ops."""

from __future__ import annotations

import ctypes
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfdsl_torch import _native
from mfdsl_torch import _native_abi as abi
from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer, train_ensemble
from mfdsl_torch._single import train
from test_torch_engine import FakeData, make_plan

from mfdsl.plan.types import ObservablePlan, OptimizerPlan, RunPlan, SchedulePlan

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


def trainer_of(plan: RunPlan, *, lazy: bool = True, native: bool | str = True) -> EnsembleTrainer:
    return EnsembleTrainer(Ensemble([plan]), ["binary"], 1, lazy=lazy, native=native)


def test_native_takes_sgd_and_langevin() -> None:
    assert trainer_of(plan_of()).native
    assert trainer_of(plan_of(bias=True, frozen=(1,), batch=3, activation="gelu")).native
    assert trainer_of(plan_of(loss="logistic", output="tanh")).native
    assert trainer_of(plan_of(optimizer=OptimizerPlan(kind="sgd", lr=0.01, momentum=0.9))).native
    assert trainer_of(plan_of(optimizer=OptimizerPlan(kind="sgd", lr=0.01, weight_decay=1e-3))).native
    assert not trainer_of(plan_of(), native=False).native
    assert not trainer_of(plan_of(), native="off").native
    # the noise comes from the members' torch generators, drawn as the ATen path draws it
    assert trainer_of(plan_of(optimizer=OptimizerPlan(kind="langevin", lr=0.01, temperature=1e-4))).native
    # a native trainer has no lazy layers: it updates every layer at once
    assert not trainer_of(plan_of(widths=(520, 520))).lazy_on
    with pytest.raises(ValueError, match="native must be one of"):
        trainer_of(plan_of(), native="fast")


def test_auto_picks_the_modes_of_the_cost_model() -> None:
    # batch 1: gemm for layers with rows of at least 512 bytes and at most 1 MiB in all,
    # rows for the others
    shapes = [(50, 100), (50, 128), (400, 400), (600, 600), (1600, 1600), (800, 1)]
    assert _native.choose_gemm(shapes, 1, False) == [False, True, True, False, False, False]
    assert _native.choose_gemm(shapes, 1, True) == [True, True, False, False, False, False]
    assert _native.choose_gemm([(100, 64), (100, 63), (1024, 128), (1025, 128)], 1, True) == [
        True,
        False,
        True,
        False,
    ]
    assert _native.choose_gemm([(1024, 256), (1025, 256)], 1, False) == [True, False]  # 1 MiB
    # with ReLU, rows at batch 1 (the units that are off are skipped); from batch 2 on,
    # gemm everywhere
    assert _native.choose_gemm(shapes, 1, False, "relu") == [False] * len(shapes)
    assert _native.choose_gemm(shapes, 2, True) == [True] * len(shapes)
    assert _native.choose_gemm(shapes, 2, True, "relu") == [True] * len(shapes)
    # the trainer follows it; rows and gemm force one mode
    # tanh, float64: 12 × 300 (2.4 KiB rows), 300 × 520 (1.2 MiB)
    plan = plan_of(widths=(12, 300, 520), activation="tanh")
    assert trainer_of(plan).native_gemm == [False, True, False, False]
    assert trainer_of(replace(plan, activation="relu")).native_gemm == [False] * 4
    assert trainer_of(replace(plan, batch=2)).native_gemm == [True] * 4
    assert trainer_of(plan, native="rows").native_gemm == [False] * 4
    assert trainer_of(plan, native="gemm").native_gemm == [True] * 4


def test_auto_hands_huge_batch_1_sgd_layers_to_aten_lazy_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    # above ATEN_LAZY_MIN_BYTES a batch-1 plain SGD step without ReLU takes ATen's lazy
    # updates (2 passes over the weights a step, against the rows' 3)
    monkeypatch.setattr(_native, "ATEN_LAZY_MIN_BYTES", 2 << 20)
    plan = plan_of(widths=(12, 600, 600), activation="tanh", steps=4)  # 600 × 600 float64: 2.7 MiB
    trainer = trainer_of(plan)
    assert not trainer.native and trainer.lazy_on
    assert trainer_of(replace(plan, activation="relu")).native  # the rows skip off units
    assert trainer_of(replace(plan, batch=2)).native
    assert trainer_of(plan, native="rows").native
    assert trainer_of(plan, lazy=False).native
    decay = replace(plan, optimizer=OptimizerPlan(kind="sgd", lr=0.01, weight_decay=1e-3))
    assert trainer_of(decay).native  # no lazy updates with decay


def test_without_a_blas_gemm_layers_go_to_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "blas", lambda f64: None)
    assert trainer_of(plan_of(widths=(12, 300, 520)), native="rows").native
    assert not trainer_of(plan_of(batch=4)).native  # ATen's products beat the rows
    with pytest.raises(ValueError, match="no BLAS gemm"):
        trainer_of(plan_of(), native="gemm")


@pytest.mark.parametrize("mode", ["rows", "gemm"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_native_equals_the_aten_path_up_to_rounding(act: str, batch: int, bias: bool, mode: str) -> None:
    # Both paths compute the same sums in different orders: each step's rounding
    # (~1e-16 relative) is carried, mildly amplified, through 60 small-lr steps, so
    # 1e-10 has margin over the ~1e-13 seen while staying far below any real error
    # (a wrong term changes the records at the 1e-3 level).
    plan = plan_of(activation=act, batch=batch, bias=bias, frozen=(2,) if bias else ())
    data = FakeData()
    native = train(plan, data, native=mode)
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
@pytest.mark.parametrize("mode", ["rows", "gemm"])
def test_native_losses_and_output_maps_equal_the_aten_path(
    loss: str, output: str, task: str, outputs: int, batch: int, mode: str
) -> None:
    plan = plan_of(loss=loss, output=output, outputs=outputs, batch=batch, bias=True, activation="tanh")
    data = FakeData(outputs=outputs, task=task)
    native = train_ensemble([plan], [data], native=mode)[0]
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
@pytest.mark.parametrize("mode", ["rows", "gemm"])
def test_native_momentum_and_weight_decay_equal_the_aten_path(
    opt: OptimizerPlan, batch: int, act: str, mode: str
) -> None:
    # every row moves under momentum and decay, ReLU's off units included
    plan = plan_of(optimizer=opt, batch=batch, activation=act, bias=True, frozen=(2,))
    data = FakeData()
    native = train(plan, data, native=mode)
    aten = train(plan, data, native=False)
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)
    plans = [plan, replace(plan, seed=3, optimizer=replace(opt, lr=0.02))]
    datas = [data, FakeData(seed=2)]
    together = train_ensemble(plans, datas, chunk_steps=7, native=mode)
    for p, d, got in zip(plans, datas, together, strict=True):
        alone = train(p, d, native=mode)
        for name, arr in alone.records.items():
            assert got.records[name].tobytes() == arr.tobytes(), name


LANGEVIN = (
    OptimizerPlan(kind="langevin", lr=0.01, temperature=1e-3),
    OptimizerPlan(kind="langevin", lr=0.01, momentum=0.5, weight_decay=1e-2, temperature=1e-3),
)


@pytest.mark.parametrize("opt", LANGEVIN, ids=["plain", "momentum-decay"])
@pytest.mark.parametrize(
    ("batch", "act", "dtype"), [(1, "relu", "float64"), (3, "tanh", "float64"), (2, "sigmoid", "float32")]
)
@pytest.mark.parametrize("mode", ["rows", "gemm"])
def test_native_langevin_equals_the_aten_path(
    opt: OptimizerPlan, batch: int, act: str, dtype: str, mode: str
) -> None:
    # the same noise (each member's generator, drawn in the ATen path's order and
    # shapes), so the two paths differ by rounding only; hidden biases take noise, the
    # output bias none; a cosine schedule ends at lr 0, where the ATen path draws none
    plan = plan_of(
        optimizer=opt,
        batch=batch,
        activation=act,
        bias=True,
        schedule=SchedulePlan(kind="cosine", final=0.0),
    )
    data = FakeData()
    native = train(plan, data, native=mode, dtype=dtype)
    aten = train(plan, data, native=False, dtype=dtype)
    rtol, atol = (1e-10, 1e-13) if dtype == "float64" else (2e-5, 1e-6)
    for name, arr in aten.records.items():
        np.testing.assert_allclose(native.records[name], arr, rtol=rtol, atol=atol, err_msg=name)
    # and the noise is really there: the same run without it differs at the noise's scale
    cold = train(replace(plan, optimizer=replace(opt, temperature=0.0)), data, native=mode, dtype=dtype)
    assert np.max(np.abs(cold.records["weight_change"] - native.records["weight_change"])) > 1e-4


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["rows", "gemm"])
def test_native_langevin_ensembles_equal_solo_runs_whatever_the_pieces(
    threads: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mfdsl_torch import _ensemble

    base = plan_of(
        optimizer=LANGEVIN[1],
        batch=2,
        activation="tanh",
        bias=True,
        steps=40,
        record_steps=np.array([0, 13, 40]),
    )
    plans = [replace(base, seed=s) for s in range(3)]
    plans[2] = replace(plans[2], optimizer=replace(LANGEVIN[1], lr=0.02, temperature=1e-2))
    datas = [FakeData(seed=s) for s in range(3)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = train_ensemble(plans, datas, chunk_steps=9, native=mode)
        # noise drawn in pieces of one step instead of whole chunks: the same numbers
        monkeypatch.setattr(_ensemble, "_NOISE_ELEMENTS", 1)
        pieces = train_ensemble(plans, datas, native=mode)
        alone = [train(p, d, native=mode) for p, d in zip(plans, datas, strict=True)]
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(together, pieces, alone, strict=True):
        for name, arr in c.records.items():
            assert a.records[name].tobytes() == arr.tobytes(), name
            assert b.records[name].tobytes() == arr.tobytes(), name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("widths", "batch"),
    [((12, 300), 5), ((300, 300), 5), ((300, 300), 100)],
    ids=["batched", "member", "threaded"],
)
def test_gemm_mode_ensembles_equal_solo_runs(threads: int, widths: tuple[int, ...], batch: int) -> None:
    # the BLAS runs each member's products as a solo run's, whatever the member's place
    # (batched mode: members at any alignment) and torch's threads: one BLAS thread per
    # member, members side by side, or (batch 100: 18 MFLOP a product) all of torch's
    # threads per member, members one after another
    shapes = [(4, 300), (300, 300), (300, 1)]
    assert (_native.member_blas_threads(shapes, [True] * 3, batch, 2) == 2) == (batch == 100)
    base = plan_of(
        widths=widths, batch=batch, activation="sigmoid", bias=True, steps=20, record_steps=np.array([0, 20])
    )
    plans = [replace(base, seed=s) for s in range(3)]
    datas = [FakeData(seed=s) for s in range(3)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = train_ensemble(plans, datas, native="gemm")
        alone = [train(p, d, native="gemm") for p, d in zip(plans, datas, strict=True)]
    finally:
        torch.set_num_threads(old)
    for got, want in zip(together, alone, strict=True):
        for name, arr in want.records.items():
            assert got.records[name].tobytes() == arr.tobytes(), name


def test_large_gemm_layers_go_in_row_blocks_to_the_same_results() -> None:
    # 600 × 600 float64 (2.7 MiB) goes in row blocks of 512 KiB; the rows of a block are
    # the rows of the whole, so rows and gemm agree to rounding as for small layers
    plan = plan_of(widths=(600, 600), batch=2, activation="tanh", steps=12, record_steps=np.array([0, 12]))
    data = FakeData()
    gemm = train(plan, data, native="gemm")
    aten = train(plan, data, native=False, lazy=False)
    for name, arr in aten.records.items():
        np.testing.assert_allclose(gemm.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)


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
    from mfdsl.plan.compile import compile_point

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


# --------------------------------------------------------------------------- the interface

#: quick builds for the interface tests (the code's speed is beside the point there)
QUICK = ("-O0", "-fPIC", "-std=c11")


def _swapped() -> tuple[tuple[str, str, str], ...]:
    """The declaration with two fields of the same type swapped: it compiles, but a
    caller of the other layout would pass the step count as the batch size."""
    fields = list(abi.FIELDS)
    i, j = [k for k, (name, _, _) in enumerate(fields) if name in ("B", "n")]
    fields[i], fields[j] = fields[j], fields[i]
    return tuple(fields)


@pytest.fixture(scope="module")
def stale_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``_native.c`` built against another version of the declaration."""
    path = tmp_path_factory.mktemp("stale") / "native-stale.so"
    _native._build(_native._compiler() or "cc", path, header=abi.header(_swapped()), flags=QUICK)
    return path


def test_one_declaration_makes_both_sides_of_the_interface() -> None:
    # the header and ctypes' struct come from abi.FIELDS; the built library agrees
    text = abi.header()
    for name, c_type, _ in abi.FIELDS:
        assert f"{c_type}{'' if c_type.endswith('*') else ' '}{name};" in text
        assert getattr(abi.MfArgs, name).size == ctypes.sizeof(abi.ctype(c_type))
    assert [f[0] for f in abi.MfArgs._fields_] == [f[0] for f in abi.FIELDS]
    for prefix, members in abi.ENUMS:
        for key, value in members.items():
            assert f"{prefix}_{key.upper()} = {value}" in text
    assert f"#define MF_ABI_FINGERPRINT {abi.FINGERPRINT}ULL" in text
    lib = _native.library()
    assert lib is not None
    abi.check(lib)  # the loaded library was compiled from this declaration
    # every field and code counts; the comments do not
    assert abi.fingerprint(_swapped()) != abi.FINGERPRINT
    assert abi.fingerprint(enums=((*abi.ENUMS[:-1], ("MF", {"ncoef": 11})))) != abi.FINGERPRINT
    reworded = tuple((n, t, doc + " (reworded)") for n, t, doc in abi.FIELDS)
    assert abi.fingerprint(reworded) == abi.FINGERPRINT
    with pytest.raises(ValueError, match="no ctypes type for the C type 'float'"):
        abi.ctype("float")


def test_a_build_of_another_layout_is_refused(stale_build: Path) -> None:
    lib = ctypes.CDLL(str(stale_build))
    want = f"{abi.FINGERPRINT:#x}"
    with pytest.raises(
        abi.AbiMismatch, match=f"is stale: its interface fingerprint 0x[0-9a-f]+ is not this mfdsl's {want}"
    ):
        abi.check(lib, stale_build)


def test_a_build_without_a_fingerprint_is_refused(tmp_path: Path) -> None:
    # a library from before the fingerprint (it exported the step functions only)
    src = tmp_path / "old.c"
    src.write_text("int mf_sgd_f64(void) { return 0; }\nint mf_sgd_f32(void) { return 0; }\n")
    lib = tmp_path / "old.so"
    _native._cc([_native._compiler() or "cc", "-shared", "-fPIC", str(src), "-o", str(lib)])
    with pytest.raises(abi.AbiMismatch, match="exports no ABI fingerprint"):
        abi.check(ctypes.CDLL(str(lib)), lib)


def test_a_layout_the_compiler_and_ctypes_disagree_on_is_refused(tmp_path: Path) -> None:
    # this mfdsl's fingerprint over a struct with a wider field, which moves the fields
    # after it: what a compiler laying the struct out unlike ctypes would give
    wide = tuple((n, "int64_t" if n == "acc_kind" else t, doc) for n, t, doc in abi.FIELDS)
    forged = abi.header(wide).replace(
        f"#define MF_ABI_FINGERPRINT {abi.fingerprint(wide)}ULL",
        f"#define MF_ABI_FINGERPRINT {abi.FINGERPRINT}ULL",
    )
    path = tmp_path / "native-forged.so"
    _native._build(_native._compiler() or "cc", path, header=forged, flags=QUICK)
    with pytest.raises(abi.AbiMismatch, match=r"lays out struct mf_args \(size, offsets .*\) unlike ctypes"):
        abi.check(ctypes.CDLL(str(path)), path)


def test_a_stale_cached_build_is_rebuilt_transparently(
    fresh_state: Path, stale_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stale file under this build's key (a damaged cache, a hand-copied library): the
    # loader builds afresh, uses that, and puts it in the stale file's place
    monkeypatch.setattr(_native, "_FLAGS", QUICK)
    cached = fresh_state / f"native-{_native._key(_native._compiler() or 'cc')}.so"
    shutil.copyfile(stale_build, cached)
    stale = cached.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = _native.library()
    assert lib is not None and _native.unavailable_reason() is None
    abi.check(lib)
    assert cached.read_bytes() != stale
    assert [p.name for p in fresh_state.iterdir()] == [cached.name]  # no leftovers
    # the cached file now passes the check (loaded from another name: the loader keeps
    # one library per path)
    other = fresh_state / "copy.so"
    shutil.copyfile(cached, other)
    abi.check(ctypes.CDLL(str(other)))


def test_a_build_that_stays_stale_is_refused_and_training_falls_back(
    fresh_state: Path, stale_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every build comes out of another layout: the library is refused with the reason,
    # never called, and training runs on ATen's ops
    monkeypatch.setattr(_native, "_build", lambda cc, out, **kw: shutil.copyfile(stale_build, out))
    with pytest.warns(
        RuntimeWarning, match="is stale: its interface fingerprint .* a fresh build disagrees too"
    ):
        assert _native.library() is None
    assert "fingerprint" in str(_native.unavailable_reason())
    plan = plan_of(steps=10, record_steps=np.array([0, 10]))
    assert not trainer_of(plan).native
    fallback = train(plan, FakeData())
    aten = train(plan, FakeData(), native=False)
    for name, arr in aten.records.items():
        assert fallback.records[name].tobytes() == arr.tobytes(), name


@pytest.mark.parametrize(
    ("loss", "output", "task", "outputs", "act"),
    [
        ("mse", "identity", "binary", 1, "relu"),
        ("logistic", "tanh", "binary", 1, "sigmoid"),
        ("mse", "sigmoid", "regression", 2, "tanh"),
        ("mse", "identity", "multiclass", 3, "piecewise_linear"),
        ("cross_entropy", "identity", "multiclass", 3, "gelu"),
        ("cross_entropy", "sigmoid", "multiclass", 4, "erf"),
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_native_evaluation_equals_the_observers(
    loss: str, output: str, task: str, outputs: int, act: str, dtype: str
) -> None:
    # the test loss and accuracy of the native forward pass (blocks of 7 rows) against
    # the observer's ATen ops, on the same weights (biases on)
    from mfdsl_torch._engine import _make_observer

    plan = plan_of(loss=loss, output=output, outputs=outputs, bias=True, activation=act)
    data = FakeData(outputs=outputs, task=task, n_test=50)
    ens = Ensemble([plan], dtype=dtype)
    for b in ens.b:
        if b is not None:
            b.normal_(generator=torch.Generator().manual_seed(1))
    obs = _make_observer(ens.member(0), plan, data, task, outputs)
    obs.eval_rows = 7
    aten = obs._test()
    obs.native_eval = True
    native = obs._test()
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(native[0], aten[0], rtol=rtol)
    if task == "regression":
        assert np.isnan(native[1]) and np.isnan(aten[1])
    else:
        assert native[1] == aten[1] and 0 < native[1] <= 1


def test_langevin_noise_drawn_a_piece_at_once_is_the_noise_drawn_step_by_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every draw a multiple of 16 entries (4 × 16, 16 × 32, 32 × 1 is not: no bias
    # there; hidden biases 16 and 32): the trainer draws a piece's noise in one call
    from mfdsl_torch import _ensemble

    plan = plan_of(
        widths=(16, 32),
        outputs=1,
        optimizer=LANGEVIN[0],
        bias=True,
        batch=2,
        steps=30,
        record_steps=np.array([0, 30]),
    )
    plan = replace(plan, layers=(*plan.layers[:-1], replace(plan.layers[-1], frozen=True)))
    data = FakeData()
    assert trainer_of(plan)._noise_merge
    merged = train(plan, data)
    aten = train(plan, data, native=False)
    for name, arr in aten.records.items():  # the same noise: the paths differ by rounding only
        np.testing.assert_allclose(merged.records[name], arr, rtol=1e-10, atol=1e-13, err_msg=name)
    real = _ensemble.EnsembleTrainer._native_args

    def unmerged(self: EnsembleTrainer) -> object:
        out = real(self)
        self._noise_merge = False
        return out

    monkeypatch.setattr(_ensemble.EnsembleTrainer, "_native_args", unmerged)
    one_by_one = train(plan, data)
    for name, arr in one_by_one.records.items():
        assert merged.records[name].tobytes() == arr.tobytes(), name
