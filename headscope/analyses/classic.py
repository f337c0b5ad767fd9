"""Previous-token, duplicate-token and induction heads (docs/methods.md, "classic_heads").

Scores are TransformerLens ``head_detector``'s "mul" measure, Σ(A'⊙P) / ΣA'
per prompt, averaged over prompts, where P is the detection pattern and A' the
attention pattern with column 0 (``exclude_bos``) and/or the diagonal
(``exclude_current_token``) zeroed. They are computed from the probe's stored
sums (see ``probes.patterns``), and a test holds them equal to TransformerLens's
own ``detect_head`` on the same model and prompts.

The flag threshold (default 0.4) is ours: TransformerLens reports scores only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from headscope.probes.patterns import PatternStatistics, classic_score
from headscope.tables import HeadTable

DEFAULT_THRESHOLD = 0.4


def classic_head_scores(
    stats: PatternStatistics, kind: str, *, exclude_bos: bool, exclude_current_token: bool
) -> np.ndarray:
    """Per-prompt scores [prompt, layer, head] of ``kind``."""
    return classic_score(
        stats.classic_sums,
        kind,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
    ).numpy()


def _detect(
    kind: str,
    stats: PatternStatistics,
    *,
    threshold: float,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> HeadTable:
    per_prompt = classic_head_scores(
        stats, kind, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token
    )
    mean = per_prompt.mean(0)
    spread = per_prompt.std(0)
    evidence = [
        {"sd_over_prompts": float(spread[layer, head]), "n_prompts": stats.n_prompts}
        for layer in range(stats.n_layers)
        for head in range(stats.n_heads)
    ]
    return HeadTable.from_matrix(
        mean,
        mean > threshold,
        evidence,
        prompt_set=stats.prompt_set,
        params={
            "threshold": threshold,
            "exclude_bos": exclude_bos,
            "exclude_current_token": exclude_current_token,
            "error_measure": "mul",
        },
        summary={"n_flagged": int((mean > threshold).sum()), "max_score": float(mean.max())},
        description=f"TransformerLens 'mul' {kind} score, mean over prompts",
    )


def _classic_detector(kind: str, doc: str) -> Callable[..., HeadTable]:
    """One of the three detectors. They share this signature, which is their
    declaration: the registry reads their parameters and defaults from it."""

    def detect(
        stats: PatternStatistics,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        exclude_bos: bool = False,
        exclude_current_token: bool = False,
    ) -> HeadTable:
        return _detect(
            kind,
            stats,
            threshold=threshold,
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        )

    detect.__name__ = detect.__qualname__ = f"detect_{kind}"
    detect.__doc__ = doc
    return detect


detect_previous_token = _classic_detector(
    "previous_token", "Heads attending to the token just before the query."
)
detect_duplicate_token = _classic_detector(
    "duplicate_token", "Heads attending to earlier copies of the query token."
)
detect_induction = _classic_detector(
    "induction", "Heads attending to the token after an earlier copy of the query token."
)
