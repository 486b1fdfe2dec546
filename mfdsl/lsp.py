"""``mfdsl lsp``: a language server for ``.mf`` specs (diagnostics, completion, hover).

The editor features are plain functions of the text (:func:`diagnostics`,
:func:`completions`, :func:`hover`), so they are tested without an editor; the server
(:func:`serve`, with pygls) only carries them over the Language Server Protocol.

Everything the server knows about the language comes from where the language is
defined: the grammar's keywords (:data:`mfdsl.language.syntax.KEYWORDS`), the options each block
declares (:mod:`mfdsl.language.options`, with their help texts), the IR's tables of data kinds,
activations, optimizers, schedules, distributions and observables, and the options of
the installed backends.  Diagnostics are what ``mfdsl check`` reports: every independent
error, and its warnings (unused sweep variables, the science checks) as warnings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfdsl.core.errors import Span, SpecError, errors_of
from mfdsl.language import ir as ir
from mfdsl.language.options import (
    REQUIRED,
    AnyValue,
    Bool,
    Choice,
    Either,
    Kind,
    Layers,
    ListOf,
    Nested,
    Option,
)
from mfdsl.language.syntax import KEYWORDS

# A token of the text before the cursor, near enough for completion: strings (perhaps
# unclosed), comments, names, numbers, newlines and single symbols.
_TOKEN = re.compile(
    r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[0-9][A-Za-z0-9_.]*|\.\.|\*\*|\n|[^\s]'
)
_WORD_END = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WORD_AT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---- diagnostics ----------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning, at 0-based lines and UTF-16 columns (as LSP counts)."""

    severity: str  # "error" or "warning"
    message: str
    start: tuple[int, int]
    end: tuple[int, int]


def check_text(source: str, path: str | None = None) -> list[tuple[str, SpecError]]:
    """What ``mfdsl check`` finds in ``source`` before looking at this machine's
    resources and data files: every independent error, or else its warnings (unused
    sweep variables, the science checks, backends that cannot run here)."""
    from mfdsl.language.build import build
    from mfdsl.language.load import YAML_SUFFIXES, yaml_to_module
    from mfdsl.language.syntax import parse_text
    from mfdsl.plan.check import check_all, preflight, spec_warnings

    try:
        yaml = path is not None and path.endswith(YAML_SUFFIXES)
        module = yaml_to_module(source, path) if yaml else parse_text(source, path)
        spec = build(module)
        points = check_all(spec)
        warnings: list[SpecError] = [*spec_warnings(spec, points), *preflight(spec, points, spec.backends)]
    except SpecError as error:
        return [("error", one) for one in errors_of(error)]
    return [("warning", warning) for warning in warnings]


def diagnostics(source: str, path: str | None = None) -> list[Diagnostic]:
    """:func:`check_text`'s findings as editor diagnostics: the message with its hint,
    over the text each points at."""
    out = []
    lines = source.split("\n")
    for severity, error in check_text(source, path):
        message = error.message + (f"\nhint: {error.hint}" if error.hint else "")
        span = error.span if error.span is not None and error.span.path is None else None
        start, end = _range(span, lines)
        out.append(Diagnostic(severity=severity, message=message, start=start, end=end))
    return out


def _range(span: Span | None, lines: Sequence[str]) -> tuple[tuple[int, int], tuple[int, int]]:
    if span is None:
        return (0, 0), (0, 1)
    start = _position(lines, span.line, span.column)
    end = _position(lines, span.end_line, span.end_column)
    if end <= start:
        end = (start[0], start[1] + 1)
    return start, end


def _position(lines: Sequence[str], line: int, column: int) -> tuple[int, int]:
    """A 1-based line and character column as LSP's 0-based line and UTF-16 offset."""
    row = min(max(line, 1), max(len(lines), 1)) - 1
    text = lines[row] if lines else ""
    prefix = text[: max(column, 1) - 1]
    return row, len(prefix.encode("utf-16-le")) // 2


