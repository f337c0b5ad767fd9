"""Layer redundancy and pruned exports on the bundled SmolLM2-135M.

What the papers lead us to expect, and what these tests hold: Sim is close to
1 for most modules of a trained model (each adds a small step to a large
residual); ShortGPT's block influence agrees with the hidden states; and a pruned
checkpoint of the real model reloads in stock transformers with the logits of
the in-memory drops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.analyses import get_detector
from headscope.exporters.prune import PrunePlan, export_pruned


@pytest.fixture(scope="module")
def redundancy(smollm2):
    detector = get_detector("layer_redundancy")
    tables = detector.run_experiment(smollm2, n_prompts=16)
    return {table.detector: table for table in tables}


def test_every_module_of_smollm2_is_scored(redundancy, smollm2):
    n_layers = smollm2.arch.n_layers
    for name in ("llm_drop_attention", "llm_drop_mlp", "llm_drop_block", "block_influence"):
        frame = redundancy[name].frame
        assert sorted(frame["layer"]) == list(range(n_layers)), name
        assert np.isfinite(frame["score"]).all(), name
        assert sorted(redundancy[name].summary["order"]) == list(range(n_layers))
    attention = redundancy["llm_drop_attention"].frame["score"].to_numpy()
    assert np.median(attention) > 0.8  # small steps on a large residual
    similarity = redundancy["attention_similarity"].frame
    assert sorted(similarity["layer"]) == list(range(1, n_layers))
    assert similarity["score"].between(0, 1 + 1e-6).all()


def test_block_influence_matches_the_hidden_states(redundancy, smollm2):
    """ShortGPT's BI = 1 - mean cos(h_l, h_l+1), recomputed from output_hidden_states on
    the detector's prompts: entries l and l+1 are block l's input and output for every
    block but the last (the last entry is after the final norm)."""
    prompts = smollm2.tokenize("prose", 16)
    assert len({len(t) for t in prompts.tokens}) == 1  # one batch, no padding
    tokens = torch.stack([torch.as_tensor(t) for t in prompts.tokens])
    with torch.inference_mode():
        hidden = smollm2.model(input_ids=tokens, output_hidden_states=True).hidden_states
    last = smollm2.arch.n_layers - 1
    cosines = [torch.cosine_similarity(hidden[i], hidden[i + 1], dim=-1) for i in range(last)]
    expected = np.array([1.0 - c.double().mean().item() for c in cosines])
    bi = redundancy["block_influence"].frame.set_index("layer")["score"].to_numpy()
    np.testing.assert_allclose(bi[:last], expected, atol=1e-5, rtol=0)


def test_a_pruned_smollm2_reloads_with_the_in_memory_logits(redundancy, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    attention_order = redundancy["llm_drop_attention"].summary["order"]
    block_order = redundancy["block_influence"].summary["order"]
    plan = PrunePlan(attention_layers=tuple(attention_order[:4]), blocks=tuple(block_order[:2]))
    written = export_pruned(smollm2, plan, tmp_path / "pruned", eval_prompts=2)
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    tokens = torch.cat([torch.tensor([[smollm2.arch.bos_token_id]]), ids.input_ids], dim=1)
    reloaded = AutoModelForCausalLM.from_pretrained(written.checkpoint).eval()
    with torch.no_grad():
        got = reloaded(tokens).logits
        with smollm2.ablated(plan.ablation()):
            expected = smollm2.model(tokens).logits
    assert (got - expected).abs().max() <= 1e-4
    assert reloaded.config.num_hidden_layers == smollm2.arch.n_layers - 2
    manifest = written.manifest
    assert manifest["parameters"]["pruned"] < manifest["parameters"]["original"]
    assert manifest["perplexity"]["pruned"] > manifest["perplexity"]["original"]
