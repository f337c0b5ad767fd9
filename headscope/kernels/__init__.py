"""Attention-statistics kernels: reference, chunked torch (CPU) and Triton (CUDA).

``headscope.kernels.attention_stats.attention_stats`` dispatches (the function
is not re-exported here: it would shadow its own module);
``chunked_attention_stats`` also returns the attention output so the streaming
probe pays for QK^T once on CPU. Triton is imported only when the Triton
implementation is asked for.
"""

from headscope.kernels.attention_stats import (
    PASS1_FIELDS,
    AttentionStats,
    chunked_attention_stats,
    reference_attention_stats,
)

__all__ = [
    "PASS1_FIELDS",
    "AttentionStats",
    "chunked_attention_stats",
    "reference_attention_stats",
]