def _offset(source: str, line: int, character: int) -> int:
    """The string index of LSP's 0-based ``line`` and UTF-16 ``character``."""
    lines = source.split("\n")
    line = min(max(line, 0), len(lines) - 1)
    start = sum(len(text) + 1 for text in lines[:line])
    text, units, index = lines[line], 0, 0
    while index < len(text) and units < character:
        units += 2 if ord(text[index]) > 0xFFFF else 1
        index += 1
    return start + index


# ---- what is declared where -------------------------------------------------------------


def _backends() -> Mapping[str, Any]:
    from mfdsl.core.plugins import available_backends

    return available_backends()


def _sweep_options() -> tuple[Option, ...]:
    # The two variables every sweep has (the builder adds seed = 0 when it is left
    # out); any other name is the spec's own variable.
    doc = _doc(ir.Sweep)
    return tuple(
        Option(name=name, kind=ListOf(AnyValue(), min_length=1), help=doc) for name in ("width", "seed")
    )


def _block_options(head: Sequence[str]) -> tuple[Option, ...]:
    """The keys of the block whose statement starts with the words ``head``."""
    if not head:
        return ()
    keyword = head[0]
    if keyword == "data" and len(head) > 1 and head[1] in ir.DATA_KINDS:
        return ir.DATA_KINDS[head[1]].options()
    if keyword == "network":
        return ir.Network.options()
    if keyword == "train":
        return ir.Train.options()
    if keyword == "sweep":
        return _sweep_options()
    if keyword in KEYWORDS:  # init and record hold rules and observables, not keys
        return ()
    backend = _backends().get(keyword)
    return tuple(backend.options) if backend is not None else ()


def _constructors(key: str | None) -> Mapping[str, type[Any]]:
    """The calls a key's value may be (``optimizer``: ``sgd``, ``langevin``)."""
    from mfdsl.language.build import _CONSTRUCTORS

    if key is not None and key in _CONSTRUCTORS:
        return _CONSTRUCTORS[key]
    merged: dict[str, type[Any]] = {}
    for table in _CONSTRUCTORS.values():
        for name, cls in table.items():
            merged.setdefault(name, cls)
    return merged


def _observable_options(name: str) -> tuple[Option, ...]:
    by_name = {o.name: o for o in ir.Observable.options()}
    return tuple(by_name[arg] for arg in ir.Observable.accepted(name) if arg in by_name)


def _values(kind: Kind) -> list[tuple[str, str]]:
    """The names a value of ``kind`` may be, each with what it is."""
    if isinstance(kind, Choice):
        return [(c, "choice") for c in kind.choices]
    if isinstance(kind, Bool):
        return [("true", "choice"), ("false", "choice")]
    if isinstance(kind, Nested):
        return [(c, "constructor") for c in kind.constructors]
    if isinstance(kind, Either):
        return [v for k in kind.kinds for v in _values(k)]
    if isinstance(kind, ListOf):
        return _values(kind.item)
    if isinstance(kind, Layers):
        return [("last", "choice")]
    return []


