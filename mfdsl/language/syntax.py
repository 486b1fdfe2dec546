"""From spec text to a syntax tree: the Lark parser, its Transformer, and parse errors.

The syntax tree is generic (a statement, its names and its body of entries); the IR
builder in ``_build`` gives it meaning.  It keeps comments and positions, which is all
``mfdsl fmt`` and ``--set`` need.
"""

from __future__ import annotations

import builtins
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import lark
from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.parsers.lalr_interactive_parser import InteractiveParser
from lark.visitors import Transformer_NonRecursive

from mfdsl.core.errors import MAX_ERRORS, Span, SpecError, combined, did_you_mean
from mfdsl.core.resources import grammar_path
from mfdsl.language import expr as ex

KEYWORDS = (
    "experiment",
    "data",
    "network",
    "scaling",
    "init",
    "train",
    "record",
    "sweep",
    "backends",
)

#: the longest spec text, in characters (a spec is a few hundred; a stored spec likewise)
MAX_SOURCE = 1_000_000
#: the most tokens (names, numbers, strings, punctuation) a spec text may hold: parsing
#: costs about 1 kB and 50 µs per token, so this bounds it to ~200 MB and seconds
MAX_TOKENS = 200_000
MAX_DIGITS = 1000  # an integer literal longer than this is refused (Python caps int() at 4300)

# one token of the spec grammar, near enough to count them before parsing
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z0-9_.]+|[^\sA-Za-z0-9_.]')


def _span() -> Any:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Entry:
    """``key = value`` inside a block."""

    key: str
    value: ex.Expr
    span: Span | None = _span()
    key_span: Span | None = _span()


@dataclass(frozen=True, kw_only=True)
class Rule:
    """``layer SELECTOR ~ DISTRIBUTION`` inside ``init``."""

    selector: ex.Expr
    dist: ex.Expr
    span: Span | None = _span()


Item = Entry | Rule | ex.Expr


@dataclass(frozen=True, kw_only=True)
class Statement:
    """One top-level statement.

    ``keyword`` is one of :data:`KEYWORDS` or ``"options"`` (a backend's option block,
    ``NAME { ... }``).  ``names`` are the words after the keyword (the experiment's name,
    a data or network kind, the scaling, ``every``/``log``, backend names, or the
    backend of an options block).  ``arg`` is the record interval, ``body`` the items
    between braces (``None`` when the statement has no braces).
    """

    keyword: str
    names: tuple[str, ...] = ()
    arg: ex.Expr | None = None
    body: tuple[Item, ...] | None = None
    span: Span | None = _span()
    name_spans: tuple[Span | None, ...] = _span()


@dataclass(frozen=True, kw_only=True)
class Comment:
    """A ``#`` comment and where it sits."""

    text: str
    line: int
    column: int
    own_line: bool  # nothing but whitespace before it on its line


@dataclass(frozen=True, kw_only=True)
class Module:
    """A parsed spec file."""

    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = ()
    source: str = field(default="", compare=False, repr=False)
    path: str | None = field(default=None, compare=False)


def _nested(node: ex.Expr, meta: Any) -> ex.Expr:
    depth = 1 + max((getattr(c, "_depth", 0) for c in ex.children(node)), default=0)
    if depth > ex.MAX_DEPTH:
        raise SpecError(f"expression nested more than {ex.MAX_DEPTH} levels deep", Span.of(meta))
    object.__setattr__(node, "_depth", depth)
    return node


