"""Convolutional mean-field networks (``network cnn``): the language (shapes and their
errors), the textures data, one-step exactness of the jax infinite-channel limit
against the torch cnn of the same width (float64, 1e-10), and convergence in the
channel count to the limit.

Every exactness problem is a finite training set used full-batch (torch: batch =
n_train, so one step is one epoch and its mean loss is the whole set's), dt = lr:
the N-particle limit with reduce = none *is* the width-N cnn trained by gradient flow
on the empirical measure (``mfdsl_jax._cnn``), so the two agree to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import mfdsl
from mfdsl import SpecError
from mfdsl.data.make import make_dataset
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
experiment cnn_test
data textures {{ channels = 2, size = 6, classes = {classes}, noise = 0.5, train = {train}, test = 24 }}
network cnn {{
  layers = [{layers}]
  head = {head}
  dense = {dense}
  activation = {act}
  bias = {bias}
}}
init {{
{init}
}}
train {{
  optimizer = {optimizer}
  loss = {loss}
  batch = {batch}
  steps = {steps}
{extra}
}}
record every {every} {{ {observables} }}
sweep {{ width = [{width}], seed = [{seed}] }}
backends torch, jax
"""

OBSERVABLES = (
    "train_loss, test_loss, test_accuracy, output(probes = 5), neuron_spread(probes = 5), "
    "preactivation_rms(probes = 5), weight_change"
)


def cnn_text(
    *,
    layers: str = "conv(3, padding = 1), conv(3, stride = 2)",
    head: str = "avg",
    dense: int = 1,
    act: str = "tanh",
    bias: bool = True,
    classes: int = 2,
    train: int | str = 16,
    init: str | None = None,
    optimizer: str = "sgd(lr = 0.2)",
    loss: str = "mse",
    batch: int | None = None,
    steps: int = 1,
    extra: str = "",
    every: int = 1,
    observables: str = OBSERVABLES,
    width: int = 6,
    seed: int = 0,
) -> str:
    depth = layers.count("conv(") + dense
    if init is None:
        lines = ["  layer 1 ~ normal(0.2, 0.5)"]
        lines += [f"  layer {ell} ~ normal(0.5, 1)" for ell in range(2, depth + 1)]
        lines.append(f"  layer {depth + 1} ~ normal(0, 1)")
        init = "\n".join(lines)
    return SPEC.format(
        layers=layers,
        head=head,
        dense=dense,
        act=act,
        bias=str(bias).lower(),
        classes=classes,
        train=train,
        init=init,
        optimizer=optimizer,
        loss=loss,
        batch=batch if batch is not None else train,
        steps=steps,
        extra=extra,
        every=every,
        observables=observables,
        width=width,
        seed=seed,
    )


def cnn_plans(text: str) -> tuple[RunPlan, RunPlan]:
    spec = mfdsl.parse(text)
    point = next(iter(mfdsl.expand(spec)))
    finite = compile_point(point.spec, dict(point.coords), "torch")
    limit = compile_point(point.spec, {**point.coords, "width": math.inf}, "jax")
    return finite, limit


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN patterns differ"
    mask = ~np.isnan(a)
    scale = max(float(np.max(np.abs(b[mask]))), 1e-300)
    return float(np.max(np.abs(a[mask] - b[mask]))) / scale


# --------------------------------------------------------------------------- language


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        mfdsl.parse(text, "cnn.mf")
    return info.value


def test_cnn_parses_into_conv_layers_and_numbers_hidden_layers_conv_first() -> None:
    spec = mfdsl.parse(
        cnn_text(layers="conv(3, padding = 1), conv(kernel = 3, stride = 2, pool = 2)", dense=2)
    )
    net = spec.network
    assert isinstance(net, mfdsl.ConvNetwork)
    assert [(c.kernel, c.stride, c.padding, c.pool) for c in net.layers] == [(3, 1, 1, 1), (3, 2, 0, 2)]
    assert net.hidden == 4 and net.head == "avg"


def test_kernel_larger_than_the_feature_map_names_the_layer_and_sizes() -> None:
    # 6×6 → conv(3, stride 2) → 2×2 → conv(3) cannot fit
    err = error_of(cnn_text(layers="conv(3, padding = 1), conv(3, stride = 2), conv(3)", dense=0))
    text = str(err)
    assert "conv layer 3" in text and "3×3 kernel is larger than the 2×2 feature map" in text
    assert "cnn.mf:4:56:" in text  # the position of the offending conv(...)
    assert err.span is not None and err.span.line == 4 and err.span.column == 56


