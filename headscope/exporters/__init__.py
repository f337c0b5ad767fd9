"""Exporters: ablation specs, baked and pruned checkpoints, TransformerLens hook installers.

Exporters return copies or specs and never edit a model in place; every
export folder is written through ``headscope.outputs`` (checked, locked, swapped in).
"""
