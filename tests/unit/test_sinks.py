"""Sink analyses on tiny:llama with planted behaviour (see planting.py) and unplanted controls.

Planted: L0H1 attends to the first token (BOS); L1H2 attends to a fixed later
token X at position 5 (a hidden sink); layer 1's MLP writes 5000 into residual
dim 17 at BOS (a massive activation). The control is the same model unplanted.
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

from headscope.analyses.dormant import detect_active_dormant
from headscope.analyses.hidden_sinks import detect_hidden_sinks
from headscope.analyses.massive import detect_massive_activations, run_massive_intervention
from headscope.analyses.sink_norms import detect_residual_peak, detect_value_drain
from headscope.analyses.sinks import detect_first_token_sink
from headscope.analyses.streaming_window import run_streaming_window
from headscope.data.prompt_sets import TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.perplexity import measure_perplexity
from headscope.probes.streaming import probe_streaming

X_TOKEN, X_POSITION = 500, 5
MASSIVE_DIM, MASSIVE_LAYER = 17, 1


def _prompts(handle, n_prompts: int = 12, length: int = 40) -> TokenizedPrompts:
    """BOS, then random ordinary tokens (never X), with X at position 5."""
    generator = torch.Generator().manual_seed(1)
    bos = handle.arch.bos_token_id
    tokens = []
    for _ in range(n_prompts):
        body = torch.randint(10, 1000, (length,), generator=generator)
        body[body == X_TOKEN] = X_TOKEN + 1
        body[0], body[X_POSITION] = bos, X_TOKEN
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
        detect_hidden_sinks(planted_stats, min_viewers=2)


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
        {"prose": _domain(prose_sink, prose_norm), "code": _domain(code_sink, code_norm)}
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
