"""The registry, walked whole: every detector is held to its declaration.

A detector added to ``headscope/analyses/__init__.py`` is picked up here with
no edit: it must run on a tiny model (or raise ``NotApplicable`` with a
reason), its tables must carry its name and group, and its defaults must
survive a run on disk. ``SMALL`` only shrinks the slow experiments' workloads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from headscope.analyses import all_detectors, get_detector
from headscope.analyses.registry import GROUPS, Detector, register_detector
from headscope.errors import NotApplicable
from headscope.probes.loading import load_model
from headscope.runs import open_run, write_run
from headscope.tables import HeadTable, LayerTable

#: smaller workloads for experiments that run many forwards by default
SMALL = {
    "massive_intervention": {},
    "streaming_window": {"window": 8, "seq_len": 32},
    "streaming_window_long": {"cache_size": 8, "seq_len": 40, "bucket": 16},
    "head_importance": {"n_prompts": 2, "reference_prompts": 2},
    "successor": {"reference_prompts": 2, "n_random": 2, "prompts_per_task": 4},
    "layer_redundancy": {"n_prompts": 4},
    "drop_simulation": {
        "calibration_prompts_n": 2, "held_out_prompts": 2, "max_attention_drops": 2,
        "max_block_drops": 1, "n_points": 3, "n_random": 2,
    },
}  # fmt: skip
PROMPT_SETS = ("prose", "code")
#: detectors that need what random weights lack (tests/unit/test_sinks.py plants it)
NEEDS_TRAINED_WEIGHTS = {"massive_intervention": "no massive activations"}


@pytest.fixture(scope="module", params=["tiny:llama", "tiny:bert"])
def tiny(request):
    """A tiny model with the streaming and pattern statistics of two short prompt sets."""
    from headscope.probes.patterns import probe_patterns
    from headscope.probes.streaming import probe_streaming

    handle = load_model(request.param)
    stats = {}
    for name in PROMPT_SETS:
        prompts = handle.tokenize(name, 4)
        stats[name] = {
            "streaming": probe_streaming(handle, prompts, batch_size=4),
            "patterns": probe_patterns(handle, prompts, batch_size=4),
        }
    return handle, stats


def _run(detector: Detector, handle, stats) -> list[HeadTable | LayerTable]:
    """The detector's tables, called the way a scan calls it."""
    streaming = {name: s["streaming"] for name, s in stats.items()}
    params = SMALL.get(detector.name, {})
    if detector.capture == "model":
        found = detector.run_experiment(handle, stats_by_set=streaming, batch_size=4, **params)
    elif detector.capture == "tables":
        found = detector.run_tables([], streaming, **params)
    elif detector.across_prompt_sets:
        found = detector.run({name: s[detector.capture] for name, s in stats.items()}, **params)
    else:
        found = detector.run(stats["prose"][detector.capture], **params)
    return found if isinstance(found, list) else [found]


@pytest.mark.parametrize("detector", all_detectors(), ids=lambda d: d.name)
def test_every_detector_runs_names_its_tables_and_keeps_its_defaults(detector, tiny, tmp_path):
    handle, stats = tiny
    try:
        tables = _run(detector, handle, stats)
    except NotApplicable as why:
        # an encoder may be out of a detector's reach, random weights out of a few's;
        # either way the detector must say why
        expected = NEEDS_TRAINED_WEIGHTS.get(detector.name, "not causal")
        assert not handle.arch.causal or expected in str(why), why
        assert len(str(why)) > 10
        return
    assert tables and detector.group in GROUPS
    assert {t.detector for t in tables} <= set(detector.table_names)
    assert all(t.group == detector.group for t in tables)
    assert all(t.n_layers == handle.arch.n_layers for t in tables)

    manifest = {"detectors": [{"name": detector.name, "params": dict(detector.defaults)}]}
    heads = [t for t in tables if isinstance(t, HeadTable)]
    layers = [t for t in tables if isinstance(t, LayerTable)]
    written = write_run(tmp_path / "run", manifest=manifest, head_tables=heads, layer_tables=layers)
    run = open_run(written)
    back = [*run.head_tables(), *run.layer_tables()]
    assert [(t.detector, t.group, t.prompt_set) for t in back] == [
        (t.detector, t.group, t.prompt_set) for t in [*heads, *layers]
    ]
    stored = run.manifest["detectors"][0]["params"]
    assert stored == json.loads(json.dumps(dict(detector.defaults)))  # plain JSON, no str()
    assert set(stored) == set(detector.defaults)


