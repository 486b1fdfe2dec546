"""From a syntax tree to the typed IR, with every check the language promises."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfdsl.core.errors import Span, SpecError, SpecErrors, combined, did_you_mean, errors_of, one_of
from mfdsl.core.plugins import available_backends
from mfdsl.language import expr as ex
from mfdsl.language import ir as ir
from mfdsl.language.latent import LATENT, LatentFunction, bind, fold, latent_names
from mfdsl.language.options import REQUIRED, Kind, ListOf, Nested, Option, Str, suggest_key
from mfdsl.language.syntax import KEYWORDS, Entry, Module, Rule, Statement

#: names every expression may use besides the sweep variables
BUILTIN_VARIABLES = ("dim", "width")


@dataclass(frozen=True)
class _Context:
    variables: frozenset[str]


def build(module: Module) -> ir.Spec:
    """Check a parsed module and build its :class:`~mfdsl.language.ir.Spec`.

    Raises :class:`SpecError` located in the module's file.
    """
    try:
        return _build(module)
    except SpecError as error:
        raise error.located(module.path, module.source) from None


class _Errors:
    """The errors found so far while building a spec: each independent part (a
    statement, a key, an init rule, an observable) is checked on its own, so one check
    reports every independent error rather than the first."""

    def __init__(self) -> None:
        self._found: list[tuple[tuple[int, int, int], int, SpecError]] = []
        self.omitted = 0  # errors found beyond the limit, counted but not kept

    @property
    def found(self) -> list[SpecError]:
        """The errors in source order: by the place of the part each was found in
        (``--set`` arguments first, then the file by line and column), errors of one
        part in the order found; errors of no place last."""
        return [error for _, _, error in sorted(self._found, key=lambda t: t[:2])]

    def add(self, error: SpecError, at: Span | None = None) -> None:
        """Keep ``error`` (each of a :class:`SpecErrors`), found in the part at ``at``
        (by default, where the error points)."""
        if isinstance(error, SpecErrors):
            self.omitted += error.omitted
        for one in errors_of(error):
            where = at or one.span
            key = (2, 0, 0) if where is None else (0 if where.path else 1, where.line, where.column)
            self._found.append((key, len(self._found), one))

    def attempt(self, check: Callable[..., Any], *args: Any, at: Span | None = None) -> Any:
        """``check(*args)``, or :data:`_FAILED` with its errors kept (found at ``at``)."""
        try:
            return check(*args)
        except SpecError as error:
            self.add(error, at)
            return _FAILED

    def raise_any(self, spec_wide: Sequence[SpecError] = ()) -> None:
        """Raise what was found, local errors in source order before ``spec_wide`` ones."""
        if self._found or spec_wide:
            raise combined([*self.found, *spec_wide], self.omitted)


#: what :meth:`_Errors.attempt` returns for a check that failed
_FAILED: Any = type("Failed", (), {"__repr__": lambda self: "FAILED"})()


def _build(module: Module) -> ir.Spec:
    errors = _Errors()
    by_keyword = _group(module.statements, errors)
    backends = available_backends()

    sweep_stmt = by_keyword.get("sweep")
    sweep = errors.attempt(_sweep, sweep_stmt, at=sweep_stmt.span) if sweep_stmt else None
    if sweep is _FAILED:
        # The names the sweep writes are its variables even when their values are wrong,
        # so an error there does not make every use of them an error too.
        assert sweep_stmt is not None
        written = {entry.key for entry in _entries(sweep_stmt)} | {"seed"}
        variables = frozenset(BUILTIN_VARIABLES) | frozenset(written)
    else:
        variables = frozenset(BUILTIN_VARIABLES) | frozenset(sweep.names if sweep else ())
    ctx = _Context(variables)
    # Errors about what the spec lacks come after the errors in what it has: on a
    # half-written spec, the typo on line 4 is the more useful message.
    spec_wide: list[SpecError] = []
    if sweep_stmt is None:
        spec_wide.append(
            SpecError(
                "the spec has no 'sweep' block, so no widths to train",
                Span(line=1, column=1, end_line=1, end_column=2),
                hint="add e.g. sweep { width = [64, 256, 1024], seed = 0..2 }",
            )
        )
    for required in ("data", "train"):
        if required not in by_keyword:
            spec_wide.append(
                SpecError(
                    f"the spec has no '{required}' block",
                    Span(line=1, column=1, end_line=1, end_column=2),
                    hint="see docs/language.md for an example",
                )
            )

    fields: dict[str, Any] = {"sweep": sweep}
    spans: dict[str, Span] = {}
    if "experiment" in by_keyword:
        stmt = by_keyword["experiment"]
        fields["experiment"] = stmt.names[0]
    else:
        stem = os.path.splitext(os.path.basename(module.path))[0] if module.path else ""
        fields["experiment"] = stem if stem.isidentifier() else "experiment"

    if "data" in by_keyword:
        stmt = by_keyword["data"]
        fields["data"] = errors.attempt(_data, stmt, ctx, at=stmt.span)
    if "network" in by_keyword:
        stmt = by_keyword["network"]
        fields["network"] = errors.attempt(_network, stmt, ctx, at=stmt.span)
    if "scaling" in by_keyword:
        stmt = by_keyword["scaling"]
        scaling = errors.attempt(_scaling, stmt, ctx, at=stmt.span)
        if scaling is not _FAILED:
            fields["scaling"], spans["scaling"] = scaling
    if "init" in by_keyword:
        stmt = by_keyword["init"]
        fields["init"] = errors.attempt(_init, stmt, ctx, at=stmt.span)
    if "train" in by_keyword:
        stmt = by_keyword["train"]
        fields["train"] = errors.attempt(
            construct, ir.Train, _entries(stmt), ctx, stmt.span, "train", at=stmt.span
        )
    if "record" in by_keyword:
        stmt = by_keyword["record"]
        fields["record"] = errors.attempt(_record, stmt, ctx, at=stmt.span)
    if "backends" in by_keyword:
        stmt = by_keyword["backends"]
        seen: set[str] = set()
        for name, span in zip(stmt.names, stmt.name_spans, strict=True):
            if name not in backends:
                errors.add(
                    SpecError(
                        f"unknown backend '{name}'",
                        span,
                        hint=did_you_mean(name, backends)
                        or f"installed backends: {', '.join(sorted(backends))}",
                    )
                )
            elif name in seen:
                errors.add(SpecError(f"backend '{name}' is listed twice", span))
            seen.add(name)
        fields["backends"] = stmt.names
    options = []
    for stmt in module.statements:
        if stmt.keyword == "options" and by_keyword.get(f"options:{stmt.names[0]}") is stmt:
            options.append(errors.attempt(_backend_options, stmt, ctx, backends, at=stmt.span))
    fields["backend_options"] = tuple(options)
    # The checks across blocks need every block: they run once each block is right.
    errors.raise_any(spec_wide)
    return ir.Spec(
        **fields,
        source=module.source,
        path=module.path,
        spans=dict(spans),
    )


def _network(stmt: Statement, ctx: _Context) -> ir.Network | ir.ConvNetwork:
    if stmt.names[0] == "cnn":
        return _cnn_network(stmt, ctx)
    if stmt.names[0] != "mlp":
        raise SpecError(
            f"unknown network '{stmt.names[0]}'; expected 'mlp' or 'cnn'",
            stmt.name_spans[0],
            hint=did_you_mean(stmt.names[0], ["mlp", "cnn"]),
        )
    network: ir.Network = construct(ir.Network, _entries(stmt), ctx, stmt.span, "network")
    return network


def _group(statements: Sequence[Statement], errors: _Errors) -> dict[str, Statement]:
    """The statements by keyword (a backend's options by ``options:NAME``); a repeated
    one is an error, and the first is the one checked."""
    seen: dict[str, Statement] = {}
    for stmt in statements:
        key = stmt.keyword if stmt.keyword != "options" else f"options:{stmt.names[0]}"
        if key in seen:
            first = seen[key].span
            what = f"'{stmt.names[0]}' options" if stmt.keyword == "options" else f"'{stmt.keyword}'"
            at = f" (first at line {first.line})" if first else ""
            errors.add(
                SpecError(f"duplicate {what} statement{at}", stmt.span, hint="each statement appears once")
            )
            continue
        seen[key] = stmt
    return seen


def _entries(stmt: Statement) -> list[Entry]:
    return [item for item in stmt.body or () if isinstance(item, Entry)]


# ---- generic construction from key = value items -------------------------------------


def construct(
    cls: type[Any],
    entries: Iterable[Entry],
    ctx: _Context,
    span: Span | None,
    what: str,
    *,
    positional: Sequence[ex.Expr] = (),
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Build IR node ``cls`` from ``key = value`` entries (a block or a call's keyword
    arguments), checking unknown, duplicate and missing keys."""
    declared = cls.options()
    values, spans = convert_items(declared, entries, ctx, span, what, positional=positional)
    return cls(**values, **(extra or {}), span=span, spans=dict(spans))


def convert_items(
    declared: Sequence[Option],
    entries: Iterable[Entry],
    ctx: _Context,
    span: Span | None,
    what: str,
    *,
    positional: Sequence[ex.Expr] = (),
) -> tuple[dict[str, Any], dict[str, Span]]:
    """Check ``entries`` against ``declared`` options; return values and their spans."""
    by_name = {o.name: o for o in declared}
    names = list(by_name)
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    if len(positional) > len(declared):
        raise SpecError(
            f"{what}() takes at most {_count(len(declared), 'argument')}, got {len(positional)}",
            positional[len(declared)].span,
        )
    items = [(declared[i].name, expr, expr.span) for i, expr in enumerate(positional)]
    items += [(e.key, e.value, e.key_span) for e in entries]
    first_at: dict[str, Span | None] = {}
    # in the order written; a missing key (the block's error) after its entries' errors
    problems: list[SpecError] = []
    meant: set[str] = set()  # the known keys that unknown keys are probably misspellings of
    for key, expr, key_span in items:
        if key not in by_name:
            meant.update(difflib.get_close_matches(key, names, n=1, cutoff=0.6))
            problems.append(
                SpecError(f"unknown key '{key}' in {what}", key_span, hint=suggest_key(key, names))
            )
            continue
        if key in first_at:
            first = first_at[key]
            at = f" (first at line {first.line})" if first else ""
            problems.append(SpecError(f"duplicate key '{key}' in {what}{at}", key_span))
            continue
        first_at[key] = key_span
        try:
            value = _convert_item(by_name[key].kind, expr, ctx, key)
        except SpecError as error:
            problems.extend(errors_of(error))
            continue
        values[key] = value
        if expr.span is not None:
            spans[key] = expr.span
    for opt in declared:
        # a key missing because it is misspelt is one error, reported at the misspelling
        if opt.name not in first_at and opt.required and opt.name not in meant:
            problems.append(
                SpecError(
                    f"{what} needs '{opt.name}' ({opt.help or opt.kind.describe()})",
                    span,
                    hint=f"add '{opt.name} = ...'",
                )
            )
    if problems:
        raise combined(problems)
    return values, spans


def _convert_item(kind: Kind, expr: ex.Expr, ctx: _Context, key: str) -> Any:
    value = convert(expr, kind, ctx, key)
    if not ir.is_expr(value) and not isinstance(value, ir.Node):
        value = _check_value(kind, value, expr, key)
    return value


def _check_value(kind: Kind, value: Any, expr: ex.Expr, key: str) -> Any:
    """``kind.check``, but a list written item by item is checked item by item first,
    so ``classes = [0, 1, 1]`` points at the second 1."""
    if isinstance(kind, ListOf) and isinstance(expr, ex.List) and len(expr.items) == len(value):
        first: dict[Any, Span | None] = {}
        for item, v in zip(expr.items, value, strict=True):
            checked = kind.item.check(v, item.span, key)
            if kind.unique and checked in first:
                at, here = first[checked], item.span
                where = ""
                if at is not None and here is not None:
                    where = (
                        f" (first at line {at.line})"
                        if at.line != here.line
                        else f" (first at column {at.column})"
                    )
                raise SpecError(f"'{key}' lists {ex.describe(checked)} twice{where}", item.span)
            first[checked] = item.span
    return kind.check(value, expr.span, key)


def convert(expr: ex.Expr, kind: Kind, ctx: _Context, key: str) -> Any:
    """A value for an option of ``kind``: a concrete value, a nested node, or an
    expression kept for expansion when it uses ``dim``, ``width`` or sweep variables."""
    if isinstance(kind, Nested):
        return _nested(expr, kind, ctx, key)
    if isinstance(expr, ex.Name) and expr.id in ctx.variables:
        return expr
    if isinstance(expr, ex.Name) and kind.symbols:
        return expr.id
    if isinstance(expr, ex.Name) and isinstance(kind, Str):
        written = f'{key} = "{expr.id}"'
        if expr.span is not None and expr.span.path == "--set" and expr.span.text:
            written = f"--set '{expr.span.text.partition('=')[0].strip()}=\"{expr.id}\"'"
        raise SpecError(
            f"'{key}' must be {kind.describe()}, got the name '{expr.id}'",
            expr.span,
            hint=f"write {written}"
            + (" (the shell needs the double quotes quoted)" if written.startswith("--set") else ""),
        )
    if isinstance(kind, LatentFunction):
        return _latent_function(expr, ctx, key)
    # a named constant (``pi``) is a number, unless a sweep variable takes its name
    used = [
        n
        for n in _variable_names(expr, kind, ctx.variables)
        if n.id in ctx.variables or n.id not in ex.CONSTANTS
    ]
    unknown = [n for n in used if n.id not in ctx.variables]
    if unknown:
        n = unknown[0]
        hint = did_you_mean(n.id, ctx.variables)
        if n.id == "last" and kind.symbols:
            hint = "'last' cannot bound a range A..B; list the layers instead, e.g. [2, 3, last]"
        if n.id in LATENT:
            hint = (
                f"'{n.id}', a neuron's latent coordinate, exists only in the mean of an embedded init: "
                "layer 2 ~ embedded(mean = cos(2 * pi * (u_in - u_out)), std = 0.1)"
            )
        raise SpecError(
            f"unknown name '{n.id}' in '{key}'",
            n.span,
            hint=hint
            or "expressions may use 'dim', 'width' and the sweep variables; is it missing from the sweep?",
        )
    if used:
        _check_functions(expr)
        return expr
    return ex.evaluate(expr, {}, symbols=kind.symbols)


def _latent_function(expr: ex.Expr, ctx: _Context, key: str) -> Any:
    """The ``mean`` of ``embedded(...)``: an expression that may use the latent
    coordinates ``u_in`` and ``u_out`` besides ``dim``, ``width``, the sweep variables and
    the constants.  It is kept as written (``mfdsl show`` prints it so) and bound at each
    sweep point; a number if it uses none of them."""
    allowed = ctx.variables | frozenset(LATENT) | frozenset(ex.CONSTANTS)
    for name in ex.names(expr):
        if name.id not in allowed:
            raise SpecError(
                f"unknown name '{name.id}' in '{key}'",
                name.span,
                hint=did_you_mean(name.id, [*LATENT, *sorted(ctx.variables), *ex.CONSTANTS])
                or "the mean of embedded(...) may use the latent coordinates u_in and u_out, "
                "'pi', 'dim', 'width' and the sweep variables",
            )
    _check_functions(expr)
    if any(n.id in ctx.variables for n in ex.names(expr)):
        return expr  # checked once the sweep point binds the variables (mfdsl.language.expand)
    # arguments of the functions, number types, constant sub-expressions (a division
    # by zero): checked now, at the text that is wrong
    bound = bind(expr, {})
    return fold(bound) if not latent_names(bound) else expr


def _variable_names(expr: ex.Expr, kind: Kind, variables: frozenset[str]) -> list[ex.Name]:
    # Bare names inside a list of symbols (``[relu, tanh]``, ``[1, last]``) are symbols,
    # not variables, unless they name one.  A range's bounds are always numbers.
    if isinstance(expr, ex.List) and kind.symbols:
        out: list[ex.Name] = []
        for item in expr.items:
            if isinstance(item, ex.Name) and item.id not in variables:
                continue
            out += _variable_names(item, kind, variables)
        return out
    return ex.names(expr)


def _check_functions(expr: ex.Expr) -> None:
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, ex.Call) and e.func not in ex.FUNCTIONS:
            raise SpecError(
                f"'{e.func}(...)' is not allowed here",
                e.func_span,
                hint=did_you_mean(e.func, ex.FUNCTIONS) or f"functions: {', '.join(ex.FUNCTIONS)}",
            )
        stack.extend(ex.children(e))


