"""Runs: every run under the runs folder; compare two side by side."""

from __future__ import annotations

import html
import shlex

import numpy as np
import pandas as pd
import streamlit as st

from headscope.ablation_spec import head_name
from headscope.dashboard.data import (
    COMPARE_KEY,
    RUN_KEY,
    checked_run,
    md,
    run_summaries,
    runs_dir,
)
from headscope.plots import head_heatmap

st.title("Runs")
summaries = run_summaries(str(runs_dir()))
if not summaries:
    st.info(
        f"No runs under {md(runs_dir())}. Make one with the command below, "
        "or start the dashboard on another folder: `headscope dashboard FOLDER`."
    )
    st.code(f"headscope scan --out {shlex.quote(str(runs_dir() / 'NAME'))}", language="bash")
    st.stop()
st.dataframe(pd.DataFrame(summaries).drop(columns=["path"]), hide_index=True)
st.caption("The run every page reads is picked in the sidebar.")

st.header("Compare two runs")
paths = [s["path"] for s in summaries]
names = {s["path"]: f"{s['name']} ({s['model']})" for s in summaries}
left_path = st.session_state.get(RUN_KEY) or paths[0]
others = [p for p in paths if p != left_path]
if not others:
    st.caption("Only one run: scan another model, or the same model under an ablation.")
    st.stop()
right_path = st.selectbox("compare with", others, key=COMPARE_KEY, format_func=names.get)
left, right = checked_run(left_path), checked_run(right_path)


def _describe(run) -> dict:
    arch = run.manifest.get("model", {}).get("arch", {})
    return {
        "model": run.manifest.get("model", {}).get("spec"),
        "layers x heads": f"{arch.get('n_layers')} x {arch.get('n_heads')}",
        "tables": len(run.manifest.get("tables", [])),
        "created": run.manifest.get("created"),
    }


columns = st.columns(2)
for column, run in zip(columns, (left, right), strict=True):
    with column:
        st.subheader(md(run.name))
        st.json(_describe(run))

left_tables = {(t.detector, t.prompt_set): t for t in left.head_tables()}
right_tables = {(t.detector, t.prompt_set): t for t in right.head_tables()}
shared = sorted(set(left_tables) & set(right_tables))
if not shared:
    st.caption("The two runs share no head table.")
    st.stop()
key = st.selectbox("head table", shared, format_func=lambda k: f"{k[0]} on {k[1]}")
a, b = left_tables[key], right_tables[key]
columns = st.columns(2)
columns[0].plotly_chart(head_heatmap(a, title=html.escape(left.name)), key="compare_left")
columns[1].plotly_chart(head_heatmap(b, title=html.escape(right.name)), key="compare_right")
if a.matrix().shape == b.matrix().shape:
    difference = b.matrix() - a.matrix()
    st.metric("largest change of a head's score", f"{np.nanmax(np.abs(difference)):.4g}")
    delta = pd.DataFrame(
        [(head_name(layer, head), a.matrix()[layer, head], b.matrix()[layer, head])
         for layer, head in zip(*np.unravel_index(np.argsort(-np.abs(np.nan_to_num(difference)),
                                                             axis=None)[:10], difference.shape),
                                strict=True)],
        columns=["head", left.name, right.name],
    )  # fmt: skip
    st.dataframe(delta, hide_index=True)
else:
    st.caption("Different shapes (two models): compare the heatmaps.")
