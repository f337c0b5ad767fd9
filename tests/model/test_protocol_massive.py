"""Sun et al.'s massive-activation intervention on SmolLM2-135M-Instruct, both protocols.

The paper's protocol (``sun2024``, the default) and headscope's earlier pooled
one pick the same layer here (11, where dims 507 and 247 appear at the first
token); on this model both reproduce the paper: the mean keeps held-out
perplexity and zero breaks the model (README, "Massive-activation intervention").
"""

from __future__ import annotations

import pytest

from headscope.analyses.massive import (
    detect_massive_activations,
    run_massive_intervention,
    sink_specific_dims,
)
from headscope.probes.streaming import probe_streaming

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prose_stats(smollm2):
    return probe_streaming(smollm2, smollm2.tokenize("prose"), batch_size=8)


def test_first_token_specific_dims_appear_at_layer_11(prose_stats):
    specific = sink_specific_dims(
        prose_stats, magnitude=100.0, ratio=1000.0, min_fraction=0.5, max_positions=2
    )
    first = next(layer for layer, dims in enumerate(specific) if dims)
    assert first == 11 and {507, 247} <= set(specific[first])
    # here the first flagged layer is that layer too, so the pooled protocol agrees
    assert detect_massive_activations(prose_stats).summary["first_layer"] == first


def test_sun2024_mean_keeps_perplexity_and_zero_breaks_the_model(smollm2, prose_stats):
    # 8 of the 32 held-out texts keep the test short (the README's figures use all 32)
    table = run_massive_intervention(
        smollm2, stats_by_set={"prose": prose_stats}, held_out_prompts=8
    )
    s = table.summary
    assert table.params["protocol"] == "sun2024" and s["layer"] == 11
    assert s["first_token_edits"] == 8
    assert s["ppl_mean"] == pytest.approx(s["ppl_original"], rel=0.02)
    assert s["ppl_zero"] > 1000 * s["ppl_original"]
