"""The CLI end to end on a tiny model, and every bad input it must refuse cleanly."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from headscope.cli import app

runner = CliRunner()
FAST = ["--model", "tiny:llama", "--n-prompts", "4", "--seq-len", "17"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, expected):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
    # an uncaught exception lands here as itself, not as the SystemExit of typer.Exit(1);
    # a bug the CLI catches says "internal error"
    assert result.exit_code == 1 and type(result.exception) is SystemExit, repr(result.exception)
    assert "internal error" not in lines[0], lines[0]


def test_scan_report_and_runs(tmp_path):
    out = tmp_path / "runs" / "tiny"
    result = invoke("scan", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["spec"] == "tiny:llama"
    assert [p["name"] for p in manifest["prompt_sets"]] == [
        "prose",
        "code",
        "random-tokens",
        "random-repeat",
        "repeated-token",
    ]
    assert "first_token_sink" in result.stdout and "induction" in result.stdout
    report = invoke("report", out)
    assert report.exit_code == 0 and "Sink_1" in report.stdout
    head_names = re.findall(r"L(\d+)H(\d+)\s", report.stdout)
    assert len(head_names) >= 5 * 4  # top 5 of each of the four detectors
    assert all(int(layer) < 2 and int(head) < 4 for layer, head in head_names)
    # the sink suite: layer tables, the window experiment, and a skip that says why
    assert "Attention sinks" in report.stdout and "residual_peak on prose" in report.stdout
    assert "skipped massive_intervention: no massive activations" in report.stdout
    kinds = {(t["detector"], t["kind"]) for t in manifest["tables"]}
    assert {("massive_activations", "layer"), ("streaming_window", "head")} <= kinds
    sinks = invoke("report", out, "--sinks", "--markdown")
    assert sinks.exit_code == 0
    lines = sinks.stdout.strip().splitlines()
    assert lines[:2] == ["| quantity | value |", "|---|---|"]
    assert any(line.startswith("| prose-long perplexity past the window") for line in lines)
    listing = invoke("runs", tmp_path / "runs")
    assert listing.exit_code == 0 and "tiny" in listing.stdout
    models = invoke("models")
    assert models.exit_code == 0 and "smollm2-135m" in models.stdout


def test_existing_output_is_refused_unless_forced(tmp_path):
    out = tmp_path / "run"
    assert invoke("scan", *FAST, "--prompts", "prose", "--out", out).exit_code == 0
    before = (out / "manifest.json").read_text()
    assert_clean_failure(invoke("scan", *FAST, "--prompts", "prose", "--out", out), "already holds")
    assert (out / "manifest.json").read_text() == before
    forced = invoke("scan", *FAST, "--prompts", "code", "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "manifest.json").read_text())["prompt_sets"][0]["name"] == "code"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "no-such-model"], "unknown model spec"),
        (["--model", "{tmp}/missing.gguf"], "does not exist"),
        (["--model", "{tmp}/corrupt.gguf"], "cannot read GGUF file"),
        (["--model", "tiny:llama", "--prompts", "{tmp}/empty.txt"], "no prompts"),
        (["--model", "tiny:llama", "--prompts", "no-such-set"], "unknown prompt set"),
        (["--model", "tiny:llama", "--detectors", "previous_token,nope"], "unknown detector"),
    ],
)
def test_bad_inputs_fail_cleanly_and_leave_no_run(tmp_path, monkeypatch, args, expected):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00\xff" * 500)
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("scan", *args, "--out", out)
    assert_clean_failure(result, expected)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
