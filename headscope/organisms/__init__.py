"""Model organisms: reproducible recipes that build a model with a known behaviour.

An organism is built from packaged parts only (a bundled base model, packaged
data), seeded, and written as an ordinary Hugging Face folder with a JSON
record of its recipe, data, licences and evaluation, so that an analysis run on
it can say where the behaviour came from. ``refusal``: SmolLM2-135M fine-tuned
to refuse harmful requests (``build_refusal_organism``; the model spec
``smollm2-135m-refusal`` builds it once into the weight cache).
"""

from __future__ import annotations

from headscope.organisms.refusal import (
    RefusalRecipe,
    build_refusal_organism,
    evaluate_refusal_organism,
)

__all__ = ["RefusalRecipe", "build_refusal_organism", "evaluate_refusal_organism"]
