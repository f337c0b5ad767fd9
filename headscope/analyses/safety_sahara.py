"""Safety head groups by Sahara (Zhou et al. 2024, "Safety Attention Head AttRibution Algorithm").

Definition (METHODS.md §5). Stack the final-layer last-token hidden states
(after the final norm: what the unembedding reads) of the first ``n_prompts``
(64) chat-formatted requests of ``harmful`` ("harmful-train") into H (N × d).
With u the top-1 left singular vector of H (clean) and v that of H with the
head set S ablated, the score of S is the principal angle

    angle(S) = degrees(arccos(min(1, |u · v|))).

S grows greedily to ``group_size`` (3) heads: each step adds the candidate
whose joint ablation with the heads already chosen gives the largest angle.
Ablation (``ablation``): "query_scale" (default, ε = 1e-5), "zero" or "mean"
(pooled; ``headscope.analyses.safety_common``).

Candidates, our choice: ``candidates`` = N > 0 (default 32) keeps the top N
heads by Ships (``headscope.analyses.safety_ships``) on the same prompts;
0 keeps every head. Either way step 1 sweeps every head once (the same
ablated pass gives a head's Ships and its single-head angle; the table's
score is that single-head angle), and steps 2..group_size ablate each
remaining candidate jointly with the chosen heads. Cost in ablated passes:
n_heads + (N − 1) + ... + (N − group_size + 1); for SmolLM2-135M (270 heads)
with the defaults 270 + 31 + 30 = 331, with ``candidates=0`` 270 + 269 + 268.
Each pass is a ``LastPositionSweep`` pass (shared prefix, block replay below
the lowest ablated layer, exact; ``precision="bfloat16"`` trades exactness for
speed as in Ships, and only a Ships table of the same precision is reused).

Note: with H as N × d, u lives in prompt space: it says how strongly each
prompt loads on H's dominant direction, so a head whose ablation moves every
prompt's state alike barely turns u; a head that changes some prompts' states
and not others (a head that fires on some requests) turns it most.

The causal check (``check``, default on): greedy generation on held-out
requests, clean, with the group ablated, and with ``random_draws`` random
head sets of the group's size (``headscope.analyses.safety_check``, which
also measures the clean harmless answers' NLL under each ablation and calls
harmless behaviour close to clean within ``harmless_tolerance`` nats/token);
stored in ``params["generation_check"]``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

from headscope.analyses.safety_check import (
    GENERATION_BATCH,
    HARMLESS_NLL_TOLERANCE,
    generation_check,
)
from headscope.analyses.safety_common import (
    Head,
    HeadAblations,
    all_heads,
    check_ablation,
    names,
    requests_of,
)
from headscope.analyses.safety_ships import (
    SWEEP_BATCH,
    SWEEP_TOKENS,
    chat_token_ids,
    head_frame,
    require_causal,
    ships_of,
    sweep_heads,
)
from headscope.errors import HeadscopeError
from headscope.probes.ablation import QUERY_SCALE_EPSILON
from headscope.probes.handle import ModelHandle
from headscope.probes.last_position import LastPositionSweep
from headscope.progress import Progress, counter
from headscope.tables import HeadTable


def top_left_singular_vector(hidden: Tensor) -> Tensor:
    """u_1 of H = U Σ Vᵀ (float64, [N])."""
    u, _, _ = torch.linalg.svd(hidden.double().cpu(), full_matrices=False)
    return u[:, 0]


def principal_angle(u: Tensor, v: Tensor) -> float:
    """Degrees between two unit vectors' lines: degrees(arccos(min(1, |u · v|)))."""
    return math.degrees(math.acos(min(1.0, abs(float(u @ v)))))


