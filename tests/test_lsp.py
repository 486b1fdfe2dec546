"""The language server: a session over stdio as an editor holds it (initialize, open a
spec with two errors, read both diagnostics and their ranges, fix one as you type,
complete a key, hover), and the completion and hover functions on their own."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfdsl
from mfdsl import lsp as _lsp
from mfdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Two independent errors, a misspelt key on line 2 and a bad value on line 3; line
# numbers and columns matter.
TWO_ERRORS = """\
experiment demo
data isotropic_gaussian { dim = 3, dleta = 0.5 }
train { optimizer = sgd(lr = 0.1), steps = 0 }
sweep { width = [4] }
backends torch
"""


class _Client:
    """A minimal LSP client: JSON-RPC messages framed by Content-Length over pipes."""

    def __init__(self, log: Path) -> None:
        # the server's stderr goes to a file: a pipe nobody reads could fill and stall it
        self.log = log
        self.stderr = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mfdsl", "lsp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=ROOT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            assert length is not None
            self.messages.put(json.loads(stream.read(length)))

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode("utf-8")
        assert self.process.stdin is not None
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.process.stdin.flush()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send({"method": method, "params": params})

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        self.send({"id": self.next_id, "method": method, "params": params})
        reply = self.wait(lambda m: m.get("id") == self.next_id and "method" not in m)
        assert "error" not in reply, reply
        return reply["result"]

    def wait(self, matches: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                stderr = self.log.read_text(errors="replace")[-2000:]
                raise AssertionError(f"no such message from the server; its stderr: {stderr}") from None
            if matches(message):
                return message

    def diagnostics(self, uri: str, version: int) -> list[dict[str, Any]]:
        message = self.wait(
            lambda m: (
                m.get("method") == "textDocument/publishDiagnostics"
                and m["params"]["uri"] == uri
                and m["params"].get("version") == version
            )
        )
        return list(message["params"]["diagnostics"])


def test_lsp_session(tmp_path: Path) -> None:
    pytest.importorskip("pygls")
    uri = (tmp_path / "demo.mf").as_uri()
    client = _Client(tmp_path / "server.log")
    try:
        init = client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
        capabilities = init["capabilities"]
        assert capabilities["hoverProvider"]
        assert "completionProvider" in capabilities
        client.notify("initialized", {})

        document = {"uri": uri, "languageId": "mfdsl", "version": 1, "text": TWO_ERRORS}
        client.notify("textDocument/didOpen", {"textDocument": document})
        found = client.diagnostics(uri, 1)
        assert [d["severity"] for d in found] == [1, 1]  # both errors, in source order
        dleta, steps = found
        assert dleta["message"].startswith("unknown key 'dleta' in data isotropic_gaussian")
        assert "did you mean 'delta'?" in dleta["message"]
        assert dleta["range"] == {"start": {"line": 1, "character": 35}, "end": {"line": 1, "character": 40}}
        assert steps["message"].startswith("'steps' must be a positive integer, got 0")
        assert steps["range"] == {"start": {"line": 2, "character": 43}, "end": {"line": 2, "character": 44}}

        # as you type: fixing one error leaves the other
        fixed = TWO_ERRORS.replace("dleta", "delta")
        client.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": fixed}]},
        )
        (left,) = client.diagnostics(uri, 2)
        assert left["message"] == steps["message"]

        # complete a key of the train block, after 'steps = 0, '
        line = fixed.split("\n")[2]
        at = {"line": 2, "character": line.index("steps")}
        items = client.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": at})
        labels = {item["label"] for item in items["items"]}
        assert {"optimizer", "loss", "batch", "steps", "epochs", "schedule"} <= labels
        assert "delta" not in labels  # a key of the data block, not of train

        # hover over 'lr': its type and the help its option declares
        at = {"line": 2, "character": line.index("lr") + 1}
        shown = client.request("textDocument/hover", {"textDocument": {"uri": uri}, "position": at})
        text = shown["contents"]["value"]
        assert "a positive number" in text
        assert next(o.help for o in mfdsl.SGD.options() if o.name == "lr") in text

        client.request("shutdown", {})
        client.notify("exit", {})
        assert client.process.wait(timeout=10) == 0
    finally:
        if client.process.poll() is None:
            client.process.kill()
        client.process.wait()
        client.stderr.close()


def test_lsp_without_pygls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pygls", None)  # import pygls raises ImportError
    assert main(["lsp"]) == 2
    assert "pip install 'mfdsl[lsp]'" in capsys.readouterr().err


def _at_end(text: str) -> list[str]:
    lines = text.split("\n")
    return [c.label for c in _lsp.completions(text, len(lines) - 1, len(lines[-1]))]


def test_statement_completion() -> None:
    from mfdsl.core.plugins import available_backends
    from mfdsl.language import ir as ir
    from mfdsl.language.syntax import KEYWORDS

    # a statement: the keywords, then the installed backends' option blocks
    assert _at_end("") == [*KEYWORDS, *sorted(available_backends())]
    assert _at_end("experiment demo\nda") == [*KEYWORDS, *sorted(available_backends())]
    assert _at_end("data ") == list(ir.DATA_KINDS)
    assert _at_end("backends torch, ") == sorted(available_backends())
    assert _at_end("experiment ") == []  # a name of the user's own


def test_completion_follows_the_declarations() -> None:
    from mfdsl.core.plugins import available_backends
    from mfdsl.language import ir as ir

    assert _at_end("data teacher { dim = 3, ") == [o.name for o in ir.Teacher.options()]
    assert _at_end("network mlp {\n  activation = ") == list(ir.ACTIVATIONS)
    assert _at_end("network mlp { activation = re") == list(ir.ACTIVATIONS)  # the editor filters
    assert _at_end("record every 10 { train_loss, ") == list(ir.OBSERVABLES)
    assert _at_end("record every 10 { particles(") == ["layer", "sample"]
    assert _at_end("train {\n  optimizer = ") == list(ir.OPTIMIZERS)
    assert _at_end("train { optimizer = sgd(lr = 0.1, ") == [o.name for o in ir.SGD.options()]
    assert _at_end("train { schedule = ") == list(ir.SCHEDULES)
    assert _at_end("init {\n  layer 1 ~ ") == list(ir.DISTRIBUTIONS)
    assert _at_end("scaling ") == list(ir.SCALINGS)
    assert _at_end("train { loss = mse }\nsweep { width = [4] }\n")[:1] == ["experiment"]
    for name, backend in available_backends().items():
        assert _at_end(f"{name} {{ ") == [o.name for o in backend.options]
    # a comment or a string does not open a block
    assert _at_end("train { # {\n  loss = mse\n  ") == [o.name for o in ir.Train.options()]


def test_hover() -> None:
    text = "network mlp { activation = tanh }\ndata teacher { dim = 3 }\n"
    activation = _lsp.hover(text, 0, text.index("activation") + 2)
    assert activation is not None and "activation φ" in activation and "default `relu`" in activation
    tanh = _lsp.hover(text, 0, text.index("tanh"))
    assert tanh is not None and "'piecewise_linear'" in tanh
    teacher = _lsp.hover(text, 1, 7)
    assert teacher is not None and "random mean-field mlp" in teacher
    assert _lsp.hover(text, 0, text.index("{")) is None


def test_diagnostic_ranges_count_utf16() -> None:
    # '𝜑' (outside the BMP) is two UTF-16 units: the caret after it moves by two
    text = "experiment demo  # 𝜑\ndata isotropic_gaussian { dim = 3 }\ntrain { optimizer = sgd(lr = 0.1), steps = 1 }\n"
    (missing,) = _lsp.diagnostics(text, "x.mf")
    assert missing.message.startswith("the spec has no 'sweep' block")
    assert (missing.start, missing.end) == ((0, 0), (0, 1))
    text = "experiment d  # 𝜑 x\n"
    assert _lsp._position(text.split("\n"), 1, 19) == (0, 19)  # 18 characters, 19 units


SPECS = sorted((ROOT / "specs").glob("*.mf"))
PIECES = [
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "=",
    ",",
    "~",
    "..",
    '"',
    "#",
    "\n",
    "layer",
    "sgd(",
    "data ",
    "é",
    "𝜑",
]


@st.composite
def edited_specs(draw: st.DrawFn) -> str:
    """A spec of specs/ with a few cuts, insertions and repeats, as while typing."""
    text = draw(st.sampled_from(SPECS)).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 30)))
        action = draw(st.sampled_from(["cut", "insert", "repeat"]))
        if action == "cut":
            text = text[:i] + text[j:]
        elif action == "insert":
            text = text[:i] + draw(st.sampled_from(PIECES) | st.text(max_size=4)) + text[i:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=edited_specs(), data=st.data())
def test_any_text_any_position(text: str, data: st.DataObject) -> None:
    """Whatever is being typed, the server answers: diagnostics within the text,
    completions and hover at every kind of position, never an exception."""
    lines = text.split("\n")
    for d in _lsp.diagnostics(text, "edited.mf"):
        assert d.severity in ("error", "warning") and d.message
        assert 0 <= d.start[0] <= d.end[0] < len(lines)
    for _ in range(10):
        line = data.draw(st.integers(0, len(lines) - 1))
        character = data.draw(st.integers(0, len(lines[line]) + 2))
        for item in _lsp.completions(text, line, character):
            assert item.label
        shown = _lsp.hover(text, line, character)
        assert shown is None or shown.strip()
