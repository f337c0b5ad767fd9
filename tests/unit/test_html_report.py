"""The HTML report: every string from a run is escaped, figures cannot close their
<script>, and ``--html FILE`` writes atomically and never overwrites a user's file."""

from __future__ import annotations

import copy
import html
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import headscope.html_report as html_report
from headscope.cli import app
from headscope.errors import HeadscopeError
from headscope.html_report import REPORT_MARKER, build_html_report, write_html_report
from headscope.runs import open_run

PAYLOADS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')


def _hostile(text: str, i: int = 0) -> str:
    return f"{text} {PAYLOADS[i % 2]}"


def _every_string(value: Any, counter: list[int]) -> Any:
    """``value`` with every string (not the keys) made hostile, alternating the payloads."""
    if isinstance(value, str):
        counter[0] += 1
        return _hostile(value, counter[0])
    if isinstance(value, dict):
        return {k: _every_string(v, counter) for k, v in value.items()}
    if isinstance(value, list):
        return [_every_string(v, counter) for v in value]
    return value


@pytest.fixture(scope="module")
def hostile_run(tiny_run, tmp_path_factory) -> Path:
    """The valid run with a payload in every string of its manifest and rows."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    kept = {key: manifest[key] for key in ("schema_version", "format") if key in manifest}
    hostile = _every_string(manifest, [0])
    hostile.update(kept)
    names = {}  # detector and prompt-set names must still match between manifest and rows
    for original, changed in zip(manifest["tables"], hostile["tables"], strict=True):
        changed["kind"] = original["kind"]
        for key in ("detector", "prompt_set"):
            names[original[key]] = changed[key] = _hostile(original[key])
        changed["summary"][PAYLOADS[0]] = PAYLOADS[1]
        changed["params"][PAYLOADS[1]] = PAYLOADS[0]
    for original, changed in zip(manifest["detectors"], hostile["detectors"], strict=True):
        changed["name"] = names[original["name"]]
        changed["primary_prompt_set"] = names[original["primary_prompt_set"]]
    for original, changed in zip(manifest["prompt_sets"], hostile["prompt_sets"], strict=True):
        changed["name"] = names[original["name"]]
    hostile["skipped"] = [{"detector": PAYLOADS[0], "reason": PAYLOADS[1]}]
    (run / "manifest.json").write_text(json.dumps(hostile))
    frame = pd.read_parquet(run / "heads.parquet")
    frame["detector"] = frame["detector"].map(names)
    frame["prompt_set"] = frame["prompt_set"].map(names)
    frame["evidence"] = json.dumps({PAYLOADS[0]: PAYLOADS[1]})
    frame.to_parquet(run / "heads.parquet", index=False)
    return run


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag) -> None:
        self._in_script = False

    def handle_data(self, data) -> None:
        if self._in_script:
            self.scripts[-1] += data


def _parsed(document: str) -> _Tags:
    parser = _Tags()
    parser.feed(document)
    return parser


def _report(path: Path) -> str:
    run = open_run(path)
    return build_html_report(run.manifest, [*run.head_tables(), *run.layer_tables()])


def test_every_run_string_is_escaped(tiny_run, hostile_run):
    document = _report(hostile_run)
    for payload in PAYLOADS:
        assert payload not in document
        assert html.escape(payload) in document  # shown, as text
    tags = _parsed(document)
    assert not [t for t, _ in tags.tags if t in ("img", "b")]
    assert not [(t, a) for t, attrs in tags.tags for a, _ in attrs if a.startswith("on")]
    # the figures hold the payload in their titles HTML-escaped (plotly reads titles as
    # HTML, so it shows as text) and JSON-escaped so it cannot end their <script>
    assert '"text":"previous_token &lt;script&gt;alert(1)&lt;\\u002fscript&gt; on' in document
    clean = _parsed(_report(tiny_run))
    assert len(tags.scripts) == len(clean.scripts)
    assert {t for t, _ in tags.tags} <= {t for t, _ in clean.tags}  # no kind of tag added
    assert "alert(1)" not in [s.strip() for s in tags.scripts]


def test_the_report_carries_its_marker(tiny_run):
    assert REPORT_MARKER in _report(tiny_run)[:500]


# --------------------------------------------------------------------------- writing


def test_written_then_replaced_atomically(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    assert write_html_report(tiny_run, out) == out
    first = out.read_text()
    assert first.startswith("<!DOCTYPE html>") and REPORT_MARKER in first
    os.utime(out, (0, 0))
    write_html_report(tiny_run, out)  # a report headscope wrote is replaced
    assert out.stat().st_mtime > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left


def test_a_report_from_before_the_marker_is_replaced(tiny_run, tmp_path):
    out = tmp_path / "old.html"
    out.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>headscope: x</title>")
    write_html_report(tiny_run, out)
    assert REPORT_MARKER in out.read_text()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "folder", "is a folder; give a file name"),
        (lambda d: d / "missing" / "report.html", "does not exist; create it first"),
        (lambda d: d / "afile" / "report.html", "is a file, not a folder"),
        (lambda d: d / "notes.html", "is not an HTML report headscope wrote"),
        (lambda d: d / "link.html", "is a symbolic link"),
        (lambda d: d / "fifo", "is not a regular file"),
        (lambda d: "", "empty report path"),
    ],
)
def test_refused_paths_touch_nothing(tiny_run, tmp_path, make, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "notes.html").write_text("<html>my notes</html>")
    (tmp_path / "link.html").symlink_to(tmp_path / "notes.html")
    os.mkfifo(tmp_path / "fifo")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HeadscopeError, match=expected) as info:
        write_html_report(tiny_run, make(tmp_path))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "notes.html").read_text() == "<html>my notes</html>"
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_report(tiny_run, tmp_path, monkeypatch, failure):
    out = tmp_path / "report.html"
    write_html_report(tiny_run, out)
    before = out.read_bytes()

    def fail(*args):
        raise failure

    monkeypatch.setattr(html_report.os, "fsync", fail)
    expected = HeadscopeError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        write_html_report(tiny_run, out)
    if expected is HeadscopeError:
        assert str(info.value) == f"cannot write {out}: No space left on device"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_a_damaged_run_writes_nothing(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "heads.parquet").write_bytes(b"PAR1")
    with pytest.raises(HeadscopeError, match="not a readable Parquet file"):
        write_html_report(run, tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------- the CLI


def _one_error_line(result) -> str:
    assert result.exit_code == 1 and type(result.exception) is SystemExit, repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("html_out", [False, True])
def test_the_cli_reports_a_damaged_run_in_one_line(tiny_run, tmp_path, html_out):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["tables"][1]["n_heads"] = "abc"
    (run / "manifest.json").write_text(json.dumps(manifest))
    args = ["report", str(run)] + (["--html", str(tmp_path / "r.html")] if html_out else [])
    line = _one_error_line(CliRunner().invoke(app, args))
    assert "field tables[1].n_heads must be a positive integer, got 'abc'" in line
    assert not (tmp_path / "r.html").exists()


def test_the_cli_never_overwrites_a_users_file(tiny_run, tmp_path):
    mine = tmp_path / "mine.html"
    mine.write_text("<p>mine</p>")
    result = CliRunner().invoke(app, ["report", str(tiny_run), "--html", str(mine)])
    assert "is not an HTML report headscope wrote" in _one_error_line(result)
    assert mine.read_text() == "<p>mine</p>"


def test_the_cli_prints_the_report_of_a_hostile_run(hostile_run):
    result = CliRunner().invoke(app, ["report", str(hostile_run)])
    assert result.exit_code == 0, result.output
    assert PAYLOADS[0] in result.stdout  # as text: the terminal shows what the run holds


def test_hostile_summaries_still_report(tiny_run, tmp_path):
    """A summary the report cannot format is one line in the report, not an error."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    damaged = copy.deepcopy(manifest)
    del damaged["tables"][1]["summary"]["sink_rate"]
    damaged["tables"][1]["params"]["epsilon"] = "<b>"
    (run / "manifest.json").write_text(json.dumps(damaged))
    document = _report(run)
    assert "first_token_sink on prose: not shown, its summary or params hold unexpected" in document
    assert "<b>" not in document
