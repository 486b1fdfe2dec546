"""The jax mean-field solver (``mfdsl_jax._solver``): exactness against torch (P5), the
reductions R1/R2 (and τ-independence, P2), solver convergence in dt, Langevin noise,
time and record handling, observables, and the backend's spec checks.

Float64 throughout; every problem is a finite training set used full-batch (gradient
flow on the empirical measure), so runs are deterministic and comparisons exact.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from jax_helpers import dataset, plans, rel_err, spec_text, sup_dist, with_seed
from mfdsl_jax import JaxBackend
from mfdsl_jax._solver import build_system, solve
from mfdsl_torch._single import train

import mfdsl

# --------------------------------------------------------------------------- P5

P5_CASES = {
    # two layers: logistic loss, tanh output, biases
    "L1-sigmoid-logistic-bias": dict(hidden=1, act="sigmoid", bias=True, out="tanh", loss="logistic"),
    # three layers: regression on a teacher, gelu, biases, a frozen first layer
    "L2-gelu-teacher-frozen": dict(
        hidden=2,
        act="gelu",
        bias=True,
        data="teacher { dim = 4, teacher = mlp(hidden = 1, width = 8), noise = 0.1, train = 32, test = 64 }",
        extra="  freeze = [1]",
        observables="train_loss, test_loss, output(probes = 5), "
        "neuron_spread(probes = 5), preactivation_rms, weight_change, particles(sample = 7)",
    ),
    # four layers: momentum, weight decay and a cosine schedule; erf; frozen last layer
    "L3-erf-momentum-decay-cosine": dict(
        hidden=3,
        act="erf",
        optimizer="sgd(lr = 0.2, momentum = 0.5, weight_decay = 0.01)",
        extra="  schedule = cosine(final = 0.1)\n  freeze = [last]",
    ),
    # Mei–Montanari–Nguyen's two-layer net: piecewise-linear σ, output weights frozen at 1
    "L1-piecewise_linear-frozen-output": dict(
        hidden=1,
        act="piecewise_linear",
        init="  layer 1 ~ normal(0.3, 1)\n  layer 2 ~ constant(1)",
        optimizer="sgd(lr = 0.05)",
        extra="  freeze = [last]",
    ),
    # relu, identity output, no bias, mse (the plain case)
    "L2-relu-plain": dict(hidden=2, act="relu"),
    # Langevin with weight decay, tanh, biases: the particles draw the noise the width-N
    # network draws (jax { noise = philox }: the counter-based noise, by step, parameter
    # and entry)
    "L2-tanh-langevin-bias": dict(
        hidden=2,
        act="tanh",
        bias=True,
        optimizer="langevin(lr = 0.2, temperature = 0.01, weight_decay = 0.05)",
    ),
    # a neuronal embedding (Pham & Nguyen 2020): every layer a function of the latent
    # coordinates of the neurons it joins, plus i.i.d. noise; tanh, biases
    "L3-tanh-embedded": dict(
        hidden=3,
        act="tanh",
        bias=True,
        init="  layer 1 ~ embedded(mean = cos(2 * pi * u_out), std = 1 / sqrt(dim))\n"
        "  layer 2..3 ~ embedded(mean = 2 * cos(2 * pi * (u_in - u_out)), std = 0.5)\n"
        "  layer last ~ embedded(mean = sin(2 * pi * u_in), std = 1)",
    ),
}


@pytest.mark.parametrize("case", list(P5_CASES), ids=list(P5_CASES))
def test_p5_unreduced_solver_is_a_width_n_network_by_gradient_flow(case: str) -> None:
    """reduce = none, N = width, same seed (so the same sampled initial weights), the
    whole training set each step (torch: batch = n_train, one epoch per step), dt = lr:
    every record agrees with torch's to float64 rounding over 100 steps."""
    n = 16
    finite, limit = plans(spec_text(width=n, **P5_CASES[case]))
    data = dataset(finite)
    assert finite.batch == data.n_train
    expected = train(finite, data, dtype="float64")
    got = solve(limit, data, particles=n, reduce="none", dtype="float64", noise="philox")
    assert expected.status == got.status == "done"
    assert sorted(got.records) == sorted(expected.records)
    for name, values in expected.records.items():
        assert rel_err(got.records[name], values) < 1e-10, name
    assert got.attrs["limit_reductions"].startswith("none")


