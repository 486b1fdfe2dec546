"""docs/language.md stays true to the code.

* every key of every block (data kinds, network, train, optimizers, distributions,
  schedules, observable arguments, the teacher network) and of every installed backend
  has a row in the right table of the reference, with its default rendered as the
  code declares it, and no table lists a key the code does not know;
* every observable, keyword, choice and command-line option is mentioned;
* every ``mf`` code block of the reference and of README.md parses, and every one that
  is a whole spec (it has a ``sweep`` block) passes ``mfdsl.check_all``;
* the YAML example loads, checks and is what ``mfdsl show`` prints;
* the error messages pasted in the reference are what ``mfdsl check`` prints today.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import mfdsl
from mfdsl.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, print_errors
from mfdsl.language import ir as ir
from mfdsl.language.build import BUILTIN_VARIABLES
from mfdsl.language.expr import FUNCTIONS, format_number
from mfdsl.language.options import REQUIRED, Option, Str
from mfdsl.language.syntax import KEYWORDS, parse_text

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = ROOT / "docs" / "language.md"
README_PATH = ROOT / "README.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

KEY_TABLE_HEADER = "| key | type | default | meaning |"


# ---- reading the markdown --------------------------------------------------------------


def _outside_fences(lines: list[str]) -> list[bool]:
    """For each line, whether it is outside a fenced code block (fence lines excluded)."""
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            out.append(False)
        else:
            out.append(not fenced)
    return out


def section(text: str, *patterns: str) -> str:
    """The text under the heading matching each regex pattern in turn (each searched
    inside the previous one), up to the next heading of the same or a higher level."""
    for pattern in patterns:
        lines = text.split("\n")
        prose = _outside_fences(lines)
        found = [i for i, line in enumerate(lines) if prose[i] and re.match(pattern, line)]
        assert len(found) == 1, (
            f"expected one heading matching {pattern!r} in docs/language.md, found {len(found)}"
        )
        start = found[0]
        level = len(lines[start]) - len(lines[start].lstrip("#"))
        end = len(lines)
        for j in range(start + 1, len(lines)):
            match = re.match(r"(#+) ", lines[j])
            if prose[j] and match and len(match.group(1)) <= level:
                end = j
                break
        text = "\n".join(lines[start:end])
    return text


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def key_table(text: str) -> list[list[str]] | None:
    """The rows of the first ``| key | type | default | meaning |`` table in ``text``."""
    lines = text.split("\n")
    prose = _outside_fences(lines)
    for i, line in enumerate(lines):
        if prose[i] and line.strip() == KEY_TABLE_HEADER:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return rows
    return None


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """``(line number, body)`` of every fenced block opened with exactly ```language."""
    blocks = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].strip()
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if info == language:
                blocks.append((start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def block_after(text: str, marker: str) -> str:
    """The body of the fenced block right after the HTML comment ``marker``."""
    index = text.index(marker)
    rest = text[index + len(marker) :].lstrip("\n")
    assert rest.startswith("```"), f"no code block right after {marker!r}"
    body = rest.split("\n", 1)[1]
    return body[: body.index("\n```")] + "\n"


# ---- rendering a default as the reference shows it ------------------------------------


