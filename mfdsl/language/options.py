"""Typed keys: what a block (or a backend's options block) accepts, and its checks.

Every ``key = value`` in the language is declared once as an :class:`Option` with a
:class:`Kind`; the same declarations validate the IR's blocks, ``--set`` overrides, YAML
specs and third-party backends' options, so all of them get the same messages.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mfdsl.core.errors import Span, SpecError, did_you_mean, one_of
from mfdsl.language.expr import describe

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


class Kind:
    """The type of a value, with its checks.  ``check`` returns the value normalised
    (an integral float becomes an int where an int is expected)."""

    #: bare names are symbols (``relu``) rather than variables
    symbols: bool = False

    def describe(self) -> str:
        raise NotImplementedError

    def plural(self) -> str:
        """:meth:`describe` for several values: ``positive integers``, as in ``a list of
        positive integers``."""
        return f"values, each {self.describe()}"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        raise NotImplementedError

    def _wrong(self, value: Any, span: Span | None, key: str, hint: str | None = None) -> SpecError:
        return SpecError(f"'{key}' must be {self.describe()}, got {describe(value)}", span, hint=hint)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Kind):
    """An integer within ``[min, max]``."""

    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer from {self.min} to {self.max}"
        if self.min == 1:
            return "a positive integer"
        if self.min == 0:
            return "a non-negative integer"
        return "an integer"

    def plural(self) -> str:
        if self.min is not None and self.max is not None:
            return f"integers from {self.min} to {self.max}"
        if self.min == 1:
            return "positive integers"
        return "non-negative integers" if self.min == 0 else "integers"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if _is_number(value) and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(value, span, key)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise self._wrong(value, span, key)
        return value


def _finite(value: int | float) -> bool:
    return abs(value) <= sys.float_info.max if isinstance(value, int) else math.isfinite(value)


@dataclass(frozen=True)
class Float(Kind):
    """A finite real number within bounds (``open_min``: the bound itself excluded)."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def describe(self) -> str:
        if self.min == 0 and self.max is None:
            return "a positive number" if self.open_min else "a non-negative number"
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.open_min else '≥'} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.open_max else '≤'} {self.max:g}")
        return "a number" + (" " + " and ".join(parts) if parts else "")

    def plural(self) -> str:
        one = self.describe()
        if one.startswith("a number"):
            return "numbers" + one.removeprefix("a number")
        return one.removeprefix("a ").replace(" number", " numbers", 1)

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not _is_number(value) or not _finite(value):
            raise self._wrong(value, span, key)
        low_bad = self.min is not None and (value <= self.min if self.open_min else value < self.min)
        high_bad = self.max is not None and (value >= self.max if self.open_max else value > self.max)
        if low_bad or high_bad:
            raise self._wrong(value, span, key)
        return float(value)


@dataclass(frozen=True)
class Bool(Kind):
    """``true`` or ``false``."""

    def describe(self) -> str:
        return "true or false"

    def plural(self) -> str:
        return "booleans (true or false)"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not isinstance(value, bool):
            raise self._wrong(value, span, key)
        return value


@dataclass(frozen=True)
class Str(Kind):
    """A quoted string."""

    def describe(self) -> str:
        return 'a string in double quotes ("...")'

    def plural(self) -> str:
        return 'strings in double quotes ("...")'

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not isinstance(value, str):
            raise self._wrong(value, span, key)
        return value


@dataclass(frozen=True)
class Choice(Kind):
    """One of a fixed set of names."""

    choices: tuple[str, ...]
    #: other names people use for a choice, e.g. ``("gpu", "cuda")``, for the hint
    aliases: tuple[tuple[str, str], ...] = ()
    symbols = True

    def describe(self) -> str:
        if len(self.choices) <= 2:
            return one_of(self.choices)  # 'all'; 'cpu' or 'cuda'
        return "one of " + one_of(self.choices)

    def plural(self) -> str:
        return f"names, each {self.describe()}" if len(self.choices) > 1 else self.describe()

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not isinstance(value, str) or value not in self.choices:
            alias = dict(self.aliases).get(value) if isinstance(value, str) else None
            hint = f"did you mean '{alias}'?" if alias else None
            hint = hint or (did_you_mean(value, self.choices) if isinstance(value, str) else None)
            if isinstance(value, str):
                raise SpecError(f"unknown {key} '{value}'; expected {one_of(self.choices)}", span, hint=hint)
            raise self._wrong(value, span, key, hint)
        return value


