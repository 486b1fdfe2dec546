"""Real image data from local files: the IDX and CIFAR-10 readers, class selection,
subsampling, standardisation, the errors, and an end-to-end ``mfdsl run`` on fake files."""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mfdsl.core.errors import DataError
from mfdsl.data import images as _datasets
from mfdsl.data.images import load_images, parse_idx
from mfdsl.data.make import image_sizes, make_dataset

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 60, 30


@dataclass(frozen=True)
class Images:
    """A stand-in for the IR's ``ImageData`` (make_dataset reads it by attribute)."""

    root: str
    kind: str = "mnist"
    classes: tuple[int, ...] = (0, 1)
    train: Any = "all"
    test: Any = "all"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    # Files in different tmp_paths never share a cache key, but a test that rewrites
    # a file in place should not depend on the file system's mtime resolution.
    _datasets.clear_cache()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x0000080<rank>, big-endian dimensions, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_split(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10  # every class present, 1/10 of the examples each
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(n, *shape)).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_mnist(
    folder: Path, *, gz: bool = True, seed: int = 0, dotted: bool = False
) -> dict[str, np.ndarray]:
    """The four IDX files of a tiny MNIST; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = fake_split(rng, N_TRAIN, (28, 28))
    test_x, test_y = fake_split(rng, N_TEST, (28, 28))
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    for part, name in _datasets.IDX_FILES.items():
        if dotted:
            name = name.replace("-idx", ".idx")
        raw = idx_bytes(arrays[part])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def write_cifar(folder: Path, *, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """``cifar-10-batches-py`` with five training batches and a test batch, pickled like
    the originals (protocol 2, bytes keys, ``data`` uint8 (N, 3072), ``labels`` a list)."""
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    xs, ys = [], []
    for name in [*_datasets.CIFAR_TRAIN, _datasets.CIFAR_TEST]:
        x, y = fake_split(rng, per_batch, (3072,))
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": x, b"filenames": []}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(x)
        ys.append(y)
    return {
        "train_x": np.concatenate(xs[:5]),
        "train_y": np.concatenate(ys[:5]),
        "test_x": xs[5],
        "test_y": ys[5],
    }


# ---- readers -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_idx_files_are_read_exactly(tmp_path: Path, gz: bool) -> None:
    written = write_mnist(tmp_path, gz=gz)
    images = load_images("mnist", str(tmp_path))
    assert images.train_x.shape == (N_TRAIN, 784) and images.train_x.dtype == np.uint8
    np.testing.assert_array_equal(images.train_x, written["train_x"].reshape(N_TRAIN, -1))
    np.testing.assert_array_equal(images.train_y, written["train_y"])
    np.testing.assert_array_equal(images.test_x, written["test_x"].reshape(N_TEST, -1))
    np.testing.assert_array_equal(images.test_y, written["test_y"])


@pytest.mark.parametrize("where", ["raw", "MNIST/raw", "dotted"])
def test_idx_files_in_torchvision_layouts(tmp_path: Path, where: str) -> None:
    folder = tmp_path if where == "dotted" else tmp_path / where
    written = write_mnist(folder, dotted=where == "dotted")
    np.testing.assert_array_equal(load_images("mnist", str(tmp_path)).test_y, written["test_y"])


def test_fashion_mnist_reads_the_same_format(tmp_path: Path) -> None:
    written = write_mnist(tmp_path / "FashionMNIST" / "raw", seed=5)
    np.testing.assert_array_equal(load_images("fashion_mnist", str(tmp_path)).train_y, written["train_y"])


@pytest.mark.parametrize("nested", [True, False], ids=["parent", "batches-folder"])
def test_cifar_batches_are_read_exactly(tmp_path: Path, nested: bool) -> None:
    written = write_cifar(tmp_path)
    root = tmp_path if nested else tmp_path / "cifar-10-batches-py"
    images = load_images("cifar10", str(root))
    assert images.train_x.shape == (100, 3072) and images.test_x.shape == (20, 3072)
    for part in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(images, part), written[part])


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    written = write_mnist(tmp_path / "data" / "mnist")
    np.testing.assert_array_equal(load_images("mnist", "~/data/mnist").test_y, written["test_y"])


def test_parsed_files_are_cached_until_they_change(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    first = load_images("mnist", str(tmp_path))
    assert load_images("mnist", str(tmp_path)).train_x is first.train_x
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    stat = path.stat()
    new = np.full(N_TRAIN, 3, dtype=np.uint8)
    path.write_bytes(gzip.compress(idx_bytes(new)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(load_images("mnist", str(tmp_path)).train_y, new)


# ---- classes, subsets, standardisation ---------------------------------------------------


def _origin(x: np.ndarray, images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The original label of each standardised row of ``x`` (found by its pixels)."""
    pixels = np.rint((x * std + mean) * 255.0).astype(np.int64)
    index = {row.tobytes(): i for i, row in enumerate(images.astype(np.int64))}
    return np.array([labels[index[row.tobytes()]] for row in pixels])


