"""Damaged runs: open_run checks a run before anything reads it.

A valid tiny run is scanned once per module and copied for each damage: a
manifest field of the wrong type or value, rows that do not fit the manifest,
truncated or missing files. Whatever the damage, open_run either opens the
run or raises one HeadscopeError line, never a KeyError/TypeError/...; and on
every run that opens, the text and HTML reports build (and the text report
prints) without raising.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rich.console import Console

from headscope.errors import HeadscopeError
from headscope.html_report import build_html_report
from headscope.report import build_report, score_matrix, sink_summary, sink_summary_table
from headscope.run_checks import MAX_HEADS, manifest_problem
from headscope.runs import list_runs, open_run

MANIFEST = "manifest.json"


@pytest.fixture(scope="module")
def valid_manifest(tiny_run) -> dict[str, Any]:
    return json.loads((tiny_run / MANIFEST).read_text())


def damaged_copy(tiny_run: Path, tmp_path: Path, name: str = "run") -> Path:
    copy_path = tmp_path / name
    shutil.copytree(tiny_run, copy_path)
    return copy_path


def write_manifest(run: Path, manifest: Any) -> None:
    (run / MANIFEST).write_text(json.dumps(manifest))


def open_error(run: Path) -> str:
    """open_run's error: a HeadscopeError of one line that names the run."""
    with pytest.raises(HeadscopeError) as info:
        open_run(run)
    message = str(info.value)
    assert "\n" not in message and str(run) in message, message
    return message


def render(renderable: Any, width: int = 120) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(renderable)
    return buffer.getvalue()


def report_everything(run) -> None:
    """Every report of an opened run builds and renders."""
    tables = [*run.head_tables(), *run.layer_tables()]
    render(build_report(run.manifest, tables))
    render(sink_summary_table(sink_summary(tables)))
    sink_summary_table(sink_summary(tables), markdown=True)
    for table in run.head_tables():
        render(score_matrix(table))
        score_matrix(table, markdown=True)
    build_html_report(run.manifest, tables)


def test_the_tiny_run_opens_and_reports(tiny_run):
    run = open_run(tiny_run)
    report_everything(run)
    assert manifest_problem(run.manifest) is None


# --------------------------------------------------------------------------- manifest


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        *parents, last = path
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def _delete(path: tuple) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        *parents, last = path
        target = manifest
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _duplicate_first_table(manifest: dict) -> None:
    manifest["tables"].append(copy.deepcopy(manifest["tables"][0]))


