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
and standardisation are the data source's business (:mod:`mfdsl.data.make`).

Before a sweep (``mfdsl check``, and ``mfdsl run`` before it creates its store),
:func:`load_labels` checks every file of a dataset without keeping its images: an IDX
image file's header against its size and against its labels' count (a gzipped one is
decompressed as a stream, nothing kept), a CIFAR-10 batch by unpickling it alone.  A
file that is not there is a :class:`MissingData`; one that is there but unusable
(truncated, overlong, not the expected format, disagreeing with its partner) a
:class:`DamagedData`, which says what is wrong and how to fix it.

Reading is bounded by what a file can hold (:func:`read_idx`): an IDX file is read as a
stream into an array of the size its header announces, allocated only once the file's
size allows it (a plain file holds exactly that; a gzipped one at most 1032 times its
own size, deflate's limit) and it fits in this machine's memory, and reading stops one
byte past it — a gzip bomb, or a header claiming 10⁹ images, costs no more than that.
A CIFAR-10 batch is at most 64 MB, and its pickle may rebuild numpy arrays only from the
bytes it holds (never call ``numpy.ndarray`` with a shape of its choosing).

Parsed files are cached per process, keyed on ``(path, mtime, size)``: a sweep builds the
same dataset for every run a worker does, and a file that changes is read again.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from mfdsl.core.errors import DataError

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
# A gzipped IDX file is checked by decompressing it in chunks of this size.
_CHUNK = 1 << 20
# Deflate compresses at most ~1032 : 1, so a gzipped IDX file cannot hold more data than
# this many times its own size: a header announcing more is refused before anything is
# decompressed or allocated (a "gzip bomb" cannot claim room it does not have).
_GZIP_RATIO = 1032
# A CIFAR-10 python batch is 10 000 images, ~31 MB; a file much larger is not one.
_CIFAR_MAX_BYTES = 64 << 20


class MissingData(DataError):
    """The data folder, or one of the dataset's files, is not there."""


class DamagedData(DataError):
    """A data file that is there but cannot be used: ``problem`` says what is wrong
    with it (naming it), ``fix`` what to do; ``str()`` is both."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem.rstrip('.')}. {fix}")
        self.problem = problem
        self.fix = fix


def _refetch(kind: str) -> str:
    return f"Replace the file with a fresh download — {SOURCES[kind]}; mfdsl downloads nothing"


@contextlib.contextmanager
def _damaged(kind: str) -> Iterator[None]:
    """A :class:`DataError` about a file that is there becomes a :class:`DamagedData`
    with the fix."""
    try:
        yield
    except (MissingData, DamagedData):
        raise
    except DataError as error:
        raise DamagedData(str(error), _refetch(kind)) from None


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

    Raises :class:`~mfdsl.core.errors.DataError` naming the files expected, the folder searched
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
    with _damaged(kind):
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
    """The train and test labels, after checking every file of the dataset, as a
    sweep does before it starts (``mfdsl check``, ``mfdsl run``) — without keeping any
    image: an IDX image file's header is checked against the file's size and against
    the number of labels (a gzipped file is decompressed as a stream, counting its
    bytes, never held whole); a CIFAR-10 batch is unpickled alone and its images
    dropped.

    Raises :class:`MissingData` for a folder or file that is not there (all four IDX
    files, or all six batches, are looked for first), :class:`DamagedData` for one that
    is there but unusable.
    """
    if kind not in KINDS:
        raise DataError(f"no reader for data kind {kind!r} (one of {', '.join(KINDS)})")
    folder = _folder(kind, root)
    if kind == "cifar10":
        paths = _cifar_paths(folder)
        with _damaged(kind):
            batches = [_cifar_labels_cached(*_stamp(path)) for path in paths]
        return np.concatenate(batches[:-1]), batches[-1]
    where = {part: _find_idx(kind, folder, part) for part in IDX_FILES}
    out = []
    with _damaged(kind):
        for split in ("train", "test"):
            images, labels = where[f"{split}_x"], where[f"{split}_y"]
            y = _read_idx(kind, labels, f"{split}_y")
            n = _idx_image_count(kind, images)
            if n != y.shape[0]:
                raise DataError(
                    f"{kind}: the {split} files disagree: {n} images but {y.shape[0]} labels ({images}, {labels})"
                )
            out.append(y)
    return out[0], out[1]


# ---- locating the files ------------------------------------------------------------------


def _folder(kind: str, root: str) -> str:
    expanded = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(expanded):
        raise MissingData(
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
    raise MissingData(
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
    array = read_idx(path, 3) if images else _parse_idx_cached(*_stamp(path), 1)
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
    array = read_idx(path, rank)
    array.flags.writeable = False  # shared by every caller in this process
    return array


def read_idx(path: str, rank: int) -> np.ndarray:
    """The ``uint8`` array of an IDX file (gzipped or not) of the given rank, read as a
    stream into an array of the size its header announces — allocated only once that
    size is found possible: a plain file must hold exactly that many bytes, a gzipped
    one cannot hold more than :data:`_GZIP_RATIO` times its own size, and neither more
    than this machine's memory.  Reading stops one byte past the announced size, so a
    file that decompresses to more (a gzip bomb) costs no more than the header said.
    Problems as :func:`parse_idx`."""
    header = 4 + 4 * rank
    gz = path.endswith(".gz")
    try:
        size = os.path.getsize(path)
        with gzip.open(path, "rb") if gz else open(path, "rb") as stream:
            shape = _idx_header(stream.read(header), rank, path)
            expected = _idx_body_size(shape)
            if gz:
                _check_gzip_room(path, shape, expected, size)
            else:
                _check_idx_body(path, shape, size - header)
            _check_memory(path, expected)
            array = np.empty(expected, dtype=np.uint8)
            view = array.data
            got = 0
            while got < expected:
                n = stream.readinto(view[got : got + _CHUNK])
                if not n:
                    break
                got += n
            extra = len(stream.read(1)) if got == expected else 0
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(path, error) from None
    _check_idx_body(path, shape, got + extra, at_least=gz)
    return array.reshape(shape)


def _check_gzip_room(path: str, shape: tuple[int, ...], expected: int, size: int) -> None:
    """A gzipped file of ``size`` bytes cannot decompress to more than
    :data:`_GZIP_RATIO` times that: a header announcing more is corrupt."""
    room = _GZIP_RATIO * size
    if expected > room:
        raise DataError(
            f"{path} is corrupt: its header announces {'×'.join(map(str, shape))} = {expected} bytes of "
            f"data, more than a gzipped file of {size} bytes can hold (at most {room})"
        )


def _check_memory(path: str, expected: int) -> None:
    """Refuse to read a file larger than this machine's memory."""
    from mfdsl.core.resources import format_bytes, machine_memory

    memory = machine_memory()
    if memory is not None and expected > memory:
        raise DataError(
            f"{path} announces {format_bytes(expected)} of data, more than this machine's memory "
            f"({format_bytes(memory)})"
        )


def parse_idx(raw: bytes, rank: int, path: str = "<bytes>") -> np.ndarray:
    """The ``uint8`` array of an IDX file's bytes (already gunzipped) of the given rank
    (1 for labels, 3 for images).  A wrong magic number, a truncated or an overlong file
    is a :class:`~mfdsl.core.errors.DataError`."""
    shape = _idx_header(raw, rank, path)
    expected = _idx_body_size(shape)
    header = 4 + 4 * rank
    _check_idx_body(path, shape, len(raw) - header)
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(shape)


def idx_shape(path: str, rank: int) -> tuple[int, ...]:
    """The shape an IDX file's header announces, once the file is found to hold exactly
    that many bytes of data, read without keeping them: a plain file's size is
    compared; a gzipped one is decompressed as a stream (in 1 MiB chunks) and no
    further than one byte past the announced size.  Problems as :func:`parse_idx`."""
    header = 4 + 4 * rank
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                shape = _idx_header(stream.read(header), rank, path)
                _check_gzip_room(path, shape, _idx_body_size(shape), os.path.getsize(path))
                cap = _idx_body_size(shape) + 1
                body = 0
                while body < cap:
                    chunk = stream.read(min(_CHUNK, cap - body))
                    if not chunk:
                        break
                    body += len(chunk)
        else:
            with open(path, "rb") as handle:
                shape = _idx_header(handle.read(header), rank, path)
                body = os.fstat(handle.fileno()).st_size - header
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(path, error) from None
    _check_idx_body(path, shape, body, at_least=path.endswith(".gz"))
    return shape


def _idx_header(raw: bytes, rank: int, path: str) -> tuple[int, ...]:
    """The shape in the header at the start of ``raw``, after checking the magic number."""
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
    return tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))


