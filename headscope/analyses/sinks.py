"""First-token attention sinks: per-head sink score α_k and the sink rate (Gu et al. 2024).

Gu et al. (2024) define, for key k and a head, α_k = (1/(T−k)) Σ_{i≥k} A[i, k]
(0-based: the mean attention that k receives from the queries that can see it)
and the sink rate Sink_k^ε = 100 · mean over (layer, head) of 1[α_k > ε], with
ε = 0.3 on ≥ 100 natural-text sequences of 64 tokens. Their "Sink_1" is the
first token, key index 0 here.

Where the paper leaves it open we choose, and say so in the table's params:
the rate is computed per sequence and averaged over sequences
(``sink_rate``); the rate of the prompt-averaged α (``sink_rate_of_mean``) is
reported beside it. The per-head score in the table is α_k averaged over prompts.

Definitions, defaults and our choices: docs/methods.md, "first_token_sink".
"""

from __future__ import annotations

import numpy as np

from headscope.errors import HeadscopeError
from headscope.tables import HeadTable

SINK_EPSILON = 0.3


def detect_first_token_sink(stats, *, epsilon: float = SINK_EPSILON, key: int = 0) -> HeadTable:
    """Heads whose α_key exceeds ε (default: the first token, ε = 0.3).

    ``stats`` is a StreamingStatistics (the scan's source) or a
    PatternStatistics: both carry per-prompt ``sink_alpha``.
    """
    stored = stats.sink_alpha.shape[-1]
    if not 0 <= key < stored:
        raise HeadscopeError(
            f"sink key {key} is outside the {stored} first keys the probe kept; "
            "use a key index below that"
        )
    alpha = stats.sink_alpha[..., key].numpy()  # [prompt, layer, head]; NaN if prompt too short
    usable = ~np.isnan(alpha).any(axis=(1, 2))
    if not usable.any():
        raise HeadscopeError(f"no prompt of '{stats.prompt_set}' is longer than key {key}")
    alpha = alpha[usable]
    above = alpha > epsilon
    mean_alpha = alpha.mean(0)
    fraction_above = above.mean(0)
    evidence = [
        {
            "alpha_sd": float(alpha[:, layer, head].std()),
            "fraction_of_prompts_above_epsilon": float(fraction_above[layer, head]),
        }
        for layer in range(stats.n_layers)
        for head in range(stats.n_heads)
    ]
    per_prompt_rate = above.mean(axis=(1, 2)) * 100.0
    return HeadTable.from_matrix(
        mean_alpha,
        mean_alpha > epsilon,
        evidence,
        prompt_set=stats.prompt_set,
        params={"epsilon": epsilon, "key": key, "rate": "per prompt, then averaged"},
        summary={
            "sink_rate": float(per_prompt_rate.mean()),
            "sink_rate_sd_over_prompts": float(per_prompt_rate.std()),
            "sink_rate_of_mean": float((mean_alpha > epsilon).mean() * 100.0),
            "n_prompts": int(usable.sum()),
        },
        description=f"sink score alpha_{key} (mean attention received by key {key})",
    )
