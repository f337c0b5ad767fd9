"""A static HTML report of a run: ``headscope report RUN --html report.html``.

One self-contained file (plotly.js inlined once, so it opens offline and can
be mailed around): the model and prompt sets, the sink summary, a role census,
then every detector's figures from ``headscope.plots`` with its summary, the
detector's primary prompt set first. It reads the run only; nothing is
recomputed.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headscope.analyses.tables import HeadTable, LayerTable
from headscope.plots import figures_for, role_census
from headscope.report import sink_summary

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-top: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.meta { color: #666; } .figure { margin: 1em 0; }
"""


def _rows_table(rows: Sequence[tuple[str, str]], header: tuple[str, str]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(str(a))}</td><td>{html.escape(str(b))}</td></tr>" for a, b in rows
    )
    return (
        f"<table><tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>"
        f"{cells}</table>"
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _ordered(tables: Sequence[HeadTable | LayerTable], manifest: dict) -> list:
    """Detectors in run order; within one, its primary prompt set first."""
    primary = {d["name"]: d.get("primary_prompt_set") for d in manifest.get("detectors", [])}
    order = list(dict.fromkeys(t.detector for t in tables))
    return sorted(
        tables,
        key=lambda t: (order.index(t.detector), t.prompt_set != primary.get(t.detector)),
    )


def build_html_report(manifest: dict[str, Any], tables: Sequence[HeadTable | LayerTable]) -> str:
    """The report as one HTML document."""
    model = manifest.get("model", {})
    arch = model.get("arch", {})
    figures: list[Any] = []
    parts = [
        f"<h1>headscope report: {html.escape(str(model.get('spec', '?')))}</h1>",
        f"<p class='meta'>{arch.get('n_layers', '?')} layers x {arch.get('n_heads', '?')} heads "
        f"({arch.get('n_kv_heads', '?')} KV heads), d_model {arch.get('d_model', '?')}; "
        f"created {html.escape(str(manifest.get('created', '?')))}; "
        f"headscope {html.escape(str(manifest.get('versions', {}).get('headscope', '?')))}</p>",
        "<h2>Prompt sets</h2>",
        _rows_table(
            [
                (
                    p["name"],
                    f"{p['n_prompts']} prompts, lengths {p['lengths']}; {p.get('description', '')}",
                )
                for p in manifest.get("prompt_sets", [])
            ],
            ("set", "contents"),
        ),  # fmt: skip
    ]
    sinks = sink_summary(tables)
    if sinks:
        parts += ["<h2>Attention sinks</h2>", _rows_table(sinks, ("quantity", "value"))]
    if tables:
        parts.append("<h2>Role census</h2>")
        figures.append(role_census(tables))
        parts.append(f"<div class='figure'>{{figure{len(figures) - 1}}}</div>")
    for table in _ordered(tables, manifest):
        parts.append(f"<h2>{html.escape(table.detector)} on {html.escape(table.prompt_set)}</h2>")
        if table.description:
            parts.append(f"<p class='meta'>{html.escape(table.description)}</p>")
        for figure in figures_for(table):
            figures.append(figure)
            parts.append(f"<div class='figure'>{{figure{len(figures) - 1}}}</div>")
        summary = [(k, _short(v)) for k, v in table.summary.items() if k != "curves"]
        if summary:
            parts.append(_rows_table(summary, ("summary", "value")))
    for skipped in manifest.get("skipped", []):
        parts.append(
            f"<p class='meta'>skipped {html.escape(skipped['detector'])}: "
            f"{html.escape(skipped['reason'])}</p>"
        )
    body = "\n".join(parts)
    for i, figure in enumerate(figures):
        rendered = figure.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"figure-{i}")
        body = body.replace(f"{{figure{i}}}", rendered, 1)
    title = html.escape(f"headscope: {model.get('spec', 'run')}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def write_html_report(run: str | Path, out: str | Path) -> Path:
    """Read ``run`` and write its HTML report to ``out``."""
    from headscope.runs import open_run

    opened = open_run(run)
    document = build_html_report(opened.manifest, [*opened.head_tables(), *opened.layer_tables()])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
