"""The safety tables in every surface but the dashboard: the text report, the HTML
report, the figures, and exporting their heads; on the fake run of safety_fixtures."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
import statistics

import pytest
from rich.console import Console
from safety_fixtures import TOP_K, safety_tables, write_safety_run
from typer.testing import CliRunner

from headscope.ablation_spec import head_name, parse_head_name
from headscope.analyses.registry import GROUPS
from headscope.cli import app
from headscope.exporters.ablation import recorded_ablation
from headscope.html_report import build_html_report
from headscope.plots import figures_for
from headscope.report import build_report
from headscope.runs import open_run, write_run
from headscope.safety_summary import (
    change,
    generation_choices,
    is_safety,
    merged_checks,
    nats,
    random_draws,
    rate,
    safety_blocks,
)

runner = CliRunner()


def _text(renderable) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=400, color_system=None).print(renderable)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def safety_run(tmp_path_factory):
    return open_run(write_safety_run(tmp_path_factory.mktemp("safety") / "run"))


def _tables(run):
    return [*run.head_tables(), *run.layer_tables()]


def _expected_rows(run) -> list[str]:
    """What every report must show, read from the run itself."""
    ships = run.head_table("safety_ships")
    sahara = run.head_table("safety_sahara")
    refusal = run.head_table("refusal_direction")
    check = ships.params["generation_check"]
    rows = [f"{head_name(r.layer, r.head)} {r.score:.4g}" for r in ships.top(5).itertuples()]
    for h, angle in zip(sahara.params["group"], sahara.params["angles_by_step"], strict=True):
        rows.append(f"{h} {sahara.score(*parse_head_name(h)):.2f} {angle:.2f}")
    best = refusal.summary["best_layer"]
    rows.append(f"best layer L{best}")
    p = refusal.params
    rows.append(f"clean {rate(p['clean_refusal'])}, with the L{best} direction ablated at every "
                f"layer {rate(p['direction_ablation_refusal'])}")  # fmt: skip
    rows += [f"{head_name(r.layer, r.head)} {r.score:.4g}" for r in refusal.top(5).itertuples()]
    rows.append(f"clean - {rate(check['clean']['harmful_refusal'])}")
    for k, verdict in check["verdict"].items():
        draws = [c["harmful_refusal"] for c in check["conditions"]
                 if c["kind"] == "random" and c["k"] == int(k)]  # fmt: skip
        rows.append(f"top-{k} ")
        rows.append(f"leaves {rate(verdict['top_harmful_refusal'])} of harmful prompts refused")
        rows.append(f"min {rate(min(draws))}, median {rate(statistics.median(draws))}")
        rows.append(f"harmless refusal changes by {change(verdict['harmless_change'])}")
        rows.append(f"the clean harmless answers' NLL by "
                    f"{nats(verdict['harmless_nll_change'], signed=True)} nats/token")  # fmt: skip
        holds = "the claim HOLDS" if verdict["claim_holds"] else "the claim does not hold"
        close = "stays close" if verdict["harmless_close"] else "does NOT stay close"
        rows.append(f"harmless behaviour {close} to clean")
        rows.append(holds)
    return rows


def _squeeze(text: str) -> str:
    """Table cells joined by single spaces, so rows can be matched across borders."""
    for border in "│┃|":
        text = text.replace(border, " ")
    return " ".join(text.split())


def test_the_safety_group_is_registered():
    assert "safety" in GROUPS


def test_text_report_shows_ships_sahara_refusal_and_the_generation_check(safety_run):
    text = _squeeze(_text(build_report(safety_run.manifest, _tables(safety_run))))
    for row in _expected_rows(safety_run):
        assert _squeeze(row) in text, row
    assert "below every one of 5 random draws of 3 heads" in text
    assert "NOT below every" not in text
    # the fixture's top-1 head keeps harmless answers close to clean, its top-3 heads do not
    assert "k=1: ablating top-1" in text and "k=3: ablating top-3" in text
    assert text.count("the claim HOLDS") == 1 and text.count("the claim does not hold") == 1


def test_the_verdict_says_when_the_top_heads_do_no_better_than_chance(tmp_path):
    run = open_run(write_safety_run(tmp_path / "run", below=False))
    check = run.head_table("safety_ships").params["generation_check"]
    assert not check["verdict"][str(TOP_K)]["top_below_every_random"]
    text = _squeeze(_text(build_report(run.manifest, _tables(run))))
    assert f"ablating top-{TOP_K} ({TOP_K} heads) leaves" in text
    assert "NOT below every one of 5 random draws of 3 heads" in text


def test_report_top_limits_the_heads_listed(safety_run):
    ships = safety_run.head_table("safety_ships")
    text = _squeeze(_text(build_report(safety_run.manifest, _tables(safety_run), top=2)))
    ranked = [head_name(r.layer, r.head) for r in ships.top(3).itertuples()]
    assert f"{ranked[1]} {ships.top(2)['score'].iloc[1]:.4g}" in text
    third = f"{ranked[2]} {ships.top(3)['score'].iloc[2]:.4g} yes"
    assert third not in text


def test_html_report_has_the_safety_rows_and_figures(safety_run):
    document = build_html_report(safety_run.manifest, _tables(safety_run))
    cells = _squeeze(html.unescape(document.replace("</td><td>", " ").replace("</th><th>", " ")))
    for row in _expected_rows(safety_run):
        assert _squeeze(row) in cells, row
    titles = _figure_titles(document)
    assert any(t.startswith("Sahara group on") for t in titles)
    assert any(t.startswith("refusal direction by layer") for t in titles)
    assert sum(t.startswith("refusal under ablation") for t in titles) == 1


def _figure_titles(document: str) -> list[str]:
    """The title of every figure (each is drawn by ``Plotly.newPlot("figure-i", data, layout``)."""
    decoder, titles = json.JSONDecoder(), []
    for chunk in re.split(r'Plotly\.newPlot\(\s*"figure-', document)[1:]:
        rest = chunk[chunk.index(",") + 1 :].lstrip()
        _, end = decoder.raw_decode(rest)
        layout, _ = decoder.raw_decode(rest[end:].lstrip().removeprefix(",").lstrip())
        titles.append(layout["title"]["text"])
    return titles


def test_figures_for_each_safety_table(safety_run):
    counts = {t.detector: len(figures_for(t)) for t in safety_run.head_tables()}
    # Ships: heatmap + refusal rates; Sahara: steps + heatmap; refusal: heatmap + by layer
    assert counts == {"safety_ships": 2, "safety_sahara": 2, "refusal_direction": 2}
    rates = figures_for(safety_run.head_table("safety_ships"))[-1]
    check = safety_run.head_table("safety_ships").params["generation_check"]
    boxes = [t for t in rates.data if t.type == "box"]
    assert sorted(v for b in boxes for v in b.y) == sorted(
        c["harmful_refusal"] for c in check["conditions"] if c["kind"] == "random"
    )
    bars = next(t for t in rates.data if t.type == "bar")
    assert list(bars.x)[:1] == ["clean"] and "sahara" in list(bars.x)


def test_a_hand_edited_safety_table_is_one_line(tmp_path):
    ships, sahara, refusal = safety_tables()
    broken = dataclasses.replace(sahara, params={**sahara.params, "angles_by_step": [1.0]})
    run = open_run(write_run(tmp_path / "run", manifest={}, head_tables=[ships, broken, refusal]))
    text = _text(build_report(run.manifest, _tables(run)))
    assert "safety_sahara on harmful-train: not shown" in text
    assert "3 heads in the group but 1 angles by step" in text
    assert "best layer L1" in text  # the other sections are still there
    document = build_html_report(run.manifest, _tables(run))
    assert "safety_sahara on harmful-train: not shown" in html.unescape(document)


def test_a_run_without_groups_still_finds_its_safety_tables(tmp_path):
    tables = [dataclasses.replace(t, group="") for t in safety_tables()]
    assert all(is_safety(t) for t in tables)
    assert [b.title.split(" ")[0] for b in safety_blocks(tables[1])] == ["Sahara"]


# --------------------------------------------------------------------------- export


def test_exporting_a_safety_role_ablates_its_top_heads_by_query_scaling(safety_run, tmp_path):
    ships = safety_run.head_table("safety_ships")
    assert recorded_ablation(safety_run.path, "safety_ships") == ("query_scale", 1e-5)
    assert recorded_ablation(safety_run.path, "refusal_direction") is None  # records none
    out = tmp_path / "ablation"
    result = runner.invoke(app, ["export", "ablation", "--from", str(safety_run.path), "--role",
                                 "safety_ships", "--top", "3", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "ablation.json").read_text())
    expected = [[int(r.layer), int(r.head)] for r in ships.top(3).itertuples()]
    assert spec["heads"] == expected and spec["method"] == "query_scale"
    assert spec["epsilon"] == pytest.approx(1e-5)
    assert not (out / "checkpoint").exists()  # query scaling has no weight-only form
    assert "as safety_ships in" in result.output


def test_an_explicit_method_wins_over_the_recorded_one(safety_run, tmp_path):
    out = tmp_path / "zero"
    result = runner.invoke(app, ["export", "ablation", "--from", str(safety_run.path), "--role",
                                 "safety_sahara", "--top", "2", "--method", "zero",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "ablation.json").read_text())
    sahara = safety_run.head_table("safety_sahara")
    assert spec["method"] == "zero"
    assert spec["heads"] == [[int(r.layer), int(r.head)] for r in sahara.top(2).itertuples()]
    assert (out / "checkpoint").is_dir()


def test_checks_run_the_same_way_share_one_chart(safety_run):
    ships = safety_run.head_table("safety_ships").params["generation_check"]
    randoms = [c for c in ships["conditions"] if c["kind"] == "random"]
    sahara = {**ships, "conditions": [
        {"name": "sahara", "kind": "sahara", "k": 2, "draw": None, "heads": ["L0H0", "L0H1"],
         "harmful_refusal": 0.5, "harmless_refusal": 0.0},
        randoms[0],  # the same draw (same seed): counted once
        {**randoms[0], "heads": ["L0H0"], "harmful_refusal": 0.3},  # a new draw
    ], "generations": [{"condition": "sahara", "set": "harmful", "request": "r", "text": "t",
                        "refused": False}]}  # fmt: skip
    without_sahara = [{**c} for c in ships["conditions"] if c["kind"] != "sahara"]
    ships = {**ships, "conditions": without_sahara}
    (merged,) = merged_checks([ships, sahara])
    assert [c["name"] for c in merged["conditions"]].count("sahara") == 1
    k = randoms[0]["k"]
    assert sorted(random_draws(merged)[k]) == sorted(
        [c["harmful_refusal"] for c in randoms if c["k"] == k] + [0.3]
    )
    assert "sahara" in generation_choices(merged)[0]
    elsewhere = {**sahara, "harmful_set": "another-set"}
    assert len(merged_checks([ships, elsewhere])) == 2
