"""Are two runs the same science? Every table cell, summary, param and tensor, exactly.

For refactors that must not change a figure: scan with the code before and
after (same command, same machine), then

    python benchmarks/compare_runs.py OLD_RUN NEW_RUN

It prints what it compared and every difference, and exits 1 on any. Timing,
versions and the manifest's other bookkeeping are not compared: they differ
between any two runs.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

from headscope.runs import open_run


def differences(a: Any, b: Any, where: str) -> list[str]:
    """Where two JSON-like values differ (NaN equals NaN; floats compared exactly)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}.{k}: only in one run" for k in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b), key=str):
            found += differences(a[key], b[key], f"{where}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def compare(old_path: str, new_path: str) -> list[str]:
    old, new = open_run(old_path), open_run(new_path)
    by_key = [
        {(t.detector, t.prompt_set): t for t in [*run.head_tables(), *run.layer_tables()]}
        for run in (old, new)
    ]
    found = []
    if list(by_key[0]) != list(by_key[1]):
        found.append(f"tables: {list(by_key[0])} vs {list(by_key[1])}")
    cells = 0
    for key in by_key[0].keys() & by_key[1].keys():
        a, b = by_key[0][key], by_key[1][key]
        frame_a = plain(a.frame.to_dict(orient="list"))
        cells += sum(len(column) for column in frame_a.values())
        found += differences(frame_a, plain(b.frame.to_dict(orient="list")), f"{key} rows")
        for part in ("summary", "params"):
            found += differences(
                plain(dict(getattr(a, part))), plain(dict(getattr(b, part))), f"{key} {part}"
            )
        found += differences(a.description, b.description, f"{key} description")
    tensors_a, tensors_b = old.tensors(), new.tensors()
    found += [f"tensor {name}: only in one run" for name in set(tensors_a) ^ set(tensors_b)]
    found += [
        f"tensor {name} differs"
        for name in sorted(set(tensors_a) & set(tensors_b))
        if not torch.equal(tensors_a[name].nan_to_num(), tensors_b[name].nan_to_num())
        or not torch.equal(tensors_a[name].isnan(), tensors_b[name].isnan())
    ]
    print(
        f"{old_path} vs {new_path}: {len(by_key[0])} tables, {cells} cells, "
        f"{len(tensors_a)} tensors compared; {len(found)} differences"
    )
    return found


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    problems = compare(sys.argv[1], sys.argv[2])
    for problem in problems[:50]:
        print("  ", problem)
    sys.exit(1 if problems else 0)
