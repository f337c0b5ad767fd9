"""Value-state drain and residual-state peak of the sink token (Guo et al. 2024).

Guo et al. explain the first-token sink as a mechanism: the sink token's value
vectors are small (attending to it adds almost nothing: the *value-state
drain*) while its residual-stream norm is far above the other tokens' (the
*residual-state peak*). Per layer, from the streaming probe's per-position
norms (averaged over the prompts that have that position):

- value drain: ``‖v_sink‖ / mean_{t ≠ sink} ‖v_t‖`` per KV head; the layer's
  score is the mean over its KV heads; flagged when below ``max_ratio``.
- residual peak: ``‖h_sink‖ / median_{t ≠ sink} ‖h_t‖`` of the block output;
  flagged when above ``min_ratio``.

The paper publishes no thresholds; ours (0.5 and 10) are parameters. The sink
token is position ``position`` (default 0, the first-token sink); the evidence
also gives the ratios of the other first positions, so a hidden sink at a
fixed position (e.g. a delimiter right after BOS) shows too.

Definitions, defaults and our choices: docs/methods.md, "value_drain" and
"residual_peak".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headscope.errors import HeadscopeError
from headscope.tables import LayerTable

_EVIDENCE_POSITIONS = 8


def _others(norms: np.ndarray, position: int) -> np.ndarray:
    keep = np.ones(norms.shape[-1], dtype=bool)
    keep[position] = False
    return norms[..., keep]


def _check_position(stats, position: int) -> int:
    length = stats.residual_norm_by_pos.shape[-1]
    if not 0 <= position < length - 1:
        raise HeadscopeError(f"sink position {position} must be below the prompt length {length}")
    return length


def value_ratios(stats, position: int) -> np.ndarray:
    """[layer, kv_head] ‖v_position‖ / mean of the other positions' ‖v‖."""
    norms = stats.value_norm_by_pos.numpy()
    return norms[..., position] / _others(norms, position).mean(-1)


def residual_ratios(stats, position: int) -> np.ndarray:
    """[layer] ‖h_position‖ / median of the other positions' ‖h‖."""
    norms = stats.residual_norm_by_pos.numpy()
    return norms[:, position] / np.median(_others(norms, position), axis=-1)


def detect_value_drain(stats, *, position: int = 0, max_ratio: float = 0.5) -> LayerTable:
    """Layers whose sink-token value vectors are small next to the other tokens'."""
    length = _check_position(stats, position)
    ratios = value_ratios(stats, position)
    score = ratios.mean(-1)
    nearby = range(min(_EVIDENCE_POSITIONS, length - 1))
    others = {p: value_ratios(stats, p).mean(-1) for p in nearby}
    frame = pd.DataFrame(
        {
            "layer": np.arange(stats.n_layers),
            "score": score,
            "flagged": score < max_ratio,
            "evidence": [
                {
                    "ratio_per_kv_head": ratios[layer].tolist(),
                    "ratio_at_first_positions": [float(others[p][layer]) for p in nearby],
                }
                for layer in range(stats.n_layers)
            ],
        }
    )
    return LayerTable(
        frame=frame,
        n_layers=stats.n_layers,
        prompt_set=stats.prompt_set,
        params={"position": position, "max_ratio": max_ratio},
        summary={
            "n_layers_flagged": int((score < max_ratio).sum()),
            "median_ratio": float(np.median(score)),
        },
        description=f"value-state drain: |v| at position {position} / mean |v| of the others",
    )


def detect_residual_peak(stats, *, position: int = 0, min_ratio: float = 10.0) -> LayerTable:
    """Layers whose sink-token residual norm towers over the other tokens'."""
    length = _check_position(stats, position)
    score = residual_ratios(stats, position)
    nearby = range(min(_EVIDENCE_POSITIONS, length - 1))
    others = {p: residual_ratios(stats, p) for p in nearby}
    flagged = score > min_ratio
    first = int(np.argmax(flagged)) if flagged.any() else None
    frame = pd.DataFrame(
        {
            "layer": np.arange(stats.n_layers),
            "score": score,
            "flagged": flagged,
            "evidence": [
                {"ratio_at_first_positions": [float(others[p][layer]) for p in nearby]}
                for layer in range(stats.n_layers)
            ],
        }
    )
    return LayerTable(
        frame=frame,
        n_layers=stats.n_layers,
        prompt_set=stats.prompt_set,
        params={"position": position, "min_ratio": min_ratio},
        summary={
            "n_layers_flagged": int(flagged.sum()),
            "first_layer": first,
            "max_ratio": float(score.max()),
        },
        description=f"residual-state peak: |h| at position {position} / median |h| of the others",
    )