def test_every_detector_declares_its_parameters_in_its_signature():
    import inspect

    passed_by_the_scan = {"stats_by_set", "batch_size", "on_progress"}
    for detector in all_detectors():
        keywords = {
            p.name: p.default
            for p in inspect.signature(detector.function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        assert not passed_by_the_scan & set(detector.defaults)
        assert dict(detector.defaults) == {
            k: v for k, v in keywords.items() if k not in passed_by_the_scan
        }
        with pytest.raises(Exception, match="no parameter"):
            detector._params({"surely_not_a_parameter": 1})


def test_a_scan_records_each_detectors_group_and_defaults(tiny_run):
    run = open_run(tiny_run)
    for entry in run.manifest["detectors"]:
        detector = get_detector(entry["name"])
        assert entry["group"] == detector.group
        assert entry["params"] == json.loads(json.dumps(dict(detector.defaults)))
    assert {t.group for t in run.head_tables()} == {"roles", "sinks"}
    assert [t.detector for t in run.in_group("sinks")] == ["first_token_sink"]


def test_the_declaration_is_checked():
    def no_default(stats, *, threshold):
        raise AssertionError("never run")

    def catch_all(stats, **params):
        raise AssertionError("never run")

    def experiment_without_progress(handle, *, stats_by_set=None, batch_size=8):
        raise AssertionError("never run")

    common = dict(role="r", primary_prompt_set="prose", description="d")
    with pytest.raises(TypeError, match="needs a default"):
        Detector(name="x", group="roles", function=no_default, **common)
    with pytest.raises(TypeError, match="spell out its parameters"):
        Detector(name="x", group="roles", function=catch_all, **common)
    with pytest.raises(TypeError, match="on_progress"):
        Detector(
            name="x", group="roles", function=experiment_without_progress, capture="model", **common
        )
    with pytest.raises(ValueError, match="group must be one of"):
        Detector(name="x", group="nowhere", function=lambda stats: None, **common)
    with pytest.raises(ValueError, match="already registered"):
        register_detector(get_detector("induction"))


def test_a_detector_may_not_name_its_table_after_another():
    from headscope.analyses.sinks import detect_first_token_sink

    impostor = Detector(
        name="impostor", role="r", group="sinks", function=detect_first_token_sink,
        primary_prompt_set="prose", description="d",
    )  # fmt: skip
    table = get_detector("first_token_sink")._stamp(
        detect_first_token_sink(_StatsStub())  # named by the stamp, as a scan names it
    )
    with pytest.raises(TypeError, match="one table of its own"):
        impostor._stamp(table)


class _StatsStub:
    """Just enough statistics for the first-token sink: two prompts, one layer, two heads."""

    def __init__(self) -> None:
        import torch

        self.sink_alpha = torch.tensor([[[[0.9], [0.1]]], [[[0.8], [0.2]]]])
        self.prompt_set, self.n_layers, self.n_heads = "stub", 1, 2


def test_listing_and_opening_a_run_import_no_detector(tiny_run):
    """``headscope runs`` and ``open_run`` pay for tables, not for the analysis stack."""
    code = f"""
import sys
from typer.testing import CliRunner
from headscope.cli import app
result = CliRunner().invoke(app, ["runs", {str(tiny_run.parent)!r}])
assert result.exit_code == 0, result.output
from headscope.runs import open_run
run = open_run({str(tiny_run)!r})
run.head_tables(), run.layer_tables(), run.head_table("first_token_sink")
heavy = ("headscope.analyses", "headscope.probes", "scipy", "sklearn", "transformers",
         "transformer_lens")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    assert out.stdout.strip() == "[]", out.stdout
