"""Readers for the real image datasets, from local files: mfdsl downloads nothing.

=============== ================================================================
kind            files under ``root``
=============== ================================================================
mnist,          the four IDX files ``train-images-idx3-ubyte``,
fashion_mnist   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
                ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not
cifar10         the python version: ``data_batch_1`` … ``data_batch_5`` and
                ``test_batch``, in ``root`` or in ``root/cifar-10-batches-py``
=============== ================================================================

For MNIST-like data the files are also looked for in ``root/raw`` and
``root/MNIST/raw`` (``root/FashionMNIST/raw``), where torchvision keeps them, and the
names with a dot (``train-images.idx3-ubyte``, as some mirrors spell them) are accepted.

Everything here returns raw pixels: ``uint8`` images flattened to ``(N, D)`` rows (row
major for MNIST, 28 × 28; CIFAR-10 keeps its own order, the 1024 red, then green, then
blue values of a 32 × 32 image) and ``uint8`` labels 0 … 9.  Class selection, subsampling
and standardisation are the data source's business (:mod:`mfdsl._data`).

Parsed files are cached per process, keyed on ``(path, mtime, size)``: a sweep builds the
same dataset for every run a worker does, and a file that changes is read again.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._data import DataError

KINDS = ("mnist", "fashion_mnist", "cifar10")

#: where each dataset is usually obtained (named in every "missing file" error)
SOURCES = {
    "mnist": "MNIST: http://yann.lecun.com/exdb/mnist/ (or any mirror of the four IDX files)",
    "fashion_mnist": "Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
    "cifar10": "CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar.html (the python version, cifar-10-python.tar.gz)",
}

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_FOLDER = "cifar-10-batches-py"

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
_IDX_UBYTE = 0x08
_IMAGE_SHAPES = {"mnist": (28, 28), "fashion_mnist": (28, 28)}
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR_DIM = 3 * 32 * 32
_CLASSES = 10

# A sweep builds the same dataset for run after run; a process rarely needs more than
# one, and each costs its raw bytes (MNIST ~55 MB, CIFAR-10 ~185 MB).
_CACHE_DATASETS = 4
# Label files alone, for sizing runs before a sweep: tiny.
_CACHE_FILES = 16


@dataclass(frozen=True, eq=False)
class Images:
    """One dataset's raw arrays: ``uint8`` images ``(N, D)`` and ``uint8`` labels ``(N,)``.

    ``key`` identifies the files read (paths, modification times, sizes), so anything
    derived from the arrays can be cached on it.
    """

    kind: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    key: tuple[tuple[str, int, int], ...]


def load_images(kind: str, root: str) -> Images:
    """The train and test images and labels of ``kind`` under ``root`` (``~`` expanded).

    Raises :class:`~mfdsl._data.DataError` naming the files expected, the folder searched
    and where the dataset is obtained when a file is missing, and what is wrong with a
    file that is truncated or not in the expected format.
    """
    if kind not in KINDS:
        raise DataError(f"no reader for data kind {kind!r} (one of {', '.join(KINDS)})")
    folder = _folder(kind, root)
    if kind == "cifar10":
        paths = _cifar_paths(folder)
    else:
        paths = [_find_idx(kind, folder, part) for part in IDX_FILES]
    return _images_cached(kind, tuple(_stamp(path) for path in paths))


@functools.lru_cache(maxsize=_CACHE_DATASETS)
def _images_cached(kind: str, key: tuple[tuple[str, int, int], ...]) -> Images:
    # Keyed on every file's (path, mtime, size): a rewritten file is read again.
    paths = [path for path, _, _ in key]
    images = _cifar10(paths, key) if kind == "cifar10" else _idx_dataset(kind, paths, key)
    for array in (images.train_x, images.train_y, images.test_x, images.test_y):
        array.flags.writeable = False  # shared by every dataset built in this process
    return images


def load_labels(kind: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """The train and test labels alone (for MNIST-like data, without reading the images)."""
    if kind == "cifar10":
        images = load_images(kind, root)
        return images.train_y, images.test_y
    if kind not in KINDS:
        raise DataError(f"no reader for data kind {kind!r} (one of {', '.join(KINDS)})")
    folder = _folder(kind, root)
    train, test = (_read_idx(kind, _find_idx(kind, folder, part), part) for part in ("train_y", "test_y"))
    return train, test


# ---- locating the files ------------------------------------------------------------------


def _folder(kind: str, root: str) -> str:
    expanded = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(expanded):
        raise DataError(
            f"{kind}: the data folder {_show(root, expanded)} does not exist. {_expected(kind)} "
            f"{_obtain(kind)}"
        )
    return expanded


def _show(root: str, expanded: str) -> str:
    return f"'{root}'" if str(root) == expanded else f"'{root}' ({expanded})"


def _expected(kind: str) -> str:
    if kind == "cifar10":
        return (
            f"Expected the CIFAR-10 python batches {', '.join(CIFAR_TRAIN)} and {CIFAR_TEST}, in that "
            f"folder or in its subfolder {CIFAR_FOLDER}."
        )
    names = ", ".join(IDX_FILES.values())
    return f"Expected the four IDX files {names} (each gzipped, .gz, or not)."


def _obtain(kind: str) -> str:
    return (
        f"Get them from {SOURCES[kind]}; mfdsl downloads nothing: set data.root to the folder holding them."
    )


def _idx_dirs(kind: str, folder: str) -> list[str]:
    # torchvision's layout (root/MNIST/raw) is common enough to find without being told.
    return [folder, os.path.join(folder, "raw"), os.path.join(folder, _TORCHVISION_FOLDERS[kind], "raw")]


def _find_idx(kind: str, folder: str, part: str) -> str:
    name = IDX_FILES[part]
    dotted = name.replace("-idx", ".idx", 1)
    dirs = _idx_dirs(kind, folder)
    for directory in dirs:
        # The uncompressed file first: it is the faster one to read.
        for candidate in (name, f"{name}.gz", dotted, f"{dotted}.gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    also = ", ".join(os.path.relpath(d, folder) for d in dirs[1:])
    raise DataError(
        f"{kind}: no {name} (nor {name}.gz) in {folder} (also looked in {also}). {_expected(kind)} "
        f"{_obtain(kind)}"
    )


def _cifar_dir(folder: str) -> str:
    for directory in (folder, os.path.join(folder, CIFAR_FOLDER)):
        if os.path.isfile(os.path.join(directory, CIFAR_TEST)) or os.path.isfile(
            os.path.join(directory, CIFAR_TRAIN[0])
        ):
            return directory
    return folder


def _stamp(path: str) -> tuple[str, int, int]:
    info = os.stat(path)
    return path, info.st_mtime_ns, info.st_size


# ---- IDX ---------------------------------------------------------------------------------


def _read_idx(kind: str, path: str, part: str) -> np.ndarray:
    images = part.endswith("_x")
    # Labels are cached per file (image_sizes reads them alone, before a sweep); images
    # only as part of the whole dataset, so evicting a dataset frees them.
    array = parse_idx(_read_bytes(path), 3, path) if images else _parse_idx_cached(*_stamp(path), 1)
    if images:
        shape = _IMAGE_SHAPES[kind]
        if array.shape[1:] != shape:
            raise DataError(
                f"{kind}: {path} holds images of {array.shape[1]}×{array.shape[2]} pixels, "
                f"expected {shape[0]}×{shape[1]}"
            )
        return array.reshape(array.shape[0], -1)
    if array.size and int(array.max()) >= _CLASSES:
        raise DataError(f"{kind}: {path} has label {int(array.max())}; labels must be 0 … {_CLASSES - 1}")
    return array


@functools.lru_cache(maxsize=_CACHE_FILES)
def _parse_idx_cached(path: str, mtime_ns: int, size: int, rank: int) -> np.ndarray:
    # mtime_ns and size are part of the cache key only: a rewritten file is read again.
    array = parse_idx(_read_bytes(path), rank, path)
    array.flags.writeable = False  # shared by every caller in this process
    return array


def parse_idx(raw: bytes, rank: int, path: str = "<bytes>") -> np.ndarray:
    """The ``uint8`` array of an IDX file's bytes (already gunzipped) of the given rank
    (1 for labels, 3 for images).  A wrong magic number, a truncated or an overlong file
    is a :class:`~mfdsl._data.DataError`."""
    what = "label" if rank == 1 else "image"
    magic = f"0x0000080{rank}"
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path} is not an IDX {what} file: only {len(raw)} bytes, shorter than its header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != rank:
        found = "0x" + raw[:4].hex()
        raise DataError(
            f"{path} is not an IDX {what} file: magic number {found}, expected {magic} "
            f"(unsigned bytes, rank {rank}); is it the right file, or still compressed?"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(raw) - header
    if body < expected:
        raise DataError(
            f"{path} is truncated: its header announces {'×'.join(map(str, shape))} = {expected} bytes "
            f"of data, the file has {body}"
        )
    if body > expected:
        raise DataError(
            f"{path} is corrupt: its header announces {expected} bytes of data, the file has {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(shape)


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        with open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises BadGzipFile (an OSError) for a wrong header, EOFError when cut short.
        raise DataError(
            f"cannot read {path}: {error or type(error).__name__} (a damaged or truncated download?)"
        ) from None


def _idx_dataset(kind: str, paths: list[str], key: tuple[tuple[str, int, int], ...]) -> Images:
    where = dict(zip(IDX_FILES, paths, strict=True))
    parts = {part: _read_idx(kind, path, part) for part, path in where.items()}
    for split in ("train", "test"):
        x, y = parts[f"{split}_x"], parts[f"{split}_y"]
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{kind}: the {split} files disagree: {x.shape[0]} images but {y.shape[0]} labels "
                f"({where[f'{split}_x']}, {where[f'{split}_y']})"
            )
    return Images(kind=kind, key=key, **parts)


# ---- CIFAR-10 ----------------------------------------------------------------------------


def _cifar_paths(folder: str) -> list[str]:
    directory = _cifar_dir(folder)
    paths = []
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise DataError(
                f"cifar10: no {name} in {folder}"
                + (f" (nor in {os.path.join(folder, CIFAR_FOLDER)})" if directory == folder else "")
                + f". {_expected('cifar10')} {_obtain('cifar10')}"
            )
        paths.append(path)
    return paths


def _cifar10(paths: list[str], key: tuple[tuple[str, int, int], ...]) -> Images:
    batches = [parse_cifar_batch(path) for path in paths]
    return Images(
        kind="cifar10",
        train_x=np.concatenate([b[0] for b in batches[:-1]]),
        train_y=np.concatenate([b[1] for b in batches[:-1]]),
        test_x=batches[-1][0],
        test_y=batches[-1][1],
        key=key,
    )


def parse_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3072)`` and labels ``(N,)``, both ``uint8``, of one CIFAR-10 python
    batch: a pickled dict with ``b"data"`` and ``b"labels"``.

    Only numpy arrays and plain Python values are unpickled (see :class:`_BatchUnpickler`):
    a file that names anything else is refused, not run.
    """
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch: cannot unpickle it ({type(error).__name__}: {error}); "
            "a truncated download?"
        ) from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels', got {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.ndim != 2 or data.shape[1] != _CIFAR_DIM or data.dtype != np.uint8:
        raise DataError(
            f"{path}: b'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, {_CIFAR_DIM})"
        )
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: b'labels' has shape {labels.shape} ({labels.dtype}), expected {data.shape[0]} integers"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= _CLASSES):
        raise DataError(
            f"{path}: labels must be 0 … {_CLASSES - 1}, found {int(labels.min())} … {int(labels.max())}"
        )
    return np.ascontiguousarray(data), labels.astype(np.uint8)


def _numpy_global(module: str, name: str) -> Callable[..., Any]:
    # numpy 2 moved numpy.core to numpy._core; importing the old name warns.  Old pickles
    # (CIFAR-10's are from Python 2) name numpy.core, new ones numpy._core.
    for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            found: Callable[..., Any] = getattr(importlib.import_module(candidate), name)
            return found
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot find {module}.{name}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtins only.

    A pickle can run any code when loaded; a CIFAR-10 batch needs nothing but the few
    functions numpy uses to rebuild an array, so everything else is refused.
    """

    _NUMPY = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return getattr(np, name) if module == "numpy" else _numpy_global(module, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 spells bytes
            return super().find_class(module, name)
        raise DataError(
            f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only numpy arrays and lists"
        )


def clear_cache() -> None:
    """Forget every parsed file (tests; a long-lived process that wants its memory back)."""
    _images_cached.cache_clear()
    _parse_idx_cached.cache_clear()
