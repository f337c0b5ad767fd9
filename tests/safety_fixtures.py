"""A fake run holding the three safety tables (safety_ships, safety_sahara,
refusal_direction) as their detectors write them, through the real run writer.

The report, the HTML report, the dashboard's Safety page and the export are
tested on it without running the detectors (which need the refusal organism and
minutes of generation). The numbers are drawn from a seeded generator, so tests
read what they expect from the run, never from constants typed twice.

Importable from every test folder: pytest puts ``tests/`` (the folder of the
root conftest.py) on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headscope.ablation_spec import head_name
from headscope.analyses.safety_check import HARMLESS_NLL_TOLERANCE, _verdicts
from headscope.runs import write_run
from headscope.tables import HeadTable

#: the shape of tiny:llama:3, so that exporting from the run loads a real model
MODEL = "tiny:llama:3"
ARCH = {"family": "llama", "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_head": 16,
        "d_model": 64, "vocab_size": 1024, "causal": True, "bos_token_id": 0,
        "prepend_bos": True, "max_positions": 512}  # fmt: skip
HARMFUL, HARMLESS = "harmful-train", "harmless-train"
TOP_K = 3


def _names(order: np.ndarray, n_heads: int) -> list[str]:
    return [head_name(i // n_heads, i % n_heads) for i in order]


def _generation_check(rng: np.random.Generator, top: list[str], group: list[str],
                      n_heads_total: int, *, below: bool) -> dict[str, Any]:  # fmt: skip
    """Refusal rates by condition; with ``below`` the top-3 heads beat every random draw."""
    clean = {"harmful_refusal": 0.875, "harmless_refusal": 0.0625, "harmless_answer_nll": 0.45}
    conditions = []
    for k in (1, TOP_K):
        randoms = np.round(rng.uniform(0.5, 0.9, size=5) * 16) / 16
        top_rate = float(randoms.min() - 0.25) if below or k == 1 else float(np.median(randoms))
        # the top-k heads raise the harmless answers' NLL by 0.1 per head: within the
        # tolerance at k = 1, beyond it at k = 3
        conditions.append({"name": f"top-{k}", "kind": "top", "k": k, "draw": None,
                           "heads": top[:k], "harmful_refusal": top_rate,
                           "harmless_refusal": 0.0625 + 0.0625 * k / TOP_K,
                           "harmless_answer_nll": 0.45 + 0.1 * k})  # fmt: skip
        rises = rng.uniform(0.0, 0.05, size=len(randoms))
        for draw, (value, rise) in enumerate(zip(randoms, rises, strict=True)):
            heads = _names(rng.choice(n_heads_total, size=k, replace=False), ARCH["n_heads"])
            conditions.append({"name": f"random-{k}-{draw}", "kind": "random", "k": k,
                               "draw": draw, "heads": heads, "harmful_refusal": float(value),
                               "harmless_refusal": None,
                               "harmless_answer_nll": 0.45 + float(rise)})  # fmt: skip
    verdict = _verdicts(conditions, clean, HARMLESS_NLL_TOLERANCE)
    conditions.append(
        {
            "name": "sahara",
            "kind": "sahara",
            "k": len(group),
            "draw": None,
            "heads": group,
            "harmful_refusal": 0.25,
            "harmless_refusal": 0.125,
            "harmless_answer_nll": 0.9,
        }
    )
    generations = [
        {"condition": condition, "set": kind, "request": f"{kind} request {i}",
         "text": f"{condition} answer {i} to the {kind} request", "refused": bool(i % 2)}
        for condition in ("clean", f"top-{TOP_K}", "sahara")
        for kind in ("harmful", "harmless")
        for i in range(3)
    ]  # fmt: skip
    return {"harmful_set": "harmful-test", "harmless_set": "harmless-test", "n_harmful": 16,
            "n_harmless": 16, "max_new_tokens": 64, "harmless_refusal_tolerance": 0.1,
            "harmless_tolerance": HARMLESS_NLL_TOLERANCE,
            "judge": "refused when the reply opens with a refusal phrase (I cannot, I can't, ...)",
            "clean": clean, "conditions": conditions, "verdict": verdict,
            "generations": generations}  # fmt: skip


def safety_tables(seed: int = 0, *, below: bool = True) -> list[HeadTable]:
    """The three safety tables of a 3-layer, 4-head model, seeded."""
    rng = np.random.default_rng(seed)
    n_layers, n_heads = ARCH["n_layers"], ARCH["n_heads"]
    n = n_layers * n_heads
    ships = rng.uniform(0.0, 0.3, size=n)
    order = np.argsort(-ships, kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(1, n + 1)
    top = _names(order[:TOP_K], n_heads)
    common = {"group": "safety"}

    candidates = order[:6]
    group = _names(candidates[[1, 0, 3]], n_heads)
    angles = np.round(np.cumsum(rng.uniform(5, 15, size=3)), 3)
    alone = rng.uniform(2, 20, size=len(candidates))
    sahara = HeadTable(
        frame=pd.DataFrame({
            "layer": candidates // n_heads, "head": candidates % n_heads, "score": alone,
            "flagged": [name in group for name in _names(candidates, n_heads)],
            "evidence": [{"angle_deg": float(a)} for a in alone],
        }),
        detector="safety_sahara", prompt_set=HARMFUL,
        params={"protocol": "zhou2024-sahara", "group": group,
                "angles_by_step": [float(a) for a in angles],
                "candidates": _names(candidates, n_heads), "ablation": "query_scale",
                "epsilon": 1e-5},
        summary={"group": group, "angle": float(angles[-1])},
        description="Sahara: the head group whose joint ablation turns harmful states most",
        n_layers=n_layers, n_heads=n_heads, **common,
    )  # fmt: skip

    check = _generation_check(rng, top, group, n, below=below)
    ships_table = HeadTable.from_matrix(
        ships.reshape(n_layers, n_heads),
        (rank <= TOP_K).reshape(n_layers, n_heads),
        evidence=[{"kl_nats": float(s), "rank": int(r), "of": n}
                  for s, r in zip(ships, rank, strict=True)],
        detector="safety_ships", prompt_set=HARMFUL,
        params={"protocol": "zhou2024", "ablation": "query_scale", "epsilon": 1e-5,
                "harmful": HARMFUL, "n_prompts": 16, "top_k": TOP_K, "prefix_tokens": 0,
                "seconds": 12.5, "generation_check": check},
        summary={"top_heads": top, "max_score": float(ships.max()), "seconds": 12.5},
        description="Ships: mean KL of the next token when a head's query is scaled to zero",
        **common,
    )  # fmt: skip

    projection = rng.normal(0.0, 1.0, size=n)
    flagged = np.zeros(n, dtype=bool)
    flagged[np.argsort(-projection)[:TOP_K]] = True
    refusal = HeadTable.from_matrix(
        projection.reshape(n_layers, n_heads), flagged.reshape(n_layers, n_heads),
        evidence=[{"harmful": float(p), "harmless": 0.0} for p in projection],
        detector="refusal_direction", prompt_set=HARMFUL,
        params={"protocol": "arditi2024", "top_k": TOP_K, "harmless": HARMLESS,
                "check_harmful": "harmful-test", "check_prompts": 16, "clean_refusal": 0.875,
                "direction_ablation_refusal": 0.125},
        summary={"best_layer": 1,
                 "refusal_by_layer": {str(layer): float(r) for layer, r in
                                      enumerate(rng.uniform(0.1, 0.9, size=n_layers))},
                 "separation_by_layer": {str(layer): float(s) for layer, s in
                                         enumerate(rng.uniform(1, 5, size=n_layers))}},
        description="refusal direction: each head's direct write along it",
        **common,
    )  # fmt: skip
    return [ships_table, sahara, refusal]


def manifest(tables: list[HeadTable]) -> dict[str, Any]:
    """A scan-like manifest for ``tables``."""
    return {
        "kind": "scan",
        "model": {"spec": MODEL, "source": "tiny:llama (random init, seed 0)", "arch": ARCH,
                  "dtype": "float32", "device": "cpu"},
        "prompt_sets": [{"name": HARMFUL, "description": "harmful requests", "n_prompts": 16,
                         "lengths": [12, 20]},
                        {"name": HARMLESS, "description": "harmless requests", "n_prompts": 16,
                         "lengths": [10, 18]}],
        "detectors": [{"name": t.detector, "role": "safety", "group": "safety",
                       "primary_prompt_set": HARMFUL, "params": dict(t.params)}
                      for t in tables],
        "timing": {"total_s": 30.0},
        "skipped": [],
    }  # fmt: skip


def write_safety_run(out: Path, seed: int = 0, *, below: bool = True,
                     extra: list[HeadTable] = ()) -> Path:  # fmt: skip
    """Write the fake safety run (plus any ``extra`` head tables) to ``out``."""
    tables = [*safety_tables(seed, below=below), *extra]
    return write_run(out, manifest=manifest(tables), head_tables=tables)