MANIFEST_DAMAGE = [
    (_set(("tables", 0, "n_heads"), "abc"),
     "manifest.json field tables[0].n_heads must be a positive integer, got 'abc'"),
    (_set(("tables", 1, "n_layers"), 0), "tables[1].n_layers must be a positive integer, got 0"),
    (_set(("tables", 1, "n_layers"), 2.0), "tables[1].n_layers must be a positive integer"),
    (_set(("tables", 0, "kind"), "row"), "tables[0].kind must be 'head' or 'layer', got 'row'"),
    (_set(("tables", 0, "detector"), 7), "tables[0].detector must be a string, got 7"),
    (_set(("tables", 0, "params"), [1]), "tables[0].params must be a JSON object"),
    (_set(("tables", 0, "summary"), "none"), "tables[0].summary must be a JSON object"),
    (_set(("tables", 0, "description"), None), "tables[0].description must be a string"),
    (_delete(("tables", 0, "prompt_set")), "lacks the field tables[0].prompt_set"),
    (_delete(("tables", 0, "n_heads")), "lacks the field tables[0].n_heads (a head table)"),
    (_set(("tables", 0), "previous_token"), "field tables[0] must be a JSON object"),
    (_set(("tables",), {}), "field tables must be a list"),
    (_delete(("tables",)), "lacks the field tables"),
    (_duplicate_first_table, "lists two head tables of 'previous_token' on 'prose'"),
    (_set(("tables", 0, "n_layers"), 2**20), f"reads at most {MAX_HEADS}"),
    (_set(("schema_version",), True), "field schema_version must be a positive integer"),
    (_set(("schema_version",), "1"), "field schema_version must be a positive integer"),
    (_set(("schema_version",), 0), "field schema_version must be a positive integer"),
    (_delete(("schema_version",)), "lacks the field schema_version"),
    (_set(("created",), 20260101), "field created must be a string"),
    (_set(("versions",), "1.0"), "field versions must be a JSON object"),
    (_set(("versions", "torch"), 2), "field versions.torch must be a string"),
    (_set(("model",), "tiny:llama"), "field model must be a JSON object"),
    (_set(("model", "spec"), ["tiny"]), "field model.spec must be a string"),
    (_set(("model", "arch"), []), "field model.arch must be a JSON object"),
    (_set(("model", "arch", "n_heads"), -4), "model.arch.n_heads must be a positive integer"),
    (_set(("model", "arch", "n_layers"), "2"), "model.arch.n_layers must be a positive integer"),
    (_set(("model", "arch", "bos_token_id"), -1), "model.arch.bos_token_id must be a non-neg"),
    (_set(("prompt_sets",), {"name": "prose"}), "field prompt_sets must be a list"),
    (_set(("prompt_sets", 0), 3), "field prompt_sets[0] must be a name or a JSON object"),
    (_delete(("prompt_sets", 0, "name")), "lacks the field prompt_sets[0].name"),
    (_set(("prompt_sets", 0, "n_prompts"), "four"), "prompt_sets[0].n_prompts must be a non-neg"),
    (_set(("prompt_sets", 0, "lengths"), [16, "x"]), "prompt_sets[0].lengths[1] must be a non-"),
    (_set(("detectors", 1), "first_token_sink"), "field detectors[1] must be a JSON object"),
    (_set(("detectors", 0, "primary_prompt_set"), 1), "detectors[0].primary_prompt_set must be"),
    (_set(("config",), []), "field config must be a JSON object"),
    (_set(("timing", "total_s"), "fast"), "field timing.total_s must be a number or null"),
    (_set(("timing", "odd key\n"), "x"), 'field timing["odd key\\n"] must be a number'),
    (_set(("skipped",), [{"detector": "x"}]), "lacks the field skipped[0].reason"),
    (_set(("skipped",), ["x"]), "field skipped[0] must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "expected"), MANIFEST_DAMAGE)
def test_a_bad_manifest_field_is_named(tiny_run, valid_manifest, tmp_path, damage, expected):
    run = damaged_copy(tiny_run, tmp_path)
    manifest = copy.deepcopy(valid_manifest)
    damage(manifest)
    write_manifest(run, manifest)
    message = open_error(run)
    assert f"run {run}: manifest.json " in message
    assert expected in message
    assert list_runs(tmp_path) == []  # a damaged run is skipped, not listed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", "manifest.json is not a JSON object"),
        ("{not json", "is not readable JSON"),
        ("[" * 100_000, "is not readable JSON"),  # nested too deep to parse
        ('{"schema_version": 1' + "0" * 5000 + "}", "is not readable JSON"),  # int too long
        (b"\xff\xfe{}", "is not readable JSON"),
        ("", "is not readable JSON"),
    ],
)
def test_an_unreadable_manifest_is_one_line(tiny_run, tmp_path, text, expected):
    run = damaged_copy(tiny_run, tmp_path)
    if isinstance(text, bytes):
        (run / MANIFEST).write_bytes(text)
    else:
        (run / MANIFEST).write_text(text)
    assert expected in open_error(run)


