"""Neuronal embeddings: the latent coordinates of neurons, and weights as functions of them.

Pham & Nguyen (2020) describe a network of any width as a sample of a *neuronal
embedding*: a fixed probability space ``Ω_ℓ`` per hidden layer, a latent coordinate
``c_i ∈ Ω_ℓ`` per neuron, and initial weights that are functions ``w_ℓ(c_{ℓ-1}, c_ℓ)`` of
the coordinates of the two neurons they join.  The i.i.d. initialisation is the special
case where the weights carry their own randomness; correlated ("bidirectionally
diverse") initialisations make the weights depend on the coordinates, so that the
neurons of a middle layer differ from each other even at infinite width.

mfdsl takes ``Ω_ℓ = [0, 1]`` with the uniform law for every hidden layer.  That loses no
generality: every standard probability space is the image of ``[0, 1]`` under a
measurable map, so any other law of coordinates is written inside the mean function
(``u_in ** 2``, ``1 - sqrt(u_out)``, …).  The spec's ``embedded(mean, std)``
draws weight ``W_ℓ[i, j]`` as

    ``m(u_{ℓ-1, i}, u_{ℓ, j}) + std · ε_ij``,   ``ε_ij ~ N(0, 1)`` i.i.d.,

with ``m`` the ``mean`` expression of the variables ``u_in`` (the coordinate of the
neuron the weight leaves) and ``u_out`` (of the neuron it enters).  The inputs and the
outputs are not neurons: the first layer's weights ``w_1(c_1) ∈ R^d`` depend on ``u_out``
only, the read-out's ``w_{L+1}(c_L) ∈ R^K`` on ``u_in`` only (the paper's ``w_1(t, c_1)``
and ``w_{L+1}(t, c_L)``), and the IR refuses the other variable there.

This module holds the expression machinery: the option kind of ``mean``, binding a
sweep point's variables into it, and evaluating it on arrays of coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfdsl.core.errors import Span, SpecError
from mfdsl.language import expr as ex
from mfdsl.language.options import Kind, _finite, _is_number

#: the latent variables of a mean function
LATENT = ("u_in", "u_out")

#: numpy versions of :data:`mfdsl.language.expr.FUNCTIONS`, for evaluation on arrays
ARRAY_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sqrt": np.sqrt,
    "log": np.log,
    "exp": np.exp,
    "sin": np.sin,
    "cos": np.cos,
    "tanh": np.tanh,
    "abs": np.abs,
}

#: points per side of the grid of [0, 1]² on which ``mfdsl check`` evaluates a mean function
GRID = 33


@dataclass(frozen=True)
class LatentFunction(Kind):
    """A number, or an expression of the latent coordinates ``u_in`` and ``u_out`` (and
    of ``dim``, ``width`` and sweep variables, bound at each sweep point)."""

    def describe(self) -> str:
        return "a number or an expression of u_in and u_out"

    def check(self, value: Any, span: Span | None, key: str) -> Any:
        if not _is_number(value) or not _finite(value):
            raise self._wrong(value, span, key, hint="e.g. mean = cos(2 * pi * (u_in - u_out))")
        return float(value)


def latent_names(expr: Any) -> list[ex.Name]:
    """The uses of ``u_in`` and ``u_out`` in ``expr`` (none for a number), in source order."""
    if not isinstance(expr, ex.EXPR_TYPES):
        return []
    return [n for n in ex.names(expr) if n.id in LATENT]


def bind(expr: ex.Expr, env: Mapping[str, Any]) -> ex.Expr:
    """``expr`` with the variables of ``env`` (``dim``, ``width``, sweep variables) and the
    named constants replaced by their values, and every sub-expression free of ``u_in``
    and ``u_out`` folded into a number.  What is left is a function of the latent
    coordinates alone (or a :class:`~mfdsl.language.expr.Num`).  Errors (a name that is not
    bound, division by zero, a string where a number belongs) are ``SpecError`` at the
    offending text."""
    if isinstance(expr, ex.Name):
        if expr.id in LATENT and expr.id not in env:
            return expr
        return ex.Num(value=_number(ex.evaluate(expr, env), expr), span=expr.span)
    if isinstance(expr, ex.Num):
        return expr
    if isinstance(expr, (ex.Str, ex.Bool, ex.List, ex.Range)):
        raise SpecError(f"expected a number, got {ex.to_source(expr)}", expr.span)
    if isinstance(expr, ex.Neg):
        inner = bind(expr.operand, env)
        if isinstance(inner, ex.Num):
            return ex.Num(value=ex.evaluate(ex.Neg(operand=inner, span=expr.span), {}), span=expr.span)
        return ex.Neg(operand=inner, span=expr.span)
    if isinstance(expr, ex.BinOp):
        left, right = bind(expr.left, env), bind(expr.right, env)
        node = ex.BinOp(op=expr.op, left=left, right=right, span=expr.span)
        if isinstance(left, ex.Num) and isinstance(right, ex.Num):
            return ex.Num(value=ex.evaluate(node, {}), span=expr.span)
        return node
    if isinstance(expr, ex.Call):
        if expr.func not in ex.FUNCTIONS:
            raise SpecError(
                f"'{expr.func}(...)' is not allowed here",
                expr.func_span or expr.span,
                hint=f"the functions in expressions are {', '.join(ex.FUNCTIONS)}",
            )
        if expr.kwargs or len(expr.args) != 1:
            raise SpecError(f"{expr.func}() takes exactly one argument", expr.span)
        arg = bind(expr.args[0], env)
        call = ex.Call(func=expr.func, args=(arg,), span=expr.span, func_span=expr.func_span)
        if isinstance(arg, ex.Num):
            return ex.Num(value=ex.evaluate(call, {}), span=expr.span)
        return call
    raise TypeError(f"not an expression: {expr!r}")


def _number(value: Any, expr: ex.Expr) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"expected a number, got {ex.describe(value)}", expr.span)
    return value


def evaluate(expr: ex.Expr | float, u_in: Any, u_out: Any) -> np.ndarray:
    """The mean function at the coordinates, float64, broadcast as numpy broadcasts
    ``u_in`` against ``u_out`` (``u_in[:, None]`` and ``u_out[None, :]`` give the matrix
    of a layer).  ``expr`` is bound (:func:`bind`): its only names are ``u_in`` and
    ``u_out``.  Outside a function's domain the value is NaN or ±inf, as numpy gives it."""
    with np.errstate(all="ignore"):
        return np.asarray(_array(expr, {"u_in": u_in, "u_out": u_out}), np.float64)


