"""What a sweep shows while it runs (the local pool's and a Dask cluster's)."""

from __future__ import annotations

from typing import Any


def sweep_columns() -> tuple[Any, ...]:
    """The progress display's columns (the local pool's and a Dask cluster's): name,
    bar, done/total, the outcome counts, time."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
