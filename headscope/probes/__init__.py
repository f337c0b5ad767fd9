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

from headscope.errors import ModelLoadError  # noqa: E402
from headscope.probes.handle import ArchInfo, ModelHandle  # noqa: E402
from headscope.probes.loading import load_model  # noqa: E402
from headscope.probes.model_catalog import available_models  # noqa: E402

__all__ = [
    "AXES",
    "ArchInfo",
    "ModelHandle",
    "ModelLoadError",
    "available_models",
    "load_model",
]
