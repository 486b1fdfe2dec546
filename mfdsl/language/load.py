"""Loading specs: ``.mf`` text or YAML, with ``--set`` overrides, into a checked IR."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import yaml

from mfdsl.core.errors import Span, SpecError, did_you_mean
from mfdsl.core.plugins import available_backends
from mfdsl.language import expr as ex
from mfdsl.language import ir as ir
from mfdsl.language.build import build
from mfdsl.language.options import Option, Str
from mfdsl.language.syntax import (
    KEYWORDS,
    MAX_DIGITS,
    MAX_SOURCE,
    Entry,
    Module,
    Rule,
    Statement,
    parse_text,
    parse_value,
    read_source,
)

YAML_SUFFIXES = (".yaml", ".yml")


def parse(source: str, path: str | None = None, *, overrides: Sequence[str] = ()) -> ir.Spec:
    """Parse and check spec text (``.mf`` syntax) into a :class:`Spec`."""
    module = parse_text(source, path)
    return build(apply_overrides(module, overrides))


def load(path: str | os.PathLike[str], *, overrides: Sequence[str] = ()) -> ir.Spec:
    """Load a ``.mf`` or ``.yaml`` spec file, apply ``--set`` overrides, and check it."""
    name = os.fspath(path)
    source = read_source(name)
    module = yaml_to_module(source, name) if name.endswith(YAML_SUFFIXES) else parse_text(source, name)
    return build(apply_overrides(module, overrides))


# ---- --set overrides ------------------------------------------------------------------


def apply_overrides(module: Module, overrides: Iterable[str]) -> Module:
    """The module with each ``PATH=VALUE`` applied, in order.

    ``PATH`` is ``BLOCK.KEY`` (``train.steps``, ``data.delta``, ``sweep.width``,
    ``torch.device``), ``record.every`` / ``record.log``, or one of ``experiment``,
    ``scaling``, ``backends``.  Values use the spec's value syntax.
    """
    for text in overrides:
        module = _override(module, text)
    return module


def _override(module: Module, text: str) -> Module:
    where = Span(line=1, column=1, end_line=1, end_column=len(text) + 1, path="--set", text=text)
    path, eq, raw = text.partition("=")
    path = path.strip()
    if not eq or not path:
        raise SpecError("an override reads PATH=VALUE, e.g. train.steps=500", where).located(None, None)
    block, _, key = path.partition(".")
    if not key and block not in ("experiment", "scaling", "backends"):
        at = text.index(block)
        _no_such_path(block, dataclasses.replace(where, column=at + 1, end_column=at + len(block) + 1))
    offset = len(text) - len(raw)  # the value's columns are its columns in the whole argument

    def shift(span: Span) -> Span:
        return dataclasses.replace(
            span,
            column=span.column + offset if span.line == 1 else span.column,
            end_column=span.end_column + offset if span.end_line == 1 else span.end_column,
            start_pos=span.start_pos + offset,
            end_pos=span.end_pos + offset,
            path="--set",
            text=text,
        )

    try:
        value = _parse_at(raw, shift)
    except SpecError as error:
        error.hint = _quote_hint(module, block, key, raw) or error.hint
        raise error.located(None, None) from None
    statements = list(module.statements)

    def find(keyword: str, name: str | None = None) -> int | None:
        for i, stmt in enumerate(statements):
            if stmt.keyword == keyword and (name is None or stmt.names[:1] == (name,)):
                return i
        return None

    def put(new: Statement) -> None:
        index = find(new.keyword)
        if index is None:
            statements.append(new)
        else:
            statements[index] = new

    if block in ("experiment", "scaling") and not key:
        if not isinstance(value, ex.Name):
            raise SpecError(f"'{block}' takes a name", value.span).located(None, None)
        put(Statement(keyword=block, names=(value.id,), span=value.span, name_spans=(value.span,)))
    elif block == "backends" and not key:
        items = value.items if isinstance(value, ex.List) else (value,)
        if not all(isinstance(i, ex.Name) for i in items) or not items:
            raise SpecError("'backends' takes a name or a list of names", value.span).located(None, None)
        names = tuple(i.id for i in items if isinstance(i, ex.Name))
        put(
            Statement(
                keyword="backends", names=names, span=value.span, name_spans=tuple(i.span for i in items)
            )
        )
    elif block == "record" and key in ("every", "log"):
        index = find("record")
        if index is None:
            raise SpecError("the spec has no 'record' statement to change", where).located(None, None)
        statements[index] = dataclasses.replace(statements[index], names=(key,), arg=value)
    elif block in ("data", "network", "train", "sweep") or (block not in KEYWORDS and block):
        keyword = block if block in KEYWORDS else "options"
        if keyword == "options" and block not in available_backends():
            hint = did_you_mean(block, list(KEYWORDS) + sorted(available_backends()))
            raise SpecError(f"unknown block '{block}' in override", where, hint=hint).located(None, None)
        index = find(keyword, block if keyword == "options" else None)
        key_span = Span(
            line=1, column=len(block) + 2, end_line=1, end_column=len(path) + 1, path="--set", text=text
        )
        entry = Entry(key=key, value=value, span=value.span, key_span=key_span)
        if index is None:
            if keyword == "data":
                raise SpecError("the spec has no 'data' block to change", where).located(None, None)
            names = ("mlp",) if keyword == "network" else ((block,) if keyword == "options" else ())
            statements.append(
                Statement(
                    keyword=keyword, names=names, body=(entry,), span=where, name_spans=(where,) * len(names)
                )
            )
        else:
            stmt = statements[index]
            body = [i for i in stmt.body or () if not (isinstance(i, Entry) and i.key == key)]
            statements[index] = dataclasses.replace(stmt, body=(*body, entry))
    else:
        raise SpecError(f"cannot override '{path}'", where, hint=_OVERRIDABLE).located(None, None)
    return dataclasses.replace(module, statements=tuple(statements))


_OVERRIDABLE = (
    "overridable: experiment, scaling, backends, data.KEY, network.KEY, train.KEY, "
    "record.every, record.log, sweep.NAME, BACKEND.KEY"
)


def _no_such_path(name: str, where: Span) -> NoReturn:
    """``--set NAME=VALUE`` with a bare name that is neither ``experiment``, ``scaling``
    nor ``backends``: say which block it belongs to."""
    if name in KEYWORDS or name in available_backends():
        raise SpecError(
            f"say which key of '{name}' to set, e.g. {name}.KEY=VALUE", where, hint=_OVERRIDABLE
        ).located(None, None)
    paths = _key_paths()
    owners = [p for p in paths if p.partition(".")[2] == name]
    calls = [
        (path, str(cls.constructor))  # type: ignore[attr-defined]
        for path, table in (("train.optimizer", ir.OPTIMIZERS), ("train.schedule", ir.SCHEDULES))
        for cls in table.values()
        if any(o.name == name for o in cls.options())
    ]
    if owners:
        hint = f"did you mean {' or '.join(repr(p) for p in owners)}?"
    elif calls:
        path, func = calls[0]
        value = where.text.partition("=")[2] if where.text else "..."
        hint = (
            f"'{name}' is an argument of {path}, which is set whole: --set '{path}={func}({name} = {value})'"
        )
    else:
        close = did_you_mean(
            name, [p.partition(".")[2] for p in paths] + ["experiment", "scaling", "backends"]
        )
        match = close and close.split("'")[1]
        full = next((p for p in paths if p.partition(".")[2] == match), match)
        hint = f"did you mean '{full}'?" if full else _OVERRIDABLE
    raise SpecError(f"there is no top-level '{name}'; an override names BLOCK.KEY", where, hint=hint).located(
        None, None
    )


def _key_paths() -> list[str]:
    """Every ``BLOCK.KEY`` an override can name (sweep variables aside)."""
    blocks: list[tuple[str, tuple[Option, ...]]] = [
        *(("data", cls.options()) for cls in dict.fromkeys(ir.DATA_KINDS.values())),
        ("network", ir.Network.options()),
        ("train", ir.Train.options()),
        *((name, cls.options) for name, cls in sorted(available_backends().items())),
    ]
    paths = [f"{block}.{opt.name}" for block, options in blocks for opt in options]
    return list(dict.fromkeys([*paths, "record.every", "record.log"]))


def _quote_hint(module: Module, block: str, key: str, raw: str) -> str | None:
    """The hint for a value that does not parse where a string is expected (a path
    written without quotes, ``--set data.root=/x``)."""
    options: tuple[Option, ...] = ()
    if block == "data":
        stmt = next((s for s in module.statements if s.keyword == "data"), None)
        cls = ir.DATA_KINDS.get(stmt.names[0]) if stmt is not None and stmt.names else None
        options = cls.options() if cls is not None else ()
    elif block in ("network", "train"):
        options = (ir.Network if block == "network" else ir.Train).options()
    elif block in available_backends():
        options = available_backends()[block].options
    kind = next((o.kind for o in options if o.name == key), None)
    if raw.strip().startswith('"'):
        return None  # quoted already: the string itself is broken (the parser's hint says how)
    if kind is not None and not isinstance(kind, Str):
        return None
    if kind is None and not re.match(r"\s*(~|/|\.{1,2}/)", raw):
        return None  # a sweep value, or an unknown key: only what looks like a path
    quoted = '"' + raw.strip().replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"a string is written in double quotes, which the shell needs quoted too: --set '{block}.{key}={quoted}'"


def _parse_at(raw: str, shift: Callable[[Span], Span]) -> ex.Expr:
    """``raw`` parsed as a value, every span (and a parse error's) moved by ``shift``
    to where the value sits in its real source."""
    try:
        value = parse_value(raw)
    except SpecError as error:
        if error.span is not None:
            error.span = shift(error.span)
        error.path = error.source = None
        raise
    result: ex.Expr = _map_spans(value, shift)
    return result


def _map_spans(expr: ex.Expr, shift: Callable[[Span], Span]) -> Any:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(expr):
        value = getattr(expr, f.name)
        if isinstance(value, Span):
            changes[f.name] = shift(value)
        elif isinstance(value, ex.EXPR_TYPES):
            changes[f.name] = _map_spans(value, shift)
        elif isinstance(value, tuple) and value:
            changes[f.name] = tuple(
                (v[0], _map_spans(v[1], shift)) if isinstance(v, tuple) else _map_spans(v, shift)
                for v in value
            )
    return dataclasses.replace(expr, **changes)


# ---- YAML ------------------------------------------------------------------------------


def to_yaml(spec: ir.Spec) -> str:
    """The checked IR as YAML; :func:`load` reads it back to an equal spec."""
    return yaml.dump(
        to_dict(spec),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=None,
    )


def to_dict(spec: ir.Spec) -> dict[str, Any]:
    """The IR as plain data (expressions and constructors in spec syntax)."""
    out: dict[str, Any] = {"experiment": spec.experiment}
    data = _node_dict(spec.data)
    out["data"] = {"kind": spec.data.kind, **data}
    out["network"] = _node_dict(spec.network)
    if isinstance(spec.network, ir.ConvNetwork):
        layers = [_call(layer) for layer in spec.network.layers]
        out["network"] = {"kind": "cnn", "layers": layers, **out["network"]}
    out["scaling"] = _plain(spec.scaling)
    if spec.init is not None:
        out["init"] = [{"layer": _plain(r.layers), "dist": _call(r.dist)} for r in spec.init.rules]
    out["train"] = _node_dict(spec.train)
    if spec.record is not None:
        rec = spec.record
        out["record"] = {
            rec.mode: _plain(rec.count),
            "observables": [_observable(o) for o in rec.observables],
        }
    out["sweep"] = {v.name: [_sweep_value(x) for x in v.values] for v in spec.sweep.variables}
    out["backends"] = list(spec.backends)
    if spec.backend_options:
        out["options"] = {o.backend: {k: _plain(v) for k, v in o.values} for o in spec.backend_options}
    return out


def _node_dict(node: ir.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in node.options():
        value = getattr(node, opt.name)
        if value is None:
            continue
        out[opt.name] = _call(value) if isinstance(value, ir.Node) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if ir.is_expr(value):
        return ex.to_source(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _sweep_value(value: Any) -> Any:
    # A bare word reads back as a symbol, except "true" and "false", which read back
    # as booleans: those strings keep their quotes.
    if isinstance(value, str) and (not value.isidentifier() or value in ("true", "false")):
        return ex.to_source(ex.Str(value=value))
    return value


def _call(node: ir.Node) -> str:
    name = type(node).constructor  # type: ignore[attr-defined]
    args = [f"{o.name} = {_source(getattr(node, o.name))}" for o in node.options()]
    return f"{name}({', '.join(args)})"


def _source(value: Any) -> str:
    if ir.is_expr(value):
        return ex.to_source(value)
    if isinstance(value, ir.Node):
        return _call(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_source(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return ex.format_number(value)


def _observable(obs: ir.Observable) -> str:
    args = [
        f"{n} = {_source(getattr(obs, n))}"
        for n in ir.Observable.accepted(obs.name)
        if getattr(obs, n) is not None
    ]
    return f"{obs.name}({', '.join(args)})" if args else obs.name


def yaml_to_module(source: str, path: str | None = None) -> Module:
    """A YAML spec (the schema :func:`to_yaml` writes) as a syntax tree.

    Every entry keeps where the YAML writes it (PyYAML's marks), so errors found while
    building the spec point into the YAML file; a value's own syntax errors point into
    the value where it is written on one line.
    """
    try:
        root = _compose(source)
        if not isinstance(root, yaml.MappingNode):
            span = _node_span(root) if root is not None else Span(line=1, column=1, end_line=1, end_column=2)
            raise SpecError("a YAML spec is a mapping of blocks (experiment, data, ...)", span)
        doc = _YamlReader(source).read(root)
        return Module(statements=tuple(_yaml_statements(doc)), source=source, path=path)
    except SpecError as error:
        raise error.located(path, source) from None


def _yaml_syntax_error(error: yaml.YAMLError) -> SpecError:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or "invalid YAML"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    hint = None
    if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        hint = f"{context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1}"
    if "'\\t'" in problem:
        hint = "YAML indents with spaces, not tabs"
    return SpecError(f"invalid YAML: {problem}", _mark_span(mark, mark) if mark else None, hint=hint)


def _mark_span(start: Any, end: Any) -> Span:
    return Span(
        line=start.line + 1,
        column=start.column + 1,
        end_line=end.line + 1,
        end_column=max(end.column + 1, start.column + 2) if end.line == start.line else end.column + 1,
        start_pos=start.index,
        end_pos=max(end.index, start.index + 1),
    )


def _node_span(node: yaml.Node) -> Span:
    return _mark_span(node.start_mark, node.end_mark)


# ---- bounded YAML ------------------------------------------------------------------------
#
# A YAML spec is read by a loader of its own, so that no small file can take the
# machine: aliases are refused (a "billion laughs" of nested aliases expands a 1 kB
# file to gigabytes, and a self-referencing one to a cycle), and so is a document of
# more than MAX_YAML_NODES values or nested deeper than MAX_YAML_DEPTH; integers are
# bounded by the digit limit of .mf specs.  Plain scalars are resolved by YAML 1.2's
# core schema, not PyYAML's YAML 1.1: ``59:59`` (base 60), ``0777`` (octal),
# ``1_000``, ``yes``/``no`` and dates stay strings (read as spec syntax, where they are
# errors with a place), not silently other values.

#: the most values (scalars, lists, mappings) a YAML spec may hold.  A spec has a few
#: hundred, but :func:`to_yaml` writes ranges out, and a store keeps that YAML: room for a
#: sweep variable of ``mfdsl.language.expand.MAX_POINTS`` values (composing costs ~40 µs a value)
MAX_YAML_NODES = 120_000
#: the deepest a YAML spec may nest lists and mappings; a spec needs 3
MAX_YAML_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_CORE_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_CORE_NULL = re.compile(r"~|null|Null|NULL|")
# what YAML 1.1 (PyYAML's default) would have read as a number: base 60, underscores
_YAML11_NUMBER = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?|[-+]?[0-9][0-9_]*_[0-9_]*")


class _CoreResolver(yaml.resolver.BaseResolver):
    """YAML 1.2's core schema for plain scalars (BaseResolver starts with none)."""


for _tag, _pattern, _first in (
    ("bool", _CORE_BOOL, "tTfF"),
    ("int", _CORE_INT, "-+0123456789"),
    ("float", _CORE_FLOAT, "-+0123456789."),
    ("null", _CORE_NULL, ["~", "n", "N", ""]),
):
    _CoreResolver.add_implicit_resolver(_TAG + _tag, re.compile(rf"^(?:{_pattern.pattern})$"), list(_first))


class _BoundedLoader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _CoreResolver
):
    """PyYAML's reader, scanner, parser and composer (no constructor: the nodes are
    read by :class:`_YamlReader`), refusing aliases and bounding the node count and
    depth as it composes, so the limits hold before anything large is built."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _CoreResolver.__init__(self)
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        span = _mark_span(event.start_mark, event.end_mark)
        if isinstance(event, yaml.AliasEvent):
            raise SpecError(
                f"YAML aliases (*name) are not supported in specs: *{event.anchor}",
                span,
                hint="write the value out in full where it is used",
            )
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise SpecError(
                f"the YAML spec holds more than {MAX_YAML_NODES} values",
                span,
                hint="a spec has a few hundred; write long sweeps as ranges, e.g. seed: 0..99",
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise SpecError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep", span)
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        expected = "map" if isinstance(node, yaml.MappingNode) else "seq"
        if isinstance(node, yaml.CollectionNode) and node.tag != _TAG + expected:
            raise SpecError(f"YAML tag {_shown_tag(node.tag)} is not supported in specs", span)
        return node


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that YAML 1.1 *or* the core schema
    would read as something else (``0o17``, ``1e3``), so that what :func:`to_yaml`
    writes reads back the same under either."""


for _tag, _pattern, _first in (
    ("bool", _CORE_BOOL, "tTfF"),
    ("int", _CORE_INT, "-+0123456789"),
    ("float", _CORE_FLOAT, "-+0123456789."),
    ("null", _CORE_NULL, ["~", "n", "N", ""]),
):
    _Dumper.add_implicit_resolver(_TAG + _tag, re.compile(rf"^(?:{_pattern.pattern})$"), list(_first))


def _yaml11_number(text: str) -> str:
    """What YAML 1.1 reads ``text`` (a :data:`_YAML11_NUMBER`) as, for a hint."""
    sign = -1 if text.startswith("-") else 1
    head, dot, fraction = text.lstrip("+-").replace("_", "").partition(".")
    value = 0
    for part in head.split(":"):
        value = value * 60 + int(part)
    return ex.format_number(sign * (value + float(f"0.{fraction or 0}"))) if dot else str(sign * value)


def _shown_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _compose(source: str) -> yaml.Node | None:
    """The YAML text's one document as nodes (``None`` when empty), within the limits
    of :class:`_BoundedLoader`; a YAML syntax error becomes a located ``SpecError``."""
    if len(source) > MAX_SOURCE:
        raise SpecError(f"YAML text too large ({len(source)} characters, at most {MAX_SOURCE})")
    loader = _BoundedLoader(source)
    try:
        node: yaml.Node | None = loader.get_single_node()
        return node
    except yaml.YAMLError as error:
        raise _yaml_syntax_error(error) from None
    finally:
        loader.dispose()


def _scalar(node: yaml.Node) -> Any:
    """A scalar node's value by its tag (the core schema's, or one written out as
    ``!!int`` …), integers bounded as in ``.mf`` specs."""
    tag, text, span = node.tag, str(node.value), _node_span(node)
    kind = tag[len(_TAG) :] if tag.startswith(_TAG) else None
    if kind == "str":
        return text
    if kind == "null" and _CORE_NULL.fullmatch(text):
        return None
    if kind == "bool" and _CORE_BOOL.fullmatch(text):
        return text.lower() == "true"
    if kind == "int" and _CORE_INT.fullmatch(text):
        digits = len(text.lstrip("+-"))
        if digits > MAX_DIGITS:
            raise SpecError(f"number too large ({digits} digits)", span)
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        if re.fullmatch(r"[-+]?0[0-9]+", text):  # only a plain scalar resolves to int
            raise SpecError(
                f"'{text}' is ambiguous: YAML 1.2 reads it as {int(text)}, YAML 1.1 as octal",
                span,
                hint=f"write {int(text)} (or 0o{text.lstrip('+-0')} for octal)",
            )
        return int(text)
    if kind == "float" and _CORE_FLOAT.fullmatch(text):
        number = float("nan") if text.lower().lstrip("+-").startswith((".inf", ".nan")) else float(text)
        if not math.isfinite(number):
            raise SpecError(
                f"number too large: {text}"
                if text.lstrip("+-")[0] != "."
                else f"'{text}' is not a finite number",
                span,
            )
        return number
    if kind in ("null", "bool", "int", "float"):
        raise SpecError(f"'{text}' is not a YAML {kind} (tag !!{kind})", span)
    raise SpecError(
        f"YAML tag {_shown_tag(tag)} is not supported in specs",
        span,
        hint="a spec's values are numbers, strings, booleans and lists, in spec syntax",
    )


def load_yaml_bounded(text: str, path: str | None = None) -> Any:
    """YAML text as plain data (dicts, lists, strings, numbers, booleans, ``None``),
    read as specs are: aliases refused, at most :data:`MAX_YAML_NODES` values nested at
    most :data:`MAX_YAML_DEPTH` deep, integers of at most ``MAX_DIGITS`` digits, plain
    scalars by YAML 1.2's core schema.  Anything else is a ``SpecError`` located in
    ``text`` (named ``path``).  For YAML that is not a spec (a stored attribute, say);
    a spec goes through :func:`yaml_to_module`, which applies the same limits."""
    try:
        root = _compose(text)
        return None if root is None else _plain_yaml(root)
    except SpecError as error:
        raise error.located(path, text) from None


def _plain_yaml(node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return [_plain_yaml(n) for n in node.value]
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _plain_yaml(key_node)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise SpecError("a YAML key must be a scalar", _node_span(key_node))
            if key in out:
                raise SpecError(f"duplicate key '{key}'", _node_span(key_node))
            out[key] = _plain_yaml(value_node)
        return out
    return _scalar(node)


@dataclasses.dataclass(frozen=True)
class _Yaml:
    """A YAML value and where it is written: a scalar as its Python value, a sequence
    as a list of ``_Yaml``, a mapping as a dict from each key to ``(key span, _Yaml)``.
    ``shift`` moves a span inside a string scalar to where it is in the file."""

    value: Any
    span: Span
    shift: Callable[[Span], Span] | None = None


class _YamlReader:
    def __init__(self, source: str) -> None:
        self.source = source

    def read(self, node: yaml.Node) -> _Yaml:
        span = _node_span(node)
        if isinstance(node, yaml.SequenceNode):
            return _Yaml([self.read(n) for n in node.value], span)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, tuple[Span, _Yaml]] = {}
            for key_node, value_node in node.value:
                key_span = _node_span(key_node)
                if not isinstance(key_node, yaml.ScalarNode):
                    raise SpecError("a YAML key here must be a plain name", key_span)
                key = str(key_node.value)
                if node.flow_style and not key.isidentifier() and re.search(r"[()=]", key):
                    # {dist: normal(0, 1)}: in a flow mapping the comma ended the value
                    raise SpecError(
                        f"'{key}' is not a key: inside {{...}} a comma ends a YAML value",
                        key_span,
                        hint='quote a value that holds commas, e.g. {layer: 1, dist: "normal(0, 1)"}',
                    )
                if key in out:
                    first = out[key][0]
                    raise SpecError(f"duplicate key '{key}' (first at line {first.line})", key_span)
                out[key] = (key_span, self.read(value_node))
            return _Yaml(out, span)
        value = _scalar(node)
        return _Yaml(value, span, self._shift(node, value))

    def _shift(self, node: yaml.Node, value: Any) -> Callable[[Span], Span] | None:
        """Spans inside a one-line string scalar, moved to the file (``None`` when the
        text in the file is not the string itself: escapes, folded or block scalars)."""
        start, end = node.start_mark, node.end_mark
        style = getattr(node, "style", None)
        quote = 1 if style in ("'", '"') else 0
        if not isinstance(value, str) or style not in (None, "'", '"') or start.line != end.line:
            return None
        if self.source[start.index + quote : end.index - quote] != value:
            return None
        base_column, base_pos = start.column + quote, start.index + quote

        def shift(span: Span) -> Span:
            if span.line != 1 or span.end_line != 1:
                return _node_span(node)
            return dataclasses.replace(
                span,
                line=start.line + 1,
                end_line=start.line + 1,
                column=base_column + span.column,
                end_column=base_column + span.end_column,
                start_pos=base_pos + span.start_pos,
                end_pos=base_pos + span.end_pos,
            )

        return shift


# a YAML spec's top-level keys: the statements, and the backends' option blocks
_YAML_KEYS = (*KEYWORDS, "options")


def _yaml_statements(doc: _Yaml) -> list[Statement]:
    out: list[Statement] = []
    for key, (key_span, item) in doc.value.items():
        if key not in _YAML_KEYS:
            raise SpecError(
                f"unknown YAML key '{key}'",
                key_span,
                hint=did_you_mean(key, _YAML_KEYS) or f"the keys are {', '.join(_YAML_KEYS)}",
            )
        if key in ("experiment", "scaling"):
            name = _yaml_name(item, key)
            out.append(Statement(keyword=key, names=(name,), span=item.span, name_spans=(item.span,)))
        elif key in ("data", "network"):
            body = dict(_mapping(item, key))
            kind_entry = body.pop("kind", None)
            typo = next((k for k in body if kind_entry is None and did_you_mean(k, ["kind"])), None)
            if typo is not None and key == "data":
                raise SpecError(f"unknown key '{typo}' in data", body[typo][0], hint="did you mean 'kind'?")
            if kind_entry is None and key == "data":
                raise SpecError(
                    f"'data' in YAML needs 'kind': {', '.join(ir.DATA_KINDS)}",
                    item.span,
                    hint="e.g. data: {kind: isotropic_gaussian, dim: 20}",
                )
            kind = _yaml_name(kind_entry[1], "kind") if kind_entry else "mlp"
            kind_span = kind_entry[1].span if kind_entry else item.span
            cls = ir.DATA_KINDS.get(kind) if key == "data" else ir.Network
            out.append(
                Statement(
                    keyword=key,
                    names=(kind,),
                    body=_yaml_entries(body, cls),
                    span=item.span,
                    name_spans=(kind_span,),
                )
            )
        elif key in ("train", "sweep"):
            out.append(Statement(keyword=key, body=_yaml_entries(_mapping(item, key), None), span=item.span))
        elif key == "init":
            rules = []
            for rule in _sequence(item, "init"):
                fields = _mapping(rule, "an init rule")
                if set(fields) != {"layer", "dist"}:
                    raise SpecError(
                        "an init rule in YAML is {layer: ..., dist: ...}",
                        rule.span,
                        hint="e.g. {layer: 1, dist: normal(0, 1)}",
                    )
                rules.append(
                    Rule(
                        selector=_yaml_expr(fields["layer"][1]),
                        dist=_yaml_expr(fields["dist"][1]),
                        span=rule.span,
                    )
                )
            out.append(Statement(keyword="init", body=tuple(rules), span=item.span))
        elif key == "record":
            rec = dict(_mapping(item, key))
            modes = [m for m in ("every", "log") if m in rec]
            if len(modes) != 1:
                where = rec[modes[1]][0] if len(modes) > 1 else item.span
                raise SpecError("record in YAML needs exactly one of 'every' or 'log'", where)
            mode_span, count = rec.pop(modes[0])
            observables: tuple[ex.Expr, ...] = ()
            if "observables" in rec:
                observables = tuple(
                    _yaml_expr(o) for o in _sequence(rec.pop("observables")[1], "observables")
                )
            if rec:
                extra = next(iter(rec))
                raise SpecError(
                    f"unknown key '{extra}' in record",
                    rec[extra][0],
                    hint=did_you_mean(extra, ["every", "log", "observables"]),
                )
            out.append(
                Statement(
                    keyword="record",
                    names=(modes[0],),
                    arg=_yaml_expr(count),
                    body=observables,
                    span=item.span,
                    name_spans=(mode_span,),
                )
            )
        elif key == "backends":
            items = item.value if isinstance(item.value, list) else [item]
            names = tuple(_yaml_name(i, "backends") for i in items)
            out.append(
                Statement(
                    keyword="backends", names=names, span=item.span, name_spans=tuple(i.span for i in items)
                )
            )
        else:
            backends = available_backends()
            for backend, (backend_span, opts) in _mapping(item, key).items():
                cls_opts = backends[backend].options if backend in backends else ()
                strings = {o.name for o in cls_opts if isinstance(o.kind, Str)}
                entries = tuple(
                    Entry(key=k, value=_yaml_expr(v, literal=k in strings), span=v.span, key_span=k_span)
                    for k, (k_span, v) in _mapping(opts, backend).items()
                )
                out.append(
                    Statement(
                        keyword="options",
                        names=(backend,),
                        body=entries,
                        span=opts.span,
                        name_spans=(backend_span,),
                    )
                )
    return out


def _yaml_name(item: _Yaml, what: str) -> str:
    if not isinstance(item.value, str) or not item.value.isidentifier():
        raise SpecError(f"'{what}' in YAML must be a name (letters, digits and '_')", item.span)
    return item.value


def _mapping(item: _Yaml, what: str) -> Mapping[str, tuple[Span, _Yaml]]:
    if item.value is None:
        return {}
    if not isinstance(item.value, dict):
        raise SpecError(f"'{what}' in YAML must be a mapping", item.span, hint=f"e.g. {what}: {{key: value}}")
    return item.value


def _sequence(item: _Yaml, what: str) -> list[_Yaml]:
    if item.value is None:
        return []
    if not isinstance(item.value, list):
        raise SpecError(f"'{what}' in YAML must be a list", item.span, hint=f"e.g. {what}: [...]")
    return item.value


def _yaml_entries(body: Mapping[str, tuple[Span, _Yaml]], cls: Any) -> tuple[Entry, ...]:
    strings = {o.name for o in cls.options() if isinstance(o.kind, Str)} if cls is not None else set()
    return tuple(
        Entry(key=k, value=_yaml_expr(v, literal=k in strings), span=v.span, key_span=k_span)
        for k, (k_span, v) in body.items()
    )


def _yaml_expr(item: _Yaml, *, literal: bool = False) -> ex.Expr:
    value, span = item.value, item.span
    if isinstance(value, bool):
        return ex.Bool(value=value, span=span)
    if isinstance(value, (int, float)):
        return ex.Num(value=value, span=span)
    if isinstance(value, list):
        return ex.List(items=tuple(_yaml_expr(v, literal=literal) for v in value), span=span)
    if isinstance(value, str):
        if literal:
            return ex.Str(value=value, span=span)
        if _YAML11_NUMBER.fullmatch(value):
            raise SpecError(
                f"'{value}' is not a number here: specs read YAML's core schema (YAML 1.2), which has "
                "no base-60 numbers (59:59) nor digits grouped with '_'",
                span,
                hint=f"write the number itself ({value} is {_yaml11_number(value)} in YAML 1.1), "
                "or quote the text for a string",
            )
        return _parse_at(value, item.shift or (lambda _: span))
    if value is None:
        raise SpecError("a value is missing here (YAML reads an empty value as null)", span)
    if isinstance(value, dict):
        raise SpecError(
            "a YAML mapping is not a value here",
            span,
            hint="write the value in spec syntax, e.g. optimizer: sgd(lr = 0.1)",
        )
    raise SpecError(f"unsupported YAML value {value!r}", span, hint="quote it to read it as spec syntax")
