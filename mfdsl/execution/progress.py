"""The progress of a sweep, on a terminal or in a log.

On a terminal, a live display (rich): a bar for the sweep and one for every run in
flight, each with its estimated time left.  Without one (output redirected to a file,
piped through ``tee``, CI), plain lines that read well in a log: one per finished run,
and a summary line (runs finished of all, time elapsed, time left) every
:data:`PROGRESS_ENV` seconds, 30 by default.

The estimate of time left weighs runs by their cost (:func:`work`): per backend, the
seconds of measured unit durations per unit of work (units that finished, else those
in flight extrapolated from their step counts) times the work left, spread over the
workers; never less than the longest unit still in flight has left.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mfdsl.core.errors import count

#: the environment variable that sets the period of the summary line without a terminal
#: (seconds; default :data:`DEFAULT_EVERY`)
PROGRESS_ENV = "MFDSL_PROGRESS_EVERY"
#: the default period of the summary line, seconds
DEFAULT_EVERY = 30.0


def summary_period() -> float:
    """The period of the summary line: ``$MFDSL_PROGRESS_EVERY`` if it is a positive
    number of seconds (a bad value is ignored: progress is never worth a failed
    sweep), else :data:`DEFAULT_EVERY`."""
    text = os.environ.get(PROGRESS_ENV, "").strip()
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_EVERY
    return value if math.isfinite(value) and value > 0 else DEFAULT_EVERY


def work(plan: Any) -> float:
    """A run's cost in arbitrary units, comparable between runs of one backend: steps ×
    batch × weights; a limit run (infinite width) counts steps × batch, as all of a
    backend's limit runs have the same size."""
    steps, batch = float(plan.steps), float(plan.batch)
    if not math.isfinite(plan.width):
        return max(1.0, steps * batch)
    weights = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
    return max(1.0, steps * batch * float(weights))


def clock(seconds: float | None) -> str:
    """``h:mm:ss``, or ``?`` when not known yet."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = round(max(0.0, seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _Unit:
    """A unit of work as the tracker sees it: its runs, their steps, when it started."""

    def __init__(self, tasks: Sequence[Any]) -> None:
        self.keys = [t.key for t in tasks]
        self.backend = str(tasks[0].backend)
        self.work = sum(work(t.plan) for t in tasks)
        self.steps = {t.key: max(1, int(t.plan.steps)) for t in tasks}
        self.step: dict[str, int] = {}
        self.done: set[str] = set()
        self.start: float | None = None

    def fraction(self) -> float:
        """How much of the unit is done, by its runs' steps."""
        parts = [
            1.0 if key in self.done else min(1.0, self.step.get(key, 0) / self.steps[key])
            for key in self.keys
        ]
        return sum(parts) / len(parts)

    def reset(self) -> None:
        self.step.clear()
        self.done.clear()
        self.start = None


