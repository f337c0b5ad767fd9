"""Text report of a run: model, prompt sets, the sink suite and the top heads per role.

Returns rich renderables so the CLI prints them and tests can render them to
plain text. Each role leads with its primary prompt set (the set on which it
is defined, e.g. induction on repeated random tokens). ``sink_summary`` gathers
the sink analyses into one table (also as Markdown, for READMEs and notes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from headscope.analyses.tables import HeadTable, LayerTable


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


def _find(tables, detector: str, prompt_set: str | None = None):
    return next(
        (t for t in tables if t.detector == detector and prompt_set in (None, t.prompt_set)),
        None,
    )


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def sink_summary(
    tables: Sequence[HeadTable | LayerTable], *, include_rates: bool = True
) -> list[tuple[str, str]]:
    """(quantity, value) rows of the sink analyses present in ``tables``.

    ``include_rates=False`` leaves out the Sink_1 rows (the full report shows
    them in their own, wider table).
    """
    rows: list[tuple[str, str]] = []
    for t in tables:
        if include_rates and t.detector == "first_token_sink":
            s = t.summary
            rows.append(
                (f"Sink_1^{t.params['epsilon']:g} on {t.prompt_set} (% of heads)",
                 f"{s['sink_rate']:.1f} (sd {s['sink_rate_sd_over_prompts']:.1f} over "
                 f"{s['n_prompts']} prompts)")
            )  # fmt: skip
    for t in tables:
        if t.detector == "hidden_sink":
            s = t.summary
            rows.append(
                (f"heads with hidden sinks on {t.prompt_set} (on >= "
                 f"{t.params['min_fraction']:.0%} of prompts / on any)",
                 f"{s['n_heads_flagged']} / {s['n_heads_with_any_hidden_sink']} of {len(t.frame)}")
            )  # fmt: skip
    for t in tables:
        if t.detector == "massive_activations":
            s = t.summary
            rows.append(
                (f"massive activations on {t.prompt_set}: dims (first layer)",
                 f"{_format(s['massive_dims'])} ({_format(s['first_layer'])}); "
                 f"max |h| {s['max_abs']:.0f}")
            )  # fmt: skip
    for detector, label in (("residual_peak", "residual-state peak"),
                            ("value_drain", "value-state drain")):  # fmt: skip
        t = _find(tables, detector, "prose") or _find(tables, detector)
        if t is not None:
            flagged = t.flagged()["layer"].sort_values().tolist()
            rows.append(
                (f"{label} at position {t.params['position']} on {t.prompt_set}: layers",
                 _format(flagged))
            )  # fmt: skip
    t = _find(tables, "active_dormant")
    if t is not None:
        rows.append(
            (f"active-dormant heads over {t.prompt_set}", str(t.summary["n_active_dormant"]))
        )
    t = _find(tables, "massive_intervention")
    if t is not None:
        s = t.summary
        rows.append(
            (f"{t.prompt_set} perplexity, massive entries (layer {s['layer']}, dims "
             f"{_format(s['dims'])}): untouched / mean / zero",
             f"{s['ppl_original']:.2f} / {s['ppl_mean']:.2f} / {s['ppl_zero']:.4g}")
        )  # fmt: skip
    t = _find(tables, "streaming_window")
    if t is not None:
        s, p = t.summary, t.params
        k = p["n_sink_tokens"]
        rows.append(
            (f"{t.prompt_set} perplexity past the window (T {p['seq_len']}, W {p['window']}): "
             f"full / window 0 sinks / window {k} sinks",
             f"{s['ppl_full_past_window']:.2f} / {s['ppl_window_0_sinks_past_window']:.4g} / "
             f"{s[f'ppl_window_{k}_sinks_past_window']:.2f}")
        )  # fmt: skip
    return rows


def sink_summary_table(rows: Sequence[tuple[str, str]], *, markdown: bool = False):
    """The rows of ``sink_summary`` as a rich Table, or as Markdown text."""
    if markdown:
        lines = ["| quantity | value |", "|---|---|"]
        return "\n".join(lines + [f"| {q} | {v} |" for q, v in rows])
    table = Table(title="Attention sinks", min_width=60)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _flagged_layers(table: LayerTable, *, all_rows_up_to: int = 12) -> Table:
    """Every layer of a small model; of a larger one the flagged layers only."""
    frame = table.frame
    shown = frame if len(frame) <= all_rows_up_to else table.flagged()
    order = table.summary.get("order")
    out = Table(
        title=f"{table.detector} on {table.prompt_set}: "
        f"{int(frame['flagged'].sum())} of {len(frame)} layers flagged"
        + (f"\nranking (flagged first): {_format(order)}" if order else ""),
        min_width=60,
    )
    for column in ("layer", "score", "flagged"):
        out.add_column(column, justify="right" if column == "score" else "left")
    for _, row in shown.iterrows():
        out.add_row(f"L{row['layer']}", f"{row['score']:.4g}", "yes" if row["flagged"] else "")
    return out


def _families(table: HeadTable) -> Table:
    summary = table.summary
    out = Table(
        title=f"head families on {table.prompt_set}: {summary.get('n_families')} families, "
        f"mean silhouette {summary.get('silhouette', float('nan')):.3f}",
        min_width=60,
    )
    for column in ("family", "size", "defined by", "members"):
        out.add_column(column)
    for family in summary.get("families", []):
        members = family.get("members", [])
        more = family["size"] - len(members)
        out.add_row(
            str(family["family"]),
            str(family["size"]),
            family.get("name", ""),
            ", ".join(members) + (f" (+{more})" if more > 0 else ""),
        )
    return out


def _drop_curves(table: LayerTable) -> Table:
    summary = table.summary
    out = Table(
        title=f"drop simulation: held-out perplexity on {table.prompt_set} "
        f"(baseline {summary['baseline_perplexity']:.3f}; random = mean of "
        f"{table.params.get('n_random', '?')} orders)",
        min_width=60,
    )
    out.add_column("dropped")
    out.add_column("n")
    curves = summary["curves"]
    names = sorted({n for c in curves.values() for n, v in c.items() if isinstance(v, dict)
                    and "perplexity" in v})  # fmt: skip
    columns = [(name, "perplexity") for name in names]
    if any("median" in curve.get("random", {}) for curve in curves.values()):
        columns.append(("random", "median"))
    for name, key in columns:
        out.add_column(name if key == "perplexity" else f"{name} {key}", justify="right")
    for kind, curve in curves.items():
        for i, n in enumerate(curve["n_dropped"]):
            cells = [
                f"{curve[name][key][i]:.3f}" if key in curve.get(name, {}) else ""
                for name, key in columns
            ]
            out.add_row(kind if i == 0 else "", str(n), *cells)
    return out


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


def build_report(
    manifest: dict[str, Any], tables: Sequence[HeadTable | LayerTable], *, top: int = 5
) -> Group:
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
    rows = sink_summary(tables, include_rates=False)
    if rows:
        parts.append(sink_summary_table(rows))
    primary = {d["name"]: d["primary_prompt_set"] for d in manifest.get("detectors", [])}
    for detector in dict.fromkeys(t.detector for t in tables):
        own = [t for t in tables if t.detector == detector]
        lead = next((t for t in own if t.prompt_set == primary.get(detector)), own[0])
        if detector == "head_families":
            parts.append(_families(lead))
        elif detector == "drop_simulation":
            parts.append(_drop_curves(lead))
            parts.append(_flagged_layers(lead))
        elif isinstance(lead, HeadTable):
            parts.append(_top_heads(lead, top))
        elif detector != "massive_intervention":  # its one row is in the sink table
            parts.append(_flagged_layers(lead))
    for skipped in manifest.get("skipped", []):
        parts.append(Text(f"skipped {skipped['detector']}: {skipped['reason']}"))
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
