"""Where a store lives: a local path, or any fsspec URL its writers can reach.

A store is named by a path (``runs/x.zarr``) or a URL (``file:///shared/x.zarr``,
``s3://bucket/x.zarr``).  ``file://`` URLs are turned into plain paths, so that zarr
uses its local store (which writes every chunk atomically: a temporary file renamed
into place); any other URL goes to fsspec (``pip install fsspec`` and the protocol's
package, e.g. ``s3fs``).  The files the runner keeps beside a store (``<store>.lock``,
``<store>.log``, ``<store>.attrs/``) go through the same functions, so they live
wherever the store does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any
from urllib.parse import unquote, urlsplit


def normalize(location: str | os.PathLike[str]) -> str:
    """``location`` as the runner uses it: ``file://`` URLs become paths."""
    text = os.fspath(location)
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: a file:// URL names a path on this machine (file:///path)")
        return unquote(parts.path) or "/"
    return text


def is_url(location: str) -> bool:
    """Whether ``location`` (normalized) is a URL handled by fsspec, not a local path."""
    return "://" in location


class LocationError(OSError):
    """A store location this machine cannot use at all: a URL whose protocol has no
    fsspec implementation installed (``s3://`` without ``s3fs``), or none known.  The
    message says what to install."""


# the package that implements each common protocol for fsspec
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "abfs": "adlfs",
    "az": "adlfs",
    "adl": "adlfs",
    "http": "aiohttp requests",
    "https": "aiohttp requests",
    "ssh": "sshfs",
    "sftp": "sshfs",
    "hdfs": "pyarrow",
    "webdav": "webdav4",
}


def check_reachable(location: str | os.PathLike[str]) -> str:
    """``location`` normalized (:func:`normalize`), after making sure this machine
    can open it: a URL needs fsspec and its protocol's package.  Raises
    :class:`LocationError` saying what to install (or ``ValueError`` for a bad
    ``file://`` URL).  Connects to nothing."""
    text = normalize(location)
    if is_url(text):
        _fs(text)
    return text


def _fs(location: str) -> tuple[Any, str]:
    protocol = location.split("://", 1)[0].lower()
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise LocationError(
            f"{location}: a store at a URL needs fsspec and the package for {protocol}://: "
            f"pip install fsspec {_PACKAGES.get(protocol, '')}".rstrip()
        ) from None
    try:
        return url_to_fs(location)
    except ImportError as error:
        package = _PACKAGES.get(protocol)
        how = f"pip install {package}" if package else f"install fsspec's implementation of {protocol}://"
        raise LocationError(
            f"{location}: this machine cannot open {protocol}:// URLs: {how} (fsspec says: {error})"
        ) from None
    except ValueError as error:
        raise LocationError(
            f"{location}: {error}; a store is a path, or a URL of a protocol fsspec knows "
            "(file://, s3://, gs://, …)"
        ) from None


def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = _fs(location)
    return bool(fs.exists(path))


def remove(location: str) -> None:
    """Remove a file or a whole folder; nothing if it does not exist."""
    if not is_url(location):
        if os.path.isdir(location) and not os.path.islink(location):
            shutil.rmtree(location)
        elif os.path.lexists(location):
            os.remove(location)
        return
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def make_parent(location: str) -> None:
    """Create the folder that will hold ``location``."""
    if not is_url(location):
        os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
        return
    fs, path = _fs(location)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        with contextlib.suppress(FileExistsError):
            fs.makedirs(parent, exist_ok=True)


def parent(location: str) -> str:
    """The folder ``location`` sits in."""
    if not is_url(location):
        return os.path.dirname(os.path.abspath(location))
    return location.rstrip("/").rsplit("/", 1)[0]


def join(location: str, name: str) -> str:
    return os.path.join(location, name) if not is_url(location) else f"{location.rstrip('/')}/{name}"


def read_text(location: str) -> str:
    if not is_url(location):
        with open(location, encoding="utf-8") as file:
            return file.read()
    fs, path = _fs(location)
    with fs.open(path, "r", encoding="utf-8") as file:
        return str(file.read())


def write_text(location: str, text: str) -> None:
    """Write a whole file; locally through a temporary file renamed into place."""
    if not is_url(location):
        tmp = f"{location}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, location)
        return
    fs, path = _fs(location)
    with fs.open(path, "w", encoding="utf-8") as file:
        file.write(text)


def create_text(location: str, text: str) -> bool:
    """Write a new file; ``False`` (and nothing written) if it exists already.

    Locally this is atomic (``O_EXCL``).  An object store has no exclusive create, so
    there it is a check then a write, enough to stop a second ``mfdsl run`` started by
    hand, not one started at the same instant.
    """
    if not is_url(location):
        try:
            fd = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        return True
    if exists(location):
        return False
    write_text(location, text)
    return True


def append_text(location: str, text: str) -> None:
    if not is_url(location):
        with open(location, "a", encoding="utf-8") as file:
            file.write(text)
        return
    before = read_text(location) if exists(location) else ""
    write_text(location, before + text)


def list_names(location: str) -> list[str]:
    """The names in a folder, sorted; empty if it does not exist."""
    if not is_url(location):
        return sorted(os.listdir(location)) if os.path.isdir(location) else []
    fs, path = _fs(location)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def make_dirs(location: str) -> None:
    if not is_url(location):
        os.makedirs(location, exist_ok=True)
        return
    fs, path = _fs(location)
    with contextlib.suppress(FileExistsError):
        fs.makedirs(path, exist_ok=True)


def free_bytes(location: str) -> int | None:
    """Free space on the file system that will hold ``location`` (``None`` for URLs)."""
    if is_url(location):
        return None
    folder = os.path.abspath(location)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
