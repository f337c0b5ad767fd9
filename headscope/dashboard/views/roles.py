"""Roles: every head table of the run outside the "sinks" and "safety" groups (classic
heads, successor, importance, families, and any detector added later), one figure set per
table."""

from __future__ import annotations

import streamlit as st

from headscope.dashboard.data import current_run, md, table_figures

run = current_run()
st.title("Head roles")
# the Sinks and Safety pages have those
tables = [t for t in run.head_tables() if t.group not in ("sinks", "safety")]
if not tables:
    st.info("This run has no role detectors beyond the sink suite and the safety heads.")
    st.stop()
labels = [f"{t.detector} on {t.prompt_set}" for t in tables]
choice = st.selectbox("table", range(len(tables)), format_func=labels.__getitem__)
table = tables[choice]
st.caption(md(table.description))
for j, figure in enumerate(table_figures(table)):
    st.plotly_chart(figure, key=f"role_{choice}_{j}")
st.subheader("Flagged heads")
flagged = table.flagged()
if flagged.empty:
    st.caption("None flagged at the table's threshold; the top five by score:")
    flagged = table.top(5)
st.dataframe(flagged.drop(columns=["evidence"]), hide_index=True)
with st.expander("summary and parameters"):
    st.json({"summary": table.metadata()["summary"], "params": table.metadata()["params"]},
            expanded=False)  # fmt: skip