def _stats(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...]) -> tuple[float, float]:
    pixels = images[np.isin(labels, classes)].astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def test_two_classes_are_a_binary_task_first_class_minus_one(tmp_path: Path) -> None:
    written = write_mnist(tmp_path)
    ds = make_dataset(Images(root=str(tmp_path), classes=(7, 3)), seed=0)
    assert ds.task == "binary" and ds.outputs == 1 and ds.dim == 784
    assert ds.n_train == N_TRAIN // 5 and ds.n_test == N_TEST // 5  # 1/10 of each split per class
    assert ds.train_x is not None and ds.train_y is not None
    assert ds.train_y.dtype == np.float64 and set(ds.train_y) == {-1.0, 1.0}
    mean, std = _stats(written["train_x"].reshape(N_TRAIN, -1), written["train_y"], (7, 3))
    origin = _origin(ds.train_x, written["train_x"].reshape(N_TRAIN, -1), written["train_y"], mean, std)
    np.testing.assert_array_equal(np.where(origin == 7, -1.0, 1.0), ds.train_y)
    origin = _origin(ds.test_x, written["test_x"].reshape(N_TEST, -1), written["test_y"], mean, std)
    np.testing.assert_array_equal(np.where(origin == 7, -1.0, 1.0), ds.test_y)


