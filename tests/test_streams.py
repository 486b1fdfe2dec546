"""The one table of random streams (``mfdsl.core.streams``): every draw a run makes comes
from it, no two uses share a generator, and the network's initial weights are
independent of the data they train on.

Layout 1 keyed generators with lists of mixed lengths — the initial weights
``[seed, 1]``, training block 0 ``[seed, 1, 0]`` — and numpy's ``SeedSequence`` pads
its entropy with zeros, so those were one generator: the initial ``W_1`` *was* the
first training inputs (teacher data: the same numbers, scaled).  The particle sample
``[seed, 2]`` was the test set's generator ``[seed, 2, 0]`` likewise.  The tests below
log every key a run requests and look for two uses with one state, and measure the
coupling of ``W_1`` with the training inputs directly; both are shown to detect
layout 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mfdsl.core import streams as _streams
from mfdsl.core.streams import CHECK_STREAMS, DATA_STREAMS, Stream
from mfdsl.data.make import make_dataset
from mfdsl.plan.types import DistPlan

ROOT = Path(__file__).resolve().parents[1]
Key = tuple[int, ...]


# --------------------------------------------------------------------------- helpers


def state(key: Iterable[int]) -> tuple[int, ...]:
    """What a generator seeded with ``key`` starts from."""
    return tuple(int(v) for v in np.random.SeedSequence(list(key)).generate_state(4))


def collisions(keys: Iterable[Key]) -> list[list[Key]]:
    """Groups of distinct keys that seed the same state."""
    by_state: dict[tuple[int, ...], list[Key]] = {}
    for k in sorted(set(keys)):
        by_state.setdefault(state(k), []).append(k)
    return [group for group in by_state.values() if len(group) > 1]


@pytest.fixture
def requested(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Key]]:
    """Every key requested from the table while the test runs, in order (every helper
    of ``mfdsl.core.streams`` goes through ``seed_sequence``)."""
    log: list[Key] = []
    real = _streams.seed_sequence

    def logged(seed: int, stream: Stream, index: int = 0) -> np.random.SeedSequence:
        log.append(_streams.key(seed, stream, index))
        return real(seed, stream, index)

    monkeypatch.setattr(_streams, "seed_sequence", logged)
    yield log


def streams_of(keys: Iterable[Key]) -> set[Stream]:
    return {Stream(k[1]) for k in keys}


# --------------------------------------------------------------------------- the table


def test_keys_are_three_words_and_the_streams_are_numbered_apart() -> None:
    assert _streams.STREAM_LAYOUT == 3
    assert _streams.key(7, Stream.INIT, 3) == (7, int(Stream.INIT), 3)
    assert _streams.key(7, Stream.TEACHER) == (7, int(Stream.TEACHER), 0)
    # stream 0 would be a bare default_rng(seed): [seed] pads to [seed, 0, 0]
    assert min(Stream) >= 1
    data = {int(s) for s in DATA_STREAMS}
    model = {int(s) for s in Stream} - data
    assert model and max(data) < min(model)
    for bad in (
        (-1, Stream.TRAIN, 0),
        (2**32, Stream.TRAIN, 0),
        (0, Stream.TRAIN, 2**32),
        (True, Stream.TRAIN, 0),
    ):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            _streams.key(*bad)
    with pytest.raises(ValueError):
        _streams.key(0, 99, 0)  # type: ignore[arg-type]


def test_the_helpers_are_the_streams_generators() -> None:
    seq = np.random.SeedSequence([5, int(Stream.NOISE), 2])
    assert (
        _streams.seed_sequence(5, Stream.NOISE, 2).generate_state(4).tolist()
        == seq.generate_state(4).tolist()
    )
    np.testing.assert_array_equal(
        _streams.rng(5, Stream.NOISE, 2).standard_normal(8), np.random.default_rng(seq).standard_normal(8)
    )
    assert _streams.torch_seed(5, Stream.NOISE, 2) == int(seq.generate_state(1, np.uint64)[0]) & (2**63 - 1)
    assert _streams.jax_seed(5, Stream.NOISE, 2) == int(seq.generate_state(1, np.uint32)[0])


def test_the_collision_check_catches_layout_1() -> None:
    """Layout 1's keys (two words for the model, three for the data) collide exactly
    where the model's stream number met a data stream's block 0."""
    seed = 3
    model = [(seed, 1), (seed, 2), (seed, 3), (seed, 5)]  # init, particles, noise, iid
    data = [(seed, s, i) for s in (1, 2, 3) for i in range(3)] + [(seed, 4, 0)]
    found = collisions(model + data)
    assert sorted(found) == [[(seed, 1), (seed, 1, 0)], [(seed, 2), (seed, 2, 0)], [(seed, 3), (seed, 3, 0)]]


def test_no_module_seeds_a_generator_outside_the_table() -> None:
    """Every generator of the package, the backends and the benchmarks comes from
    ``mfdsl.core.streams`` (tests may build their own stand-ins)."""
    direct = re.compile(
        r"default_rng\(|SeedSequence\(|RandomState\(|np\.random\.seed\(|PRNGKey\("
        r"|manual_seed\((?!_streams\.)|random\.key\((?!_streams\.)"
    )
    offenders = []
    for folder in ("mfdsl", "backends", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "mfdsl" / "core" / "streams.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if direct.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "seed generators through mfdsl.core.streams:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- real runs


@dataclass(frozen=True)
class FakeImages:
    """A stand-in for the IR's ``ImageData`` (make_dataset reads it by attribute)."""

    root: str
    kind: str = "mnist"
    classes: tuple[int, ...] = (0, 1)
    train: Any = 6  # of the 8 training and 4 test images of classes 0, 1
    test: Any = 3


