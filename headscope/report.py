"""Text report of a run: model, prompt sets, the sink suite and the top heads per role.

Returns rich renderables so the CLI prints them and tests can render them to
plain text. Each role leads with its primary prompt set (the set on which it
is defined, e.g. induction on repeated random tokens). ``sink_summary`` gathers
the sink analyses into one table (also as Markdown, for READMEs and notes).

A run's strings are data, never markup: every cell and title is a rich
``Text`` (so ``[bold]`` in a prompt-set name is printed, not applied) with its
control characters shown as escapes (no terminal escape sequence from a run
reaches the terminal). A table whose summary or params lack what its section
needs (a hand-edited run) gets one line saying so; the rest of the report is
still printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from headscope.ablation_spec import head_name
from headscope.safety_summary import Block, is_safety, safety_blocks
from headscope.tables import HeadTable, LayerTable, primary_prompt_sets, tables_of
from headscope.text import plain

#: what formatting a table whose summary or params are not what its detector
#: writes can raise (a missing key, a string where a number belongs, ...)
UNREADABLE = (
    KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError,
    OverflowError,
)  # fmt: skip
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _text(value: Any) -> Text:
    return Text(plain(value))


def _markdown_cell(value: Any) -> str:
    """Text for a Markdown table cell: no pipe ends the cell, no link or tag forms."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", plain(value))


def unreadable(table: HeadTable | LayerTable, err: BaseException) -> str:
    """One line: this table's section cannot be shown, and why."""
    if isinstance(err, KeyError) and err.args:
        why = f"its summary or params lack {err.args[0]!r}"
    else:
        why = f"its summary or params hold unexpected values ({type(err).__name__}: {err})"
    return plain(f"{table.detector} on {table.prompt_set}: not shown, {why}")


def _new_table(title: str, columns: Sequence[str], *, right: Sequence[str] = ()) -> Table:
    table = Table(title=_text(title), min_width=60)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def _add_row(table: Table, *cells: Any) -> None:
    table.add_row(*(_text(cell) for cell in cells))


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
        try:
            cells = (
                f"{t.params['epsilon']:g}",
                f"{s['sink_rate']:.1f}",
                f"{s['sink_rate_sd_over_prompts']:.1f}",
                f"{s['sink_rate_of_mean']:.1f}",
                str(s["n_prompts"]),
            )
        except UNREADABLE as err:
            cells = (unreadable(t, err), "", "", "", "")
        _add_row(table, t.prompt_set, *cells)
    return table


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _rate_row(t: HeadTable) -> tuple[str, str]:
    s = t.summary
    return (f"Sink_1^{t.params['epsilon']:g} on {t.prompt_set} (% of heads)",
            f"{s['sink_rate']:.1f} (sd {s['sink_rate_sd_over_prompts']:.1f} over "
            f"{s['n_prompts']} prompts)")  # fmt: skip


def _hidden_row(t: HeadTable) -> tuple[str, str]:
    s = t.summary
    protocol = t.params.get("protocol", "headscope")
    # every protocol's counts, the table's own first (ACT's rule is the published one)
    counts = s.get("by_protocol") or {protocol: s}
    value = "; ".join(
        f"{c['n_heads_flagged']} / {c['n_heads_with_any_hidden_sink']} ({name})"
        for name, c in sorted(counts.items(), key=lambda item: item[0] != protocol)
    )
    return (f"heads with hidden sinks on {t.prompt_set} (on >= "
            f"{t.params['min_fraction']:.0%} of prompts / on any) of {len(t.frame)}",
            value)  # fmt: skip


def _massive_row(t: LayerTable) -> tuple[str, str]:
    s = t.summary
    return (f"massive activations on {t.prompt_set}: dims (first layer)",
            f"{_format(s['massive_dims'])} ({_format(s['first_layer'])}); "
            f"max |h| {s['max_abs']:.0f}")  # fmt: skip


def _position_row(t: LayerTable, label: str) -> tuple[str, str]:
    flagged = t.flagged()["layer"].sort_values().tolist()
    return (f"{label} at position {t.params['position']} on {t.prompt_set}: layers",
            _format(flagged))  # fmt: skip


def _dormant_row(t: HeadTable) -> tuple[str, str]:
    protocol = t.params.get("protocol", "headscope")
    own = {protocol: t.summary["n_active_dormant"]}
    counts = t.summary.get("n_active_dormant_by_protocol") or own
    value = "; ".join(
        f"{'n/a' if n is None else n} ({name})"
        for name, n in sorted(counts.items(), key=lambda item: item[0] != protocol)
    )
    return (f"active-dormant heads over {t.prompt_set}", value)


