"""The streaming probe's statistics equal those from full attention patterns, on
smollm2-135m: TransformerLens ``hook_pattern`` (the pattern probe) and HF eager
attention (``output_attentions=True``), max abs diff ≤ 1e-4."""

from __future__ import annotations

import pytest
import torch

from headscope.data import TokenizedPrompts, get_prompt_set
from headscope.probes.loading import load_model
from headscope.probes.patterns import probe_patterns, row_entropy
from headscope.probes.streaming import probe_streaming

pytestmark = pytest.mark.model
TOLERANCE = 1e-4


def _tokenize(handle, name, **overrides):
    return get_prompt_set(name, **overrides).tokenize(
        handle.tokenizer, bos_token_id=handle.arch.bos_token_id
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    both = ~(a.isnan() | b.isnan())
    assert torch.equal(a.isnan(), b.isnan())
    return float((a[both] - b[both]).abs().max())


@pytest.mark.parametrize(("name", "overrides"), [("prose", {"n_prompts": 16}), ("ordinal", {})])
def test_streaming_equals_transformer_lens_patterns(smollm2, name, overrides):
    prompts = _tokenize(smollm2, name, **overrides)
    streaming = probe_streaming(smollm2, prompts, batch_size=8)
    patterns = probe_patterns(smollm2, prompts, batch_size=8)
    if name == "ordinal":
        assert len(set(prompts.lengths)) > 1  # right padding is exercised
    assert _max_diff(streaming.sink_alpha, patterns.sink_alpha) <= TOLERANCE
    assert _max_diff(streaming.sink_alpha_by_key, patterns.sink_alpha_by_key) <= TOLERANCE
    assert _max_diff(streaming.entropy_by_query, patterns.entropy_by_query) <= TOLERANCE


def test_streaming_equals_hf_eager_attention(smollm2):
    prompts = _tokenize(smollm2, "code", n_prompts=1, seq_len=96)
    single = TokenizedPrompts(
        name="one", prompt_set_hash="one", tokens=prompts.tokens[:1], bos_prepended=True
    )
    streaming = probe_streaming(smollm2, single, batch_size=1)
    eager = load_model("smollm2-135m")  # a second load that never had a bridge built over it
    eager.model.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = eager.model(single.tokens[0][None], output_attentions=True).attentions
    probs = torch.stack([a[0] for a in attentions]).double()  # [layer, head, query, key]
    seq_len = probs.shape[-1]
    positions = torch.arange(seq_len, dtype=torch.float64)
    expected = {
        "entropy": row_entropy(probs),
        "max_prob": probs.amax(-1),
        "sink_mass": probs[..., 0],
        "mean_distance": (probs * (positions[:, None] - positions[None, :]).abs()).sum(-1),
    }
    for field, value in expected.items():
        # mean_distance is in tokens (up to T): both sides sum fp32 terms of that
        # size, so it is held to the same bound relative to its magnitude.
        scale = value.abs().clamp(min=1.0) if field == "mean_distance" else 1.0
        assert _max_diff(streaming.profiles[field] / scale, value / scale) <= TOLERANCE, field
    assert _max_diff(streaming.received_by_key, probs.sum(-2)) <= TOLERANCE