_CONSTRUCTORS: dict[str, dict[str, type[Any]]] = {
    "optimizer": ir.OPTIMIZERS,
    "schedule": ir.SCHEDULES,
    "teacher": {"mlp": ir.TeacherNet},
    "dist": ir.DISTRIBUTIONS,
}


def _nested(expr: ex.Expr, kind: Nested, ctx: _Context, key: str) -> Any:
    table = _CONSTRUCTORS[key]
    if isinstance(expr, ex.Name) and kind.bare:
        expr = ex.Call(func=expr.id, span=expr.span, func_span=expr.span)
    if not isinstance(expr, ex.Call):
        raise SpecError(f"'{key}' must be {kind.describe()}", expr.span)
    cls = table.get(expr.func)
    if cls is None:
        raise SpecError(
            f"unknown {key} '{expr.func}'; expected {one_of(table)}",
            expr.func_span,
            hint=did_you_mean(expr.func, table),
        )
    entries = [Entry(key=k, value=v, span=v.span, key_span=v.span) for k, v in expr.kwargs]
    return construct(cls, entries, ctx, expr.span, expr.func, positional=expr.args)


# ---- the statements --------------------------------------------------------------------


def _sweep(stmt: Statement) -> ir.Sweep:
    variables = []
    seen: dict[str, Span | None] = {}
    entries = list(_entries(stmt))
    swept = {entry.key for entry in entries}
    problems = _Errors()
    for entry in entries:
        if entry.key in seen:
            problems.add(SpecError(f"duplicate sweep variable '{entry.key}'", entry.key_span))
            continue
        seen[entry.key] = entry.key_span
        variable = problems.attempt(_sweep_var, entry, swept)
        if variable is not _FAILED:
            variables.append(variable)
    problems.raise_any()
    order = sorted(variables, key=lambda v: {"width": 0, "seed": 1}.get(v.name, 2))
    if not any(v.name == "seed" for v in order):
        order.insert(1 if order and order[0].name == "width" else 0, ir.SweepVar(name="seed", values=(0,)))
    return ir.Sweep(variables=tuple(order), span=stmt.span)