def test_a_pooling_window_the_map_cannot_hold_is_an_error() -> None:
    err = error_of(cnn_text(layers="conv(3, stride = 3, pool = 4)"))
    assert "conv layer 1" in str(err) and "2×2 map, smaller than the 4×4 pooling window" in str(err)


def test_padding_not_smaller_than_the_kernel_is_an_error() -> None:
    err = error_of(cnn_text(layers="conv(3, padding = 3)"))
    assert "padding 3 is not smaller than the kernel size 3" in str(err)
    assert "padding ≤ 2" in (err.hint or "")


def test_cnn_language_errors() -> None:
    assert "did you mean 'conv'" in (error_of(cnn_text(layers="cnv(3)")).hint or "")
    assert "needs 'layers'" in str(
        error_of(cnn_text().replace("  layers = [conv(3, padding = 1), conv(3, stride = 2)]\n", ""))
    )
    mlp_data = cnn_text().replace(
        "textures { channels = 2, size = 6, classes = 2, noise = 0.5, train = 16, test = 24 }",
        "isotropic_gaussian { dim = 4, train = 16, test = 24 }",
    )
    assert "a cnn network needs image data" in str(error_of(mlp_data))
    assert "did you mean 'cnn'" in (error_of(cnn_text().replace("network cnn", "network cnm")).hint or "")
    # init selectors count conv and dense layers: 2 conv + 1 dense + output = 4 weight layers
    err = error_of(cnn_text(init="  layer 1..3 ~ normal(0, 1)"))
    assert "no init rule for layer 4" in str(err)


def test_jax_rejects_what_the_cnn_limit_cannot_compute() -> None:
    from mfdsl_jax import JaxBackend

    pytest.importorskip("jax")

    def check(text: str) -> str:
        with pytest.raises(SpecError) as info:
            JaxBackend().check(mfdsl.parse(text))
        return str(info.value)

    assert "kernel (lazy-training) limit" in check(
        cnn_text().replace("backends torch, jax", "scaling ntk\nbackends torch, jax")
    )
    assert "no Langevin noise" in check(cnn_text(optimizer="langevin(lr = 0.1, temperature = 0.01)"))
    assert "not for convolutions" in check(cnn_text() + "jax { reduce = auto }\n")
    assert "Euler steps only" in check(cnn_text() + "jax { solver = heun }\n")
    JaxBackend().check(mfdsl.parse(cnn_text() + "jax { reduce = none, particles = 8 }\n"))


def test_textures_data_is_seeded_and_class_dependent() -> None:
    spec = mfdsl.parse(cnn_text(classes=3, loss="cross_entropy"))
    a, b = make_dataset(spec.data, 0), make_dataset(spec.data, 0)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (16, 2 * 6 * 6) and a.task == "multiclass" and a.outputs == 3
    assert set(np.unique(a.test_y)) <= {0, 1, 2} and a.test_y.dtype == np.int64
    # online: step s takes examples s·B … of the train stream, as for every generated source
    online = mfdsl.parse(cnn_text(train="online", batch=4))
    d = make_dataset(online.data, 1)
    x, _ = d.train_chunk(2, 1, 4)
    x_all, _ = d.train_chunk(0, 3, 4)
    np.testing.assert_array_equal(x[0], x_all[2])
    # the grating's orientation is the class: without noise, class 0 (label −1, θ = 0)
    # is constant along each row (axis 2), class 1 (θ = π/2) along each column (axis 1)
    clean = dataclasses.replace(spec.data, noise=0.0, classes=2)
    ds = make_dataset(clean, 0)
    for x, y in zip(ds.test_x[:6], ds.test_y[:6], strict=True):
        img = x.reshape(2, 6, 6)
        flat, varying = (2, 1) if y < 0 else (1, 2)
        assert np.allclose(np.ptp(img, axis=flat), 0.0)
        assert np.ptp(img, axis=varying).max() > 0.5


# --------------------------------------------------------------------------- exactness

EXACT_CASES = {
    # flatten head straight to the output, pooling, relu, no bias, logistic loss
    "flatten-pool-relu-logistic": dict(
        layers="conv(3, padding = 1, pool = 2), conv(2)",
        head="flatten",
        dense=0,
        act="relu",
        bias=False,
        loss="logistic",
    ),
    # avg head, a dense layer, biases, padding and stride; three classes with
    # cross-entropy; momentum, weight decay, a cosine schedule; layer 1 frozen
    "multiclass-momentum-decay-frozen": dict(
        classes=3,
        loss="cross_entropy",
        act="sigmoid",
        optimizer="sgd(lr = 0.3, momentum = 0.5, weight_decay = 0.01)",
        extra="  schedule = cosine(final = 0.1)\n  freeze = [1]",
        steps=3,
    ),
}