def test_more_classes_are_relabelled_in_the_order_given(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    classes = (9, 2, 4)
    ds = make_dataset(Images(root=str(tmp_path), kind="cifar10", classes=classes), seed=1)
    assert ds.task == "multiclass" and ds.outputs == 3 and ds.dim == 3072
    assert ds.test_y.dtype == np.int64 and set(ds.test_y) == {0, 1, 2}
    mean, std = _stats(written["train_x"], written["train_y"], classes)
    origin = _origin(ds.test_x, written["test_x"], written["test_y"], mean, std)
    np.testing.assert_array_equal(np.array(classes)[ds.test_y], origin)
    x, y = ds.train_chunk(0, 2, 5)
    assert x.shape == (2, 5, 3072) and y.shape == (2, 5) and y.dtype == np.int64


def test_subsamples_are_seeded_prefixes_without_replacement(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    data = Images(root=str(tmp_path), classes=(0, 1, 2, 3, 4))  # 30 train, 15 test images
    full = make_dataset(data, seed=4)
    again = make_dataset(data, seed=4)
    other = make_dataset(data, seed=5)
    small = make_dataset(Images(root=str(tmp_path), classes=data.classes, train=10, test=4), seed=4)
    assert full.train_x is not None and again.train_x is not None and other.train_x is not None
    np.testing.assert_array_equal(full.train_x, again.train_x)
    np.testing.assert_array_equal(full.test_x, again.test_x)
    assert not np.array_equal(full.train_x, other.train_x)
    # the same examples, another order: "all" is every example of the classes
    assert sorted(map(bytes, full.train_x)) == sorted(map(bytes, other.train_x))
    assert len(set(map(bytes, full.train_x))) == 30 and len(set(map(bytes, full.test_x))) == 15
    # a smaller set is a prefix of a larger one for the same seed
    assert small.n_train == 10 and small.n_test == 4
    np.testing.assert_array_equal(small.train_x, full.train_x[:10])
    np.testing.assert_array_equal(small.test_y, full.test_y[:4])


def test_standardisation_is_global_from_the_training_images(tmp_path: Path) -> None:
    written = write_mnist(tmp_path)
    classes = (1, 2, 3)
    data = Images(root=str(tmp_path), classes=classes)
    ds = make_dataset(data, seed=0)
    assert ds.train_x is not None
    # the whole training pool: mean 0 and variance 1 over all its pixels
    assert abs(ds.train_x.mean()) < 1e-12 and abs(ds.train_x.std() - 1.0) < 1e-12
    # the test set uses the training statistics, not its own
    mean, std = _stats(written["train_x"].reshape(N_TRAIN, -1), written["train_y"], classes)
    test = written["test_x"].reshape(N_TEST, -1)[np.isin(written["test_y"], classes)] / 255.0
    np.testing.assert_allclose(np.sort(ds.test_x.ravel()), np.sort(((test - mean) / std).ravel()), atol=1e-12)
    # ... and a subsample the same statistics as the whole pool
    sub = make_dataset(Images(root=str(tmp_path), classes=classes, train=5), seed=3)
    np.testing.assert_array_equal(np.sort(sub.test_x.ravel()), np.sort(ds.test_x.ravel()))


def test_training_set_is_walked_in_epochs(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    ds = make_dataset(Images(root=str(tmp_path), classes=(5, 6), train=11), seed=2)
    assert ds.train_x is not None and ds.steps_for_epochs(3, 4) == 9
    x, _ = ds.train_chunk(0, 11, 3)  # exactly three epochs of 11
    rows = [bytes(r) for r in x.reshape(33, -1)]
    for epoch in range(3):
        assert sorted(rows[11 * epoch : 11 * epoch + 11]) == sorted(map(bytes, ds.train_x))
    x2, _ = ds.train_chunk(4, 2, 3)
    np.testing.assert_array_equal(x2, x[4:6])


def test_image_sizes_count_the_selected_classes(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    assert image_sizes(Images(root=str(tmp_path), classes=(0, 1, 2))) == (18, 9)
    assert image_sizes(Images(root=str(tmp_path), classes=(0, 1), train=7, test=2)) == (7, 2)


# ---- errors ------------------------------------------------------------------------------


def test_missing_folder_names_it_and_the_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        make_dataset(Images(root=str(tmp_path / "nowhere")), 0)
    message = str(info.value)
    assert "nowhere" in message and "does not exist" in message
    assert "train-images-idx3-ubyte" in message and "http://yann.lecun.com/exdb/mnist/" in message


def test_missing_file_names_the_files_the_folder_and_the_source(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        make_dataset(Images(root=str(tmp_path)), 0)
    message = str(info.value)
    assert f"no t10k-labels-idx1-ubyte (nor t10k-labels-idx1-ubyte.gz) in {tmp_path}" in message
    for name in _datasets.IDX_FILES.values():
        assert name in message
    assert "mfdsl downloads nothing" in message and "yann.lecun.com" in message
    with pytest.raises(DataError, match="fashion-mnist"):
        load_images("fashion_mnist", str(tmp_path))


def test_missing_cifar_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        load_images("cifar10", str(tmp_path))
    message = str(info.value)
    assert "no data_batch_3 in" in message and "test_batch" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "python version" in message


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda raw: raw[:-5],
            "is truncated: its header announces 60×28×28 = 47040 bytes of data, the file has 47035",
        ),
        (lambda raw: raw + b"\0", "is corrupt: its header announces 47040 bytes"),
        (lambda raw: b"\0\0\x08\x01" + raw[4:], "magic number 0x00000801, expected 0x00000803"),
        (lambda raw: b"\x1f\x8b" + raw[2:], "magic number 0x1f8b0803"),
        (lambda raw: raw[:10], "only 10 bytes, shorter than its header"),
    ],
    ids=["truncated", "overlong", "labels-for-images", "wrong-magic", "header"],
)
def test_corrupt_idx_files(tmp_path: Path, damage: Any, match: str) -> None:
    written = write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(written["train_x"])))
    with pytest.raises(DataError, match=match) as info:
        make_dataset(Images(root=str(tmp_path)), 0)
    assert str(path) in str(info.value)


def test_damaged_gzip_files(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte.gz is truncated: its gzip stream ends early"
    ):
        load_images("mnist", str(tmp_path))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read .*train-labels-idx1-ubyte\.gz"):
        load_images("mnist", str(tmp_path))


