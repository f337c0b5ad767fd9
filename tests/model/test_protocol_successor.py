"""Successor heads on SmolLM2-135M-Instruct under each effective-OV protocol.

Issue 15, item 8: before concluding that SmolLM2 has no successor head, run
Gould et al.'s own formula (``gould2023``: MLP0(W_E), no norm anywhere) and the
full layer-0 residual (``layer0``) beside headscope's default, with chance
levels, a relabelled-task null for the best head, per-task accuracy and the
mod-10 check on the digits. What the README reports, asserted with margins:
no protocol gives a head above 0.4 or clearly above the best-of-heads null
(the negative result); the same head, L23H3, tops every protocol, maps the
digits 1-9 to their successor well above chance, and is the best mod-10 head.
"""

from __future__ import annotations

import pytest

from headscope.analyses import get_detector

pytestmark = pytest.mark.model

PROTOCOLS = ("headscope", "gould2023", "layer0")


@pytest.fixture(scope="module")
def tables(smollm2):
    run = get_detector("successor").run_experiment
    return {p: run(smollm2, protocol=p, behaviour=False) for p in PROTOCOLS}


def test_the_protocol_is_recorded(tables):
    for protocol, table in tables.items():
        assert table.params["protocol"] == protocol == table.summary["protocol"]
        assert table.params["final_norm_applied"] == (protocol != "gould2023")
        assert table.summary["n_pairs"] == 95


def test_no_protocol_finds_a_successor_head(tables):
    for table in tables.values():
        summary = table.summary
        chance = summary["chance"]
        assert chance == pytest.approx(0.077, abs=0.001)
        assert summary["n_flagged"] == 0 and summary["best_score"] < 0.25  # paper: ~0.8
        # the best of 270 heads is not clearly above what relabelled tasks give
        assert summary["best_score"] < summary["null_best_score_q95"] + 0.03


def test_the_same_head_tops_every_protocol_and_gets_digits_right(tables):
    for table in tables.values():
        summary = table.summary
        assert summary["best_head"] == "L23H3"
        top = summary["top_heads"][0]
        assert top["head"] == "L23H3"
        # numbers 1-9 (8 pairs): at least half right, chance 1/9
        assert top["task_accuracy"]["numbers"] >= 0.5 > 3 * summary["task_chance"]["numbers"]


def test_mod10_check(tables):
    for table in tables.values():
        mod10 = table.summary["mod10"]
        assert mod10["single_token_digits"] == 10 and mod10["chance"] == pytest.approx(0.1)
        assert mod10["best_head"] == "L23H3" and mod10["best_score"] >= 0.5
