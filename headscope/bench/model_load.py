"""Cold and warm load time of a bundled model, each in a fresh Python process.

Cold: an empty weight cache, so the GGUF is dequantized and the float32
safetensors cache is written. Warm: the same cache, read back. Each load runs
in its own subprocess so that no import or file cache of this process helps;
we report the time inside ``load_model`` and the whole process wall time
(Python + torch + transformers imports included). The OS page cache is not
dropped (we cannot, unprivileged), so "warm" also means warm disk pages.

    headscope bench model-load [--model smollm2-135m] [--repeats 3]
    (or python benchmarks/model_load.py with the same options)

Appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from headscope.bench import append_results

CHILD = """
import json, time
t0 = time.perf_counter()
from headscope.probes.loading import load_model
handle = load_model({spec!r})
print(json.dumps({{"load_s": handle.load_seconds, "cache_hit": handle.cache_hit,
                   "in_process_s": time.perf_counter() - t0}}))
"""


def timed_load(spec: str, cache: Path) -> dict:
    env = {**os.environ, "HEADSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(spec=spec)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - start
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(timed_load(args.model, Path(cache)))
            warm.append(timed_load(args.model, Path(cache)))
    assert all(c["cache_hit"] is False for c in cold) and all(w["cache_hit"] for w in warm)
    med = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("load_s", "process_s")}
        for name, runs in (("cold", cold), ("warm", warm))
    }
    ratio = med["cold"]["load_s"] / med["warm"]["load_s"]
    print(f"model {args.model}, median of {args.repeats} fresh processes each")
    for name in ("cold", "warm"):
        print(
            f"  {name}: load_model {med[name]['load_s']:.2f} s, "
            f"whole process {med[name]['process_s']:.2f} s"
        )
    print(f"  cold / warm load_model ratio: {ratio:.1f}x")
    append_results(
        f"model_load ({args.model}, median of {args.repeats} fresh processes)",
        ["load", "load_model s", "whole process s"],
        [
            (name, f"{med[name]['load_s']:.2f}", f"{med[name]['process_s']:.2f}")
            for name in ("cold", "warm")
        ],
    )


if __name__ == "__main__":
    main()