def test_langevin_noise_of_the_limit_is_jax_random_by_default() -> None:
    """By default the limit draws jax.random's noise (fastest in XLA), not the width-N
    network's: the noisy P5 case then differs from torch by far more than rounding,
    while ``noise = philox`` (the P5 test above) agrees to 1e-10."""
    finite, limit = plans(spec_text(width=16, **P5_CASES["L2-tanh-langevin-bias"]))
    data = dataset(finite)
    expected = train(finite, data, dtype="float64")
    got = solve(limit, data, particles=16, reduce="none", dtype="float64")
    assert rel_err(got.records["weight_change"], expected.records["weight_change"]) > 1e-3
    with pytest.raises(ValueError, match="noise must be jax or philox"):
        solve(limit, data, particles=16, reduce="none", noise="threefry")


def test_same_seed_gives_torch_initial_weights_where_law_and_shape_agree() -> None:
    """Each weight layer is drawn from its own stream (``INIT``, index ℓ): without
    reductions the particle system is torch's width-N network; with them, every layer
    whose effective law and shape are torch's is still drawn as torch draws it."""
    finite, limit = plans(spec_text(hidden=3, every=1, steps=1, observables="particles(sample = 16)"))
    data = dataset(finite)
    first = train(finite, data).records["particles"][0]
    unreduced = solve(limit, data, particles=16, reduce="none").records["particles"][0]
    np.testing.assert_array_equal(unreduced[:, [0, 1, 3]], first[:, [0, 1, 3]])
    np.testing.assert_allclose(unreduced[:, 2], first[:, 2], rtol=1e-15)
    # with reductions (widths 4, 16, 1, 16, 1) layer 1 is still torch's
    reduced = solve(limit, data, particles=16).records["particles"][0]
    np.testing.assert_allclose(reduced[:, :3], first[:, :3], rtol=1e-15)
    # ... and so is the last layer W_4 (16 × 1, normal(0, 1)), seen from layer 3
    finite, limit = plans(
        spec_text(hidden=3, every=1, steps=1, observables="particles(layer = 3, sample = 16)")
    )
    first = train(finite, data).records["particles"][0]
    reduced = solve(limit, data, particles=16).records["particles"][0]
    np.testing.assert_array_equal(reduced[:, 3], first[:, 3])
    assert not np.allclose(reduced[:, 0], first[:, 0])  # W_3: R1's mean and i.i.d. sample


# --------------------------------------------------------------------------- reductions


def test_reductions_chosen_from_the_init() -> None:
    def system(hidden: int, init: str | None = None, **kw: object) -> object:
        return build_system(plans(spec_text(hidden=hidden, init=init, **kw))[1], 64)

    assert system(1).reductions == ()
    two = system(2)
    assert two.reductions == ("R1",) and two.widths == (4, 64, 64, 1)
    four = system(4)
    assert four.reductions == ("R1", "R2") and four.widths == (4, 64, 1, 1, 64, 1)
    assert four.collapsed == (2, 3)
    # Nguyen's constant last layer: the top collapses too
    top = system(4, init="  layer 1 ~ normal(0, 1)\n  layer 2..4 ~ normal(1, 3)\n  layer 5 ~ constant(0)")
    assert top.reductions == ("R1", "R2", "top collapse") and top.widths == (4, 64, 1, 1, 1, 1)
    assert top.iid_std == (0.0, 3.0, 3.0, 3.0, 0.0)
    assert system(
        2, init="  layer 1 ~ normal(0, 1)\n  layer 2 ~ normal(1, 1)\n  layer 3 ~ constant(0.5)"
    ).widths == (4, 64, 1, 1)
    # no reductions with Langevin noise, and with reduce = none
    noisy = system(3, optimizer="langevin(lr = 0.1, temperature = 0.01)")
    assert noisy.reductions == () and "Langevin" in noisy.note
    plan = plans(spec_text(hidden=3))[1]
    assert build_system(plan, 64, "none").widths == (4, 64, 64, 64, 1)


