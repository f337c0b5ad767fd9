"""Greedy chat generation on tiny:llama: batching, padding side, ablation scoping."""

from __future__ import annotations

import pytest

from headscope.errors import HeadscopeError
from headscope.probes.ablation import Ablation
from headscope.probes.generation import PLAIN_PROMPT, chat_prompts, greedy_generate

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