def _intervention_row(t: LayerTable) -> tuple[str, str]:
    s = t.summary
    # tables written before the protocol parameter used the pooled protocol
    protocol = t.params.get("protocol", "pooled")
    where = s.get("positions", "every entry of the dims that passes the criterion")
    return (f"{t.prompt_set} perplexity, massive entries (protocol {protocol}: layer "
            f"{s['layer']}, dims {_format(s['dims'])}, {where}): untouched / mean / zero",
            f"{s['ppl_original']:.2f} / {s['ppl_mean']:.2f} / {s['ppl_zero']:.4g}")  # fmt: skip


def _window_row(t: HeadTable) -> tuple[str, str]:
    s, p = t.summary, t.params
    k = p["n_sink_tokens"]
    kept = f"{k} first + {p['window'] - k} recent" if "budget" in p else f"window + {k} first"
    return (f"{t.prompt_set} perplexity past the window (T {p['seq_len']}, W {p['window']} keys): "
            f"full / {p['window']} recent / {kept}",
            f"{s['ppl_full_past_window']:.2f} / {s['ppl_window_0_sinks_past_window']:.4g} / "
            f"{s[f'ppl_window_{k}_sinks_past_window']:.2f}")  # fmt: skip


def _long_window_row(t: HeadTable) -> tuple[str, str]:
    s, p = t.summary, t.params
    k, cache = p["n_sink_tokens"], p["cache_size"]
    return (f"{t.prompt_set} perplexity past the trained context (T {p['seq_len']}, trained "
            f"{p['trained_context']}): full / {cache} recent / {k} first + {cache - k} recent",
            f"{s['ppl_full_past_trained_context']:.4g} / "
            f"{s['ppl_window_past_trained_context']:.4g} / "
            f"{s['ppl_sinks_past_trained_context']:.4g}")  # fmt: skip


def _flagged_row(t: HeadTable | LayerTable) -> tuple[str, str]:
    """The row of a sink detector the summary has no row of its own for."""
    unit = "heads" if isinstance(t, HeadTable) else "layers"
    return (f"{t.detector} on {t.prompt_set}: {unit} flagged",
            f"{int(t.frame['flagged'].sum())} of {len(t.frame)}")  # fmt: skip


#: the sink summary's row of each sink detector, in the order shown, and whether
#: every table of it gets a row ("every") or only the one on its primary prompt
#: set ("lead"); the sink detectors are those of the "sinks" group, and one
#: without a row here gets ``_flagged_row``
SINK_ROWS: dict[str, tuple[Callable[[Any], tuple[str, str]], str]] = {
    "first_token_sink": (_rate_row, "every"),
    "hidden_sink": (_hidden_row, "every"),
    "massive_activations": (_massive_row, "every"),
    "residual_peak": (lambda t: _position_row(t, "residual-state peak"), "lead"),
    "value_drain": (lambda t: _position_row(t, "value-state drain"), "lead"),
    "active_dormant": (_dormant_row, "lead"),
    "massive_intervention": (_intervention_row, "lead"),
    "streaming_window": (_window_row, "lead"),
    "streaming_window_long": (_long_window_row, "lead"),
}


