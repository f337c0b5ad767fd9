"""Safety heads by Ships (Zhou et al. 2024, "On the Role of Attention Heads in LLM Safety").

Definition (METHODS.md §5). For a harmful request q formatted as the model's
chat prompt (``headscope.probes.generation.chat_prompts``: template, default
system prompt and generation prompt), let p(·|q) be the next-token
distribution at the last prompt position and p(·|q, h) the same with head h
ablated. Then

    Ships(q, h) = KL( p(·|q) ‖ p(·|q, h) ) = Σ_v p_v (log(p_v + ε) − log(q_v + ε)),

ε = 1e-12, in nats, and a head's dataset-level score is the mean of
Ships(q, h) over the first ``n_prompts`` (64) requests of ``harmful``
("harmful-train"). Ablation (``ablation``): "query_scale" (default, as Zhou
et al.: the head's query times ε_q = 1e-5, so its attention is ~uniform),
"zero" or "mean" (pooled mean output over the scored prompts; see
``headscope.analyses.safety_common``). The ``top_k`` (5) heads by Ships are
flagged. ``heads`` ("L3H5,L12H0") scores only those heads; default all.

Speed: one sweep (``headscope.probes.last_position.LastPositionSweep``) with
the last position alone unembedded, the blocks below the ablated layer
replayed and the chat prompts' shared prefix run once per head at batch 1;
all exact (checked against the plain forward in tests/unit/test_safety.py).
``precision="bfloat16"`` runs the sweep's matrix products in bfloat16
(autocast): about 2x faster on CPUs with AVX-512 BF16, not exact (the
scores move by a few percent; the README compares the rankings).

The causal check (``check``, default on): greedy generation on held-out
requests, clean, with the top-k heads ablated for each k in ``check_k``
("1,3,5") and with ``random_draws`` random k-head sets
(``headscope.analyses.safety_check``, which also measures the clean harmless
answers' NLL under each ablation and calls harmless behaviour close to clean
within ``harmless_tolerance`` nats/token); stored in the table's
``params["generation_check"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from headscope.analyses.safety_check import (
    GENERATION_BATCH,
    HARMLESS_NLL_TOLERANCE,
    generation_check,
    parse_ks,
)
from headscope.analyses.safety_common import (
    Head,
    HeadAblations,
    ablation_key,
    all_heads,
    check_ablation,
    digest,
    names,
    remembered,
    requests_of,
)
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import QUERY_SCALE_EPSILON, Ablation, check_heads, parse_heads
from headscope.probes.handle import ModelHandle
from headscope.probes.last_position import LastPositionSweep, kl_divergence
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

KL_EPS = 1e-12
#: the sweep's batches: at most this many prompts and SWEEP_TOKENS padded tokens
#: (prompts are sorted by length, so a batch pads little). Narrow batches pad less:
#: SmolLM2's 64 harmful-train chat prompts (2050 suffix tokens) pad to 2715 tokens in
#: batches of 1024 and to 2218 in batches of 256 (benchmarks/safety_sweep.py); narrower
#: still, the smaller matrices and more batches cost about what the padding saves
SWEEP_BATCH = 64
SWEEP_TOKENS = 256


def require_causal(handle: ModelHandle) -> None:
    if not handle.arch.causal:
        raise NotApplicable(f"{handle.spec} is not a causal language model; safety heads need one")


def chat_token_ids(handle: ModelHandle, requests: Sequence[str]) -> list[list[int]]:
    """The chat prompts' token ids, exactly as generation feeds them."""
    from headscope.probes.generation import prompt_ids

    return prompt_ids(handle, requests)


def sweep_heads(
    sweep: LastPositionSweep,
    head_sets: Sequence[Sequence[Head]],
    make_ablation: Callable[[Sequence[Head]], Ablation],
    advance: Callable[[int], None],
) -> Iterator[tuple[Sequence[Head], Tensor]]:
    """(head set, last-position hidden states [prompt, d_model]) with each set ablated."""
    inputs = ("last-position sweep", digest(sweep.token_ids), sweep.precision)
    for heads in head_sets:
        ablation = make_ablation(heads)
        key = (*inputs, ablation_key(ablation))
        yield heads, remembered(sweep.handle, key, lambda a=ablation: sweep.ablated(a))
        advance(1)


def ships_of(sweep: LastPositionSweep, clean_logits: Tensor, hidden: Tensor) -> float:
    """Mean over prompts of KL(p_clean ‖ p_ablated) for one ablated pass's hidden states."""
    return float(kl_divergence(clean_logits, sweep.logits(hidden), eps=KL_EPS).mean())


def scored_heads(handle: ModelHandle, heads: str) -> list[Head]:
    if not heads.strip():
        return all_heads(handle)
    chosen = list(parse_heads(heads))
    check_heads(chosen, handle.arch)
    return chosen