class _ToSyntax(Transformer_NonRecursive):
    """Builds syntax nodes from lark's tree, without recursion (deep input stays safe)."""

    # -- expressions
    @v_args(meta=True)
    def int(self, meta: Any, children: builtins.list[Token]) -> ex.Expr:
        text = str(children[0])
        if len(text) > MAX_DIGITS:
            raise SpecError(f"number too large ({len(text)} digits)", Span.of(meta))
        return ex.Num(value=int(text), span=Span.of(meta))

    @v_args(meta=True)
    def float(self, meta: Any, children: builtins.list[Token]) -> ex.Expr:
        value = float(children[0])
        if value == float("inf"):
            raise SpecError(f"number too large: {children[0]}", Span.of(meta))
        return ex.Num(value=value, span=Span.of(meta))

    @v_args(meta=True)
    def string(self, meta: Any, children: builtins.list[Token]) -> ex.Expr:
        raw = str(children[0])[1:-1]
        return ex.Str(value=_unescape(raw), span=Span.of(meta))

    @v_args(meta=True)
    def name(self, meta: Any, children: builtins.list[Token]) -> ex.Expr:
        text = str(children[0])
        if text in ("true", "false"):
            return ex.Bool(value=text == "true", span=Span.of(meta))
        return ex.Name(id=text, span=Span.of(meta))

    @v_args(meta=True)
    def call(self, meta: Any, children: builtins.list[Any]) -> ex.Expr:
        func, *args = children
        positional = tuple(a for a in args if not isinstance(a, tuple))
        keywords = tuple(a[:2] for a in args if isinstance(a, tuple))
        seen: dict[str, Any] = {}
        for a in args:
            if isinstance(a, tuple):
                if a[0] in seen:
                    raise SpecError(f"argument '{a[0]}' given twice", a[2])
                seen[a[0]] = a
            elif seen:
                raise SpecError("positional argument after a keyword argument", a.span)
        node = ex.Call(
            func=str(func), args=positional, kwargs=keywords, span=Span.of(meta), func_span=Span.of(func)
        )
        return _nested(node, meta)

    @v_args(meta=True)
    def kwarg(self, meta: Any, children: builtins.list[Any]) -> tuple[str, ex.Expr, Span | None]:
        return (str(children[0]), children[1], Span.of(children[0]))

    @v_args(meta=True)
    def list(self, meta: Any, children: builtins.list[Any]) -> ex.Expr:
        return _nested(ex.List(items=tuple(children), span=Span.of(meta)), meta)

    @v_args(meta=True)
    def range(self, meta: Any, children: builtins.list[Any]) -> ex.Expr:
        return _nested(ex.Range(lo=children[0], hi=children[1], span=Span.of(meta)), meta)

    @v_args(meta=True)
    def neg(self, meta: Any, children: builtins.list[Any]) -> ex.Expr:
        (operand,) = children
        if isinstance(operand, ex.Num):  # a negative literal is a literal
            return ex.Num(value=-operand.value, span=Span.of(meta))
        return _nested(ex.Neg(operand=operand, span=Span.of(meta)), meta)

    def pos(self, children: builtins.list[Any]) -> ex.Expr:
        return children[0]

    def _binop(op: str) -> Callable[..., ex.Expr]:  # type: ignore[misc]
        @v_args(meta=True)
        def build(self: Any, meta: Any, children: builtins.list[Any]) -> ex.Expr:
            node = ex.BinOp(op=op, left=children[0], right=children[1], span=Span.of(meta))
            return _nested(node, meta)

        return build

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")
    pow = _binop("**")

    # -- block contents
    @v_args(meta=True)
    def entry(self, meta: Any, children: builtins.list[Any]) -> Entry:
        key, value = children
        return Entry(key=str(key), value=value, span=Span.of(meta), key_span=Span.of(key))

    @v_args(meta=True)
    def rule(self, meta: Any, children: builtins.list[Any]) -> Rule:
        _, selector, dist = children
        return Rule(selector=selector, dist=dist, span=Span.of(meta))

    def block(self, children: builtins.list[Any]) -> tuple[Item, ...]:
        return tuple(children)

    @v_args(meta=True)
    def observable(self, meta: Any, children: builtins.list[Token]) -> ex.Expr:
        return ex.Name(id=str(children[0]), span=Span.of(meta))

    observable_call = call

    # -- statements
    def _statement(keyword: str) -> Callable[..., Statement]:  # type: ignore[misc]
        @v_args(meta=True)
        def build(self: Any, meta: Any, children: builtins.list[Any]) -> Statement:
            names = [c for c in children if isinstance(c, Token) and c.type == "NAME"]
            heads = [c for c in children if isinstance(c, Token) and c.type in ("EVERY", "LOG")]
            body = next((c for c in children if isinstance(c, tuple)), None)
            arg = None
            if keyword in ("init", "record"):
                body = tuple(c for c in children if not isinstance(c, (Token, tuple)))
                if keyword == "record":
                    arg, body = body[0], body[1:]
            words = heads + names
            return Statement(
                keyword=keyword,
                names=tuple(str(w) for w in words),
                arg=arg,
                body=body,
                span=Span.of(meta),
                name_spans=tuple(Span.of(w) for w in words),
            )

        return build

    experiment = _statement("experiment")
    data = _statement("data")
    network = _statement("network")
    scaling = _statement("scaling")
    init = _statement("init")
    train = _statement("train")
    record = _statement("record")
    sweep = _statement("sweep")
    backends = _statement("backends")
    options = _statement("options")

    def start(self, children: builtins.list[Any]) -> tuple[Statement, ...]:
        return tuple(c for c in children if isinstance(c, Statement))