def _array(expr: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(expr, ex.Num) or not isinstance(expr, ex.EXPR_TYPES):
        value = expr.value if isinstance(expr, ex.Num) else expr
        try:
            return np.float64(value)
        except OverflowError:  # an integer beyond float64: infinite, as numpy's overflows are
            return np.float64(math.inf if value > 0 else -math.inf)
    if isinstance(expr, ex.Name):
        value = env.get(expr.id)
        if value is None:
            raise ValueError(f"the mean function uses '{expr.id}', which is undefined for this layer")
        return np.asarray(value, np.float64)
    if isinstance(expr, ex.Neg):
        return -_array(expr.operand, env)
    if isinstance(expr, ex.BinOp):
        a, b = _array(expr.left, env), _array(expr.right, env)
        if expr.op == "+":
            return a + b
        if expr.op == "-":
            return a - b
        if expr.op == "*":
            return a * b
        if expr.op == "/":
            return a / b
        return np.power(a, b)
    if isinstance(expr, ex.Call):
        return ARRAY_FUNCTIONS[expr.func](_array(expr.args[0], env))
    raise ValueError(f"a mean function cannot hold {ex.to_source(expr)}")


def check_finite(expr: ex.Expr, span: Span | None) -> None:
    """Refuse a bound mean function that is not finite somewhere on a grid of ``[0, 1]²``
    (the latent coordinates are uniform on ``[0, 1)``): a ``SpecError`` naming the first
    such point."""
    grid = np.linspace(0.0, 1.0, GRID)
    values = np.broadcast_to(evaluate(expr, grid[:, None], grid[None, :]), (GRID, GRID))
    bad = np.argwhere(~np.isfinite(values))
    if bad.size == 0:
        return
    i, j = (int(v) for v in bad[0])
    used = {n.id for n in latent_names(expr)}
    where = ", ".join(
        f"{name} = {value:g}" for name, value in (("u_in", grid[i]), ("u_out", grid[j])) if name in used
    )
    raise SpecError(
        f"the mean function is not finite at {where or 'every point'}",
        span,
        hint="the latent coordinates u_in, u_out are uniform on [0, 1]: keep the function finite there "
        "(e.g. log(u_in + 0.1) rather than log(u_in))",
    )


def varies(expr: Any) -> bool:
    """Whether a bound mean function takes more than one value on a grid of ``[0, 1]²``
    (beyond rounding): ``0 * cos(u_in)`` and ``u_in - u_in`` do not."""
    if not latent_names(expr):
        return False
    grid = np.linspace(0.0, 1.0, GRID)
    values = evaluate(bind(expr, {}), grid[:, None], grid[None, :])
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return False
    spread = float(finite.max() - finite.min())
    return spread > 1e-12 * max(1.0, float(np.abs(finite).max()))


def fold(value: Any) -> Any:
    """A bound ``mean`` as the IR stores it: a plain number once no coordinate is left."""
    return value.value if isinstance(value, ex.Num) else value
