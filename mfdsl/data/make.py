"""Seeded data sources: the examples every run of a spec trains and tests on.

Every random draw comes from a stream of :mod:`mfdsl.core.streams` (numpy, PCG64, float64;
the keys and their numbers are in that module's table, the one place they are
written): ``TRAIN`` and ``TEST`` (generated examples, one key per block), ``EPOCH``
(one key per epoch), ``TEACHER``, and for image data ``TRAIN_SUBSET`` and
``TEST_SUBSET``.  The model's streams (initial weights, …) are numbered apart from
these, so no draw of the network ever repeats a draw of the data.

The ``TRAIN`` and ``TEST`` streams are endless sequences of examples cut into blocks of
:data:`BLOCK` examples (block ``i`` is the stream's index ``i``); example ``k`` depends
only on ``(seed, stream, k)``.  Inside a block the
draws are, in order: ``isotropic_gaussian`` — labels ``integers(0, 2, n)`` mapped to ±1,
then ``standard_normal((n, dim))`` scaled per example by ``1 + y·delta``; ``teacher`` —
``standard_normal((n, dim))`` inputs, then ``standard_normal(n)`` label noise (drawn even
when ``noise = 0``, so a noiseless and a noisy dataset share their inputs).

Online training (``train = online``): step ``s`` with batch ``B`` takes training
examples ``s·B … s·B + B - 1`` of the train stream.  Blocks count examples, not steps,
so the stream is the same for every batch size and the memory of a block does not grow
with the batch.

A finite training set (``train = N``) is the first ``N`` examples of the train stream
(so it is a prefix of what online training would see).  The training walk is the
concatenation of the epoch permutations: position ``p`` of the walk is example
``perm_e[p mod N]`` with ``e = p div N``, and step ``s`` takes positions
``s·B … s·B + B - 1``.  A batch may therefore straddle two epochs;
:meth:`Dataset.steps_for_epochs` is the fewest steps that show every example ``E``
times.

The test set is the first ``test`` examples of the test stream.  Nothing depends on
the network's width, so every width of a sweep sees the same data for the same seed.

Real images (``mnist``, ``fashion_mnist``, ``cifar10``; files read by
:mod:`mfdsl.data.images` from the local folder ``root``, ``~`` expanded, relative to the
current directory):

* **Classes.**  ``classes = [c_0, c_1, …]`` keeps the examples of those classes and
  relabels ``c_i`` as ``i``, in the order given.  Two classes make a binary task: ``c_0``
  is −1 and ``c_1`` is +1 (``classes = [0, 1]``: digit 0 → −1, digit 1 → +1; float64
  labels, one output).  More classes make a multiclass task: int64 labels 0 … K−1 and
  ``outputs = K``.
* **Subsets.**  Of the ``P`` training examples of those classes (file order), the
  training set is ``pool[perm[:train]]`` with ``perm`` the ``permutation(P)`` of the
  stream ``TRAIN_SUBSET``; the test set likewise from ``TEST_SUBSET`` over the test
  examples; ``all`` takes the whole permutation.  A smaller set is therefore a prefix
  of a larger one for the same seed, and every seed sees its own subsample.  The
  epoch walk over the training set is the one above (stream ``EPOCH``).
* **Pixels.**  Flattened (MNIST row-major 28 × 28 = 784; CIFAR-10 in its file order,
  the 1024 red, 1024 green, then 1024 blue values: 3072), divided by 255, then
  standardised *globally*: ``x ← (x − μ) / σ`` with the scalar mean and standard
  deviation of every pixel of every training-split image of the selected classes (all
  of them, not the seed's subsample, so the transform depends on neither the seed nor
  ``train``), and the same ``μ, σ`` for the test set.  One scalar rather than one per
  pixel: MNIST's border pixels are constant (σ = 0), and per-pixel statistics of a
  small subsample would blow up rare pixels; a global scale keeps the image as it is
  and makes the mean squared coordinate 1, like the Gaussian sources, so the same
  ``init`` laws (``normal(0, 1 / sqrt(dim))``) fit both.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from mfdsl.core import streams as _streams
from mfdsl.core.activations import piecewise_linear
from mfdsl.core.errors import DataError
from mfdsl.core.streams import Stream

#: examples per generator block (part of the data's definition: changing it changes data)
BLOCK = 1024

IMAGE_KINDS = ("mnist", "fashion_mnist", "cifar10")

# A key is three words of 32 bits (mfdsl.core.streams): a larger seed would spill into a
# second word and could collide with another key.
_MAX_SEED = _streams.WORD

# Enough to keep the block (or epoch) a step-by-step caller sits on, plus its neighbour.
_CACHE_SIZE = 2

Task = Literal["binary", "multiclass", "regression"]
_Draw = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _erf(z: np.ndarray) -> np.ndarray:
    # numpy has no erf and scipy is not a dependency; math.erf is exact to float64 and
    # the teacher is small, so an element-wise loop is cheap enough.
    return np.asarray(np.frompyfunc(math.erf, 1, 1)(z), dtype=np.float64)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)),  # no overflow for large |z|
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "erf": _erf,
    "identity": lambda z: z,
    "piecewise_linear": piecewise_linear,
}


class Dataset:
    """Training batches by step index and a fixed test set.

    ``task`` is ``"binary"`` (float64 labels ±1), ``"multiclass"`` (int64 labels
    0 … K−1) or ``"regression"`` (float64); ``outputs`` is the number of network outputs
    ``K`` (1 unless multiclass).  Inputs are float64; labels are ``(…,)`` arrays, one per
    example.  ``n_train`` is ``None`` for online data; for a finite training set
    ``train_x`` and ``train_y`` hold it (the empirical measure a limit computation
    averages over).

    A generated source passes ``draw`` (examples come from the seeded streams); a source
    read from files passes ``fixed = (train_x, train_y, test_x, test_y)`` instead, and
    its training set is walked in epochs exactly like a generated finite one.
    """

    def __init__(
        self,
        *,
        draw: _Draw | None = None,
        fixed: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
        seed: int,
        dim: int,
        task: Task,
        n_train: int | None,
        n_test: int,
        outputs: int = 1,
    ) -> None:
        if (draw is None) == (fixed is None):
            raise DataError(
                "a Dataset needs exactly one of draw (generated data) and fixed (arrays read from files)"
            )
        self._draw = draw
        self.seed = seed
        self.dim = dim
        self.task: Task = task
        self.outputs = outputs
        self.n_train = n_train
        self._blocks: OrderedDict[tuple[Stream, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self.train_x: np.ndarray | None = None
        self.train_y: np.ndarray | None = None
        if fixed is not None:
            self.train_x, self.train_y, self.test_x, self.test_y = fixed
            if n_train != self.train_x.shape[0] or n_test != self.test_x.shape[0]:
                raise DataError("the fixed arrays do not have n_train and n_test examples")
            return
        self.test_x, self.test_y = self._examples(Stream.TEST, 0, n_test)
        if n_train is not None:
            self.train_x, self.train_y = self._examples(Stream.TRAIN, 0, n_train)
        # Blocks drawn for the fixed sets are not revisited; keep the cache for steps.
        self._blocks.clear()

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    def train_chunk(self, start: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The minibatches of steps ``start … start + n - 1``: ``x`` of shape
        ``(n, batch, dim)`` and ``y`` of shape ``(n, batch)``.

        A step's batch depends only on the seed, the step and the batch size, never on
        how the steps are split into chunks.
        """
        if start < 0 or n < 0 or batch < 1:
            raise DataError(f"train_chunk needs start >= 0, n >= 0, batch >= 1 (got {start}, {n}, {batch})")
        first, count = start * batch, n * batch
        if self.train_x is None or self.train_y is None:
            x, y = self._examples(Stream.TRAIN, first, count)
        else:
            idx = self._walk(first, count)
            x, y = self.train_x[idx], self.train_y[idx]
        return x.reshape(n, batch, self.dim), y.reshape(n, batch)

    def steps_per_epoch(self, batch: int) -> int:
        """``ceil(n_train / batch)``: the steps of one epoch (``steps_for_epochs(1, batch)``)."""
        return self.steps_for_epochs(1, batch)

    def steps_for_epochs(self, epochs: int, batch: int) -> int:
        """``ceil(epochs · n_train / batch)``: the fewest steps in which the walk shows every
        training example ``epochs`` times (the last batch may reach into the next epoch).

        This, not ``epochs · steps_per_epoch``, is how ``epochs`` converts to steps: the
        walk concatenates epochs, so rounding once keeps a run from drifting up to
        ``epochs`` batches past its last epoch.
        """
        if self.n_train is None:
            raise DataError("online data has no epochs: give the training length in steps")
        if epochs < 0 or batch < 1:
            raise DataError(f"steps_for_epochs needs epochs >= 0 and batch >= 1 (got {epochs}, {batch})")
        return -(-epochs * self.n_train // batch)

    def _walk(self, first: int, count: int) -> np.ndarray:
        """Training-set indices at walk positions ``first … first + count - 1``."""
        assert self.n_train is not None
        size = self.n_train
        idx = np.empty(count, dtype=np.intp)
        pos = first
        while pos < first + count:
            epoch, offset = divmod(pos, size)
            take = min(size - offset, first + count - pos)
            idx[pos - first : pos - first + take] = self._permutation(epoch)[offset : offset + take]
            pos += take
        return idx

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            assert self.n_train is not None
            rng = _streams.rng(self.seed, Stream.EPOCH, epoch)
            perm = rng.permutation(self.n_train)
            _remember(self._perms, epoch, perm)
        return perm

    def _examples(self, stream: Stream, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``first … first + count - 1`` of a stream."""
        x = np.empty((count, self.dim), dtype=np.float64)
        y = np.empty(count, dtype=np.float64)
        pos = first
        while pos < first + count:
            block, offset = divmod(pos, BLOCK)
            take = min(BLOCK - offset, first + count - pos)
            bx, by = self._block(stream, block)
            x[pos - first : pos - first + take] = bx[offset : offset + take]
            y[pos - first : pos - first + take] = by[offset : offset + take]
            pos += take
        return x, y

    def _block(self, stream: Stream, block: int) -> tuple[np.ndarray, np.ndarray]:
        key = (stream, block)
        cached = self._blocks.get(key)
        if cached is None:
            assert self._draw is not None, "a dataset read from files has no streams to draw"
            cached = self._draw(_streams.rng(self.seed, stream, block), BLOCK)
            _remember(self._blocks, key, cached)
        return cached


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def make_dataset(data: Any, seed: int) -> Dataset:
    """The dataset a spec's ``data`` block describes, for one seed.

    ``data`` is an IR data node, read by attribute: ``kind`` and the fields of that kind.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise DataError(f"the data seed must be an integer in [0, 2**32) (got {seed!r})")
    seed = int(seed)
    kind = getattr(data, "kind", None)
    if kind == "isotropic_gaussian":
        return _isotropic_gaussian(data, seed)
    if kind == "teacher":
        return _teacher(data, seed)
    if kind in IMAGE_KINDS:
        return _images(data, seed)
    if kind == "textures":
        return _textures(data, seed)
    raise DataError(f"unknown data kind {kind!r}")


def _sizes(data: Any) -> tuple[int, int | None, int]:
    dim, train, test = data.dim, data.train, data.test
    if not _is_int(dim) or dim < 1:
        raise DataError(f"data dim must be a positive integer (got {dim!r})")
    if train == "online":
        n_train = None
    elif _is_int(train) and train >= 1:
        n_train = int(train)
    else:
        raise DataError(f"data train must be 'online' or a positive integer (got {train!r})")
    if not _is_int(test) or test < 0:
        raise DataError(f"data test must be a non-negative integer (got {test!r})")
    return int(dim), n_train, int(test)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _isotropic_gaussian(data: Any, seed: int) -> Dataset:
    dim, n_train, n_test = _sizes(data)
    delta = float(data.delta)
    if not 0.0 <= delta < 1.0:
        raise DataError(f"isotropic_gaussian delta must be in [0, 1) (got {delta})")

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = 2.0 * rng.integers(0, 2, size=n).astype(np.float64) - 1.0
        x = rng.standard_normal((n, dim)) * (1.0 + delta * y)[:, None]
        return x, y

    return Dataset(draw=draw, seed=seed, dim=dim, task="binary", n_train=n_train, n_test=n_test)


def _teacher(data: Any, seed: int) -> Dataset:
    dim, n_train, n_test = _sizes(data)
    noise = float(data.noise)
    if not noise >= 0.0:
        raise DataError(f"teacher noise must be >= 0 (got {noise})")
    teacher = teacher_network(data.teacher, dim, seed)

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, dim))
        eps = rng.standard_normal(n)
        return x, teacher(x) + noise * eps

    return Dataset(draw=draw, seed=seed, dim=dim, task="regression", n_train=n_train, n_test=n_test)


