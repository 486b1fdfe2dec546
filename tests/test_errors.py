"""Error reports: every invalid spec gets ``path:line:col: message``, the source line with
a caret under the right column, words instead of grammar terminal names, and a hint where
one helps; and no input at all, however broken, ends in a Python traceback."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfdsl

SPECS = Path(__file__).resolve().parents[1] / "specs"

# A small valid spec; every case below changes one thing in it.  Line numbers matter.
BASE = """\
experiment demo
data isotropic_gaussian { dim = 20, delta = 0.5, train = online, test = 2000 }
network mlp { hidden = 1, activation = relu }  # mfdsl: allow homogeneous
scaling mean_field
init {
  layer 1 ~ normal(0, 1 / sqrt(dim))
  layer 2 ~ normal(0, 1)
}
train {
  optimizer = sgd(lr = 0.05)
  loss = mse
  batch = 8
  steps = 2000
}
record every 50 { train_loss, test_loss, test_accuracy }
sweep {
  width = [64, 256]
  seed = 0..1
}
backends torch
torch { device = cpu }
"""

# The base spec on three classes of MNIST (line 2 changes; the files are not read).
IMAGES = BASE.replace(
    "data isotropic_gaussian { dim = 20, delta = 0.5, train = online, test = 2000 }",
    "data mnist { classes = [0, 1, 2], train = 100, test = 50 }",
)

# (The base network is bias-free ReLU on norm-separated classes: the comment silences
# mfdsl check's science warning about it, which tests/test_diagnose.py covers.)

# Lark's names for terminals must never reach a user.
TERMINALS = re.compile(
    r"\b(LBRACE|RBRACE|NAME|INT|FLOAT|STRING|EQUAL|COMMA|__ANON\w*|\$END|LSQB|RSQB|LPAR|RPAR)\b"
)


def with_(old: str, new: str, text: str | None = None) -> str:
    """``text`` (the base spec by default) with the one occurrence of ``old`` replaced
    by ``new``."""
    text = BASE if text is None else text
    assert text.count(old) == 1, f"{old!r} is not unique in the base spec"
    return text.replace(old, new)


def sweeping(extra: str, text: str) -> str:
    """``text`` with another sweep variable (``extra`` is ``name = values``)."""
    return with_("  seed = 0..1\n", f"  seed = 0..1\n  {extra}\n", text)


def check(text: str, overrides: tuple[str, ...] = ()) -> mfdsl.Spec:
    """Parse, build and expand every sweep point (as ``mfdsl check`` does)."""
    spec = mfdsl.parse(text, "t.mf", overrides=list(overrides))
    mfdsl.check_all(spec)
    return spec


def test_base_spec_is_valid() -> None:
    assert mfdsl.size(check(BASE)) == 4


def case(id: str, text: str, line: int, column: int, *words: str) -> object:
    return pytest.param(text, line, column, words, id=id)


PARSE_ERRORS = [
    case(
        "colon-for-equals", with_("steps = 2000", "steps: 2000"), 13, 8, "unexpected character ':'", "use '='"
    ),
    case("missing-equals", with_("steps = 2000", "steps 2000"), 13, 9, "expected '='", "use '='"),
    case("missing-value", with_("steps = 2000", "steps ="), 14, 1, "expected a value", "value is missing"),
    case("unclosed-block", with_("  seed = 0..1\n}", "  seed = 0..1"), 19, 10, "'}' missing"),
    case(
        "list-without-comma",
        with_("[64, 256]", "[64 256]"),
        17,
        15,
        "expected ',' or ']'",
        "separated by commas",
    ),
    case("unclosed-list", with_("[64, 256]", "[64, 256"), 18, 3, "'[' is never closed"),
    case("unclosed-call", with_("sgd(lr = 0.05)", "sgd(lr = 0.05"), 11, 3, "'(' is never closed"),
    case(
        "init-rule-with-equals",
        with_("layer 2 ~", "layer 2 ="),
        7,
        11,
        "expected '~'",
        "layer N ~ distribution",
    ),
    case("init-rule-without-layer", with_("layer 2 ~", "2 ~"), 7, 3, "starts with 'layer'"),
    case("record-without-mode", with_("record every 50", "record 50"), 15, 8, "'every' or 'log'"),
    case(
        "backends-without-comma", with_("backends torch", "backends torch jax"), 21, 1, "separated by commas"
    ),
    case(
        "misspelt-keyword",
        with_("experiment demo", "experimnt demo"),
        1,
        1,
        "unknown statement",
        "'experiment'",
    ),
    case("misspelt-block-keyword", with_("network mlp {", "netwrk mlp {"), 3, 1, "did you mean 'network'"),
    case("single-quotes", with_("lr = 0.05", "lr = '0.05'"), 10, 24, "unexpected character", "double quotes"),
    case(
        "leading-point",
        with_("lr = 0.05", "lr = .05"),
        10,
        24,
        "unexpected character '.'",
        "digit on both sides",
    ),
    case("stray-character", with_("lr = 0.05", "lr = 0.05 @"), 10, 29, "'@'", "expected ',' or ')'"),
    case(
        "extra-brace", with_("steps = 2000\n}", "steps = 2000\n}\n}"), 15, 1, "unexpected '}'", "one too many"
    ),
    case(
        "statement-inside-block",
        with_("batch = 8", "batch = 8 record every 5 { train_loss }"),
        12,
        20,
        "top level",
    ),
    case("open-range", with_("seed = 0..1", "seed = 0.."), 19, 1, "expected a value", "range of integers"),
    case(
        "end-of-file-in-block", with_("cpu }\n", "cpu\n\n"), 21, 21, "end of file", "missing its closing '}'"
    ),
    case("unicode-name", with_("experiment demo", "experiment dëmo"), 1, 13, "'ë'", "ASCII"),
    case(
        "unclosed-string",
        with_("device = cpu", 'device = "cpu'),
        21,
        18,
        "unexpected character '\"'",
        "never closed",
    ),
    case("argument-twice", with_("sgd(lr = 0.05)", "sgd(lr = 0.05, lr = 0.1)"), 10, 30, "'lr' given twice"),
    case("number-overflows", with_("lr = 0.05", "lr = 1e999"), 10, 24, "number too large"),
    case(
        "deep-nesting",
        with_("lr = 0.05", "lr = " + "[" * 200 + "1" + "]" * 200),
        10,
        123,
        "nested more than 100",
    ),
]

VALIDATION_ERRORS = [
    # out of range, wrong type or arity
    case("negative-lr", with_("lr = 0.05", "lr = -0.05"), 10, 24, "'lr' must be a positive number", "-0.05"),
    case("zero-width", with_("[64, 256]", "[64, 0]"), 17, 16, "'width' must be a positive integer", "got 0"),
    case("zero-hidden", with_("hidden = 1", "hidden = 0"), 3, 24, "'hidden' must be an integer from 1 to 64"),
    case(
        "float-for-int",
        with_("batch = 8", "batch = 8.5"),
        12,
        11,
        "'batch' must be a positive integer",
        "8.5",
    ),
    case(
        "number-for-choice",
        with_("activation = relu", "activation = 3"),
        3,
        40,
        "'activation' must be one of",
    ),
    case("list-for-number", with_("lr = 0.05", "lr = [0.05]"), 10, 24, "must be a positive number", "a list"),
    case("missing-argument", with_("normal(0, 1)", "normal(0)"), 7, 13, "normal needs 'std'"),
    case("too-many-arguments", with_("normal(0, 1)", "normal(0, 1, 2)"), 7, 26, "at most 2 argument"),
    case("huge-power", with_("steps = 2000", "steps = 10**10**10"), 13, 11, "number too large"),
    case("duplicate-width", with_("[64, 256]", "[64, 256, 64]"), 17, 21, "'width' lists 64 twice"),
    # layers
    case(
        "layer-beyond-depth", with_("layer 2 ~", "layer 3 ~"), 7, 9, "layer 3 is not a weight layer", "1..2"
    ),
    case("layer-initialised-twice", with_("layer 2 ~", "layer 1 ~"), 7, 9, "initialised twice", "line 6"),
    case("layer-not-initialised", with_("  layer 2 ~ normal(0, 1)\n", ""), 5, 1, "no init rule for layer 2"),
    case("range-to-last", with_("layer 2 ~", "layer 2..last ~"), 7, 12, "'last'", "cannot bound a range"),
    case(
        "freeze-layer-zero",
        with_("steps = 2000", "steps = 2000, freeze = [0]"),
        13,
        26,
        "'freeze'",
        "numbered from 1",
    ),
    # duplicates
    case(
        "duplicate-key",
        with_("batch = 8", "batch = 8\n  batch = 16"),
        13,
        3,
        "duplicate key 'batch'",
        "line 12",
    ),
    case("duplicate-block", with_("sweep {", "train { steps = 1 }\nsweep {"), 16, 1, "duplicate 'train'"),
    case("duplicate-sweep-variable", sweeping("seed = [3]", BASE), 19, 3, "duplicate sweep variable 'seed'"),
    case(
        "observable-twice", with_("test_accuracy }", "train_loss }"), 15, 42, "'train_loss' is recorded twice"
    ),
    # names
    case("unknown-key", with_("lr = 0.05", "lrr = 0.05"), 10, 25, "unknown key 'lrr'", "did you mean 'lr'"),
    case(
        "undefined-variable", with_("normal(0, 1)", "normal(0, tau3)"), 7, 23, "unknown name 'tau3'", "sweep"
    ),
    case("unknown-function", with_("sqrt(dim)", "sqr(dim)"), 6, 27, "'sqr(...)'", "did you mean 'sqrt'"),
    case(
        "unknown-optimizer",
        with_("sgd(lr", "rmsprop(lr"),
        10,
        15,
        "unknown optimizer 'rmsprop'",
        "'sgd', 'langevin' or 'adam'",
    ),
    case(
        "misspelt-loss",
        with_("loss = mse", "loss = msee"),
        11,
        10,
        "unknown loss 'msee'",
        "did you mean 'mse'",
    ),
    case(
        "misspelt-scaling",
        with_("scaling mean_field", "scaling meanfield"),
        4,
        9,
        "did you mean 'mean_field'",
    ),
    case(
        "unknown-network",
        with_("network mlp", "network resnet"),
        3,
        9,
        "unknown network 'resnet'",
        "'mlp' or 'cnn'",
    ),
    case("no-sweep", with_("sweep {\n  width = [64, 256]\n  seed = 0..1\n}\n", ""), 1, 1, "no 'sweep' block"),
    case("sweeping-dim", sweeping("dim = [1, 2]", BASE), 19, 3, "'dim'", "cannot be swept"),
    case(
        "sweep-value-of-another-variable",
        sweeping("lr = [0.1 * width, 1 / width]", BASE),
        19,
        15,
        "'width' is a sweep variable",
        "cannot depend on another's",
        "lr = 0.1 * width",
    ),
    case(
        "sweep-values-that-name-a-variable",
        with_("seed = 0..1", "seed = [width, width + 1]"),
        18,
        11,
        "'width' is a sweep variable",
    ),
    case(
        "sweep-value-a-name-in-an-expression",
        sweeping("lr = [0.1 * base]", BASE),
        19,
        15,
        "sweep values must be constants",
        "'base' is a name inside an expression",
    ),
    # training length
    case(
        "steps-and-epochs",
        with_("steps = 2000", "steps = 2000\n  epochs = 3"),
        14,
        12,
        "either 'steps' or 'epochs'",
    ),
    case(
        "epochs-on-online-data", with_("steps = 2000", "epochs = 3"), 13, 12, "finite training set", "'steps'"
    ),
    # data
    case(
        "unknown-data-kind",
        with_("isotropic_gaussian", "isotropic_gausian"),
        2,
        6,
        "unknown data kind",
        "did you mean",
    ),
    case(
        "unknown-data-key",
        with_("delta = 0.5", "delt = 0.5"),
        2,
        37,
        "unknown key 'delt'",
        "did you mean 'delta'",
    ),
    case(
        "data-kind-as-block",
        with_("backends torch", "mnist { train = 100 }\nbackends torch"),
        20,
        1,
        "data mnist {",
    ),
    # observables
    case("unknown-observable", with_("test_loss,", "test_los,"), 15, 31, "unknown observable", "'test_loss'"),
    case(
        "observable-unknown-argument",
        with_("test_loss,", "output(probe = 3),"),
        15,
        46,
        "'probe'",
        "'probes'",
    ),
    case("observable-takes-no-argument", with_("test_loss,", "test_loss(3),"), 15, 31, "takes no arguments"),
    case(
        "observable-argument-range", with_("test_loss,", "output(0),"), 15, 38, "'probes' must be an integer"
    ),
    # backends
    case(
        "device-gpu",
        with_("device = cpu", "device = gpu"),
        21,
        18,
        "unknown device 'gpu'",
        "did you mean 'cuda'",
    ),
    case(
        "misspelt-backend-option",
        with_("device = cpu", "devise = cpu"),
        21,
        9,
        "unknown key 'devise'",
        "'device'",
    ),
    case("unknown-backend", with_("backends torch", "backends torhc"), 20, 10, "unknown backend", "'torch'"),
    # only wrong at one sweep point: the report points at the expression and names the point
    case(
        "sweep-point-lr",
        sweeping("base = [0.1, -1]", with_("lr = 0.05", "lr = base")),
        10,
        24,
        "'lr' must be a positive number, got -1",
        "base = -1",
    ),
    case(
        "sweep-point-every",
        sweeping("n = [10, 0.5]", with_("every 50", "every n")),
        15,
        14,
        "'every' must be a positive integer",
        "n = 0.5",
    ),
    case(
        "sweep-point-depth",
        with_("hidden = 1", "hidden = width / 32"),
        5,
        1,
        "no init rule for layer 3",
        "width = 64",
    ),
    case(
        "sweep-point-division",
        with_("lr = 0.05", "lr = 1 / (width - 64)"),
        10,
        24,
        "division by zero",
        "width = 64",
    ),
    # across blocks: the loss, the outputs and the probes fit the data
    case(
        "cross-entropy-on-binary-data",
        with_("loss = mse", "loss = cross_entropy"),
        11,
        10,
        "cross_entropy needs three or more classes",
        "isotropic_gaussian is a binary task",
        "logistic",
    ),
    case(
        "cross-entropy-on-two-classes",
        with_("loss = mse", "loss = cross_entropy", IMAGES.replace("[0, 1, 2]", "[3, 5]")),
        11,
        10,
        "classes = [3, 5] makes a binary task",
        "three or more classes",
    ),
    case(
        "duplicate-class",
        IMAGES.replace("[0, 1, 2]", "[0, 1, 1]"),
        2,
        31,
        "'classes' lists 1 twice",
        "column 28",
    ),
    case(
        "outputs-on-binary-data",
        with_("activation = relu", "activation = relu, outputs = 3"),
        3,
        56,
        "one output, not 3",
        "outputs = 1",
    ),
    case(
        "outputs-on-multiclass-data",
        with_("activation = relu", "activation = relu, outputs = 2", IMAGES),
        3,
        56,
        "3 classes, so the network needs 3 outputs",
        "outputs = 3",
    ),
    case(
        "probes-beyond-test-set",
        with_("test_loss,", "output(probes = 5000),"),
        15,
        47,
        "asks for 5000 probe inputs, but the test set has only 2000",
    ),
    case(
        "observable-positional-order",
        with_("test_loss,", "neuron_spread(1, 3000),"),
        15,
        48,
        "neuron_spread asks for 3000 probe inputs",
    ),
    case(
        "sweep-point-probes",
        sweeping("n = [3000, 10]", with_("test = 2000", "test = n", with_("test_loss,", "output(100),"))),
        15,
        38,
        "only 10 points",
        "n = 10",
    ),
    # layout: tabs and CRLF line endings keep columns right
    case(
        "tabs",
        with_("  batch = 8\n  steps = 2000", "\tbatch\t=\t8\n\tsteps\t=\t0"),
        13,
        10,
        "'steps'",
        "got 0",
    ),
    case("crlf", with_("lr = 0.05", "lrr = 0.05").replace("\n", "\r\n"), 10, 25, "unknown key 'lrr'"),
]


def assert_report(error: mfdsl.SpecError, path: str, source: str, line: int, column: int) -> None:
    """``path:line:col: message``, then the line and a caret under ``column``."""
    report = str(error)
    first, *rest = report.split("\n")
    assert first == f"{path}:{line}:{column}: {error.message}"
    shown, caret = rest[0], rest[1]
    gutter = shown.index(" | ") + 3
    assert shown[: gutter - 3].strip() == str(line)
    assert caret[:gutter].strip() == "|"
    at = caret.index("^")
    written = source.split("\n")[line - 1].removesuffix("\r").replace("\t", " ")
    if len(written) <= 100:
        assert shown[gutter:] == written
        assert at == gutter + column - 1
    if column <= len(written):
        assert shown[at] == written[column - 1]
    if error.hint:
        assert rest[2] == f"hint: {error.hint}"


def assert_in_words(error: mfdsl.SpecError, words: tuple[str, ...]) -> None:
    text = f"{error.message}\nhint: {error.hint}"
    for word in words:
        assert word in text, f"{word!r} not in:\n{error}"
    # ``sweep.NAME`` is the placeholder in the list of overridable paths, not a terminal
    assert not TERMINALS.search(text.replace("sweep.NAME", "")), f"grammar terminal name in:\n{error}"


@pytest.mark.parametrize(("text", "line", "column", "words"), PARSE_ERRORS + VALIDATION_ERRORS)
def test_error_report(text: str, line: int, column: int, words: tuple[str, ...]) -> None:
    with pytest.raises(mfdsl.SpecError) as info:
        check(text)
    error = info.value
    assert (error.line, error.column) == (line, column), str(error)
    assert_in_words(error, words)
    assert_report(error, "t.mf", text, line, column)


OVERRIDE_ERRORS = [
    pytest.param("train.steps=-5", 13, ("'steps' must be a positive integer",), id="out-of-range"),
    pytest.param("train.stepz=5", 7, ("unknown key 'stepz'", "did you mean 'steps'"), id="unknown-key"),
    pytest.param("trian.steps=5", 1, ("unknown block 'trian'", "did you mean 'train'"), id="unknown-block"),
    pytest.param(
        "torch.device=gpu", 14, ("unknown device 'gpu'", "did you mean 'cuda'"), id="backend-option"
    ),
    pytest.param("sweep.width=[64, 0]", 18, ("'width' must be a positive integer",), id="zero-width"),
    pytest.param("record.every=0", 14, ("'every' must be a positive integer",), id="record-every"),
    pytest.param("train.steps", 1, ("PATH=VALUE",), id="no-equals"),
    pytest.param("record.foo=1", 1, ("cannot override 'record.foo'",), id="not-overridable"),
    pytest.param("data.dim=d", 10, ("unknown name 'd'",), id="undefined-name"),
    pytest.param("backends=[torch, torhc]", 18, ("unknown backend 'torhc'", "'torch'"), id="unknown-backend"),
    pytest.param(
        "network.hidden=width - 64", 16, ("'hidden'", "at sweep point width = 64"), id="sweep-point"
    ),
    # a value that does not parse is shown in the argument, not on its own
    pytest.param("train.steps=1x0", 14, ("unexpected 'x0'", "expected the end of the value"), id="bad-value"),
    pytest.param("train.steps=[1 2]", 16, ("expected ',' or ']'", "separated by commas"), id="bad-list"),
    pytest.param("train.optimizer=sgd(lr = 1", 27, ("'(' is never closed",), id="unclosed-call"),
    # a bare key: say which block has it
    pytest.param("steps=5", 1, ("no top-level 'steps'", "did you mean 'train.steps'"), id="bare-key"),
    pytest.param(
        "stpes=5", 1, ("no top-level 'stpes'", "did you mean 'train.steps'"), id="bare-misspelt-key"
    ),
    pytest.param(
        "lr=0.1",
        1,
        ("no top-level 'lr'", "argument of train.optimizer", "--set 'train.optimizer=sgd(lr = 0.1)'"),
        id="bare-argument",
    ),
    pytest.param("train=5", 1, ("say which key of 'train'",), id="bare-block"),
]


@pytest.mark.parametrize(("override", "column", "words"), OVERRIDE_ERRORS)
def test_override_error_report(override: str, column: int, words: tuple[str, ...]) -> None:
    with pytest.raises(mfdsl.SpecError) as info:
        check(BASE, (override,))
    error = info.value
    assert (error.path, error.line, error.column) == ("--set", 1, column), str(error)
    assert_in_words(error, words)
    assert_report(error, "--set", override, 1, column)


@pytest.mark.parametrize(
    ("override", "column", "words"),
    [
        ("train.steps=[1,", 16, ("unexpected end of the value", "expected ']' or a value")),
        ("train.steps=", 13, ("unexpected end of the value", "expected a value")),
        ("train.steps=1 2", 15, ("unexpected '2'",)),
    ],
)
def test_override_parse_error_points_into_the_argument(
    override: str, column: int, words: tuple[str, ...]
) -> None:
    with pytest.raises(mfdsl.SpecError) as info:
        check(BASE, (override,))
    error = info.value
    assert (error.path, error.line, error.column) == ("--set", 1, column)
    assert_in_words(error, words)
    assert_report(error, "--set", override, 1, column)


@pytest.mark.parametrize(
    ("value", "column", "words"),
    [
        ("/data/mnist", 11, ("unexpected '/'", """--set 'data.root="/data/mnist"'""")),
        ("~/data/my mnist", 11, ("unexpected '~'", """--set 'data.root="~/data/my mnist"'""")),
        ("mnist", 11, ("got the name 'mnist'", """--set 'data.root="mnist"'""")),
    ],
)
def test_unquoted_string_override_says_how_to_quote(value: str, column: int, words: tuple[str, ...]) -> None:
    override = f"data.root={value}"
    with pytest.raises(mfdsl.SpecError) as info:
        check(IMAGES, (override,))
    error = info.value
    assert (error.path, error.line, error.column) == ("--set", 1, column), str(error)
    assert_in_words(error, words)
    assert_report(error, "--set", override, 1, column)
    # ... and what the hint says works
    fixed = re.search(r"--set '(.*)'", str(error.hint)).group(1)  # type: ignore[union-attr]
    assert mfdsl.parse(IMAGES, overrides=[fixed]).data.root == value


# ---- YAML specs: errors point into the YAML file -------------------------------------

YAML = """\
experiment: demo
data: {kind: isotropic_gaussian, dim: 20, test: 2000}
network: {hidden: 1, activation: relu}
init:
- {layer: 1, dist: "normal(0, 1 / sqrt(dim))"}
- layer: 2
  dist: normal(0, 1)
