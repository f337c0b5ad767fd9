"""Greedy chat generation: what a model *says* to a request, with or without an ablation.

Safety heads are verified by generation (METHODS.md §5): the share of held-out
harmful requests a model refuses, greedy, with a fixed number of new tokens,
judged by ``headscope.analyses.refusal``. This module turns requests into chat
prompts (``chat_prompts``) and generates (``greedy_generate``).

- Prompts go through the tokenizer's own chat template with the generation
  prompt added, system prompt and all (SmolLM2's template adds its default
  system prompt; that is the model as shipped). Tokenizers without a template
  (the ``tiny:`` test models) get a plain ``User: ...\\nAssistant:`` prompt.
- Generation is plain Hugging Face ``generate`` on the HF module with greedy
  decoding, so it runs inside ``handle.ablated(..., bridge=False)``: the
  ablation hooks sit on the HF modules. Batches are left-padded (the
  tokenizer's padding side is restored afterwards) and the model gets
  positions that skip the padding, so a request's continuation does not depend
  on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from headscope.errors import HeadscopeError
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import model_body
from headscope.progress import Progress, counter

PLAIN_PROMPT = "User: {request}\nAssistant:"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts(handle: ModelHandle, requests: Sequence[str]) -> list[str]:
    """Each request as the text the model sees before its answer (see module docstring)."""
    tokenizer = handle.tokenizer
    if not has_chat_template(tokenizer):
        return [PLAIN_PROMPT.format(request=r) for r in requests]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True
        )
        for r in requests
    ]


def prompt_ids(handle: ModelHandle, requests: Sequence[str]) -> list[list[int]]:
    """Token ids of the chat prompts (a template's own special tokens; BOS first otherwise)."""
    tokenizer = handle.tokenizer
    ids = [
        list(tokenizer(text, add_special_tokens=False).input_ids)
        for text in chat_prompts(handle, requests)
    ]
    bos = handle.tokenizer.bos_token_id
    if not has_chat_template(tokenizer) and bos is not None:
        ids = [[bos, *row] for row in ids]
    return ids


def pad_id_for_generation(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (raise when it has neither)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise HeadscopeError("this tokenizer has neither a pad nor an EOS token; cannot batch prompts")


def greedy_generate(
    handle: ModelHandle,
    requests: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    on_progress: Progress | None = None,
) -> list[str]:
    """Greedy continuation of each request's chat prompt: new tokens only, decoded.

    Deterministic; special tokens are skipped in the text; generation stops
    early at the model's end-of-turn token. Runs under ``torch.inference_mode``.
    """
    ids = greedy_token_ids(
        handle, requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
        on_progress=on_progress,
    )  # fmt: skip
    return [handle.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def greedy_token_ids(
    handle: ModelHandle,
    requests: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    on_progress: Progress | None = None,
) -> list[list[int]]:
    """The new token ids of ``greedy_generate``: up to and including the EOS, no padding."""
    if not handle.arch.causal:
        raise HeadscopeError(f"generation needs a causal language model; {handle.spec} is not one")
    if max_new_tokens < 1 or batch_size < 1:
        raise HeadscopeError("max_new_tokens and batch_size must be at least 1")
    tokenizer = handle.tokenizer
    pad = pad_id_for_generation(tokenizer)
    all_ids = prompt_ids(handle, requests)
    out: list[list[int]] = [[] for _ in all_ids]
    advance = counter(on_progress, f"generation ({max_new_tokens} new tokens)", len(all_ids))
    # longest first: rows of one batch have similar lengths, so little padding
    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    side = getattr(tokenizer, "padding_side", "right")
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = _generate_batch(handle, [all_ids[i] for i in chunk], pad, max_new_tokens)
            for index, row in zip(chunk, batch, strict=True):
                out[index] = row
            advance(len(chunk))
    finally:
        tokenizer.padding_side = side
    return out


def _generate_batch(
    handle: ModelHandle, rows: list[list[int]], pad: int, max_new_tokens: int
) -> list[list[int]]:
    """Left-pad ``rows``, generate greedily; each row's new ids up to its first EOS."""
    device = handle.device
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    eos = handle.tokenizer.eos_token_id
    with torch.inference_mode():
        generated = handle.model.generate(
            input_ids=tokens.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    result = []
    for row in generated[:, width:].cpu().tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        result.append(row)
    return result


def answer_nll(
    handle: ModelHandle,
    requests: Sequence[str],
    answers: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
) -> float:
    """Mean negative log-likelihood (nats per token) of fixed answers after each request.

    Teacher-forced: each request's chat prompt followed by its answer's token
    ids (``greedy_token_ids`` output, EOS included) in one forward; the model's
    log-probability of every answer token given what precedes it. The mean is
    over all answer tokens of all requests (empty answers count nothing).
    Under ``handle.ablated(...)`` it says how far an ablation moves the model
    away from answers it gave clean: the harmless side of the safety check.
    Only the answer positions are unembedded, so the logits stay small.
    """
    if len(requests) != len(answers):
        raise HeadscopeError(f"{len(requests)} requests but {len(answers)} answers")
    if batch_size < 1:
        raise HeadscopeError("batch_size must be at least 1")
    device = handle.device
    pad = pad_id_for_generation(handle.tokenizer)
    rows = [
        (prompt, list(map(int, answer)))
        for prompt, answer in zip(prompt_ids(handle, requests), answers, strict=True)
        if len(answer)
    ]
    total, count = 0.0, 0
    body = model_body(handle.model)
    unembed = handle.model.get_output_embeddings()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            where_row, where_pos, targets = [], [], []
            for i, (prompt, answer) in enumerate(chunk):
                full = prompt + answer
                tokens[i, : len(full)] = torch.tensor(full, dtype=torch.long)
                mask[i, : len(full)] = 1
                # position t predicts token t + 1: the answer's tokens are predicted
                # from the prompt's last position onwards
                where_row += [i] * len(answer)
                where_pos += range(len(prompt) - 1, len(full) - 1)
                targets += answer
            hidden = body(input_ids=tokens.to(device), attention_mask=mask.to(device))
            picked = hidden.last_hidden_state[
                torch.tensor(where_row, device=device), torch.tensor(where_pos, device=device)
            ]
            logits = unembed(picked).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            chosen = log_probs[
                torch.arange(len(targets), device=device), torch.tensor(targets, device=device)
            ]
            total -= float(chosen.sum())
            count += len(targets)
    return total / count if count else float("nan")