#: four layers (L = 3, so R1 + R2 collapse layer 2), sigmoid, non-centred: no saddle
R_SPEC = dict(
    hidden=3,
    act="sigmoid",
    bias=True,
    steps=60,
    every=6,
    optimizer="sgd(lr = 0.5, weight_decay = 0.02)",
    data="isotropic_gaussian { dim = 4, delta = 0.5, train = 48, test = 200 }",
    observables="train_loss, test_loss, weight_change, neuron_spread(probes = 8)",
)
SEEDS = range(6)


def _runs(limit: object, data: object, particles: int, reduce: str) -> dict[str, np.ndarray]:
    runs = [solve(with_seed(limit, s), data, particles=particles, reduce=reduce) for s in SEEDS]
    return {name: np.stack([r.records[name] for r in runs]) for name in runs[0].records}


def _init(tau: float) -> str:
    return (
        f"  layer 1 ~ normal(0.3, 1)\n  layer 2 ~ normal(1, {tau})\n"
        f"  layer 3 ~ normal(0.5, {tau})\n  layer 4 ~ normal(0, 1)"
    )


@pytest.fixture(scope="module")
def reduced_runs() -> dict[str, object]:
    _, limit = plans(spec_text(init=_init(1.0), **R_SPEC))
    data = dataset(limit)
    return {"limit": limit, "data": data, "runs": _runs(limit, data, 4096, "auto")}


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_r1_r2_reduced_solver_agrees_with_unreduced_particles(tau: float, reduced_runs: dict) -> None:
    """The reduced solver (N = 4096, per c_1 w_1, u; scalar a_3; per c_3 a_3, w_4) and
    plain particles (N = 256, 256² pairwise weights, with the i.i.d. init of std τ in
    layers 2 and 3) agree within their Monte Carlo error, estimated from 6 seeds each —
    for two values of τ (P2: the losses do not depend on τ₂, τ₃; under weight decay the
    weight change does, since the i.i.d. part decays with the weights, adding τ² (s − 1)²
    to the mean square change, and the reduced solver accounts for it)."""
    _, limit = plans(spec_text(init=_init(tau), **R_SPEC))
    data = reduced_runs["data"]
    full = _runs(limit, data, 256, "none")
    red = dict(reduced_runs["runs"])
    red["weight_change"] = _runs(limit, data, 4096, "auto")["weight_change"]
    for name in ("train_loss", "test_loss", "weight_change"):
        a, b = full[name], red[name]
        se = np.sqrt(a.var(axis=0, ddof=1) / len(SEEDS) + b.var(axis=0, ddof=1) / len(SEEDS))
        diff = np.abs(a.mean(axis=0) - b.mean(axis=0))
        moving = se > 0
        assert np.all(diff[moving] < 4.5 * se[moving] + 1e-9), (name, np.max(diff[moving] / se[moving]))
        assert np.all(diff[~moving] < 1e-12), name
        # and the reduced solver's own Monte Carlo error is far smaller
        if name != "weight_change":
            assert b.std(axis=0).max() < 0.5 * a.std(axis=0).max(), name
    # neuron_spread: exactly 0 on the collapsed layer 2 (by construction), small but
    # non-zero there for the pairwise particles (O(τ N^-1/2))
    spread = reduced_runs["runs"]["neuron_spread"]
    assert np.all(spread[:, :, 1] == 0.0)
    assert np.all(full["neuron_spread"][:, 1:, 1] > 0)