train:
  optimizer: sgd(lr = 0.05)
  batch: 8
  steps: 2000
record:
  every: 50
  observables: [train_loss, test_loss]
sweep:
  width: [64, 256]
  seed: 0..1
"""


def yaml_with(old: str, new: str) -> str:
    assert YAML.count(old) == 1, old
    return YAML.replace(old, new)


YAML_ERRORS = [
    case(
        "comma-in-flow-mapping",
        yaml_with('"normal(0, 1 / sqrt(dim))"', "normal(0, 1 / sqrt(dim))"),
        5,
        30,
        "a comma ends a YAML value",
        "quote",
    ),
    case(
        "unclosed-flow-list",
        yaml_with("width: [64, 256]", "width: [64, 256"),
        17,
        7,
        "invalid YAML",
        "starts at line 16",
    ),
    case("tab-indent", yaml_with("  batch: 8", "\tbatch: 8"), 10, 1, "invalid YAML", "spaces, not tabs"),
    case(
        "duplicate-key",
        yaml_with("  batch: 8", "  batch: 8\n  batch: 16"),
        11,
        3,
        "duplicate key 'batch'",
        "line 10",
    ),
    case("out-of-range", yaml_with("batch: 8", "batch: -8"), 10, 10, "'batch' must be a positive integer"),
    case("bad-value-syntax", yaml_with("steps: 2000", "steps: 2x00"), 11, 11, "unexpected 'x00'"),
    case(
        "inside-a-quoted-value",
        yaml_with("sgd(lr = 0.05)", '"sgd(lr = -0.05)"'),
        9,
        24,
        "'lr' must be a positive number",
    ),
    case(
        "unknown-top-key",
        yaml_with("experiment: demo", "experimnt: demo"),
        1,
        1,
        "unknown YAML key",
        "'experiment'",
    ),
    case("unknown-block-key", yaml_with("batch: 8", "bacth: 8"), 10, 3, "unknown key 'bacth'", "'batch'"),
    case("not-a-mapping", yaml_with("train:\n", "train: 5\nx:\n"), 8, 8, "'train' in YAML must be a mapping"),
    case(
        "misspelt-kind",
        yaml_with("{kind: isotropic_gaussian", "{knd: isotropic_gaussian"),
        2,
        8,
        "unknown key 'knd' in data",
        "did you mean 'kind'",
    ),
    case("unknown-scaling", YAML + "scaling: meanfield\n", 18, 10, "unknown scaling", "'mean_field'"),
    case(
        "init-rule",
        yaml_with("  dist: normal(0, 1)", "  law: normal(0, 1)"),
        6,
        3,
        "{layer: ..., dist: ...}",
    ),
    case("empty-value", yaml_with("batch: 8", "batch:"), 10, 9, "a value is missing"),
    case("sweep-point", yaml_with("steps: 2000", "steps: 200 - width"), 11, 10, "'steps'", "width = 256"),
]


@pytest.mark.parametrize(("text", "line", "column", "words"), YAML_ERRORS)
def test_yaml_error_report(text: str, line: int, column: int, words: tuple[str, ...], tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    path.with_name("base.yaml").write_text(YAML, encoding="utf-8")
    assert mfdsl.check_all(mfdsl.load(path.with_name("base.yaml")))  # the base is valid
    with pytest.raises(mfdsl.SpecError) as info:
        mfdsl.check_all(mfdsl.load(path))
    error = info.value
    assert (error.line, error.column) == (line, column), str(error)
    assert_in_words(error, words)
    assert_report(error, str(path), text, line, column)


# ---- warnings: allowed, but probably not meant ----------------------------------------


def test_unused_sweep_variable_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdsl.cli import main
    from mfdsl.plan.check import spec_warnings

    text = sweeping("tag = [1, 2, 3]", BASE)
    (warning,) = spec_warnings(check(text))
    assert "sweep variable 'tag' is never used: its 3 values repeat the same runs" in warning.message
    assert_report(warning, "t.mf", text, 19, 3)
    assert not spec_warnings(check(sweeping("tag = [1, 2]", with_("lr = 0.05", "lr = 0.05 * tag"))))
    path = tmp_path / "t.mf"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) == 0  # a warning does not fail the check
    assert f"{path}:19:3: warning: sweep variable 'tag' is never used" in capsys.readouterr().err


def test_particles_sampling_beyond_every_width_is_a_warning() -> None:
    from mfdsl.plan.check import spec_warnings

    text = with_("test_loss,", "particles(sample = 300),")
    (warning,) = spec_warnings(check(text))
    assert "particles samples 300 neurons, but the widest network has 256" in warning.message
    assert (warning.line, warning.column) == (15, 50)
    assert not spec_warnings(check(with_("test_loss,", "particles(sample = 100),")))


def test_observable_positional_arguments_follow_the_table() -> None:
    text = with_("test_loss,", "output(8), neuron_spread(1, 4), particles(1, 20), weight_change(last),")
    record = check(text).record
    assert record is not None
    got = {o.name: (o.layer, o.probes, o.sample) for o in record.observables}
    assert got["output"] == (None, 8, None)
    assert got["neuron_spread"] == ((1,), 4, None)
    assert got["particles"] == ((1,), None, 20)
    assert got["weight_change"] == (("last",), None, None)


def test_case_count() -> None:
    assert len(PARSE_ERRORS) + len(VALIDATION_ERRORS) + len(OVERRIDE_ERRORS) >= 40


def test_long_line_is_cut_around_the_caret() -> None:
    text = with_("lr = 0.05", "lr = 0.05" + " + 0" * 3_000 + " @")
    with pytest.raises(mfdsl.SpecError) as info:
        check(text)
    error = info.value
    assert (error.line, error.column) == (10, 24 + 4 + 4 * 3_000 + 1)
    shown = str(error).split("\n")[1]
    assert len(shown) < 120 and "…" in shown
    assert_report(error, "t.mf", text, error.line, error.column)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(mfdsl.SpecError, match="no such file"):
        mfdsl.load(tmp_path / "missing.mf")
    with pytest.raises(mfdsl.SpecError, match="directory"):
        mfdsl.load(tmp_path)
    bad = tmp_path / "latin1.mf"
    bad.write_bytes(BASE.replace("demo", "d\xe9mo").encode("latin-1"))
    with pytest.raises(mfdsl.SpecError, match="not UTF-8") as info:
        mfdsl.load(bad)
    assert (info.value.line, info.value.column) == (1, 13)
    nul = tmp_path / "nul.mf"
    nul.write_bytes(BASE.replace("demo", "de\x00mo").encode())
    with pytest.raises(mfdsl.SpecError, match="NUL") as info:
        mfdsl.load(nul)
    assert (info.value.line, info.value.column) == (1, 14)


def test_crlf_and_tabs_parse() -> None:
    assert check(BASE.replace("\n", "\r\n")) == check(BASE)
    assert check(BASE.replace("  ", "\t")) == check(BASE)


# ---- nothing ends in a traceback ------------------------------------------------------

GARBAGE = {
    "empty": "",
    "whitespace": " \n\t\r\n ",
    "comment only": "# nothing here\n",
    "semicolons": ";;;;",
    "lone brace": "}",
    "keyword only": "experiment",
    "1 MB line": "x" * 1_000_000,
    "1 MB statement name": "experiment " + "a" * 1_000_000,
    "1 MB number": "train { steps = " + "9" * 1_000_000 + " }",
    "deep parentheses": "train { steps = " + "(" * 10_000 + "1" + ")" * 10_000 + " }",
    "unclosed parentheses": "train { steps = " + "(" * 10_000,
    "deep brackets": "sweep { width = " + "[" * 10_000 + "1" + "]" * 10_000 + " }",
    "deep minus": BASE.replace("steps = 2000", "steps = " + "-" * 10_000 + "1"),
    "deep minus name": BASE.replace("steps = 2000", "steps = " + "-" * 10_000 + "width"),
    "deep plus": BASE.replace("steps = 2000", "steps = " + "+" * 10_000 + "1"),
    "deep calls": "train { steps = " + "sqrt(" * 10_000 + "1" + ")" * 10_000 + " }",
    "long power chain": "train { steps = " + "2**" * 5_000 + "1 }",
    "long sum": "train { steps = " + "1+" * 10_000 + "1 }",
    "1e999": BASE.replace("lr = 0.05", "lr = 1e999"),
    "-1e999": BASE.replace("lr = 0.05", "lr = -1e999"),
    "10**10**10": BASE.replace("steps = 2000", "steps = 10**10**10"),
    "float power overflow": BASE.replace("lr = 0.05", "lr = 10.0**400"),
    "huge integer times float": BASE.replace("lr = 0.05", "lr = " + "9" * 400 + " * 1.0"),
    "huge integer lr": BASE.replace("lr = 0.05", "lr = " + "9" * 400),
    "huge integer steps": BASE.replace("steps = 2000", "steps = " + "9" * 400),
    "huge range": BASE.replace("seed = 0..1", "seed = 0.." + "9" * 400),
    "exp overflow": BASE.replace("lr = 0.05", "lr = exp(1000)"),
    "sqrt of negative": BASE.replace("lr = 0.05", "lr = sqrt(-1)"),
    "log of zero": BASE.replace("lr = 0.05", "lr = log(0)"),
    "fractional power of negative": BASE.replace("lr = 0.05", "lr = (-8)**(1/3)"),
    "string arithmetic": BASE.replace("steps = 2000", 'steps = "a" * 3'),
    "unicode identifier": BASE.replace("experiment demo", "experiment dëmo"),
    "unicode key": BASE.replace("batch = 8", "bätch = 8"),
    "emoji value": BASE.replace("batch = 8", "batch = 😀"),
    "unicode string": BASE.replace("device = cpu", 'device = "ßπ😀"'),
    "CRLF": BASE.replace("\n", "\r\n"),
    "CR only": BASE.replace("\n", "\r"),
    "tabs": BASE.replace("  ", "\t"),
    "NUL": BASE.replace("demo", "de\x00mo"),
    "control characters": "\x01\x02\x1b[31m",
    "BOM": "\ufeff" + BASE,
    "surrogate-free binary": "".join(chr(c) for c in range(1, 0x800)),
    "unterminated string": BASE.replace("device = cpu", 'device = "cpu\\'),
}


def survives(text: str) -> None:
    """Parse, build and expand the first point, or raise SpecError; nothing else."""
    try:
        spec = mfdsl.parse(text, "g.mf")
        next(iter(mfdsl.expand(spec)))
    except mfdsl.SpecError as error:
        report = str(error)
        assert report.startswith("g.mf")
        assert not TERMINALS.search(f"{error.message}\n{error.hint}"), report


@pytest.mark.parametrize("text", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_text(text: str) -> None:
    survives(text)


BINARY = {
    "random bytes": bytes(range(256)) * 4,
    "gzip header": b"\x1f\x8b\x08\x00" + bytes(100),
    "png header": b"\x89PNG\r\n\x1a\n" + bytes(50),
    "utf-16": BASE.encode("utf-16"),
    "latin-1": BASE.replace("demo", "démo").encode("latin-1"),
    "truncated utf-8": "experiment dé".encode()[:-1],
    "NUL bytes": bytes(1000),
}


@pytest.mark.parametrize("data", list(BINARY.values()), ids=list(BINARY))
def test_garbage_bytes(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "g.mf"
    path.write_bytes(data)
    with pytest.raises(mfdsl.SpecError) as info:
        mfdsl.load(path)
    assert str(info.value).startswith(str(path))


EXAMPLES = [*(p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.mf"))), BASE]
# Characters that matter to the grammar, so mutations reach deep into the parser.
PIECES = [
    *"{}[]()=~,;.+-*/\"'#\n\t ",
    *("..", "**", "layer", "every", "sweep", "train", "width", "dim", "last", "1", "0", "-1", "1e999"),
    *("normal(0, 1)", "sgd(lr = 1)", "é", "\r\n", "x", "}", "= ["),
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """An example spec with a few random cuts, insertions and duplications."""
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        action = draw(st.sampled_from(["cut", "insert", "replace", "repeat"]))
        if action == "cut":
            text = text[:i] + text[j:]
        elif action == "insert":
            text = text[:i] + draw(st.sampled_from(PIECES) | st.text(max_size=5)) + text[i:]
        elif action == "replace":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


_SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(mutated())
def test_mutated_specs(text: str) -> None:
    survives(text)


@settings(_SETTINGS, max_examples=150)
@given(st.lists(st.sampled_from(PIECES) | st.characters(codec="utf-8"), max_size=80).map("".join))
def test_random_text(text: str) -> None:
    survives(text)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=st.sampled_from(EXAMPLES).map(lambda t: t.encode()),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=4)), min_size=1, max_size=4),
)
def test_mutated_bytes(data: bytes, edits: list[tuple[int, bytes]], tmp_path: Path) -> None:
    for at, new in edits:
        at %= len(data) + 1
        data = data[:at] + new + data[at + len(new) :]
    path = tmp_path / "g.mf"
    path.write_bytes(data)
    try:
        mfdsl.load(path)
    except mfdsl.SpecError as error:
        assert str(error).startswith(str(path))


YAML_PIECES = [*PIECES, *":-|>&*!?", "!!binary", "!!python/object:os.system", "&a", "*a", "<<: *a", "---\n"]


@settings(_SETTINGS, max_examples=150)
@given(
    text=st.sampled_from([YAML, *(mfdsl.to_yaml(mfdsl.parse(t)) for t in EXAMPLES[:-1])]),
    edits=st.lists(
        st.tuples(st.integers(0, 2000), st.integers(0, 20), st.sampled_from(YAML_PIECES)),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_yaml(
    text: str, edits: list[tuple[int, int, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    for at, cut, new in edits:
        at %= len(text) + 1
        text = text[:at] + new + text[at + cut :]
    path = tmp_path_factory.mktemp("yaml") / "g.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        mfdsl.check_all(mfdsl.load(path))
    except mfdsl.SpecError as error:
        report = str(error)
        assert report.startswith(str(path))
        assert not TERMINALS.search(f"{error.message}\n{error.hint}"), report


# ---- every independent error, in source order --------------------------------------------


def all_errors(text: str) -> list[mfdsl.SpecError]:
    """Every error one check of ``text`` reports."""
    from mfdsl.core.errors import errors_of

    with pytest.raises(mfdsl.SpecError) as info:
        check(text)
    return errors_of(info.value)


def places(errors: list[mfdsl.SpecError]) -> list[tuple[int | None, int | None]]:
    return [(e.line, e.column) for e in errors]


def test_two_errors_in_source_order() -> None:
    # a bad width on line 17 and a misspelt key on line 10: one check reports both, the
    # one written first first, each as it is reported alone
    text = with_("width = [64, 256]", "width = [64, 0]", with_("lr = 0.05", "lrr = 0.05"))
    errors = all_errors(text)
    assert places(errors) == [(10, 25), (17, 16)]
    alone = [
        all_errors(with_("lr = 0.05", "lrr = 0.05")),
        all_errors(with_("width = [64, 256]", "width = [64, 0]")),
    ]
    assert [e.message for e in errors] == [alone[0][0].message, alone[1][0].message]
    # the exception is the first error, for code that handles one
    with pytest.raises(mfdsl.SpecError) as info:
        check(text)
    assert (info.value.line, info.value.column, info.value.message) == (10, 25, errors[0].message)
    assert_report(info.value, "t.mf", text, 10, 25)
    assert str(info.value).count("t.mf:") == 2


def test_errors_across_blocks_and_inside_calls() -> None:
    text = with_("dim = 20", "dim = 0", with_("sgd(lr = 0.05)", "sgd(lr = -1, momentum = 2)"))
    text = with_("test_loss,", "test_los,", text)
    errors = all_errors(text)
    assert places(errors) == [(2, 33), (10, 24), (10, 39), (15, 31)]
    assert [e.message.split(",")[0] for e in errors] == [
        "'dim' must be a positive integer",
        "'lr' must be a positive number",
        "'momentum' must be a number ≥ 0 and < 1",
        "unknown observable 'test_los'",
    ]


def test_errors_at_sweep_points_each_once() -> None:
    # 'hidden' is wrong at n = 1, 'batch' at both points: each place is reported once,
    # at the first point where it is wrong, in source order
    text = sweeping("n = [1, 2]", with_("hidden = 1", "hidden = n - 1", with_("batch = 8", "batch = n - 2")))
    errors = all_errors(text)
    assert places(errors) == [(3, 24), (12, 11)]
    assert errors[0].message.endswith("got 0 (at sweep point width = 64, seed = 0, n = 1)")
    assert errors[1].message.endswith("got 0 (at sweep point width = 64, seed = 0, n = 2)")


def test_spec_wide_errors_come_after_local_ones() -> None:
    # today's report of a half-written spec: the typo on line 4 first, then what is missing
    text = BASE[: BASE.index("sweep {")].replace("scaling mean_field", "scaling mean_feld")
    errors = all_errors(text)
    assert [e.message.split(";")[0] for e in errors] == [
        "unknown scaling 'mean_feld'",
        "the spec has no 'sweep' block, so no widths to train",
    ]
    assert errors[0].hint == "did you mean 'mean_field'?"
    # a spec-wide error alone is reported as before
    (alone,) = all_errors(BASE[: BASE.index("sweep {")])
    assert (alone.line, alone.column) == (1, 1)


def test_dependent_errors_are_not_reported() -> None:
    # a misspelt required key is one error, not also "train needs 'optimizer'"
    (error,) = all_errors(with_("optimizer = sgd", "optimzer = sgd"))
    assert error.message == "unknown key 'optimzer' in train"
    # a bad sweep value does not make every use of the variable an unknown name
    text = sweeping("s = [1, 2, 2]", with_("lr = 0.05", "lr = 0.05 * s"))
    (error,) = all_errors(text)
    assert error.message == "'s' lists 2 twice"
    # checks across blocks wait for every block to be right
    (error,) = all_errors(with_("hidden = 1", "hidden = 0", with_("layer 2 ~", "layer 3 ~")))
    assert error.message.startswith("'hidden' must be an integer from 1 to 64")


def test_syntax_errors_resume_at_the_next_statement() -> None:
    text = with_(
        "dim = 20,",
        "dim: 20,",
        with_("steps = 2000", "steps 2000", with_("width = [64, 256]", "width = [64 256]")),
    )
    errors = all_errors(text)
    assert places(errors) == [(2, 30), (13, 9), (17, 15)]
    assert [e.hint for e in errors] == [
        "use '=' between a key and its value",
        "use '=' between a key and its value",
        "items of a list are separated by commas",
    ]
    # an unclosed block is one error, not one for every statement after it
    (error,) = all_errors(with_("  steps = 2000\n}", "  steps = 2000\n"))
    assert error.line == 15


def test_at_most_twenty_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdsl.cli import main
    from mfdsl.core.errors import MAX_ERRORS, SpecErrors

    keys = ", ".join(f"bad{i} = 1" for i in range(25))
    text = with_("  batch = 8\n", f"  batch = 8, {keys}\n")
    with pytest.raises(SpecErrors) as info:
        check(text)
    assert MAX_ERRORS == 20
    assert len(info.value.errors) == 20 and info.value.omitted == 5
    assert [e.message for e in info.value.errors] == [f"unknown key 'bad{i}' in train" for i in range(20)]
    assert str(info.value).endswith("… and 5 more errors (only the first 20 are shown)")
    # (to a worker process and back, as every exception may travel)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.omitted == 5
    path = tmp_path / "t.mf"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count(": error: unknown key 'bad") == 20
    assert err.rstrip().endswith("25 errors (the first 20 shown)")


def test_cli_prints_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdsl.cli import main

    path = tmp_path / "t.mf"
    path.write_text(
        with_("width = [64, 256]", "width = [64, 0]", with_("lr = 0.05", "lrr = 0.05")), encoding="utf-8"
    )
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:10:25: error: unknown key 'lrr' in sgd" in err
    assert f"{path}:17:16: error: 'width' must be a positive integer, got 0" in err
    assert err.index(":10:25:") < err.index(":17:16:")
    assert err.rstrip().endswith("2 errors")


@pytest.mark.parametrize(
    ("old", "new", "column", "word", "fixed"),
    [
        ("experiment demo", "experiment my-exp", 12, "my-exp", "did you mean 'my_exp'?"),
        ("experiment demo", "experiment run.2", 12, "run.2", "did you mean 'run_2'?"),
        ("experiment demo", "experiment 2nd", 12, "2nd", "e.g. '_2nd'"),
        ("  batch = 8", "  batch-size = 8", 3, "batch-size", "did you mean 'batch_size'?"),
        ("backends torch", "backends torch, my-backend", 17, "my-backend", "did you mean 'my_backend'?"),
    ],
)
def test_names_that_are_not_identifiers(old: str, new: str, column: int, word: str, fixed: str) -> None:
    text = with_(old, new)
    (error,) = all_errors(text)
    line = next(i for i, written in enumerate(text.split("\n"), start=1) if new.strip() in written)
    assert (error.line, error.column) == (line, column)
    assert error.message.startswith(f"'{word}' is not a name: ")
    assert error.hint == fixed
    assert error.span is not None and error.span.end_column - error.span.column == len(word)
    assert_in_words(error, (word,))


def test_fmt_on_yaml_says_how_to_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdsl.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(YAML, encoding="utf-8")
    assert main(["fmt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'mfdsl fmt' formats .mf specs, and this is a YAML spec" in err
    assert f"mfdsl fmt --from-yaml {path}" in err
    # ... and the conversion gives the same spec as a .mf file
    assert main(["fmt", "--from-yaml", str(path)]) == 0
    converted = capsys.readouterr().out
    assert mfdsl.parse(converted, "t.mf") == mfdsl.load(path)
    # YAML in a .mf file: one error that says so, not one per line
    mf = tmp_path / "y.mf"
    mf.write_text(YAML, encoding="utf-8")
    (error,) = all_errors(YAML)
    assert "this looks like YAML" in str(error.hint)