def _literal(value: Any, opt: Option) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ir.Node):
        name = type(value).constructor  # type: ignore[attr-defined]
        return f"{name}()" if value.options() else name
    if isinstance(value, tuple):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if len(value) >= 3 and ints and list(value) == list(range(value[0], value[0] + len(value))):
            return f"{value[0]}..{value[-1]}"
        return "[" + ", ".join(_literal(v, opt) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if isinstance(opt.kind, Str) else value
    return format_number(value)


def render_default(opt: Option) -> str:
    """``required`` for a key without default, ``—`` for one whose default is decided
    elsewhere (explained in the row), else the default in spec syntax, in backticks."""
    if opt.default is REQUIRED:
        return "required"
    if opt.default is None:
        return "—"
    return f"`{_literal(opt.default, opt)}`"


# ---- (a) every key of every block, with its default --------------------------------------

_H = r"#+ "


def _blocks() -> list[tuple[str, tuple[Option, ...], tuple[str, ...]]]:
    blocks: list[tuple[str, tuple[Option, ...], tuple[str, ...]]] = []
    seen: set[type[Any]] = set()
    for kind, cls in ir.DATA_KINDS.items():
        if cls in seen:
            continue
        seen.add(cls)
        blocks.append((f"data {kind}", cls.options(), (r"## `data`", rf"### .*`data {kind}`")))
    blocks.append(
        (
            "teacher mlp",
            ir.TeacherNet.options(),
            (r"## `data`", r"### `data teacher`", r"#### The teacher network"),
        )
    )
    blocks.append(("network mlp", ir.Network.options(), (r"## `network mlp`",)))
    blocks.append(("network cnn", ir.ConvNetwork.options(), (r"## `network cnn`",)))
    blocks.append(("conv layer", ir.ConvLayer.options(), (r"## `network cnn`", r"#### `conv\(")))
    blocks.append(("train", ir.Train.options(), (r"## `train`",)))
    for name, cls in ir.OPTIMIZERS.items():
        blocks.append(
            (f"optimizer {name}", cls.options(), (r"## `train`", r"### Optimizers", rf"#### `{name}[`(]"))
        )
    for name, cls in ir.SCHEDULES.items():
        blocks.append(
            (f"schedule {name}", cls.options(), (r"## `train`", r"### Schedules", rf"#### `{name}[`(]"))
        )
    for name, cls in ir.DISTRIBUTIONS.items():
        blocks.append(
            (
                f"distribution {name}",
                cls.options(),
                (r"## `init`", r"### Distributions", rf"#### `{name}[`(]"),
            )
        )
    arguments = tuple(
        o for o in ir.Observable.options() if o.name != "name"
    )  # ``name`` is the observable itself
    blocks.append(("observable arguments", arguments, (r"## `record`", r"### Observable arguments")))
    for name, backend in mfdsl.available_backends().items():
        blocks.append((f"backend {name}", tuple(backend.options), (r"## Backends", rf"### `{name}` options")))
    return blocks


BLOCKS = _blocks()


@pytest.mark.parametrize(("what", "options", "headings"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_key_is_documented_with_its_default(
    what: str, options: tuple[Option, ...], headings: tuple[str, ...]
) -> None:
    text = section(DOC, *headings)
    rows = key_table(text)
    if not options:
        assert not rows, f"{what} takes no keys, but its section has a key table"
        return
    assert rows is not None, f"no '{KEY_TABLE_HEADER}' table under {headings[-1]!r}"
    documented = [row[0] for row in rows]
    assert documented == [f"`{o.name}`" for o in options], (
        f"the keys of {what} in the docs differ from the code"
    )
    for opt, row in zip(options, rows, strict=True):
        assert len(row) == 4, f"{what}: malformed row {row}"
        assert row[2] == render_default(opt), (
            f"{what}: '{opt.name}' defaults to {render_default(opt)}, docs say {row[2]}"
        )
        assert row[1] and row[3], f"{what}: '{opt.name}' needs a type and a meaning"


def test_render_default_examples() -> None:
    by_name = {o.name: o for o in ir.ImageData.options()}
    assert render_default(by_name["classes"]) == "`0..9`"
    assert render_default(by_name["root"]) == '`""`'
    train = {o.name: o for o in ir.Train.options()}
    assert render_default(train["optimizer"]) == "required"
    assert render_default(train["steps"]) == "—"
    assert render_default(train["freeze"]) == "`[]`"
    assert render_default(train["schedule"]) == "`constant`"
    teacher = {o.name: o for o in ir.Teacher.options()}
    assert render_default(teacher["teacher"]) == "`mlp()`"
    assert render_default({o.name: o for o in ir.Network.options()}["bias"]) == "`false`"


# ---- (b) every observable, keyword and choice is mentioned --------------------------------


def _words() -> list[str]:
    words: list[str] = []
    groups = (
        ir.OBSERVABLES,
        KEYWORDS,
        ("layer", "every", "log", "last", "true", "false", "online", "all", "auto", "mlp", "cnn", "conv"),
        BUILTIN_VARIABLES,
        ir.ACTIVATIONS,
        ir.OUTPUT_MAPS,
        ir.SCALINGS,
        ir.LOSSES,
        tuple(ir.DATA_KINDS),
        tuple(ir.OPTIMIZERS),
        tuple(ir.SCHEDULES),
        tuple(ir.DISTRIBUTIONS),
        tuple(FUNCTIONS),
        tuple(mfdsl.available_backends()),
    )
    for group in groups:
        for word in group:
            if word not in words:
                words.append(word)
    return words


@pytest.mark.parametrize("word", _words())
def test_every_name_of_the_language_is_mentioned(word: str) -> None:
    assert f"`{word}`" in DOC, f"docs/language.md never mentions `{word}`"


@pytest.mark.parametrize("name", ir.OBSERVABLES)
def test_every_observable_has_a_row_with_its_arguments(name: str) -> None:
    text = section(DOC, r"## `record`", r"### Observables")
    rows = [_cells(line) for line in text.split("\n") if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"no row for observable {name} under '### Observables'"
    arguments = set(re.findall(r"`(\w+)`", rows[0][1]))
    assert arguments == set(ir.Observable.accepted(name)), (
        f"the arguments of {name} in the docs differ from the code"
    )
    assert rows[0][3], f"{name} needs a definition"


def test_every_statement_has_a_section() -> None:
    for keyword in KEYWORDS:
        if keyword == "backends":
            section(DOC, r"## Backends")
        elif keyword == "network":
            section(DOC, r"## `network mlp`")
        else:
            section(DOC, rf"## `{keyword}`")


def _cli_options() -> list[str]:
    parser = build_parser()
    out = ["--version"]
    for action in parser._actions:  # the subcommands
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            for command, sub in choices.items():
                out.append(f"mfdsl {command}")
                for sub_action in sub._actions:
                    out += [o for o in sub_action.option_strings if o not in ("-h", "--help")]
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("option", _cli_options())
def test_every_command_and_option_is_documented(option: str) -> None:
    text = section(DOC, r"## Command line")
    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"'{option}' is not documented"


def test_exit_codes_are_documented() -> None:
    text = section(DOC, r"## Command line")
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, 130):
        assert f"| {code} |" in text


# ---- (c) code blocks parse and check ---------------------------------------------------------

_COMPLETE = re.compile(r"(?:^|[;}\s])sweep\s*\{")


def _mf_blocks() -> list[Any]:
    params = []
    for path in (DOC_PATH, README_PATH):
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for line, body in fenced_blocks(text, "mf"):
            params.append(pytest.param(path.name, body, id=f"{path.name}:{line}"))
    return params


MF_BLOCKS = _mf_blocks()


def test_the_reference_has_examples() -> None:
    complete = [p for p in MF_BLOCKS if p.values[0] == DOC_PATH.name and _COMPLETE.search(p.values[1])]
    assert len(complete) >= 4


@pytest.mark.parametrize(("name", "body"), MF_BLOCKS)
def test_code_blocks_parse_and_whole_specs_check(name: str, body: str) -> None:
    if _COMPLETE.search(body):
        spec = mfdsl.parse(body, path="example.mf")
        assert mfdsl.check_all(spec)
    else:
        parse_text(body, "example.mf")


def test_yaml_example_loads_checks_and_is_what_show_prints(tmp_path: Path) -> None:
    blocks = [body for _, body in fenced_blocks(DOC, "yaml") if "sweep:" in body]
    assert blocks, "no YAML spec in docs/language.md"
    for i, body in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(body, encoding="utf-8")
        spec = mfdsl.load(path)
        mfdsl.check_all(spec)
        assert mfdsl.to_yaml(spec) == body


def _check_error(argv: list[str]) -> str:
    """What ``mfdsl check`` prints for a failing spec (plain text, no colours)."""
    assert argv[:2] == ["mfdsl", "check"]
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    try:
        mfdsl.check_all(mfdsl.load(args.spec, overrides=args.overrides))
    except mfdsl.SpecError as error:
        out = io.StringIO()
        print_errors(error, Console(file=out, color_system=None, highlight=False, soft_wrap=True))
        return out.getvalue()
    raise AssertionError(f"{' '.join(argv)} did not fail")


def test_pasted_errors_are_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in re.findall(r"<!-- broken-spec: (\S+) -->", DOC):
        (tmp_path / name).write_text(block_after(DOC, f"<!-- broken-spec: {name} -->"), encoding="utf-8")
    outputs = [
        body
        for _, body in fenced_blocks(DOC, "text")
        if body.startswith("$ mfdsl check") and ": error: " in body
    ]
    assert len(outputs) >= 2
    for body in outputs:
        command, _, expected = body.partition("\n")
        argv = shlex.split(command[2:])
        spec = argv[2]
        monkeypatch.chdir(tmp_path if (tmp_path / spec).exists() else ROOT)
        assert _check_error(argv) == expected, (
            f"the output of '{command[2:]}' in docs/language.md is out of date"
        )


# ---- docs/store.md: each guarantee is tested -------------------------------------------------

STORE_DOC = (ROOT / "docs" / "store.md").read_text(encoding="utf-8")

#: each guarantee docs/store.md states (its bold lead), and the tests that keep it true
STORE_GUARANTEES = {
    "What `--overwrite` may delete": [
        "test_hostile_store.py::test_overwrite_refuses_whatever_is_not_an_mfdsl_store",
        "test_hostile_store.py::test_what_mfdsl_may_delete",
        "test_hostile_store.py::test_what_mfdsl_may_delete_at_a_url",
        "test_hostile_store.py::test_overwrite_keeps_what_mfdsl_did_not_write_beside_the_store",
        "test_hostile_store.py::test_clean_partial_leaves_a_live_writer_and_foreign_files_alone",
        "test_run.py::test_overwrite_replaces_the_store",
    ],
    "What is checksummed": [
        "test_hostile_store.py::test_a_flipped_byte_in_a_coordinate_is_caught_and_repaired",
        "test_hostile_store.py::test_old_stores_without_coordinate_checksums",
        "test_faults.py::test_a_chunk_cut_off_mid_write_is_run_again",
    ],
    "What `verify` promises": [
        "test_hostile_store.py::test_a_damaged_layout_is_named_by_verify_and_refused_by_resume",
        "test_hostile_store.py::test_damaged_root_metadata",
        "test_verify.py::test_every_kind_of_disagreement_is_listed",
    ],
    "What `--resume` promises": [
        "test_hostile_store.py::test_a_kill_while_the_skeleton_is_written_leaves_no_half_store",
        "test_hostile_store.py::test_missing_consolidated_metadata_and_unreadable_run_attributes",
        "test_run.py::test_resume_of_a_finished_store_runs_nothing",
        "test_run.py::test_resume_with_a_different_spec_is_refused",
    ],
    "Workers leave with their driver": [
        "test_faults.py::test_workers_die_with_a_driver_killed_while_its_pool_starts",
        "test_faults.py::test_resume_after_the_driver_was_killed",
    ],
    "Failures are counted per run": [
        "test_faults.py::test_a_run_that_kills_its_worker_fails_alone",
        "test_faults.py::test_which_units_a_broken_pool_is_charged_to",
    ],
    "A blown-up run is diverged, not done": [
        "test_hostile_store.py::test_a_blown_up_run_is_diverged_not_done",
        "test_hostile_store.py::test_judge_finds_the_first_blown_up_record",
        "test_hostile_store.py::test_verify_holds_a_done_run_to_the_threshold",
    ],
    "SIGTERM is Ctrl-C": ["test_faults.py::test_sigterm_keeps_finished_runs_for_resume"],
    "On a Dask cluster": [
        "test_hostile_store.py::test_the_cluster_tells_a_failed_unit_from_a_lost_one",
        "test_hostile_store.py::test_a_lost_run_is_what_the_store_says_and_a_revoked_fence_writes_nothing",
        "test_cluster.py::test_a_scheduler_that_dies_mid_sweep_leaves_log_exit_code_and_store_in_agreement",
    ],
}


def test_every_store_guarantee_is_stated_and_tested() -> None:
    """docs/store.md's *Guarantees* leads each guarantee with a bold phrase; each has
    tests here, and every test named exists."""
    text = STORE_DOC[STORE_DOC.index("## Guarantees") :]
    text = text[: text.index("\n## ", 1)]
    leads = [lead.rstrip(".,:") for lead in re.findall(r"^\*\*(.+?)\*\*", text, flags=re.M)]
    stated = {key for key in STORE_GUARANTEES if any(lead.startswith(key) for lead in leads)}
    assert stated == set(STORE_GUARANTEES), f"not stated in docs/store.md: {set(STORE_GUARANTEES) - stated}"
    untested = [lead for lead in leads if not any(lead.startswith(key) for key in STORE_GUARANTEES)]
    assert not untested, f"guarantees without tests: {untested}"
    for tests in STORE_GUARANTEES.values():
        for test in tests:
            module, name = test.split("::")
            assert f"def {name}(" in (ROOT / "tests" / module).read_text(encoding="utf-8"), test
