"""Analyses: detectors are pure functions from probe statistics to tables.

This file is the one place where the built-in detectors are declared: one
registration block each, in the order scans run them and reports list them.
A detector's parameters and defaults are its function's keyword-only
signature; its tables get its name and group when it runs (see
``headscope.analyses.registry`` and the contributor recipe in the README).
"""

from headscope.analyses.classic import (
    detect_duplicate_token,
    detect_induction,
    detect_previous_token,
)
from headscope.analyses.dormant import detect_active_dormant
from headscope.analyses.drop_simulation import run_drop_simulation
from headscope.analyses.families import detect_head_families
from headscope.analyses.hidden_sinks import detect_hidden_sinks
from headscope.analyses.importance import detect_head_importance
from headscope.analyses.massive import detect_massive_activations, run_massive_intervention
from headscope.analyses.redundancy import REDUNDANCY_TABLES, detect_layer_redundancy
from headscope.analyses.refusal_direction import detect_refusal_direction
from headscope.analyses.registry import (
    Detector,
    all_detectors,
    detector_names,
    get_detector,
    register_detector,
    resolve_detectors,
)
from headscope.analyses.safety_sahara import detect_safety_sahara
from headscope.analyses.safety_ships import detect_safety_ships
from headscope.analyses.sink_norms import detect_residual_peak, detect_value_drain
from headscope.analyses.sinks import detect_first_token_sink
from headscope.analyses.streaming_long import run_streaming_window_long
from headscope.analyses.streaming_window import run_streaming_window
from headscope.analyses.successor import detect_successor_heads
from headscope.tables import HeadTable, LayerTable