def _textures(data: Any, seed: int) -> Dataset:
    """Class-dependent Gaussian textures: ``channels × size × size`` images, flattened
    channel-major (the layout of CIFAR-10's files).  Inside a block the draws are, in
    order: labels ``integers(0, classes, n)``, phases ``uniform(0, 2π, (n, channels))``,
    noise ``standard_normal((n, channels, size, size))``; pixel ``(c, i, j)`` of an
    example of class ``k`` is ``√2 cos(2π f (i cos θ_k + j sin θ_k) / size + phase_c) +
    noise · ε`` with ``θ_k = π k / classes`` and ``f = frequency``: a grating whose
    orientation is the class, at a random position, so a translation-invariant feature
    (a convolution then average pooling) separates the classes.  Two classes give
    labels ±1 (class 0 → −1), more give integer labels 0 … K−1."""
    channels, size, classes = int(data.channels), int(data.size), int(data.classes)
    if channels < 1 or size < 1 or classes < 2:
        raise DataError(
            f"textures need channels ≥ 1, size ≥ 1, classes ≥ 2 (got {channels}, {size}, {classes})"
        )
    dim = channels * size * size
    _, n_train, n_test = _sizes(_Sized(dim=dim, train=data.train, test=data.test))
    freq, noise = float(data.frequency), float(data.noise)
    grid = np.arange(size, dtype=np.float64)
    angles = np.pi * np.arange(classes) / classes
    # (classes, size, size): the grating's phase at each pixel, before the random shift
    waves = (
        2.0
        * np.pi
        * freq
        / size
        * (
            grid[None, :, None] * np.cos(angles)[:, None, None]
            + grid[None, None, :] * np.sin(angles)[:, None, None]
        )
    )

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = rng.integers(0, classes, size=n)
        phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, channels))
        eps = rng.standard_normal((n, channels, size, size))
        x = math.sqrt(2.0) * np.cos(waves[k][:, None] + phase[:, :, None, None]) + noise * eps
        y = (2.0 * k - 1.0) if classes == 2 else k.astype(np.float64)
        return x.reshape(n, dim), y

    task: Task = "binary" if classes == 2 else "multiclass"
    dataset = Dataset(
        draw=draw,
        seed=seed,
        dim=dim,
        task=task,
        n_train=n_train,
        n_test=n_test,
        outputs=1 if classes == 2 else classes,
    )
    if classes > 2:
        # generated labels are float64 blocks; multiclass labels are integers
        dataset.test_y = dataset.test_y.astype(np.int64)
        if dataset.train_y is not None:
            dataset.train_y = dataset.train_y.astype(np.int64)
    return dataset


