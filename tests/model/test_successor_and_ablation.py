"""Successor heads and head-ablation exports on SmolLM2-135M-Instruct.

What the README reports for issue 5, checked on the real model: how many
ordinal items survive its tokenizer; that no head passes the effective-OV
succession threshold (a negative result, asserted so that a change to the
OV computation that alters it is noticed); that mean-ablating the best-scoring
head hurts ordinal continuation far more than any of 20 random single heads;
and that a baked zero-ablation checkpoint of the real model reloads in stock
transformers with the in-memory ablated logits.
"""

from __future__ import annotations

import pytest
import torch

from headscope.analyses import get_detector
from headscope.exporters.ablation import export_ablation
from headscope.probes.ablation import Ablation

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def successor(smollm2):
    return get_detector("successor").run_experiment(smollm2)


def test_ordinal_items_that_survive_the_tokenizer(successor):
    items = successor.summary["items"]
    assert items["numbers"]["single_token"] == 9  # SmolLM2 splits numbers into digits
    assert items["days"]["single_token"] == 7 and items["months"]["single_token"] == 12
    assert successor.summary["n_single_token_items"] == 101
    assert successor.summary["n_pairs"] == 95


def test_no_head_passes_the_succession_threshold(successor):
    best = successor.summary["best_score"]
    assert successor.summary["n_flagged"] == 0 and best < 0.4
    median = float(successor.frame["score"].median())
    assert best > 1.5 * median  # the best head is still well above the typical head
    # the OV pipeline does find structure here: a head that copies its token
    assert successor.summary["best_copy_score"] > 0.9


def test_ablating_the_best_head_hurts_ordinal_continuation_more_than_random_heads(successor):
    summary = successor.summary
    draws = summary["accuracy_random_draws"]
    assert len(draws) >= 20
    assert summary["accuracy_clean"] > 0.4
    assert summary["accuracy_top_ablated"] < min(draws) - 0.1
    assert summary["accuracy_top_ablated"] < summary["accuracy_clean"] / 2


def test_baked_checkpoint_of_the_real_model_matches_the_ablated_model(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    ablation = Ablation(method="zero", heads=((23, 3), (4, 3), (17, 0)))
    tokens = smollm2.tokenizer("Monday, Tuesday, Wednesday, Thursday", return_tensors="pt")
    ids = torch.cat([torch.tensor([[smollm2.arch.bos_token_id]]), tokens.input_ids], dim=1)
    with smollm2.ablated(ablation), torch.no_grad():
        expected = smollm2.model(ids).logits
    written = export_ablation(smollm2, ablation, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(written.checkpoint).eval()
    with torch.no_grad():
        got = reloaded(ids).logits
        plain = smollm2.model(ids).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2