def _sweep_var(entry: Entry, swept: set[str]) -> ir.SweepVar:
    if entry.key in ("dim",):
        raise SpecError(
            "'dim' is the data's input dimension and cannot be swept here",
            entry.key_span,
            hint="sweep a variable of your own and use it in the data block: dim = d",
        )
    if entry.key in KEYWORDS:
        raise SpecError(f"'{entry.key}' is a keyword and cannot name a sweep variable", entry.key_span)
    # A name may be a value (a symbol: ``act = [relu, tanh]``), not part of an expression.
    written = entry.value
    symbols = (written, *ex.children(written)) if isinstance(written, (ex.List, ex.Range)) else (written,)
    # by identity: equal Name nodes compare equal whatever their position
    for name in ex.names(written):
        if name.id in ex.CONSTANTS and name.id not in swept:
            continue
        bare = any(name is sym for sym in symbols)
        if name.id in swept:
            raise SpecError(
                f"sweep values must be constants, but '{name.id}' is a sweep variable: "
                "one variable's values cannot depend on another's",
                name.span,
                hint="sweep one of them and write the other as an expression of it where it "
                "is used, e.g. lr = 0.1 * width in the train block",
            )
        if not bare:
            raise SpecError(
                f"sweep values must be constants, but '{name.id}' is a name inside an expression",
                name.span,
            )
    value = ex.evaluate(entry.value, {}, symbols=True)
    values = value if isinstance(value, tuple) else (value,)
    flat = []
    for v in values:
        if isinstance(v, tuple):
            raise SpecError(f"'{entry.key}' must be a flat list of values", entry.value.span)
        flat.append(v)
    spans = {"values": entry.value.span} if entry.value.span else {}
    if entry.key_span is not None:
        spans["name"] = entry.key_span
    if isinstance(entry.value, ex.List):
        spans.update({f"values[{i}]": item.span for i, item in enumerate(entry.value.items) if item.span})
    return ir.SweepVar(name=entry.key, values=tuple(flat), span=entry.span, spans=dict(spans))