@dataclass(frozen=True)
class Either(Kind):
    """The first of several kinds that accepts the value."""

    kinds: tuple[Kind, ...]

    @property
    def symbols(self) -> bool:  # type: ignore[override]
        return any(k.symbols for k in self.kinds)

    def describe(self) -> str:
        return " or ".join(k.describe() for k in self.kinds)

    def plural(self) -> str:
        return " or ".join(k.plural() for k in self.kinds)

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        for kind in self.kinds:
            try:
                return kind.check(value, span, key)
            except SpecError:
                continue
        raise self._wrong(value, span, key)


@dataclass(frozen=True)
class ListOf(Kind):
    """A list (or range) of items of one kind."""

    item: Kind
    min_length: int = 0
    unique: bool = True

    @property
    def symbols(self) -> bool:  # type: ignore[override]
        return self.item.symbols

    def describe(self) -> str:
        items = ("distinct " if self.unique else "") + self.item.plural()
        if self.min_length > 1:
            return f"a list of at least {self.min_length} {items}"
        return f"a {'non-empty ' if self.min_length == 1 else ''}list of {items}"

    def plural(self) -> str:
        return "lists" + self.describe().removeprefix("a list")

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not isinstance(value, tuple):
            value = (value,)
        items = tuple(self.item.check(v, span, key) for v in value)
        if len(items) < self.min_length:
            noun = "item" if self.min_length == 1 else "items"
            raise SpecError(f"'{key}' needs at least {self.min_length} {noun}", span)
        if self.unique and len(set(items)) != len(items):
            repeated = next(v for v in items if items.count(v) > 1)
            raise SpecError(f"'{key}' lists {describe(repeated)} twice", span)
        return items


@dataclass(frozen=True)
class Layers(Kind):
    """A layer selector: ``N``, ``A..B``, ``last``, or a list of those.  Stored as a tuple
    of ints and the word ``"last"``, resolved once the depth is known."""

    allow_empty: bool = False
    symbols = True

    def describe(self) -> str:
        return "a layer number, a range A..B, 'last', or a list of those"

    def plural(self) -> str:
        return "layer selectors (a layer number, a range A..B, 'last', or a list of those)"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        items = value if isinstance(value, tuple) else (value,)
        out: list[int | str] = []
        for v in items:
            if isinstance(v, tuple):
                out.extend(self.check(v, span, key))
                continue
            if v == "last":
                out.append("last")
                continue
            if _is_number(v) and float(v).is_integer() and v >= 1:
                out.append(int(v))
                continue
            hint = did_you_mean(v, ["last"]) if isinstance(v, str) else "layers are numbered from 1"
            raise SpecError(f"'{key}' must be {self.describe()}, got {describe(v)}", span, hint=hint)
        if not out and not self.allow_empty:
            raise SpecError(f"'{key}' selects no layer", span)
        return tuple(out)


@dataclass(frozen=True)
class Nested(Kind):
    """A call that builds an IR node, e.g. ``sgd(lr = 0.1)`` or ``mlp(hidden = 1)``.
    The builder constructs the node; this kind only names the constructors."""

    constructors: tuple[str, ...]
    bare: bool = False  # a bare name (``constant``) is the call without arguments

    symbols = True

    def describe(self) -> str:
        return one_of(f"{c}(...)" for c in self.constructors)

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        return value  # built and validated by the builder


@dataclass(frozen=True)
class AnyValue(Kind):
    """Anything (checked elsewhere)."""

    symbols = True

    def describe(self) -> str:
        return "a value"

    def plural(self) -> str:
        return "values"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        return value


@dataclass(frozen=True, kw_only=True)
class Option:
    """One declared key: its name, kind, default (``REQUIRED`` if none) and help.

    Backends declare their options as a tuple of these; the core validates an options
    block against them with the same messages as its own blocks.
    """

    name: str
    kind: Kind
    default: Any = REQUIRED
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def option_field(kind: Kind, *, default: Any = REQUIRED, help: str = "") -> Any:
    """A dataclass field declaring a key of a block."""
    meta = {"option": Option(name="", kind=kind, default=default, help=help)}
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def suggest_key(key: str, known: Sequence[str]) -> str | None:
    """The hint for an unknown key."""
    return did_you_mean(key, known) or (f"known keys: {', '.join(known)}" if known else None)
