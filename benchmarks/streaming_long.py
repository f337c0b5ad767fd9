"""Time and peak memory of ``streaming_window_long`` (StreamingLLM past the trained context).

Runs the opt-in detector once through ``headscope.scan`` (the run is written to
``--out``; its figures come from ``headscope report --sinks``), timing each of
its three forwards (full attention, rolling cache, cache with sinks) from the
progress callback, and reads the process's peak resident memory before and
after. The baseline of the memory figure is measured in the same run: the
peak after the model has loaded. For scale it prints what the full attention
patterns of the text would take (T^2 x heads x layers x 4 bytes), which is
what a tool that caches patterns would hold.

    python benchmarks/streaming_long.py [--model smollm2-135m] [--seq-len 16384]
        [--out runs/streaming-long]

Appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import time

import headscope
from headscope.bench import append_results
from headscope.probes.loading import load_model


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (default: the set's)")
    parser.add_argument("--cache-size", type=int, default=1024)
    parser.add_argument("--out", default="runs/streaming-long")
    args = parser.parse_args(argv)

    handle = load_model(args.model)
    loaded_gib = peak_rss_gib()
    marks: list[float] = []

    def on_progress(label: str, done: int, total: int) -> None:
        if "streaming cache" in label:
            marks.append(time.perf_counter())

    params = {"cache_size": args.cache_size}
    if args.seq_len:
        params["seq_len"] = args.seq_len
    result = headscope.scan(
        handle,
        prompts="prose",
        detectors="streaming_window_long",
        detector_params={"streaming_window_long": params},
        n_prompts=1,  # the scan's own probe set is irrelevant; keep it minimal
        out=args.out,
        force=True,
        on_progress=on_progress,
    )
    peak_gib = peak_rss_gib()
    table = result.head_table("streaming_window_long")
    length, arch = table.params["seq_len"], handle.arch
    patterns_gib = length**2 * arch.n_heads * arch.n_layers * 4 / 2**30
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    names = ("full attention", f"{args.cache_size}-token cache", "cache with 4 sinks")
    print(f"{args.model}, {length} tokens (trained context {table.params['trained_context']})")
    for name, s in zip(names, seconds, strict=False):
        print(f"  {name}: {s:.1f} s")
    print(f"  peak RSS {peak_gib:.2f} GiB; after model load {loaded_gib:.2f} GiB "
          f"(+{peak_gib - loaded_gib:.2f} GiB for the experiment)")  # fmt: skip
    print(f"  full attention patterns of this text would take {patterns_gib:,.0f} GiB")
    append_results(
        f"streaming_window_long ({args.model}, {length} tokens, cache {args.cache_size})",
        ["quantity", "value"],
        [
            *((f"{name} forward, s", f"{s:.1f}") for name, s in zip(names, seconds, strict=False)),
            ("peak RSS, GiB", f"{peak_gib:.2f}"),
            ("peak RSS after model load (baseline), GiB", f"{loaded_gib:.2f}"),
            (
                "full attention patterns of the text (T^2 x heads x layers x 4 B), GiB",
                f"{patterns_gib:,.0f}",
            ),
        ],  # fmt: skip
    )


if __name__ == "__main__":
    main()