def _data(stmt: Statement, ctx: _Context) -> ir.Data:
    kind = stmt.names[0]
    cls = ir.DATA_KINDS.get(kind)
    if cls is None:
        raise SpecError(
            f"unknown data kind '{kind}'; expected {one_of(ir.DATA_KINDS)}",
            stmt.name_spans[0],
            hint=did_you_mean(kind, ir.DATA_KINDS),
        )
    extra = {"kind": kind} if cls is ir.ImageData else None
    node: ir.Data = construct(cls, _entries(stmt), ctx, stmt.span, f"data {kind}", extra=extra)
    return node


def _cnn_network(stmt: Statement, ctx: _Context) -> ir.ConvNetwork:
    """``network cnn { layers = [conv(...), ...], head, dense, ... }``: the ``layers``
    list is built call by call (each a :class:`~mfdsl.language.ir.ConvLayer`), the other keys
    as any block's."""
    entries = _entries(stmt)
    layer_entries = [e for e in entries if e.key == "layers"]
    if not layer_entries:
        raise SpecError(
            "network cnn needs 'layers', the list of its convolution layers",
            stmt.span,
            hint="add e.g. layers = [conv(3, padding = 1), conv(3, pool = 2)]",
        )
    if len(layer_entries) > 1:
        first = layer_entries[0].key_span
        at = f" (first at line {first.line})" if first else ""
        raise SpecError(f"duplicate key 'layers' in network cnn{at}", layer_entries[1].key_span)
    written = layer_entries[0].value
    items = written.items if isinstance(written, ex.List) else (written,)
    layers = []
    for item in items:
        if isinstance(item, ex.Name) and item.id == "conv":
            item = ex.Call(func="conv", span=item.span, func_span=item.span)
        if not isinstance(item, ex.Call) or item.func != "conv":
            got = f"'{item.func}(...)'" if isinstance(item, ex.Call) else f"'{ex.to_source(item)}'"
            raise SpecError(
                f"'layers' lists convolution layers conv(kernel, stride, padding, pool), got {got}",
                item.func_span if isinstance(item, ex.Call) else item.span,
                hint=did_you_mean(item.func, ["conv"]) if isinstance(item, ex.Call) else None,
            )
        kw = [Entry(key=k, value=v, span=v.span, key_span=v.span) for k, v in item.kwargs]
        layers.append(construct(ir.ConvLayer, kw, ctx, item.span, "conv", positional=item.args))
    others = [e for e in entries if e.key != "layers"]
    node: ir.ConvNetwork = construct(
        ir.ConvNetwork, others, ctx, stmt.span, "network cnn", extra={"layers": tuple(layers)}
    )
    return node