def test_p2_reduced_limit_does_not_depend_on_tau(reduced_runs: dict) -> None:
    for tau in (0.1, 3.0):
        _, limit = plans(spec_text(init=_init(tau), **R_SPEC))
        got = solve(limit, reduced_runs["data"], particles=4096)
        base = reduced_runs["runs"]
        for name in ("train_loss", "test_loss", "neuron_spread"):
            np.testing.assert_array_equal(got.records[name], base[name][0], err_msg=name)
        # the dropped i.i.d. part still decays, and counts in the weight change
        assert not np.array_equal(got.records["weight_change"][:, 1], base["weight_change"][0, :, 1])


# --------------------------------------------------------------------------- P4 in dt


def _dt_sequence(solver: str, first: float) -> list[float]:
    """sup-distances between the test-loss curves at dt, dt/2, dt/4, dt/8."""
    _, limit = plans(
        spec_text(
            hidden=3,
            act="sigmoid",
            bias=True,
            steps=20,
            every=5,
            optimizer="sgd(lr = 0.4)",
            observables="train_loss, test_loss",
        )
    )
    data = dataset(limit)
    curves = [
        solve(limit, data, particles=256, dt=first / 2**k, solver=solver).records["test_loss"]
        for k in range(4)
    ]
    return [sup_dist(curves[k], curves[k + 1]) for k in range(3)]


def test_p4_euler_error_halves_with_dt() -> None:
    gaps = _dt_sequence("euler", 0.4)
    ratios = [gaps[k] / gaps[k + 1] for k in range(len(gaps) - 1)]
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_heun_is_second_order() -> None:
    gaps = _dt_sequence("heun", 0.1)
    ratios = [gaps[k] / gaps[k + 1] for k in range(len(gaps) - 1)]
    assert all(3.4 < r < 4.6 for r in ratios), ratios


# --------------------------------------------------------------------------- time


def test_dt_shrinks_to_divide_each_record_interval() -> None:
    """lr = 0.1 and records every 10 steps (time 1): dt = 0.3 integrates with 4 steps
    of 0.25 per interval, exactly like dt = 0.25; records stay at time lr·step."""
    text = spec_text(optimizer="sgd(lr = 0.1)", steps=40, every=10, observables="train_loss, test_loss")
    _, limit = plans(text)
    data = dataset(limit)
    a = solve(limit, data, particles=64, dt=0.3)
    b = solve(limit, data, particles=64, dt=0.25)
    for name in a.records:
        np.testing.assert_array_equal(a.records[name], b.records[name])
    assert "in 16 euler steps" in a.message


def test_log_spaced_and_repeated_record_steps() -> None:
    _, limit = plans(spec_text(steps=30, observables="train_loss, test_loss"))
    limit = dataclasses.replace(limit, record_steps=np.array([0, 1, 1, 3, 9, 30]))
    data = dataset(limit)
    got = solve(limit, data, particles=32)
    assert got.records["test_loss"].shape == (6,)
    assert got.records["test_loss"][1] == got.records["test_loss"][2]
    every = dataclasses.replace(limit, record_steps=np.arange(31))
    full = solve(every, data, particles=32).records
    np.testing.assert_allclose(got.records["test_loss"], full["test_loss"][[0, 1, 1, 3, 9, 30]], rtol=1e-13)
    # train_loss: the mean of the step losses since the previous record
    np.testing.assert_allclose(got.records["train_loss"][4], full["train_loss"][4:10].mean(), rtol=1e-12)


def test_online_data_fresh_samples_each_step() -> None:
    text = spec_text(
        hidden=2,
        data="isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 64 }",
        batch=4,
        steps=20,
        every=5,
        observables="train_loss, test_loss",
    )
    _, limit = plans(text)
    data = dataset(limit)
    a = solve(limit, data, particles=64, data_samples=128)
    b = solve(limit, data, particles=64, data_samples=256)
    assert a.status == "done" and "128 fresh samples" in a.attrs["limit_solver"]
    assert not np.array_equal(a.records["test_loss"], b.records["test_loss"])
    assert sup_dist(a.records["test_loss"], b.records["test_loss"]) < 0.05
    # the step-0 train loss is the E_Z loss on step 0's samples
    x, y = data.train_chunk(0, 1, 128)
    assert a.records["train_loss"][0] == pytest.approx(
        solve(limit, _FixedSet(x[0], y[0], data), particles=64).records["train_loss"][0], rel=1e-12
    )


