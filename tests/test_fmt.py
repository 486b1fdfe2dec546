"""``mfdsl fmt``: canonical layout, comments kept, idempotent, meaning preserved."""

from __future__ import annotations

from pathlib import Path

import pytest

import mfdsl
from mfdsl.language.fmt import format_source
from mfdsl.language.syntax import parse_text

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.mf"))


def comment_texts(source: str) -> list[str]:
    return [c.text for c in parse_text(source).comments]


def check(source: str) -> str:
    """Format ``source`` and check the invariants every formatting must keep."""
    out = format_source(source)
    assert format_source(out) == out
    assert parse_text(out).statements == parse_text(source).statements
    assert comment_texts(out) == comment_texts(source)
    assert out == "" or (out.endswith("\n") and not out.endswith("\n\n"))
    assert not any(line != line.rstrip() for line in out.split("\n"))
    return out


def test_examples_exist() -> None:
    assert len(SPECS) >= 4


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_are_already_canonical(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert check(source) == source


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_keep_their_meaning_when_squashed(path: Path) -> None:
    # The same spec with its layout destroyed formats back to the same statements.
    source = path.read_text(encoding="utf-8")
    squashed = "\n".join(line.split("#")[0].strip() for line in source.split("\n"))
    squashed = squashed.replace("\n", " ; ").replace("{ ;", "{").replace("; }", "}")
    out = check(squashed)
    assert mfdsl.parse(out) == mfdsl.parse(source)


def test_one_line_spec_is_split_into_statements() -> None:
    source = (
        "experiment x; data teacher { dim = 3 }; network mlp{hidden=1}; "
        "train { optimizer = sgd(lr=0.1), steps = 10 } ; sweep { width = [1,2] } # end"
    )
    assert check(source) == (
        "experiment x\n"
        "\n"
        "data teacher { dim = 3 }\n"
        "\n"
        "network mlp { hidden = 1 }\n"
        "\n"
        "train { optimizer = sgd(lr = 0.1), steps = 10 }\n"
        "\n"
        "sweep { width = [1, 2] }  # end\n"
    )
    assert mfdsl.parse(format_source(source)) == mfdsl.parse(source)


def test_multi_line_blocks_align_and_indent() -> None:
    source = "train {\noptimizer=sgd( lr = 0.05 ) ;loss=mse\n    steps  =  2000,\n}\ninit {layer 1~normal(0,(1)/sqrt(dim))\nlayer 2..3~constant(0)}\n"
    assert check(source) == (
        "train {\n"
        "  optimizer = sgd(lr = 0.05)\n"
        "  loss      = mse\n"
        "  steps     = 2000\n"
        "}\n"
        "\n"
        "init {\n"
        "  layer 1    ~ normal(0, 1 / sqrt(dim))\n"
        "  layer 2..3 ~ constant(0)\n"
        "}\n"
    )


def test_long_one_line_block_is_expanded() -> None:
    source = (
        "data teacher { dim = 100, teacher = mlp(hidden = 2, width = 8, activation = relu), noise = 0.25 }"
    )
    assert check(source) == (
        "data teacher {\n"
        "  dim     = 100\n"
        "  teacher = mlp(hidden = 2, width = 8, activation = relu)\n"
        "  noise   = 0.25\n"
        "}\n"
    )


def test_init_is_always_one_rule_per_line() -> None:
    assert check("init { layer 1 ~ normal(0, 1) }") == "init {\n  layer 1 ~ normal(0, 1)\n}\n"


def test_empty_blocks() -> None:
    assert check("train {}\nsweep {\n\n}") == "train {}\n\nsweep {}\n"


def test_record_keeps_the_authors_grouping() -> None:
    source = "record log 40 {\n  train_loss,test_loss\n  output( probes=3 ); weight_change(layer = 1..2)\n}\n"
    assert check(source) == (
        "record log 40 {\n  train_loss, test_loss\n  output(probes = 3), weight_change(layer = 1..2)\n}\n"
    )


def test_record_group_too_wide_is_filled() -> None:
    observables = "train_loss, test_loss, test_accuracy, output(probes = 32), neuron_spread(layer = 2..4)"
    source = f"record every 10 {{ {observables}, weight_change(layer = 1) }}"
    assert check(source) == (f"record every 10 {{\n  {observables}\n  weight_change(layer = 1)\n}}\n")


def test_trailing_comments_stay_on_their_line_and_line_up() -> None:
    source = (
        "sweep {\n"
        "  width=[1,  2]  # widths\n"
        "  seed = 0 .. 4     # seeds\n"
        "}  # the end of the sweep\n"
        "experiment e # named\n"
    )
    assert check(source) == (
        "sweep {\n"
        "  width = [1, 2]   # widths\n"
        "  seed  = 0..4     # seeds\n"
        "}  # the end of the sweep\n"
        "\n"
        "experiment e  # named\n"
    )


def test_own_line_comments_attach_to_what_follows() -> None:
    source = (
        "# header\n"
        "\n"
        "\n"
        "# about x\n"
        "experiment x\n"
        "data teacher {  # head\n"
        "  # about dim\n"
        "  dim = 3\n"
        "\n"
        "\n"
        "  noise = 0.1\n"
        "  # dangling\n"
        "}\n"
        "# about train\n"
        "train { steps = 1 }\n"
        "# the end\n"
    )
    assert check(source) == (
        "# header\n"
        "\n"
        "# about x\n"
        "experiment x\n"
        "\n"
        "data teacher {  # head\n"
        "  # about dim\n"
        "  dim   = 3\n"
        "\n"
        "  noise = 0.1\n"
        "  # dangling\n"
        "}\n"
        "\n"
        "# about train\n"
        "train { steps = 1 }\n"
        "# the end\n"
    )


def test_comments_inside_a_value_or_header_move_above_it() -> None:
    source = (
        "record every # how often\n"
        "  10 { train_loss }\n"
        "data teacher {\n"
        "  teacher = mlp(hidden = 1,  # one layer\n"
        "                width = 2)\n"
        "}\n"
    )
    assert check(source) == (
        "# how often\n"
        "record every 10 {\n"
        "  train_loss\n"
        "}\n"
        "\n"
        "data teacher {\n"
        "  # one layer\n"
        "  teacher = mlp(hidden = 1, width = 2)\n"
        "}\n"
    )


def test_stray_comment_after_separator() -> None:
    # The second comment cannot share the line of the first: it moves to its own line.
    source = "experiment x  # a\n; # b\nscaling ntk"
    assert check(source) == "experiment x  # a\n\n# b\nscaling ntk\n"


def test_comments_only_and_empty() -> None:
    assert check("") == ""
    assert check("\n\n  \n") == ""
    assert check("# one\n\n\n\n# two   \n") == "# one\n\n# two\n"


def test_values_are_canonical() -> None:
    source = 'data mnist { root = "a \\"b\\"", classes = [ 0 , 1 , ] , train = +10 }\nsweep{x=-(2)**2;y=(1+2)*3;z=2**-1}'
    out = check(source)
    assert out == (
        'data mnist { root = "a \\"b\\"", classes = [0, 1], train = 10 }\n'
        "\n"
        "sweep { x = -2 ** 2, y = (1 + 2) * 3, z = 2 ** -1 }\n"
    )


def test_unknown_keys_still_format() -> None:
    # Formatting is syntactic: a spec the builder would refuse is still formatted.
    assert check("trian {lrr=1}") == "trian { lrr = 1 }\n"
    with pytest.raises(mfdsl.SpecError):
        mfdsl.parse("trian {lrr=1}")


def test_tabs_and_crlf() -> None:
    source = "train {\r\n\tsteps\t=\t1\t# tab\r\n}\r\n"
    assert check(source) == "train {\n  steps = 1  # tab\n}\n"


@pytest.mark.parametrize(
    "source",
    ["train { steps = }", "data teacher { dim = 3", "experiment", "train { a = 1 } }", "sweep { x = 'a' }"],
)
def test_malformed_spec_raises(source: str) -> None:
    with pytest.raises(mfdsl.SpecError):
        format_source(source, "bad.mf")


def test_error_names_the_file() -> None:
    with pytest.raises(mfdsl.SpecError) as info:
        format_source("train { steps = }", "bad.mf")
    assert info.value.path == "bad.mf"
    assert "bad.mf:1:" in str(info.value)
