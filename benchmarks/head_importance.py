"""Head importance on a real model: gradient vs zero and mean single-head ablation, time-capped.

Runs what ``detect_head_importance`` runs, in batches of prompts (prose prompts
from ``--start`` on, the ones after the 32 reference prompts), so that it can
stop at a time budget: zero ablation on as many batches as fit in
``--zero-minutes``, then mean ablation on the same batches while the total
stays under ``--minutes``. Every quantity is per prompt, so the result on the
batches done equals the detector's on those prompts. Writes the per-prompt
arrays (``.npz``) and the comparison summaries (``.json``) to ``--out``.

    python benchmarks/head_importance.py --model smollm2-135m --out runs/importance
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from headscope.analyses.importance import (
    compare_importance,
    prompt_ablation_deltas,
    prompt_gradients,
)
from headscope.probes.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-set", default="prose")
    parser.add_argument("--start", type=int, default=32, help="first evaluated prompt")
    parser.add_argument("--max-prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--zero-minutes", type=float, default=12.0)
    parser.add_argument("--minutes", type=float, default=19.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    handle = load_model(args.model)
    every = handle.tokenize(args.prompt_set)
    n_max = min(args.max_prompts, len(every) - args.start)
    chunks = [
        dataclasses.replace(every, tokens=every.tokens[i : i + args.batch_size])
        for i in range(args.start, args.start + n_max, args.batch_size)
    ]
    gradients, zero, base, mean = [], [], [], []
    times: dict[str, float] = {"load": time.perf_counter() - began, "gradient": 0.0}
    times["zero"] = times["mean"] = 0.0

    def elapsed() -> float:
        return (time.perf_counter() - began) / 60

    for chunk in chunks:
        if elapsed() > args.zero_minutes:
            break
        t = time.perf_counter()
        gradients.append(prompt_gradients(handle, chunk, batch_size=args.batch_size))
        times["gradient"] += time.perf_counter() - t
        t = time.perf_counter()
        deltas, losses = prompt_ablation_deltas(handle, chunk, batch_size=args.batch_size)
        times["zero"] += time.perf_counter() - t
        zero.append(deltas)
        base.append(losses)
        print(f"zero: {args.batch_size * len(zero)} prompts, {elapsed():.1f} min", flush=True)
    for i in range(len(zero)):
        per_batch = times["zero"] / len(zero)
        if elapsed() + per_batch * 1.3 / 60 > args.minutes:
            break
        t = time.perf_counter()
        deltas, _ = prompt_ablation_deltas(
            handle, chunks[i], ablation="mean", batch_size=args.batch_size
        )
        times["mean"] += time.perf_counter() - t
        mean.append(deltas)
        print(f"mean: {args.batch_size * len(mean)} prompts, {elapsed():.1f} min", flush=True)
    arrays = {
        "gradients": torch.cat(gradients).numpy(),
        "zero": torch.cat(zero).numpy(),
        "base": torch.cat(base).numpy(),
    }
    if mean:
        arrays["mean"] = torch.cat(mean).numpy()
    np.savez(args.out / "per_prompt.npz", **arrays)
    n_zero, n_mean = len(arrays["zero"]), len(mean) * args.batch_size
    result = {
        "model": args.model,
        "prompts": [args.start, args.start + n_zero],
        "n_zero": n_zero,
        "n_mean": n_mean,
        "base_loss": float(arrays["base"].mean()),
        "seconds": times,
        "seconds_per_prompt": {k: times[k] / max(1, n) for k, n in
                               (("gradient", n_zero), ("zero", n_zero), ("mean", n_mean))},
        "zero": compare_importance(arrays["gradients"], arrays["zero"])["summary"],
    }  # fmt: skip
    if mean:
        g = arrays["gradients"][:n_mean]
        result["mean"] = compare_importance(g, arrays["mean"])["summary"]
        result["zero_same_prompts_as_mean"] = compare_importance(g, arrays["zero"][:n_mean])[
            "summary"
        ]
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "zero"}, indent=1)[:3000])
    print(f"total {elapsed():.1f} min")


if __name__ == "__main__":
    main()
