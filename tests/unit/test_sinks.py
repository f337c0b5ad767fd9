"""Sink analyses on tiny:llama with planted behaviour (see planting.py) and unplanted controls.

Planted: L0H1 attends to the first token (BOS); L1H2 attends to a fixed later
token X at position 5 (a hidden sink); layer 1's MLP writes 5000 into residual
dim 17 at BOS (a massive activation). The control is the same model unplanted.
A second planted model tells massive_intervention's protocols apart: a dim that
is massive at BOS and a third of the tokens from layer 0, and from layer 1 a
dim massive at BOS and at one delimiter token only.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from planting import (
    fresh_tiny_llama,
    plant_attention_to_token,
    plant_massive_activation,
)

from headscope.analyses import get_detector
from headscope.analyses.dormant import detect_active_dormant
from headscope.analyses.hidden_sinks import detect_hidden_sinks
from headscope.analyses.massive import (
    detect_massive_activations,
    run_massive_intervention,
    sink_specific_dims,
)
from headscope.analyses.sink_norms import detect_residual_peak, detect_value_drain
from headscope.analyses.sinks import detect_first_token_sink
from headscope.analyses.streaming_window import run_streaming_window
from headscope.data.prompt_sets import TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.perplexity import measure_perplexity
from headscope.probes.streaming import probe_streaming
from headscope.report import sink_summary

X_TOKEN, X_POSITION = 500, 5
MASSIVE_DIM, MASSIVE_LAYER = 17, 1


def _prompts(
    handle, n_prompts: int = 12, length: int = 40, x_position: int = X_POSITION
) -> TokenizedPrompts:
    """BOS, then random ordinary tokens (never X), with X at position 5 (or ``x_position``)."""
    generator = torch.Generator().manual_seed(1)
    bos = handle.arch.bos_token_id
    tokens = []
    for _ in range(n_prompts):
        body = torch.randint(10, 1000, (length,), generator=generator)
        body[body == X_TOKEN] = X_TOKEN + 1
        body[0], body[x_position] = bos, X_TOKEN
        tokens.append(body)
    return TokenizedPrompts(
        name="planted", prompt_set_hash="test", tokens=tuple(tokens), bos_prepended=True
    )


@pytest.fixture(scope="module")
def planted():
    handle = fresh_tiny_llama()
    bos = handle.arch.bos_token_id
    plant_attention_to_token(handle, layer=0, head=1, token_id=bos, marker=0)
    plant_attention_to_token(handle, layer=1, head=2, token_id=X_TOKEN, marker=1)
    plant_massive_activation(
        handle, layer=MASSIVE_LAYER, token_id=bos, marker=2, dim=MASSIVE_DIM, value=5000.0
    )
    return handle


@pytest.fixture(scope="module")
def control():
    return fresh_tiny_llama()


@pytest.fixture(scope="module")
def planted_stats(planted):
    return probe_streaming(planted, _prompts(planted), batch_size=6)


@pytest.fixture(scope="module")
def control_stats(control):
    return probe_streaming(control, _prompts(control), batch_size=6)


def _flagged(table) -> set[tuple[int, ...]]:
    columns = ["layer", "head"] if "head" in table.frame else ["layer"]
    return {tuple(int(v) for v in row) for row in table.flagged()[columns].to_numpy()}


def test_planted_first_token_sink_is_found(planted_stats, control_stats):
    table = detect_first_token_sink(planted_stats)
    assert (0, 1) in _flagged(table)
    assert table.score(0, 1) > 0.95
    assert (1, 2) not in _flagged(table)  # the hidden-sink head looks elsewhere
    assert _flagged(detect_first_token_sink(control_stats)) == set()


def test_planted_hidden_sink_is_found_at_its_position_and_token(planted, planted_stats):
    table = detect_hidden_sinks(planted_stats)
    assert _flagged(table) == {(1, 2)}
    assert table.score(1, 2) == 1.0
    evidence = table.frame.set_index(["layer", "head"]).loc[(1, 2), "evidence"]
    assert evidence["top_positions"][0] == (X_POSITION, 12)
    assert evidence["top_tokens"][0][0] == planted.tokenizer.decode([X_TOKEN])
    assert evidence["mean_sink_score"] > 0.9
    assert table.score(0, 1) == 0.0  # a first-token sink is not a hidden one


def test_control_has_no_hidden_sinks(control_stats):
    table = detect_hidden_sinks(control_stats)
    assert _flagged(table) == set()
    assert table.summary["n_heads_with_any_hidden_sink"] == 0


def test_hidden_sink_thresholds_below_the_probe_floor_are_refused(planted_stats):
    with pytest.raises(HeadscopeError, match="floor"):
        detect_hidden_sinks(planted_stats, threshold=0.01)
    with pytest.raises(HeadscopeError, match="viewers"):
        detect_hidden_sinks(planted_stats, min_viewers=0)
    with pytest.raises(HeadscopeError, match="act_code"):
        detect_hidden_sinks(planted_stats, protocol="yu")


LATE = 4  # X seen by its own query and the 3 after it


@pytest.fixture(scope="module")
def late_stats(planted):
    """The planted model with X near the end: L1H2's sink has LATE viewers."""
    return probe_streaming(planted, _prompts(planted, x_position=40 - LATE), batch_size=6)


