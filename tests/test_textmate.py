"""The syntax-highlighting grammars: generated from the Lark grammar and the IR's tables,
the committed files equal to what the generator writes, and the TextMate rules giving
each part of a spec the scope it should have."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mfdsl.language import ir as ir
from mfdsl.language.textmate import builtin_names, keywords, render_textmate, render_vim, textmate

GRAMMARS = Path(__file__).resolve().parents[1] / "grammars"


def test_committed_files_are_generated() -> None:
    # after a change to the grammar or the tables: python -m mfdsl.language.textmate >
    # grammars/mfdsl.tmLanguage.json; python -m mfdsl.language.textmate --vim > grammars/mfdsl.vim
    assert (GRAMMARS / "mfdsl.tmLanguage.json").read_text(encoding="utf-8") == render_textmate()
    assert (GRAMMARS / "mfdsl.vim").read_text(encoding="utf-8") == render_vim()


def test_keywords_are_the_lark_grammars() -> None:
    lark = (GRAMMARS / "mfdsl.lark").read_text(encoding="utf-8")
    declared = re.findall(r'^[A-Z_]+: "([a-z_]+)"$', lark, flags=re.MULTILINE)
    assert keywords() == declared
    assert {"experiment", "sweep", "layer", "every", "log"} <= set(keywords())
    assert set(ir.ACTIVATIONS) | set(ir.OBSERVABLES) | set(ir.SCALINGS) <= set(builtin_names())
    grammar = json.loads(render_textmate())
    assert grammar["scopeName"] == "source.mfdsl" and grammar["fileTypes"] == ["mf"]


def _scopes(line: str) -> dict[str, str]:
    """Each highlighted piece of ``line`` and its scope, the TextMate way: at each point
    the earliest match of the top-level rules, the first rule on a tie."""
    grammar = textmate()
    rules = []
    for include in grammar["patterns"]:
        rule = grammar["repository"][include["include"].lstrip("#")]
        if "begin" in rule:  # a string: begin, escapes, end
            pattern = re.escape(rule["begin"]) + r'(?:\\.|[^"\\])*?(?:' + rule["end"] + ")"
            rules.append((re.compile(pattern), rule["name"], None))
        elif "captures" in rule:
            rules.append((re.compile(rule["match"]), rule["captures"]["1"]["name"], 1))
        else:
            rules.append((re.compile(rule["match"]), rule["name"], None))
    found: dict[str, str] = {}
    at = 0
    while at < len(line):
        best = None
        for pattern, scope, group in rules:
            match = pattern.search(line, at)
            if match and match.end() > match.start() and (best is None or match.start() < best[0].start()):
                best = (match, scope, group)
        if best is None:
            break
        match, scope, group = best
        found[match.group(group or 0)] = scope.removesuffix(".mfdsl")
        at = match.end()
    return found


def test_textmate_scopes() -> None:
    assert _scopes('data teacher { train = 100, root = "a # b" }  # a comment') == {
        "data": "keyword.control",
        "teacher": "support.constant",
        "train": "variable.other.property",
        "100": "constant.numeric",
        "root": "variable.other.property",
        '"a # b"': "string.quoted.double",
        "=": "keyword.operator",
        "# a comment": "comment.line.number-sign",
    }
    assert _scopes("  optimizer = sgd(lr = 1e-3 * log(width))") == {
        "optimizer": "variable.other.property",
        "sgd": "entity.name.function",
        "lr": "variable.other.property",
        "1e-3": "constant.numeric",
        "*": "keyword.operator",
        "log": "entity.name.function",
        "=": "keyword.operator",
    }
    assert _scopes("record log 20 { train_loss }") == {
        "record": "keyword.control",
        "log": "keyword.control",
        "20": "constant.numeric",
        "train_loss": "support.constant",
    }
    assert _scopes("  layer 1..2 ~ normal(0, 0.5)")["~"] == "keyword.operator"


def test_editor_setup_in_the_docs_fits() -> None:
    """docs/editors.md's VS Code files are valid JSON naming the grammar's scope, and
    every editor starts a command that exists."""
    from mfdsl.cli import build_parser

    doc = (GRAMMARS.parent / "docs" / "editors.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", doc, flags=re.DOTALL)
    package, configuration = (json.loads(b) for b in blocks)
    (grammar,) = package["contributes"]["grammars"]
    assert grammar["scopeName"] == textmate()["scopeName"]
    assert grammar["path"] == "./mfdsl.tmLanguage.json"
    assert package["contributes"]["languages"][0]["extensions"] == [f".{t}" for t in textmate()["fileTypes"]]
    assert configuration["comments"]["lineComment"] == "#"
    assert build_parser().parse_args(["lsp"]).command == "lsp"
    for start in ('{ command: "mfdsl", args: ["lsp"] }', 'cmd = { "mfdsl", "lsp" }', 'args = ["lsp"]'):
        assert start in doc
