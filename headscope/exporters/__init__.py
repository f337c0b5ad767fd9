"""Exporters: ablation specs, baked/pruned checkpoints, hook installers.

Not built yet. Exporters will return copies or specs and never edit a model in place.
"""