def test_act_counts_a_sink_few_queries_see_and_headscope_does_not(planted, late_stats):
    ours = detect_hidden_sinks(late_stats)
    assert ours.score(1, 2) == 0.0  # 4 viewers < min_viewers 16
    assert detect_hidden_sinks(late_stats, min_viewers=LATE).score(1, 2) == 1.0
    table = detect_hidden_sinks(late_stats, protocol="act")
    assert (1, 2) in _flagged(table) and table.score(1, 2) == 1.0
    evidence = table.frame.set_index(["layer", "head"]).loc[(1, 2), "evidence"]
    assert evidence["top_positions"][0] == (40 - LATE, 12)
    assert table.params["protocol"] == "act" and table.params["min_viewers"] is None
    counts = ours.summary["by_protocol"]
    assert counts["act"]["n_heads_flagged"] >= 1 > counts["headscope"]["n_heads_flagged"]
    assert ours.summary["n_heads_flagged"] == counts["headscope"]["n_heads_flagged"]


def test_act_code_drops_the_first_key_found_when_the_first_token_does_not_pass(planted_stats):
    alpha_0 = planted_stats.sink_alpha[:, 1, 2, 0]
    assert (alpha_0 < 0.1).all()  # L1H2 looks at X from position 5 on, not at BOS
    paper = detect_hidden_sinks(planted_stats, protocol="act")
    assert (1, 2) in _flagged(paper)
    evidence = paper.frame.set_index(["layer", "head"]).loc[(1, 2), "evidence"]
    assert evidence["top_positions"][0] == (X_POSITION, 12)
    code = detect_hidden_sinks(planted_stats, protocol="act_code")  # indices[1:] drops X
    assert code.frame.set_index(["layer", "head"]).loc[(1, 2), "evidence"]["top_positions"] == [
        p for p in evidence["top_positions"] if p[0] != X_POSITION
    ]


def test_planted_massive_activation_is_found_at_its_layer_dim_and_token(planted, planted_stats):
    table = detect_massive_activations(planted_stats)
    assert _flagged(table) == {(MASSIVE_LAYER,)}
    assert table.summary["massive_dims"] == [MASSIVE_DIM]
    assert table.summary["first_layer"] == MASSIVE_LAYER
    evidence = table.frame.loc[MASSIVE_LAYER, "evidence"]
    assert evidence["positions"] == [(0, 12)]
    assert evidence["tokens"][0][0] == planted.tokenizer.decode([planted.arch.bos_token_id])
    assert evidence["max_abs"] == pytest.approx(5000.0, rel=0.05)


def test_control_has_no_massive_activations(control_stats):
    table = detect_massive_activations(control_stats)
    assert _flagged(table) == set()
    assert table.summary["first_layer"] is None