class _FixedSet:
    def __init__(self, x: np.ndarray, y: np.ndarray, like: object) -> None:
        self.train_x, self.train_y = x, y
        self.test_x, self.test_y = like.test_x, like.test_y  # type: ignore[attr-defined]
        self.dim, self.outputs, self.task = like.dim, like.outputs, like.task  # type: ignore[attr-defined]


def test_divergence_is_a_status_not_an_exception() -> None:
    _, limit = plans(
        spec_text(
            optimizer="sgd(lr = 1000)", act="identity", steps=50, every=5, observables="train_loss, test_loss"
        )
    )
    got = solve(limit, dataset(limit), particles=32)
    assert got.status == "diverged" and "diverged" in got.message
    loss = got.records["test_loss"]
    assert np.isfinite(loss[0]) and np.isnan(loss[-1])


# --------------------------------------------------------------------------- noise


def test_langevin_is_the_ou_process_without_a_gradient() -> None:
    """The output layer frozen at 0: no gradient reaches W_1, which then follows the
    discrete Ornstein–Uhlenbeck recursion w ← (1 − hλ) w + √(2hT) ξ exactly in law."""
    lr, lam, temp, steps, n = 0.05, 0.5, 0.2, 40, 4096
    init = "  layer 1 ~ normal(0, 1)\n  layer 2 ~ constant(0)"
    _, limit = plans(
        spec_text(
            init=init,
            optimizer=f"langevin(lr = {lr}, temperature = {temp}, weight_decay = {lam})",
            steps=steps,
            every=steps,
            extra="  freeze = [last]",
            observables="train_loss, particles(sample = 4096)",
        )
    )
    got = solve(limit, dataset(limit), particles=n)
    assert got.attrs["limit_reductions"].startswith("none")
    w = got.records["particles"][:, :, [0, 1]]  # w_in_1, w_in_2: (2 records, n, 2)
    a = (1 - lr * lam) ** steps
    var = a**2 * 1.0 + 2 * lr * temp * sum((1 - lr * lam) ** (2 * i) for i in range(steps))
    sample = w[1].var()
    assert sample == pytest.approx(var, rel=4 * math.sqrt(2 / (2 * n)))
    cov = np.mean((w[1] - w[1].mean()) * (w[0] - w[0].mean()))
    assert cov == pytest.approx(a, rel=0.1)
    assert np.all(got.records["particles"][:, :, 3] == 0)  # frozen: no noise


# --------------------------------------------------------------------------- observables


def test_collapsed_layers_are_named_and_their_spread_is_exactly_zero() -> None:
    init = "  layer 1 ~ normal(0, 1)\n  layer 2..4 ~ normal(1, 0.1)\n  layer 5 ~ constant(0)"
    _, limit = plans(
        spec_text(
            hidden=4,
            act="relu",
            init=init,
            steps=10,
            every=5,
            observables="test_loss, neuron_spread, particles(layer = 3, sample = 4)",
        )
    )
    got = solve(limit, dataset(limit), particles=64)
    assert got.attrs["limit_collapsed_layers"] == [2, 3, 4]
    assert got.attrs["limit_particles"] == [64, 1, 1, 1]
    assert got.attrs["limit_reductions"] == "R1 + R2 + top collapse"
    spread = got.records["neuron_spread"]
    assert np.all(spread[:, 1:] == 0.0) and np.all(spread[:, 0] > 0)
    # every sampled neuron of a collapsed layer is its one particle; entries of an R1
    # layer carry a sample of the dropped i.i.d. part (std τ = 0.1 around the mean)
    part = got.records["particles"][0]
    assert np.all(np.isfinite(part))
    assert np.allclose(part[:, [0, 1, 3]], 1.0, atol=0.5) and part[:, 0].std() > 0
    np.testing.assert_allclose(part[:, 2], math.sqrt(1 + 0.1**2))


