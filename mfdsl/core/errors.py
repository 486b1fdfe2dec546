"""Spec errors: a message, the place it points at, and a readable rendering."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

# Lines longer than this are cut around the caret so a 1 MB line stays readable.
_MAX_SHOWN = 100
#: the most errors one check of a spec reports; the others are counted, not shown (a
#: spec with more is usually the wrong file, and the first screenful is what helps)
MAX_ERRORS = 20


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a spec's source text: 1-based lines and columns, 0-based offsets."""

    line: int
    column: int
    end_line: int
    end_column: int
    start_pos: int = 0
    end_pos: int = 0
    #: set when the text is not the spec file itself (a ``--set`` argument)
    path: str | None = field(default=None, compare=False)
    text: str | None = field(default=None, compare=False)

    @classmethod
    def of(cls, meta: object) -> Span | None:
        """The span of a lark ``Meta`` or ``Token`` (``None`` when it has no position)."""
        line = getattr(meta, "line", None)
        if line is None:
            return None
        return cls(
            line=line,
            column=getattr(meta, "column", 1),
            end_line=getattr(meta, "end_line", line) or line,
            end_column=getattr(meta, "end_column", 1) or 1,
            start_pos=getattr(meta, "start_pos", 0) or 0,
            end_pos=getattr(meta, "end_pos", 0) or 0,
        )

    def __add__(self, other: Span | None) -> Span:
        """The smallest span covering both."""
        if other is None:
            return self
        if self.path != other.path:
            return self
        first, last = (self, other) if self.start_pos <= other.start_pos else (other, self)
        end = last if last.end_pos >= first.end_pos else first
        return Span(
            line=first.line,
            column=first.column,
            end_line=end.end_line,
            end_column=end.end_column,
            start_pos=first.start_pos,
            end_pos=end.end_pos,
            path=self.path,
            text=self.text,
        )

    def moved(self, path: str, text: str) -> Span:
        """This span, marked as pointing into ``text`` (named ``path``)."""
        return replace(self, path=path, text=text)


class SpecError(Exception):
    """A spec that cannot be parsed, validated or expanded.

    ``str(error)`` is the full report: ``path:line:col: message``, the source line with
    a caret under the offending text, and a hint when one helps.
    """

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        hint: str | None = None,
        path: str | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.path = path
        self.source = source

    def located(self, path: str | None, source: str | None) -> SpecError:
        """This error, attached to a file (keeps a location set earlier)."""
        if self.span is not None and self.span.path is not None:
            self.path, self.source = self.span.path, self.span.text
        if self.path is None:
            self.path = path
        if self.source is None:
            self.source = source
        return self

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """The report as plain text."""
        where = self.path or "<spec>"
        if self.span is not None:
            where += f":{self.span.line}:{self.span.column}"
        lines = [f"{where}: {self.message}"]
        lines += _excerpt(self.source, self.span)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class SpecErrors(SpecError):
    """Several independent errors of one spec: local ones in source order, then
    spec-wide ones (a missing block).

    Its ``message``, ``span``, ``hint``, ``path`` and ``source`` are the first error's,
    so code that handles one :class:`SpecError` handles this unchanged; ``errors`` holds
    them all and :meth:`render` shows them all.  ``omitted`` counts the errors found
    beyond :data:`MAX_ERRORS`, which are not kept.
    """

    def __init__(self, errors: Iterable[SpecError], omitted: int = 0) -> None:
        self.errors: list[SpecError] = list(errors)
        if not self.errors:
            raise ValueError("SpecErrors needs at least one error")
        self.omitted = omitted
        first = self.errors[0]
        super().__init__(first.message, first.span, hint=first.hint, path=first.path, source=first.source)

    # The first error's fields, read and written through, so that a caller adding to
    # ``error.message`` (as the expansion does) changes what is shown.
    message = property(
        lambda self: self.errors[0].message, lambda self, v: setattr(self.errors[0], "message", v)
    )
    span = property(lambda self: self.errors[0].span, lambda self, v: setattr(self.errors[0], "span", v))
    hint = property(lambda self: self.errors[0].hint, lambda self, v: setattr(self.errors[0], "hint", v))
    path = property(lambda self: self.errors[0].path, lambda self, v: setattr(self.errors[0], "path", v))
    source = property(
        lambda self: self.errors[0].source, lambda self, v: setattr(self.errors[0], "source", v)
    )

    def __reduce__(self) -> tuple[Any, ...]:
        # (an exception pickles as its class called with ``args``, here the message)
        return (SpecErrors, (self.errors, self.omitted))

    def located(self, path: str | None, source: str | None) -> SpecError:
        for error in self.errors:
            error.located(path, source)
        return self

    def render(self) -> str:
        text = "\n".join(error.render() for error in self.errors)
        if self.omitted:
            text += f"\n… and {count(self.omitted, 'more error')} (only the first {MAX_ERRORS} are shown)"
        return text


def errors_of(error: SpecError) -> list[SpecError]:
    """The single errors ``error`` stands for (itself, or each of a :class:`SpecErrors`)."""
    return list(error.errors) if isinstance(error, SpecErrors) else [error]


def combined(errors: Iterable[SpecError], omitted: int = 0) -> SpecError:
    """One exception for ``errors`` (at least one), in the order given: the error itself
    when there is one, else a :class:`SpecErrors` of the first :data:`MAX_ERRORS`
    (``omitted``: how many were left out before, besides those ``errors`` left out)."""
    errors = list(errors)
    flat = [e for error in errors for e in errors_of(error)]
    earlier = omitted + sum(e.omitted for e in errors if isinstance(e, SpecErrors))
    if len(flat) == 1 and not earlier:
        return flat[0]
    return SpecErrors(flat[:MAX_ERRORS], omitted=earlier + max(0, len(flat) - MAX_ERRORS))


class SpecWarning(SpecError):
    """Something in a spec that is allowed but probably not meant (a sweep variable
    nothing uses): reported like an error, with its place, and never raised by the
    checks — :func:`mfdsl.plan.check.spec_warnings` returns them."""


def _excerpt(source: str | None, span: Span | None) -> list[str]:
    if source is None or span is None:
        return []
    all_lines = source.split("\n")
    if not 1 <= span.line <= len(all_lines):
        return []
    text = all_lines[span.line - 1].removesuffix("\r").replace("\t", " ")
    start = span.column - 1
    width = span.end_column - span.column if span.end_line == span.line else len(text) - start
    width = max(1, min(width, _MAX_SHOWN // 2))
    offset = 0
    if len(text) > _MAX_SHOWN:
        offset = max(0, min(start - _MAX_SHOWN // 3, len(text) - _MAX_SHOWN))
        shown = text[offset : offset + _MAX_SHOWN]
        prefix = "…" if offset else ""
        suffix = "…" if offset + _MAX_SHOWN < len(text) else ""
        text = prefix + shown + suffix
        offset -= len(prefix)
    text = "".join(c if c.isprintable() else "?" for c in text)
    gutter = f"{span.line:>4} | "
    caret = " " * (len(gutter) - 2) + "| " + " " * (start - offset) + "^" * width
    return [gutter + text, caret]


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean 'x'?"`` for the closest candidate, if any is close enough."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        if word.lower() in lowered:
            close = [lowered[word.lower()]]
    return f"did you mean '{close[0]}'?" if close else None


def one_of(choices: Iterable[str]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [f"'{c}'" for c in choices]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 run"``, ``"3 runs"``: ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


class DataError(Exception):
    """A data source that cannot be built: an unknown kind, a bad parameter, or data
    files that are missing or damaged."""
