"""Attention-statistics kernels: reference, chunked torch (CPU) and Triton (CUDA).

``attention_stats`` dispatches; ``chunked_attention_stats`` also returns the
attention output so the streaming probe pays for QK^T once on CPU. Triton is
imported only when the Triton implementation is asked for.
"""

from headscope.kernels.attention_stats import (
    PASS1_FIELDS,
    AttentionStats,
    attention_stats,
    chunked_attention_stats,
    reference_attention_stats,
)

__all__ = [
    "PASS1_FIELDS",
    "AttentionStats",
    "attention_stats",
    "chunked_attention_stats",
    "reference_attention_stats",
]