def _doc(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, as Markdown (``code`` kept)."""
    text = inspect.getdoc(obj) or ""
    return text.split("\n\n")[0].replace("``", "`").replace("\n", " ")


def _option_doc(opt: Option, where: str = "") -> str:
    if opt.default is REQUIRED:
        default = "required"
    elif opt.default is None:
        default = "optional"  # (None: not given, and the option's help says what then)
    else:
        default = f"default `{_shown(opt.default)}`"
    head = f"**{opt.name}**" + (f" ({where})" if where else "")
    text = f"{head}: {opt.kind.describe()}, {default}"
    return text + (f"\n\n{opt.help}" if opt.help else "")


def _shown(value: Any) -> str:
    if isinstance(value, ir.Node):
        return type(value).__name__.lower()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _class_doc(name: str, cls: type[Any]) -> str:
    lines = [f"**{name}**: {_doc(cls)}"]
    options = [o for o in cls.options() if o.name != "name"] if hasattr(cls, "options") else []
    if options:
        lines.append("")
        lines += [f"- {_option_doc(o).splitlines()[0]}" + (f" — {o.help}" if o.help else "") for o in options]
    return "\n".join(lines)


# ---- where the cursor is ----------------------------------------------------------------


@dataclass
class _Frame:
    """An open ``{``, ``(`` or ``[`` and what it belongs to."""

    bracket: str
    head: tuple[str, ...]  # for '{': the statement's words; for '(': the function's name
    key: str | None  # the key whose value holds this bracket
    pending: list[str] = dataclasses.field(default_factory=list)  # tokens of the current item


@dataclass
class _Context:
    stack: list[_Frame]
    top: list[str]  # the tokens of the statement being written at the top level


def _context(before: str) -> _Context:
    """Where the end of ``before`` is: the open brackets and the tokens of the item
    being written in the innermost one."""
    stack: list[_Frame] = []
    top: list[str] = []
    for match in _TOKEN.finditer(before):
        token = match.group()
        if token.startswith("#"):
            continue
        pending = stack[-1].pending if stack else top
        if token == "\n":
            if stack and stack[-1].bracket == "{":
                pending.clear()
            elif not stack and not (top and top[-1] == ","):
                top.clear()
            continue
        if token in ("{", "(", "["):
            if token == "{":
                head = tuple(t for t in pending if _WORD_AT.fullmatch(t))
                frame = _Frame("{", head, None)
            else:
                func = pending[-1] if pending and _WORD_AT.fullmatch(pending[-1]) else ""
                frame = _Frame(token, (func,), _key_of(stack, pending))
            stack.append(frame)
            continue
        if token in ("}", ")", "]"):
            if stack:
                stack.pop()
            if not stack:
                top.clear()
            elif token != "}":
                stack[-1].pending.append("<value>")
            continue
        if token in (",", ";"):
            if (stack and stack[-1].bracket == "{") or (stack and token == ","):
                pending.clear()
            elif not stack:
                if token == ";":
                    top.clear()
                else:
                    top.append(token)
            continue
        pending.append(token)
    return _Context(stack, top)


def _key_of(stack: Sequence[_Frame], pending: Sequence[str]) -> str | None:
    """The key whose value an opening bracket starts (``optimizer = sgd(``)."""
    if "=" in pending:
        return pending[pending.index("=") - 1] if pending.index("=") > 0 else None
    if "~" in pending:
        return "dist"
    if stack and stack[-1].bracket == "{" and stack[-1].head[:1] == ("record",):
        return "observable"
    return stack[-1].key if stack and stack[-1].bracket == "[" else None


# ---- completion -------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One completion: the text, what it is (``keyword``, ``key``, ``choice``,
    ``constructor``, ``observable``, ``backend``), a one-line detail, and Markdown."""

    label: str
    what: str
    detail: str = ""
    documentation: str = ""
    insert: str | None = None


def completions(source: str, line: int, character: int) -> list[Completion]:
    """What may be written at 0-based ``line`` and UTF-16 ``character`` of ``source``."""
    before = source[: _offset(source, line, character)]
    partial = _WORD_END.search(before)
    if partial:
        before = before[: partial.start()]
    ctx = _context(before)
    if not ctx.stack:
        return _top_level(ctx.top)
    frame = ctx.stack[-1]
    if frame.bracket == "{":
        return _in_block(frame)
    if frame.bracket == "(":
        return _in_call(frame)
    return _in_list(frame, ctx.stack)


def _top_level(words: Sequence[str]) -> list[Completion]:
    backends = _backends()
    if not words:
        out = [Completion(k, "keyword", "statement", _keyword_doc(k)) for k in KEYWORDS]
        out += [
            Completion(name, "backend", f"{name} options", _backend_doc(name), insert=f"{name} {{ ")
            for name in sorted(backends)
        ]
        return out
    keyword = words[0]
    if len(words) == 1 and keyword == "data":
        return [Completion(k, "choice", "data kind", _class_doc(k, c)) for k, c in ir.DATA_KINDS.items()]
    if len(words) == 1 and keyword == "network":
        return [Completion("mlp", "choice", "network", _class_doc("mlp", ir.Network))]
    if len(words) == 1 and keyword == "scaling":
        return [Completion(s, "choice", "scaling", _scaling_doc()) for s in ir.SCALINGS]
    if len(words) == 1 and keyword == "record":
        opt = ir.Record.options()[0]
        return [Completion(m, "choice", "record", _option_doc(opt)) for m, _ in _values(opt.kind)]
    if keyword == "backends" and words[-1] in ("backends", ","):
        return [Completion(n, "backend", "backend", _backend_doc(n)) for n in sorted(backends)]
    return []


def _in_block(frame: _Frame) -> list[Completion]:
    head, pending = frame.head, frame.pending
    if head[:1] == ("record",):
        if pending:
            return []
        return [Completion(o, "observable", "observable", _observable_doc(o)) for o in ir.OBSERVABLES]
    if head[:1] == ("init",):
        if not pending:
            return [Completion("layer", "keyword", "init rule", _doc(ir.InitRule))]
        if pending[-1] == "~":
            return _constructor_completions(ir.DISTRIBUTIONS)
        return []
    options = _block_options(head)
    if not pending:
        where = " ".join(head)
        return [
            Completion(o.name, "key", o.kind.describe(), _option_doc(o, where), insert=f"{o.name} = ")
            for o in options
        ]
    if len(pending) == 2 and pending[1] == "=":
        return _value_completions(pending[0], options)
    return []


def _options_of(frame: _Frame) -> tuple[Option, ...]:
    """The keys a block or a call takes (none for a list, ``init`` or ``record``)."""
    if frame.bracket == "{":
        return _block_options(frame.head)
    if frame.bracket == "(":
        if frame.key == "observable":
            return _observable_options(frame.head[0])
        cls = _constructors(frame.key).get(frame.head[0])
        return tuple(cls.options()) if cls is not None else ()
    return ()


def _in_call(frame: _Frame) -> list[Completion]:
    func, pending = frame.head[0], frame.pending
    options = _options_of(frame)
    if not pending:
        return [
            Completion(
                o.name, "key", o.kind.describe(), _option_doc(o, f"{func}(...)"), insert=f"{o.name} = "
            )
            for o in options
        ]
    if len(pending) == 2 and pending[1] == "=":
        return _value_completions(pending[0], options)
    return []


def _list_owner(stack: Sequence[_Frame]) -> _Frame | None:
    """The block or call whose key's value the innermost list is."""
    return next((f for f in reversed(stack[:-1]) if f.bracket != "["), None)


def _in_list(frame: _Frame, stack: Sequence[_Frame]) -> list[Completion]:
    owner = _list_owner(stack)
    if owner is None or frame.key is None:
        return []
    return _value_completions(frame.key, _options_of(owner))


def _value_completions(key: str, options: Sequence[Option]) -> list[Completion]:
    opt = next((o for o in options if o.name == key), None)
    if opt is None:
        return []
    if isinstance(opt.kind, Nested):
        return _constructor_completions(_constructors(key))
    return [Completion(v, what, key, _option_doc(opt)) for v, what in _values(opt.kind)]


def _constructor_completions(table: Mapping[str, type[Any]]) -> list[Completion]:
    return [
        Completion(name, "constructor", f"{name}(...)", _class_doc(name, cls)) for name, cls in table.items()
    ]


def _keyword_doc(keyword: str) -> str:
    cls = {
        "network": ir.Network,
        "init": ir.Init,
        "train": ir.Train,
        "record": ir.Record,
        "sweep": ir.Sweep,
    }.get(keyword)
    if keyword == "data":
        return "**data** KIND `{ ... }`: " + ", ".join(f"`{k}`" for k in ir.DATA_KINDS)
    if keyword == "scaling":
        return _scaling_doc()
    if keyword == "backends":
        return "**backends** NAME, ...: installed: " + ", ".join(f"`{n}`" for n in sorted(_backends()))
    if keyword == "experiment":
        return "**experiment** NAME: the experiment's name (`mfdsl run` writes `runs/NAME.zarr` by default)"
    if cls is None:
        return f"**{keyword}**"
    return _class_doc(keyword, cls)


def _scaling_doc() -> str:
    opt = next(o for o in ir.Spec.options() if o.name == "scaling")
    return _option_doc(opt)


def _backend_doc(name: str) -> str:
    backend = _backends().get(name)
    if backend is None:
        return ""
    lines = [f"**{name}** options: {_doc(backend)}", ""]
    lines += [
        f"- {_option_doc(o).splitlines()[0]}" + (f" — {o.help}" if o.help else "") for o in backend.options
    ]
    return "\n".join(lines)


def _observable_doc(name: str) -> str:
    options = _observable_options(name)
    args = ", ".join(o.name for o in options)
    kind = ir.OBSERVABLE_KINDS[name]
    lines = [f"**{name}**" + (f"({args})" if args else "") + f": a recorded observable, the {kind.long_name}"]
    lines += [f"- {_option_doc(o).splitlines()[0]}" + (f" — {o.help}" if o.help else "") for o in options]
    return "\n".join(lines)


# ---- hover ------------------------------------------------------------------------------


def hover(source: str, line: int, character: int) -> str | None:
    """Markdown about the word at 0-based ``line`` and UTF-16 ``character``: a key's
    type, default and help; a block's, constructor's, data kind's or observable's
    documentation; ``None`` over anything else."""
    offset = _offset(source, line, character)
    start = offset
    while start > 0 and (source[start - 1].isalnum() or source[start - 1] == "_"):
        start -= 1
    match = _WORD_AT.match(source, start)
    if match is None or match.end() < offset:
        return None
    word = match.group()
    after = source[match.end() :].lstrip(" \t")
    ctx = _context(source[:start])
    if not ctx.stack:
        return _hover_top(word, ctx.top)
    frame = ctx.stack[-1]
    if frame.bracket == "{":
        if frame.head[:1] == ("record",):
            return _observable_doc(word) if word in ir.OBSERVABLES else None
        if frame.head[:1] == ("init",):
            if word in ir.DISTRIBUTIONS and "~" in frame.pending:
                return _class_doc(word, ir.DISTRIBUTIONS[word])
            return f"**layer** SELECTOR ~ DISTRIBUTION: {_doc(ir.InitRule)}" if word == "layer" else None
        return _hover_entry(word, after, frame.pending, _block_options(frame.head), " ".join(frame.head))
    if frame.bracket == "(":
        return _hover_entry(word, after, frame.pending, _options_of(frame), f"{frame.head[0]}(...)")
    owner = _list_owner(ctx.stack)
    options = _options_of(owner) if owner is not None else ()
    opt = next((o for o in options if o.name == frame.key), None)
    return _option_doc(opt) if opt is not None and word in dict(_values(opt.kind)) else None


def _hover_top(word: str, words: Sequence[str]) -> str | None:
    if not words and word in KEYWORDS:
        return _keyword_doc(word)
    if not words and word in _backends():
        return _backend_doc(word)
    if words[:1] == ["data"] and word in ir.DATA_KINDS:
        return _class_doc(word, ir.DATA_KINDS[word])
    if words[:1] == ["scaling"] and word in ir.SCALINGS:
        return _scaling_doc()
    if words[:1] == ["network"] and word == "mlp":
        return _class_doc("mlp", ir.Network)
    if words[:1] == ["backends"] and word in _backends():
        return _backend_doc(word)
    return None


def _hover_entry(
    word: str, after: str, pending: Sequence[str], options: Sequence[Option], where: str
) -> str | None:
    by_name = {o.name: o for o in options}
    if not pending and word in by_name:
        return _option_doc(by_name[word], where)
    if len(pending) >= 2 and pending[1] == "=" and pending[0] in by_name:
        opt = by_name[pending[0]]
        if isinstance(opt.kind, Nested) or after.startswith("("):
            cls = _constructors(pending[0]).get(word)
            return _class_doc(word, cls) if cls is not None else None
        if word in dict(_values(opt.kind)):
            return _option_doc(opt, where)
    return None


# ---- the server -------------------------------------------------------------------------


#: seconds without a change before a changed document is checked again
CHANGE_DELAY = 0.25


def serve() -> None:
    """Run the language server on stdin and stdout until the editor ends it."""
    server().start_io()


def _lsp_diagnostic(types: Any, found: Diagnostic) -> Any:
    """A :class:`Diagnostic` as lsprotocol's."""
    severities = {"error": types.DiagnosticSeverity.Error, "warning": types.DiagnosticSeverity.Warning}
    return types.Diagnostic(
        range=types.Range(
            start=types.Position(line=found.start[0], character=found.start[1]),
            end=types.Position(line=found.end[0], character=found.end[1]),
        ),
        message=found.message,
        severity=severities[found.severity],
        source="mfdsl",
    )


def server() -> Any:
    """The pygls language server (raises ImportError without pygls)."""
    from lsprotocol import types
    from pygls.lsp.server import LanguageServer
    from pygls.uris import to_fs_path

    from mfdsl.core.version import __version__

    ls = LanguageServer("mfdsl", __version__)
    kinds = {
        "keyword": types.CompletionItemKind.Keyword,
        "key": types.CompletionItemKind.Property,
        "choice": types.CompletionItemKind.EnumMember,
        "constructor": types.CompletionItemKind.Function,
        "observable": types.CompletionItemKind.Value,
        "backend": types.CompletionItemKind.Module,
    }

    # One check at a time, off the event loop: the science checks of a large spec take a
    # second or two, and completion and hover must answer meanwhile.
    checking = asyncio.Lock()

    async def publish(uri: str, version: int | None) -> None:
        async with checking:
            document = ls.workspace.get_text_document(uri)
            if document.version != version:
                return  # replaced while waiting: the newer version is checked instead
            path = os.fspath(to_fs_path(uri) or uri)
            found = await asyncio.to_thread(diagnostics, document.source, path)
        if ls.workspace.get_text_document(uri).version != version:
            return
        ls.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(
                uri=uri, diagnostics=[_lsp_diagnostic(types, d) for d in found], version=version
            )
        )

    @ls.feature(types.TEXT_DOCUMENT_DID_OPEN)
    async def did_open(params: types.DidOpenTextDocumentParams) -> None:
        await publish(params.text_document.uri, params.text_document.version)

    @ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    async def did_change(params: types.DidChangeTextDocumentParams) -> None:
        # Checked once typing pauses: a check of text already replaced is wasted.
        uri, version = params.text_document.uri, params.text_document.version
        await asyncio.sleep(CHANGE_DELAY)
        await publish(uri, version)

    @ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(params: types.DidCloseTextDocumentParams) -> None:
        ls.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(uri=params.text_document.uri, diagnostics=[])
        )

    @ls.feature(
        types.TEXT_DOCUMENT_COMPLETION,
        types.CompletionOptions(trigger_characters=[" ", "{", "(", "=", ",", "~", "["]),
    )
    def complete(params: types.CompletionParams) -> types.CompletionList:
        document = ls.workspace.get_text_document(params.text_document.uri)
        items = [
            types.CompletionItem(
                label=c.label,
                kind=kinds.get(c.what),
                detail=c.detail or None,
                documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=c.documentation)
                if c.documentation
                else None,
                insert_text=c.insert,
            )
            for c in completions(document.source, params.position.line, params.position.character)
        ]
        return types.CompletionList(is_incomplete=False, items=items)

    @ls.feature(types.TEXT_DOCUMENT_HOVER)
    def on_hover(params: types.HoverParams) -> types.Hover | None:
        document = ls.workspace.get_text_document(params.text_document.uri)
        text = hover(document.source, params.position.line, params.position.character)
        if text is None:
            return None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text))

    return ls
