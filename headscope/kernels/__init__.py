"""Attention-statistics kernels (Triton, chunked torch, reference).

Not built yet: the streaming kernels arrive with the streaming probe. Until
then statistics come from ``headscope.probes.patterns`` (TransformerLens
``hook_pattern``, reduced per layer).
"""
