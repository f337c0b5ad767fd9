"""Layer redundancy (LLM-Drop Sim, ShortGPT BI, attention-map similarity) on tiny models.

The planted answer: a block whose attention and MLP write nothing (output
projections zeroed) is the identity, so every redundancy measure must rank it
first, whatever the random weights of the other layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planting import plant_identity_block

from headscope.analyses.redundancy import (
    REDUNDANCY_TABLES,
    detect_layer_redundancy,
    redundancy_order,
    redundancy_tables,
)
from headscope.errors import NotApplicable
from headscope.probes.layer_similarity import measure_layer_similarity
from headscope.probes.loading import load_model

ARCHS = ["llama", "gemma3", "gpt2"]


def _prompts(handle, n=6):
    return handle.tokenize("prose", n)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_planted_identity_layer_is_ranked_most_redundant_everywhere(arch):
    handle = load_model(f"tiny:{arch}:5")
    plant_identity_block(handle, 2)
    tables = {
        t.detector: t for t in detect_layer_redundancy(handle, n_prompts=6, attention_maps=False)
    }
    assert set(tables) == set(REDUNDANCY_TABLES) - {"attention_similarity"}
    for name in ("llm_drop_attention", "llm_drop_mlp", "llm_drop_block", "block_influence"):
        table = tables[name]
        assert table.summary["order"][0] == 2, name
        row = table.frame.set_index("layer").loc[2]
        assert row["flagged"] and row["evidence"]["rank"] == 1
    sim = tables["llm_drop_block"].frame.set_index("layer")["score"]
    assert sim[2] == pytest.approx(1.0, abs=1e-6)
    assert tables["block_influence"].frame.set_index("layer")["score"][2] == pytest.approx(
        0.0, abs=1e-6
    )
    others = sim.drop(2)
    assert (others < 0.9999).all()  # the random layers really do move the residual


def _decoder_layers(handle) -> list[torch.nn.Module]:
    model = handle.model
    return list(model.transformer.h if hasattr(model, "transformer") else model.model.layers)


@torch.no_grad()
def _block_influence_by_hand(handle, prompts) -> np.ndarray:
    """ShortGPT's BI from the decoder layers' own inputs and outputs, one prompt at a time
    (no padding), in float64: 1 - mean over every token of cos(h_l, h_l+1)."""
    layers = _decoder_layers(handle)
    cosines: list[list[torch.Tensor]] = [[] for _ in layers]
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def hook(_module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).double()

        return hook

    def compare_output(i):
        def hook(_module, _args, output):
            h_out = (output[0] if isinstance(output, tuple) else output).double()
            cosines[i].append(F.cosine_similarity(inputs.pop(i), h_out, dim=-1).flatten())

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(keep_input(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(compare_output(i)))
        for tokens in prompts.tokens:
            handle.model(input_ids=torch.as_tensor(tokens)[None], use_cache=False)
    finally:
        for hook_handle in handles:
            hook_handle.remove()
    n_tokens = sum(len(t) for t in prompts.tokens)
    assert all(sum(len(c) for c in per_layer) == n_tokens for per_layer in cosines)
    return np.array([1.0 - float(torch.cat(per_layer).mean()) for per_layer in cosines])


@pytest.mark.parametrize("arch", ARCHS)
def test_block_influence_equals_shortgpt_computed_by_hand(arch):
    """BI and the block's Sim against hooks of our own on the decoder layers (no
    ``output_hidden_states``, whose last entry is after the final norm), on prompts
    of unequal lengths batched with padding."""
    handle = load_model(f"tiny:{arch}:4")
    prompts = _ragged(handle)
    expected = _block_influence_by_hand(handle, prompts)
    similarity = measure_layer_similarity(handle, prompts, batch_size=4)
    tables = {t.detector: t for t in redundancy_tables(similarity)}
    bi = tables["block_influence"].frame.set_index("layer")["score"].to_numpy()
    sim = tables["llm_drop_block"].frame.set_index("layer")["score"].to_numpy()
    np.testing.assert_allclose(bi, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(sim, 1.0 - expected, atol=1e-6, rtol=0)
    assert expected.min() > 1e-3  # random blocks turn the residual: not 0 against 0
    assert tables["block_influence"].summary["order"] == list(np.argsort(expected, kind="stable"))


def test_block_similarity_matches_hidden_states_but_not_the_final_normed_one():
    """ShortGPT's pitfall: output_hidden_states[-1] is after the final norm.

    A cosine ignores the norm's scalar rescaling, so the pitfall shows only
    with an uneven norm weight, as trained models have: plant one.
    """
    handle = load_model("tiny:llama:4")
    with torch.no_grad():
        handle.model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, 64))
    prompts = _prompts(handle, 4)
    similarity = measure_layer_similarity(handle, prompts, batch_size=8)
    tokens = torch.stack([torch.as_tensor(t) for t in prompts.tokens])
    with torch.no_grad():
        hidden = handle.model(input_ids=tokens, output_hidden_states=True).hidden_states
    naive = [float(F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean()) for i in range(4)]
    for layer in range(3):
        assert similarity.block[layer].item() == pytest.approx(naive[layer], abs=1e-5)
    assert abs(similarity.block[3].item() - naive[3]) > 1e-3  # the normed last state differs


def test_skipping_a_branch_makes_its_sim_one_and_the_block_equal_the_other_branch():
    handle = load_model("tiny:llama:4")
    prompts = _prompts(handle)
    similarity = measure_layer_similarity(handle, prompts, skip=[("mlp", 1), ("attn", 2)])
    assert similarity.mlp[1].item() == pytest.approx(1.0, abs=1e-6)
    assert similarity.block[1].item() == pytest.approx(similarity.attention[1].item(), abs=1e-6)
    assert similarity.attention[2].item() == pytest.approx(1.0, abs=1e-6)
    assert similarity.attention_ratio[2].item() == 0.0
    assert similarity.block[2].item() == pytest.approx(similarity.mlp[2].item(), abs=1e-6)


def _ragged(handle, n=4):
    """Prompts of unequal lengths, so a batch of them is padded."""
    prompts = _prompts(handle, n)
    tokens = tuple(t[: 20 + 13 * i] for i, t in enumerate(prompts.tokens))
    return dataclasses.replace(prompts, tokens=tokens)


@pytest.mark.parametrize("attention_maps", [False, True])
def test_padding_does_not_change_the_means(attention_maps):
    handle = load_model("tiny:llama:3")
    prompts = _ragged(handle)
    alone = measure_layer_similarity(handle, prompts, batch_size=1, attention_maps=attention_maps)
    padded = measure_layer_similarity(handle, prompts, batch_size=4, attention_maps=attention_maps)
    assert padded.n_tokens == alone.n_tokens == sum(len(t) for t in prompts.tokens)
    for field in ("attention", "mlp", "block", "attention_map_cosine", "attention_map_js"):
        if getattr(alone, field) is not None:
            torch.testing.assert_close(
                getattr(padded, field), getattr(alone, field), atol=1e-5, rtol=0, equal_nan=True
            )


def test_attention_map_similarity_agrees_with_eager_patterns():
    """Streaming (kernel on Q and K) against full eager patterns of the same prompts."""
    from headscope.kernels.cross_layer import similarity_from_patterns

    handle = load_model("tiny:llama:3")
    prompts = _prompts(handle, 3)
    similarity = measure_layer_similarity(handle, prompts, batch_size=2, attention_maps=True)
    handle.model.set_attn_implementation("eager")
    cosine_sum = torch.zeros(3, 4, dtype=torch.float64)
    rows = 0
    try:
        for tokens in prompts.tokens:
            with torch.no_grad():
                attentions = handle.model(
                    input_ids=torch.as_tensor(tokens)[None], output_attentions=True
                ).attentions
            patterns = torch.stack([a[0] for a in attentions]).double()
            cosine, _js = similarity_from_patterns(patterns)
            cosine_sum[1:] += cosine.sum(-1)
            rows += patterns.shape[-1]
    finally:
        handle.model.set_attn_implementation("sdpa")
    assert torch.isnan(similarity.attention_map_cosine[0]).all()
    torch.testing.assert_close(
        similarity.attention_map_cosine[1:], cosine_sum[1:] / rows, atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_a_layer_repeating_the_previous_attention_has_similarity_one():
    """Layer 1 writes nothing and layer 2 copies its attention weights: identical maps.

    Random tiny layers attend almost uniformly, and near-uniform rows are all
    alike; layer 1's queries and keys are scaled up so its maps are sharp.
    """
    handle = load_model("tiny:llama:3")
    plant_identity_block(handle, 1)
    layers = handle.model.model.layers
    for name in ("q_proj", "k_proj"):
        getattr(layers[1].self_attn, name).weight.mul_(8.0)
        getattr(layers[2].self_attn, name).weight.copy_(getattr(layers[1].self_attn, name).weight)
    layers[2].input_layernorm.weight.copy_(layers[1].input_layernorm.weight)
    tables = {t.detector: t for t in detect_layer_redundancy(handle, n_prompts=4)}
    table = tables["attention_similarity"]
    scores = table.frame.set_index("layer")["score"]
    assert 0 not in scores.index  # layer 0 has no previous layer
    assert scores[2] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < 0.9
    assert table.frame.set_index("layer").loc[2, "evidence"]["js_divergence"] < 1e-6


def test_bert_is_not_applicable():
    handle = load_model("tiny:bert")
    with pytest.raises(NotApplicable, match="post-norm"):
        measure_layer_similarity(handle, _prompts(handle, 2))


def test_orders_break_ties_towards_later_layers_and_put_nans_last():
    assert redundancy_order(np.array([0.5, 0.9, 0.9, np.nan])) == [2, 1, 0]
    assert redundancy_order(np.array([0.5, 0.1, 0.1]), highest_first=False) == [2, 1, 0]
