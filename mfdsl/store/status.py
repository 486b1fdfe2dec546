"""How a run ended, as the store's ``status`` variable records it: the one table of
status codes (CF ``flag_values`` / ``flag_meanings``, docs/store.md)."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The value of a cell of ``status`` (CF ``flag_values``)."""

    PENDING = 0
    DONE = 1
    FAILED = 2
    DIVERGED = 3

    @property
    def finished(self) -> bool:
        """A result that is never written again (done or diverged)."""
        return self in (Status.DONE, Status.DIVERGED)


#: the cells a run never rewrites (``--resume`` skips them)
FINISHED = (Status.DONE, Status.DIVERGED)
