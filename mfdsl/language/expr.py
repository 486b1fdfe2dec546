"""Expressions of the spec language: syntax nodes, evaluation and source rendering.

Expressions stay symbolic in the IR wherever they refer to ``dim``, ``width`` or a
sweep variable; :func:`evaluate` turns them into numbers at each sweep point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mfdsl.core.errors import Span, SpecError, did_you_mean

# Deeper expressions are refused: nobody writes them, and recursion over them would
# overflow Python's stack.
MAX_DEPTH = 100
# Integer results beyond this many bits are refused (``10**10**10`` would never finish).
MAX_BITS = 4096


def _span() -> Any:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Num:
    """An integer or float literal."""

    value: int | float
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Str:
    """A string literal."""

    value: str
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Bool:
    """``true`` or ``false``."""

    value: bool
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Name:
    """An identifier: a variable (``dim``, ``width``, a sweep variable) or a symbol
    such as ``relu`` where a block expects one."""

    id: str
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class BinOp:
    """``left op right`` with ``op`` one of ``+ - * / **``."""

    op: str
    left: Expr
    right: Expr
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Neg:
    """Unary minus."""

    operand: Expr
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Call:
    """``func(args, key = value)``: a math function or a constructor such as ``normal``."""

    func: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    span: Span | None = _span()
    func_span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class List:
    """``[a, b, ...]``."""

    items: tuple[Expr, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Range:
    """``lo..hi``: the integers from ``lo`` to ``hi`` inclusive."""

    lo: Expr
    hi: Expr
    span: Span | None = _span()


Expr = Num | Str | Bool | Name | BinOp | Neg | Call | List | Range
EXPR_TYPES = (Num, Str, Bool, Name, BinOp, Neg, Call, List, Range)

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "**": lambda a, b: a**b,
}

FUNCTIONS: dict[str, Callable[[float], float]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    # for the mean functions of embedded(...) inits (mfdsl.language.latent), usable anywhere
    "sin": math.sin,
    "cos": math.cos,
    "tanh": math.tanh,
    "abs": abs,
}

#: named constants; a variable of the same name (a sweep variable) takes precedence
CONSTANTS: dict[str, float] = {"pi": math.pi}

# Binding strength for rendering with the fewest parentheses.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "**": 4}


def children(expr: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions."""
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, Call):
        return expr.args + tuple(v for _, v in expr.kwargs)
    if isinstance(expr, List):
        return expr.items
    if isinstance(expr, Range):
        return (expr.lo, expr.hi)
    return ()


def names(expr: Expr) -> list[Name]:
    """Every :class:`Name` in ``expr``, outside call keywords, in source order."""
    found: list[Name] = []
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, Name):
            found.append(e)
        stack.extend(reversed(children(e)))
    return found


def is_literal(expr: Expr) -> bool:
    """True for a number, string, boolean, symbol, or list/range of those."""
    if isinstance(expr, (Num, Str, Bool)):
        return True
    if isinstance(expr, (List, Range)):
        return all(is_literal(c) for c in children(expr))
    return False


def evaluate(expr: Expr, env: Mapping[str, Any], *, symbols: bool = False) -> Any:
    """The value of ``expr`` with the variables in ``env``.

    Lists and ranges evaluate to tuples.  With ``symbols``, an unknown bare name
    evaluates to its own text (a choice such as ``relu``); otherwise it is an error.
    Calls other than the math functions are not evaluated here: their meaning depends
    on the block, so the IR builder handles them.
    """
    if isinstance(expr, (Num, Str, Bool)):
        return expr.value
    if isinstance(expr, Name):
        if expr.id in env:
            return env[expr.id]
        if expr.id in CONSTANTS:
            return CONSTANTS[expr.id]
        if symbols:
            return expr.id
        raise SpecError(
            f"unknown name '{expr.id}'",
            expr.span,
            hint=did_you_mean(expr.id, [*env, *CONSTANTS])
            or "names in expressions are 'dim', 'width' and the sweep variables",
        )
    if isinstance(expr, List):
        return tuple(evaluate(item, env, symbols=symbols) for item in expr.items)
    if isinstance(expr, Range):
        lo, hi = (_integer(evaluate(e, env), e) for e in (expr.lo, expr.hi))
        if hi < lo:
            raise SpecError(f"empty range {lo}..{hi}", expr.span, hint="ranges are lo..hi, both included")
        if hi - lo > 1_000_000:
            raise SpecError(f"range {lo}..{hi} is too long", expr.span)
        return tuple(range(lo, hi + 1))
    if isinstance(expr, Neg):
        return -_number(evaluate(expr.operand, env), expr.operand)
    if isinstance(expr, BinOp):
        a = _number(evaluate(expr.left, env), expr.left)
        b = _number(evaluate(expr.right, env), expr.right)
        if expr.op == "**" and _too_large(a, b):
            raise SpecError("number too large", expr.span)
        try:
            value = _OPS[expr.op](a, b)
        except ZeroDivisionError:
            raise SpecError("division by zero", expr.span) from None
        except OverflowError:
            raise SpecError("number too large", expr.span) from None
        if isinstance(value, complex):
            raise SpecError("negative number raised to a fractional power", expr.span)
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise SpecError("number too large", expr.span)
        return value
    if isinstance(expr, Call) and expr.func == "geom":
        return geometric(expr, env)
    if isinstance(expr, Call):
        fn = FUNCTIONS.get(expr.func)
        if fn is None:
            raise SpecError(
                f"'{expr.func}(...)' is not allowed here",
                expr.func_span or expr.span,
                hint=did_you_mean(expr.func, FUNCTIONS)
                or f"the functions in expressions are {', '.join(FUNCTIONS)}, and geom(start, stop, count) "
                "makes a geometric range",
            )
        if expr.kwargs or len(expr.args) != 1:
            raise SpecError(f"{expr.func}() takes exactly one argument", expr.span)
        x = _number(evaluate(expr.args[0], env), expr.args[0])
        try:
            return fn(x)
        except (ValueError, OverflowError):
            raise SpecError(f"{expr.func}({x:g}) is undefined", expr.span) from None
    raise TypeError(f"not an expression: {expr!r}")