def test_unknown_fields_are_allowed(tiny_run, valid_manifest, tmp_path):
    run = damaged_copy(tiny_run, tmp_path)
    manifest = copy.deepcopy(valid_manifest)
    manifest["added_later"] = {"anything": [1, "two"]}
    manifest["model"]["arch"]["new_field"] = "x"
    manifest["tables"][0]["extra"] = None
    manifest["prompt_sets"].append("a-name-only")
    write_manifest(run, manifest)
    assert open_run(run).manifest["added_later"] == {"anything": [1, "two"]}


def test_list_runs_skips_the_damaged_and_keeps_the_rest(tiny_run, valid_manifest, tmp_path):
    damaged_copy(tiny_run, tmp_path, "good")
    bad = damaged_copy(tiny_run, tmp_path, "bad")
    manifest = copy.deepcopy(valid_manifest)
    manifest["tables"][0]["n_heads"] = "abc"
    write_manifest(bad, manifest)
    assert [s.name for s in list_runs(tmp_path)] == ["good"]


# --------------------------------------------------------------------------- files


def _rewrite_heads(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        frame = pd.read_parquet(run / "heads.parquet")
        change(frame).to_parquet(run / "heads.parquet", index=False)

    return damage


def _assign(**columns: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda frame: frame.assign(**columns)


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return damage


def _replace_with_folder(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()

    return damage


FILE_DAMAGE = [
    (lambda run: (run / "heads.parquet").unlink(), "lists tables but has no heads.parquet"),
    (_truncate("heads.parquet", 0.5), "not a readable Parquet file"),
    (_truncate("heads.parquet", 0), "not a readable Parquet file"),
    (_replace_with_folder("heads.parquet"), "heads.parquet is not a file"),
    (_rewrite_heads(lambda f: f.drop(columns=["score"])), "lacks columns ['score']"),
    (_rewrite_heads(lambda f: f.assign(layer=f["layer"] + 2)), "have layer 2, outside 0..1"),
    (_rewrite_heads(lambda f: f.assign(head=f["head"] - 1)), "have head -1, outside 0..3"),
    (_rewrite_heads(lambda f: pd.concat([f, f.iloc[:1]])), "hold L0H0 twice"),
    (_rewrite_heads(lambda f: f.assign(layer=f["layer"].astype(float).where(f["head"] > 0))),
     "column layer must hold integers"),
    (_rewrite_heads(_assign(layer="0")), "column layer must hold integers"),
    (_rewrite_heads(_assign(score="high")), "column score must hold numbers"),
    (_rewrite_heads(_assign(flagged="yes")), "column flagged must hold true/false"),
    (_rewrite_heads(_assign(detector=1)), "column detector must hold strings"),
    (_rewrite_heads(_assign(evidence="{not json")), "has evidence that is not JSON"),
    (_rewrite_heads(_assign(evidence="[1, 2]")), "has evidence that is not a JSON object"),
    (_rewrite_heads(_assign(evidence="[" * 5000)), "has evidence that is not JSON"),
    (_truncate("stats.safetensors", 0.5), "stats.safetensors is not a readable safetensors"),
    (_truncate("stats.safetensors", 0.001), "stats.safetensors is not a readable safetensors"),
    (_truncate("samples/prose.safetensors", 0.9), "prose.safetensors is not a readable safet"),
    (_replace_with_folder("samples/prose.safetensors"), "prose.safetensors is not a readable"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "expected"), FILE_DAMAGE)
def test_a_damaged_file_is_one_line(tiny_run, tmp_path, damage, expected):
    run = damaged_copy(tiny_run, tmp_path)
    damage(run)
    assert expected in open_error(run)


def test_missing_optional_files_still_open(tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path)
    (run / "stats.safetensors").unlink()
    shutil.rmtree(run / "samples")
    opened = open_run(run)
    assert opened.tensors() == {} and opened.sample_names() == []
    report_everything(opened)


# --------------------------------------------------------------------------- any damage

#: JSON values of every type, including the awkward ones: markup, control
#: characters, huge and non-finite numbers, nesting
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2, 3, 4, 10**6])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["[/]", "[bold", "\x1b[2J", "<script>", "prose", "head", "layer", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (the value itself included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


def _mutated(manifest: dict, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    out = copy.deepcopy(manifest)
    *parents, last = path
    target = out
    for key in parents:
        target = target[key]
    if delete:
        del target[last]
    else:
        target[last] = value
    return out


def _opens_or_says_why(run: Path) -> None:
    try:
        opened = open_run(run)
    except HeadscopeError as err:
        assert "\n" not in str(err)
        event("refused")
        return
    event("opened")
    report_everything(opened)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_manifest_damage_opens_or_is_one_line(tiny_run, valid_manifest, tmp_path_factory,
                                                   data):  # fmt: skip
    run = tmp_path_factory.getbasetemp() / "fuzzed-manifest"
    if not run.exists():
        shutil.copytree(tiny_run, run)
    paths = _paths(valid_manifest)
    # half the time a table's summary or params: what the report sections read
    wanted = [p for p in paths if len(p) >= 3 and p[0] == "tables" and p[2] in (
        "summary", "params")]  # fmt: skip
    path = data.draw(
        st.sampled_from(wanted) if data.draw(st.booleans()) else st.sampled_from(paths)
    )
    delete = bool(path) and data.draw(st.booleans())
    value = data.draw(JSON_VALUES)
    (run / MANIFEST).write_text(json.dumps(_mutated(valid_manifest, path, value, delete)))
    _opens_or_says_why(run)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_row_damage_opens_or_is_one_line(tiny_run, tmp_path_factory, data):
    run = tmp_path_factory.getbasetemp() / "fuzzed-rows"
    if not run.exists():
        shutil.copytree(tiny_run, run)
    frame = pd.read_parquet(tiny_run / "heads.parquet")
    row = data.draw(st.integers(0, len(frame) - 1))
    column = data.draw(st.sampled_from(["layer", "head", "score", "flagged", "evidence"]))
    if column in ("layer", "head"):
        value = data.draw(st.integers(-5, 10))
    elif column == "score":
        value = data.draw(st.floats(allow_nan=True, allow_infinity=True))
    elif column == "flagged":
        value = data.draw(st.booleans())
    else:
        value = json.dumps(data.draw(JSON_VALUES))
    frame.loc[row, column] = value
    frame.to_parquet(run / "heads.parquet", index=False)
    _opens_or_says_why(run)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["heads.parquet", "stats.safetensors", "samples/prose.safetensors"]),
    keep=st.floats(0, 1, exclude_max=True),
)
def test_any_truncation_is_one_line(tiny_run, tmp_path_factory, name, keep):
    run = tmp_path_factory.getbasetemp() / "fuzzed-files"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(tiny_run, run)
    _truncate(name, keep)(run)
    assert open_error(run)


# --------------------------------------------------------------------------- text report


def test_the_text_report_prints_run_strings_as_text(tiny_run, valid_manifest, tmp_path):
    run = damaged_copy(tiny_run, tmp_path)
    manifest = copy.deepcopy(valid_manifest)
    manifest["model"]["spec"] = "[bold red]spec[/] \x1b[2J"
    manifest["prompt_sets"][0]["description"] = "[/]"
    manifest["skipped"] = [{"detector": "[link=https://x]x[/link]", "reason": "[/unclosed]"}]
    manifest["tables"][1]["summary"]["sink_rate"] = "lots"  # not a number: a line says so
    write_manifest(run, manifest)
    opened = open_run(run)
    text = render(build_report(opened.manifest, [*opened.head_tables()]), width=400)
    assert "[bold red]spec[/] \\x1b[2J" in text and "\x1b" not in text
    assert "skipped [link=https://x]x[/link]: [/unclosed]" in text
    assert "first_token_sink on prose: not shown, its summary or params hold unexpected" in text
    assert "previous_token on prose: top 5" in text  # the rest is still there
