"""Canonical formatting of spec text (``mfdsl fmt``), keeping every comment.

Formatting works on the syntax tree (:mod:`mfdsl.language.syntax`), not on the IR, so a spec
with an unknown key or an invalid value still formats; only a spec that does not
parse is refused.  The layout rules:

* statements in the order written, one blank line between them;
* ``experiment``, ``scaling`` and ``backends`` on one line;
* a block written on one line stays on one line if it fits in :data:`LINE_WIDTH`
  columns (``network mlp { hidden = 4, activation = relu }``); otherwise one entry
  per line, indented by two spaces, with ``=`` (or an init rule's ``~``) aligned;
  ``init`` always has one rule per line;
* the observables of a multi-line ``record`` block keep the author's grouping: those
  written on one line stay on one line, joined with ``", "`` (a group wider than
  :data:`LINE_WIDTH` is filled onto as few lines as fit);
* values in canonical spacing with the fewest parentheses (:func:`mfdsl.language.expr.to_source`);
* single blank lines inside a block and between comments are kept, runs of blank
  lines become one;
* comments stay where they were: an own-line comment stays before the statement or
  entry below it (or at the end of its block, or of the file), a trailing comment
  stays at the end of its line.  Trailing comments keep the author's gap after the
  code (at least two spaces) and line up within a block, so hand-aligned comments
  survive; a comment inside a multi-line value or header moves above it.

The result is idempotent and parses to an equal syntax tree.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from itertools import accumulate

from mfdsl.core.errors import SpecError
from mfdsl.language import expr as ex
from mfdsl.language.syntax import Comment, Entry, Item, Module, Rule, Statement, parse_text

#: a block written on one line stays on one line up to this width
LINE_WIDTH = 88
INDENT = "  "

# Blocks that never stay on one line: their rules read better one per line, aligned.
_ALWAYS_MULTILINE = frozenset({"init"})


def format_source(source: str, path: str | None = None) -> str:
    """``source`` (spec text) in canonical layout, comments kept.

    Raises :class:`~mfdsl.SpecError` if the text does not parse; semantic errors
    (unknown keys, bad values) are not checked.  The result ends with one newline
    (an empty spec formats to the empty string).
    """
    return format_module(parse_text(source, path))


def write_formatted(path: str, text: str) -> None:
    """Replace the spec file ``path`` by ``text`` atomically (a temporary file beside
    it, renamed over it), keeping its permissions.  A symbolic link is written
    through: its target gets the text and the link stays a link.  A file that cannot
    be written is a :class:`~mfdsl.SpecError` saying why."""
    target = os.path.realpath(path)
    tmp = f"{target}.mfdsl-fmt-{os.getpid()}"
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    except OSError as error:
        shown = f" (the target of the link {path})" if target != os.path.abspath(path) else ""
        raise SpecError(
            f"cannot write {target}{shown}: {error.strerror or error}",
            path=path,
            hint="nothing was changed; check the file's folder is writable",
        ) from None


def format_module(module: Module) -> str:
    """A parsed module (with its ``source``, which locates comments and blank lines)
    in canonical layout."""
    return _Formatter(module).render()


@dataclass
class _Slot:
    """The comments attached to one piece of code."""

    leading: list[Comment] = field(default_factory=list)
    trailing: Comment | None = None


@dataclass
class _StatementSlots:
    own: _Slot = field(default_factory=_Slot)
    head: Comment | None = None  # after the opening brace of a multi-line block
    items: list[_Slot] = field(default_factory=list)
    dangling: list[Comment] = field(default_factory=list)  # after the last item


@dataclass
class _Row:
    """One output line inside a block: an own-line comment or a line of code."""

    code: str
    trailing: Comment | None = None
    blank: bool = False


class _Formatter:
    def __init__(self, module: Module) -> None:
        self.statements = module.statements
        self.lines = module.source.split("\n")
        self.line_starts = [0, *accumulate(len(line) + 1 for line in self.lines)]
        blank = [not line.strip() for line in self.lines]
        # blank_count[n]: blank lines among lines 1..n, so any range is answered at once
        self.blank_count = [0, *accumulate(blank)]
        self.source = module.source
        self.slots = [_StatementSlots(items=[_Slot() for _ in s.body or ()]) for s in self.statements]
        self.eof: list[Comment] = []
        for comment in module.comments:
            self._attach(comment)

    # ---- where each comment belongs ------------------------------------------------

    def _offset(self, comment: Comment) -> int:
        return self.line_starts[comment.line - 1] + comment.column - 1

    def _attach(self, comment: Comment) -> None:
        pos = self._offset(comment)
        for k, stmt in enumerate(self.statements):
            span = stmt.span
            assert span is not None
            if span.start_pos < pos < span.end_pos:
                self._attach_inside(k, comment, pos)
                return
        before = [k for k, s in enumerate(self.statements) if s.span is not None and s.span.end_pos <= pos]
        if before and not comment.own_line and self.slots[before[-1]].own.trailing is None:
            self.slots[before[-1]].own.trailing = comment
            return
        self._attach_before_statement(comment, pos)

    def _attach_before_statement(self, comment: Comment, pos: int) -> None:
        for k, stmt in enumerate(self.statements):
            if stmt.span is not None and stmt.span.start_pos > pos:
                self.slots[k].own.leading.append(comment)
                return
        self.eof.append(comment)

    def _attach_inside(self, k: int, comment: Comment, pos: int) -> None:
        stmt, slots = self.statements[k], self.slots[k]
        brace = self._open_brace(stmt)
        if brace is None or pos < brace:
            # Inside a header split over lines: the header is printed on one line.
            slots.own.leading.append(comment)
            return
        items = stmt.body or ()
        spans = [_span_of(item) for item in items]
        for j, (start, end) in enumerate(spans):
            if start < pos < end:
                # Inside a value split over lines, which is printed on one line.
                slots.items[j].leading.append(comment)
                return
        if not comment.own_line:
            ended = [j for j, (_, end) in enumerate(spans) if end <= pos]
            if ended and slots.items[ended[-1]].trailing is None:
                slots.items[ended[-1]].trailing = comment
                return
            if not ended and slots.head is None:
                slots.head = comment
                return
        following = [j for j, (start, _) in enumerate(spans) if start > pos]
        if following:
            slots.items[following[0]].leading.append(comment)
        else:
            slots.dangling.append(comment)

    def _open_brace(self, stmt: Statement) -> int | None:
        """The offset of the statement's ``{`` (``None`` if it has no block)."""
        if stmt.body is None or stmt.span is None:
            return None
        text, i, end = self.source, stmt.span.start_pos, stmt.span.end_pos
        while i < end:
            char = text[i]
            if char == "{":
                return i
            if char == "#":
                i = text.find("\n", i)
                if i < 0:
                    return None
            elif char == '"':
                i += 1
                while i < end and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
            i += 1
        return None

    # ---- layout -------------------------------------------------------------------------

    def _gap(self, after_line: int, before_line: int) -> bool:
        """Whether the source has a blank line strictly between two lines."""
        if before_line - after_line < 2:
            return False
        return self.blank_count[before_line - 1] > self.blank_count[after_line]

    def _trailing_gap(self, comment: Comment) -> int:
        """Spaces between the code and ``comment`` in the source (at least two)."""
        code = self.lines[comment.line - 1][: comment.column - 1]
        return max(2, len(code) - len(code.rstrip()))

    def _with_comment(self, code: str, comment: Comment | None) -> str:
        if comment is None:
            return code
        return code + " " * self._trailing_gap(comment) + comment.text

    def render(self) -> str:
        out: list[str] = []
        prev_line = 0
        for k, stmt in enumerate(self.statements):
            assert stmt.span is not None
            slots = self.slots[k]
            first = True
            for comment in slots.own.leading:
                blank = k > 0 if first else self._gap(prev_line, comment.line)
                _emit(out, comment.text, blank)
                prev_line, first = comment.line, False
            blank = k > 0 if first else self._gap(prev_line, stmt.span.line)
            lines = self._statement(stmt, slots)
            _emit(out, lines[0], blank)
            out.extend(lines[1:])
            prev_line = stmt.span.end_line
        for n, comment in enumerate(self.eof):
            blank = bool(self.statements or n) and self._gap(prev_line, comment.line)
            _emit(out, comment.text, blank)
            prev_line = comment.line
        return "\n".join(out) + "\n" if out else ""

    def _statement(self, stmt: Statement, slots: _StatementSlots) -> list[str]:
        head = _header(stmt)
        if stmt.body is None:
            return [self._with_comment(head, slots.own.trailing)]
        items = stmt.body
        inner_comments = (
            slots.head is not None
            or bool(slots.dangling)
            or any(s.leading or s.trailing for s in slots.items)
        )
        assert stmt.span is not None
        if not items and not inner_comments:
            return [self._with_comment(f"{head} {{}}", slots.own.trailing)]
        if (
            stmt.span.line == stmt.span.end_line
            and not inner_comments
            and stmt.keyword not in _ALWAYS_MULTILINE
        ):
            one_line = f"{head} {{ {', '.join(_item(i) for i in items)} }}"
            if len(one_line) <= LINE_WIDTH:
                return [self._with_comment(one_line, slots.own.trailing)]
        rows = self._rows(stmt, slots)
        # Trailing comments line up within the block, never closer to the code than
        # the author put them, so the result is stable under reformatting.
        commented = [r for r in rows if r.trailing is not None]
        column = max(
            (len(INDENT + r.code) + self._trailing_gap(r.trailing) for r in commented if r.trailing),
            default=0,
        )
        lines = [self._with_comment(f"{head} {{", slots.head)]
        for row in rows:
            if row.blank:
                lines.append("")
            text = INDENT + row.code
            if row.trailing is not None:
                text = text.ljust(column) + row.trailing.text
            lines.append(text)
        lines.append(self._with_comment("}", slots.own.trailing))
        return lines

    def _rows(self, stmt: Statement, slots: _StatementSlots) -> list[_Row]:
        assert stmt.span is not None and stmt.body is not None
        items = stmt.body
        key_width = max((len(i.key) for i in items if isinstance(i, Entry)), default=0)
        selector_width = max((len(ex.to_source(i.selector)) for i in items if isinstance(i, Rule)), default=0)
        rows: list[_Row] = []
        prev_line = stmt.span.line

        def comment_row(comment: Comment) -> None:
            nonlocal prev_line
            rows.append(_Row(code=comment.text, blank=bool(rows) and self._gap(prev_line, comment.line)))
            prev_line = comment.line

        for group in _groups(stmt):
            for j in group:
                for comment in slots.items[j].leading:
                    comment_row(comment)
            start, _ = _lines_of(items[group[0]])
            _, end = _lines_of(items[group[-1]])
            blank = bool(rows) and self._gap(prev_line, start)
            texts = [_item(items[j], key_width, selector_width) for j in group]
            trailing = slots.items[group[-1]].trailing
            for n, line in enumerate(_fill(texts)):
                rows.append(_Row(code=line, blank=blank and n == 0))
            rows[-1].trailing = trailing
            prev_line = end
        for comment in slots.dangling:
            comment_row(comment)
        return rows