def _unescape(raw: str) -> str:
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            out.append(simple.get(raw[i + 1], raw[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


_comments: list[Token] = []


def _cache_file() -> str | bool:
    # The LALR tables are cached (building them with strict collision checks costs
    # about 0.2 s); any unwritable cache directory falls back to no cache.
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "mfdsl")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, delete=True):
            pass  # the folder is writable
    except OSError:
        return False
    return os.path.join(folder, f"grammar-lark{lark.__version__}.cache")


@cache
def parser(start: str = "start") -> Lark:
    """The LALR parser (built once per process, tables cached on disk)."""
    return Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        start=["start", "value"],
        propagate_positions=True,
        maybe_placeholders=False,
        strict=True,
        lexer_callbacks={"COMMENT": _comments.append},
        cache=_cache_file(),
    )


def check_size(source: str, path: str | None = None) -> None:
    """Refuse text longer than :data:`MAX_SOURCE` characters or :data:`MAX_TOKENS`
    tokens before it is parsed (a ``SpecError``, at the first token too many)."""
    if len(source) > MAX_SOURCE:
        raise SpecError(
            f"spec text too large ({len(source)} characters, at most {MAX_SOURCE})", path=path, source=source
        )
    for n, match in enumerate(_TOKEN.finditer(source), start=1):
        if n > MAX_TOKENS:
            start = match.start()
            line = source.count("\n", 0, start) + 1
            column = start - (source.rfind("\n", 0, start) + 1) + 1
            span = Span(line=line, column=column, end_line=line, end_column=column + 1, start_pos=start)
            raise SpecError(
                f"spec text too long: more than {MAX_TOKENS} names, numbers and symbols",
                span,
                hint="a spec has a few hundred; write long sweeps as ranges, e.g. seed = 0..99",
            ).located(path, source)


def parse_text(source: str, path: str | None = None) -> Module:
    """Parse spec text into a :class:`Module`; raise :class:`SpecError` if malformed
    (a :class:`~mfdsl.core.errors.SpecErrors` when later statements hold errors of their own)."""
    check_size(source, path)
    _comments.clear()
    try:
        statements = _statements(source)
    except SpecError as error:
        _comments.clear()
        # (YAML is wrong on every line, for one reason)
        recover = len(source) <= RECOVER_MAX and error.hint != _YAML_HINT
        more = _later_syntax_errors(source, error) if recover else []
        raise combined([error, *more]).located(path, source) from None
    lines = source.split("\n")
    comments = tuple(
        Comment(
            text=str(t).rstrip(),
            line=t.line or 1,
            column=t.column or 1,
            own_line=not lines[(t.line or 1) - 1][: (t.column or 1) - 1].strip(),
        )
        for t in _comments
    )
    _comments.clear()
    return Module(statements=statements, comments=comments, source=source, path=path)


