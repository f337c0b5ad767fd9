"""Probes: attach to a model and capture what the analyses need.

This module is also the one place that names the tensor axes used across
headscope, so that every jaxtyping annotation speaks the same vocabulary
(the convention TransformerLens and penzai follow). Annotations use the axis
names below, e.g. ``Float[Tensor, "batch head query_pos key_pos"]``.
"""

from __future__ import annotations

#: Axis names, written once. Use them (space separated) in jaxtyping shapes.
AXES: dict[str, str] = {
    "batch": "prompts processed together",
    "prompt": "one row per prompt of a PromptSet (batches concatenated)",
    "layer": "transformer block index, 0-based",
    "head": "query head index within a layer, 0-based",
    "kv_head": "key/value head index (GQA: several query heads share one)",
    "query_pos": "position of the attending token, 0-based",
    "key_pos": "position of the attended token, 0-based",
    "d_head": "per-head feature dimension",
    "d_model": "residual stream width",
    "vocab": "vocabulary entries",
}

from headscope.probes.models import (  # noqa: E402
    ArchInfo,
    ModelHandle,
    ModelLoadError,
    available_models,
    load_model,
)

__all__ = [
    "AXES",
    "ArchInfo",
    "ModelHandle",
    "ModelLoadError",
    "available_models",
    "load_model",
]
