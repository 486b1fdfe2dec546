"""Neuronal-embedding initialisations, ``embedded(mean, std)`` (Pham & Nguyen 2020):
the language (expressions of the latent coordinates, their checks and messages), the
draws (a new stream; no existing draw changes), both backends (jax's R1 keeps the mean
function on particle pairs), the science checks, and the science itself: the middle
layers' spread across neurons falls like n^-1/2 with i.i.d. weights and stays O(1) with
an embedding.

The exactness of jax with N particles against torch at width N lives with the other
such cases, ``tests/test_jax_solver.py`` (``L3-tanh-embedded``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mfdsl
from mfdsl.analysis.report import fit_rate
from mfdsl.core import streams as _streams
from mfdsl.core.errors import SpecError
from mfdsl.core.streams import Stream
from mfdsl.data.make import make_dataset
from mfdsl.language.ir import Embedded, Spec
from mfdsl.language.latent import bind, evaluate, varies
from mfdsl.plan.check import spec_warnings
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import DistPlan, RunPlan, initial_weights, latent_coordinates

SPEC = """\
experiment emb
data isotropic_gaussian {{ dim = 4, delta = 0.5, train = 32, test = 64 }}
network mlp {{ hidden = 3, activation = relu, bias = true }}
init {{
{init}
}}
train {{ optimizer = sgd(lr = 0.1), batch = 32, steps = 4 }}
record every 2 {{ train_loss, neuron_spread(layer = [2, 3], probes = 8) }}
sweep {{ width = [8, 16], a = [0, 2] }}
backends torch, jax
"""

GOOD = (
    "  layer 1    ~ embedded(mean = a * cos(2 * pi * u_out) / sqrt(dim), std = 1 / sqrt(dim))\n"
    "  layer 2..3 ~ embedded(mean = 1 + a * cos(2 * pi * (u_in - u_out)), std = 0.5)\n"
    "  layer last ~ embedded(sin(2 * pi * u_in), 1)"
)


def spec(init: str = GOOD) -> Spec:
    return mfdsl.parse(SPEC.format(init=init), path="emb.mf")


def middle(s: Spec) -> Embedded:
    """The rule of layers 2..3."""
    assert s.init is not None
    dist = s.init.rules[1].dist
    assert isinstance(dist, Embedded)
    return dist


def error(init: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        mfdsl.check_all(spec(init))
    return caught.value


# --------------------------------------------------------------------------- language


def test_a_valid_embedding_checks_and_reads_back() -> None:
    s = spec()
    points = mfdsl.check_all(s)
    assert len(points) == 4
    dist = middle(points[-1].spec)  # a = 2: the sweep variable bound, pi folded
    assert dist.std == 0.5 and varies(dist.mean)
    shown = mfdsl.to_yaml(s)
    assert "embedded(mean = 1 + a * cos(2 * pi * (u_in - u_out)), std = 0.5)" in shown
    # the YAML form is a spec too, and the same one
    from mfdsl.language.build import build
    from mfdsl.language.load import yaml_to_module

    assert build(yaml_to_module(shown, "emb.yaml")) == s


@pytest.mark.parametrize(
    ("init", "message", "where", "hint"),
    [
        (
            GOOD.replace("(u_in - u_out)", "(u_inn - u_out)"),
            "unknown name 'u_inn' in 'mean'",
            (6, 54),
            "did you mean 'u_in'?",
        ),
        (
            GOOD.replace("cos(2 * pi * u_out)", "cos(2 * pi * u_in)"),
            "'u_in' is undefined in layer 1",
            (5, 49),
            "use u_out",
        ),
        (
            GOOD.replace("sin(2 * pi * u_in)", "sin(2 * pi * u_out)"),
            "'u_out' is undefined in layer 4, the read-out",
            (7, 38),
            "use u_in",
        ),
        (
            GOOD.replace("1 + a * cos", "log(u_in - 0.5) + a * cos"),
            "the mean function is not finite at u_in = 0",
            (6, 32),
            "uniform on [0, 1]",
        ),
        (
            GOOD.replace("1 + a * cos", "1 + a * coss"),
            "'coss(...)' is not allowed here",
            (6, 40),
            "did you mean 'cos'?",
        ),
        (
            GOOD.replace(
                "layer 1    ~ embedded(mean = a * cos(2 * pi * u_out) / sqrt(dim)", "layer 1 ~ normal(u_out"
            ),
            "unknown name 'u_out' in 'mean'",
            (5, 20),
            "exists only in the mean of an embedded init",
        ),
        (
            GOOD.replace("std = 0.5", "std = -1"),
            "'std' must be a non-negative number, got -1",
            (6, 76),
            None,
        ),
        (
            GOOD.replace("embedded(sin(2 * pi * u_in), 1)", "embedded(std = 1)"),
            "embedded needs 'mean'",
            (7, 16),
            "add 'mean = ...'",
        ),
    ],
    ids=[
        "did-you-mean",
        "u_in-in-layer-1",
        "u_out-in-read-out",
        "not-finite",
        "function",
        "outside",
        "std",
        "no-mean",
    ],
)
def test_bad_embeddings_get_located_errors(
    init: str, message: str, where: tuple[int, int], hint: str | None
) -> None:
    err = error(init)
    assert message in err.message
    assert (err.line, err.column) == where, err.render()
    if hint is not None:
        assert err.hint is not None and hint in err.hint
    assert "Traceback" not in err.render()


def test_a_sweep_point_that_makes_the_function_infinite_is_named() -> None:
    init = GOOD.replace("1 + a * cos", "1 / a + cos")  # a = 0 divides by zero
    err = error(init)
    assert "division by zero" in err.message and "a = 0" in err.message


def test_pi_and_the_new_functions_work_in_every_expression() -> None:
    text = SPEC.format(init=GOOD).replace("lr = 0.1", "lr = 0.1 * abs(cos(pi))")
    point = next(iter(mfdsl.expand(mfdsl.parse(text))))
    assert point.spec.train.optimizer.lr == pytest.approx(0.1)


def test_every_function_evaluates_on_arrays_as_on_numbers() -> None:
    from mfdsl.language.expr import FUNCTIONS
    from mfdsl.language.latent import ARRAY_FUNCTIONS

    assert set(ARRAY_FUNCTIONS) == set(FUNCTIONS)
    u = np.linspace(0.05, 0.95, 7)
    for name, scalar in FUNCTIONS.items():
        expr = mfdsl.parse(SPEC.format(init=GOOD.replace("sin(2 * pi * u_in)", f"{name}(u_in + 0.5)")))
        assert expr.init is not None
        mean = bind(expr.init.rules[2].dist.mean, {})  # type: ignore[union-attr]
        np.testing.assert_allclose(evaluate(mean, u, None), [scalar(v + 0.5) for v in u], rtol=1e-15)


def test_bind_folds_everything_but_the_coordinates() -> None:
    expr = middle(spec()).mean
    bound = bind(expr, {"a": 2})
    grid = np.linspace(0, 1, 5)
    expected = 1 + 2 * np.cos(2 * np.pi * (grid[:, None] - grid[None, :]))
    np.testing.assert_allclose(evaluate(bound, grid[:, None], grid[None, :]), expected, rtol=1e-15)
    assert not varies(bind(expr, {"a": 0}))  # 1 + 0 * cos(...) is an i.i.d. law's mean


# --------------------------------------------------------------------------- draws


def _plan(width: int, a: int, backend: str = "torch") -> RunPlan:
    for point in mfdsl.expand(spec()):
        if point.width == width and point.coords["a"] == a:
            return compile_point(point.spec, dict(point.coords), backend)
    raise AssertionError("no such point")


def test_the_weights_are_the_mean_function_of_the_coordinates_plus_noise() -> None:
    plan = _plan(16, 2)
    w = plan.initial_weights()
    u = {ell: latent_coordinates(plan.seed, ell, 16) for ell in (1, 2, 3)}
    noise = [_streams.rng(plan.seed, Stream.INIT, ell).standard_normal(s.shape) for ell, s in enumerate(w, 1)]
    np.testing.assert_array_equal(
        w[0], 2 * np.cos(2 * np.pi * u[1])[None, :] / 2.0 * np.ones((4, 1)) + 0.5 * noise[0]
    )
    for ell in (2, 3):
        mean = 1 + 2 * np.cos(2 * np.pi * (u[ell - 1][:, None] - u[ell][None, :]))
        np.testing.assert_allclose(w[ell - 1], mean + 0.5 * noise[ell - 1], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(w[3], np.sin(2 * np.pi * u[3])[:, None] + noise[3], rtol=1e-14, atol=1e-14)
    # the coordinates are uniform on [0, 1) and depend on the layer's width only
    assert np.all((u[2] >= 0) & (u[2] < 1))
    np.testing.assert_array_equal(latent_coordinates(plan.seed, 2, 16), u[2])


def test_iid_laws_draw_nothing_new() -> None:
    """The LATENT stream is drawn only for embedded laws: an i.i.d. spec's weights are
    what they were (``initial_weights`` draws each layer as ``law.sample``)."""
    laws = [DistPlan(kind="normal", a=0.0, b=1.0)] * 3
    shapes = [(3, 5), (5, 5), (5, 1)]
    got = initial_weights(4, laws, shapes)
    for ell, (w, shape) in enumerate(zip(got, shapes, strict=True), start=1):
        np.testing.assert_array_equal(w, _streams.rng(4, Stream.INIT, ell).normal(0.0, 1.0, size=shape))


def test_an_embedded_law_cannot_be_sampled_without_coordinates() -> None:
    law = _plan(8, 2).layers[1].init
    assert law.embedded and law.varies and law.std == 0.5
    with pytest.raises(ValueError, match="coordinates"):
        law.sample(np.random.default_rng(0), (2, 2))
    with pytest.raises(ValueError, match="no single mean"):
        _ = law.mean
    flat = _plan(8, 0).layers[1].init
    assert not flat.varies and flat.iid() == DistPlan(kind="normal", a=1.0, b=0.5)


def test_torch_ensembles_draw_each_member_from_its_embedding() -> None:
    """Members of a torch ensemble (seeds 0 … 2 of one embedded point) train bit for bit
    as they do alone: each is initialised by its own plan's ``initial_weights``, latent
    coordinates included."""
    pytest.importorskip("torch")
    from mfdsl_torch._ensemble import train_ensemble
    from mfdsl_torch._single import train

    base = _plan(16, 2)
    plans = [dataclasses.replace(base, seed=s, coords={**base.coords, "seed": s}) for s in range(3)]
    datas = [make_dataset(p.data, p.seed) for p in plans]
    together = train_ensemble(plans, datas, dtype="float64")
    for plan, data, got in zip(plans, datas, together, strict=True):
        alone = train(plan, data, dtype="float64")
        for name, values in alone.records.items():
            assert got.records[name].tobytes() == values.tobytes(), name
    # and the seeds do differ: their coordinates are their own
    assert not np.array_equal(plans[0].initial_weights()[1], plans[1].initial_weights()[1])


# --------------------------------------------------------------------------- jax


def test_jax_keeps_embedded_middle_layers_on_particle_pairs() -> None:
    pytest.importorskip("jax")
    from mfdsl_jax._solver import build_system

    embedded = build_system(_plan(8, 2, "jax"), 64)
    assert embedded.reductions == ("R1",) and embedded.widths == (4, 64, 64, 64, 1)
    assert embedded.iid_std == (0.0, 0.5, 0.5, 0.0)
    assert all(law.varies and law.std == 0.0 for law in embedded.laws[1:3])
    # a = 0: the same spec is i.i.d., and R1 + R2 collapse layer 2
    iid = build_system(_plan(8, 0, "jax"), 64)
    assert iid.reductions == ("R1", "R2") and iid.widths == (4, 64, 1, 64, 1)
    # the memory estimate of mfdsl check sizes the same particle systems
    from mfdsl.plan.estimate import _limit_widths

    points = {p.coords["a"]: p.spec for p in mfdsl.expand(spec()) if p.width == 8}
    assert _limit_widths(points[2], 64, "auto") == embedded.widths
    assert _limit_widths(points[0], 64, "auto") == iid.widths


def test_r1_on_an_embedding_is_the_plain_system_without_its_iid_part() -> None:
    """R1 for an embedded middle layer drops only ``std · ε``: the reduced solve equals,
    to float64 rounding, the unreduced solve of the same spec with ``std = 0`` in the
    middle layers (the same coordinates, the same first and last layers)."""
    pytest.importorskip("jax")
    from mfdsl_jax._solver import solve

    plan = _plan(8, 2, "jax")
    no_iid = dataclasses.replace(
        plan,
        layers=tuple(
            dataclasses.replace(layer, init=dataclasses.replace(layer.init, b=0.0)) if 2 <= i <= 3 else layer
            for i, layer in enumerate(plan.layers, start=1)
        ),
    )
    data = make_dataset(plan.data, plan.seed)
    reduced = solve(plan, data, particles=16, dtype="float64")
    plain = solve(no_iid, data, particles=16, reduce="none", dtype="float64")
    assert reduced.attrs["limit_reductions"] == "R1"
    for name in ("train_loss", "neuron_spread"):
        np.testing.assert_allclose(reduced.records[name], plain.records[name], rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- checks


def test_the_degenerate_check_is_silent_on_the_embedding_only() -> None:
    warnings = spec_warnings(spec())
    degenerate = [w for w in warnings if "become identical" in w.message]
    assert len(degenerate) == 1  # from the a = 0 points only, i.i.d. in all but name
    text = SPEC.format(init=GOOD).replace("a = [0, 2]", "a = [1, 2]")
    assert not [w for w in spec_warnings(mfdsl.parse(text)) if "become identical" in w.message]


# --------------------------------------------------------------------------- science

DIVERSITY = "specs/pham_nguyen2020_diversity.mf"


def _spreads(overrides: list[str], measure: object) -> dict[int, tuple[list[int], list[float]]]:
    """``measure(plan)`` (the spread of layer 2) at every point of the diversity spec,
    as widths and values per ``diversity``."""
    from conftest import ROOT

    spec = mfdsl.load(ROOT / DIVERSITY, overrides=overrides)
    out: dict[int, tuple[list[int], list[float]]] = {}
    for point in mfdsl.expand(spec):
        plan = compile_point(point.spec, dict(point.coords), "torch")
        widths, values = out.setdefault(int(point.coords["diversity"]), ([], []))
        widths.append(point.width)
        values.append(float(measure(plan)))  # type: ignore[operator]
    return out


def test_middle_layer_spread_at_initialisation_iid_falls_like_n_half_embedded_stays() -> None:
    """At t = 0, across the neurons j of layer 2, ``H_2(x)_j = (1/n) Σ_i W_2[i, j]
    φ(H_1(x)_i)``.  I.i.d. weights: its std is ``τ (mean_i φ(H_1)²)^{1/2} / √n`` exactly,
    up to the O(n^-1/2) relative fluctuation of that mean, so the fitted slope in n is
    −1/2 within a few hundredths.  The embedding: it converges to the std over c of the
    limit's ``H_2(x, c)``, an O(1) number, with the i.i.d. part adding ``O(1/n)`` in
    quadrature (a slope of ``−(c²/n)/(2 s²)``: a few hundredths from n = 64 on).  0.08
    leaves room for both."""
    from conftest import ROOT

    x = make_dataset(mfdsl.load(ROOT / DIVERSITY).data, 0).test_x[:32]

    def spread(plan: RunPlan) -> float:
        w1, w2 = plan.initial_weights()[:2]
        h2 = np.maximum(x @ w1, 0.0) @ w2 / w2.shape[0]
        return float(h2.std(axis=1).mean())

    found = _spreads(["sweep.width=[64, 256, 1024]"], spread)
    iid, embedded = fit_rate(*found[0]), fit_rate(*found[2])
    assert iid is not None and embedded is not None
    assert abs(iid.slope + 0.5) < 0.08, iid
    assert abs(embedded.slope) < 0.08, embedded
    assert min(found[2][1]) > 0.2  # O(1): the limit's spread across neurons


def test_middle_layer_spread_after_training_separates() -> None:
    """The same after 20 SGD steps (t = 1) at small widths (16 … 128, two seeds): the
    i.i.d. spread still falls like n^-1/2 (Pham & Nguyen: the middle layers stay
    degenerate for all t) and the embedded one stays flat.  Eight points give a slope
    with a standard error of about 0.05, and n = 16 bends the i.i.d. fit by up to ~0.1
    (its O(n^-1/2) corrections): ±0.2 around each prediction, and disjoint intervals."""
    pytest.importorskip("torch")
    from mfdsl_torch._single import train

    def spread(plan: RunPlan) -> float:
        result = train(plan, make_dataset(plan.data, plan.seed), dtype="float64")
        return float(result.records["neuron_spread"][-1][0])

    overrides = ["train.steps=20", "sweep.width=[16, 32, 64, 128]", "sweep.seed=0..1", "data.test=64"]
    found = _spreads(overrides, spread)
    iid, embedded = fit_rate(*found[0]), fit_rate(*found[2])
    assert iid is not None and embedded is not None and iid.ci95 and embedded.ci95
    assert abs(iid.slope + 0.5) < 0.2, iid
    assert abs(embedded.slope) < 0.2, embedded
    assert iid.ci95[1] < embedded.ci95[0]


TRAP = """\
data isotropic_gaussian {{ dim = 10, delta = 0.5, train = online, test = 100 }}
network mlp {{ hidden = 3, activation = relu, bias = true }}
init {{
  layer 1    ~ {first}
  layer 2..3 ~ embedded(mean = cos(2 * pi * (u_in - u_out)), std = 1)
  layer last ~ normal(1, 1)
}}
train {{ optimizer = sgd(lr = 0.1), batch = 32, steps = 10 }}
sweep {{ width = [8, 16] }}
"""


def test_the_saddle_check_sees_an_embedding_that_averages_out() -> None:
    """Middle weights cos(2π(u_in − u_out)) after an i.i.d. first layer: layer 1's neurons
    ignore their coordinate, so H_2(c) = E_U[cos(2π(U − c))] · E[φ(H_1)] = 0 for every
    neuron, H_3 = 0 likewise, and with ReLU (φ(0) = φ'(0) = 0) nothing moves: the limit
    is stationary.  The check evaluates the embedded limit on a quadrature that keeps
    that cancellation exact, and names the first layer as the fix.  Once layer 1
    depends on u_out the limit moves, and the check is silent."""
    trap = mfdsl.parse(TRAP.format(first="normal(0, 1 / sqrt(dim))"), path="trap.mf")
    (warning,) = [w for w in spec_warnings(trap) if "cannot move" in w.message]
    assert warning.span is not None and warning.span.line == 5
    assert warning.hint is not None and "depends on u_out" in warning.hint
    fixed = TRAP.format(first="embedded(mean = cos(2 * pi * u_out) / sqrt(dim), std = 1 / sqrt(dim))")
    assert [w for w in spec_warnings(mfdsl.parse(fixed, path="fixed.mf")) if "cannot move" in w.message] == []