register_detector(
    Detector(
        name="previous_token",
        role="previous-token head",
        group="roles",
        function=detect_previous_token,
        primary_prompt_set="prose",
        description="attends to the token before the query (TransformerLens 'mul')",
        capture="patterns",
    )
)
register_detector(
    Detector(
        name="duplicate_token",
        role="duplicate-token head",
        group="roles",
        function=detect_duplicate_token,
        primary_prompt_set="random-repeat",
        description="attends to earlier copies of the query token (TransformerLens 'mul')",
        capture="patterns",
    )
)
register_detector(
    Detector(
        name="induction",
        role="induction head",
        group="roles",
        function=detect_induction,
        primary_prompt_set="random-repeat",
        description="attends to the token after an earlier copy (TransformerLens 'mul')",
        capture="patterns",
    )
)
register_detector(
    Detector(
        name="first_token_sink",
        role="first-token sink",
        group="sinks",
        function=detect_first_token_sink,
        primary_prompt_set="prose",
        description="sink score alpha_0 > epsilon; sink rate Sink_1 (Gu et al. 2024)",
    )
)
register_detector(
    Detector(
        name="hidden_sink",
        role="hidden-sink head",
        group="sinks",
        function=detect_hidden_sinks,
        primary_prompt_set="prose",
        description="later keys with mean received attention > 0.1 (ACT, Yu et al. 2024)",
    )
)
register_detector(
    Detector(
        name="massive_activations",
        role="massive-activation layer",
        group="sinks",
        function=detect_massive_activations,
        primary_prompt_set="prose",
        description="residual entries |h| > 100 and >= 1000 x layer median (Sun et al. 2024)",
    )
)
register_detector(
    Detector(
        name="value_drain",
        role="value-state drain layer",
        group="sinks",
        function=detect_value_drain,
        primary_prompt_set="prose",
        description="small value vectors at the sink token (Guo et al. 2024)",
    )
)
register_detector(
    Detector(
        name="residual_peak",
        role="residual-state peak layer",
        group="sinks",
        function=detect_residual_peak,
        primary_prompt_set="prose",
        description="large residual norm at the sink token (Guo et al. 2024)",
    )
)
register_detector(
    Detector(
        name="active_dormant",
        role="active-dormant head",
        group="sinks",
        function=detect_active_dormant,
        primary_prompt_set="prose",
        description="dormant (sink-parked, small output) on some domains, active on others",
        across_prompt_sets=True,
    )
)
register_detector(
    Detector(
        name="massive_intervention",
        role="massive activations: mean vs zero",
        group="sinks",
        function=run_massive_intervention,
        primary_prompt_set="prose-heldout",
        description="held-out perplexity with massive activations set to their mean vs zero",
        capture="model",
    )
)
register_detector(
    Detector(
        name="streaming_window",
        role="StreamingLLM window attention",
        group="sinks",
        function=run_streaming_window,
        primary_prompt_set="prose-long",
        description="perplexity of a 256-key window of recent tokens vs 4 first + 252 recent "
        "(Xiao et al.)",
        capture="model",
    )
)
register_detector(
    Detector(
        name="streaming_window_long",
        role="StreamingLLM cache past the trained context",
        group="sinks",
        function=run_streaming_window_long,
        primary_prompt_set="prose-book",
        description="perplexity per 1024 tokens of a text twice the trained context: full "
        "attention vs a rolling cache with 0 or 4 sinks at cache positions (Xiao et al.)",
        capture="model",
        opt_in=True,
    )
)
register_detector(
    Detector(
        name="head_importance",
        role="important head",
        group="importance",
        function=detect_head_importance,
        primary_prompt_set="prose",
        description="Michel et al. gradient importance vs single-head ablation (zero or mean)",
        capture="model",
        opt_in=True,
    )
)
register_detector(
    Detector(
        name="successor",
        role="successor head",
        group="roles",
        function=detect_successor_heads,
        primary_prompt_set="ordinal",
        description="effective OV maps ordinal tokens to their successor (Gould et al. 2023)",
        capture="model",
    )
)
register_detector(
    Detector(
        name="layer_redundancy",
        role="redundant layer",
        group="redundancy",
        function=detect_layer_redundancy,
        primary_prompt_set="prose",
        description="LLM-Drop Sim per attention/MLP/block, ShortGPT block influence, "
        "cross-layer attention-map similarity (EchoAtt)",
        capture="model",
        tables=REDUNDANCY_TABLES,
    )
)
register_detector(
    Detector(
        name="drop_simulation",
        role="attention layer cheap to drop",
        group="redundancy",
        function=run_drop_simulation,
        primary_prompt_set="prose-heldout",
        description="held-out perplexity vs dropped attention layers / blocks, in the "
        "LLM-Drop, iterative, ShortGPT and random orders",
        capture="model",
        opt_in=True,
    )
)
register_detector(
    Detector(
        name="safety_ships",
        role="safety head",
        group="safety",
        function=detect_safety_ships,
        primary_prompt_set="harmful-train",
        description="Ships: KL of the next token on harmful chat prompts when the head is "
        "ablated (Zhou et al. 2024), checked by generation",
        capture="model",
        opt_in=True,
    )
)
register_detector(
    Detector(
        name="safety_sahara",
        role="safety head group",
        group="safety",
        function=detect_safety_sahara,
        primary_prompt_set="harmful-train",
        description="Sahara: greedy head group turning the harmful last-token states' top "
        "singular vector (Zhou et al. 2024), checked by generation",
        capture="model",
        opt_in=True,
    )
)
register_detector(
    Detector(
        name="refusal_direction",
        role="refusal-direction writer",
        group="safety",
        function=detect_refusal_direction,
        primary_prompt_set="harmful-train",
        description="direct write of each head onto the refusal direction (Arditi et al. 2024)",
        capture="model",
        opt_in=True,
    )
)
# last: it reads every other detector's tables
register_detector(
    Detector(
        name="head_families",
        role="head family",
        group="families",
        function=detect_head_families,
        primary_prompt_set="prose",
        description="k-means families of heads on their statistics and role scores, "
        "with a 2-D embedding",
        capture="tables",
    )
)

__all__ = [
    "Detector",
    "HeadTable",
    "LayerTable",
    "all_detectors",
    "detector_names",
    "get_detector",
    "register_detector",
    "resolve_detectors",
]
