"""Properties over generated specs: formatting, YAML and ``--set`` keep the meaning.

The strategy writes valid specs as text, the way people do: statements in any order,
optional blocks left out, values as literals or expressions (``1 / sqrt(dim)``, a
sweep variable), separators that are newlines, commas or semicolons, uneven spacing,
and comments wherever whitespace may go.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfdsl
from mfdsl.language import expr as ex
from mfdsl.language.fmt import format_source
from mfdsl.language.syntax import parse_text, parse_value

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "erf", "identity", "piecewise_linear"]
COMMENT_TEXT = st.text(alphabet="abc XYZ 019 {}=;,#~.()[]\"'é±\t", max_size=12)


# ---- values as tokens ----------------------------------------------------------------

Tokens = list[str]


def _float_literal(value: float) -> st.SearchStrategy[Tokens]:
    forms = [repr(value).replace("e+", "e"), f"{value:e}", f"{value:.17g}"]
    valid = [f for f in forms if _is_float_syntax(f) and float(f) == value]
    return st.sampled_from(valid).map(lambda text: [text])


def _is_float_syntax(text: str) -> bool:
    return re.fullmatch(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text) is not None


@st.composite
def number(draw: st.DrawFn, value: float) -> Tokens:
    """Tokens of an expression worth exactly ``value`` (an int or a float)."""
    negative = value < 0 or (isinstance(value, float) and str(value).startswith("-"))
    magnitude = abs(value)
    if isinstance(value, int):
        tokens = [str(magnitude)]
        if magnitude >= 2 and draw(st.booleans()):
            a = draw(st.integers(1, magnitude - 1))
            tokens = [str(a), "+", str(magnitude - a)]
            if negative:
                tokens = ["(", *tokens, ")"]
    else:
        tokens = draw(_float_literal(magnitude))
    form = draw(st.sampled_from(["plain", "plain", "parens", "plus", "times", "negneg"]))
    if form == "parens":
        tokens = ["(", *tokens, ")"]
    elif form == "plus":
        tokens = ["+", *tokens]
    elif form == "times":
        tokens = ["(", *tokens, ")", "*", "2", "/", "2"]
    elif form == "negneg" and not negative:
        tokens = ["-", "(", "-", *(tokens if len(tokens) == 1 else ["(", *tokens, ")"]), ")"]
    return ["-", *tokens] if negative else tokens


def nice_float(low: float, high: float) -> st.SearchStrategy[float]:
    picks = [v for v in (0.0, 0.001, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.5, 1e-5, 12.75) if low <= v <= high]
    any_float = st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return st.one_of(st.sampled_from(picks), any_float) if picks else any_float


def value(
    draw: st.DrawFn, low: float, high: float, *, symbols: Sequence[str] = (), integer: bool = False
) -> Tokens:
    """A number in ``[low, high]``, sometimes an expression of ``symbols``."""
    if symbols and draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(symbols))
        return draw(
            st.sampled_from(
                [
                    [name],
                    [name, "/", "sqrt", "(", "dim", ")"],
                    ["(", name, "+", "1", ")", "*", "2"],
                    ["2", "**", "-", "1", "*", name],
                    ["sqrt", "(", "2", ")", "/", "sqrt", "(", name, ")"],
                    ["-", "(", "-", name, ")"],
                    ["(", name, ")", "**", "(", "1", "/", "2", ")", "**", "2"],
                    ["1", "-", "(", "1", "-", name, ")", "-", "1"],
                    ["-", name, "**", "2", "*", "-", "(", "3", "-", "1", ")"],
                    ["exp", "(", "log", "(", name, ")", ")", "/", "(", "2", "*", "width", ")"],
                ]
            )
        )
    if integer:
        return draw(number(draw(st.integers(int(low), int(high)))))
    return draw(number(draw(nice_float(low, high))))


def layers(draw: st.DrawFn, chosen: list[int], last: int | None) -> Tokens:
    """A layer selector for the sorted layers ``chosen`` (``last`` names the output)."""

    def one(layer: int) -> str:
        return "last" if layer == last and draw(st.booleans()) else str(layer)

    consecutive = chosen == list(range(chosen[0], chosen[-1] + 1))
    if len(chosen) == 1 and draw(st.booleans()):
        return [one(chosen[0])]
    if consecutive and len(chosen) > 1 and draw(st.booleans()):
        return [str(chosen[0]), "..", str(chosen[-1])]  # 'last' is no number
    return list_of([[one(layer)] for layer in chosen])


def subset(draw: st.DrawFn, items: list[int], min_size: int = 1) -> list[int]:
    return sorted(draw(st.lists(st.sampled_from(items), min_size=min_size, max_size=len(items), unique=True)))


def call(name: str, args: list[tuple[str, Tokens]], draw: st.DrawFn, *, positional: int = 0) -> Tokens:
    """``name(...)`` with the first ``positional`` arguments sometimes unnamed."""
    unnamed = draw(st.integers(0, min(positional, len(args))))
    tokens = [name, "("]
    for n, (key, arg) in enumerate(args):
        if n:
            tokens.append(",")
        tokens += arg if n < unnamed else [key, "=", *arg]
    if args and draw(st.integers(0, 4)) == 0:
        tokens.append(",")
    return [*tokens, ")"]


# ---- statements ----------------------------------------------------------------------


@dataclass
class Stmt:
    head: Tokens
    items: list[Tokens] | None = None


@dataclass
class Generated:
    statements: list[Stmt]
    has_steps: bool


@st.composite
def specs_parts(draw: st.DrawFn) -> Generated:
    statements: list[Stmt] = []
    extra: dict[str, Tokens] = {}  # sweep variables beyond width and seed

    # Sweep variables used elsewhere are decided first, so expressions can use them.
    uses = draw(st.sets(st.sampled_from(["eta", "sigma", "scale", "d", "tag"]), max_size=3))
    if "eta" in uses:
        extra["eta"] = ["[", "0.1", ",", "0.2", "]"]
    if "sigma" in uses:
        extra["sigma"] = draw(st.sampled_from([["[", "1", ",", "2", "]"], ["1", "..", "3"], ["0.5"]]))
    if "scale" in uses:
        chosen = draw(
            st.lists(st.sampled_from(["mean_field", "ntk", "standard", "mup"]), min_size=1, unique=True)
        )
        extra["scale"] = list_of([[c] for c in chosen])
    if "d" in uses:
        extra["d"] = draw(st.sampled_from([["[", "3", ",", "5", "]"], ["2", "..", "4"], ["7"]]))
    if "tag" in uses:
        words = st.sampled_from(
            ['"a b"', '"x"', '"true"', '"1"', '"a\\nb"', "alpha", "beta", "true", "false", "3", "0.5"]
        )
        extra["tag"] = list_of([[w] for w in draw(st.lists(words, min_size=1, max_size=4, unique=True))])
    float_symbols = [s for s in ("eta", "sigma") if s in extra]

    # data
    kind = draw(st.sampled_from(["isotropic_gaussian", "teacher", "teacher", "isotropic_gaussian", "mnist"]))
    entries: list[Tokens] = []
    finite_train = False
    classes = 10
    if kind == "mnist":
        if draw(st.booleans()):
            entries.append(
                [
                    "root",
                    "=",
                    draw(
                        st.sampled_from(['"~/data/mnist"', '"/tmp/a b"', '"a\\"q"', '"tab\\tnew\\nline\\\\"'])
                    ),
                ]
            )
        if draw(st.booleans()):
            chosen = subset(draw, list(range(10)), 2)
            classes = len(chosen)
            entries.append(["classes", "=", *layers(draw, chosen, None)])
        if draw(st.booleans()):
            entries.append(["train", "=", *draw(st.sampled_from([["all"], ["100"], ["60000"]]))])
            finite_train = True
        if draw(st.booleans()):
            entries.append(["test", "=", *draw(st.sampled_from([["all"], ["100"]]))])
    else:
        dim = ["d"] if "d" in extra else value(draw, 1, 100, integer=True)
        entries.append(["dim", "=", *dim])
        if kind == "isotropic_gaussian" and draw(st.booleans()):
            entries.append(["delta", "=", *value(draw, 0, 0.99)])
        if kind == "teacher":
            if draw(st.booleans()):
                teacher_args = [
                    ("hidden", value(draw, 1, 3, integer=True)),
                    ("width", value(draw, 1, 8, integer=True)),
                    ("activation", [draw(st.sampled_from(ACTIVATIONS))]),
                    ("bias", [draw(st.sampled_from(["true", "false"]))]),
                ]
                teacher_args = teacher_args[: draw(st.integers(0, 4))]
                entries.append(["teacher", "=", *call("mlp", teacher_args, draw, positional=4)])
            if draw(st.booleans()):
                entries.append(["noise", "=", *value(draw, 0, 1, symbols=float_symbols)])
        if draw(st.booleans()):
            finite_train = draw(st.booleans())
            entries.append(
                ["train", "=", *(value(draw, 1, 5000, integer=True) if finite_train else ["online"])]
            )
        if draw(st.booleans()):
            entries.append(["test", "=", *value(draw, 64, 5000, integer=True)])
    statements.append(Stmt(["data", kind], draw(st.permutations(entries))))

    # network
    hidden = 1
    if draw(st.integers(0, 3)):
        hidden = draw(st.integers(1, 4))
        net = [
            ["hidden", "=", *draw(number(hidden))],
            ["activation", "=", draw(st.sampled_from(ACTIVATIONS))],
        ]
        if draw(st.booleans()):
            net.append(["bias", "=", draw(st.sampled_from(["true", "false"]))])
        if draw(st.booleans()):
            net.append(["output", "=", draw(st.sampled_from(["identity", "tanh", "sigmoid"]))])
        statements.append(Stmt(["network", "mlp"], draw(st.permutations(net))))
    last = hidden + 1
    weights = list(range(1, last + 1))

    # scaling
    if "scale" in extra:
        statements.append(Stmt(["scaling", "scale"]))
    elif draw(st.booleans()):
        statements.append(Stmt(["scaling", draw(st.sampled_from(["mean_field", "ntk", "standard", "mup"]))]))

    # init: every weight layer exactly once
    if draw(st.booleans()):
        order = draw(st.permutations(weights))
        cuts = (
            sorted(draw(st.sets(st.integers(1, len(order) - 1), max_size=len(order) - 1))) if last > 1 else []
        )
        rules = []
        for chunk in (order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)])):
            which = draw(st.sampled_from(["normal", "uniform", "constant"]))
            symbols = ["dim", *float_symbols]
            if which == "normal":
                args = [
                    ("mean", value(draw, -2, 2, symbols=symbols)),
                    ("std", value(draw, 0, 3, symbols=symbols)),
                ]
            elif which == "uniform":
                low = draw(nice_float(-2, 2))
                args = [("low", draw(number(low))), ("high", draw(number(draw(nice_float(low, 3)))))]
            else:
                args = [("value", value(draw, -1, 1, symbols=symbols))]
            rules.append(
                ["layer", *layers(draw, sorted(chunk), last), "~", *call(which, args, draw, positional=2)]
            )
        statements.append(Stmt(["init"], rules))

    # train
    lr = value(draw, 0.001, 1, symbols=[s for s in float_symbols if s == "eta"])
    if draw(st.booleans()):
        args = [("lr", lr), ("momentum", value(draw, 0, 0.9)), ("weight_decay", value(draw, 0, 0.1))]
        optimizer = call("sgd", args[: draw(st.integers(1, 3))], draw, positional=3)
    else:
        args = [("lr", lr), ("temperature", value(draw, 0, 1)), ("weight_decay", value(draw, 0, 0.1))]
        optimizer = call("langevin", args[: draw(st.integers(2, 3))], draw, positional=3)
    train = [["optimizer", "=", *optimizer]]
    # cross_entropy needs three or more classes, logistic two
    multiclass = kind == "mnist" and classes > 2
    losses = ["mse"] if kind == "teacher" else ["mse", "cross_entropy" if multiclass else "logistic"]
    if draw(st.booleans()):
        train.append(["loss", "=", draw(st.sampled_from(losses))])
    if draw(st.booleans()):
        train.append(["batch", "=", *value(draw, 1, 64, integer=True)])
    has_steps = not (finite_train and draw(st.booleans()))
    train.append(["steps" if has_steps else "epochs", "=", *value(draw, 1, 10_000, integer=True)])
    if draw(st.booleans()):
        frozen = subset(draw, weights, 0)
        train.append(["freeze", "=", *(layers(draw, frozen, last) if frozen else ["[", "]"])])
    if draw(st.booleans()):
        schedule = draw(
            st.sampled_from(
                [
                    ["constant"],
                    ["cosine"],
                    ["cosine", "(", "final", "=", "0.1", ")"],
                    ["linear", "(", ")"],
                    ["step", "(", "every", "=", "10", ",", "factor", "=", "0.5", ")"],
                    ["inverse_time", "(", "rate", "=", "2", ")"],
                ]
            )
        )
        train.append(["schedule", "=", *schedule])
    statements.append(Stmt(["train"], draw(st.permutations(train))))

    # record
    if draw(st.booleans()):
        hidden_layers = list(range(1, last))
        options: dict[str, Tokens] = {
            "train_loss": ["train_loss"],
            "test_loss": draw(st.sampled_from([["test_loss"], ["test_loss", "(", ")"]])),
            "output": call(
                "output", [("probes", value(draw, 1, 64, integer=True))][: draw(st.integers(0, 1))], draw
            ),
            "neuron_spread": call(
                "neuron_spread",
                [("layer", layers(draw, subset(draw, hidden_layers), None)), ("probes", ["8"])][
                    : draw(st.integers(0, 2))
                ],
                draw,
            ),
            "weight_change": call(
                "weight_change", [("layer", layers(draw, subset(draw, weights), last))], draw
            ),
            "preactivation_rms": call(
                "preactivation_rms",
                [("layer", layers(draw, subset(draw, weights), last)), ("probes", ["8"])][
                    : draw(st.integers(0, 2))
                ],
                draw,
            ),
            "particles": call(
                "particles",
                [("layer", [str(draw(st.sampled_from(hidden_layers)))]), ("sample", ["16"])][
                    : draw(st.integers(0, 2))
                ],
                draw,
            ),
        }
        if kind != "teacher":
            options["test_accuracy"] = ["test_accuracy"]
        names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, unique=True))
        mode = draw(st.sampled_from(["every", "log"]))
        statements.append(
            Stmt(["record", mode, *value(draw, 1, 500, integer=True)], [options[n] for n in names])
        )

    # sweep
    widths = draw(st.lists(st.integers(1, 2048), min_size=1, max_size=4, unique=True))
    width = (
        [str(widths[0])] if len(widths) == 1 and draw(st.booleans()) else list_of([[str(w)] for w in widths])
    )
    if len(widths) == 1 and widths[0] < 2000 and draw(st.booleans()):
        width = [str(widths[0]), "..", str(widths[0] + draw(st.integers(0, 3)))]
    sweep = [["width", "=", *width]]
    if draw(st.booleans()):
        seed = draw(st.sampled_from([["0", "..", "2"], ["[", "1", ",", "7", "]"], ["3"]]))
        sweep.append(["seed", "=", *seed])
    sweep += [[name, "=", *tokens] for name, tokens in extra.items()]
    statements.append(Stmt(["sweep"], draw(st.permutations(sweep))))

    if draw(st.booleans()):
        backends = draw(st.lists(st.sampled_from(["torch", "jax"]), min_size=1, unique=True))
        statements.append(Stmt(["backends", *list_of([[b] for b in backends])[1:-1]]))
    if draw(st.booleans()):
        statements.append(
            Stmt(["torch"], [["device", "=", "cpu"], ["dtype", "=", "float32"]][: draw(st.integers(0, 2))])
        )
    if draw(st.booleans()):
        statements.append(Stmt(["experiment", draw(st.sampled_from(["e", "exp_1", "Run"]))]))
    return Generated(draw(st.permutations(statements)), has_steps)


def list_of(items: list[Tokens]) -> Tokens:
    """``[a, b, ...]`` from the tokens of each item."""
    tokens = ["["]
    for n, item in enumerate(items):
        tokens += [",", *item] if n else item
    return [*tokens, "]"]


# ---- layout ------------------------------------------------------------------------------

PUNCTUATION = set("{}[](),;=~+-*/") | {"**", ".."}


@st.composite
def render(draw: st.DrawFn, generated: Generated) -> str:
    """The statements as text, with the layout drawn at random."""
    style = draw(st.sampled_from(["tidy", "compact", "messy", "messy"]))

    def comment() -> str:
        return "#" + draw(COMMENT_TEXT)

    def gap(left: str, right: str) -> str:
        glued = left in PUNCTUATION or right in PUNCTUATION
        if style == "tidy":
            return "" if left in "([" or right in ")],(" else " "
        if style == "compact":
            return "" if glued else " "
        choice = draw(st.sampled_from(["", " ", " ", " ", "  ", "\t", "\n  ", "comment", "own-line"]))
        if choice == "comment":
            return f" {comment()}\n  "
        if choice == "own-line":
            return f"\n{comment()}\n\n"
        return " " if choice == "" and not glued else choice

    def tokens(ts: Tokens) -> str:
        out = ts[0]
        for left, right in itertools.pairwise(ts):
            out += gap(left, right) + right
        return out

    def separator(outer: bool) -> str:
        if style == "tidy":
            return "\n\n" if outer else "\n  "
        if style == "compact":
            return draw(st.sampled_from([";", ","] if not outer else [";", " "]))
        options = [" ", "\n", "\n\n", ";", " ; ", ";;\n", "\n\n\n", "c1", "c2", "c3"]
        if not outer:
            options += [",", ", ", ",\n"]
        choice = draw(st.sampled_from(options))
        if choice == "c1":
            return f"  {comment()}\n"
        if choice == "c2":
            return f"\n{comment()}\n{comment()}\n\n"
        if choice == "c3":  # two trailing comments in a row, the second after a ';'
            return f" {comment()}\n; {comment()}\n"
        return choice

    def statement(stmt: Stmt) -> str:
        text = tokens(stmt.head)
        if stmt.items is None:
            return text
        text += gap(stmt.head[-1], "{") + "{"
        inner = [tokens(item) for item in stmt.items]
        if inner:
            text += (separator(False) if style == "messy" else " ") + separator(False).join(inner)
            text += separator(False) if style == "messy" else " "
        return text + "}"

    start = f"{comment()}\n\n" if style == "messy" and draw(st.booleans()) else ""
    end = f"\n{comment()}\n" if style == "messy" and draw(st.booleans()) else "\n"
    return start + separator(True).join(statement(s) for s in generated.statements) + end


@st.composite
def specs(draw: st.DrawFn) -> tuple[str, bool]:
    generated = draw(specs_parts())
    return draw(render(generated)), generated.has_steps


# ---- expressions as syntax trees -------------------------------------------------------

_NAMES = st.sampled_from(["x", "dim", "width", "eta", "relu", "last", "mlp"])
_NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
).map(lambda v: ex.Num(value=v))
_LEAVES = st.one_of(
    _NUMBERS,
    _NAMES.map(lambda n: ex.Name(id=n)),
    st.booleans().map(lambda b: ex.Bool(value=b)),
    st.text(max_size=6).map(lambda t: ex.Str(value=t)),
)


def _compound(children: st.SearchStrategy[ex.Expr]) -> st.SearchStrategy[ex.Expr]:
    ranges = st.builds(lambda lo, hi: ex.Range(lo=lo, hi=hi), children, children)
    values = st.one_of(children, ranges)
    kwargs = st.dictionaries(st.sampled_from(["lr", "std", "layer", "a"]), values, max_size=2)
    return st.one_of(
        st.builds(
            lambda op, left, right: ex.BinOp(op=op, left=left, right=right),
            st.sampled_from(["+", "-", "*", "/", "**"]),
            children,
            children,
        ),
        # The parser folds the minus into a literal, so -NUMBER is a Num, never a Neg.
        children.filter(lambda c: not isinstance(c, ex.Num)).map(lambda c: ex.Neg(operand=c)),
        st.builds(
            lambda func, args, kw: ex.Call(func=func, args=tuple(args), kwargs=tuple(kw.items())),
            st.sampled_from(["sqrt", "normal", "f"]),
            st.lists(values, max_size=3),
            kwargs,
        ),
        st.lists(values, max_size=3).map(lambda items: ex.List(items=tuple(items))),
    )


EXPRESSIONS = st.recursive(_LEAVES, _compound, max_leaves=12)
VALUES = st.one_of(EXPRESSIONS, st.builds(lambda lo, hi: ex.Range(lo=lo, hi=hi), EXPRESSIONS, EXPRESSIONS))


# ---- the properties ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_to_source_parses_back_to_the_same_tree(expr: ex.Expr) -> None:
    text = ex.to_source(expr)
    assert parse_value(text) == expr
    assert ex.to_source(parse_value(text)) == text


@PROPERTY_SETTINGS
@given(specs())
def test_generated_specs_are_valid(case: tuple[str, bool]) -> None:
    source, _ = case
    mfdsl.parse(source)


@PROPERTY_SETTINGS
@given(specs())
def test_format_keeps_meaning_and_is_idempotent(case: tuple[str, bool]) -> None:
    source, _ = case
    out = format_source(source)
    assert mfdsl.parse(out) == mfdsl.parse(source)
    assert parse_text(out).statements == parse_text(source).statements
    assert format_source(out) == out
    assert [c.text for c in parse_text(out).comments] == [c.text for c in parse_text(source).comments]
    assert out.endswith("\n") and not out.endswith("\n\n")


@PROPERTY_SETTINGS
@given(specs())
def test_yaml_round_trip(case: tuple[str, bool]) -> None:
    source, _ = case
    spec = mfdsl.parse(source)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(mfdsl.to_yaml(spec), encoding="utf-8")
        assert mfdsl.load(path) == spec


@PROPERTY_SETTINGS
@given(specs())
def test_set_overrides_steps(case: tuple[str, bool]) -> None:
    source, has_steps = case
    if has_steps:
        assert mfdsl.parse(source, overrides=["train.steps=7"]).train.steps == 7
    else:
        with pytest.raises(mfdsl.SpecError, match="not both"):
            mfdsl.parse(source, overrides=["train.steps=7"])
