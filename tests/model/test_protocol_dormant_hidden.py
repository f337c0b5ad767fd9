"""Issue 15, items 6 and 10 on SmolLM2-135M-Instruct: active-dormant heads as Guo et al.
define the quantities, and hidden sinks under ACT's own rule beside headscope's.

One streaming probe of the default prose, code and random-repeat sets (64
prompts x 64 tokens, BOS prepended). What reproduces, with the margin it does
by (README, "Attention sinks"):

- ACT's rule without a viewer floor counts far more heads than headscope's
  (measured 183 vs 108 of 270 flagged on prose), on delimiter-like tokens.
- Guo et al.'s mechanism: a head that parks more of its attention on the sink
  on one domain writes less there (prose vs code, heads whose sink mass moves
  by more than 0.1: Spearman of that move against the change in log output
  norm after W_O measured -0.80).
- Active-dormant heads between prose and repeated random tokens: 17 flagged;
  15 are sink-parked on prose with less than half the output after W_O they
  have on random-repeat, among them 10 of the 12 best induction heads there
  (L17H3-5, L18H6-7, ...): they switch on where a repeated half gives them work.

What does not (asserted nowhere, said in the README): no head's output after
W_O halves between prose and code (smallest ratio measured 0.65), so Guo's rule
finds no active-dormant head between the two natural domains.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from headscope.analyses.dormant import detect_active_dormant, sink_and_output
from headscope.analyses.hidden_sinks import detect_hidden_sinks
from headscope.probes.streaming import probe_streaming

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def domains(smollm2):
    handle = smollm2.with_bos("always")  # the figures above are with the BOS prepended
    return {
        name: probe_streaming(handle, handle.tokenize(name), batch_size=16)
        for name in ("prose", "code", "random-repeat")
    }


def test_act_rule_counts_far_more_heads_than_the_viewer_floor_does(domains):
    prose = domains["prose"]
    ours = detect_hidden_sinks(prose)
    act = detect_hidden_sinks(prose, protocol="act")
    n_heads = prose.n_layers * prose.n_heads
    assert act.summary["n_heads_flagged"] > 1.4 * ours.summary["n_heads_flagged"]  # 183 vs 108
    assert act.summary["n_heads_with_any_hidden_sink"] >= 0.98 * n_heads  # 270 of 270
    assert act.summary["fraction_of_head_prompt_pairs"] > (
        1.4 * ours.summary["fraction_of_head_prompt_pairs"]
    )  # 0.70 vs 0.42
    top_tokens = {token for token, _ in act.summary["top_sink_tokens"]}
    assert {"\n", "."} & top_tokens
    assert act.summary["by_protocol"] == ours.summary["by_protocol"]  # one table, both counts


def test_a_head_that_parks_more_on_the_sink_writes_less(domains):
    (sink_p, out_p), (sink_c, out_c) = (
        sink_and_output(domains[d], "guo2024") for d in ("prose", "code")
    )
    moved = np.abs(sink_c - sink_p) > 0.1
    assert moved.sum() >= 15  # 27 of 270 heads
    rho = spearmanr((sink_c - sink_p)[moved], np.log(out_c / out_p)[moved]).correlation
    assert rho < -0.5  # measured -0.80


def test_induction_heads_are_dormant_on_prose_and_active_on_repeated_random_tokens(domains):
    pair = {d: domains[d] for d in ("prose", "random-repeat")}
    table = detect_active_dormant(pair)  # guo2024
    assert table.summary["n_active_dormant"] >= 10  # 17
    flagged = {(int(r.layer), int(r.head)) for r in table.flagged().itertuples()}
    assert {(17, 3), (18, 6), (18, 7)} <= flagged  # top induction heads on random-repeat
    evidence = table.frame.set_index(["layer", "head"]).loc[(18, 7), "evidence"]
    assert evidence["prose"]["dormant"] and not evidence["random-repeat"]["dormant"]
    assert evidence["prose"]["sink_mass"] > 0.9  # 0.99
    assert evidence["prose"]["relative_output_norm"] < 0.35  # 0.22
