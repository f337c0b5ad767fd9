"""Hidden attention sinks beyond the first token (ACT's criterion, Yu et al. 2024).

For a head and one input, ACT (Yu et al. 2024) scores every key by the mean
attention it receives, ``s_j = Σ_i A_ij / (T − j)``, and calls
``{j : s_j > threshold} \\ {first token}`` the head's sink set on that input
(threshold 0.1). A head "has hidden sinks" when its sink set is non-empty.

Choices of ours, all parameters:

- ``min_viewers`` (default 16): a key near the end of a prompt is seen by few
  queries, so its ``s_j`` is the attention of one or two rows and any local head
  would pass the threshold; only keys that at least this many queries see are
  candidates. The streaming probe records candidates with ``s_j`` above
  ``HIDDEN_SINK_FLOOR`` (0.05) and at least ``HIDDEN_SINK_MIN_VIEWERS`` (16)
  viewers, so thresholds below those are refused.
- ``min_fraction`` (default 0.5): the head is flagged when it has hidden sinks
  on at least this fraction of the prompts; its score is that fraction.

Evidence per head: the positions and tokens that were sinks (most frequent
first, with counts) and the mean ``s_j`` of its hidden sinks.

Definitions, defaults and our choices: docs/methods.md, "hidden_sink".
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from headscope.errors import HeadscopeError
from headscope.probes.streaming import (
    CANDIDATE_COLUMNS,
    HIDDEN_SINK_FLOOR,
    HIDDEN_SINK_MIN_VIEWERS,
)
from headscope.tables import HeadTable

DEFAULT_HIDDEN_SINK_THRESHOLD = 0.1
_COLUMN = {name: i for i, name in enumerate(CANDIDATE_COLUMNS)}


def detect_hidden_sinks(
    stats,
    *,
    threshold: float = DEFAULT_HIDDEN_SINK_THRESHOLD,
    min_viewers: int = HIDDEN_SINK_MIN_VIEWERS,
    min_fraction: float = 0.5,
) -> HeadTable:
    """Heads whose attention piles onto later keys (``s_j > threshold``, j ≥ 1)."""
    if threshold < HIDDEN_SINK_FLOOR:
        raise HeadscopeError(
            f"hidden-sink threshold {threshold} is below the floor {HIDDEN_SINK_FLOOR} "
            "under which the streaming probe keeps no candidates"
        )
    if min_viewers < HIDDEN_SINK_MIN_VIEWERS:
        raise HeadscopeError(
            f"min_viewers {min_viewers} is below the {HIDDEN_SINK_MIN_VIEWERS} viewers the "
            "streaming probe requires of a candidate"
        )
    n_layers, n_heads, n_prompts = stats.n_layers, stats.n_heads, stats.n_prompts
    rows = stats.hidden_sink_candidates.numpy()
    lengths = np.asarray(stats.lengths)
    prompt = rows[:, _COLUMN["prompt"]].astype(int)
    position = rows[:, _COLUMN["position"]].astype(int)
    viewers = lengths[prompt] - position if stats.causal else lengths[prompt]
    rows = rows[(rows[:, _COLUMN["alpha"]] > threshold) & (viewers >= min_viewers)]

    has_sink = np.zeros((n_prompts, n_layers, n_heads), dtype=bool)
    layer, head = rows[:, _COLUMN["layer"]].astype(int), rows[:, _COLUMN["head"]].astype(int)
    has_sink[rows[:, _COLUMN["prompt"]].astype(int), layer, head] = True
    fraction = has_sink.mean(0)

    evidence = []
    for l_index in range(n_layers):
        for h_index in range(n_heads):
            mine = rows[(layer == l_index) & (head == h_index)]
            positions = Counter(mine[:, _COLUMN["position"]].astype(int).tolist())
            tokens = Counter(
                stats.token_text.get(t, str(t)) for t in mine[:, _COLUMN["token"]].astype(int)
            )
            scores = mine[:, _COLUMN["alpha"]]
            evidence.append(
                {
                    "n_prompts_with_hidden_sink": int(has_sink[:, l_index, h_index].sum()),
                    "top_positions": positions.most_common(5),
                    "top_tokens": tokens.most_common(5),
                    "mean_sink_score": float(scores.mean()) if len(scores) else 0.0,
                }
            )
    flagged = fraction >= min_fraction
    all_tokens = Counter(
        stats.token_text.get(t, str(t)) for t in rows[:, _COLUMN["token"]].astype(int)
    )
    return HeadTable.from_matrix(
        fraction,
        flagged,
        evidence,
        prompt_set=stats.prompt_set,
        params={
            "threshold": threshold,
            "min_viewers": min_viewers,
            "min_fraction": min_fraction,
            "score": "fraction of prompts on which the head has a hidden sink",
        },
        summary={
            "n_heads_flagged": int(flagged.sum()),
            "n_heads_with_any_hidden_sink": int(has_sink.any(0).sum()),
            "fraction_of_head_prompt_pairs": float(has_sink.mean()),
            "top_sink_tokens": all_tokens.most_common(5),
        },
        description=f"hidden sinks: later keys with mean received attention > {threshold} (ACT)",
    )
