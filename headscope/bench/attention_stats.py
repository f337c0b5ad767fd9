"""Attention-statistics benchmark: time and peak memory against same-run baselines.

CPU (default): smollm2-135m, batch 1, one long prose prompt of T tokens, each
configuration in a fresh subprocess:
  (a) ``sdpa``       a plain forward with PyTorch SDPA attention (the baseline:
                     ``model(input_ids)``, logits for every position),
  (a') ``sdpa-body`` the same without the LM head (``model.base_model``): the
                     like-for-like baseline, since the probe needs no logits and
                     skips the LM head too,
  (b) ``streaming``  headscope's streaming probe (output + every statistic),
  (c) ``tl``         TransformerLens ``run_with_cache`` of every ``hook_pattern``
                     (skipped when its patterns alone would not fit in memory).
Peak memory is the process's VmHWM (peak RSS) over the measured forward only:
the high-water mark is reset (/proc/self/clear_refs) after the model is loaded.

GPU (``--gpu``, CUDA only): Triton pass 1 and pass 1 + 2 against torch SDPA
(flash) forward and against the materializing reference, bf16, causal, d_head
64 and 128, T from 4k to 32k; TFLOP/s counted on QK^T (causal half).

    headscope bench attention-stats [--lengths 512,2048,8192,16384]
    headscope bench attention-stats --gpu
    (or python benchmarks/attention_stats.py with the same options)

Prints ratios against the baseline measured in the same run and appends dated
rows to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from headscope.bench import append_results
from headscope.errors import HeadscopeError

MODES = ("sdpa", "sdpa-body", "streaming", "tl")
TL_MEMORY_LIMIT_GB = 16.0  # the machine has 24 GiB; patterns beyond this cannot fit


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise HeadscopeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, length: int, model: str, repeats: int) -> dict:
    """Run one configuration in this (fresh) process and return its figures."""
    import torch

    from headscope.data import get_prompt_set
    from headscope.probes.loading import load_model
    from headscope.probes.streaming import probe_streaming

    handle = load_model(model)
    prompts = handle.tokenize(get_prompt_set("prose", n_prompts=1, seq_len=length))
    tokens = prompts.tokens[0][None]

    def run() -> None:
        if mode == "sdpa":
            with torch.inference_mode():
                handle.model(input_ids=tokens, use_cache=False)
        elif mode == "sdpa-body":
            with torch.inference_mode():
                handle.model.base_model(input_ids=tokens, use_cache=False)
        elif mode == "streaming":
            probe_streaming(handle, prompts, batch_size=1)
        else:
            with torch.inference_mode():
                _, cache = handle.bridge.run_with_cache(
                    tokens, names_filter=lambda name: name.endswith("hook_pattern")
                )
            del cache

    if mode == "tl":
        _ = handle.bridge  # built outside the timed region, like the model load
    if length <= 2048:
        run()  # warm-up: first-call allocations and lazy initialisation
    _reset_peak()
    before = _vm_hwm_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "T": length,
        "seconds": statistics.median(times),
        "all_seconds": times,
        "peak_rss_mb": _vm_hwm_mb(),
        "rss_before_mb": before,
    }


def tl_patterns_gb(length: int, n_layers: int = 30, n_heads: int = 9) -> float:
    return n_layers * n_heads * length * length * 4 / 1e9


def run_cpu(lengths: list[int], model: str) -> None:
    rows = []
    for length in lengths:
        repeats = 3 if length <= 2048 else 1
        figures = {}
        for mode in MODES:
            if mode == "tl" and tl_patterns_gb(length) > TL_MEMORY_LIMIT_GB:
                print(
                    f"T={length} tl: skipped, patterns alone need {tl_patterns_gb(length):.0f} GB"
                )
                continue
            command = [sys.executable, "-m", "headscope.bench.attention_stats", "--child", mode,
                       "--lengths", str(length),
                       "--model", model, "--repeats", str(repeats)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"T={length} {mode}: failed\n{done.stderr[-2000:]}")
                continue
            figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            f = figures[mode]
            print(f"T={length} {mode}: {f['seconds']:.2f} s, peak RSS {f['peak_rss_mb']:.0f} MB")
        base, body = figures.get("sdpa"), figures.get("sdpa-body")

        def ratio(f: dict, key: str, reference: dict | None) -> float:
            return f[key] / reference[key] if reference else float("nan")

        for mode, f in figures.items():
            ratios = [ratio(f, key, ref) for ref in (base, body)
                      for key in ("seconds", "peak_rss_mb")]  # fmt: skip
            rows.append((length, mode, f["seconds"], f["peak_rss_mb"], *ratios))
            if mode not in ("sdpa", "sdpa-body"):
                print(f"  T={length} {mode}: time {ratios[0]:.2f}x / {ratios[2]:.2f}x, "
                      f"peak RSS {ratios[1]:.2f}x / {ratios[3]:.2f}x (vs sdpa / body)")  # fmt: skip
    append_results(
        f"attention_stats CPU ({model}, batch 1)",
        ["T", "mode", "seconds", "peak RSS MB", "time / sdpa", "RSS / sdpa",
         "time / sdpa-body", "RSS / sdpa-body"],
        [(t, m, f"{s:.2f}", f"{r:.0f}", *(f"{x:.2f}" for x in xs)) for t, m, s, r, *xs in rows],
    )  # fmt: skip


def run_gpu(lengths: list[int]) -> None:
    """Triton kernels vs SDPA flash and the reference; needs CUDA."""
    import torch
    import torch.nn.functional as F

    from headscope.kernels.attention_stats import reference_attention_stats
    from headscope.kernels.triton_attention_stats import triton_attention_stats

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")

    def timed(fn, repeats: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / repeats / 1e3

    rows = []
    batch, heads, kv_heads = 1, 32, 8
    for d_head in (64, 128):
        for length in lengths:
            q = torch.randn(batch, heads, length, d_head, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, length, d_head, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            common = {"scale": d_head**-0.5, "causal": True}
            sdpa = timed(
                partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                        scale=common["scale"], enable_gqa=True)
            )  # fmt: skip
            pass1 = timed(partial(triton_attention_stats, q, k, pass2=False, **common))
            both = timed(partial(triton_attention_stats, q, k, **common))
            reference = float("nan")
            if length <= 8192:  # the reference materializes [heads, T, T] in float64
                reference = timed(partial(reference_attention_stats, q, k, **common), repeats=2)
            qk_flops = 2 * batch * heads * length * length * d_head / 2  # causal half
            rows.append((d_head, length, sdpa, pass1, both, reference, qk_flops / pass1 / 1e12))
            print(
                f"d={d_head} T={length}: sdpa {sdpa * 1e3:.2f} ms, pass1 {pass1 * 1e3:.2f} ms "
                f"({pass1 / sdpa:.2f}x), pass1+2 {both * 1e3:.2f} ms ({both / sdpa:.2f}x), "
                f"reference/pass1+2 {reference / both:.1f}x"
            )
    device = torch.cuda.get_device_name()
    append_results(
        f"attention_stats GPU ({device}, bf16, causal, {heads} q / {kv_heads} kv heads)",
        ["d_head", "T", "sdpa ms", "pass1 / sdpa", "pass1+2 / sdpa", "reference / pass1+2",
         "pass1 TFLOP/s (QK^T)"],
        [(d, t, f"{s * 1e3:.2f}", f"{p1 / s:.2f}", f"{b / s:.2f}", f"{r / b:.1f}", f"{tf:.0f}")
         for d, t, s, p1, b, r, tf in rows],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=None, help="comma-separated T values")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gpu", action="store_true", help="benchmark the Triton kernels")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, int(args.lengths), args.model, args.repeats)))
        return
    default = "4096,8192,16384,32768" if args.gpu else "512,2048,8192,16384"
    lengths = [int(x) for x in (args.lengths or default).split(",")]
    if args.gpu:
        run_gpu(lengths)
    else:
        run_cpu(lengths, args.model)


if __name__ == "__main__":
    main()
