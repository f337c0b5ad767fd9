"""The BOS choice (always / auto / never) and detector parameters given to a scan."""

from __future__ import annotations

import json

import pytest

import headscope
from headscope.errors import HeadscopeError
from headscope.probes.handle import tokenizer_adds_bos
from headscope.report import build_report, run_context
from headscope.scanning import parse_detector_params

SMALL = dict(n_prompts=3, seq_len=12, on_progress=False)


def test_policies_decide_the_first_token(tiny_llama):
    bos = tiny_llama.arch.bos_token_id
    assert bos is not None
    adds = tokenizer_adds_bos(tiny_llama.tokenizer, bos)
    assert tiny_llama.bos_policy == "always" and tiny_llama.bos_id == bos
    assert tiny_llama.with_bos("never").bos_id is None
    assert tiny_llama.with_bos("auto").bos_id == (bos if adds else None)
    # a policy handle shares the model and leaves the original alone
    never = tiny_llama.with_bos("never")
    assert never.model is tiny_llama.model and tiny_llama.bos_id == bos
    assert never.tokenize("prose", 2).tokens[0][0].item() != bos
    assert tiny_llama.tokenize("prose", 2).tokens[0][0].item() == bos
    assert never.encode("a b c")[0] != bos and tiny_llama.encode("a b c")[0] == bos
    with pytest.raises(HeadscopeError, match="unknown BOS policy 'sometimes'"):
        tiny_llama.with_bos("sometimes")


def test_auto_follows_what_the_tokenizer_does(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    bos = tiny_llama.arch.bos_token_id
    first = tokenizer("a", add_special_tokens=True).input_ids[0]
    assert tokenizer_adds_bos(tokenizer, bos) is (first == bos)
    assert tokenizer_adds_bos(tokenizer, None) is False


def test_scan_records_the_choice_and_keeps_transformer_lens_bos_for_classic_heads(tiny_llama):
    result = headscope.scan(
        tiny_llama, prompts="prose", detectors="previous_token,first_token_sink",
        bos="never", **SMALL,
    )  # fmt: skip
    manifest = result.manifest
    assert manifest["bos"]["policy"] == "never" and manifest["bos"]["prepended"] is False
    assert "TransformerLens" in manifest["bos"]["classic_heads"]
    prompt_set = manifest["prompt_sets"][0]
    assert prompt_set["bos_prepended"] is False and prompt_set["patterns_bos_prepended"] is True
    assert prompt_set["patterns_token_hash"] != prompt_set["token_hash"]
    # the streaming statistics saw no BOS; the classic heads' patterns did
    bos = tiny_llama.arch.bos_token_id
    assert result.stats["prose"]["patterns"].sample_tokens[0].item() == bos
    text = run_context(manifest, [*result.head_tables]).plain
    assert text.startswith("BOS: never (none prepended); classic heads: always")
    always = headscope.scan(tiny_llama, prompts="prose", detectors="first_token_sink", **SMALL)
    assert always.manifest["bos"]["prepended"] is True
    assert "patterns_token_hash" not in always.manifest["prompt_sets"][0]
    # the sink score moves with the first token: it is a different experiment
    with_bos = always.head_table("first_token_sink").frame["score"].to_numpy()
    without = result.head_table("first_token_sink").frame["score"].to_numpy()
    assert abs(with_bos - without).max() > 1e-4


def test_old_runs_say_the_choice_was_not_recorded():
    manifest = {"prompt_sets": [{"name": "prose", "bos_prepended": True}]}
    assert run_context(manifest, []).plain == (
        "BOS: not recorded (a run from before the choice existed; prompts start with the BOS)"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["first_token_sink.epsilon=0.2"], {"first_token_sink": {"epsilon": 0.2}}),
        (["a.b=true", "a.c=x y"], {"a": {"b": True, "c": "x y"}}),
        (["a.b=[1, 2]", 'c.d="7"'], {"a": {"b": [1, 2]}, "c": {"d": "7"}}),
    ],
)
def test_parse_detector_params(given, expected):
    assert parse_detector_params(given) == expected


@pytest.mark.parametrize("bad", ["epsilon=0.2", "first_token_sink.epsilon", ".x=1", "a.=1"])
def test_parse_detector_params_refuses_malformed(bad):
    with pytest.raises(HeadscopeError, match="DETECTOR.NAME=VALUE"):
        parse_detector_params([bad])


def test_scan_applies_detector_params_and_records_them(tiny_llama):
    result = headscope.scan(
        tiny_llama, prompts="prose", detectors="first_token_sink",
        detector_params={"first_token_sink": {"epsilon": 0.9}}, **SMALL,
    )  # fmt: skip
    table = result.head_table("first_token_sink")
    assert table.params["epsilon"] == 0.9
    assert result.manifest["detectors"][0]["params"]["epsilon"] == 0.9
    json.dumps(result.manifest)  # still plain JSON


def test_report_prints_the_protocol_a_table_used(tiny_llama):
    import dataclasses

    result = headscope.scan(tiny_llama, prompts="prose", detectors="first_token_sink", **SMALL)
    table = result.head_table("first_token_sink")
    tagged = dataclasses.replace(
        table, params={**table.params, "protocol": "gu2024", "protocol_note": "per sequence"}
    )
    context = build_report(result.manifest, [tagged]).renderables[1].plain
    assert context.splitlines()[1] == "first_token_sink: protocol gu2024 (per sequence)"
    assert len(build_report(result.manifest, [table]).renderables[1].plain.splitlines()) == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"induction": {"threshold": 0.1}}, r"which this scan does not run"),
        ({"first_token_sink": {"epsilonn": 0.1}}, r"has no parameter\(s\) \['epsilonn'\]"),
    ],
)
def test_scan_refuses_params_it_cannot_use_before_loading(params, message):
    with pytest.raises(HeadscopeError, match=message):
        headscope.scan(
            "no-such-model", prompts="prose", detectors="first_token_sink",
            detector_params=params, **SMALL,
        )  # fmt: skip
