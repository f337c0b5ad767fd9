"""Text report of a run: model, prompt sets, sink rates and the top heads per role.

Returns rich renderables so the CLI prints them and tests can render them to
plain text. Each role leads with its primary prompt set (the set on which it
is defined, e.g. induction on repeated random tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from headscope.analyses.tables import HeadTable


def _sink_rates(tables: Sequence[HeadTable]) -> Table:
    table = Table(
        title="First-token sink rate Sink_1^eps (% of heads with alpha_0 > eps)", min_width=60
    )
    for column in (
        "prompt set",
        "eps",
        "sink rate %",
        "sd over prompts",
        "of mean alpha %",
        "prompts",
    ):
        table.add_column(column, justify="right" if column != "prompt set" else "left")
    for t in tables:
        if t.detector != "first_token_sink":
            continue
        s = t.summary
        table.add_row(
            t.prompt_set,
            f"{t.params['epsilon']:g}",
            f"{s['sink_rate']:.1f}",
            f"{s['sink_rate_sd_over_prompts']:.1f}",
            f"{s['sink_rate_of_mean']:.1f}",
            str(s["n_prompts"]),
        )
    return table


def _top_heads(table: HeadTable, n: int) -> Table:
    out = Table(
        title=f"{table.detector} on {table.prompt_set}: top {n} "
        f"({int(table.frame['flagged'].sum())} of {len(table.frame)} flagged)",
        min_width=60,
    )
    for column in ("head", "score", "flagged"):
        out.add_column(column, justify="right" if column == "score" else "left")
    for _, row in table.top(n).iterrows():
        out.add_row(
            f"L{row['layer']}H{row['head']}", f"{row['score']:.4f}", "yes" if row["flagged"] else ""
        )
    return out


def build_report(manifest: dict[str, Any], tables: Sequence[HeadTable], *, top: int = 5) -> Group:
    model = manifest.get("model", {})
    arch = model.get("arch", {})
    header = Text.assemble(
        ("headscope report", "bold"),
        f"  model {model.get('spec', '?')}: {arch.get('n_layers', '?')} layers x "
        f"{arch.get('n_heads', '?')} heads ({arch.get('n_kv_heads', '?')} KV heads)\n",
        "prompt sets: "
        + ", ".join(
            f"{p['name']} ({p['n_prompts']} x {p['lengths']})"
            for p in manifest.get("prompt_sets", [])
        ),
    )
    parts: list[Any] = [header]
    if any(t.detector == "first_token_sink" for t in tables):
        parts.append(_sink_rates(tables))
    primary = {d["name"]: d["primary_prompt_set"] for d in manifest.get("detectors", [])}
    for detector in dict.fromkeys(t.detector for t in tables):
        own = [t for t in tables if t.detector == detector]
        lead = next((t for t in own if t.prompt_set == primary.get(detector)), own[0])
        parts.append(_top_heads(lead, top))
    return Group(*parts)


def score_matrix(table: HeadTable, *, markdown: bool = False, digits: int = 3) -> Table | str:
    """All scores of one table as a layer x head grid (flagged heads starred).

    ``markdown=True`` returns GitHub-flavoured Markdown text (for READMEs and
    notes) instead of a rich Table.
    """
    grid = table.matrix()
    flags = np.zeros_like(grid, dtype=bool)
    flagged = table.frame[table.frame["flagged"]]
    flags[flagged["layer"].to_numpy(), flagged["head"].to_numpy()] = True
    header = ["layer"] + [f"H{h}" for h in range(table.n_heads)]

    def cell(layer: int, head: int) -> str:
        value = grid[layer, head]
        text = "" if np.isnan(value) else f"{value:.{digits}f}"
        return text + ("*" if flags[layer, head] else "")

    rows = [
        [f"L{layer}"] + [cell(layer, h) for h in range(table.n_heads)]
        for layer in range(table.n_layers)
    ]
    title = (
        f"{table.detector} on {table.prompt_set}, per head "
        f"(* = flagged: {json.dumps(dict(table.params))})"
    )
    if markdown:
        lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        return title + "\n\n" + "\n".join(lines)
    out = Table(title=title)
    for column in header:
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(*row)
    return out
