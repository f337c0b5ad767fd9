"""Do two head rankings agree? Safety heads of a fine-tune against its base, or Ships against
the refusal direction.

Zhou et al. report that the safety heads of a chat model largely survive
further fine-tuning. Here the question is asked of the refusal organism and
the base it was tuned from: score the same harmful prompts with
``safety_ships`` on both, then

    python benchmarks/safety_overlap.py runs/safety runs/safety-base
    python benchmarks/safety_overlap.py runs/safety runs/safety --b-table refusal_direction

It prints, for the heads both tables score: Spearman's rho of the scores with
a one-sided permutation p-value (10 000 seeded permutations), and for each k
the size of the overlap of the two top-k sets next to what chance gives
(k * k / n heads), with the hypergeometric probability of an overlap at least
that large. ``--json`` writes the same figures to a file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from headscope.ablation_spec import head_name
from headscope.analyses.importance import spearman
from headscope.runs import open_run


def scores(run: str, table: str) -> dict[str, float]:
    frame = open_run(run).head_table(table).frame
    return {
        head_name(int(r.layer), int(r.head)): float(r.score)
        for r in frame.itertuples()
        if math.isfinite(float(r.score))
    }


def top(values: dict[str, float], k: int) -> set[str]:
    return set(sorted(values, key=lambda name: -values[name])[:k])


def overlap_tail(n: int, k: int, seen: int) -> float:
    """P(|A ∩ B| >= seen) for two random k-subsets of n items (hypergeometric)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) for i in range(seen, k + 1)) / total


def permutation_p(a: np.ndarray, b: np.ndarray, rho: float, n: int = 10_000) -> float:
    rng = np.random.default_rng(0)
    hits = sum(spearman(a, rng.permutation(b)) >= rho for _ in range(n))
    return (hits + 1) / (n + 1)


def compare(a: dict[str, float], b: dict[str, float], ks: list[int]) -> dict:
    shared = sorted(set(a) & set(b))
    x = np.array([a[h] for h in shared])
    y = np.array([b[h] for h in shared])
    rho = spearman(x, y)
    a_shared = {h: a[h] for h in shared}
    b_shared = {h: b[h] for h in shared}
    rows = []
    for k in ks:
        both = top(a_shared, k) & top(b_shared, k)
        rows.append(
            {
                "k": k,
                "overlap": len(both),
                "chance": k * k / len(shared),
                "p_at_least": overlap_tail(len(shared), k, len(both)),
                "heads": sorted(both),
            }
        )
    return {
        "n_heads": len(shared),
        "spearman": rho,
        "spearman_p": permutation_p(x, y, rho),
        "top_a": sorted(top(a_shared, max(ks)), key=lambda h: -a[h]),
        "top_b": sorted(top(b_shared, max(ks)), key=lambda h: -b[h]),
        "overlaps": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--a-table", default="safety_ships")
    parser.add_argument("--b-table", default="safety_ships")
    parser.add_argument("--k", default="1,3,5,10,20")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    found = compare(scores(args.run_a, args.a_table), scores(args.run_b, args.b_table), ks)
    found.update(run_a=args.run_a, run_b=args.run_b, a_table=args.a_table, b_table=args.b_table)
    print(f"{args.a_table} of {args.run_a} vs {args.b_table} of {args.run_b}")
    print(
        f"  {found['n_heads']} heads; Spearman rho {found['spearman']:.3f} "
        f"(permutation p {found['spearman_p']:.4f})"
    )
    print(f"  top-{max(ks)} A: {', '.join(found['top_a'])}")
    print(f"  top-{max(ks)} B: {', '.join(found['top_b'])}")
    for row in found["overlaps"]:
        print(
            f"  top-{row['k']:<3} overlap {row['overlap']:>2} (chance {row['chance']:.2f}, "
            f"P(>=) {row['p_at_least']:.3g}) {', '.join(row['heads'])}"
        )
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