def write_fake_mnist(folder: Path) -> None:
    """The four IDX files of a tiny MNIST (40 training and 20 test images)."""
    from mfdsl.data.images import IDX_FILES

    def idx(array: np.ndarray) -> bytes:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()

    pixels = np.arange(60 * 784, dtype=np.int64).reshape(60, 28, 28) * 7919 % 256
    labels = np.arange(60) % 10
    arrays = {
        "train_x": pixels[:40],
        "train_y": labels[:40],
        "test_x": pixels[40:],
        "test_y": labels[40:],
    }
    for part, name in IDX_FILES.items():
        (folder / name).write_bytes(idx(arrays[part]))


def test_every_stream_a_run_uses_has_its_own_generator(requested: list[Key], tmp_path: Path) -> None:
    """Small real runs of both backends on every data kind — Gaussian classes with a
    finite training set walked over three epochs, Langevin noise and biases; online
    teacher data over two blocks with the jax reductions (R1's i.i.d. sample); image
    subsamples — request every stream of the table but ``mfdsl check``'s, and no two
    distinct keys they request (nor a bare ``default_rng(seed)``, nor a check stream)
    start from one state."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from jax_helpers import plans, spec_text
    from mfdsl_jax._solver import solve
    from mfdsl_torch._single import train

    observables = "train_loss, test_loss, weight_change, particles(sample = 7)"
    gaussian = spec_text(
        hidden=2,
        bias=True,
        optimizer="langevin(lr = 0.05, temperature = 0.01)",
        data="isotropic_gaussian { dim = 4, delta = 0.5, train = 32, test = 64 }",
        batch=8,
        steps=10,  # 4 steps per epoch: the walk reaches epoch 2
        every=5,
        observables=observables,
        width=8,
        seed=3,
    )
    teacher = spec_text(
        hidden=3,
        data="teacher { dim = 4, teacher = mlp(hidden = 1, width = 8), noise = 0.1, train = online, test = 64 }",
        batch=8,
        steps=160,  # 1280 examples: training blocks 0 and 1
        every=80,
        observables=observables,
        width=8,
        seed=5,
    )
    by_run: dict[str, set[Stream]] = {}
    for name, text in (("gaussian", gaussian), ("teacher", teacher)):
        finite, limit = plans(text)
        start = len(requested)
        data = make_dataset(finite.data, finite.seed)
        assert train(finite, data).status == "done"
        middle = len(requested)
        got = solve(limit, make_dataset(limit.data, limit.seed), particles=16, data_samples=64)
        assert got.status == "done"
        torch_keys = requested[start:middle]
        by_run[f"{name} torch"] = streams_of(torch_keys)
        by_run[f"{name} jax"] = streams_of(requested[middle:])
        inits = {k[2] for k in torch_keys if k[1] == Stream.INIT}
        assert inits == set(range(1, finite.depth + 2)), (name, inits)  # one stream per weight layer
        blocks = {k[2] for k in torch_keys if k[1] == Stream.TRAIN}
        assert blocks == ({0} if name == "gaussian" else {0, 1}), (name, blocks)
    # images: a subsample of each split, walked over several epochs
    write_fake_mnist(tmp_path)
    start = len(requested)
    images = make_dataset(FakeImages(root=str(tmp_path)), seed=3)
    images.train_chunk(0, 6, 4)  # 24 walk positions over 6 examples: epochs 0 … 3
    by_run["images"] = streams_of(requested[start:])

    # an embedded init: the neurons' latent coordinates, one stream per hidden layer
    finite, _ = plans(
        spec_text(
            hidden=3,
            init="  layer 1 ~ embedded(mean = cos(2 * pi * u_out), std = 1)\n"
            "  layer 2..3 ~ embedded(mean = cos(2 * pi * (u_in - u_out)), std = 0.1)\n"
            "  layer 4 ~ embedded(mean = u_in)",
            width=8,
            seed=5,
        )
    )
    start = len(requested)
    finite.initial_weights()
    by_run["embedded init"] = streams_of(requested[start:])
    assert {k[2] for k in requested[start:] if k[1] == Stream.LATENT} == {1, 2, 3}
    assert by_run["embedded init"] == {Stream.INIT, Stream.LATENT}

    model = {Stream.INIT, Stream.PARTICLES, Stream.NOISE}
    assert by_run["gaussian torch"] == {Stream.TRAIN, Stream.TEST, Stream.EPOCH} | model
    assert by_run["gaussian jax"] >= {Stream.TRAIN, Stream.TEST, Stream.IID} | model
    assert by_run["teacher torch"] == {
        Stream.TEACHER,
        Stream.TRAIN,
        Stream.TEST,
        Stream.INIT,
        Stream.PARTICLES,
    }
    assert by_run["teacher jax"] >= {Stream.TEACHER, Stream.TRAIN, Stream.INIT, Stream.PARTICLES, Stream.IID}
    assert by_run["images"] == {Stream.TRAIN_SUBSET, Stream.TEST_SUBSET, Stream.EPOCH}
    assert set().union(*by_run.values()) == set(Stream) - CHECK_STREAMS, "a run stream is not exercised"
    assert {(k[0], k[2]) for k in requested if k[1] == Stream.EPOCH} == {(3, e) for e in range(4)}

    keys = set(requested)
    seeds = {seed for seed, _, _ in keys}
    bare = {(seed,) for seed in seeds}  # what default_rng(seed) would start from
    checks = {_streams.key(seed, stream) for seed in seeds for stream in CHECK_STREAMS}
    assert collisions(keys | bare | checks) == []


# --------------------------------------------------------------------------- W_1 vs data

#: a width and input dimension giving W_1 4096 entries, against the first 1024
#: training examples (8192 entries): layout 1's overlap is complete
WIDTH, DIM, EXAMPLES = 512, 8, 1024
#: the lagged correlations' z-scores: under independence each is ≈ N(0, 1), and the
#: largest of the ≈ 2·10⁴ lags checked exceeds 6 with probability ≈ 2·10⁴ · 2·10⁻⁹
Z_MAX = 6.0


def first_layer(kind: str, seed: int) -> tuple[Any, np.ndarray, np.ndarray, float]:
    """The plan of a spec on ``kind`` data, the torch network's initial W_1, and the
    standard normals behind the first training inputs (the inputs with the
    isotropic classes' scales 1 ± Δ divided out), and W_1's std."""
    torch = pytest.importorskip("torch")
    from jax_helpers import plans, spec_text
    from mfdsl_torch._single import Network

    data = {
        "teacher": f"teacher {{ dim = {DIM}, teacher = mlp(hidden = 1, width = 8), train = online, test = 4 }}",
        "isotropic_gaussian": f"isotropic_gaussian {{ dim = {DIM}, delta = 0.5, train = online, test = 4 }}",
    }[kind]
    sigma = 1 / math.sqrt(DIM)
    init = f"  layer 1 ~ normal(0, {sigma!r})\n  layer 2 ~ normal(0, 1)"
    finite, _ = plans(
        spec_text(data=data, init=init, batch=16, width=WIDTH, seed=seed, observables="train_loss")
    )
    w1 = Network(finite).W[0].to(torch.float64).numpy()
    x, y = make_dataset(finite.data, finite.seed).train_chunk(0, 1, EXAMPLES)
    z = x[0] if kind == "teacher" else x[0] / (1 + 0.5 * y[0])[:, None]
    return finite, w1, z, sigma


def lagged_z(a: np.ndarray, b: np.ndarray, min_overlap: int = 256) -> float:
    """The largest |z-score| of the correlation of the sequences ``a`` and ``b`` at any
    relative shift with at least ``min_overlap`` terms in common (``√overlap ·
    Σ a_i b_{i+k} / √(Σ a_i² Σ b_{i+k}²)``, ≈ N(0, 1) for independent centred
    sequences)."""
    a = (a - a.mean()) / a.std()
    b = (b - b.mean()) / b.std()
    size = 1 << (len(a) + len(b)).bit_length()
    cross = np.fft.irfft(np.fft.rfft(a[::-1], size) * np.fft.rfft(b, size), size)[: len(a) + len(b) - 1]
    # lag index j ↔ a[i] paired with b[i + j - (len(a) - 1)]; sums of squares per lag
    ones_a, ones_b = np.ones(len(a)), np.ones(len(b))
    overlap = np.round(np.convolve(ones_a, ones_b)).astype(np.int64)
    a2 = np.concatenate([[0.0], np.cumsum((a**2)[::-1])])
    b2 = np.concatenate([[0.0], np.cumsum(b**2)])
    z = []
    for j in np.flatnonzero(overlap >= min_overlap):
        shift = j - (len(a) - 1)
        lo_a, hi_a = max(0, -shift), min(len(a), len(b) - shift)
        lo_b, hi_b = lo_a + shift, hi_a + shift
        sa = a2[len(a) - lo_a] - a2[len(a) - hi_a]
        sb = b2[hi_b] - b2[lo_b]
        z.append(abs(cross[j]) / math.sqrt(sa * sb) * math.sqrt(overlap[j]))
    return float(max(z))


def shared_values(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> int:
    """How many entries of ``a`` equal an entry of ``b`` to ``rtol`` (independent
    continuous draws: a false match among the 3·10⁷ pairs here has probability ≈ 10⁻⁵)."""
    b = np.sort(b)
    i = np.searchsorted(b, a)
    near = np.minimum(np.abs(a - b[np.clip(i - 1, 0, len(b) - 1)]), np.abs(a - b[np.clip(i, 0, len(b) - 1)]))
    return int(np.sum(near <= rtol * np.abs(a)))


def coupling(w1: np.ndarray, z: np.ndarray, sigma: float) -> tuple[float, int]:
    """(largest lagged |z-score| between W_1's entries, in either order, and the normals
    behind the training inputs; how many of W_1's standardised entries are among them)."""
    normals = z.ravel()
    zmax = max(lagged_z(w1.ravel(), normals), lagged_z(w1.ravel(order="F"), normals))
    return zmax, shared_values(w1.ravel() / sigma, normals)


@pytest.mark.parametrize("kind", ["teacher", "isotropic_gaussian"])
@pytest.mark.parametrize("seed", [0, 1])
def test_initial_w1_is_independent_of_the_training_inputs(kind: str, seed: int) -> None:
    _, w1, z, sigma = first_layer(kind, seed)
    zmax, shared = coupling(w1, z, sigma)
    assert zmax < Z_MAX, zmax
    assert shared == 0


@pytest.mark.parametrize("kind", ["teacher", "isotropic_gaussian"])
def test_the_independence_checks_catch_layout_1(kind: str) -> None:
    """W_1 drawn as layout 1 drew it (``default_rng([seed, 1])``, which is the training
    stream's block 0, still ``[seed, 1, 0]``): the checks above fail by far.  On teacher
    data W_1 is the inputs scaled (z ≈ 64 = √4096 at lag 0); on Gaussian classes, where
    the labels are drawn first, the normals behind the inputs are W_1's shifted (z ≈ 60,
    ≈ 3600 values shared)."""
    finite, _, z, sigma = first_layer(kind, 0)
    layer = finite.layers[0]
    old = DistPlan(kind="normal", a=0.0, b=sigma).sample(
        np.random.default_rng([finite.seed, 1]), (layer.fan_in, layer.fan_out)
    )
    zmax, shared = coupling(old, z, sigma)
    assert zmax > math.sqrt(old.size) / 2 > Z_MAX
    assert shared > old.size // 2


def test_each_layer_has_its_own_stream() -> None:
    """A layer's initial weights depend on its own law and shape only: a wider second
    layer leaves the first and last layers' draws alone where their shapes agree."""
    from mfdsl.plan.types import initial_weights

    laws = [DistPlan(kind="normal", a=0.0, b=1.0)] * 3
    a = initial_weights(4, laws, [(3, 5), (5, 5), (5, 1)])
    b = initial_weights(4, [*laws[:1], DistPlan(kind="constant", a=0.5), laws[2]], [(3, 5), (5, 5), (5, 1)])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert np.all(b[1] == 0.5)
    c = initial_weights(4, laws, [(3, 5), (5, 9), (9, 1)])
    np.testing.assert_array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="laws"):
        initial_weights(4, laws, [(3, 5)])
