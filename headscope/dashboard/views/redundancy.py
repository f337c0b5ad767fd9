"""Redundancy: LLM-Drop Sim, ShortGPT block influence, attention-map similarity, and
the drop-simulation curves when the run has them."""

from __future__ import annotations

import streamlit as st

from headscope.dashboard.data import current_run, md, show_error
from headscope.plots import drop_curves, layer_bars
from headscope.report import UNREADABLE, unreadable
from headscope.tables import LayerTable

run = current_run()
st.title("Layer redundancy")
tables = {t.detector: t for t in run.in_group("redundancy") if isinstance(t, LayerTable)}
present = [name for name in tables if name != "drop_simulation"]  # its curves come first
if not present and "drop_simulation" not in tables:
    st.info("This run has no redundancy tables; scan with `--detectors layer_redundancy`.")
    st.stop()
if "drop_simulation" in tables:
    simulation = tables["drop_simulation"]
    summary = simulation.summary
    try:
        curves = drop_curves(simulation)
        correlations = (
            f"Spearman(attention Sim, cost of dropping that attention alone) = "
            f"{summary.get('spearman_attention_sim_vs_drop_cost', float('nan')):.2f}; "
            f"Spearman(BI, cost of dropping that block alone) = "
            f"{summary.get('spearman_block_influence_vs_drop_cost', float('nan')):.2f}"
        )
    except UNREADABLE as err:
        show_error(unreadable(simulation, err))
    else:
        st.plotly_chart(curves, key="curves")
        st.caption(correlations)
    st.plotly_chart(layer_bars(simulation, title="NLL cost of dropping one attention layer"),
                    key="single")  # fmt: skip
else:
    st.caption("No drop simulation in this run (opt-in: `--detectors drop_simulation`).")
for name in present:
    table = tables[name]
    st.subheader(md(name))
    st.caption(md(f"{table.description}. Ranking: {table.summary.get('order', [])}"))
    st.plotly_chart(layer_bars(table), key=f"bars_{name}")