def detect_safety_sahara(
    handle: ModelHandle,
    *,
    stats_by_set: dict[str, object] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    harmful: str = "harmful-train",
    n_prompts: int = 64,
    ablation: str = "query_scale",
    group_size: int = 3,
    candidates: int = 32,
    precision: str = "float32",
    check: bool = True,
    check_harmful: str = "harmful-heldout",
    check_harmless: str = "harmless-heldout",
    check_prompts: int = 32,
    random_draws: int = 20,
    harmless_tolerance: float = HARMLESS_NLL_TOLERANCE,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> HeadTable:
    """Sahara's greedy safety-head group on harmful chat prompts; see the module doc.

    One row per candidate head: score = its single-head angle (degrees),
    flagged = in the chosen group. ``stats_by_set`` is not used;
    ``batch_size`` batches the generation check; ``on_progress`` counts
    ablated passes and generation runs.
    """
    del stats_by_set
    require_causal(handle)
    check_ablation(ablation)
    pool = all_heads(handle)
    if not 1 <= group_size <= len(pool):
        raise HeadscopeError(f"group_size must be in 1..{len(pool)}, got {group_size}")
    if candidates < 0:
        raise HeadscopeError(f"candidates must be 0 (every head) or positive, got {candidates}")
    n_candidates = len(pool) if candidates == 0 else min(candidates, len(pool))
    if n_candidates < group_size:
        raise HeadscopeError(
            f"candidates ({n_candidates}) must be at least group_size ({group_size})"
        )
    started = time.perf_counter()
    harmful_name, requests = requests_of(harmful, n_prompts, "harmful")
    if len(requests) < 2:
        raise HeadscopeError("Sahara needs at least 2 harmful prompts (an N × d matrix, N ≥ 2)")
    token_ids = chat_token_ids(handle, requests)
    make_ablation = HeadAblations(handle, ablation, token_ids, batch_size=SWEEP_BATCH)
    sweep = LastPositionSweep(
        handle, token_ids, batch_size=SWEEP_BATCH, max_tokens=SWEEP_TOKENS, precision=precision
    )
    clean = sweep.clean()
    clean_logits = sweep.logits(clean)
    u_clean = top_left_singular_vector(clean)
    passes = len(pool) + sum(n_candidates - step for step in range(1, group_size))
    advance = counter(on_progress, "safety sahara: ablated passes", passes)

    ships = np.zeros(len(pool))
    single = np.zeros(len(pool))
    for i, (_, hidden) in enumerate(
        sweep_heads(sweep, [(h,) for h in pool], make_ablation, advance)
    ):
        ships[i] = ships_of(sweep, clean_logits, hidden)
        single[i] = principal_angle(u_clean, top_left_singular_vector(hidden))
    order = np.argsort(-ships, kind="stable")[:n_candidates]
    candidate_heads: list[Head] = [pool[i] for i in sorted(order)]
    index = {h: i for i, h in enumerate(pool)}

    group: list[Head] = []
    angles_by_step: list[float] = []
    for step in range(group_size):
        remaining = [h for h in candidate_heads if h not in group]
        if step == 0:
            angles = [single[index[h]] for h in remaining]
        else:
            sets = [(*group, h) for h in remaining]
            angles = [
                principal_angle(u_clean, top_left_singular_vector(hidden))
                for _, hidden in sweep_heads(sweep, sets, make_ablation, advance)
            ]
        best = int(np.argmax(angles))
        group.append(remaining[best])
        angles_by_step.append(float(angles[best]))
    advance.finish()
    step_of = {h: i for i, h in enumerate(group)}
    evidence = [
        {
            "note": (
                f"step {step_of[h] + 1} of group, angle {angles_by_step[step_of[h]]:.1f}°"
                if h in step_of
                else "candidate"
            ),
            "single_angle_deg": float(single[index[h]]),
            "ships_kl_nats": float(ships[index[h]]),
            "group_step": step_of[h] + 1 if h in step_of else None,
        }
        for h in candidate_heads
    ]
    sweep_seconds = time.perf_counter() - started
    params = {
        "protocol": "zhou2024-sahara",
        **make_ablation.describe(),
        "epsilon": QUERY_SCALE_EPSILON if ablation == "query_scale" else None,
        "harmful": harmful_name,
        "n_prompts": len(requests),
        "group_size": group_size,
        "candidates": candidates,
        "candidate_rule": "top-N heads by Ships on the same prompts"
        if candidates
        else "every head",
        "group": names(group),
        "angles_by_step": angles_by_step,
        "prefix_tokens": sweep.prefix_length,
        "precision": precision,
        "seconds": round(sweep_seconds, 2),
        "check": check,
    }
    if check:
        params["generation_check"] = generation_check(
            handle, [("sahara", "sahara", group)], make_ablation, harmful=check_harmful,
            harmless=check_harmless, n_prompts=check_prompts, random_draws=random_draws,
            harmless_tolerance=harmless_tolerance, max_new_tokens=max_new_tokens, seed=seed,
            batch_size=max(batch_size, GENERATION_BATCH),
            on_progress=on_progress,
        )  # fmt: skip
    scores = np.array([single[index[h]] for h in candidate_heads])
    return HeadTable(
        frame=head_frame(
            candidate_heads, scores, np.array([h in step_of for h in candidate_heads]), evidence
        ),
        n_layers=handle.arch.n_layers,
        n_heads=handle.arch.n_heads,
        prompt_set=harmful_name,
        params=params,
        summary={
            "group": names(group),
            "group_angle": angles_by_step[-1],
            "max_single_angle": float(scores.max()),
            "seconds": round(time.perf_counter() - started, 2),
        },
        description="Sahara: greedy head group turning the top singular vector of the "
        "harmful last-token states (Zhou et al. 2024)",
    )