class _Sized:
    """The fields :func:`_sizes` reads, for a source whose ``dim`` is derived."""

    def __init__(self, *, dim: int, train: Any, test: Any) -> None:
        self.dim, self.train, self.test = dim, train, test


def teacher_network(spec: Any, dim: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """The noiseless teacher ``f: (n, dim) -> (n,)`` of a ``teacher`` data block.

    A mean-field mlp drawn from the stream ``TEACHER`` (:mod:`mfdsl.core.streams`) in this
    order: ``W_1`` of shape ``(dim, width)`` with N(0, 1/dim) entries, ``b_1`` (if
    ``bias``), then for each further hidden layer ``W_ℓ`` ``(width, width)`` and ``b_ℓ``,
    then the output weights ``(width,)`` and output bias; all N(0, 1) except ``W_1``.  Layers after the first
    average over the previous layer's neurons (divide by ``width``).
    """
    hidden, width, bias = spec.hidden, spec.width, bool(spec.bias)
    if not _is_int(hidden) or hidden < 1 or not _is_int(width) or width < 1:
        raise DataError(f"the teacher needs hidden >= 1 and width >= 1 (got {hidden!r}, {width!r})")
    act = _ACTIVATIONS.get(spec.activation)
    if act is None:
        raise DataError(f"unknown teacher activation {spec.activation!r} (one of {', '.join(_ACTIVATIONS)})")
    rng = _streams.rng(seed, Stream.TEACHER)
    weights: list[tuple[np.ndarray, np.ndarray]] = []
    for layer in range(hidden + 1):
        fan_in = dim if layer == 0 else width
        shape = (fan_in, width) if layer < hidden else (fan_in,)
        w = rng.standard_normal(shape) / (math.sqrt(dim) if layer == 0 else width)
        b = rng.standard_normal(shape[1:]) if bias else np.zeros(shape[1:])
        weights.append((w, b))

    def f(x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        for layer, (w, b) in enumerate(weights):
            h = (h if layer == 0 else act(h)) @ w + b
        return h

    return f


# ---- real images -------------------------------------------------------------------------

# (files read, classes) → (μ, σ) of the pixels in [0, 1]: cheap to recompute, but a
# sweep asks for the same few many times.
_STATS: OrderedDict[tuple[Any, ...], tuple[float, float]] = OrderedDict()
_STATS_SIZE = 8


def image_sizes(data: Any) -> tuple[int, int]:
    """``(n_train, n_test)`` of an image data block: what ``train`` and ``test`` resolve
    to for its classes (``all`` counts the examples of those classes).  Reads the label
    files only, so a caller can size a run (``epochs`` → steps) or check the files
    before a sweep starts."""
    from mfdsl.data.images import load_labels

    kind, classes = data.kind, _classes(data)
    train_labels, test_labels = load_labels(kind, str(data.root))
    pools = (int(np.isin(train_labels, classes).sum()), int(np.isin(test_labels, classes).sum()))
    return (
        _subset_size(data.train, pools[0], "train", kind, classes),
        _subset_size(data.test, pools[1], "test", kind, classes),
    )


def _classes(data: Any) -> tuple[int, ...]:
    classes = data.classes
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise DataError(f"{data.kind} classes must be a list of class numbers (got {classes!r})")
    out = tuple(classes)
    if len(out) < 2 or not all(_is_int(c) and 0 <= c <= 9 for c in out):
        raise DataError(f"{data.kind} classes must be at least two of 0 … 9 (got {list(out)})")
    if len(set(out)) != len(out):
        raise DataError(f"{data.kind} classes list a class twice: {list(out)}")
    return tuple(int(c) for c in out)


def _subset_size(size: Any, pool: int, split: str, kind: str, classes: tuple[int, ...]) -> int:
    if pool == 0:
        raise DataError(f"{kind} has no {split} images of classes {list(classes)}")
    if size == "all":
        return pool
    if not _is_int(size) or size < 1:
        raise DataError(f"{kind} {split} must be 'all' or a positive integer (got {size!r})")
    if size > pool:
        raise DataError(f"{kind} has only {pool} {split} images of classes {list(classes)}, asked for {size}")
    return int(size)


def _images(data: Any, seed: int) -> Dataset:
    from mfdsl.data.images import load_images

    kind, classes = data.kind, _classes(data)
    images = load_images(kind, str(data.root))
    pools = [
        np.flatnonzero(np.isin(images.train_y, classes)),
        np.flatnonzero(np.isin(images.test_y, classes)),
    ]
    n_train = _subset_size(data.train, pools[0].size, "train", kind, classes)
    n_test = _subset_size(data.test, pools[1].size, "test", kind, classes)
    mean, std = _pixel_stats(images.key, images.train_x, pools[0], classes)
    # Class c_i → i; uint8 labels index a table, so relabelling is one gather.
    relabel = np.full(256, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    binary = len(classes) == 2

    def subset(
        x: np.ndarray, y: np.ndarray, pool: np.ndarray, n: int, stream: Stream
    ) -> tuple[np.ndarray, np.ndarray]:
        chosen = pool[_streams.rng(seed, stream).permutation(pool.size)[:n]]
        # Standardise in pixel units, (p − 255μ) / (255σ), straight from uint8.
        xs = (x[chosen].astype(np.float64) - 255.0 * mean) / (255.0 * std)
        index = relabel[y[chosen]]
        ys = np.where(index == 0, -1.0, 1.0) if binary else index
        return xs, ys

    train_x, train_y = subset(images.train_x, images.train_y, pools[0], n_train, Stream.TRAIN_SUBSET)
    test_x, test_y = subset(images.test_x, images.test_y, pools[1], n_test, Stream.TEST_SUBSET)
    return Dataset(
        fixed=(train_x, train_y, test_x, test_y),
        seed=seed,
        dim=int(train_x.shape[1]),
        task="binary" if binary else "multiclass",
        n_train=n_train,
        n_test=n_test,
        outputs=1 if binary else len(classes),
    )


def _pixel_stats(
    key: Any, train_x: np.ndarray, pool: np.ndarray, classes: tuple[int, ...]
) -> tuple[float, float]:
    """Mean and standard deviation of the pixels (scaled to [0, 1]) of the training
    images ``pool``: exact, from a histogram of the 256 byte values."""
    cache_key = (key, tuple(sorted(classes)))
    stats = _STATS.get(cache_key)
    if stats is None:
        counts = np.bincount(train_x[pool].reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64) / 255.0
        total = counts.sum()
        mean = float(counts @ values / total)
        var = float(counts @ (values - mean) ** 2 / total)
        # Constant pixels (a blank test image) have no scale to divide by: centre only.
        stats = (mean, math.sqrt(var) if var > 0 else 1.0)
        _STATS[cache_key] = stats
        while len(_STATS) > _STATS_SIZE:
            _STATS.popitem(last=False)
    return stats
