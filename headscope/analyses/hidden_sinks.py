"""Hidden attention sinks beyond the first token (ACT's criterion, Yu et al. 2024).

For a head and one input, ACT (Yu et al. 2024) scores every key by the mean
attention it receives, ``s_j = Σ_i A_ij / (T − j)``, and calls
``{j : s_j > threshold} \\ {first token}`` the head's sink set on that input
(threshold 0.1). A head "has hidden sinks" when its sink set is non-empty.

Three protocols (``protocol``), all computed on every run; the table follows
the chosen one and its summary (``by_protocol``) gives the counts of each:

- ``"headscope"`` (default): the sink set is {j ≥ 1 : s_j > threshold, at
  least ``min_viewers`` (default 16) queries see j}. A key near the end of a
  prompt is seen by few queries, so its ``s_j`` is the attention of one or two
  rows and any local head would pass the threshold (the last key's s_j is the
  last query's attention to itself).
- ``"act"``: ACT's rule as the paper states it: {j : s_j > threshold} less the
  first token, no viewer floor (``min_viewers`` is not used).
- ``"act_code"``: ACT's rule as the authors' code runs it (``atten_process_cal``
  in their ``models/llama_modelling_aug.py``): the keys with s_j > threshold,
  no viewer floor, less the *first key found* (``indices[1:]``): the first
  token whenever it passes, otherwise the earliest later key that passes (so a
  head whose first token does not pass loses one hidden sink).

All share, as parameters:

- ``threshold`` (0.1, ACT's): the streaming probe records candidates with
  ``s_j`` above ``HIDDEN_SINK_FLOOR`` (0.05), so thresholds below it are refused.
- ``min_fraction`` (default 0.5, ours): ACT works per input; the head is
  flagged when it has hidden sinks on at least this fraction of the prompts;
  its score is that fraction.

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
#: protocol name -> the one-line description recorded in the table
PROTOCOLS = {
    "headscope": "headscope: keys j >= 1 with s_j > threshold that >= min_viewers queries see",
    "act": "ACT (Yu et al. 2024), as the paper states it: keys with s_j > threshold "
    "less the first token, no viewer floor",
    "act_code": "ACT (Yu et al. 2024), as its code runs: keys with s_j > threshold, no "
    "viewer floor, less the first key found (the first token whenever it passes)",
}


def _sink_rows(stats, rows: np.ndarray, protocol: str, threshold: float, min_viewers: int):
    """The candidate rows that are hidden sinks under ``protocol``."""
    rows = rows[rows[:, _COLUMN["alpha"]] > threshold]
    prompt = rows[:, _COLUMN["prompt"]].astype(int)
    position = rows[:, _COLUMN["position"]].astype(int)
    if protocol == "headscope":
        lengths = np.asarray(stats.lengths)
        viewers = lengths[prompt] - position if stats.causal else lengths[prompt]
        return rows[viewers >= min_viewers]
    if protocol == "act":
        return rows
    # ACT drops the first passing key: the first token if it passes, else the earliest row
    layer, head = rows[:, _COLUMN["layer"]].astype(int), rows[:, _COLUMN["head"]].astype(int)
    first_alpha = stats.sink_alpha[..., 0].numpy()[prompt, layer, head]
    group = (prompt * stats.n_layers + layer) * stats.n_heads + head
    order = np.lexsort((position, group))  # by head and prompt, then by position
    sorted_group = group[order]
    earliest = np.zeros(len(rows), dtype=bool)
    earliest[order] = np.diff(sorted_group, prepend=-1) != 0
    return rows[~earliest | (first_alpha > threshold)]


def detect_hidden_sinks(
    stats,
    *,
    protocol: str = "headscope",
    threshold: float = DEFAULT_HIDDEN_SINK_THRESHOLD,
    min_viewers: int = HIDDEN_SINK_MIN_VIEWERS,
    min_fraction: float = 0.5,
) -> HeadTable:
    """Heads whose attention piles onto later keys (``s_j > threshold``, j ≥ 1)."""
    if protocol not in PROTOCOLS:
        raise HeadscopeError(
            f"unknown hidden_sink protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}"
        )
    if threshold < HIDDEN_SINK_FLOOR:
        raise HeadscopeError(
            f"hidden-sink threshold {threshold} is below the floor {HIDDEN_SINK_FLOOR} "
            "under which the streaming probe keeps no candidates"
        )
    if min_viewers < 1:
        raise HeadscopeError(f"min_viewers must be at least 1, got {min_viewers}")
    n_layers, n_heads, n_prompts = stats.n_layers, stats.n_heads, stats.n_prompts
    candidates = stats.hidden_sink_candidates.numpy()

    def prompts_with_sinks(rows: np.ndarray) -> np.ndarray:
        found = np.zeros((n_prompts, n_layers, n_heads), dtype=bool)
        index = [rows[:, _COLUMN[c]].astype(int) for c in ("prompt", "layer", "head")]
        found[tuple(index)] = True
        return found

    rows_by_protocol = {
        name: _sink_rows(stats, candidates, name, threshold, min_viewers) for name in PROTOCOLS
    }
    by_protocol = {}
    for name, found_rows in rows_by_protocol.items():  # every protocol's counts, side by side
        found = prompts_with_sinks(found_rows)
        by_protocol[name] = {
            "n_heads_flagged": int((found.mean(0) >= min_fraction).sum()),
            "n_heads_with_any_hidden_sink": int(found.any(0).sum()),
        }
    rows = rows_by_protocol[protocol]
    has_sink = prompts_with_sinks(rows)
    layer, head = rows[:, _COLUMN["layer"]].astype(int), rows[:, _COLUMN["head"]].astype(int)
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
            "protocol": protocol,
            "protocol_note": PROTOCOLS[protocol],
            "threshold": threshold,
            "min_viewers": min_viewers if protocol == "headscope" else None,
            "min_fraction": min_fraction,
            "score": "fraction of prompts on which the head has a hidden sink",
        },
        summary={
            "n_heads_flagged": int(flagged.sum()),
            "n_heads_with_any_hidden_sink": int(has_sink.any(0).sum()),
            "by_protocol": by_protocol,
            "fraction_of_head_prompt_pairs": float(has_sink.mean()),
            "top_sink_tokens": all_tokens.most_common(5),
        },
        description=f"hidden sinks: later keys with mean received attention > {threshold} (ACT)",
    )