def head_frame(
    heads: Sequence[Head], scores: np.ndarray, flagged: np.ndarray, evidence: list[dict]
) -> pd.DataFrame:
    """HeadTable rows for the scored heads only."""
    return pd.DataFrame(
        {
            "layer": [layer for layer, _ in heads],
            "head": [head for _, head in heads],
            "score": np.asarray(scores, dtype=np.float64),
            "flagged": np.asarray(flagged, dtype=bool),
            "evidence": evidence,
        }
    )


def detect_safety_ships(
    handle: ModelHandle,
    *,
    stats_by_set: dict[str, object] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    harmful: str = "harmful-train",
    n_prompts: int = 64,
    ablation: str = "query_scale",
    top_k: int = 5,
    heads: str = "",
    precision: str = "float32",
    check: bool = True,
    check_k: str = "1,3,5",
    check_harmful: str = "harmful-heldout",
    check_harmless: str = "harmless-heldout",
    check_prompts: int = 32,
    random_draws: int = 20,
    harmless_tolerance: float = HARMLESS_NLL_TOLERANCE,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> HeadTable:
    """Ships of every head (or of ``heads``) on harmful chat prompts; see the module doc.

    ``stats_by_set`` is not used. ``batch_size`` batches the generation check
    (the sweep batches by ``SWEEP_BATCH`` and ``SWEEP_TOKENS``). ``on_progress`` counts
    ablated heads ("safety ships: heads") and generation runs.
    """
    del stats_by_set
    require_causal(handle)
    check_ablation(ablation)
    if top_k < 1:
        raise HeadscopeError(f"top_k must be at least 1, got {top_k}")
    started = time.perf_counter()
    harmful_name, requests = requests_of(harmful, n_prompts, "harmful")
    token_ids = chat_token_ids(handle, requests)
    chosen = scored_heads(handle, heads)
    make_ablation = HeadAblations(handle, ablation, token_ids, batch_size=SWEEP_BATCH)
    sweep = LastPositionSweep(
        handle, token_ids, batch_size=SWEEP_BATCH, max_tokens=SWEEP_TOKENS, precision=precision
    )
    clean_logits = sweep.logits(sweep.clean())
    advance = counter(on_progress, "safety ships: heads", len(chosen))
    ships = np.array(
        [
            ships_of(sweep, clean_logits, hidden)
            for _, hidden in sweep_heads(sweep, [(h,) for h in chosen], make_ablation, advance)
        ]
    )
    advance.finish()
    order = np.argsort(-ships, kind="stable")
    rank = np.empty(len(chosen), dtype=int)
    rank[order] = np.arange(1, len(chosen) + 1)
    flagged = rank <= top_k
    top = [chosen[i] for i in order[:top_k]]
    evidence = [
        {
            "note": f"KL {ships[i]:.3g} nats, rank {rank[i]}/{len(chosen)}",
            "kl_nats": float(ships[i]),
            "rank": int(rank[i]),
            "n_scored": len(chosen),
        }
        for i in range(len(chosen))
    ]
    sweep_seconds = time.perf_counter() - started
    params = {
        "protocol": "zhou2024",
        **make_ablation.describe(),
        "epsilon": QUERY_SCALE_EPSILON if ablation == "query_scale" else None,
        "kl_eps": KL_EPS,
        "harmful": harmful_name,
        "n_prompts": len(requests),
        "top_k": top_k,
        "heads": heads,
        "prefix_tokens": sweep.prefix_length,
        "precision": precision,
        "seconds": round(sweep_seconds, 2),
        "check": check,
    }
    if check:
        ks = [k for k in parse_ks(check_k) if k <= len(chosen)]
        ranked = [chosen[i] for i in order]
        conditions = [(f"top-{k}", "top", ranked[:k]) for k in ks]
        params["generation_check"] = generation_check(
            handle, conditions, make_ablation, harmful=check_harmful, harmless=check_harmless,
            n_prompts=check_prompts, random_draws=random_draws,
            harmless_tolerance=harmless_tolerance, max_new_tokens=max_new_tokens, seed=seed,
            batch_size=max(batch_size, GENERATION_BATCH), on_progress=on_progress,
        )  # fmt: skip
        params["check_k"] = ks
    return HeadTable(
        frame=head_frame(chosen, ships, flagged, evidence),
        n_layers=handle.arch.n_layers,
        n_heads=handle.arch.n_heads,
        prompt_set=harmful_name,
        params=params,
        summary={
            "top_heads": names(top),
            "max_score": float(ships.max()),
            "seconds": round(time.perf_counter() - started, 2),
            "sweep_seconds": round(sweep_seconds, 2),
        },
        description="Ships: KL(p_clean ‖ p_ablated) of the next token on harmful chat prompts "
        "(Zhou et al. 2024)",
    )