def test_damaged_files_say_how_to_fix_them(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(_datasets.DamagedData) as info:
        load_images("mnist", str(tmp_path))
    error = info.value
    assert "t10k-images-idx3-ubyte.gz" in error.problem
    assert error.fix.startswith("Replace the file with a fresh download — MNIST: http://yann.lecun.com")
    assert str(error) == f"{error.problem}. {error.fix}"


def test_inconsistent_idx_files(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
    with pytest.raises(DataError, match="the test files disagree: 30 images but 7 labels"):
        load_images("mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(30, 12, np.uint8))))
    with pytest.raises(DataError, match="has label 12"):
        load_images("mnist", str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((30, 32, 32), np.uint8)))
    )
    with pytest.raises(DataError, match="images of 32×32 pixels, expected 28×28"):
        load_images("mnist", str(tmp_path))


def test_corrupt_cifar_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 python batch: cannot unpickle"):
        load_images("cifar10", str(tmp_path))
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(
        DataError, match=r"b'data' is uint8 of shape \(3, 100\), expected uint8 of shape \(N, 3072\)"
    ):
        load_images("cifar10", str(tmp_path))
    path.write_bytes(pickle.dumps({b"images": 1}))
    with pytest.raises(DataError, match="expected a dict with b'data' and b'labels'"):
        load_images("cifar10", str(tmp_path))


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def test_cifar_pickles_may_hold_nothing_but_arrays(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_images("cifar10", str(tmp_path))


def test_a_modern_pickle_is_read_too(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": written["test_x"], b"labels": written["test_y"]}, protocol=5))
    np.testing.assert_array_equal(load_images("cifar10", str(tmp_path)).test_x, written["test_x"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"train": 13}, r"mnist has only 12 train images of classes \[0, 1\], asked for 13"),
        ({"test": 7}, r"only 6 test images"),
        ({"classes": (1, 1)}, "list a class twice"),
        ({"classes": (1,)}, "at least two"),
        ({"classes": (1, 10)}, "at least two of 0 … 9"),
        ({"train": 0}, "must be 'all' or a positive integer"),
    ],
)
def test_bad_requests(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    write_mnist(tmp_path)
    fields = {"root": str(tmp_path), **change}
    with pytest.raises(DataError, match=match):
        make_dataset(Images(**fields), 0)


def test_parse_idx_reads_labels() -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels), 1), labels)


# ---- checked before a sweep, without reading the images ------------------------------------