def test_mean_intervention_keeps_perplexity_and_zero_changes_it(planted, planted_stats):
    table = run_massive_intervention(planted, stats_by_set={"prose": planted_stats}, batch_size=8)
    summary = table.summary
    assert (summary["layer"], summary["dims"]) == (MASSIVE_LAYER, [MASSIVE_DIM])
    # at least every held-out prompt's BOS is edited
    assert table.frame.loc[0, "evidence"]["entries_edited_per_run"] >= 32
    # the planted value is nearly the same at every BOS, so its mean restores the
    # model; zero does not. In this random model only the last layer's BOS logits
    # read the dim, so the change is small, but it is 100x the mean's.
    mean_change = abs(summary["ppl_mean"] / summary["ppl_original"] - 1)
    zero_change = abs(summary["ppl_zero"] / summary["ppl_original"] - 1)
    assert mean_change < 1e-6
    assert zero_change > 100 * mean_change and zero_change > 1e-6


def test_intervention_without_massive_activations_is_not_applicable(control, control_stats):
    with pytest.raises(NotApplicable, match="no massive activations"):
        run_massive_intervention(control, stats_by_set={"prose": control_stats})


def test_residual_peak_at_the_planted_layer(planted_stats, control_stats):
    table = detect_residual_peak(planted_stats)
    assert _flagged(table) == {(MASSIVE_LAYER,)}
    assert table.summary["first_layer"] == MASSIVE_LAYER
    assert _flagged(detect_residual_peak(control_stats)) == set()


def _norm_stats(value_norms: np.ndarray, residual_norms: np.ndarray):
    return types.SimpleNamespace(
        prompt_set="synthetic",
        n_layers=value_norms.shape[0],
        value_norm_by_pos=torch.tensor(value_norms),
        residual_norm_by_pos=torch.tensor(residual_norms),
    )


def test_value_drain_flags_small_sink_values_only():
    values = np.ones((2, 2, 10))
    values[1, :, 0] = 0.1  # layer 1: the sink token's values are a tenth of the others'
    table = detect_value_drain(_norm_stats(values, np.ones((2, 10))))
    assert _flagged(table) == {(1,)}
    assert table.frame.loc[1, "score"] == pytest.approx(0.1)
    assert table.frame.loc[0, "score"] == pytest.approx(1.0)


def _domain(sink_mass: np.ndarray, output_norm: np.ndarray):
    return types.SimpleNamespace(
        n_layers=sink_mass.shape[0],
        n_heads=sink_mass.shape[1],
        means={"sink_mass": torch.tensor(sink_mass), "output_norm": torch.tensor(output_norm)},
    )


def _profiled_domain(sink_after_first: list[float], norm: list[float], *, t: int = 10):
    """One layer, a head per entry: query 0 puts all its attention on itself (the
    sink), queries t >= 1 ``sink_after_first``; output norms ``norm`` at every t, before
    and after W_O alike. ``means`` are over all queries, as the probe's are."""
    sink = torch.tensor(sink_after_first, dtype=torch.float64)[None, :, None].repeat(1, 1, t)
    sink[..., 0] = 1.0
    output = torch.tensor(norm, dtype=torch.float64)[None, :, None].repeat(1, 1, t)
    profiles = {"sink_mass": sink, "output_norm": output, "output_norm_after_wo": output}
    return types.SimpleNamespace(
        n_layers=1, n_heads=len(norm), causal=True, lengths=[t] * 3, profiles=profiles,
        means={name: value.mean(-1) for name, value in profiles.items()},
    )  # fmt: skip


