"""Layer redundancy: which attention modules, MLPs and blocks can be removed.

Five LayerTables come from one measurement (``probes.layer_similarity``) on a
calibration prompt set:

- ``llm_drop_attention`` / ``llm_drop_mlp`` / ``llm_drop_block``: LLM-Drop's
  ``Sim = mean_t cos(X, X + F(LN(X)))`` (He et al. 2024). High Sim: the module
  barely turns the residual stream, so it is a drop candidate. Flagged: the
  ``flag_fraction`` of layers with the highest Sim (LLM-Drop drops a count,
  not by threshold; the fraction is ours).
- ``block_influence``: ShortGPT's ``BI = 1 - mean_t cos(h_l, h_{l+1})`` (Men et
  al. 2024), read from the block's own input and output (never from the
  final-norm output). Low BI is redundant, so flagged are the lowest. By
  definition BI = 1 - the block's LLM-Drop Sim; both tables exist because
  each paper's readers look for its own quantity.
- ``attention_similarity``: EchoAtt-style similarity of each layer's attention
  maps with the previous layer's, the mean over heads and query rows of the
  cosine between the rows of head h in layers l and l-1 (Jensen-Shannon
  divergence in the evidence). Computed by ``headscope.kernels.cross_layer``
  from queries and keys, never materializing T x T; layer 0 has no row.
  Flagged: the ``flag_fraction`` most similar layers (candidates for sharing
  attention maps).

Drop simulation, the expensive part (one held-out perplexity per point), is in
``analyses.drop_simulation``. Definitions, defaults and our choices:
docs/methods.md, "layer_redundancy".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from headscope.probes.handle import ModelHandle
from headscope.probes.layer_similarity import LayerSimilarity, measure_layer_similarity
from headscope.progress import Progress
from headscope.tables import LayerTable

REDUNDANCY_TABLES = (
    "llm_drop_attention",
    "llm_drop_mlp",
    "llm_drop_block",
    "block_influence",
    "attention_similarity",
)


def redundancy_order(scores: torch.Tensor | np.ndarray, *, highest_first: bool = True) -> list[int]:
    """Layers sorted most redundant first; ties go to the later layer, NaNs last.

    Later-first tie-breaking matches what both papers find (the redundant
    layers sit deep in the network) and makes orders deterministic.
    """
    values = np.asarray(scores, dtype=np.float64)
    layers = [i for i in range(len(values)) if not math.isnan(values[i])]
    sign = -1.0 if highest_first else 1.0
    return sorted(layers, key=lambda i: (sign * values[i], -i))


def _flags(scores: np.ndarray, fraction: float, *, highest_first: bool) -> np.ndarray:
    order = redundancy_order(scores, highest_first=highest_first)
    n_flag = max(1, round(fraction * len(order))) if order else 0
    flagged = np.zeros(len(scores), dtype=bool)
    flagged[order[:n_flag]] = True
    return flagged


def _table(
    name: str,
    scores: np.ndarray,
    *,
    layers: np.ndarray,
    evidence: list[dict[str, Any]],
    highest_first: bool,
    fraction: float,
    similarity: LayerSimilarity,
    params: Mapping[str, Any],
    description: str,
) -> LayerTable:
    flagged = _flags(scores, fraction, highest_first=highest_first)
    order = redundancy_order(scores, highest_first=highest_first)
    rank = {layer: i + 1 for i, layer in enumerate(order)}
    keep = ~np.isnan(scores)
    frame = pd.DataFrame(
        {
            "layer": layers[keep],
            "score": scores[keep],
            "flagged": flagged[keep],
            "evidence": [
                {**evidence[i], "rank": rank[int(layers[i])]} for i in np.flatnonzero(keep)
            ],
        }
    )
    return LayerTable(
        detector=name,
        prompt_set=similarity.prompt_set,
        frame=frame,
        n_layers=len(scores),
        params=dict(params),
        summary={
            "order": order,
            "most_redundant": order[: int(flagged.sum())],
            "n_tokens": similarity.n_tokens,
        },
        description=description,
    )


def redundancy_tables(
    similarity: LayerSimilarity, *, flag_fraction: float = 0.25, params: Mapping[str, Any] = {}
) -> list[LayerTable]:
    """The five LayerTables of a measurement (the attention-map one only if measured)."""
    n_layers = len(similarity.block)
    layers = np.arange(n_layers)
    ratio_attn = similarity.attention_ratio.numpy()
    ratio_mlp = similarity.mlp_ratio.numpy()
    common = dict(
        layers=layers, fraction=flag_fraction, similarity=similarity,
        params={**params, "flag_fraction": flag_fraction},
    )  # fmt: skip
    tables = [
        _table(
            "llm_drop_attention",
            similarity.attention.numpy(),
            evidence=[{"branch_to_residual_norm": float(r)} for r in ratio_attn],
            highest_first=True,
            description="LLM-Drop Sim of the attention module: mean cos(X, X + Attn(LN(X)))",
            **common,
        ),
        _table(
            "llm_drop_mlp",
            similarity.mlp.numpy(),
            evidence=[{"branch_to_residual_norm": float(r)} for r in ratio_mlp],
            highest_first=True,
            description="LLM-Drop Sim of the MLP: mean cos(X', X' + MLP(LN(X')))",
            **common,
        ),
        _table(
            "llm_drop_block",
            similarity.block.numpy(),
            evidence=[{"block_influence": float(b)} for b in similarity.block_influence],
            highest_first=True,
            description="LLM-Drop Sim of the whole block: mean cos(block input, block output)",
            **common,
        ),
        _table(
            "block_influence",
            similarity.block_influence.numpy(),
            evidence=[{"block_similarity": float(b)} for b in similarity.block],
            highest_first=False,
            description="ShortGPT block influence 1 - mean cos(h_l, h_l+1); low = redundant "
            "(flagged: the lowest)",
            **common,
        ),
    ]
    if similarity.attention_map_cosine is not None:
        cosine = similarity.attention_map_cosine.numpy()
        js = similarity.attention_map_js.numpy()
        tables.append(
            _table(
                "attention_similarity",
                cosine.mean(axis=1),  # NaN for layer 0, which has no previous layer
                evidence=[
                    {
                        "js_divergence": float(np.mean(js[i])),
                        "cosine_by_head": cosine[i].tolist(),
                        "js_by_head": js[i].tolist(),
                    }
                    for i in range(n_layers)
                ],
                highest_first=True,
                description="EchoAtt-style similarity of attention maps with the previous "
                "layer: mean over heads and rows of cos(A_l[h, i], A_l-1[h, i])",
                **common,
            )
        )
    return tables


def detect_layer_redundancy(
    handle: ModelHandle,
    *,
    stats_by_set: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    prompt_set: str = "prose",
    n_prompts: int | None = 64,
    attention_maps: bool = True,
    flag_fraction: float = 0.25,
) -> list[LayerTable]:
    """Measure LLM-Drop Sim, ShortGPT BI and attention-map similarity on ``prompt_set``.

    ``stats_by_set`` is unused (the scan's statistics hold no residual
    cosines); it is accepted because every model experiment receives it.
    """
    del stats_by_set
    prompts = handle.tokenize(prompt_set, n_prompts)
    similarity = measure_layer_similarity(
        handle,
        prompts,
        batch_size=batch_size,
        attention_maps=attention_maps,
        on_progress=on_progress,
    )
    params = {"prompt_set": prompt_set, "n_prompts": len(prompts)}
    return redundancy_tables(similarity, flag_fraction=flag_fraction, params=params)


def one_shot_orders(similarity: LayerSimilarity) -> dict[str, dict[str, list[int]]]:
    """Drop orders, most redundant first: {"attention" | "block": {order name: layers}}.

    "similarity" is LLM-Drop's Sim of the module itself; "block_influence" is
    ShortGPT's BI order, applied to attention too (drop the attention of the
    lowest-influence blocks). For blocks the two coincide by definition.
    """
    bi_order = redundancy_order(similarity.block_influence, highest_first=False)
    return {
        "attention": {
            "similarity": redundancy_order(similarity.attention),
            "block_influence": bi_order,
        },
        "block": {"similarity": redundancy_order(similarity.block), "block_influence": bi_order},
    }