def _idx_body_size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _check_idx_body(path: str, shape: tuple[int, ...], body: int, *, at_least: bool = False) -> None:
    # at_least: ``body`` was counted no further than one byte past the announced size.
    expected = _idx_body_size(shape)
    if body < expected:
        raise DataError(
            f"{path} is truncated: its header announces {'×'.join(map(str, shape))} = {expected} bytes "
            f"of data, the file has {body}"
        )
    if body > expected:
        has = f"more than {expected}" if at_least else str(body)
        raise DataError(
            f"{path} is corrupt: its header announces {expected} bytes of data, the file has {has}"
        )


def _idx_image_count(kind: str, path: str) -> int:
    """How many images an IDX image file holds, checked as :func:`idx_shape` does,
    and that they have the dataset's size."""
    shape = _idx_shape_cached(*_stamp(path), 3)
    expected = _IMAGE_SHAPES[kind]
    if shape[1:] != expected:
        raise DataError(
            f"{kind}: {path} holds images of {shape[1]}×{shape[2]} pixels, expected {expected[0]}×{expected[1]}"
        )
    return shape[0]


@functools.lru_cache(maxsize=_CACHE_FILES)
def _idx_shape_cached(path: str, mtime_ns: int, size: int, rank: int) -> tuple[int, ...]:
    # mtime_ns and size are part of the cache key only: a rewritten file is checked again.
    return idx_shape(path, rank)