def _scaling(stmt: Statement, ctx: _Context) -> tuple[Any, Span]:
    name, span = stmt.names[0], stmt.name_spans[0]
    assert span is not None
    if name in ctx.variables and name not in BUILTIN_VARIABLES:
        return ex.Name(id=name, span=span), span
    if name not in ir.SCALINGS:
        candidates = list(ir.SCALINGS) + sorted(ctx.variables - set(BUILTIN_VARIABLES))
        raise SpecError(
            f"unknown scaling '{name}'; expected {one_of(ir.SCALINGS)} or a sweep variable",
            span,
            hint=did_you_mean(name, candidates),
        )
    return name, span


def _init(stmt: Statement, ctx: _Context) -> ir.Init:
    rules = []
    layers_kind = ir.InitRule.options()[0].kind
    problems = _Errors()
    for item in stmt.body or ():
        assert isinstance(item, Rule)
        rule = problems.attempt(_init_rule, item, layers_kind, ctx)
        if rule is not _FAILED:
            rules.append(rule)
    problems.raise_any()
    return ir.Init(rules=tuple(rules), span=stmt.span)


def _init_rule(item: Rule, layers_kind: Kind, ctx: _Context) -> ir.InitRule:
    layers = convert(item.selector, layers_kind, ctx, "layer")
    if not isinstance(item.dist, (ex.Call, ex.Name)):
        raise SpecError(
            "expected a distribution: normal(mean, std), uniform(low, high) or constant(value)",
            item.dist.span,
        )
    dist = _nested(item.dist, Nested(tuple(ir.DISTRIBUTIONS)), ctx, "dist")
    spans = {"layers": item.selector.span} if item.selector.span else {}
    return ir.InitRule(layers=layers, dist=dist, span=item.span, spans=dict(spans))


