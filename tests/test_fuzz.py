"""Fuzzing the spec reader with grammar-aware mutations (extends the character-level
fuzz of ``test_errors.py``): the example specs cut into the grammar's tokens, then
tokens deleted, duplicated, swapped, or replaced by others of the language's
vocabulary; and random bytes read as a spec file.  Every input either parses or raises
``mfdsl.SpecError`` at a position — nothing else, and within a second of CPU time.

A few hundred cases run with the suite; ``-m slow`` runs 10 000 more::

    python -m pytest -m slow tests/test_fuzz.py
"""

from __future__ import annotations

import re
import resource
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import EXAMPLES, PIECES, TERMINALS

import mfdsl

ROOT = Path(__file__).resolve().parents[1]

#: the grammar's terminals (grammars/mfdsl.lark), whitespace and comments kept as tokens
#: so that an unmutated spec joins back to itself
TOKEN = re.compile(
    r"""
    (?P<space>[ \t\f\r\n]+) | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*")
    | (?P<number>[0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|[0-9]+)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>\.\.|\*\*|.)
    """,
    re.VERBOSE | re.DOTALL,
)


def tokens(text: str) -> list[tuple[str, str]]:
    """``(kind, text)`` for every token of ``text``."""
    out = [(m.lastgroup or "punct", m.group()) for m in TOKEN.finditer(text)]
    assert "".join(t for _, t in out) == text
    return out


def _vocabulary() -> dict[str, list[str]]:
    """What a token may be replaced with: every name and number of the examples, the
    grammar's keywords, every key and choice the language knows, and edge values."""
    from mfdsl.language import ir as _ir
    from mfdsl.language.load import _key_paths

    words: dict[str, set[str]] = {"name": set(), "number": set(), "string": set(), "punct": set()}
    for text in EXAMPLES:
        for kind, token in tokens(text):
            if kind in words:
                words[kind].add(token)
    grammar = (ROOT / "grammars" / "mfdsl.lark").read_text(encoding="utf-8")
    words["name"].update(re.findall(r'^[A-Z]+: "([a-z]+)"$', grammar, re.MULTILINE))
    words["punct"].update(re.findall(r'"([^\w\s"]{1,2})"', grammar))
    for path in _key_paths():
        words["name"].update(path.split("."))
    for constant in ("ACTIVATIONS", "DATA_KINDS", "DISTRIBUTIONS", "LOSSES", "OBSERVABLES"):
        words["name"].update(str(v) for v in getattr(_ir, constant, ()))
    for constant in ("OPTIMIZERS", "OUTPUT_MAPS", "SCALINGS", "SCHEDULES"):
        words["name"].update(str(v) for v in getattr(_ir, constant, ()))
    words["name"].update(("true", "false", "inf", "nan", "last", "all", "auto", "online", "sqrt", "exp"))
    words["number"].update(("0", "1", "2", "0.0", "0.5", "1e999", "1e-999", "9" * 30, "1e10", "65"))
    words["string"].update(('""', '"cpu"', '"a\\"b"', '"/nonexistent"', '"é😀"'))
    return {kind: sorted(values) for kind, values in words.items()}


VOCABULARY = _vocabulary()
EVERYTHING = sorted({w for values in VOCABULARY.values() for w in values})
TOKENIZED = [tokens(text) for text in EXAMPLES]


@st.composite
def token_mutated(draw: st.DrawFn) -> str:
    """An example spec with 1–6 token edits: delete, duplicate, swap, replace by a
    token of the same kind or of any kind, insert, or cut a run of tokens."""
    toks = list(draw(st.sampled_from(TOKENIZED)))
    for _ in range(draw(st.integers(1, 6))):
        significant = [i for i, (kind, _) in enumerate(toks) if kind not in ("space", "comment")]
        if not significant:
            break
        i = draw(st.sampled_from(significant))
        kind, text = toks[i]
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "same kind", "any", "insert", "cut"]))
        if action == "delete":
            del toks[i]
        elif action == "duplicate":
            toks.insert(i, (kind, text + " "))
        elif action == "swap":
            j = draw(st.sampled_from(significant))
            toks[i], toks[j] = toks[j], toks[i]
        elif action == "same kind":
            toks[i] = (kind, draw(st.sampled_from(VOCABULARY.get(kind) or EVERYTHING)))
        elif action == "any":
            toks[i] = ("punct", draw(st.sampled_from(EVERYTHING)))
        elif action == "insert":
            toks.insert(i, ("punct", f" {draw(st.sampled_from(EVERYTHING))} "))
        else:
            del toks[i : i + draw(st.integers(2, 12))]
    return "".join(text for _, text in toks)


def char_mutated() -> Any:
    """The character-level edits of ``test_errors.py``'s fuzz, for the long run."""
    from test_errors import mutated

    return mutated()


CPU_SECONDS = 1.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parses_or_points(text: str, path: str = "f.mf") -> None:
    """``text`` parses and its first sweep point expands, or it raises a SpecError
    located in the file; in under a second of CPU time either way."""
    start = _cpu()
    try:
        spec = mfdsl.parse(text, path)
        next(iter(mfdsl.expand(spec)))
    except mfdsl.SpecError as error:
        report = str(error)
        assert report.startswith(f"{path}:"), report
        assert error.line is not None and error.column is not None, report
        assert error.line >= 1 and error.column >= 1, report
        assert not TERMINALS.search(f"{error.message}\n{error.hint}"), report
    spent = _cpu() - start
    assert spent < CPU_SECONDS, f"{spent:.2f} s of CPU on:\n{text}"


def loads_or_points(data: bytes, path: Path) -> None:
    """Bytes as a spec file: ``mfdsl.load`` reads it, or raises a SpecError located in
    the file (a position when the bytes got as far as the parser)."""
    path.write_bytes(data)
    start = _cpu()
    try:
        mfdsl.load(path)
    except mfdsl.SpecError as error:
        report = str(error)
        assert report.startswith(str(path)), report
        assert error.line is not None, report
    spent = _cpu() - start
    assert spent < CPU_SECONDS, f"{spent:.2f} s of CPU on {data!r}"


def test_the_tokenizer_keeps_the_examples() -> None:
    for text, toks in zip(EXAMPLES, TOKENIZED, strict=True):
        assert "".join(t for _, t in toks) == text
    assert {"experiment", "sweep", "width", "relu", "train_loss", "mean_field"} <= set(VOCABULARY["name"])
    assert {"{", "}", "..", "**", "~"} <= set(VOCABULARY["punct"])


_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@_SETTINGS
@given(token_mutated())
def test_token_mutations(text: str) -> None:
    parses_or_points(text)


@settings(_SETTINGS, max_examples=100)
@given(data=st.binary(max_size=400))
def test_random_bytes_as_a_spec_file(data: bytes, tmp_path: Path) -> None:
    loads_or_points(data, tmp_path / "f.mf")


@settings(_SETTINGS, max_examples=10_000)
@given(
    case=st.one_of(
        token_mutated().map(lambda t: ("text", t)),
        char_mutated().map(lambda t: ("text", t)),
        st.lists(st.sampled_from(PIECES + EVERYTHING) | st.characters(codec="utf-8"), max_size=80)
        .map("".join)
        .map(lambda t: ("text", t)),
        st.binary(max_size=400).map(lambda b: ("bytes", b)),
    )
)
@pytest.mark.slow
def test_fuzz_10000(case: tuple[str, Any], tmp_path: Path) -> None:
    kind, value = case
    if kind == "text":
        parses_or_points(value)
    else:
        loads_or_points(value, tmp_path / "f.mf")