#: significant digits a geometric range's inner float values are rounded to, so that
#: ``geom(0.001, 0.1, 3)`` is 0.001, 0.01, 0.1 and not 0.010000000000000002
_GEOM_DIGITS = 12


def geometric(expr: Call, env: Mapping[str, Any]) -> tuple[int | float, ...]:
    """``geom(start, stop, count)``: ``count`` values from ``start`` to ``stop``
    (both included), each the previous times the same ratio.  Integers when ``start``
    and ``stop`` are (rounded to the nearest; values that round to the same integer
    are an error), else floats rounded to 12 significant digits."""
    hint = "geom(start, stop, count): count values from start to stop, e.g. geom(64, 1024, 5) = 64, 128, 256, 512, 1024"
    if expr.kwargs or len(expr.args) != 3:
        raise SpecError("geom() takes three numbers: start, stop and count", expr.span, hint=hint)
    start, stop, n = (_number(evaluate(a, env), a) for a in expr.args)
    count_at = expr.args[2]
    if (isinstance(n, float) and not n.is_integer()) or n < 2:
        raise SpecError(
            f"geom()'s count must be an integer of at least 2, got {n:g}", count_at.span, hint=hint
        )
    n = int(n)
    if n > 1_000_000:
        raise SpecError(f"geom() of {n} values is too long", count_at.span)
    for value, at in ((start, expr.args[0]), (stop, expr.args[1])):
        if not value > 0 or not math.isfinite(value):
            raise SpecError(f"geom()'s start and stop must be positive, got {value:g}", at.span, hint=hint)
    if start == stop:
        raise SpecError(f"geom({start:g}, {stop:g}, {n}) repeats one value", expr.span, hint=hint)
    ratio = (stop / start) ** (1.0 / (n - 1))
    inner = [start * ratio**k for k in range(1, n - 1)]
    if isinstance(start, int) and isinstance(stop, int):
        values: list[int | float] = [start, *(round(v) for v in inner), stop]
        if len(set(values)) != n:
            raise SpecError(
                f"geom({start}, {stop}, {n}) rounds to repeated integers ({', '.join(map(str, values[:8]))}"
                f"{', …' if n > 8 else ''})",
                expr.span,
                hint="ask for fewer values, or write the bounds as floats (64.0) for values that are not integers",
            )
        return tuple(values)
    return (float(start), *(float(f"{v:.{_GEOM_DIGITS}g}") for v in inner), float(stop))


def _too_large(a: int | float, b: int | float) -> bool:
    """Would ``a ** b`` be an integer of more than :data:`MAX_BITS` bits?"""
    if not (isinstance(a, int) and isinstance(b, int)) or b <= 0 or abs(a) <= 1:
        return False
    return b * (abs(a).bit_length() - 1) > MAX_BITS


def _number(value: Any, expr: Expr) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"expected a number, got {describe(value)}", expr.span)
    return value


def _integer(value: Any, expr: Expr) -> int:
    number = _number(value, expr)
    if isinstance(number, float):
        if not number.is_integer():
            raise SpecError(f"range bounds must be integers, got {number:g}", expr.span)
        return int(number)
    return number


def describe(value: Any) -> str:
    """A short phrase for a value in an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, tuple):
        return "a list"
    if isinstance(value, int) and abs(value) >= 10**30:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}a number of about {digits} digits"
    return repr(value)


def to_source(expr: Expr) -> str:
    """Spec syntax for ``expr``, with the parentheses its structure needs."""
    return _render(expr, 0)


def format_number(value: int | float) -> str:
    """A number literal that parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value) or math.isnan(value):
        raise ValueError(f"{value} has no spec syntax")
    text = repr(value)
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def _render(expr: Expr, context: int) -> str:
    if isinstance(expr, Num):
        text = format_number(abs(expr.value))
        if expr.value < 0 or str(expr.value).startswith("-"):
            text = "-" + text
            return f"({text})" if context > _PRECEDENCE["neg"] else text
        return text
    if isinstance(expr, Str):
        # A string literal cannot span lines, so a newline is written as its escape.
        escaped = expr.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(expr, Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, List):
        return "[" + ", ".join(_render(i, 0) for i in expr.items) + "]"
    if isinstance(expr, Range):
        return f"{_render(expr.lo, 1)}..{_render(expr.hi, 1)}"
    if isinstance(expr, Call):
        parts = [_render(a, 0) for a in expr.args]
        parts += [f"{k} = {_render(v, 0)}" for k, v in expr.kwargs]
        return f"{expr.func}({', '.join(parts)})"
    if isinstance(expr, Neg):
        text = "-" + _render(expr.operand, _PRECEDENCE["neg"])
        return f"({text})" if context > _PRECEDENCE["neg"] else text
    if isinstance(expr, BinOp):
        prec = _PRECEDENCE[expr.op]
        if expr.op == "**":  # right-associative; its left side binds tighter than unary
            left = _render(expr.left, prec + 1)
            right = _render(expr.right, _PRECEDENCE["neg"])
        else:
            left = _render(expr.left, prec)
            right = _render(expr.right, prec + 1)
        text = f"{left} {expr.op} {right}"
        return f"({text})" if context > prec else text
    raise TypeError(f"not an expression: {expr!r}")
