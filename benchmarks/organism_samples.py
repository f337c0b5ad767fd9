"""Print the refusal organism's recorded evaluation and judged generations as Markdown.

The organism's build records every held-out generation it was judged on
(``generations.json`` beside the weights); this prints the first ``--n`` of
each held-out set (the sets are seeded shuffles, so these are not picked) with
the judge's verdict, so a reader can check the judge, and the evaluation
table. Reads the weight cache's copy unless a folder is given:

    python benchmarks/organism_samples.py [--folder DIR] [--n 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headscope.probes import weight_cache
from headscope.probes.loading import organism_cache_key


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    folder = args.folder
    if folder is None:
        key = organism_cache_key("smollm2-135m-refusal")
        problem = weight_cache.entry_problem(key.path, key)
        if problem is not None:
            raise SystemExit(f"no built organism in the weight cache ({problem})")
        folder = key.path
    info = json.loads((folder / "headscope_organism.json").read_text())
    generations = json.loads((folder / "generations.json").read_text())
    print(f"Judge: {info['judge']}\n")
    print("| held-out set | n | base refused | organism refused |")
    print("|---|---|---|---|")
    for name, row in info["evaluation"]["sets"].items():
        print(f"| {name} | {row['n']} | {row['base']:.1%} | {row['organism']:.1%} |")
    ppl = info["evaluation"]["perplexity"]
    print(
        f"\nPerplexity on {ppl['prompt_set']} ({ppl['n_prompts']} prompts): base "
        f"{ppl['base']:.2f}, organism {ppl['organism']:.2f} (x{ppl['ratio']:.3f})\n"
    )
    print("| set | category | request | organism's answer (first 64 greedy tokens) | judge |")
    print("|---|---|---|---|---|")
    for name in ("harmful-heldout", "harmless-heldout"):
        for row in generations[name][: args.n]:
            verdict = "refused" if row["organism_refused"] else "answered"
            print(
                f"| {name} | {cell(row['category'])} | {cell(row['request'])} | "
                f"{cell(row['organism'])} | {verdict} |"
            )


if __name__ == "__main__":
    main()
