"""Figures (headscope.plots) and the static HTML report, on a run of a tiny model."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import plotly.graph_objects as go
import pytest
from typer.testing import CliRunner

from headscope.analyses import get_detector
from headscope.cli import app
from headscope.html_report import build_html_report
from headscope.plots import (
    attention_pattern,
    drop_curves,
    family_scatter,
    figures_for,
    head_heatmap,
    layer_bars,
    role_census,
)
from headscope.probes.loading import load_model
from headscope.runs import open_run
from headscope.scanning import scan
from headscope.tables import HeadTable, LayerTable


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "run"
    scan(
        "tiny:llama:3", prompts="prose,random-repeat",
        detectors="previous_token,induction,first_token_sink,layer_redundancy,head_families",
        n_prompts=4, out=path, on_progress=False,
    )  # fmt: skip
    return open_run(path)


@pytest.fixture(scope="module")
def drop_table():
    return get_detector("drop_simulation").run_experiment(
        load_model("tiny:llama:3"), calibration_prompts_n=2, held_out_prompts=2,
        max_attention_drops=2, max_block_drops=1, n_points=3, n_random=2,
    )  # fmt: skip


def test_head_heatmap_holds_every_score_and_outlines_the_flagged(run):
    table = run.head_table("first_token_sink", "prose")
    flagged = table.frame.copy()
    flagged.loc[[0, 5], "flagged"] = True
    table = HeadTable(frame=flagged, detector=table.detector, prompt_set=table.prompt_set,
                      n_layers=table.n_layers, n_heads=table.n_heads)  # fmt: skip
    figure = head_heatmap(table)
    heat = figure.data[0]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), table.matrix())
    assert len(heat.y) == 3 and len(heat.x) == 4
    outline = figure.data[1]
    assert len(outline.x) == 2 and outline.name == "flagged"


def test_layer_bars_colour_flagged_layers(run):
    table = next(t for t in run.layer_tables() if t.detector == "llm_drop_attention")
    figure = layer_bars(table)
    bars = figure.data[0]
    assert list(bars.y) == table.frame.sort_values("layer")["score"].tolist()
    assert sum(color == "#d62728" for color in bars.marker.color) == int(table.frame.flagged.sum())


def test_drop_curves_draw_every_order_of_both_kinds(drop_table):
    figure = drop_curves(drop_table)
    names = {trace.name for trace in figure.data}
    assert {"similarity", "similarity_iterative", "block_influence", "random (mean)",
            "random (median)"} <= names  # fmt: skip
    curves = drop_table.summary["curves"]
    first = next(t for t in figure.data if t.name == "similarity")
    assert list(first.y) == pytest.approx(curves["attention"]["similarity"]["perplexity"])
    assert figure.layout.yaxis.type == "log"


def test_family_scatter_places_every_head(run):
    table = run.head_table("head_families")
    figure = family_scatter(table)
    assert sum(len(trace.x) for trace in figure.data) == len(table.frame)
    assert len(figure.data) == table.summary["n_families"]


def test_census_and_pattern(run):
    tables = [*run.head_tables(), *run.layer_tables()]
    census = role_census(tables)
    assert len(census.data[0].y) == len([t for t in tables if t.detector != "head_families"])
    pattern = np.tril(np.ones((5, 5))) / np.arange(1, 6)[:, None]
    figure = attention_pattern(pattern, ["a", "b", "a", "c", "d"])
    assert figure.data[0].x[2] == "2:a"  # positions keep repeated tokens apart


def test_every_table_of_a_run_has_figures(run, drop_table):
    for table in [*run.head_tables(), *run.layer_tables(), drop_table]:
        figures = figures_for(table)
        assert figures and all(isinstance(f, go.Figure) for f in figures), table.detector
    assert figures_for(drop_table)[0].layout.title.text.startswith("drop simulation")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.scripts, self.headings = [], 0, []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("id", "").startswith("figure-"):
            self.ids.append(attrs["id"])
        self.scripts += tag == "script"
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_html_report_holds_every_figure_once_with_plotly_inlined(run, drop_table):
    tables = [*run.head_tables(), *run.layer_tables(), drop_table]
    document = build_html_report(run.manifest, tables)
    parser = _Collector()
    parser.feed(document)
    expected = 1 + sum(len(figures_for(t)) for t in tables)  # + the census
    assert len(parser.ids) == expected == len(set(parser.ids))
    assert document.count("Plotly.newPlot") == expected
    assert document.count("plotly.js v") == 1  # the library once, inlined (works offline)
    assert "{figure" not in document
    assert "drop_simulation on prose-heldout" in parser.headings
    assert parser.headings.index("first_token_sink on prose") < parser.headings.index(
        "first_token_sink on random-repeat"
    )  # the detector's primary set first


def test_cli_writes_the_html_report(run, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run.path), "--html", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "headscope report: tiny:llama:3" in text


def test_tables_render_in_jupyter(run):
    table = run.head_table("induction", "random-repeat")
    assert "<table" in table._repr_html_() and "induction" in table._repr_html_()
    layer = next(t for t in run.layer_tables() if isinstance(t, LayerTable))
    assert "<table" in layer._repr_html_()
