"""Where the Ships sweep's time goes, and what bfloat16 changes.

Three readings, each printed with the command-line that produced it:

- **padding**: the 64 ``harmful-train`` chat prompts of a model, batched as
  ``LastPositionSweep`` batches them, for several ``max_tokens``: batches and
  padded tokens against the real suffix tokens (no model forward; seconds);
- **matrix products**: GFLOP/s of one [M, d_model] x [d_model, d_mlp] product in
  float32 and in bfloat16 on this CPU (``--matmul``);
- **scores**: two runs of ``safety_ships`` on the same prompts (one float32, one
  ``precision=bfloat16``): the relative difference of every head's score, for
  the top heads and overall (``--runs A B``).

    python benchmarks/safety_sweep.py --model smollm2-135m --matmul \\
        --runs runs/safety-base runs/safety-base-bf16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from headscope.ablation_spec import head_name


def padding(model: str, widths: list[int]) -> None:
    from headscope.analyses.safety_common import requests_of
    from headscope.analyses.safety_ships import SWEEP_BATCH, chat_token_ids
    from headscope.probes.last_position import LastPositionSweep
    from headscope.probes.loading import load_model

    handle = load_model(model)
    _, requests = requests_of("harmful-train", 64, "harmful")
    token_ids = chat_token_ids(handle, requests)
    print(f"padding: {model}, 64 harmful-train chat prompts")
    for width in widths:
        sweep = LastPositionSweep(handle, token_ids, batch_size=SWEEP_BATCH, max_tokens=width)
        real = sum(len(ids) - sweep.prefix_length for ids in token_ids)
        padded = sum(tokens.numel() for _, tokens, _ in sweep._batches)
        print(
            f"  max_tokens {width:5d}: {len(sweep._batches):3d} batches, {padded} padded tokens "
            f"for {real} real ({padded / real - 1:+.0%}); shared prefix {sweep.prefix_length}"
        )


def matmul(d_model: int = 576, d_mlp: int = 1536, repeats: int = 50) -> None:
    print(
        f"matrix products: [M, {d_model}] x [{d_model}, {d_mlp}], {torch.get_num_threads()} threads"
    )
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (256, 1024):
            a = torch.randn(rows, d_model, dtype=dtype)
            b = torch.randn(d_model, d_mlp, dtype=dtype)
            for _ in range(3):
                a @ b
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds = time.perf_counter() - started
            flops = 2 * rows * d_model * d_mlp * repeats
            print(
                f"  {str(dtype).removeprefix('torch.'):8s} M={rows:5d}: "
                f"{flops / seconds / 1e9:7.1f} GFLOP/s"
            )


def scores(exact_run: str, rounded_run: str, top: int = 10) -> None:
    from headscope.runs import open_run

    a = open_run(exact_run).head_table("safety_ships")
    b = open_run(rounded_run).head_table("safety_ships")
    print(
        f"scores: {exact_run} ({a.params.get('precision', 'float32')}, sweep "
        f"{a.params.get('seconds')} s) vs {rounded_run} ({b.params.get('precision', 'float32')}, "
        f"sweep {b.params.get('seconds')} s)"
    )
    left = {(int(r.layer), int(r.head)): float(r.score) for r in a.frame.itertuples()}
    right = {(int(r.layer), int(r.head)): float(r.score) for r in b.frame.itertuples()}
    heads = sorted(set(left) & set(right), key=lambda h: -left[h])
    relative = np.array([abs(right[h] - left[h]) / left[h] for h in heads if left[h] > 0])
    for h in heads[:top]:
        print(
            f"  {head_name(*h):7s} {left[h]:.4g} vs {right[h]:.4g} ({right[h] / left[h] - 1:+.1%})"
        )
    print(
        f"  relative difference over {len(relative)} heads: median {np.median(relative):.1%}, "
        f"top {top} max {relative[:top].max():.1%}, all max {relative.max():.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--widths", default="1024,512,256,128")
    parser.add_argument("--matmul", action="store_true")
    parser.add_argument("--runs", nargs=2, metavar=("FLOAT32_RUN", "BFLOAT16_RUN"))
    args = parser.parse_args()
    padding(args.model, [int(w) for w in args.widths.split(",")])
    if args.matmul:
        matmul()
    if args.runs:
        scores(*args.runs)


if __name__ == "__main__":
    main()