def test_guo2024_compares_each_head_with_itself_and_leaves_query_0_out():
    # prose: heads 0-2 sink-parked with small outputs, so the layer's median head is small
    prose = _profiled_domain([0.9, 0.45, 0.9, 0.1], [0.1, 0.1, 0.1, 1.0])
    code = _profiled_domain([0.1, 0.1, 0.9, 0.1], [1.0, 1.0, 0.12, 1.0])
    domains = {"prose": prose, "code": code}
    guo = detect_active_dormant(domains)
    assert guo.params["protocol"] == "guo2024"
    # head 0: a tenth of its own code output on prose; head 1: sink mass 0.45 over
    # t >= 1 (0.505 with query 0); head 2: its output is small on both domains
    assert _flagged(guo) == {(0, 0)}
    evidence = guo.frame.set_index(["layer", "head"]).loc[(0, 1), "evidence"]["prose"]
    assert evidence["sink_mass"] == pytest.approx(0.45)
    ours = detect_active_dormant(domains, protocol="headscope")
    # against the layer median (0.1 on prose) head 0 looks ordinary; on code head 2
    # is below half the median and sink-parked
    assert _flagged(ours) == {(0, 2)}
    counts = {"guo2024": 1, "headscope": 1}
    assert guo.summary["n_active_dormant_by_protocol"] == counts
    with pytest.raises(HeadscopeError, match="guo2024"):
        detect_active_dormant(domains, protocol="guo")


def test_guo2024_needs_the_output_after_w_o():
    sink, norm = np.full((1, 2), 0.9), np.ones((1, 2))
    domains = {"prose": _domain(sink, norm), "code": _domain(sink, norm)}
    with pytest.raises(NotApplicable, match="W_O"):
        detect_active_dormant(domains)
    table = detect_active_dormant(domains, protocol="headscope")
    assert table.summary["n_active_dormant_by_protocol"] == {"guo2024": None, "headscope": 0}


def test_active_dormant_needs_dormancy_on_one_domain_and_activity_on_another():
    sink = np.full((1, 4), 0.1)
    norm = np.ones((1, 4))
    prose_sink, prose_norm = sink.copy(), norm.copy()
    prose_sink[0, 0], prose_norm[0, 0] = 0.9, 0.05  # head 0: dormant on prose only
    prose_sink[0, 1] = 0.9  # head 1: sink-heavy but its output stays large: active
    code_sink, code_norm = sink.copy(), norm.copy()
    code_sink[0, 3], code_norm[0, 3] = 0.9, 0.05  # head 3: dormant on code only
    prose_sink[0, 3], prose_norm[0, 3] = 0.9, 0.05  # ... and on prose: always dormant
    table = detect_active_dormant(
        {"prose": _domain(prose_sink, prose_norm), "code": _domain(code_sink, code_norm)},
        protocol="headscope",
    )
    assert _flagged(table) == {(0, 0)}
    assert table.score(0, 0) == 0.5 and table.score(0, 3) == 1.0 and table.score(0, 1) == 0.0
    with pytest.raises(HeadscopeError, match="two prompt sets"):
        detect_active_dormant({"prose": _domain(prose_sink, prose_norm)})


def test_window_as_long_as_the_text_equals_full_attention(planted):
    prompts = _prompts(planted, n_prompts=3, length=48)
    full, _ = measure_perplexity(planted, prompts)
    wide, _ = measure_perplexity(planted, prompts, window=48, keep_first=4)
    assert wide.value() == pytest.approx(full.value(), rel=1e-6)
    assert math.isfinite(full.value()) and full.n_tokens == 3 * 47


def test_streaming_window_reports_three_perplexities_and_the_planted_sink(planted):
    table = run_streaming_window(planted, window=16, seq_len=128)
    summary = table.summary
    assert table.params["window"] == 16 and table.params["seq_len"] == 128
    # the paper's budget: 16 recent keys, or 4 first + 12 recent; the first target
    # that differs from full attention is the one after query 16
    assert table.params["budget"].endswith("4 first + 12 recent")
    assert table.params["first_counted_target"] == 17
    assert summary["n_tokens_past_window"] == table.params["n_texts"] * (127 - 16)
    for name in ("full", "window_0_sinks", "window_4_sinks"):
        assert math.isfinite(summary[f"ppl_{name}"])
    # keeping the first tokens changes what the planted sink head sees past the window
    assert summary["ppl_window_4_sinks_past_window"] != summary["ppl_window_0_sinks_past_window"]
    assert (0, 1) in _flagged(table) and table.score(0, 1) > 0.95


