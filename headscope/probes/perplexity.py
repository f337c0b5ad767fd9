"""Perplexity through the headscope attention, with optional interventions.

Two sink experiments need the model's loss rather than its attention alone:

- StreamingLLM (Xiao et al.): the loss under window attention that keeps only
  the last ``window`` keys, with and without the first ``keep_first`` tokens.
  The window is a mask on a full-sequence forward (keys keep their original
  positions), which for a causal model equals a KV cache that evicts keys
  older than the window: each cached key was computed under the same window.
  StreamingLLM's own cache re-numbers positions inside the cache; with RoPE
  this changes only the distance between late queries and the kept first
  tokens, and our texts stay inside the model's trained context.
- Massive activations (Sun et al.): the loss when chosen residual-stream
  entries are overwritten (``edit_block``: a block index and a function that
  edits that block's output in place).

The loss is kept per target position, so a caller can report the perplexity
of the positions past the window separately from the whole text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.data.prompt_sets import PaddedBatch
from headscope.errors import HeadscopeError
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import block_list
from headscope.probes.streaming import (
    StreamingAccumulator,
    StreamingStatistics,
    forward_batch,
    streaming_attention,
    token_texts,
)
from headscope.progress import Progress, counter

#: edit(hidden [batch, T, d_model], lengths [batch]) changes the block output in place
BlockEdit = Callable[[Tensor, Tensor], None]


@dataclass(kw_only=True)
class Perplexity:
    """Summed negative log-likelihood (nats) and token counts per target position."""

    nll_by_position: Float[Tensor, " query_pos"]
    count_by_position: Float[Tensor, " query_pos"]

    def value(self, start: int = 0) -> float:
        """exp(mean NLL) over the targets at positions >= ``start`` (0 is never a target)."""
        count = self.count_by_position[start:].sum()
        if count == 0:
            return math.nan
        return math.exp(float(self.nll_by_position[start:].sum() / count))

    @property
    def n_tokens(self) -> int:
        return int(self.count_by_position.sum())


@contextlib.contextmanager
def _edited_block(handle: ModelHandle, edit: tuple[int, BlockEdit] | None, lengths_of):
    """Scoped forward hook that lets ``edit`` rewrite one block's output."""
    if edit is None:
        yield
        return
    layer, function = edit
    block = block_list(handle.model, handle.arch.n_layers)[layer]

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        function(hidden, lengths_of())
        return output

    registered = block.register_forward_hook(hook)
    try:
        yield
    finally:
        registered.remove()


def measure_perplexity(
    handle: ModelHandle,
    prompts,
    *,
    batch_size: int = 8,
    window: int | None = None,
    keep_first: int = 0,
    edit_block: tuple[int, BlockEdit] | None = None,
    collect_statistics: bool = False,
    on_progress: Progress | None = None,
) -> tuple[Perplexity, StreamingStatistics | None]:
    """Next-token perplexity of ``prompts`` (TokenizedPrompts), per target position.

    With ``collect_statistics`` the streaming statistics of the same forwards
    come back too (e.g. the late queries' attention to the first token).
    """
    if not handle.arch.causal:
        raise HeadscopeError(f"perplexity needs a causal language model; {handle.spec} is not one")
    if window is not None and window < 1:
        raise HeadscopeError(f"window must be at least 1, got {window}")
    if keep_first < 0:
        raise HeadscopeError(f"keep_first must be non-negative, got {keep_first}")
    length = max(prompts.lengths)
    nll = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    accumulator = StreamingAccumulator(handle, 1) if collect_statistics else None
    current: dict[str, Tensor] = {}
    advance = counter(on_progress, f"{prompts.name} (perplexity)", len(prompts))
    with streaming_attention(handle), _edited_block(handle, edit_block, lambda: current["lengths"]):
        for batch in prompts.padded(batch_size, handle.pad_id):
            current["lengths"] = batch.lengths
            if accumulator is not None:
                accumulator.start_batch(batch)
            logits = forward_batch(
                handle, batch, accumulator=accumulator,
                window=window, keep_first=keep_first, with_logits=True,
            )  # fmt: skip
            if accumulator is not None:
                accumulator.end_batch()
            _add_nll(logits, batch, nll, count)
            advance(len(batch.indices))
    statistics = None
    if accumulator is not None:
        texts = token_texts(handle.tokenizer, accumulator.token_ids())
        statistics = accumulator.result(prompts.name, prompts.lengths, texts)
    return Perplexity(nll_by_position=nll, count_by_position=count), statistics


def plain_perplexity(
    model: torch.nn.Module,
    prompts,
    *,
    pad_id: int,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> Perplexity:
    """Next-token perplexity of any causal LM module with its own attention (SDPA).

    For measurements that need no statistics and no attention override, such
    as perplexity under dropped layers (hooks on ``model``) or of a pruned copy.
    """
    device = next(model.parameters()).device
    length = max(prompts.lengths)
    nll = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    advance = counter(on_progress, f"{prompts.name} (perplexity)", len(prompts))
    for batch in prompts.padded(batch_size, pad_id):
        mask = batch.mask.long()
        with torch.inference_mode():
            logits = model(
                input_ids=batch.tokens.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
        _add_nll(logits, batch, nll, count)
        advance(len(batch.indices))
    return Perplexity(nll_by_position=nll, count_by_position=count)


def _add_nll(logits: Tensor, batch: PaddedBatch, nll: Tensor, count: Tensor) -> None:
    """Add -log p(token t | < t) at target position t (t >= 1), skipping padding."""
    tokens = batch.tokens
    for row, length in enumerate(batch.lengths.tolist()):
        for start, stop in _chunks(length - 1, 512):  # bounds the float32 log-softmax copy
            log_probs = torch.log_softmax(logits[row, start:stop].float(), dim=-1)
            targets = tokens[row, start + 1 : stop + 1].to(log_probs.device)
            picked = -log_probs.gather(-1, targets[:, None])[:, 0]
            nll[start + 1 : stop + 1] += picked.double().cpu()
            count[start + 1 : stop + 1] += 1


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)