def _record(stmt: Statement, ctx: _Context) -> ir.Record:
    mode = stmt.names[0]
    assert stmt.arg is not None
    problems = _Errors()
    count = problems.attempt(convert, stmt.arg, ir.Record.options()[1].kind, ctx, mode)
    observables = []
    for item in stmt.body or ():
        observable = problems.attempt(_observable, item, ctx)
        if observable is not _FAILED:
            observables.append(observable)
    problems.raise_any()
    return ir.Record(
        mode=mode,
        count=count,
        observables=tuple(observables),
        span=stmt.span,
        spans=dict({"count": stmt.arg.span} if stmt.arg.span else {}),
    )


def _observable(item: Any, ctx: _Context) -> ir.Observable:
    if not isinstance(item, (ex.Name, ex.Call)):  # YAML: observables: [1]
        raise SpecError(
            "expected an observable: a name, or a call such as output(probes = 32)",
            item.span,
            hint=f"observables: {', '.join(ir.OBSERVABLES)}",
        )
    name = item.id if isinstance(item, ex.Name) else item.func
    span = item.span if isinstance(item, ex.Name) else item.func_span
    if name not in ir.OBSERVABLES:
        raise SpecError(
            f"unknown observable '{name}'",
            span,
            hint=did_you_mean(name, ir.OBSERVABLES) or f"observables: {', '.join(ir.OBSERVABLES)}",
        )
    # positional arguments in the order the observable lists them (``neuron_spread(2, 8)``
    # is layer 2, 8 probes), the order of the reference's table of observables
    by_name = {o.name: o for o in ir.Observable.options()}
    declared = [by_name[arg] for arg in ir.Observable.accepted(name)]
    if isinstance(item, ex.Call):
        if not declared and (item.args or item.kwargs):
            raise SpecError(f"{name} takes no arguments", item.span, hint=f"write just '{name}'")
        entries = [Entry(key=k, value=v, span=v.span, key_span=v.span) for k, v in item.kwargs]
        values, spans = convert_items(declared, entries, ctx, item.span, name, positional=item.args)
    else:
        values, spans = {}, {}
    return ir.Observable(name=name, **values, span=item.span, spans=dict(spans))


def _backend_options(stmt: Statement, ctx: _Context, backends: Mapping[str, Any]) -> ir.BackendOptions:
    name, span = stmt.names[0], stmt.name_spans[0]
    if name not in backends and name in ir.DATA_KINDS:
        raise SpecError(f"unknown block '{name}'", span, hint=f"a data block reads 'data {name} {{ ... }}'")
    if name not in backends:
        keyword = did_you_mean(name, KEYWORDS)
        if keyword:
            raise SpecError(f"unknown block '{name}'", span, hint=keyword)
        raise SpecError(
            f"unknown block '{name}': not a keyword nor an installed backend",
            span,
            hint=did_you_mean(name, backends)
            or f"blocks: {', '.join(KEYWORDS)}; backends: {', '.join(sorted(backends))}",
        )
    declared = backends[name].options
    values, spans = convert_items(declared, _entries(stmt), ctx, stmt.span, f"{name} options")
    return ir.BackendOptions(
        backend=name,
        values=tuple(values.items()),
        span=stmt.span,
        spans=dict(spans),
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def option_defaults(declared: Sequence[Option]) -> dict[str, Any]:
    """The default of every option that has one."""
    return {o.name: o.default for o in declared if o.default is not REQUIRED}
