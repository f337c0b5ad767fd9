"""Every dashboard page under Streamlit's AppTest, on runs made from tiny models.

AppTest runs the script in-process: no exception may surface, the expected
widgets and figures must be there, and a damaged run must give an error panel
rather than a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safety_fixtures import safety_tables, write_safety_run
from streamlit.testing.v1 import AppTest

from headscope.analyses import get_detector
from headscope.dashboard.data import RUNS_DIR_ENV, md
from headscope.probes.loading import load_model
from headscope.runs import open_run, write_run
from headscope.scanning import scan
from headscope.text import plain

APP = str(Path(__file__).parents[2] / "headscope" / "dashboard" / "app.py")
PAGES = ("runs", "overview", "head", "sinks", "roles", "redundancy", "safety", "export")
DETECTORS = (
    "previous_token,induction,first_token_sink,hidden_sink,massive_activations,"
    "layer_redundancy,head_families"
)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard") / "runs"
    scan("tiny:llama:3", prompts="prose,random-repeat", detectors=DETECTORS, n_prompts=4,
         out=root / "llama", on_progress=False)  # fmt: skip
    scan("tiny:gpt2:3", prompts="prose", detectors="first_token_sink,layer_redundancy",
         n_prompts=4, out=root / "gpt2", on_progress=False)  # fmt: skip
    # a run with a drop simulation, written as scan writes runs
    llama = open_run(root / "llama")
    simulation = get_detector("drop_simulation").run_experiment(
        load_model("tiny:llama:3"), calibration_prompts_n=2, held_out_prompts=2,
        max_attention_drops=2, max_block_drops=1, n_points=3, n_random=2,
    )  # fmt: skip
    write_run(
        root / "llama-drops", manifest=llama.manifest, head_tables=llama.head_tables(),
        layer_tables=[*llama.layer_tables(), simulation], tensors=llama.tensors(),
    )  # fmt: skip
    return root


def _app(runs_dir: Path, monkeypatch, run: str | None = "llama") -> AppTest:
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs_dir))
    at = AppTest.from_file(APP, default_timeout=60)
    if run is not None:
        at.session_state["run"] = str((runs_dir / run).resolve())
    return at


def _visit(at: AppTest, page: str) -> AppTest:
    at.run()
    if page != "runs":
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _charts(at: AppTest) -> list:
    return at.get("plotly_chart")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_errors(runs_dir, monkeypatch, page):
    at = _visit(_app(runs_dir, monkeypatch), page)
    assert not at.error, [e.value for e in at.error]
    assert at.title, page


def test_runs_page_lists_and_compares_runs(runs_dir, monkeypatch):
    at = _visit(_app(runs_dir, monkeypatch), "runs")
    assert len(at.dataframe[0].value) == 3
    assert at.selectbox(key="compare_run").value.endswith(("gpt2", "llama-drops"))
    assert len(_charts(at)) == 2  # side-by-side heatmaps of a shared table


def test_overview_draws_the_census_and_a_heatmap_per_head_table(runs_dir, monkeypatch):
    at = _visit(_app(runs_dir, monkeypatch), "overview")
    run = open_run(runs_dir / "llama")
    expected = 1 + len(run.head_tables()) + len(run.layer_tables())
    assert len(_charts(at)) == expected
    assert [m.value for m in at.metric][:3] == ["3", "4", "2"]


def test_head_page_shows_scores_profiles_and_the_sample_pattern(runs_dir, monkeypatch):
    at = _app(runs_dir, monkeypatch)
    at.session_state["head"] = "L2H1"
    at = _visit(at, "head")
    assert at.title[0].value == "Head L2H1"
    scores = at.dataframe[0].value
    assert set(scores["detector"]) >= {"previous_token", "induction", "first_token_sink"}
    assert len(_charts(at)) == 3  # a statistic profile, the α_0 histogram, the sample pattern
    at.toggle(key="decode").set_value(True).run()
    assert not at.exception and not at.error
    before = list(_visit(_app(runs_dir, monkeypatch), "head").dataframe[1].value["token"])
    assert all(t.isdigit() for t in before)  # token ids until decoding is asked for
    assert not all(t.isdigit() for t in at.dataframe[1].value["token"])
    at.text_input[0].input("one two three one two")
    at.button[0].click().run()  # the form's submit: the pattern through the bridge
    assert not at.exception and not at.error
    assert len(_charts(at)) == 4


def test_redundancy_page_draws_the_drop_curves_when_present(runs_dir, monkeypatch):
    at = _visit(_app(runs_dir, monkeypatch, run="llama-drops"), "redundancy")
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in _charts(at)]
    assert any(t.startswith("drop simulation") for t in titles)
    plain = _visit(_app(runs_dir, monkeypatch, run="gpt2"), "redundancy")
    assert any("No drop simulation" in c.value for c in plain.caption)


def test_export_page_previews_a_spec_and_the_command(runs_dir, monkeypatch):
    at = _visit(_app(runs_dir, monkeypatch), "export")
    at.multiselect[0].select("L1H2").run()
    assert "headscope export ablation L1H2 --model tiny:llama:3" in at.code[0].value
    assert at.json[0].value
    at.radio[0].set_value("pruned model").run()
    at.multiselect[0].select(1).run()
    assert "--attn-layers 1" in at.code[0].value


def test_a_damaged_run_gives_an_error_panel_not_a_traceback(runs_dir, monkeypatch, tmp_path):
    broken = tmp_path / "runs"
    broken.mkdir()
    copy = broken / "broken"
    copy.mkdir()
    (copy / "manifest.json").write_text((runs_dir / "llama" / "manifest.json").read_text())
    (copy / "heads.parquet").write_bytes(b"not parquet")
    at = _visit(_app(broken, monkeypatch, run="broken"), "overview")
    assert at.error and "Cannot read the run" in at.error[0].value


def test_no_runs_is_explained(monkeypatch, tmp_path):
    at = _visit(_app(tmp_path, monkeypatch, run=None), "runs")
    assert any("No runs under" in i.value for i in at.info)


# --------------------------------------------------------------------------- safety


@pytest.fixture(scope="module")
def safety_runs(tmp_path_factory):
    """The fake safety run (tests/safety_fixtures.py), one whose Sahara params are
    hand-edited wrong, and one without safety tables; no model is run."""
    import dataclasses

    root = tmp_path_factory.mktemp("safety") / "runs"
    write_safety_run(root / "safety")
    ships, sahara, refusal = safety_tables()
    broken = dataclasses.replace(sahara, params={**sahara.params, "angles_by_step": [1.0]})
    write_run(root / "broken-sahara", manifest={"model": {"spec": "tiny:llama:3"}},
              head_tables=[ships, broken, refusal])  # fmt: skip
    check = {**ships.params["generation_check"], "judge": MARKUP,
             "harmful_set": f"harmful {MARKUP}"}  # fmt: skip
    hostile = [dataclasses.replace(t, prompt_set=f"set {MARKUP}", description=MARKUP)
               for t in (dataclasses.replace(ships, params={**ships.params,
                                                            "generation_check": check}),
                         sahara, refusal)]  # fmt: skip
    write_run(root / "markup", manifest={"model": {"spec": "tiny:llama:3"}}, head_tables=hostile)
    plain_table = dataclasses.replace(ships, detector="previous_token", group="roles",
                                      params={}, summary={})  # fmt: skip
    write_run(root / "no-safety", manifest={"model": {"spec": "tiny:llama:3"}},
              head_tables=[plain_table])  # fmt: skip
    return root


def test_safety_page_draws_every_safety_table_and_the_generation_check(safety_runs, monkeypatch):
    from headscope.safety_summary import rate

    at = _visit(_app(safety_runs, monkeypatch, run="safety"), "safety")
    assert not at.error, [e.value for e in at.error]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in _charts(at)]
    assert len(titles) == 5, titles  # Ships and refusal heatmaps, Sahara steps, by layer, rates
    assert any(t.startswith("Sahara group") for t in titles)
    assert any(t.startswith("refusal direction by layer") for t in titles)
    rates = next(c for c in _charts(at) if "refusal rate under ablation" in c.proto.spec)
    traces = json.loads(rates.proto.spec)["data"]
    run = open_run(safety_runs / "safety")
    check = run.head_table("safety_ships").params["generation_check"]
    boxes = [t for t in traces if t["type"] == "box"]
    draws = [c["harmful_refusal"] for c in check["conditions"] if c["kind"] == "random"]
    assert sorted(v for b in boxes for v in b["y"]) == sorted(draws)  # every random draw
    ships = at.dataframe[0].value
    top = run.head_table("safety_ships").top(5)
    assert list(ships["Ships (nats)"]) == [f"{s:.4g}" for s in top["score"]]
    sahara = at.dataframe[1].value
    assert list(sahara["head added"]) == run.head_table("safety_sahara").params["group"]
    verdict = " ".join(_shown_text(m.value) for m in at.markdown)
    for k, v in check["verdict"].items():
        assert f"k={k}: ablating top-{k} ({k} head" in verdict
        assert f"{rate(v['top_harmful_refusal'])} of harmful prompts refused" in verdict
    at.selectbox(key="gen_condition_0").set_value("top-3").run()
    at.selectbox(key="gen_set_0").set_value("harmless").run()
    shown = at.dataframe[-1].value
    expected = [g for g in check["generations"]
                if g["condition"] == "top-3" and g["set"] == "harmless"]  # fmt: skip
    assert list(shown["request"]) == [g["request"] for g in expected]
    assert list(shown["refused"]) == [g["refused"] for g in expected]


def test_export_page_defaults_to_the_ablation_a_safety_table_was_scored_with(
    safety_runs, monkeypatch
):
    at = _visit(_app(safety_runs, monkeypatch, run="safety"), "export")
    assert "safety_ships" in at.selectbox[0].options  # the safety tables are offered
    at.selectbox[0].set_value("safety_ships").run()
    ships = open_run(safety_runs / "safety").head_table("safety_ships")
    heads = ",".join(f"L{r.layer}H{r.head}" for r in ships.top(3).itertuples())
    assert at.selectbox[1].value == "query_scale"
    assert f"headscope export ablation {heads} --model tiny:llama:3 --method query_scale" in (
        at.code[0].value
    )


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_the_safety_run(safety_runs, monkeypatch, page):
    at = _visit(_app(safety_runs, monkeypatch, run="safety"), page)
    assert not at.error, [e.value for e in at.error]


def test_safety_page_shows_run_strings_as_text(safety_runs, monkeypatch):
    at = _visit(_app(safety_runs, monkeypatch, run="markup"), "safety")
    assert not at.error, [e.value for e in at.error]
    strings = _run_strings(at)
    for value in strings:
        _renders_literally(value)
    shown = " ".join(_shown_text(v) for v in strings)
    assert f"Ships on set {MARKUP}" in shown and f"refused: {MARKUP}" in shown


def test_safety_page_survives_a_hand_edited_table(safety_runs, monkeypatch):
    at = _visit(_app(safety_runs, monkeypatch, run="broken-sahara"), "safety")
    assert len(at.error) == 1 and "safety_sahara" in _shown_text(at.error[0].value)
    assert len(_charts(at)) == 4  # the rest of the page is drawn


def test_safety_page_without_safety_tables_gives_the_command(safety_runs, monkeypatch):
    from headscope.safety_summary import SCAN_COMMAND

    at = _visit(_app(safety_runs, monkeypatch, run="no-safety"), "safety")
    assert not at.error
    assert any(SCAN_COMMAND in i.value for i in at.info)
    assert at.code[0].value == SCAN_COMMAND
    roles = _visit(_app(safety_runs, monkeypatch, run="safety"), "roles")
    assert any("no role detectors" in i.value for i in roles.info)  # safety has its own page


# --------------------------------------------------------------------------- run strings

MARKUP = "**bold** [x](javascript:alert(1)) <b>x</b> `code` :red[red] $x$"
#: elements that render Markdown; every run string in them must show as typed
MARKDOWN_ELEMENTS = ("title", "header", "subheader", "caption", "markdown", "info", "warning",
                     "error", "success")  # fmt: skip


def _as_html(markdown: str) -> str:
    """CommonMark with raw HTML let through: stricter than Streamlit, which drops raw HTML."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    return parser.render(markdown)


