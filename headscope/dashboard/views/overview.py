"""Overview: the model, a role census, and a layer x head heatmap for every detector."""

from __future__ import annotations

import streamlit as st

from headscope.ablation_spec import head_name, parse_head_name
from headscope.dashboard.data import HEAD_KEY, current_run, md
from headscope.plots import head_heatmap, layer_bars, role_census
from headscope.report import run_context

run = current_run()
manifest = run.manifest
model = manifest.get("model", {})
st.title(f"Overview: {md(model.get('spec', run.name))}")
arch = model.get("arch", {})
columns = st.columns(4)
for column, (label, key) in zip(
    columns, (("layers", "n_layers"), ("heads", "n_heads"), ("KV heads", "n_kv_heads"),
              ("d_model", "d_model")), strict=True,
):  # fmt: skip
    column.metric(label, arch.get(key, "?"))
with st.expander("ArchInfo and run details"):
    st.json({"arch": arch, "timing": manifest.get("timing", {}),
             "prompt_sets": manifest.get("prompt_sets", [])}, expanded=False)  # fmt: skip
for skipped in manifest.get("skipped", []):
    st.caption(md(f"skipped {skipped['detector']}: {skipped['reason']}"))

head_tables, layer_tables = run.head_tables(), run.layer_tables()
for line in run_context(manifest, [*head_tables, *layer_tables]).plain.splitlines():
    st.caption(md(line))  # the BOS choice and each table's published protocol
if not head_tables and not layer_tables:
    st.warning("This run holds no tables.")
    st.stop()
st.plotly_chart(role_census([*head_tables, *layer_tables]), key="census")

st.header("Heads")
st.caption("Click a head to open it on the Head page.")
for i, table in enumerate(head_tables):
    event = st.plotly_chart(
        head_heatmap(table, clickable=True),
        key=f"heat_{i}",
        on_select="rerun",
        selection_mode="points",
    )
    points = (event or {}).get("selection", {}).get("points", [])
    if points:
        point = points[0]
        layer, head = parse_head_name(f"{point['y']}{point['x']}")  # "L3" and "H5" ticks
        st.session_state[HEAD_KEY] = head_name(layer, head)
        st.switch_page("views/head.py")

st.header("Layers")
for i, table in enumerate(layer_tables):
    st.plotly_chart(layer_bars(table), key=f"bars_{i}")