def test_streaming_window_is_not_applicable_to_an_encoder():
    from headscope.probes.loading import load_model

    with pytest.raises(NotApplicable, match="causal"):
        run_streaming_window(load_model("tiny:bert"))


def test_layers_with_their_own_sliding_window_keep_it_under_window_attention():
    from headscope.probes.loading import load_model

    handle = load_model("tiny:gemma3")  # both layers are 16-token sliding-window layers
    assert set(handle.model.config.layer_types) == {"sliding_attention"}
    prompts = _prompts(handle, n_prompts=2, length=48)
    full, _ = measure_perplexity(handle, prompts)
    windowed, _ = measure_perplexity(handle, prompts, window=4, keep_first=0)
    assert windowed.value() == pytest.approx(full.value(), rel=1e-6)
    control, _ = measure_perplexity(load_model("tiny:llama"), prompts)
    narrowed, _ = measure_perplexity(load_model("tiny:llama"), prompts, window=4)
    assert abs(narrowed.value() / control.value() - 1) > 1e-4  # full-attention layers do change


# --- massive_intervention protocols: a widespread massive dim at layer 0 (like
# Gemma 3's dim 400 at BOS and commas), a first-token-specific one at layer 1
# that a fixed delimiter token carries too (like LLaMA2-7B's "." after BOS)

WIDE_DIM, WIDE_LAYER, DELIMITER, DELIMITER_POSITION = 30, 0, 600, 9


def _protocol_prompts(handle, n_prompts: int, name: str) -> TokenizedPrompts:
    """BOS, random tokens (never the delimiter), the delimiter at DELIMITER_POSITION."""
    generator = torch.Generator().manual_seed(len(name))
    tokens = []
    for _ in range(n_prompts):
        body = torch.randint(10, 1000, (40,), generator=generator)
        body[body == DELIMITER] = DELIMITER + 1
        body[0], body[DELIMITER_POSITION] = handle.arch.bos_token_id, DELIMITER
        tokens.append(body)
    return TokenizedPrompts(name=name, prompt_set_hash=name, tokens=tuple(tokens),
                            bos_prepended=True)  # fmt: skip


@pytest.fixture(scope="module")
def two_kinds():
    """The planted model, its detection statistics and a held-out set of the same design."""
    handle = fresh_tiny_llama()
    bos = handle.arch.bos_token_id
    with torch.no_grad():  # only the planted neurons read or write the marker features
        for layer in handle.model.model.layers:
            layer.self_attn.v_proj.weight[:, [2, 4]] = 0.0
            layer.self_attn.o_proj.weight[[2, 4], :] = 0.0
            layer.mlp.down_proj.weight[[2, 4], :] = 0.0
    plant_massive_activation(
        handle, layer=WIDE_LAYER, token_id=bos, marker=4, dim=WIDE_DIM, value=250.0
    )
    with torch.no_grad():  # about a third of the tokens, and the delimiter, carry the wide dim
        handle.model.model.embed_tokens.weight[100:400, 4] = 10.0
        handle.model.model.embed_tokens.weight[DELIMITER, 4] = 10.0
    plant_massive_activation(
        handle, layer=MASSIVE_LAYER, token_id=bos, marker=2, dim=MASSIVE_DIM, value=5000.0
    )
    with torch.no_grad():  # the delimiter carries the specific one, a little less of it
        handle.model.model.embed_tokens.weight[DELIMITER, 2] = 8.0
    assert bos not in range(100, 400) and DELIMITER not in range(100, 400)
    # the two planted sets stand in for "prose" (detection) and a held-out set
    planted_sets = {name: _protocol_prompts(handle, n, name)
                    for name, n in (("prose", 12), ("planted-heldout", 16))}  # fmt: skip
    handle.tokenize = lambda name, n=None: planted_sets[name]
    return handle, probe_streaming(handle, planted_sets["prose"], batch_size=6)