class Estimate:
    """Time left in a sweep of ``units`` (each a sequence of tasks: ``key``,
    ``backend``, ``plan``) on ``workers`` parallel workers, from what is reported:
    :meth:`started`, :meth:`step`, :meth:`finished`.  ``now`` is the clock (tests)."""

    def __init__(
        self, units: Sequence[Sequence[Any]], workers: int, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._now = now
        self.begin = now()
        self.workers = max(1, workers)
        self.units = [_Unit(u) for u in units if u]
        self.of = {key: unit for unit in self.units for key in unit.keys}
        self.total = len(self.of)
        self.finished_runs = 0
        # per backend: measured seconds and work of the units that finished
        self.seconds: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def elapsed(self) -> float:
        return self._now() - self.begin

    def started(self, key: str) -> None:
        unit = self.of.get(key)
        if unit is not None and unit.start is None:
            unit.start = self._now()

    def step(self, key: str, step: int) -> None:
        unit = self.of.get(key)
        if unit is None:
            return
        self.started(key)
        unit.step[key] = max(unit.step.get(key, 0), int(step))

    def finished(self, key: str) -> float | None:
        """Record a finished run; returns the seconds its unit has run (``None`` if its
        start was not seen)."""
        unit = self.of.get(key)
        if unit is None or key in unit.done:
            return None
        unit.done.add(key)
        self.finished_runs += 1
        took = None if unit.start is None else self._now() - unit.start
        if len(unit.done) == len(unit.keys) and took is not None:
            self.seconds[unit.backend] = self.seconds.get(unit.backend, 0.0) + took
            self.spent[unit.backend] = self.spent.get(unit.backend, 0.0) + unit.work
        return took

    def requeued(self, keys: Sequence[str]) -> None:
        """Runs that run again (their worker died): their progress is lost."""
        for key in keys:
            unit = self.of.get(key)
            if unit is not None:
                if key in unit.done:
                    self.finished_runs -= 1
                unit.reset()

    def running(self) -> int:
        return sum(1 for u in self.units if u.start is not None and len(u.done) < len(u.keys))

    def run_left(self, key: str) -> float | None:
        """Seconds left of one run in flight, from its unit's start and its steps."""
        unit = self.of.get(key)
        if unit is None or unit.start is None:
            return None
        done = min(1.0, unit.step.get(key, 0) / unit.steps[key])
        if done <= 0:
            return None
        return (self._now() - unit.start) * (1.0 - done) / done

    def _rates(self) -> dict[str, float]:
        """Seconds per unit of work, per backend."""
        now = self._now()
        rates = {b: self.seconds[b] / self.spent[b] for b in self.seconds if self.spent.get(b, 0) > 0}
        flying: dict[str, list[float]] = {}
        for unit in self.units:
            if unit.backend in rates or unit.start is None or len(unit.done) == len(unit.keys):
                continue
            fraction = unit.fraction()
            if fraction > 0:
                entry = flying.setdefault(unit.backend, [0.0, 0.0])
                entry[0] += now - unit.start
                entry[1] += fraction * unit.work
        rates.update({b: s / w for b, (s, w) in flying.items() if w > 0})
        if not any(unit.start is not None for unit in self.units):
            # no unit's start is reported (a Dask cluster): the sweep's throughput so far
            done = sum(unit.work for unit in self.units if len(unit.done) == len(unit.keys))
            if done > 0:
                rate = (now - self.begin) * self.workers / done
                rates.update({unit.backend: rate for unit in self.units if unit.backend not in rates})
        return rates

    def left(self) -> float | None:
        """Seconds left in the sweep, or ``None`` while there is nothing to go by."""
        if self.finished_runs >= self.total:
            return 0.0
        rates = self._rates()
        now = self._now()
        total, longest = 0.0, 0.0
        for unit in self.units:
            fraction = unit.fraction()
            if fraction >= 1.0:
                continue
            rate = rates.get(unit.backend)
            if rate is None:
                return None
            seconds = rate * unit.work * (1.0 - fraction)
            if unit.start is not None and fraction > 0:
                # a unit in flight: its own pace says best how long it has left
                seconds = (now - unit.start) * (1.0 - fraction) / fraction
            total += seconds
            if unit.start is not None:
                longest = max(longest, seconds)
        return max(total / self.workers, longest)


class Tracker:
    """What a sweep shows while it runs: a live display on a terminal, plain lines in a
    log (:mod:`mfdsl.execution.progress`).  Use as a context manager; report with
    :meth:`started`, :meth:`step`, :meth:`finished`, :meth:`requeued`."""

    def __init__(
        self,
        console: Any,
        units: Sequence[Sequence[Any]],
        workers: int,
        *,
        live: bool | None = None,
        every: float | None = None,
        counts: Callable[[], str] = lambda: "",
    ) -> None:
        self.console = console
        self.estimate = Estimate(units, workers)
        self.live = bool(getattr(console, "is_terminal", False)) if live is None else live
        self.every = summary_period() if every is None else every
        self.counts = counts
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Any = None
        self._overall: Any = None
        self._bars: dict[str, Any] = {}

    # -- life cycle --

    def __enter__(self) -> Tracker:
        if self.live:
            from rich.progress import Progress

            from mfdsl.execution.progress import sweep_columns

            self._progress = Progress(*sweep_columns(), console=self.console, transient=False)
            self._progress.start()
            self._overall = self._progress.add_task("sweep", total=self.estimate.total, info="", eta="")
        else:
            self._print(
                f"running {count(self.estimate.total, 'run')} on "
                f"{count(self.estimate.workers, 'worker')}; a progress line every {self.every:g} s"
            )
            self._thread = threading.Thread(target=self._summaries, daemon=True, name="mfdsl-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._progress is not None:
            self._refresh()
            self._progress.stop()
        elif exc[0] is None:
            self._print(self.summary())

    # -- reports --

    def started(self, key: str) -> None:
        with self._lock:
            self.estimate.started(key)

    def step(self, key: str, step: int, loss: float) -> None:
        with self._lock:
            self.estimate.step(key, step)
            if self._progress is None:
                return
            bar = self._bars.get(key)
            unit = self.estimate.of.get(key)
            if bar is None:
                total = unit.steps[key] if unit is not None else None
                bar = self._bars[key] = self._progress.add_task(f"  {key}", total=total, info="", eta="")
            left = self.estimate.run_left(key)
            self._progress.update(
                bar, completed=step, info=f"loss {loss:.4g}", eta=f"eta {clock(left)}" if left else ""
            )
            self._refresh()

    def finished(self, key: str, status: str) -> None:
        with self._lock:
            took = self.estimate.finished(key)
            if self._progress is not None:
                self._progress.advance(self._overall)
                bar = self._bars.pop(key, None)
                if bar is not None:
                    self._progress.remove_task(bar)
                self._refresh()
                return
            n, total = self.estimate.finished_runs, self.estimate.total
            took_text = f" ({took:.1f} s)" if took is not None else ""
            self._print(
                f"[{n:>{len(str(total))}}/{total}] {status:<8} {key}{took_text} · "
                f"elapsed {clock(self.estimate.elapsed())} · eta {clock(self.estimate.left())}"
            )

    def requeued(self, keys: Sequence[str]) -> None:
        with self._lock:
            self.estimate.requeued(keys)
            if self._progress is not None:
                for key in keys:
                    bar = self._bars.pop(key, None)
                    if bar is not None:
                        self._progress.remove_task(bar)

    # -- output --

    def summary(self) -> str:
        """The summary line: runs finished of all (with their outcomes), runs in
        flight, time elapsed and left."""
        e = self.estimate
        outcomes = self.counts()
        flying = e.running()
        return (
            f"progress: {e.finished_runs}/{e.total} runs finished"
            + (f" ({outcomes})" if outcomes else "")
            + (f", {flying} in flight" if flying else "")
            + f" · elapsed {clock(e.elapsed())} · eta {clock(e.left())}"
        )

    def _summaries(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self.estimate.finished_runs >= self.estimate.total:
                    return  # the closing summary says the rest
                line = self.summary()
            self._print(line)

    def _refresh(self) -> None:
        if self._progress is not None:
            left = self.estimate.left()
            self._progress.update(self._overall, info=self.counts(), eta=f"eta {clock(left)}")

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def sweep_columns() -> tuple[Any, ...]:
    """The progress display's columns (the local pool's and a Dask cluster's): name,
    bar, done/total, the outcome counts (a run's loss), time elapsed, time left
    (:mod:`mfdsl.execution.progress_eta`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )


def escape(text: str) -> str:
    """Text shown verbatim by rich (``mfdsl[jax]`` is not markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)