@pytest.mark.parametrize("case", list(EXACT_CASES), ids=list(EXACT_CASES))
def test_limit_with_n_particles_is_the_width_n_cnn_at_t0_and_after_steps(case: str) -> None:
    """At t = 0 and after each step: jax with N particles (plain particles) equals the
    torch cnn of width N with the same filters, every record to 1e-10 in float64."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    from mfdsl_jax._cnn import solve_cnn
    from mfdsl_torch._cnn import train_cnn

    kw = {"steps": 2, **EXACT_CASES[case]}
    n = 6
    finite, limit = cnn_plans(cnn_text(width=n, **kw))
    data = make_dataset(finite.data, finite.seed)
    assert finite.batch == data.n_train
    expected = train_cnn(finite, data, dtype="float64")
    got = solve_cnn(limit, data, particles=n, dtype="float64")
    assert expected.status == got.status == "done"
    assert sorted(got.records) == sorted(expected.records)
    assert list(np.asarray(finite.record_steps)) == list(range(kw["steps"] + 1))
    for name, values in expected.records.items():
        assert not np.isnan(values).any(), name
        assert rel_err(got.records[name], values) < 1e-10, name
    # and the network moved: the comparison is not of two initial states
    assert np.all(expected.records["weight_change"][-1][:-1] > 0) or "frozen" in case
    assert got.attrs["limit_reductions"].startswith("none")


def test_width_n_plan_and_limit_plan_draw_the_same_filters() -> None:
    """The limit plan's fans are per particle; the jax solver multiplies them by N and
    so draws exactly the width-N matrices (the first layer's C k² rows, then N k²)."""
    from mfdsl.plan.compile import cnn_fans

    finite, limit = cnn_plans(cnn_text(width=5, head="flatten"))
    assert finite.conv is not None
    fans = cnn_fans(finite.conv, finite.depth, 5, 1)
    assert fans == [(layer.fan_in, layer.fan_out) for layer in finite.layers]
    assert fans == [(2 * 9, 5), (5 * 9, 5), (5 * 4, 5), (5, 1)]  # 6×6 → 6×6 → 2×2: S = 4
    assert [(layer.fan_in, layer.fan_out) for layer in limit.layers] == [(18, 1), (9, 1), (4, 1), (1, 1)]
    # particles: channel j's first outgoing weight is at row j·k² of a conv layer's
    # matrix, j·S of the layer after a flatten head, j of a dense layer
    from mfdsl.plan.conv import outgoing_row

    assert outgoing_row(finite.conv, 3, 1, 2) == 2 * 9
    assert outgoing_row(finite.conv, 3, 2, 2) == 2 * 4
    assert outgoing_row(finite.conv, 3, 3, 2) == 2


# --------------------------------------------------------------------------- convergence


def loglog_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS slope of log y on log x, and its standard error."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    a = np.vstack([lx, np.ones_like(lx)]).T
    coef, *_ = np.linalg.lstsq(a, ly, rcond=None)
    resid = ly - a @ coef
    se = math.sqrt(float(resid @ resid) / max(1, len(lx) - 2) / float(((lx - lx.mean()) ** 2).sum()))
    return float(coef[0]), se


#: specs/cnn_synthetic.mf shrunk: 64 training images, full batch, to t = 4
CONVERGENCE_OVERRIDES = [
    "data.train=64",
    "data.test=64",
    "train.batch=64",
    "train.steps=40",
]


def test_finite_cnns_approach_the_infinite_channel_limit_at_the_mean_field_rate() -> None:
    """P1 for convolutions: sup_t |train_loss_n(t) − train_loss_∞(t)|, averaged over 8
    seeds, falls with the channel count n = 8 … 64 like n^-1/2 (Monte Carlo over
    channels; the fitted slope must lie in [−0.8, −0.3]; measured −0.44).  The limit is
    the jax solver with 512 particles at a seed no finite network uses, so its own error
    (≈ (n/512)^1/2 of width n's) is independent and small beside width 64's."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    from mfdsl_jax._cnn import solve_cnn
    from mfdsl_torch._cnn import train_cnn

    from mfdsl.plan.types import ObservablePlan

    spec = mfdsl.load(ROOT / "specs" / "cnn_synthetic.mf", overrides=CONVERGENCE_OVERRIDES)
    point = next(iter(mfdsl.expand(spec)))
    data = make_dataset(point.spec.data, 0)
    only_loss = (ObservablePlan(name="train_loss"),)

    def plan(width: float, seed: int, backend: str) -> RunPlan:
        p = compile_point(point.spec, {**point.coords, "width": width, "seed": seed}, backend)
        return dataclasses.replace(p, observables=only_loss)

    limit = solve_cnn(plan(math.inf, 100, "jax"), data, particles=512).records["train_loss"]
    assert limit[-1] < 0.9 * limit[0]  # the limit learns: the distance is about dynamics
    widths = [8, 16, 32, 64]
    dist = [
        np.mean(
            [
                np.max(np.abs(train_cnn(plan(n, s, "torch"), data).records["train_loss"] - limit))
                for s in range(8)
            ]
        )
        for n in widths
    ]
    slope, se = loglog_slope(np.array(widths), np.array(dist))
    assert -0.8 <= slope <= -0.3, (slope, se, dist)


def test_cifar10_spec_runs_on_fake_batches(tmp_path: Path) -> None:
    """specs/nguyen2019_cifar10.mf as shipped, shrunk by overrides, on tiny fake CIFAR-10
    batches (the real ones are not on CI): the data root is the only thing to give."""
    pytest.importorskip("torch")
    import xarray as xr
    from conftest import run_cli
    from test_datasets import write_cifar

    write_cifar(tmp_path / "cifar")
    store = tmp_path / "cifar.zarr"
    overrides = [
        f'data.root="{tmp_path / "cifar"}"',
        "data.train=40",
        "data.test=10",
        "train.steps=3",
        "train.batch=4",
        "sweep.width=[4, 8]",
        "sweep.seed=0",
    ]
    args: list[str | Path] = ["run", ROOT / "specs" / "nguyen2019_cifar10.mf", "-o", store, "--workers", "1"]
    result = run_cli(*args, *[a for o in overrides for a in ("--set", o)])
    assert result.code == 0, result.out + result.err
    with xr.open_zarr(store) as ds:
        assert (ds.status.values == 1).all()
        assert np.isfinite(ds.test_accuracy.values).all()
        assert np.isfinite(ds.neuron_spread.sel(layer=[1, 2, 3]).values).all()  # hidden layers


def test_a_cnn_spec_round_trips_through_yaml(tmp_path: Path) -> None:
    """``mfdsl show`` writes the conv layers as constructor calls that read back."""
    spec = mfdsl.parse(cnn_text(head="flatten", dense=2))
    path = tmp_path / "cnn.yaml"
    path.write_text(mfdsl.to_yaml(spec), encoding="utf-8")
    back = mfdsl.load(path)
    assert back.network == spec.network and back.data == spec.data


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (2, 2, 0), (3, 2, 2)])
def test_torch_conv_paths_agree(kernel: int, stride: int, padding: int) -> None:
    """The float64 CPU path (a strided view times the weight matrix) and the path float32
    and GPUs take (``F.conv2d`` with the matrix as an OIHW filter) compute the same sum,
    and both are ``F.unfold``'s (rows ordered channel, kernel row, kernel column)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from mfdsl_torch._cnn import _conv

    # deterministic, irregular numbers (no generator needed)
    a = torch.sin(torch.arange(3 * 2 * 7 * 6, dtype=torch.float64) * 1.7).reshape(3, 2, 7, 6)
    w = torch.cos(torch.arange(2 * kernel * kernel * 5, dtype=torch.float64) * 0.9).reshape(-1, 5)
    view = _conv(a, w, kernel, stride, padding)
    ho = (7 + 2 * padding - kernel) // stride + 1
    wo = (6 + 2 * padding - kernel) // stride + 1
    unfold = (F.unfold(a, kernel, padding=padding, stride=stride).transpose(1, 2) @ w).transpose(1, 2)
    np.testing.assert_allclose(view.numpy(), unfold.reshape(3, 5, ho, wo).numpy(), rtol=1e-12, atol=1e-12)
    conv2d = _conv(a.float(), w.float(), kernel, stride, padding)  # float32 takes F.conv2d
    np.testing.assert_allclose(conv2d.double().numpy(), view.numpy(), rtol=1e-4, atol=1e-4)


def test_cnn_scaling_table() -> None:
    """The conv analogues of the mlp's table (docs/language.md, "scaling"): fan_in is
    C_in k² for a conv layer; mean_field averages over channels (1/n) with learning-rate
    multipliers n, n², n; ntk multiplies by 1/√fan_in; standard and mup scale the init."""
    n = 8

    def layers(scaling: str) -> list[tuple[int, float, float, float]]:
        text = cnn_text(width=n).replace("backends torch, jax", f"scaling {scaling}\nbackends torch")
        finite, _ = cnn_plans(text)
        return [(ly.fan_in, ly.forward_mult, ly.lr_mult, ly.init.b) for ly in finite.layers]

    # 2 conv layers (C = 2 channels in, k = 3), a dense layer, the output; init stds 0.5, 1, 1, 1
    assert layers("mean_field") == [
        (18, 1.0, n, 0.5),
        (72, 1 / n, n * n, 1.0),
        (n, 1 / n, n * n, 1.0),
        (n, 1 / n, n, 1.0),
    ]
    ntk = layers("ntk")
    assert [m for _, m, _, _ in ntk] == pytest.approx([18**-0.5, 72**-0.5, n**-0.5, n**-0.5])
    assert all(r == 1.0 for _, _, r, _ in ntk)
    standard = layers("standard")
    assert [s for _, _, _, s in standard] == pytest.approx([0.5 / 18**0.5, 72**-0.5, n**-0.5, n**-0.5])
    mup = layers("mup")
    assert [r for _, _, r, _ in mup] == pytest.approx([n, 1.0, 1.0, 1 / n])
    assert mup[-1][3] == pytest.approx(1 / n)


def test_torch_cnn_langevin_noise_is_seeded() -> None:
    """Langevin noise on a cnn (torch only) comes from the stream NOISE: the same seed
    gives the same run, and the noise moves the weights beyond plain SGD's."""
    pytest.importorskip("torch")
    from mfdsl_torch._cnn import train_cnn

    noisy, _ = cnn_plans(cnn_text(optimizer="langevin(lr = 0.1, temperature = 0.01)", steps=3))
    plain, _ = cnn_plans(cnn_text(optimizer="sgd(lr = 0.1)", steps=3))
    data = make_dataset(noisy.data, noisy.seed)
    a, b, c = train_cnn(noisy, data), train_cnn(noisy, data), train_cnn(plain, data)
    np.testing.assert_array_equal(a.records["weight_change"], b.records["weight_change"])
    assert np.all(a.records["weight_change"][-1] != c.records["weight_change"][-1])


@pytest.mark.parametrize(
    "kw",
    [
        dict(optimizer="sgd(lr = 0.3, momentum = 0.5, weight_decay = 0.01)", extra="  freeze = [1]"),
        dict(head="flatten", dense=0, act="relu", bias=False, loss="logistic", train="online", batch=4),
    ],
    ids=["momentum-decay-frozen", "flatten-online"],
)
def test_torch_cnn_ensemble_members_match_training_alone(kw: dict[str, object]) -> None:
    """Seeds trained together (stacked parameters, one vmapped gradient pass) get what
    each gets alone, to float64 rounding."""
    pytest.importorskip("torch")
    from mfdsl_torch._cnn import train_cnn, train_cnn_ensemble

    plans = [cnn_plans(cnn_text(seed=s, steps=4, every=2, **kw))[0] for s in (0, 1, 2)]  # type: ignore[arg-type]
    datasets = [make_dataset(p.data, p.seed) for p in plans]
    together = train_cnn_ensemble(plans, datasets)
    for plan, data, got in zip(plans, datasets, together, strict=True):
        alone = train_cnn(plan, data)
        assert got.status == alone.status == "done" and got.steps_done == alone.steps_done == 4
        for name, values in alone.records.items():
            assert rel_err(got.records[name], values) < 1e-10, name
    a, b = together[0].records["train_loss"], together[1].records["train_loss"]
    assert not np.allclose(a, b)  # the members are different networks


def test_torch_backend_groups_a_cnns_seeds_and_runs_them_together() -> None:
    pytest.importorskip("torch")
    from mfdsl_torch import TorchBackend

    spec = mfdsl.parse(
        cnn_text(steps=2).replace("seed = [0]", "seed = [0, 1, 2]").replace("width = [6]", "width = [4, 6]")
    )
    plans = [compile_point(p.spec, dict(p.coords), "torch") for p in mfdsl.expand(spec)]
    backend = TorchBackend()
    groups = backend.group(plans, workers=1)
    assert sorted(sorted(plans[i].width for i in g) for g in groups) == [[4.0] * 3, [6.0] * 3]
    # two workers: each takes a share of a width's seeds
    assert max(len(g) for g in backend.group(plans, workers=2)) == 2
    group = next(g for g in groups if plans[g[0]].width == 6)
    results = backend.run_group([plans[i] for i in group])
    alone = backend.run(plans[group[1]])
    assert [r["status"] for r in results] == ["done"] * 3
    for name, values in alone["records"].items():
        assert rel_err(results[1]["records"][name], values) < 1e-10, name
