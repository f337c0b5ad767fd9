"""Successor heads under each effective-OV protocol on one model (README figures).

    python benchmarks/successor_protocols.py MODEL [PROTOCOL:BEHAVIOUR[:OPTION=VALUE]] ...

Each argument runs ``get_detector("successor").run_experiment(handle,
protocol=PROTOCOL, behaviour=BEHAVIOUR == "1", OPTION=VALUE)`` and prints the
best head, its chance level and best-of-heads null, the top heads' per-task and
mod-10 accuracy, and (with the behavioural check) the ablation accuracies.
Without arguments: the three protocols with the behavioural check. With
``--json DIR`` each table's summary and params are also written as JSON.

    python benchmarks/successor_protocols.py smollm2-135m headscope:0 gould2023:0 layer0:0 \\
        gould2023:0:include_residual=True headscope:0:final_norm=False
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from headscope.analyses import get_detector
from headscope.probes.loading import load_model

BOOLEANS = {"True": True, "False": False}


def parse_run(text: str) -> tuple[str, bool, dict]:
    protocol, behaviour, *extra = text.split(":")
    options = {}
    for item in extra:
        key, _, value = item.partition("=")
        options[key] = BOOLEANS.get(value, value)
    return protocol, behaviour == "1", options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("runs", nargs="*", default=["headscope:1", "gould2023:1", "layer0:1"])
    parser.add_argument("--json", type=Path, default=None, help="folder for one JSON per run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    handle = load_model(args.model)
    print(f"load {time.perf_counter() - started:.1f} s", flush=True)
    detector = get_detector("successor")
    for text in args.runs:
        protocol, behaviour, options = parse_run(text)
        t0 = time.perf_counter()
        table = detector.run_experiment(handle, protocol=protocol, behaviour=behaviour, **options)
        seconds = time.perf_counter() - t0
        s = table.summary
        print(
            f"{text}: {seconds:.1f} s; best {s['best_head']} {s['best_score']:.3f} "
            f"(chance {s['chance']:.3f}; best-of-heads null {s['null_best_score_mean']:.3f}, "
            f"q95 {s['null_best_score_q95']:.3f}, p {s['null_p']:.3f}); median "
            f"{s['median_score']:.3f}; copy {s['best_copy_head']} {s['best_copy_score']:.2f}",
            flush=True,
        )
        for top in s["top_heads"]:
            tasks = {k: round(float(v), 2) for k, v in top["task_accuracy"].items()}
            print(f"    {top['head']} {top['score']:.3f} mod10 {top['mod10']} {tasks}")
        print(f"    mod10 {dict(s['mod10'])}")
        if "accuracy_clean" in s:
            print(
                f"    behaviour ({s['behaviour_prompts']} prompts): clean "
                f"{s['accuracy_clean']:.3f}, top head ablated {s['accuracy_top_ablated']:.3f}, "
                f"random heads {s['accuracy_random_mean']:.3f} ± {s['accuracy_random_std']:.3f} "
                f"(lowest {min(s['accuracy_random_draws']):.3f})"
            )
        if args.json is not None:
            args.json.mkdir(parents=True, exist_ok=True)
            name = "_".join([args.model.replace(":", "-"), *text.split(":")]).replace("=", "-")
            payload = {**s, "seconds": seconds, "params": dict(table.params)}
            (args.json / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