def _shown_text(markdown: str) -> str:
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", _as_html(markdown)))


def _renders_literally(value: str) -> None:
    rendered = _as_html(value)
    for formed in ("<strong", "<em", "<a ", "<b>", "<code", "<img"):
        assert formed not in rendered, (value, rendered)


def _run_strings(at: AppTest) -> list[str]:
    """Every Markdown-rendered string of the page that came from the run."""
    values = [e.value for kind in MARKDOWN_ELEMENTS for e in getattr(at, kind)]
    values += [tab.label for tab in at.tabs]
    return [v for v in values if "bold" in v]


@pytest.fixture(scope="module")
def markup_runs(runs_dir, tmp_path_factory):
    """A run whose model spec, run name, prompt sets, descriptions and skips are Markdown
    and HTML, beside a plain one (so the Runs page compares the two)."""
    import copy
    import dataclasses

    root = tmp_path_factory.mktemp("markup") / "runs"
    llama = open_run(runs_dir / "llama")
    manifest = copy.deepcopy(llama.manifest)

    def rename(name):
        return f"{name} {MARKUP}"

    manifest["model"]["spec"] = f"spec {MARKUP}"
    for prompt_set in manifest["prompt_sets"]:
        prompt_set["name"], prompt_set["description"] = rename(prompt_set["name"]), MARKUP
    for detector in manifest["detectors"]:
        if detector.get("primary_prompt_set"):
            detector["primary_prompt_set"] = rename(detector["primary_prompt_set"])
    manifest["skipped"] = [{"detector": MARKUP, "reason": MARKUP}]

    def hostile(table):
        return dataclasses.replace(table, prompt_set=rename(table.prompt_set), description=MARKUP)

    name = "**bold** [x](javascript:alert(1))"
    write_run(
        root / name, manifest=manifest, head_tables=[hostile(t) for t in llama.head_tables()],
        layer_tables=[hostile(t) for t in llama.layer_tables()], tensors=llama.tensors(),
        samples={f"sample {name}": llama.samples(llama.sample_names()[0])},
    )  # fmt: skip
    shutil.copytree(runs_dir / "llama", root / "plain")
    return root, name


