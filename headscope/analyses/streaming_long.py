"""StreamingLLM's headline: a rolling cache with 4 sinks past the trained context.

Xiao et al. (StreamingLLM) run Llama-2 on texts far longer than its trained
context with a fixed cache whose positions are slots inside the cache. A
plain rolling window of recent tokens collapses (the first token, where heads
park attention, has left the cache); the same cache with the first 4 tokens
kept ("attention sinks") stays at the perplexity of the trained range. Full
attention over the whole text, for comparison, breaks down past the trained
context because its relative distances were never seen in training. Their
Figure 3 plots perplexity along the text for the three.

This experiment runs one long text (``prose-book``: 16384 tokens of the
help topics, twice SmolLM2's trained context of 8192) three ways through
``headscope.probes.streaming_cache``: full attention, a rolling cache of
``cache_size`` recent tokens, and ``n_sink_tokens`` first tokens + the
``cache_size - n_sink_tokens`` most recent (the paper's budget: equal caches).
Sink keys sit at the distance the cache gives them, as in the paper's code.
Reported: perplexity per ``bucket``-token stretch of targets (their Figure 3),
over the whole text and over the targets past the trained context. The
per-head table is the attention that queries past the trained context give to
the 4 sink keys in the sink cache (flagged above ``epsilon``).

Memory stays linear in T (no T x T scores exist), which is what lets a 2-core
CPU run 16K-32K tokens; full attention still costs O(T^2) time. Opt-in: it
takes minutes. Definitions and choices: docs/methods.md, "streaming_window_long".
"""

from __future__ import annotations

import math

import torch

from headscope.analyses.sinks import SINK_EPSILON
from headscope.data import get_prompt_set
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.streaming_cache import CacheView, streaming_cache, token_nll
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

RUNS = ("full", "window", "sinks")


def run_streaming_window_long(
    handle: ModelHandle,
    *,
    cache_size: int = 1024,
    n_sink_tokens: int = 4,
    prompt_set: str = "prose-book",
    seq_len: int | None = None,
    bucket: int = 1024,
    epsilon: float = SINK_EPSILON,
    stats_by_set=None,
    batch_size: int = 1,
    on_progress: Progress | None = None,
) -> HeadTable:
    """Perplexity per ``bucket`` targets: full attention, rolling cache, cache with sinks.

    ``stats_by_set`` and ``batch_size`` are accepted for the registry's uniform
    call and unused: the experiment runs its own text, one forward per run.
    """
    del stats_by_set, batch_size
    arch = handle.arch
    if not arch.causal:
        raise NotApplicable(f"{handle.spec} is not a causal language model; it has no perplexity")
    if bucket < 1:
        raise HeadscopeError(f"bucket must be a positive number of tokens, got {bucket}")
    view_sinks = CacheView(cache_size=cache_size, n_sinks=n_sink_tokens)  # checks both
    texts = get_prompt_set(prompt_set, seq_len=seq_len)
    prompts = handle.tokenize(texts)
    if len(prompts) != 1:
        raise HeadscopeError(f"prompt set '{texts.name}' must be one text, it has {len(prompts)}")
    tokens = prompts.tokens[0]
    length = len(tokens)
    if length <= cache_size:
        raise HeadscopeError(
            f"the {length}-token text fits in the {cache_size}-token cache; nothing is evicted"
        )
    trained = arch.max_positions or length
    count_from = min(trained, length - 1)  # queries past the trained context (or the last one)
    views = {
        "full": CacheView(),
        "window": CacheView(cache_size=cache_size),
        "sinks": view_sinks,
    }
    advance = counter(on_progress, f"{texts.name} (streaming cache, {length} tokens)", len(views))
    nll, sink_attention = {}, None
    for name, view in views.items():
        with streaming_cache(handle, view, count_from=count_from) as session:
            nll[name] = token_nll(handle, tokens)
        if name == "sinks":
            sink_attention = (session.sink_attention / (length - count_from)).numpy()
        advance()
    summary = _summary(nll, bucket=bucket, trained=trained)
    summary["late_query_sink_rate"] = float((sink_attention > epsilon).mean() * 100.0)
    evidence = [
        {"sink_attention_past_trained_context": float(sink_attention[layer, head])}
        for layer in range(arch.n_layers)
        for head in range(arch.n_heads)
    ]
    return HeadTable.from_matrix(
        sink_attention,
        sink_attention > epsilon,
        evidence,
        prompt_set=prompts.name,
        params={
            "cache_size": cache_size,
            "n_sink_tokens": n_sink_tokens,
            "budget": f"{cache_size} recent (window) or {n_sink_tokens} first + "
            f"{cache_size - n_sink_tokens} recent (sinks); full attention sees every key",
            "positions": "slots inside the cache (sink keys at their cache distance)",
            "seq_len": length,
            "trained_context": trained,
            "bucket": bucket,
            "epsilon": epsilon,
            "protocol": "xiao2023",
            "protocol_note": "rolling cache with cache positions, equal budget, one long text",
            "score": "attention to the sink keys of queries past the trained context (sink cache)",
        },
        summary=summary,
        description=f"StreamingLLM past the trained context ({length} tokens, trained "
        f"{trained}): full vs {cache_size}-token cache with 0 or {n_sink_tokens} sinks",
    )


def _summary(nll: dict[str, torch.Tensor], *, bucket: int, trained: int) -> dict:
    """Perplexities overall, past the trained context and per ``bucket`` targets.

    ``nll[name][i]`` is the loss of the target at position i + 1; bucket b holds
    the targets at positions [b * bucket + 1, (b + 1) * bucket].
    """
    n_targets = len(next(iter(nll.values())))
    starts = list(range(0, n_targets, bucket))
    summary: dict = {
        "n_tokens": n_targets,
        "n_tokens_past_trained_context": max(0, n_targets - trained),
        "bucket_end": [min(start + bucket, n_targets) for start in starts],
    }
    for name, losses in nll.items():
        summary[f"ppl_{name}"] = _ppl(losses)
        summary[f"ppl_{name}_past_trained_context"] = _ppl(losses[trained:])
        summary[f"ppl_{name}_by_bucket"] = [_ppl(losses[s : s + bucket]) for s in starts]
    return summary


def _ppl(losses: torch.Tensor) -> float:
    return math.exp(float(losses.mean())) if len(losses) else math.nan
