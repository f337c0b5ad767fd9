"""Plotly figures of a run, shared by the dashboard, notebooks and the HTML report.

Every function takes tables (or a run's tensors) and returns a
``plotly.graph_objects.Figure``; none computes anything a probe or detector
does, and none imports streamlit. ``figures_for(table)`` picks the figures a
table is drawn with, so a new detector gets a page, a notebook cell and a
report section by returning a HeadTable or LayerTable, and a special figure by
one entry in ``SPECIAL_FIGURES``.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from headscope.ablation_spec import head_name
from headscope.safety_summary import (
    REFUSAL,
    SAHARA,
    SHIPS,
    conditions,
    generation_check,
    is_safety,
    nll_change,
    random_draws,
    refusal_by_layer,
    sahara_steps,
)
from headscope.tables import HeadTable, LayerTable

HEATMAP_SCALE = "Viridis"
FLAG_COLOR, PLAIN_COLOR = "#d62728", "#1f77b4"


def _title(table: HeadTable | LayerTable) -> str:
    """Plotly reads titles as HTML: a run's names are escaped so "<b>" stays text."""
    return html.escape(f"{table.detector} on {table.prompt_set}")


def head_heatmap(
    table: HeadTable,
    *,
    title: str | None = None,
    clickable: bool = False,
    score_label: str = "score",
) -> go.Figure:
    """Layer x head grid of a head table's scores; flagged heads outlined.

    ``clickable`` lays an invisible marker on every cell: plotly cannot select
    a heatmap cell, and a selectable point is what a click in the dashboard
    reports (its x and y are the head and layer labels).
    """
    scores = table.matrix()
    flagged = np.zeros_like(scores, dtype=bool)
    frame = table.frame
    flagged[frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame["flagged"].to_numpy()
    heads = [f"H{h}" for h in range(table.n_heads)]
    layers = [f"L{layer}" for layer in range(table.n_layers)]
    text = np.where(flagged, "flagged", "")
    figure = go.Figure(
        go.Heatmap(
            z=scores,
            x=heads,
            y=layers,
            colorscale=HEATMAP_SCALE,
            colorbar={"title": html.escape(score_label)},
            customdata=text,
            hovertemplate="%{y}%{x}: %{z:.4g} %{customdata}<extra></extra>",
        )
    )
    rows, columns = np.nonzero(flagged)
    if len(rows):
        figure.add_trace(
            go.Scatter(
                x=[heads[c] for c in columns],
                y=[layers[r] for r in rows],
                mode="markers",
                marker={"symbol": "square-open", "size": 14, "color": FLAG_COLOR},
                name="flagged",
                hoverinfo="skip",
            )
        )
    if clickable:
        grid_layers, grid_heads = np.meshgrid(range(table.n_layers), range(table.n_heads),
                                              indexing="ij")  # fmt: skip
        figure.add_trace(
            go.Scatter(
                x=[heads[h] for h in grid_heads.ravel()],
                y=[layers[layer] for layer in grid_layers.ravel()],
                mode="markers",
                marker={"symbol": "square", "size": 14, "opacity": 0},
                customdata=scores.ravel(),
                hovertemplate="%{y}%{x}: %{customdata:.4g} (click to open)<extra></extra>",
                name="heads",
            )
        )
    figure.update_layout(
        title=title or _title(table),
        yaxis={"autorange": "reversed", "title": "layer"},
        xaxis={"title": "head"},
        height=max(320, 18 * table.n_layers + 120),
        showlegend=False,
    )
    return figure


def layer_bars(table: LayerTable, *, title: str | None = None) -> go.Figure:
    """One bar per layer, flagged layers in red."""
    frame = table.frame.sort_values("layer")
    colors = [FLAG_COLOR if flag else PLAIN_COLOR for flag in frame["flagged"]]
    figure = go.Figure(
        go.Bar(
            x=[f"L{layer}" for layer in frame["layer"]],
            y=frame["score"],
            marker_color=colors,
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title or _title(table), xaxis={"title": "layer"}, yaxis={"title": "score"}
    )
    return figure


def drop_curves(table: LayerTable) -> go.Figure:
    """Drop simulation: held-out perplexity against layers dropped, one line per order."""
    curves = table.summary.get("curves", {})
    kinds = list(curves)
    figure = make_subplots(
        rows=1, cols=max(1, len(kinds)), subplot_titles=[f"{k} dropped" for k in kinds]
    )
    palette = {"similarity": "#1f77b4", "similarity_iterative": "#17becf",
               "block_influence": "#ff7f0e", "random": "#7f7f7f"}  # fmt: skip
    for column, kind in enumerate(kinds, start=1):
        curve = curves[kind]
        steps = curve["n_dropped"]
        for name, value in curve.items():
            if not isinstance(value, dict) or "perplexity" not in value:
                continue
            line = {"color": palette.get(name, "#2ca02c")}
            label = f"{name} (mean)" if name == "random" else name
            figure.add_trace(
                go.Scatter(x=steps, y=value["perplexity"], mode="lines+markers", name=label,
                           line=line, legendgroup=name, showlegend=column == 1),
                row=1, col=column,
            )  # fmt: skip
            if name == "random" and "median" in value:
                figure.add_trace(
                    go.Scatter(x=steps, y=value["median"], mode="lines+markers",
                               name="random (median)", legendgroup="random_median",
                               line={**line, "dash": "dash"}, showlegend=column == 1),
                    row=1, col=column,
                )  # fmt: skip
        figure.update_xaxes(title_text="number dropped", row=1, col=column)
        figure.update_yaxes(title_text="perplexity", type="log", row=1, col=column)
    baseline = table.summary.get("baseline_perplexity")
    figure.update_layout(
        title=html.escape(f"drop simulation on {table.prompt_set}")
        + (f" (baseline {baseline:.3f})" if baseline else ""),
        height=420,
    )
    return figure


def family_scatter(table: HeadTable) -> go.Figure:
    """Head families: each head at its 2-D embedding, coloured by family."""
    frame = table.frame
    evidence = list(frame["evidence"])
    names = {f["family"]: f.get("name", "") for f in table.summary.get("families", [])}
    figure = go.Figure()
    families = sorted({e["family"] for e in evidence})
    for family in families:
        rows = [i for i, e in enumerate(evidence) if e["family"] == family]
        figure.add_trace(
            go.Scatter(
                x=[evidence[i]["x"] for i in rows],
                y=[evidence[i]["y"] for i in rows],
                mode="markers",
                name=f"{family}: {names.get(family, '')}"[:60],
                text=[head_name(frame["layer"].iloc[i], frame["head"].iloc[i]) for i in rows],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    figure.update_layout(
        title=f"head families ({table.params.get('embedding', 'pca')} embedding)",
        xaxis={"title": "component 1"},
        yaxis={"title": "component 2"},
        height=480,
    )
    return figure


def role_census(tables: Sequence[HeadTable | LayerTable]) -> go.Figure:
    """How many heads (or layers) each detector flags, per prompt set."""
    counts: Counter[str] = Counter()
    totals: dict[str, int] = {}
    for table in tables:
        if table.group == "families":  # its score is a silhouette, not a role
            continue
        label = _title(table)
        counts[label] += int(table.frame["flagged"].sum())
        totals[label] = len(table.frame)
    labels = list(totals)
    figure = go.Figure(
        go.Bar(
            x=[counts[label] for label in labels],
            y=labels,
            orientation="h",
            customdata=[totals[label] for label in labels],
            hovertemplate="%{y}: %{x} of %{customdata} flagged<extra></extra>",
        )
    )
    figure.update_layout(
        title="role census: flagged heads or layers per detector",
        xaxis={"title": "flagged"},
        yaxis={"autorange": "reversed"},
        height=max(300, 22 * len(labels) + 120),
    )
    return figure


def attention_pattern(
    pattern: Any, tokens: Sequence[str] | None = None, *, title: str = "attention pattern"
) -> go.Figure:
    """A [query, key] attention pattern (e.g. one head of a run's sample) as a heatmap."""
    values = np.asarray(pattern, dtype=np.float64)
    labels = list(tokens) if tokens is not None else [str(i) for i in range(values.shape[-1])]
    labels = [f"{i}:{t}" for i, t in enumerate(labels)]  # positions keep repeated tokens apart
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=labels[: values.shape[1]],
            y=labels[: values.shape[0]],
            colorscale="Blues",
            zmin=0,
            hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title, yaxis={"autorange": "reversed", "title": "query"}, xaxis={"title": "key"}
    )
    return figure


# --------------------------------------------------------------------------- safety


def sahara_angles(table: HeadTable) -> go.Figure:
    """The Sahara group growing: the principal angle after each greedy step."""
    steps = sahara_steps(table)
    figure = go.Figure(
        go.Scatter(
            x=[f"{step}: +{html.escape(head)}" for step, head, _, _ in steps],
            y=[angle for *_, angle in steps],
            mode="lines+markers",
            name="group",
            hovertemplate="%{x}: %{y:.2f} degrees<extra></extra>",
        )
    )
    figure.update_layout(
        title=html.escape(f"Sahara group on {table.prompt_set}: angle by step"),
        xaxis={"title": "step: head added"},
        yaxis={"title": "principal angle (degrees)", "rangemode": "tozero"},
    )
    return figure


def refusal_layers(table: HeadTable) -> go.Figure:
    """Refusal direction by layer: refusal rate with the layer's direction ablated
    (left) and the harmful/harmless separation along it (right); best layer starred."""
    rows = refusal_by_layer(table)
    best = int(table.summary["best_layer"])
    labels = [f"L{layer}" for layer, _, _ in rows]
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(
        go.Scatter(x=labels, y=[r for _, r, _ in rows], mode="lines+markers",
                   name="refusal, direction ablated",
                   hovertemplate="%{x}: %{y:.0%}<extra></extra>"),
        secondary_y=False,
    )  # fmt: skip
    figure.add_trace(
        go.Scatter(x=labels, y=[s for _, _, s in rows], mode="lines+markers", name="separation",
                   line={"dash": "dot"}, hovertemplate="%{x}: %{y:.4g}<extra></extra>"),
        secondary_y=True,
    )  # fmt: skip
    figure.add_vline(x=f"L{best}", line={"color": FLAG_COLOR, "dash": "dash"})
    figure.update_yaxes(title_text="refusal rate", tickformat=".0%", range=[0, 1.05],
                        secondary_y=False)  # fmt: skip
    figure.update_yaxes(title_text="separation", secondary_y=True)
    figure.update_layout(
        title=html.escape(f"refusal direction by layer on {table.prompt_set} (best L{best})"),
        xaxis={"title": "layer"},
    )
    return figure


def _nll_words(check: Any, row: dict) -> str:
    """A condition's harmless answer NLL for a hover label."""
    value = row.get("harmless_answer_nll")
    if value is None:
        return "harmless answer NLL not measured"
    rise = nll_change(check, row)
    return f"harmless answer NLL {value:.3f} nats/token" + (
        f" ({rise:+.3f} from clean)" if rise is not None and row["kind"] != "clean" else ""
    )


def refusal_rates(check: Any, *, title: str = "generation check") -> go.Figure:
    """Refusal rate on harmful prompts: clean, each top-k, the random draws of k heads
    (a box with every draw), the Sahara group; harmless refusal as open markers."""
    rows = conditions(check)
    draws = random_draws(check)
    figure = go.Figure()
    shown = [c for c in rows if c["kind"] != "random"]
    order = []
    for c in shown:
        order.append(c["name"])
        if c["kind"] == "top" and c["k"] in draws:
            order.append(f"random-{c['k']}")
    order += [f"random-{k}" for k in draws if f"random-{k}" not in order]
    colors = {"clean": PLAIN_COLOR, "top": FLAG_COLOR, "sahara": "#9467bd"}
    figure.add_trace(
        go.Bar(
            x=[html.escape(c["name"]) for c in shown],
            y=[c["harmful_refusal"] for c in shown],
            marker_color=[colors.get(c["kind"], "#2ca02c") for c in shown],
            customdata=[html.escape(", ".join(map(str, c["heads"])) or "none") for c in shown],
            hovertemplate="%{x}: %{y:.0%} refused<br>ablated: %{customdata}<extra></extra>",
            name="harmful refused",
        )
    )
    for k, values in draws.items():
        figure.add_trace(
            go.Box(x=[f"random-{k}"] * len(values), y=values, boxpoints="all", pointpos=0,
                   marker_color="#7f7f7f", name=f"random draws of {k}",
                   hovertemplate="%{y:.0%} refused<extra></extra>")
        )  # fmt: skip
    harmless = [c for c in shown if c["harmless_refusal"] is not None]
    figure.add_trace(
        go.Scatter(
            x=[html.escape(c["name"]) for c in harmless],
            y=[c["harmless_refusal"] for c in harmless],
            mode="markers",
            marker={"symbol": "circle-open", "size": 12, "color": "#000000"},
            name="harmless refused",
            customdata=[_nll_words(check, c) for c in harmless],
            hovertemplate="%{x}: %{y:.0%} of harmless refused<br>%{customdata}<extra></extra>",
        )
    )
    figure.update_layout(
        title=html.escape(title),
        xaxis={"title": "heads ablated", "categoryorder": "array",
               "categoryarray": [html.escape(name) for name in order]},
        yaxis={"title": "refusal rate", "tickformat": ".0%", "range": [0, 1.05]},
        height=420,
    )  # fmt: skip
    return figure


def safety_figures(table: HeadTable) -> list[go.Figure]:
    """A safety table's figures: its heatmap (Ships in nats, the Sahara candidates'
    angles, the refusal projections), the Sahara steps or the refusal-by-layer
    curve, and the generation check's refusal rates when it has one."""
    labels = {SHIPS: "Ships (nats)", SAHARA: "angle (deg)", REFUSAL: "projection"}
    figures = [head_heatmap(table, score_label=labels.get(table.detector, "score"))]
    if table.detector == SAHARA:
        figures.insert(0, sahara_angles(table))
    if table.detector == REFUSAL:
        figures.append(refusal_layers(table))
    check = generation_check(table)
    if check is not None:
        what = f"refusal under ablation ({table.detector} on {table.prompt_set})"
        figures.append(refusal_rates(check, title=what))
    return figures


#: detectors drawn with their own figure instead of the default heatmap / bars
SPECIAL_FIGURES: dict[str, Callable[[Any], go.Figure]] = {
    "drop_simulation": drop_curves,
    "head_families": family_scatter,
}


def figures_for(table: HeadTable | LayerTable) -> list[go.Figure]:
    """The figures a table is shown with (dashboard pages, notebooks, the HTML report)."""
    if is_safety(table):
        return safety_figures(table)
    special = SPECIAL_FIGURES.get(table.detector)
    if special is not None:
        base = layer_bars(table) if isinstance(table, LayerTable) else head_heatmap(table)
        return [special(table), base]
    if isinstance(table, HeadTable):
        return [head_heatmap(table)]
    return [layer_bars(table)]
