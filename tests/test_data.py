"""Seeded data sources: shapes, determinism, and the laws they sample."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfdsl.core import streams as _streams
from mfdsl.core.errors import DataError
from mfdsl.core.streams import Stream
from mfdsl.data.make import BLOCK, Dataset, make_dataset, teacher_network


# Stand-ins for the IR's data nodes: make_dataset reads them by attribute only.
@dataclass(frozen=True)
class Gaussians:
    dim: int = 5
    delta: float = 0.5
    train: Any = "online"
    test: int = 100
    kind: str = "isotropic_gaussian"


@dataclass(frozen=True)
class TeacherNet:
    hidden: int = 1
    width: int = 4
    activation: str = "tanh"
    bias: bool = False


@dataclass(frozen=True)
class Teacher:
    dim: int = 6
    noise: float = 0.1
    train: Any = "online"
    test: int = 100
    teacher: TeacherNet = TeacherNet()
    kind: str = "teacher"


@dataclass(frozen=True)
class Real:
    kind: str = "mnist"
    root: str = "/nonexistent/mfdsl-data"
    classes: tuple[int, ...] = (0, 1)
    train: Any = "all"
    test: Any = "all"


SOURCES = {
    "gauss-online": Gaussians(),
    "gauss-finite": Gaussians(train=37),
    "teacher-online": Teacher(),
    "teacher-finite": Teacher(train=29, teacher=TeacherNet(hidden=2, activation="relu", bias=True)),
}


@pytest.fixture(params=list(SOURCES), ids=list(SOURCES))
def data(request: pytest.FixtureRequest) -> Any:
    return SOURCES[request.param]


def test_shapes_and_dtypes(data: Any) -> None:
    ds = make_dataset(data, seed=3)
    assert isinstance(ds, Dataset)
    assert ds.dim == data.dim and ds.outputs == 1
    assert ds.task == ("binary" if data.kind == "isotropic_gaussian" else "regression")
    assert ds.n_train == (None if data.train == "online" else data.train)
    assert ds.test_x.shape == (data.test, data.dim) and ds.test_x.dtype == np.float64
    assert ds.test_y.shape == (data.test,) and ds.test_y.dtype == np.float64
    x, y = ds.train_chunk(5, 7, 4)
    assert x.shape == (7, 4, data.dim) and x.dtype == np.float64
    assert y.shape == (7, 4) and y.dtype == np.float64
    x, y = ds.train_chunk(0, 0, 4)
    assert x.shape == (0, 4, data.dim) and y.shape == (0, 4)


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(list(SOURCES)),
    start=st.integers(0, 600),
    cuts=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    batch=st.integers(1, 9),
)
def test_batches_depend_on_the_step_only(name: str, start: int, cuts: list[int], batch: int) -> None:
    data = SOURCES[name]
    total = sum(cuts)
    whole_x, whole_y = make_dataset(data, seed=1).train_chunk(start, total, batch)
    # A fresh dataset, so no cache carries over from the whole-range call.
    ds = make_dataset(data, seed=1)
    parts, s = [], start
    for n in cuts:
        parts.append(ds.train_chunk(s, n, batch))
        s += n
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_y)


def test_out_of_order_access_is_consistent(data: Any) -> None:
    ds = make_dataset(data, seed=2)
    late = ds.train_chunk(3 * BLOCK, 2, 3)
    early = ds.train_chunk(1, 2, 3)
    assert all(np.array_equal(a, b) for a, b in zip(late, ds.train_chunk(3 * BLOCK, 2, 3), strict=True))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(early, make_dataset(data, seed=2).train_chunk(1, 2, 3), strict=True)
    )


def test_online_stream_is_the_same_for_every_batch_size() -> None:
    ds = make_dataset(Gaussians(), seed=0)
    x8, y8 = ds.train_chunk(0, 300, 8)
    x3, y3 = ds.train_chunk(0, 800, 3)
    np.testing.assert_array_equal(x8.reshape(-1, 5), x3.reshape(-1, 5))
    np.testing.assert_array_equal(y8.ravel(), y3.ravel())


def test_same_seed_same_data_other_seed_other_data(data: Any) -> None:
    a, b, c = make_dataset(data, 7), make_dataset(data, 7), make_dataset(data, 8)
    for one, two in [
        (a.test_x, b.test_x),
        (a.test_y, b.test_y),
        *zip(a.train_chunk(0, 5, 4), b.train_chunk(0, 5, 4), strict=True),
    ]:
        np.testing.assert_array_equal(one, two)
    assert not np.array_equal(a.test_x, c.test_x)
    assert not np.array_equal(a.train_chunk(0, 5, 4)[0], c.train_chunk(0, 5, 4)[0])


def test_test_set_is_its_own_stream(data: Any) -> None:
    ds = make_dataset(data, seed=4)
    x, _ = ds.train_chunk(0, 1, data.test)
    assert not np.any(np.all(np.isclose(ds.test_x[:, None, :], x[0][None, :, :]), axis=-1))
    # The test set does not change with the training regime.
    other = make_dataset(replace(data, train=11 if data.train == "online" else "online"), seed=4)
    np.testing.assert_array_equal(other.test_x, ds.test_x)
    np.testing.assert_array_equal(other.test_y, ds.test_y)


def test_finite_training_set_is_a_prefix_of_the_online_stream() -> None:
    online = make_dataset(Gaussians(), seed=5)
    finite = make_dataset(Gaussians(train=40), seed=5)
    assert finite.train_x is not None and finite.train_y is not None and online.train_x is None
    x, y = online.train_chunk(0, 40, 1)
    np.testing.assert_array_equal(finite.train_x, x[:, 0])
    np.testing.assert_array_equal(finite.train_y, y[:, 0])


def test_isotropic_gaussian_law() -> None:
    delta, dim, n = 0.4, 4, 40_000
    ds = make_dataset(Gaussians(dim=dim, delta=delta), seed=0)
    x, y = ds.train_chunk(0, n, 1)
    x, y = x[:, 0], y[:, 0]
    assert set(np.unique(y)) == {-1.0, 1.0}
    # y = ±1 fair coin: the mean has standard error 1/sqrt(n).
    assert abs(y.mean()) < 5 / math.sqrt(n)
    for label in (-1.0, 1.0):
        z = x[y == label].ravel()
        var = (1 + label * delta) ** 2
        m = z.size
        assert abs(z.mean()) < 5 * math.sqrt(var / m)
        # The sample variance of m Gaussian draws has standard error var * sqrt(2 / (m - 1)).
        assert abs(z.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (m - 1))


def test_epoch_walk_shows_each_example_once_per_epoch() -> None:
    n_train, batch, epochs = 50, 7, 3
    ds = make_dataset(Gaussians(train=n_train), seed=9)
    steps = ds.steps_for_epochs(epochs, batch)
    assert steps == math.ceil(epochs * n_train / batch) == 22
    assert ds.steps_per_epoch(batch) == 8
    x, y = ds.train_chunk(0, steps, batch)
    assert ds.train_x is not None and ds.train_y is not None
    row_of = {row.tobytes(): i for i, row in enumerate(ds.train_x)}
    assert len(row_of) == n_train
    walk = np.array([row_of[row.tobytes()] for row in x.reshape(-1, ds.dim)])
    np.testing.assert_array_equal(y.ravel(), ds.train_y[walk])
    orders = [walk[e * n_train : (e + 1) * n_train] for e in range(epochs)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n_train))
    assert not np.array_equal(orders[0], orders[1])
    # The last batch straddles into epoch 4, which starts a fresh permutation.
    assert len(walk) - epochs * n_train == steps * batch - epochs * n_train < batch


def test_online_data_has_no_epochs() -> None:
    with pytest.raises(DataError, match="online"):
        make_dataset(Gaussians(), 0).steps_per_epoch(4)


def test_teacher_noise_level() -> None:
    noise, n = 0.3, 20_000
    clean = make_dataset(Teacher(noise=0.0), seed=2)
    noisy = make_dataset(Teacher(noise=noise), seed=2)
    xc, yc = clean.train_chunk(0, n, 1)
    xn, yn = noisy.train_chunk(0, n, 1)
    # Noise is drawn after the inputs, so the two share inputs and teacher.
    np.testing.assert_array_equal(xc, xn)
    eps = (yn - yc).ravel()
    assert abs(eps.mean()) < 5 * noise / math.sqrt(n)
    # The sample std of n Gaussian draws has standard error about sigma / sqrt(2 n).
    assert abs(eps.std(ddof=1) - noise) < 5 * noise / math.sqrt(2 * n)
    assert yc.std() > 0.0


def test_teacher_is_a_mean_field_mlp() -> None:
    dim, width, seed = 3, 5, 11
    f = teacher_network(TeacherNet(hidden=1, width=width, activation="identity"), dim, seed)
    rng = _streams.rng(seed, Stream.TEACHER)
    w1 = rng.standard_normal((dim, width)) / math.sqrt(dim)
    w2 = rng.standard_normal(width) / width
    x = np.random.default_rng(0).standard_normal((8, dim))
    np.testing.assert_allclose(f(x), x @ w1 @ w2, rtol=1e-12)


@pytest.mark.parametrize(
    "activation", ["relu", "tanh", "sigmoid", "gelu", "erf", "identity", "piecewise_linear"]
)
def test_teacher_activations(activation: str) -> None:
    ds = make_dataset(Teacher(teacher=TeacherNet(hidden=3, width=6, activation=activation, bias=True)), 0)
    assert np.all(np.isfinite(ds.test_y)) and ds.test_y.std() > 0


def test_activation_formulas() -> None:
    from mfdsl.data.make import _ACTIVATIONS

    z = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(_ACTIVATIONS["erf"](z), [math.erf(v) for v in z], rtol=0, atol=0)
    np.testing.assert_allclose(_ACTIVATIONS["sigmoid"](z), 1 / (1 + np.exp(-z)), rtol=1e-14)
    gelu = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z]
    np.testing.assert_allclose(_ACTIVATIONS["gelu"](z), gelu, rtol=1e-15)
    # Mei–Montanari–Nguyen's σ: −2.5 up to 0.5, 7.5 from 1.5, linear in between
    pl = [-2.5 if v <= 0.5 else 7.5 if v >= 1.5 else -2.5 + 10 * (v - 0.5) for v in z]
    np.testing.assert_allclose(_ACTIVATIONS["piecewise_linear"](z), pl, rtol=1e-15, atol=1e-15)
    assert _ACTIVATIONS["piecewise_linear"](np.array([0.5, 1.0, 1.5])).tolist() == [-2.5, 2.5, 7.5]


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist", "cifar10"])
def test_real_data_without_its_files_is_a_data_error(kind: str) -> None:
    # The readers themselves are tested in test_datasets.py.
    with pytest.raises(DataError, match=f"{kind}: the data folder .* does not exist"):
        make_dataset(Real(kind=kind), 0)


@pytest.mark.parametrize(
    ("data", "seed", "match"),
    [
        (Real(kind="svhn"), 0, "unknown data kind"),
        (Gaussians(delta=1.0), 0, "delta"),
        (Gaussians(train=0), 0, "train"),
        (Gaussians(train="offline"), 0, "train"),
        (Gaussians(dim=0), 0, "dim"),
        (Teacher(noise=-1.0), 0, "noise"),
        (Teacher(teacher=TeacherNet(activation="swish")), 0, "activation"),
        (Gaussians(), -1, "seed"),
        (Gaussians(), 2**32, "seed"),
    ],
)
def test_bad_data_is_a_data_error(data: Any, seed: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        make_dataset(data, seed)
