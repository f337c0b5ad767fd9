"""Sinks: the attention-sink suite of the run (first-token and hidden sinks, massive
activations, value drain, residual peak, active-dormant heads, StreamingLLM)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from headscope.dashboard.data import current_run, md, table_figures
from headscope.report import sink_summary
from headscope.tables import primary_prompt_sets

run = current_run()
st.title("Attention sinks")
tables = run.in_group("sinks")
if not tables:
    st.info("This run has no sink analyses; scan with the default detectors.")
    st.stop()
rows = sink_summary(tables, primary=primary_prompt_sets(run.manifest))
if rows:
    st.dataframe(pd.DataFrame(rows, columns=["quantity", "value"]), hide_index=True)
detectors = list(dict.fromkeys(t.detector for t in tables))
tabs = st.tabs([md(d) for d in detectors])
for tab, detector in zip(tabs, detectors, strict=True):
    with tab:
        for i, table in enumerate(t for t in tables if t.detector == detector):
            st.caption(md(table.description))
            for j, figure in enumerate(table_figures(table)):
                st.plotly_chart(figure, key=f"{detector}_{i}_{j}")