def _no_images_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if an IDX image file is read whole (labels, rank 1, may be)."""
    read = _datasets.read_idx

    def labels_only(path: str, rank: int) -> np.ndarray:
        assert rank == 1, f"{path}: images read whole"
        return read(path, rank)

    monkeypatch.setattr(_datasets, "read_idx", labels_only)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_load_labels_checks_the_image_files_without_reading_them(
    tmp_path: Path, gz: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_mnist(tmp_path, gz=gz)
    _no_images_parsed(monkeypatch)
    train, test = _datasets.load_labels("mnist", str(tmp_path))
    np.testing.assert_array_equal(train, written["train_y"])
    np.testing.assert_array_equal(test, written["test_y"])
    assert _datasets._images_cached.cache_info().currsize == 0


def _rewrite(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda x: idx_bytes(x)[:-100],
            r"is truncated: its header announces 30×28×28 = 23520 bytes of data, the file has 23420",
        ),
        (lambda x: idx_bytes(x[:7]), r"the test files disagree: 7 images but 30 labels"),
        (lambda x: idx_bytes(np.zeros((30, 32, 32), np.uint8)), r"images of 32×32 pixels, expected 28×28"),
        (lambda x: idx_bytes(x)[:12], r"only 12 bytes, shorter than its header"),
        (lambda x: idx_bytes(x.reshape(-1)), r"magic number 0x00000801, expected 0x00000803"),
    ],
    ids=["truncated", "count", "size", "header", "magic"],
)
def test_damaged_image_files_are_found_before_a_sweep(
    tmp_path: Path, gz: bool, damage: Any, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_mnist(tmp_path, gz=gz)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    _rewrite(path, damage(written["test_x"]))
    _no_images_parsed(monkeypatch)
    with pytest.raises(_datasets.DamagedData, match=match) as info:
        _datasets.load_labels("mnist", str(tmp_path))
    assert str(path) in info.value.problem and "fresh download" in info.value.fix


def test_an_overlong_gzipped_file_is_read_no_further_than_one_byte_past_its_size(tmp_path: Path) -> None:
    written = write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # a megabyte of zeros past the announced 60 images: compressed, a kilobyte
    path.write_bytes(gzip.compress(idx_bytes(written["train_x"]) + bytes(1 << 20)))
    with pytest.raises(
        _datasets.DamagedData,
        match=r"is corrupt: its header announces 47040 bytes of data, the file has more than 47040",
    ):
        _datasets.load_labels("mnist", str(tmp_path))


def test_a_cut_gzip_stream_of_images_is_found(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        _datasets.DamagedData, match=r"train-images-idx3-ubyte.gz is truncated: its gzip stream ends early"
    ):
        _datasets.load_labels("mnist", str(tmp_path))


def test_missing_files_are_missing_not_damaged(tmp_path: Path) -> None:
    with pytest.raises(_datasets.MissingData, match="does not exist"):
        _datasets.load_labels("mnist", str(tmp_path / "nowhere"))
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(_datasets.MissingData, match="no t10k-images-idx3-ubyte"):
        _datasets.load_labels("mnist", str(tmp_path))
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(_datasets.MissingData, match="no test_batch"):
        _datasets.load_labels("cifar10", str(tmp_path / "c"))


def test_cifar_labels_are_checked_a_batch_at_a_time(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    train, test = _datasets.load_labels("cifar10", str(tmp_path))
    np.testing.assert_array_equal(train, written["train_y"])
    np.testing.assert_array_equal(test, written["test_y"])
    assert _datasets._images_cached.cache_info().currsize == 0  # no dataset kept
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(_datasets.DamagedData, match="data_batch_4 is not a CIFAR-10 python batch") as info:
        _datasets.load_labels("cifar10", str(tmp_path))
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in info.value.fix


# ---- end to end --------------------------------------------------------------------------

TINY = """
experiment tiny_mnist
data mnist {
  root    = "/nowhere"
  classes = [2, 0, 1]
  train   = 16
  test    = all
}
network mlp { hidden = 1, activation = relu }
train {
  optimizer = sgd(lr = 0.05)
  loss      = cross_entropy
  batch     = 4
  epochs    = 2
}
record every 2 { train_loss, test_loss, test_accuracy }
sweep { width = [4, 8], seed = [0, 1] }
backends torch
"""


def _run(args: list[str]) -> int:
    from mfdsl.cli import main

    return main(args)


def test_mfdsl_run_on_fake_mnist(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import xarray as xr

    root = tmp_path / "my data"  # a space: the value is a quoted string
    write_mnist(root)
    spec = tmp_path / "tiny.mf"
    spec.write_text(TINY, encoding="utf-8")
    store = tmp_path / "s.zarr"
    code = _run(["run", str(spec), "-o", str(store), "--workers", "1", "--set", f'data.root="{root}"'])
    assert code == 0
    with xr.open_zarr(store) as ds:
        assert (ds.status.values == 1).all()
        assert ds.step.values[-1] == 8  # 2 epochs of 16 examples in batches of 4
        acc = ds.test_accuracy.values
        assert np.isfinite(acc).all() and ((acc >= 0) & (acc <= 1)).all()


def test_regimes_spec_runs_on_fake_mnist(tmp_path: Path) -> None:
    """specs/regimes.mf as shipped, shrunk by overrides, on fake files."""
    pytest.importorskip("torch")
    import xarray as xr

    write_mnist(tmp_path / "mnist")
    store = tmp_path / "regimes.zarr"
    overrides = [
        f'data.root="{tmp_path / "mnist"}"',
        "data.train=10",
        "data.test=5",
        "train.steps=6",
        "train.batch=2",
        "sweep.width=[3]",
        "sweep.seed=[0]",
    ]
    args = ["run", str(ROOT / "specs" / "regimes.mf"), "-o", str(store), "--workers", "1"]
    assert _run(args + [a for o in overrides for a in ("--set", o)]) == 0
    with xr.open_zarr(store) as ds:
        assert (ds.status.values == 1).all() and ds.status.size == 4  # 4 scalings
        assert np.isfinite(ds.train_loss.values).all()


# ---- checked once, before a sweep starts ---------------------------------------------------


def _tiny_spec(tmp_path: Path, root: Path, **changes: str) -> Path:
    text = TINY.replace('"/nowhere"', f'"{root}"')
    for old, new in changes.items():
        text = text.replace(old, new)
    spec = tmp_path / "tiny.mf"
    spec.write_text(text, encoding="utf-8")
    return spec


def test_missing_files_stop_run_before_any_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mfdsl run`` reads the label files once, up front: missing files are one error
    (exit 2) naming the files and where to get them, and no store is made."""
    import mfdsl
    from mfdsl.plan.check import check_data

    spec = _tiny_spec(tmp_path, tmp_path / "none")
    with pytest.raises(mfdsl.SpecError) as info:
        check_data(mfdsl.load(spec))
    error = info.value
    assert "does not exist" in error.message and (error.line, error.column) == (4, 13), str(error)
    assert "train-labels-idx1-ubyte" in str(error.hint) and "yann.lecun.com" in str(error.hint)
    capsys.readouterr()
    store = tmp_path / "s.zarr"
    assert _run(["run", str(spec), "-o", str(store), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("does not exist") == 1 and "train-images-idx3-ubyte" in err
    assert not store.exists()
    # `mfdsl check` only warns: the spec is fine, the files may be on the machine that runs it
    assert _run(["check", str(spec)]) == 0
    assert "warning: mnist: the data folder" in capsys.readouterr().err


def test_subsets_larger_than_the_files_are_caught_up_front(tmp_path: Path) -> None:
    import mfdsl
    from mfdsl.plan.check import check_data

    write_mnist(tmp_path / "mnist")
    spec = _tiny_spec(tmp_path, tmp_path / "mnist", **{"train   = 16": "train   = 40"})
    with pytest.raises(
        mfdsl.SpecError, match=r"only 18 train images of classes \[2, 0, 1\], asked for 40"
    ) as info:
        check_data(mfdsl.load(spec))
    assert (info.value.line, info.value.column) == (6, 13)
    # test = all: the 9 test images of those classes (the spec alone allows 10000)
    spec = _tiny_spec(tmp_path, tmp_path / "mnist", **{"train_loss,": "output(probes = 20), train_loss,"})
    with pytest.raises(
        mfdsl.SpecError, match=r"20 probe inputs, but the test set .* has only 9 points"
    ) as info:
        check_data(mfdsl.load(spec))
    assert (info.value.line, info.value.column) == (16, 34)


def test_epochs_over_all_of_a_class_subset_count_its_examples(tmp_path: Path) -> None:
    """``train = all`` with ``classes`` is every training image of those classes, not
    the full split: ``epochs`` converts to steps over that count."""
    import mfdsl
    from mfdsl.plan.compile import total_steps, train_size

    write_mnist(tmp_path / "mnist")
    spec = _tiny_spec(tmp_path, tmp_path / "mnist", **{"train   = 16": "train   = all"})
    point = next(mfdsl.expand(mfdsl.load(spec)))
    assert train_size(point.spec.data) == 18 == image_sizes(point.spec.data)[0]  # 3 classes of 60 / 10 each
    assert total_steps(point.spec) == 9  # ⌈2 epochs · 18 / batch 4⌉, not ⌈2 · 60000 / 4⌉


@pytest.mark.parametrize("command", ["check", "run"])
def test_damaged_files_stop_check_and_run_before_anything_is_made(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated image file fails ``mfdsl check`` (exit 2, the file, what is wrong,
    the fix, where the spec names the folder) as it does ``mfdsl run``, which creates
    nothing."""
    written = write_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(written["train_x"])[:-784])  # the last image cut off
    spec = _tiny_spec(tmp_path, tmp_path / "mnist")
    store = tmp_path / "out" / "s.zarr"
    args = [command, str(spec)] + (["-o", str(store), "--workers", "1"] if command == "run" else [])
    assert _run(args) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # rich wraps long lines
    assert f"{spec}:4:13: error: {path} is truncated" in err
    assert "the file has 46256" in err and "hint: Replace the file with a fresh download" in err
    assert "Traceback" not in captured.err and "is valid" not in captured.out
    assert not (tmp_path / "out").exists()


def test_check_stops_on_what_present_files_cannot_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files that are there but hold fewer images than asked for: an error at check
    time too (only missing files are a warning)."""
    write_mnist(tmp_path / "mnist")
    spec = _tiny_spec(tmp_path, tmp_path / "mnist", **{"train   = 16": "train   = 40"})
    assert _run(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "6:13: error: mnist has only 18 train images of classes [2, 0, 1], asked for 40" in err
    assert "warning" not in err


def test_intact_files_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mnist(tmp_path / "mnist")
    spec = _tiny_spec(tmp_path, tmp_path / "mnist")
    assert _run(["check", str(spec)]) == 0
    captured = capsys.readouterr()
    assert "is valid" in captured.out and "steps" in captured.out and captured.err == ""