def _intervene(two_kinds, **params):
    """The detector run as a scan runs it (through the registry)."""
    handle, stats = two_kinds
    return get_detector("massive_intervention").run_experiment(
        handle, stats_by_set={"prose": stats}, batch_size=8,
        evaluate_on="planted-heldout", **params,
    )  # fmt: skip


def test_first_token_specific_dims_skip_a_dim_massive_at_many_tokens(two_kinds):
    _, stats = two_kinds
    assert detect_massive_activations(stats).summary["first_layer"] == WIDE_LAYER
    found = sink_specific_dims(stats, magnitude=100, ratio=1000, min_fraction=0.5,
                               max_positions=2)  # fmt: skip
    assert found == [[], [MASSIVE_DIM]]  # the wide dim sits at BOS too, and at ~13 more tokens
    # with room for one position only, the delimiter disqualifies the dim
    assert sink_specific_dims(stats, magnitude=100, ratio=1000, min_fraction=0.5,
                              max_positions=1) == [[], []]  # fmt: skip


def test_sun2024_edits_the_first_token_and_the_delimiter_at_the_specific_layer(two_kinds):
    handle, _ = two_kinds
    table = _intervene(two_kinds)
    s = table.summary
    assert table.params["protocol"] == s["protocol"] == "sun2024"
    assert "Sun et al." in table.params["protocol_note"]
    assert (s["layer"], s["dims"]) == (MASSIVE_LAYER, [MASSIVE_DIM])
    assert s["first_token_edits"] == s["delimiter_edits"] == 16
    assert s["delimiter_tokens"] == [(handle.tokenizer.decode([DELIMITER]), 16)]
    evidence = table.frame.loc[0, "evidence"]
    means = evidence["mean_values"]
    assert means["first_token"][str(MASSIVE_DIM)] == pytest.approx(5000.0, rel=0.05)
    assert means["delimiter"][str(MASSIVE_DIM)] > 1000.0  # massive, with a mean of its own
    assert means["delimiter"][str(MASSIVE_DIM)] != pytest.approx(5000.0, rel=1e-3)
    assert evidence["detect_prompts_with_delimiter"] == evidence["detect_prompts"] == 12
    mean_change = abs(s["ppl_mean"] / s["ppl_original"] - 1)
    zero_change = abs(s["ppl_zero"] / s["ppl_original"] - 1)
    assert zero_change > 1e-6 and zero_change > 10 * mean_change
    # the report says which protocol the table used
    ((quantity, _),) = sink_summary([table])
    assert "protocol sun2024" in quantity and "the first token and the top delimiter" in quantity


def test_pooled_protocol_keeps_the_first_flagged_layer_and_one_mean_per_dim(two_kinds):
    table = _intervene(two_kinds, protocol="pooled")
    s = table.summary
    assert table.params["protocol"] == "pooled"
    assert s["layer"] == WIDE_LAYER and s["dims"] == [WIDE_DIM]
    # every massive entry of the dim: BOS and the ~13 wide tokens of each prompt
    assert s["entries_at_first_token"] == 16
    assert s["entries_elsewhere"] > 5 * 16
    assert table.frame.loc[0, "evidence"]["mean_values"][str(WIDE_DIM)] > 200.0
    # one pooled mean (about 230) is not the BOS's own value (125): perplexity moves
    assert abs(s["ppl_mean"] / s["ppl_original"] - 1) > 1e-5


def test_protocol_choices_are_checked(two_kinds):
    with pytest.raises(HeadscopeError, match="sun2024, pooled"):
        _intervene(two_kinds, protocol="paper")
    with pytest.raises(NotApplicable, match="protocol='pooled'"):
        _intervene(two_kinds, max_positions=1)
    # a layer of one's own: the protocol's dims must be found there
    with pytest.raises(NotApplicable, match="no dim at layer 0"):
        _intervene(two_kinds, layer=WIDE_LAYER)
    with pytest.raises(HeadscopeError, match="out of range"):
        _intervene(two_kinds, layer=2)
