"""One ``mfdsl run`` per store: a lock file beside the store, ``<store>.lock``.

The lock holds its owner's pid, host, start time and command line (JSON).  A second
``mfdsl run`` on the same store finds it and refuses, naming the owner.  A lock whose
owner is gone — same host, and no process with that pid (or a different process that
reused the pid) — is stale: a driver killed with SIGKILL or by a crash leaves one, and
the next run takes it over with a warning.  A lock from another host cannot be checked
from here, so it is always obeyed; the message says how to remove it by hand.  A lock
of this host whose pid is no process id at all (negative, zero, too large: a damaged or
forged file) is stale too.

The lock is keyed on the store's resolved path (symbolic links followed, ``..`` and
``./`` gone): two names of one folder — a link to it, a relative path — take one lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mfdsl.core import location as loc


class StoreLocked(Exception):
    """The store is being written by another ``mfdsl run`` (or its lock is unreadable)."""


#: the largest pid any system hands out (Linux's pid_max is at most 2**22)
_MAX_PID = 2**31 - 1


def lock_path(store: str) -> str:
    """``<store>.lock``, beside the store's resolved path (a URL as it is)."""
    if loc.is_url(store):
        return f"{store.rstrip('/')}.lock"
    return f"{os.path.realpath(store.rstrip(os.sep) or os.sep)}.lock"


def valid_pid(pid: Any) -> bool:
    """Whether ``pid`` can be a process id: an int in 1 … 2**31 - 1 (not a bool)."""
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= _MAX_PID


@dataclass
class StoreLock:
    path: str
    owner: dict[str, Any]

    def release(self) -> None:
        """Remove the lock, if it is still this process's."""
        with contextlib.suppress(OSError, ValueError):
            if read_owner(self.path) == self.owner:
                loc.remove(self.path)

    def fence(self) -> dict[str, str]:
        """A token a worker elsewhere (a Dask cluster's) checks before it writes a cell
        (:func:`fence_holds`): it holds while this lock does and :meth:`revoke` has not
        been called, so a worker that outlives the sweep that started it — its
        scheduler gone — cannot write behind the back of the driver's log."""
        return {"lock": self.path, "token": str(self.owner.get("token", ""))}

    def revoke(self) -> None:
        """Give the lock a new token: every fence handed out before stops holding."""
        owner = {**self.owner, "token": uuid.uuid4().hex}
        with contextlib.suppress(OSError, ValueError):
            if read_owner(self.path) == self.owner:
                loc.write_text(self.path, json.dumps(owner, indent=1) + "\n")
                self.owner = owner


def fence_holds(fence: Mapping[str, Any] | None) -> bool:
    """Whether a worker may write the cells of the sweep that gave it ``fence``
    (:meth:`StoreLock.fence`): ``None`` always may (the local pool, whose workers die
    with their driver)."""
    if fence is None:
        return True
    try:
        return bool(read_owner(str(fence["lock"])).get("token") == fence["token"] and fence["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid that
    was reused from the process that took the lock."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3 of stat); starttime is field 22
    return fields[19] if len(fields) > 19 else None


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def me() -> dict[str, Any]:
    """This process as a lock owner."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid_start": _start_time(pid),
        "command": " ".join(sys.argv),
        "token": uuid.uuid4().hex,
    }


def read_owner(path: str) -> dict[str, Any]:
    """The lock's owner; ``ValueError`` if the file is not a lock this code wrote."""
    owner = json.loads(loc.read_text(path))
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if (
        not isinstance(owner, dict)
        or not isinstance(pid, int)
        or isinstance(pid, bool)
        or "host" not in owner
    ):
        raise ValueError("not an mfdsl lock")
    return owner


def alive(owner: dict[str, Any]) -> bool | None:
    """Whether the owner still runs: ``None`` when it is on another host."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner["pid"]
    if not valid_pid(pid):
        return False  # no process has this id: a damaged lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (OverflowError, ValueError):
        return False
    if _state(pid) == "Z":
        return False  # a zombie: dead, not yet reaped
    started = owner.get("pid_start")
    now = _start_time(pid)
    return not (started is not None and now is not None and started != now)


def describe(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started', '?')})"


def _gone(owner: dict[str, Any]) -> str:
    """Why a stale lock's owner is taken to be gone."""
    if not valid_pid(owner.get("pid")):
        return "whose pid is no process id (a damaged lock file)"
    return "which is no longer running"


def acquire(store: str, warn: Callable[[str], None]) -> StoreLock:
    """Take the store's lock, or raise :class:`StoreLocked` with a message for the user.
    ``OSError`` if the lock cannot be written (a read-only or full target)."""
    path = lock_path(store)
    owner = me()
    text = json.dumps(owner, indent=1) + "\n"
    loc.make_parent(path)
    for _ in range(3):
        if loc.create_text(path, text):
            return StoreLock(path, owner)
        try:
            other = read_owner(path)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        except (OSError, ValueError) as error:
            raise StoreLocked(
                f"{store} is locked by {path}, which cannot be read ({error}); "
                f"if no mfdsl run is writing this store, delete {path}"
            ) from None
        state = alive(other)
        if state is False:
            warn(f"taking over the stale lock of {describe(other)}, {_gone(other)}")
            with contextlib.suppress(OSError, ValueError):
                if read_owner(path) == other:
                    loc.remove(path)
            continue
        where = "" if state is None else " (still running)"
        raise StoreLocked(
            f"{store} is being written by another mfdsl run: {describe(other)}{where}, "
            f"command: {other.get('command', '?')}. Wait for it to finish; "
            f"if it is gone, delete {path}"
        )
    raise StoreLocked(f"could not take the lock {path}: it keeps changing")


def current_owner(store: str) -> dict[str, Any] | None:
    """The owner of a live lock on ``store`` (for ``mfdsl verify``), else ``None``."""
    path = lock_path(store)
    try:
        owner = read_owner(path)
    except (OSError, ValueError):
        return None
    return owner if alive(owner) is not False else None