def _unreadable(path: str, error: BaseException) -> DataError:
    # gzip raises BadGzipFile (an OSError) for a wrong header, EOFError when cut short.
    if isinstance(error, EOFError):
        return DataError(f"{path} is truncated: its gzip stream ends early ({error})")
    return DataError(
        f"cannot read {path}: {error or type(error).__name__} (a damaged or truncated download?)"
    )


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
            raise MissingData(
                f"cifar10: no {name} in {folder}"
                + (f" (nor in {os.path.join(folder, CIFAR_FOLDER)})" if directory == folder else "")
                + f". {_expected('cifar10')} {_obtain('cifar10')}"
            )
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=_CACHE_FILES)
def _cifar_labels_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # The batch's images are dropped as soon as it is parsed.
    labels = parse_cifar_batch(path)[1]
    labels.flags.writeable = False
    return labels


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
        size = os.path.getsize(path)
        if size > _CIFAR_MAX_BYTES:
            raise DataError(
                f"{path} is not a CIFAR-10 python batch: it has {size} bytes, and a batch of 10 000 "
                f"images has about 31 MB (at most {_CIFAR_MAX_BYTES} accepted)"
            )
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


class _NdarrayName:
    """``numpy.ndarray`` as a pickle names it: numpy's pickles pass it to
    ``_reconstruct``; a pickle that calls it (``ndarray((10**12,))``) would allocate
    whatever shape it likes, and is refused."""

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray: a CIFAR-10 batch never does")


_NDARRAY = _NdarrayName()


def _reconstruct(real: Callable[..., Any], subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct``, as its pickles call it: an empty array (shape ``(0,)``)
    that the pickle's state then fills from bytes it holds — never a large one out of
    nothing."""
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    if (
        not isinstance(shape, tuple)
        or any(not isinstance(n, int) or n < 0 for n in shape)
        or math.prod(shape) > 1
    ):
        raise pickle.UnpicklingError(f"_reconstruct with shape {shape!r}: numpy's pickles start from (0,)")
    return real(np.ndarray, shape, dtype)


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
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY  # an argument of _reconstruct, never called itself
        if name == "_reconstruct" and (module, name) in self._NUMPY:
            return functools.partial(_reconstruct, _numpy_global(module, name))
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
    _idx_shape_cached.cache_clear()
    _cifar_labels_cached.cache_clear()