def _statements(source: str) -> tuple[Statement, ...]:
    """The statements of ``source``; the first syntax error raises (not located)."""
    try:
        statements: tuple[Statement, ...] = _ToSyntax().transform(parser().parse(source, start="start"))
    except UnexpectedInput as error:
        raise _translate(error, source, "start") from None
    except VisitError as error:  # a check inside the transformer; lark wraps it
        raise _unwrap(error) from None
    except RecursionError:
        raise SpecError("spec nested too deeply") from None
    return statements


#: specs longer than this (in characters) report their first syntax error only: each
#: further one costs a parse of the rest of the text (a spec is a few hundred characters)
RECOVER_MAX = 100_000

# Where a statement starts: a keyword at the start of a line (not a key such as
# ``train = 100`` inside a data block), or a backend's name and its '{'.
_STATEMENT_START = re.compile(
    r"^(?:(?:" + "|".join(KEYWORDS) + r")\b(?![ \t]*=)|[A-Za-z_][A-Za-z0-9_]*[ \t]*\{)", re.MULTILINE
)


def _later_syntax_errors(source: str, first: SpecError) -> list[SpecError]:
    """The syntax errors after ``first``, each in a statement of its own.

    Parsing resumes at the next statement that starts at the beginning of a line after
    the line of the previous error (the text before is blanked, so lines and columns
    stay the file's); a statement broken by an error is skipped whole, so one mistake
    is reported once, not again for each token after it.
    """
    found: list[SpecError] = []
    error = first
    while len(found) < MAX_ERRORS and error.span is not None:
        lines = source.split("\n", error.span.line)
        if len(lines) <= error.span.line:
            break  # the error is on the last line
        after = len(source) - len(lines[-1])
        match = _STATEMENT_START.search(source, after)
        if match is None:
            break
        rest = re.sub(r"[^\n]", " ", source[: match.start()]) + source[match.start() :]
        try:
            _statements(rest)
        except SpecError as later:
            found.append(later)
            error = later
            continue
        finally:
            _comments.clear()
        break
    return found


def parse_value(source: str, path: str | None = None) -> ex.Expr:
    """Parse a single value (``--set`` and YAML use the spec's value grammar)."""
    check_size(source, path)
    try:
        value: ex.Expr = _ToSyntax().transform(parser().parse(source, start="value"))
    except UnexpectedInput as error:
        raise _translate(error, source, "value").located(path, source) from None
    except SpecError as error:
        raise error.located(path, source) from None
    except VisitError as error:
        raise _unwrap(error).located(path, source) from None
    return value


def _unwrap(error: VisitError) -> SpecError:
    """The SpecError that a check inside the transformer raised (lark wraps it)."""
    if isinstance(error.orig_exc, SpecError):
        return error.orig_exc
    if isinstance(error.orig_exc, RecursionError):
        return SpecError("spec nested too deeply")
    raise error.orig_exc from None


