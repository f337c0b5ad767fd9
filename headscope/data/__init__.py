"""Built-in prompt sets and prompt files: what the probes feed a model.

``get_prompt_set("prose")`` (or a path to a .txt/.jsonl file) gives a frozen
``PromptSet``; ``PromptSet.tokenize(tokenizer, bos_token_id=...)`` gives the
``TokenizedPrompts`` a probe batches with ``batches(batch_size)`` (equal
lengths, no padding) or ``padded(batch_size, pad_id)`` (right-padded, each
``PaddedBatch`` with its mask). The split keeps prompt content (hashed without a
tokenizer) apart from the tokens a given model saw (hashed again), so a run
records both. See ``prompt_sets`` for the kinds and BOS handling and ``catalog``
for the built-in sets.
"""

from __future__ import annotations

from headscope.data.catalog import builtin_prompt_sets, get_prompt_set, prompt_set_from_file
from headscope.data.prompt_sets import (
    PROMPT_SET_KINDS,
    PaddedBatch,
    PromptSet,
    PromptSetKind,
    TokenizedPrompts,
    ordinary_token_ids,
)

__all__ = [
    "PROMPT_SET_KINDS",
    "PaddedBatch",
    "PromptSet",
    "PromptSetKind",
    "TokenizedPrompts",
    "builtin_prompt_sets",
    "get_prompt_set",
    "ordinary_token_ids",
    "prompt_set_from_file",
]