def _groups(stmt: Statement) -> list[list[int]]:
    """Item indices per output line: observables written on one line share it."""
    items = stmt.body or ()
    groups: list[list[int]] = []
    for j, item in enumerate(items):
        if stmt.keyword == "record" and groups and _lines_of(item)[0] == _lines_of(items[groups[-1][-1]])[1]:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


def _fill(texts: list[str]) -> list[str]:
    """``texts`` joined with ``", "`` into as few lines as fit (a long one alone)."""
    lines = [texts[0]]
    for text in texts[1:]:
        joined = f"{lines[-1]}, {text}"
        if len(INDENT + joined) <= LINE_WIDTH:
            lines[-1] = joined
        else:
            lines.append(text)
    return lines


def _emit(out: list[str], text: str, blank: bool) -> None:
    if blank:
        out.append("")
    out.append(text)


def _header(stmt: Statement) -> str:
    if stmt.keyword == "options":
        return stmt.names[0]
    if stmt.keyword == "backends":
        return "backends " + ", ".join(stmt.names)
    if stmt.keyword == "record":
        assert stmt.arg is not None
        return f"record {stmt.names[0]} {ex.to_source(stmt.arg)}"
    return " ".join((stmt.keyword, *stmt.names))


def _item(item: Item, key_width: int = 0, selector_width: int = 0) -> str:
    if isinstance(item, Entry):
        return f"{item.key.ljust(key_width)} = {ex.to_source(item.value)}"
    if isinstance(item, Rule):
        return f"layer {ex.to_source(item.selector).ljust(selector_width)} ~ {ex.to_source(item.dist)}"
    return ex.to_source(item)


def _span_of(item: Item) -> tuple[int, int]:
    span = item.span
    assert span is not None
    return span.start_pos, span.end_pos


def _lines_of(item: Item) -> tuple[int, int]:
    span = item.span
    assert span is not None
    return span.line, span.end_line
