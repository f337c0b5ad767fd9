"""Analyses: detectors are pure functions from probe statistics to tables.

This file is the one place where the built-in detectors are registered.
"""

from headscope.analyses.classic import (
    CLASSIC_DEFAULTS,
    detect_duplicate_token,
    detect_induction,
    detect_previous_token,
)
from headscope.analyses.registry import (
    Detector,
    detector_names,
    get_detector,
    register_detector,
    resolve_detectors,
)
from headscope.analyses.sinks import DEFAULT_EPSILON, detect_first_token_sink
from headscope.analyses.tables import HeadTable, LayerTable

register_detector(
    Detector(
        name="previous_token",
        role="previous-token head",
        function=detect_previous_token,
        primary_prompt_set="prose",
        description="attends to the token before the query (TransformerLens 'mul')",
        capture="patterns",
        defaults=CLASSIC_DEFAULTS,
    )
)
register_detector(
    Detector(
        name="duplicate_token",
        role="duplicate-token head",
        function=detect_duplicate_token,
        primary_prompt_set="random-repeat",
        description="attends to earlier copies of the query token (TransformerLens 'mul')",
        capture="patterns",
        defaults=CLASSIC_DEFAULTS,
    )
)
register_detector(
    Detector(
        name="induction",
        role="induction head",
        function=detect_induction,
        primary_prompt_set="random-repeat",
        description="attends to the token after an earlier copy (TransformerLens 'mul')",
        capture="patterns",
        defaults=CLASSIC_DEFAULTS,
    )
)
register_detector(
    Detector(
        name="first_token_sink",
        role="first-token sink",
        function=detect_first_token_sink,
        primary_prompt_set="prose",
        description="sink score alpha_0 > epsilon; sink rate Sink_1 (Gu et al. 2024)",
        defaults={"epsilon": DEFAULT_EPSILON, "key": 0},
    )
)

__all__ = [
    "Detector",
    "HeadTable",
    "LayerTable",
    "detector_names",
    "get_detector",
    "register_detector",
    "resolve_detectors",
]
