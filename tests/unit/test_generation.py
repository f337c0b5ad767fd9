"""Greedy chat generation on tiny:llama: batching, padding side, ablation scoping;
the teacher-forced answer NLL against a plain full forward."""

from __future__ import annotations

import math

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.probes.ablation import Ablation
from headscope.probes.generation import (
    PLAIN_PROMPT,
    answer_nll,
    chat_prompts,
    greedy_generate,
    greedy_token_ids,
    prompt_ids,
)

REQUESTS = [
    "hello",
    "a much longer request about the class statement, the module and the function call",
    "x",
]


def test_plain_prompt_without_template(tiny_llama):
    assert chat_prompts(tiny_llama, ["hi"]) == [PLAIN_PROMPT.format(request="hi")]


def test_batched_equals_alone_and_padding_side_restored(tiny_llama):
    side = tiny_llama.tokenizer.padding_side
    batched = greedy_generate(tiny_llama, REQUESTS, max_new_tokens=8, batch_size=3)
    alone = [greedy_generate(tiny_llama, [r], max_new_tokens=8)[0] for r in REQUESTS]
    assert batched == alone
    assert all(text for text in batched)
    assert tiny_llama.tokenizer.padding_side == side
    assert greedy_generate(tiny_llama, REQUESTS, max_new_tokens=8) == batched  # deterministic


def test_generation_sees_ablation_and_is_restored(tiny_llama):
    before = greedy_generate(tiny_llama, REQUESTS, max_new_tokens=8)
    arch = tiny_llama.arch
    every_head = tuple((layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads))
    with tiny_llama.ablated(Ablation(method="zero", heads=every_head), bridge=False):
        ablated = greedy_generate(tiny_llama, REQUESTS, max_new_tokens=8)
    assert ablated != before
    assert greedy_generate(tiny_llama, REQUESTS, max_new_tokens=8) == before


def test_progress_counts_requests(tiny_llama):
    seen = []
    greedy_generate(tiny_llama, REQUESTS, max_new_tokens=2, batch_size=2,
                    on_progress=lambda *a: seen.append(a))  # fmt: skip
    assert seen[-1][1:] == (3, 3) and "generation" in seen[-1][0]


def test_bad_arguments(tiny_llama):
    with pytest.raises(HeadscopeError):
        greedy_generate(tiny_llama, REQUESTS, max_new_tokens=0)


def test_chat_template_is_used(tiny_llama):
    import copy
    from dataclasses import replace

    tokenizer = copy.deepcopy(tiny_llama.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    handle = replace(tiny_llama, tokenizer=tokenizer)
    assert chat_prompts(handle, ["hi"]) == ["<|bos|>user: hi\nassistant:"]
    assert len(greedy_generate(handle, ["hi"], max_new_tokens=3)) == 1


def _plain_nll(handle, requests, answers) -> float:
    """The reference: one full forward per request with its answer, full logits."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompt_ids(handle, requests), answers, strict=True):
        tokens = torch.tensor([prompt + list(answer)])
        with torch.no_grad():
            log_probs = torch.log_softmax(handle.model(input_ids=tokens).logits[0].float(), -1)
        for offset, token in enumerate(answer):
            total -= float(log_probs[len(prompt) - 1 + offset, token])
            count += 1
    return total / count


def test_answer_nll_equals_the_plain_forward_at_any_batch_size(tiny_llama):
    answers = greedy_token_ids(tiny_llama, REQUESTS, max_new_tokens=6)
    answers[1] = answers[1][:2]  # rows of different lengths share a padded batch
    expected = _plain_nll(tiny_llama, REQUESTS, answers)
    for batch_size in (1, 2, 8):
        assert answer_nll(tiny_llama, REQUESTS, answers, batch_size=batch_size) == pytest.approx(
            expected, rel=1e-4
        )
    # an empty answer adds nothing; no answers at all give nan
    with_empty = answer_nll(tiny_llama, [*REQUESTS, "y"], [*answers, []])
    assert with_empty == pytest.approx(expected, rel=1e-4)
    assert math.isnan(answer_nll(tiny_llama, ["y"], [[]]))


def test_answer_nll_sees_an_ablation(tiny_llama):
    answers = greedy_token_ids(tiny_llama, REQUESTS, max_new_tokens=6)
    clean = answer_nll(tiny_llama, REQUESTS, answers)
    arch = tiny_llama.arch
    every_head = tuple((layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads))
    with tiny_llama.ablated(Ablation(method="zero", heads=every_head), bridge=False):
        ablated = answer_nll(tiny_llama, REQUESTS, answers)
        assert ablated == pytest.approx(_plain_nll(tiny_llama, REQUESTS, answers), rel=1e-4)
    assert ablated != pytest.approx(clean, rel=1e-3)
    with pytest.raises(HeadscopeError):
        answer_nll(tiny_llama, REQUESTS, answers[:1])