@pytest.mark.parametrize("page", PAGES)
def test_run_strings_render_as_text_not_markdown(markup_runs, monkeypatch, page):
    root, name = markup_runs
    at = _visit(_app(root, monkeypatch, run=name), page)
    assert not at.error, [e.value for e in at.error]
    strings = _run_strings(at)
    for value in strings:
        _renders_literally(value)
    shown = " ".join(_shown_text(v) for v in strings)
    expected = {
        "overview": [f"Overview: spec {MARKUP}", f"skipped {MARKUP}: {MARKUP}"],
        "sinks": [MARKUP],  # the tables' descriptions
        "roles": [MARKUP],
        "redundancy": [MARKUP],
        "runs": [name],  # the compared runs' names
    }.get(page, [])
    for text in expected:
        assert text in shown, (text, shown)


def test_a_damaged_run_is_one_error_line_on_every_page(runs_dir, monkeypatch, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "llama", root / "bad-field")
    manifest = json.loads((root / "bad-field" / "manifest.json").read_text())
    manifest["tables"][0]["n_heads"] = f"abc {MARKUP}"
    (root / "bad-field" / "manifest.json").write_text(json.dumps(manifest))
    for page in PAGES[1:]:
        at = _visit(_app(root, monkeypatch, run="bad-field"), page)
        assert len(at.error) == 1, page
        _renders_literally(at.error[0].value)
        assert "must be a positive integer, got 'abc **bold**" in _shown_text(at.error[0].value)


def test_a_sample_without_patterns_is_an_error_line(runs_dir, monkeypatch, tmp_path):
    import safetensors.torch
    import torch

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "llama", root / "odd-sample")
    for sample in (root / "odd-sample" / "samples").glob("*.safetensors"):
        safetensors.torch.save_file({"tokens": torch.zeros(3, 3, dtype=torch.int64)}, sample)
    at = _app(root, monkeypatch, run="odd-sample")
    at.session_state["head"] = "L2H1"
    at = _visit(at, "head")
    assert len(at.error) == 1 and "does not hold a pattern" in _shown_text(at.error[0].value)
    assert at.subheader[-1].value == "Attention on your own prompt"  # the rest of the page


@settings(max_examples=300, deadline=None)
@given(
    text=st.text()
    | st.text(alphabet=st.sampled_from(list("*_[]()<>`!#-+=|~:$&;\\ /.a1\n\t")), max_size=30)
)
def test_md_shows_any_text_as_typed(text):
    assert _shown_text(md(text)).strip() == plain(text)
