"""StreamingLLM reproduced: window attention with and without the first tokens.

Xiao et al. show that window attention (each query sees only the last W keys)
collapses once the text is longer than the window: the first token, where
heads park their attention, falls out of view. Keeping the first 4 tokens in
view recovers the full-attention perplexity.

This experiment runs the model three times on a long prose text through the
headscope attention: full attention, a W-key window keeping no initial token,
and the paper's cache of the same budget: the first ``n_sink_tokens`` tokens
plus the last W - ``n_sink_tokens`` (4 + 252 for W = 256), so every late
query sees W keys in both windowed runs (Xiao et al.'s "4 attention sinks +
recent tokens" cache). Perplexities are reported over all targets and over
the targets past the window: a query at position t >= W is the first whose
view differs from full attention, so the first counted target is W + 1. The
per-head table is the paper's per-head sink statistic: the mean attention
that queries past the window give to the first token, under full attention
(flagged above ``epsilon``).

Here the keys keep their original positions (a mask on one forward); inside
the model's trained context that is what matters. The paper's headline lives
past the trained context, where its cache's re-numbered positions matter:
``streaming_window_long`` (``headscope.analyses.streaming_long``) runs that.

Layers with a sliding window of their own (Gemma 3's local layers) keep it:
the window replaces full attention only (see ``probes/streaming.py``).

The text length T must be at least 4 W (the issue's floor); when the model's
context is too short for the default window, the window shrinks to T / 8 and
the table's params say so.

Definitions, defaults and our choices: docs/methods.md, "streaming_window".
"""

from __future__ import annotations

import dataclasses

from headscope.analyses.sinks import SINK_EPSILON
from headscope.data import get_prompt_set
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.perplexity import measure_perplexity
from headscope.progress import Progress
from headscope.tables import HeadTable


def run_streaming_window(
    handle: ModelHandle,
    *,
    window: int = 256,
    n_sink_tokens: int = 4,
    prompt_set: str = "prose-long",
    seq_len: int | None = None,
    epsilon: float = SINK_EPSILON,
    stats_by_set=None,
    batch_size: int = 1,
    on_progress: Progress | None = None,
) -> HeadTable:
    """Perplexity with full, window (0 sinks) and window (``n_sink_tokens`` sinks) attention.

    ``stats_by_set`` is accepted for the registry's uniform call and unused: the
    experiment runs its own long text. Texts run one at a time (they are long).
    """
    del stats_by_set, batch_size
    arch = handle.arch
    if not arch.causal:
        raise NotApplicable(f"{handle.spec} is not a causal language model; it has no perplexity")
    if not 0 <= n_sink_tokens < window - 1:
        raise HeadscopeError(
            f"n_sink_tokens ({n_sink_tokens}) must be in [0, window - 1 = {window - 1}): the "
            "window keeps that many first tokens and fills the rest with recent ones"
        )
    texts = get_prompt_set(prompt_set, seq_len=seq_len)
    length = texts.seq_len
    if arch.max_positions and length > arch.max_positions:
        length = arch.max_positions
        texts = dataclasses.replace(texts, seq_len=length)
    requested_window = window
    if length < 4 * window:
        window = max(length // 8, n_sink_tokens + 2)
    if length < 4 * window:
        raise HeadscopeError(f"a {length}-token text is too short for window attention tests")
    prompts = handle.tokenize(texts)
    runs = {
        "full": dict(window=None),
        "window_0_sinks": dict(window=window, keep_first=0),
        f"window_{n_sink_tokens}_sinks": dict(
            window=window - n_sink_tokens, keep_first=n_sink_tokens
        ),
    }
    first_counted = window + 1  # the target of query W, the first that sees fewer keys
    perplexities, statistics = {}, None
    for name, attention in runs.items():
        perplexity, stats = measure_perplexity(
            handle, prompts, batch_size=1, collect_statistics=name == "full",
            on_progress=on_progress, **attention,
        )  # fmt: skip
        perplexities[name] = perplexity
        statistics = statistics or stats
    late_sink = statistics.profiles["sink_mass"][..., window:].mean(-1).numpy()  # [layer, head]
    summary = {}
    for name, perplexity in perplexities.items():
        summary[f"ppl_{name}"] = perplexity.value()
        summary[f"ppl_{name}_past_window"] = perplexity.value(start=first_counted)
    summary["n_tokens"] = perplexities["full"].n_tokens
    summary["n_tokens_past_window"] = int(
        perplexities["full"].count_by_position[first_counted:].sum()
    )
    summary["late_query_sink_rate"] = float((late_sink > epsilon).mean() * 100.0)
    evidence = [
        {"first_token_attention_by_late_queries": float(late_sink[layer, head])}
        for layer in range(arch.n_layers)
        for head in range(arch.n_heads)
    ]
    return HeadTable.from_matrix(
        late_sink,
        late_sink > epsilon,
        evidence,
        prompt_set=prompts.name,
        params={
            "window": window,
            "requested_window": requested_window,
            "n_sink_tokens": n_sink_tokens,
            "budget": f"every query past the window sees {window} keys: {window} recent "
            f"(0 sinks) or {n_sink_tokens} first + {window - n_sink_tokens} recent",
            "first_counted_target": first_counted,
            "seq_len": length,
            "n_texts": len(prompts),
            "epsilon": epsilon,
            "score": "mean attention to the first token of queries past the window "
            "(full attention)",
        },
        summary=summary,
        description=f"StreamingLLM: perplexity of a {window}-key window of recent tokens vs "
        f"{n_sink_tokens} first + {window - n_sink_tokens} recent",
    )
