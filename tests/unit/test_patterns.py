"""The pattern probe's statistics against TransformerLens and direct formulas."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import head_detector
from transformer_lens import head_detector as tl

from headscope.data import TokenizedPrompts
from headscope.probes.loading import load_model
from headscope.probes.patterns import (
    CLASSIC_KINDS,
    classic_parts,
    classic_score,
    duplicate_token_pattern,
    induction_pattern,
    previous_token_pattern,
    probe_patterns,
    row_entropy,
    sink_scores,
)

OPTIONS = [(False, False), (True, False), (False, True), (True, True)]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x + 1\n\ndef g(y):\n    return f(y) * 2\n",
    "one two three four five one two three four five six seven",
    "Monday, Tuesday, Wednesday, Thursday, Friday",
    "A dog, a cat, a dog, a cat and a bird.",
]


def random_causal_pattern(batch, heads, seq_len, generator):
    scores = torch.randn(batch, heads, seq_len, seq_len, generator=generator)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def tokenized(handle, texts):
    tokens = tuple(handle.bridge.to_tokens(text)[0] for text in texts)
    return TokenizedPrompts(name="texts", prompt_set_hash="test", tokens=tokens, bos_prepended=True)


def test_detection_patterns_equal_transformer_lens():
    generator = torch.Generator().manual_seed(0)
    for seq_len in (2, 5, 17):
        tokens = torch.randint(0, 4, (1, seq_len), generator=generator)
        pairs = [
            (previous_token_pattern(seq_len), tl.get_previous_token_head_detection_pattern(tokens)),
            (
                duplicate_token_pattern(tokens)[0],
                tl.get_duplicate_token_head_detection_pattern(tokens),
            ),
            (induction_pattern(tokens)[0], tl.get_induction_head_detection_pattern(tokens)),
        ]
        for ours, theirs in pairs:
            assert torch.equal(ours.float(), theirs.float())


@pytest.mark.parametrize(("exclude_bos", "exclude_current_token"), OPTIONS)
def test_score_from_sums_equals_masking_a_copy(exclude_bos, exclude_current_token):
    generator = torch.Generator().manual_seed(1)
    pattern = random_causal_pattern(3, 2, 9, generator)
    tokens = torch.randint(0, 3, (3, 9), generator=generator)
    sums = classic_parts(pattern, tokens)
    detections = {
        "previous_token": previous_token_pattern(9).expand(3, -1, -1),
        "duplicate_token": duplicate_token_pattern(tokens),
        "induction": induction_pattern(tokens),
    }
    for kind, detection in detections.items():
        masked = pattern.double().clone()
        if exclude_bos:
            masked[..., :, 0] = 0
        if exclude_current_token:
            masked.diagonal(dim1=-2, dim2=-1).zero_()
        direct = (masked * detection[:, None]).sum((-1, -2)) / masked.sum((-1, -2))
        ours = classic_score(
            sums, kind, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token
        )
        assert torch.allclose(ours, direct, atol=1e-12), kind
    assert sums.shape == (3, 2, len(CLASSIC_KINDS), 4)


def test_sink_scores_and_entropy_on_a_known_pattern():
    seq_len = 4
    pattern = torch.zeros(1, 1, seq_len, seq_len)
    pattern[0, 0, :, 0] = 1.0  # every query attends to the first token only
    alpha = sink_scores(pattern, causal=True)[0, 0]
    assert alpha.tolist() == [1.0, 0.0, 0.0, 0.0]
    uniform = torch.ones(1, 1, seq_len, seq_len).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    # key k is seen by T-k queries, each giving it 1/(i+1)
    expected = [sum(1 / (i + 1) for i in range(k, seq_len)) / (seq_len - k) for k in range(seq_len)]
    assert torch.allclose(sink_scores(uniform, causal=True)[0, 0], torch.tensor(expected).double())
    entropy = row_entropy(uniform)[0, 0]
    assert torch.allclose(entropy, torch.log(torch.arange(1, seq_len + 1).double()))
    assert row_entropy(pattern)[0, 0].abs().max() == 0


@pytest.mark.parametrize(("exclude_bos", "exclude_current_token"), OPTIONS)
def test_classic_scores_equal_transformer_lens_on_a_tiny_model(
    tiny_llama, exclude_bos, exclude_current_token
):
    stats = probe_patterns(tiny_llama, tokenized(tiny_llama, TEXTS), batch_size=2)
    for kind in ("previous_token", "duplicate_token", "induction"):
        ours = classic_score(
            stats.classic_sums,
            kind,
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        ).mean(0)
        theirs = head_detector.detect_head(
            tiny_llama.bridge,
            TEXTS,
            f"{kind}_head",
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        )
        assert ours.shape == theirs.shape == (2, 4)
        assert (ours - theirs.double()).abs().max() <= 1e-5, kind


def test_probe_keeps_per_prompt_sink_scores_and_a_sample(tiny_llama):
    prompts = tokenized(tiny_llama, TEXTS)
    stats = probe_patterns(tiny_llama, prompts, batch_size=3, n_sink_keys=4)
    assert stats.n_prompts == len(TEXTS)
    assert stats.sink_alpha.shape == (len(TEXTS), 2, 4, 4)
    assert torch.equal(stats.sample_tokens, prompts.tokens[0])
    length = len(prompts.tokens[0])
    assert stats.sample_patterns.shape == (2, 4, length, length)
    rows = stats.sample_patterns.float().sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=2e-3)
    eager = load_model("tiny:llama")  # seeded: the same weights, an independent path
    eager.model.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = eager.model(prompts.tokens[2][None], output_attentions=True).attentions
    direct = sink_scores(attentions[1], causal=True)[0, :, :4]
    assert torch.allclose(stats.sink_alpha[2, 1], direct, atol=1e-6)