def read_source(path: str | os.PathLike[str]) -> str:
    """A spec file's text; unreadable or non-UTF-8 files raise :class:`SpecError`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read(MAX_SOURCE + 1)
    except FileNotFoundError:
        raise SpecError("no such file", path=name) from None
    except IsADirectoryError:
        raise SpecError("is a directory, not a spec file", path=name) from None
    except OSError as error:
        raise SpecError(f"cannot read: {error.strerror}", path=name) from None
    if len(data) > MAX_SOURCE:
        raise SpecError(
            f"file too large (more than {MAX_SOURCE} bytes)",
            path=name,
            hint="a spec is a few hundred bytes of text; is this the right file?",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        span = Span(line=line, column=column, end_line=line, end_column=column + 1)
        raise SpecError(
            f"not UTF-8 text (byte 0x{data[error.start]:02x})",
            span,
            path=name,
            hint="a spec is a text file; is this the right file?",
        ) from None
    if "\x00" in text:
        offset = text.index("\x00")
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        span = Span(line=line, column=column, end_line=line, end_column=column + 1)
        raise SpecError("binary data (a NUL byte) in a spec", span, path=name, source=text)
    return text


# ---- parse errors in words ------------------------------------------------------------

_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "a number",
    "FLOAT": "a number",
    "STRING": "a string",
    "$END": "the end of the file",
}
_OPERATORS = {"+", "-", "*", "/", "**", ".."}
_VALUE_STARTS = {"INT", "FLOAT", "STRING", "NAME", "LSQB", "LPAR"}

_TOP_LEVEL = "statements sit at the top level, one after another; is a '}' missing above?"
_COMMAS = "items of a list are separated by commas"
_EXTRA_BRACE = "this '}' closes no block; is there one too many?"
_UNCLOSED = "a block is missing its closing '}'"

# Common mistakes, recognised by the parser state they leave (lark's match_examples).
_EXAMPLES: dict[str, list[str]] = {
    "use '=' between a key and its value": [
        "train { steps: 10 }",
        "train { steps 10 }",
        "data teacher { dim 3 }",
        "torch { device: cpu }",
    ],
    "an init rule reads 'layer N ~ distribution', e.g. 'layer 1 ~ normal(0, 1)'": [
        "init { layer 1 = normal(0, 1) }",
        "init { layer 1 normal(0, 1) }",
        "init { layer 1..2 = normal(0, 1) }",
        "init { layer 1..2 normal(0, 1) }",
    ],
    "each init rule starts with 'layer'": [
        "init { 1 ~ normal(0, 1) }",
        "init { layers 1 ~ normal(0, 1) }",
        "init { layer 1 ~ normal(0, 1) 2 ~ normal(0, 1) }",
        "init { layer 1 ~ normal(0, 1) layers 2 ~ normal(0, 1) }",
    ],
    _COMMAS: [
        "sweep { width = [1 2] }",
        "sweep { width = [1, 2 3] }",
        "sweep { width = [1, 2.5 3.5] }",
        "sweep { width = [a b] }",
        'sweep { width = ["a" "b"] }',
        "sweep { width = [[1] [2]] }",
    ],
    "'record' needs 'every N' or 'log N' before its braces, e.g. 'record every 100 { train_loss }'": [
        "record { train_loss }",
        "record 100 { train_loss }",
    ],
    "a value is missing after '='": [
        "train { steps = }",
        "train { steps = , }",
        "train { steps = ; }",
        "train { steps = \n batch = 1 }",
    ],
    _UNCLOSED: [
        "train { steps = 10 ",
        "train { steps = 10, ",
        "data teacher { dim = 3 ",
        "init { layer 1 ~ normal(0, 1) ",
        "record every 10 { train_loss ",
    ],
    "a '(' is never closed": ["train { optimizer = sgd(lr = 0.1 }", "train { a = (1 + 2 }"],
    "a '[' is never closed": ["sweep { width = [1, 2 }"],
    "a statement starts with a keyword (experiment, data, network, scaling, init, train, record, "
    "sweep, backends) or a backend's name followed by '{'": [
        "steps = 10",
        "lr = 0.1",
        "x = 1; data teacher {}",
        "= 1",
        "1",
        "[1]",
        '"x"',
    ],
    _EXTRA_BRACE: ["train { steps = 10 } }", "}"],
    "'..' makes a range of integers, e.g. 0..4": ["sweep { seed = 0.. }", "sweep { seed = ..4 }"],
    _TOP_LEVEL: [
        "train { steps = 10 record every 5 { train_loss } }",
        "train { steps = 10 sweep { width = [1] } }",
        "data teacher { dim = 3 train { steps = 1 } }",
    ],
}

# The same, for a lone value (``--set`` and YAML values): statement-level labels do not
# apply there.
_VALUE_EXAMPLES: dict[str, list[str]] = {
    _COMMAS: ["[1 2]", "[1, 2 3]", "[1, 2.5 3.5]", "[a b]", '["a" "b"]', "[[1] [2]]"],
    "a '(' is never closed": ["sgd(lr = 0.1", "(1 + 2"],
    "a '[' is never closed": ["[1, 2", "[1"],
    "'..' makes a range of integers, e.g. 0..4": ["0..", "..4"],
}

# Labels that fit only an error at the same kind of token as their example: in the
# same parser state, another token usually means another mistake.
_BY_TOKEN = {
    "each init rule starts with 'layer'",
    _COMMAS,
    _UNCLOSED,
    "a '(' is never closed",
    "a '[' is never closed",
    _EXTRA_BRACE,
    _TOP_LEVEL,
}
# Keywords that are also keys (``data teacher { train = 100 }``).
_KEYWORD_KEYS = {"train"}

_HINTS = {
    "'": 'strings use double quotes: "like this"',
    '"': "this string is never closed (a string ends on the line it starts)",
}
_WINDOW = 200  # characters before an error searched for context
_BACKENDS_HINT = "backend names are separated by commas, e.g. 'backends torch, jax'"
# ``backends torch jax``: the parser takes ``jax`` for the start of an options block.
_BACKENDS_LIST = re.compile(r"\bbackends[ \t]+\w+([ \t]*,[ \t]*\w+)*[ \t]+\w+\s*$")


def _words(names: set[str], parser_: Lark, end: str = "the end of the file") -> str:
    names = set(names)
    if names >= _VALUE_STARTS:
        names -= _VALUE_STARTS | {"MINUS", "PLUS", "TRUE", "FALSE"}
        names.add("<value>")
    words: list[str] = []
    literal: list[str] = []
    for name in sorted(names):
        if name == "<value>":
            words.append("a value")
        elif name == "$END":
            words.append(end)
        elif name in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[name])
        else:
            try:
                pattern = parser_.get_terminal(name).pattern
            except KeyError:
                continue
            if pattern.type == "str":
                literal.append(str(pattern.value))
    ops = [t for t in literal if t in _OPERATORS]
    others = [t for t in literal if t not in _OPERATORS]
    if not words and not others:
        others = ops  # only operators would do: name them
    quoted = [f"'{t}'" for t in others] + list(dict.fromkeys(words))
    if not quoted:
        return "something else"
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _accepts(state: Any) -> set[str] | None:
    """The terminals the parser accepts in ``state`` (``None`` if it cannot tell)."""
    try:
        return set(InteractiveParser(None, state, state.lexer).accepts())
    except Exception:  # noqa: BLE001 - fall back to lark's (looser) expected set
        return None


def _position(state: Any) -> Any:
    return getattr(state, "position", state)


def _match_examples(error: UnexpectedInput, start: str) -> str | None:
    """The label of the example in :data:`_EXAMPLES` that fails like ``error``.

    Like lark's ``match_examples``, but parser states are compared by their LALR state
    and the tokens they accept: lark also compares the stack depth, so an example would
    only match an error with as many statements or entries before it.
    """
    p = parser()
    state = getattr(error, "state", None)
    here = _position(state)
    if here is None:
        return None
    accepts = _accepts(state)
    token = getattr(error, "token", None)
    char = getattr(error, "char", None)
    same_state: str | None = None
    same_type: str | None = None
    for label, examples in (_VALUE_EXAMPLES if start == "value" else _EXAMPLES).items():
        for text in examples:
            try:
                p.parse(text, start=start)
            except UnexpectedInput as other:
                if _position(getattr(other, "state", None)) != here:
                    continue
                if _accepts(other.state) != accepts:
                    continue  # the same LALR state, reached in another context
                other_token = getattr(other, "token", None)
                if token is not None and other_token is not None:
                    if other_token.type == token.type and str(other_token) == str(token):
                        return label
                    if other_token.type == token.type and same_type is None:
                        same_type = label
                elif char is not None:
                    # an unexpected character matches only an example with the same one
                    if getattr(other, "char", None) == char:
                        return label
                    continue
                if same_state is None and label not in _BY_TOKEN and start != "value":
                    same_state = label
    return same_type or same_state


def _starts_line(source: str, pos: int) -> bool:
    return not source[source.rfind("\n", 0, pos) + 1 : pos].strip()


_NAME_CHAR = re.compile(r"[A-Za-z0-9_]")
# ``experiment: demo`` at the top level: a line of YAML
_YAML_LINE = re.compile(r"[ \t]*[A-Za-z_][A-Za-z0-9_]*[ \t]*:")
_YAML_HINT = (
    "this looks like YAML: a .mf statement reads e.g. 'experiment demo' or 'train { steps = 100 }'; "
    "a YAML spec is read from a file named .yaml or .yml (mfdsl fmt --from-yaml prints it as .mf)"
)
_WORD = re.compile(r"[A-Za-z0-9_]+(?:[-.][A-Za-z0-9_]+)*")


def _not_a_name(source: str, pos: int, expects_name: bool) -> SpecError | None:
    """The error for a name written with characters names cannot hold (``my-exp``,
    ``run.2``) or starting with a digit (``1st``), when the parser stopped at ``pos``
    inside it; ``None`` when the text there is not such a word."""
    if not 0 <= pos < len(source):
        return None
    char = source[pos]
    begin = pos
    # (a bounded search: a 1 MB word is no name anyone meant)
    while begin > max(0, pos - _WINDOW) and (
        _NAME_CHAR.match(source[begin - 1]) or source[begin - 1] in "-."
    ):
        begin -= 1
    match = _WORD.match(source, begin)
    if match is None or match.end() <= pos:
        return None
    word = match.group()
    if begin > 0 and not source[begin - 1].isspace() and source[begin - 1] not in ",;{([":
        return None
    if char in "-." and (word[0].isalpha() or word[0] == "_"):
        fixed = re.sub(r"[-.]", "_", word)
        problem = "names are letters, digits and '_'"
        hint = f"did you mean '{fixed}'?"
    elif char.isdigit() and pos == begin and expects_name and re.fullmatch(r"[0-9]+[A-Za-z_]\w*", word):
        problem = "names start with a letter or '_'"
        hint = f"e.g. '_{word}'"
    else:
        return None
    line = source.count("\n", 0, begin) + 1
    column = begin - (source.rfind("\n", 0, begin) + 1) + 1
    span = Span(
        line=line,
        column=column,
        end_line=line,
        end_column=column + len(word),
        start_pos=begin,
        end_pos=match.end(),
    )
    return SpecError(f"'{word}' is not a name: {problem}", span, hint=hint)


def _translate(error: UnexpectedInput, source: str, start: str) -> SpecError:
    p = parser()
    line, column = error.line, error.column
    try:
        label = _match_examples(error, start)
    except Exception:  # noqa: BLE001 - a failed lookup must not hide the real error
        label = None
    end_word = "the end of the value" if start == "value" else "the end of the file"
    if isinstance(error, UnexpectedCharacters):
        pos = error.pos_in_stream or 0
        char = source[pos] if pos < len(source) else ""
        span: Span | None = Span(
            line=line, column=column, end_line=line, end_column=column + 1, start_pos=pos
        )
        shown = f"'{char}'" if char.isprintable() else repr(char)
        allowed = _accepts(error.state) if error.state is not None else None
        if allowed is None:
            allowed = set(error.allowed or ())
        if start == "start" and (not_a_name := _not_a_name(source, pos, "NAME" in allowed)):
            return not_a_name
        hint = _HINTS.get(char)
        if char == ".":
            hint = "numbers need a digit on both sides of the point, e.g. 0.5"
        elif char == ":" and "EQUAL" in allowed:
            hint = "use '=' between a key and its value"
        elif char == ":" and start == "start" and _YAML_LINE.match(source, source.rfind("\n", 0, pos) + 1):
            hint = _YAML_HINT
        elif char.isalpha() and not char.isascii():
            hint = "names use ASCII letters, digits and '_' (other characters are fine inside strings)"
        return SpecError(
            f"unexpected character {shown}",
            span,
            hint=hint or label or f"expected {_words(allowed, p, end_word)}",
        )
    assert isinstance(error, UnexpectedToken)
    token = error.token
    try:
        acceptable = set(error.interactive_parser.accepts())
    except Exception:  # noqa: BLE001 - fall back to lark's (looser) expected set
        acceptable = set(error.expected)
    if not acceptable and start == "value":
        acceptable = {"$END"}  # a whole value, then more: the parser has nothing left to shift
    expected = _words(acceptable, p, end_word)
    if token.type == "$END":
        # Point just past the last thing written, not at the blank line after it.
        end = len(source.rstrip()) or len(source)
        line = source.count("\n", 0, end) + 1
        column = end - (source.rfind("\n", 0, end) + 1) + 1
        span = Span(
            line=line, column=column, end_line=line, end_column=column + 1, start_pos=end, end_pos=end
        )
        if acceptable == {"LBRACE"} and _BACKENDS_LIST.search(source[max(0, end - _WINDOW) : end]):
            label = _BACKENDS_HINT
        end_of = "the value" if start == "value" else "file"
        return SpecError(f"unexpected end of {end_of}; expected {expected}", span, hint=label)
    if start == "start" and (not_a_name := _not_a_name(source, token.start_pos or 0, "NAME" in acceptable)):
        return not_a_name
    # Only the text just before the token is searched: a regex over a 1 MB line is slow.
    window = max(0, (token.start_pos or 0) - _WINDOW)
    before = re.search(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*$", source[window : token.start_pos or 0])
    if acceptable == {"LBRACE"} and _BACKENDS_LIST.search(source[window : token.start_pos or 0]):
        label = _BACKENDS_HINT
    elif acceptable == {"LBRACE"}:
        # ``foo bar`` at the top level: ``foo`` was taken for a backend's option block,
        # but is far more likely a misspelt keyword.
        suggestion = did_you_mean(before.group(1), KEYWORDS) if before else None
        if before and suggestion:
            start_pos = window + before.start(1)
            line = source.count("\n", 0, start_pos) + 1
            column = start_pos - (source.rfind("\n", 0, start_pos) + 1) + 1
            where = Span(
                line=line,
                column=column,
                end_line=line,
                end_column=column + len(before.group(1)),
                start_pos=start_pos,
                end_pos=window + before.end(1),
            )
            return SpecError(f"unknown statement '{before.group(1)}'", where, hint=suggestion)
    text = str(token)
    span = Span.of(token)
    if len(text) > 40:
        text = text[:37] + "..."
    hint = label
    keyword = before.group(1) if before else None
    if acceptable == {"EQUAL"} and keyword in KEYWORDS and (keyword not in _KEYWORD_KEYS or token == "{"):
        # ``record every 5 {`` or ``backends torch`` inside a block: a '}' is missing.
        hint = _TOP_LEVEL
    elif str(token) in KEYWORDS and "RBRACE" in acceptable:
        # ``init { ... train {``: the block before is not closed
        hint = _TOP_LEVEL
    elif acceptable & {"RSQB", "RPAR"} and _starts_line(source, token.start_pos or 0):
        # the list or call went on past the end of its line: it was never closed
        hint = "a '[' is never closed" if "RSQB" in acceptable else "a '(' is never closed"
    if token.type == "NAME" and not hint and str(token) not in KEYWORDS and "'init'" in expected:
        hint = did_you_mean(str(token), KEYWORDS)
    return SpecError(f"unexpected '{text}'; expected {expected}", span, hint=hint)
