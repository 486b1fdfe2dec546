"""Loading specs: ``.mf`` text or YAML, with ``--set`` overrides, into a checked IR."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from . import _expr as ex
from . import _ir as ir
from ._build import build
from ._errors import Span, SpecError, did_you_mean
from ._options import Str
from ._plugins import available_backends
from ._syntax import KEYWORDS, Entry, Module, Rule, Statement, parse_text, parse_value, read_source

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
    # Padding keeps the value's columns equal to its columns in the whole argument.
    value = _retag(parse_value(" " * (len(path) + 1) + raw, "--set"), text)
    block, _, key = path.partition(".")
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
        if not key:
            raise SpecError(f"say which key of '{block}' to set, e.g. {block}.KEY=VALUE", where).located(
                None, None
            )
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
        hint = "overridable: experiment, scaling, backends, data.KEY, network.KEY, train.KEY, "
        hint += "record.every, record.log, sweep.NAME, BACKEND.KEY"
        raise SpecError(f"cannot override '{path}'", where, hint=hint).located(None, None)
    return dataclasses.replace(module, statements=tuple(statements))


def _retag(expr: ex.Expr, text: str) -> Any:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(expr):
        value = getattr(expr, f.name)
        if isinstance(value, Span):
            changes[f.name] = value.moved("--set", text)
        elif isinstance(value, ex.EXPR_TYPES):
            changes[f.name] = _retag(value, text)
        elif isinstance(value, tuple) and value:
            changes[f.name] = tuple(
                (v[0], _retag(v[1], text)) if isinstance(v, tuple) else _retag(v, text) for v in value
            )
    return dataclasses.replace(expr, **changes)


# ---- YAML ------------------------------------------------------------------------------


def to_yaml(spec: ir.Spec) -> str:
    """The checked IR as YAML; :func:`load` reads it back to an equal spec."""
    return yaml.safe_dump(
        to_dict(spec), sort_keys=False, allow_unicode=True, width=100, default_flow_style=None
    )


def to_dict(spec: ir.Spec) -> dict[str, Any]:
    """The IR as plain data (expressions and constructors in spec syntax)."""
    out: dict[str, Any] = {"experiment": spec.experiment}
    data = _node_dict(spec.data)
    out["data"] = {"kind": spec.data.kind, **data}
    out["network"] = _node_dict(spec.network)
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
    """A YAML spec (the schema :func:`to_yaml` writes) as a syntax tree."""
    try:
        doc = yaml.safe_load(source)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        span = None
        if mark is not None:
            span = Span(
                line=mark.line + 1, column=mark.column + 1, end_line=mark.line + 1, end_column=mark.column + 2
            )
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise SpecError(f"invalid YAML: {problem}", span, path=path, source=source) from None
    top = Span(line=1, column=1, end_line=1, end_column=2)
    if not isinstance(doc, dict):
        raise SpecError(
            "a YAML spec is a mapping of blocks (experiment, data, ...)", top, path=path, source=source
        )
    try:
        return Module(statements=tuple(_yaml_statements(doc, top)), source=source, path=path)
    except SpecError as error:
        raise error.located(path, source) from None


def _yaml_statements(doc: Mapping[str, Any], top: Span) -> list[Statement]:
    out: list[Statement] = []
    known = (
        "experiment",
        "data",
        "network",
        "scaling",
        "init",
        "train",
        "record",
        "sweep",
        "backends",
        "options",
    )
    for key, value in doc.items():
        if key not in known:
            raise SpecError(f"unknown YAML key '{key}'", top, hint=did_you_mean(str(key), known))
        if key in ("experiment", "scaling"):
            out.append(Statement(keyword=key, names=(str(value),), span=top, name_spans=(top,)))
        elif key in ("data", "network"):
            body = dict(_mapping(value, key))
            kind = str(body.pop("kind", "mlp" if key == "network" else ""))
            cls = ir.DATA_KINDS.get(kind) if key == "data" else ir.Network
            out.append(
                Statement(
                    keyword=key, names=(kind,), body=_yaml_entries(body, cls), span=top, name_spans=(top,)
                )
            )
        elif key in ("train", "sweep"):
            out.append(Statement(keyword=key, body=_yaml_entries(_mapping(value, key), None), span=top))
        elif key == "init":
            rules = []
            for rule in value or ():
                rule = _mapping(rule, "an init rule")
                if set(rule) != {"layer", "dist"}:
                    raise SpecError("an init rule in YAML is {layer: ..., dist: ...}", top)
                rules.append(
                    Rule(selector=_yaml_expr(rule["layer"]), dist=_yaml_expr(rule["dist"]), span=top)
                )
            out.append(Statement(keyword="init", body=tuple(rules), span=top))
        elif key == "record":
            rec = dict(_mapping(value, key))
            modes = [m for m in ("every", "log") if m in rec]
            if len(modes) != 1:
                raise SpecError("record in YAML needs exactly one of 'every' or 'log'", top)
            arg = _yaml_expr(rec.pop(modes[0]))
            observables = tuple(_yaml_expr(o) for o in rec.pop("observables", ()) or ())
            if rec:
                raise SpecError(f"unknown key '{next(iter(rec))}' in record", top)
            out.append(Statement(keyword="record", names=(modes[0],), arg=arg, body=observables, span=top))
        elif key == "backends":
            names = tuple(str(v) for v in (value if isinstance(value, list) else [value]))
            out.append(
                Statement(keyword="backends", names=names, span=top, name_spans=tuple(top for _ in names))
            )
        else:
            backends = available_backends()
            for backend, opts in _mapping(value, key).items():
                cls_opts = backends[backend].options if backend in backends else ()
                strings = {o.name for o in cls_opts if isinstance(o.kind, Str)}
                entries = tuple(
                    Entry(key=str(k), value=_yaml_expr(v, literal=k in strings), span=top, key_span=top)
                    for k, v in _mapping(opts, backend).items()
                )
                out.append(
                    Statement(
                        keyword="options", names=(str(backend),), body=entries, span=top, name_spans=(top,)
                    )
                )
    return out


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(
            f"'{what}' in YAML must be a mapping", Span(line=1, column=1, end_line=1, end_column=2)
        )
    return value


def _yaml_entries(body: Mapping[str, Any], cls: Any) -> tuple[Entry, ...]:
    strings = {o.name for o in cls.options() if isinstance(o.kind, Str)} if cls is not None else set()
    top = Span(line=1, column=1, end_line=1, end_column=2)
    return tuple(
        Entry(key=str(k), value=_yaml_expr(v, literal=k in strings), span=top, key_span=top)
        for k, v in body.items()
    )


def _yaml_expr(value: Any, *, literal: bool = False) -> ex.Expr:
    if isinstance(value, bool):
        return ex.Bool(value=value)
    if isinstance(value, (int, float)):
        return ex.Num(value=value)
    if isinstance(value, list):
        return ex.List(items=tuple(_yaml_expr(v, literal=literal) for v in value))
    if isinstance(value, str):
        return ex.Str(value=value) if literal else parse_value(value)
    raise SpecError(f"unsupported YAML value {value!r}", Span(line=1, column=1, end_line=1, end_column=2))