def test_relu_kink_is_reported() -> None:
    init = "  layer 1 ~ normal(0, 1)\n  layer 2 ~ normal(0, 1)\n  layer 3 ~ normal(0, 1)"
    _, limit = plans(spec_text(hidden=2, act="relu", init=init, steps=5, every=5, observables="train_loss"))
    got = solve(limit, dataset(limit), particles=16)
    assert "ReLU's kink" in got.attrs["limit_warnings"][0] and "warning" in got.message


def test_float32_is_close_to_float64() -> None:
    _, limit = plans(spec_text(hidden=3, steps=20, every=5, observables="train_loss, test_loss"))
    data = dataset(limit)
    a = solve(limit, data, particles=256, dtype="float32").records["test_loss"]
    b = solve(limit, data, particles=256, dtype="float64").records["test_loss"]
    assert a.dtype == np.float64 and sup_dist(a, b) < 1e-5
    assert not jax.config.jax_enable_x64  # enabled only inside the call


# --------------------------------------------------------------------------- scalings


def _check(text: str) -> None:
    spec = mfdsl.parse(text)
    for point in mfdsl.expand(spec):
        JaxBackend().check(point.spec)


@pytest.mark.parametrize("scaling", ["ntk", "standard"])
@pytest.mark.parametrize("hidden", [1, 3])
def test_kernel_scalings_have_no_mean_field_limit(scaling: str, hidden: int) -> None:
    with pytest.raises(mfdsl.SpecError, match="kernel") as info:
        _check(spec_text(hidden=hidden, scaling=scaling))
    assert "mean_field" in (info.value.hint or "")


def test_mup_only_at_two_layers_and_without_decay_or_noise() -> None:
    _check(spec_text(hidden=1, scaling="mup"))
    with pytest.raises(mfdsl.SpecError, match="only at two"):
        _check(spec_text(hidden=2, scaling="mup"))
    with pytest.raises(mfdsl.SpecError, match="weight decay"):
        _check(spec_text(hidden=1, scaling="mup", optimizer="sgd(lr = 0.1, weight_decay = 0.1)"))
    with pytest.raises(mfdsl.SpecError, match="weight decay"):
        _check(spec_text(hidden=1, scaling="mup", optimizer="langevin(lr = 0.1, temperature = 0.1)"))


def test_momentum_needs_euler_with_dt_lr() -> None:
    text = spec_text(optimizer="sgd(lr = 0.1, momentum = 0.9)")
    _check(text + "jax { dt = 0.1 }\n")
    with pytest.raises(mfdsl.SpecError, match="momentum"):
        _check(text + "jax { dt = 0.05 }\n")
    with pytest.raises(mfdsl.SpecError, match="momentum"):
        _check(text + "jax { solver = heun }\n")


def test_mup_two_layer_limit_is_the_mean_field_limit() -> None:
    """μP at two layers: W_1's law is the spec's / √d, the output's the spec's (a = n v),
    so its limit is the mean-field limit of the spec with layer 1 ~ law / √d."""
    mup = spec_text(
        scaling="mup",
        init="  layer 1 ~ normal(0.4, 2)\n  layer 2 ~ normal(0, 3)",
        bias=True,
        observables="train_loss, test_loss, output(probes = 4)",
        width=64,
    )
    mf = spec_text(
        init="  layer 1 ~ normal(0.2, 1)\n  layer 2 ~ normal(0, 3)",
        bias=True,
        observables="train_loss, test_loss, output(probes = 4)",
    )
    (fin_mup, lim_mup), (_, lim_mf) = plans(mup), plans(mf)
    data = dataset(lim_mf)
    a = solve(lim_mup, data, particles=64, reduce="none").records
    b = solve(lim_mf, data, particles=64, reduce="none").records
    for name in b:
        assert rel_err(a[name], b[name]) < 1e-12, name
    # and the finite μP network of width 64 is that particle system (the same draws)
    c = train(fin_mup, data).records
    for name in b:
        assert rel_err(c[name], a[name]) < 1e-10, name