def sink_summary(
    tables: Sequence[HeadTable | LayerTable],
    *,
    include_rates: bool = True,
    primary: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(quantity, value) rows of the sink analyses (the "sinks" group) in ``tables``.

    ``primary`` ({detector: prompt set}, ``primary_prompt_sets(manifest)``)
    picks the table of a one-row detector; without it, its first table.
    ``include_rates=False`` leaves out the Sink_1 rows (the full report shows
    them in their own, wider table). A table whose summary lacks a figure gets
    a row that says so.
    """
    sinks = [t for t in tables if t.group == "sinks"]
    rows: list[tuple[str, str]] = []
    named = [*SINK_ROWS, *(t.detector for t in sinks if t.detector not in SINK_ROWS)]
    for detector in dict.fromkeys(named):
        if detector == "first_token_sink" and not include_rates:
            continue
        row, which = SINK_ROWS.get(detector, (_flagged_row, "every"))
        own = tables_of(sinks, detector, None, primary or {})
        for table in own if which == "every" else own[:1]:
            try:
                rows.append(row(table))
            except UNREADABLE as err:
                rows.append((f"{table.detector} on {table.prompt_set}", unreadable(table, err)))
    return rows


def sink_summary_table(rows: Sequence[tuple[str, str]], *, markdown: bool = False):
    """The rows of ``sink_summary`` as a rich Table, or as Markdown text."""
    if markdown:
        lines = ["| quantity | value |", "|---|---|"]
        cells = [f"| {_markdown_cell(q)} | {_markdown_cell(v)} |" for q, v in rows]
        return "\n".join(lines + cells)
    table = _new_table("Attention sinks", ("quantity", "value"), right=("value",))
    for row in rows:
        _add_row(table, *row)
    return table


def _flagged_layers(table: LayerTable, *, all_rows_up_to: int = 12) -> Table:
    """Every layer of a small model; of a larger one the flagged layers only."""
    frame = table.frame
    shown = frame if len(frame) <= all_rows_up_to else table.flagged()
    order = table.summary.get("order")
    out = _new_table(
        f"{table.detector} on {table.prompt_set}: "
        f"{int(frame['flagged'].sum())} of {len(frame)} layers flagged",
        ("layer", "score", "flagged"),
        right=("score",),
    )
    if order:
        out.title.append(f"\n{plain(f'ranking (flagged first): {_format(order)}')}")
    for _, row in shown.iterrows():
        _add_row(out, f"L{row['layer']}", f"{row['score']:.4g}", "yes" if row["flagged"] else "")
    return out


def _families(table: HeadTable) -> Table:
    summary = table.summary
    title = (
        f"head families on {table.prompt_set}: {summary.get('n_families')} families, "
        f"mean silhouette {summary.get('silhouette', float('nan')):.3f}"
    )
    if "verdict" in summary:  # runs from before issue 15 have no stability
        title += f"; {summary['verdict']}"
    out = _new_table(title, ("family", "size", "defined by", "Jaccard prompt / head", "members"))
    for family in summary.get("families", []):
        members = family.get("members", [])
        more = family["size"] - len(members)
        jaccard = family.get("jaccard", {})
        stability = " / ".join(
            f"{jaccard[s]:.2f}" if s in jaccard else "-" for s in ("prompt", "head")
        )
        if jaccard:
            stability += " (survives)" if family.get("survives") else ""
        _add_row(
            out,
            family["family"],
            family["size"],
            family.get("name", ""),
            stability if jaccard else "",
            ", ".join(map(str, members)) + (f" (+{more})" if more > 0 else ""),
        )
    return out


def _drop_curves(table: LayerTable) -> Table:
    summary = table.summary
    curves = summary["curves"]
    names = sorted({n for c in curves.values() for n, v in c.items() if isinstance(v, dict)
                    and "perplexity" in v})  # fmt: skip
    columns = [(name, "perplexity") for name in names]
    if any("median" in curve.get("random", {}) for curve in curves.values()):
        columns.append(("random", "median"))
    headers = [name if key == "perplexity" else f"{name} {key}" for name, key in columns]
    out = _new_table(
        f"drop simulation: held-out perplexity on {table.prompt_set} "
        f"(baseline {summary['baseline_perplexity']:.3f}; random = mean of "
        f"{table.params.get('n_random', '?')} orders)",
        ["dropped", "n", *headers],
        right=headers,
    )
    for kind, curve in curves.items():
        for i, n in enumerate(curve["n_dropped"]):
            cells = [
                f"{curve[name][key][i]:.3f}" if key in curve.get(name, {}) else ""
                for name, key in columns
            ]
            _add_row(out, kind if i == 0 else "", n, *cells)
    return out


def _top_heads(table: HeadTable, n: int) -> Table:
    out = _new_table(
        f"{table.detector} on {table.prompt_set}: top {n} "
        f"({int(table.frame['flagged'].sum())} of {len(table.frame)} flagged)",
        ("head", "score", "flagged"),
        right=("score",),
    )
    for _, row in table.top(n).iterrows():
        _add_row(
            out, head_name(row["layer"], row["head"]), f"{row['score']:.4f}",
            "yes" if row["flagged"] else "",
        )  # fmt: skip
    return out


def blocks_renderable(blocks: Sequence[Block]) -> Group:
    """Blocks (``headscope.safety_summary``) as rich tables, each with its notes below."""
    parts: list[Any] = []
    for block in blocks:
        out = _new_table(block.title, block.columns)
        for row in block.rows:
            _add_row(out, *row)
        parts.append(out)
        parts += [_text(note) for note in block.notes]
    return Group(*parts)


#: detectors whose report section is not the default (top heads, or flagged
#: layers); None: no section (massive_intervention's one row is in the sink table)
SECTIONS: dict[str, Callable[[Any], Any] | None] = {
    "head_families": _families,
    "drop_simulation": lambda t: Group(_drop_curves(t), _flagged_layers(t)),
    "massive_intervention": None,
}


def _section(table: HeadTable | LayerTable, top: int) -> Any:
    """The part of the report for one detector (its lead table), or a line saying why not."""
    try:
        if is_safety(table):  # Ships, Sahara, the refusal direction, the generation check
            return blocks_renderable(safety_blocks(table, top))
        if table.detector in SECTIONS:
            special = SECTIONS[table.detector]
            return None if special is None else special(table)
        if isinstance(table, HeadTable):
            return _top_heads(table, top)
        return _flagged_layers(table)
    except UNREADABLE as err:
        return _text(unreadable(table, err))


def _objects(manifest: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """The JSON objects listed under ``field`` (a checked run lists nothing else)."""
    items = manifest.get(field, [])
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _header(manifest: dict[str, Any]) -> Text:
    model = manifest.get("model", {})
    model = model if isinstance(model, dict) else {}
    arch = model.get("arch", {})
    arch = arch if isinstance(arch, dict) else {}
    sets = manifest.get("prompt_sets", [])
    described = [
        f"{p.get('name', '?')} ({p.get('n_prompts', '?')} x {p.get('lengths', '?')})"
        if isinstance(p, dict) else str(p)
        for p in (sets if isinstance(sets, list) else [])
    ]  # fmt: skip
    return Text.assemble(
        ("headscope report", "bold"),
        "  ",
        plain(
            f"model {model.get('spec', '?')}: {arch.get('n_layers', '?')} layers x "
            f"{arch.get('n_heads', '?')} heads ({arch.get('n_kv_heads', '?')} KV heads)"
        ),
        "\n",
        plain("prompt sets: " + ", ".join(described)),
    )


def _bos_line(manifest: dict[str, Any]) -> str:
    bos = manifest.get("bos")
    if not isinstance(bos, dict):
        sets = _objects(manifest, "prompt_sets")
        prepended = {p.get("bos_prepended") for p in sets}
        said = {True: "prompts start with the BOS", False: "prompts have no BOS"}
        told = said.get(next(iter(prepended))) if len(prepended) == 1 else None
        return "BOS: not recorded (a run from before the choice existed" + (
            f"; {told})" if told else ")"
        )
    token = bos.get("token")
    what = f"{token!r} prepended" if bos.get("prepended") else "none prepended"
    line = f"BOS: {bos.get('policy', '?')} ({what})"
    if bos.get("classic_heads"):
        line += f"; classic heads: {bos['classic_heads']}"
    return line


def protocol_lines(tables: Sequence[HeadTable | LayerTable]) -> list[str]:
    """One line per detector whose tables say which published protocol they follow."""
    lines = {}
    for table in tables:
        protocol = table.params.get("protocol") if isinstance(table.params, Mapping) else None
        if protocol is None or table.detector in lines:
            continue
        note = table.params.get("protocol_note")
        lines[table.detector] = f"{table.detector}: protocol {protocol}" + (
            f" ({note})" if note else ""
        )
    return list(lines.values())


def run_context(manifest: dict[str, Any], tables: Sequence[HeadTable | LayerTable]) -> Text:
    """The lines that say how a run's figures were made: the BOS choice and each
    detector's protocol (printed above every report of a run)."""
    return Text("\n".join(plain(line) for line in [_bos_line(manifest), *protocol_lines(tables)]))


def build_report(
    manifest: dict[str, Any], tables: Sequence[HeadTable | LayerTable], *, top: int = 5
) -> Group:
    """The text report of a run as rich renderables (``console.print`` them).

    Every string from the run is printed as text; a table whose summary is not
    what its detector writes gets one line instead of its section.
    """
    parts: list[Any] = [_header(manifest), run_context(manifest, tables)]
    if any(t.detector == "first_token_sink" for t in tables):
        parts.append(_sink_rates(tables))
    primary = primary_prompt_sets(manifest)
    rows = sink_summary(tables, include_rates=False, primary=primary)
    if rows:
        parts.append(sink_summary_table(rows))
    for detector in dict.fromkeys(t.detector for t in tables):
        section = _section(tables_of(list(tables), detector, None, primary)[0], top)
        if section is not None:
            parts.append(section)
    for skipped in _objects(manifest, "skipped"):
        parts.append(_text(f"skipped {skipped.get('detector')}: {skipped.get('reason')}"))
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
        f"(* = flagged: {json.dumps(dict(table.params), default=str)})"
    )
    if markdown:
        lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        return _markdown_cell(title) + "\n\n" + "\n".join(lines)
    out = Table(title=_text(title))
    for column in header:
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(*row)
    return out
