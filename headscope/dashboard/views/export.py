"""Export: choose heads or layers, preview the spec, download it, copy the CLI command."""

from __future__ import annotations

import json
import shlex

import streamlit as st

from headscope.ablation_spec import (
    HEAD_METHODS,
    SPEC_FORMAT,
    SPEC_VERSION,
    head_name,
    parse_head_name,
)
from headscope.dashboard.data import current_run, md
from headscope.exporters.prune import PrunePlan
from headscope.tables import primary_prompt_sets, tables_of


def _layer_order(order, n_layers: int) -> list[int]:
    """The layers of a table's ``order`` summary that exist in the model."""
    if not isinstance(order, list):
        return []
    return [o for o in order if isinstance(o, int) and not isinstance(o, bool) and
            0 <= o < n_layers]  # fmt: skip


run = current_run()
spec = run.manifest.get("model", {}).get("spec", "MODEL")
arch = run.manifest.get("model", {}).get("arch", {})
n_layers, n_heads = int(arch.get("n_layers", 0)), int(arch.get("n_heads", 0))
st.title("Export")
kind = st.radio("what", ["head ablation", "pruned model"], horizontal=True)
labels = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]

if kind == "head ablation":
    tables = run.head_tables()
    source = st.selectbox(
        "suggest heads from", ["(none)", *dict.fromkeys(t.detector for t in tables)]
    )
    suggested: list[str] = []
    recorded = None  # the ablation the table's scores were measured with (safety: query_scale)
    if source != "(none)":
        table = tables_of(tables, source, None, primary_prompt_sets(run.manifest))[0]
        top = st.number_input("top", 1, max(1, len(table.frame)), 3)
        best = table.top(int(top)).itertuples()
        suggested = [head_name(r.layer, r.head) for r in best]
        suggested = [label for label in suggested if label in labels]  # within the model
        recorded = table.params.get("ablation")
    heads = st.multiselect("heads", labels, default=suggested)
    methods = list(HEAD_METHODS)
    method = st.selectbox(
        "method", methods, index=methods.index(recorded) if recorded in methods else 0
    )
    if recorded in methods:
        st.caption(md(f"{source} scored its heads with {recorded} ablation: the default here."))
    preview = {
        "format": SPEC_FORMAT, "version": SPEC_VERSION, "model": spec, "method": method,
        "heads": [{"layer": layer, "head": head} for layer, head in map(parse_head_name, heads)],
        "note": "preview: `headscope export ablation` adds the reference outputs "
        "(mean/resample) and the model's shape",
    }  # fmt: skip
    command = (
        f"headscope export ablation {','.join(heads)} --model {shlex.quote(str(spec))} "
        f"--method {method} --out exports/ablation"
        if heads
        else "# choose at least one head above"
    )
    name = "ablation.json"
else:
    orders = {t.detector: _layer_order(t.summary.get("order"), n_layers)
              for t in run.layer_tables()}  # fmt: skip
    by = st.selectbox("suggest from", ["(none)", *[k for k in orders if orders[k]]])
    attention_default: list[int] = []
    if by != "(none)":
        count = st.number_input("how many attention layers", 0, n_layers, 2)
        attention_default = list(orders[by][: int(count)])
    attention = st.multiselect("attention layers to zero", list(range(n_layers)),
                               default=attention_default)  # fmt: skip
    blocks = st.multiselect("blocks to remove", list(range(n_layers)))
    heads = st.multiselect("heads to zero", labels)
    plan = PrunePlan(attention_layers=tuple(attention), blocks=tuple(blocks),
                     heads=tuple(parse_head_name(h) for h in heads))  # fmt: skip
    preview = {"format": "headscope-prune", "version": 1, "model": spec,
               "removed": plan.to_json()}  # fmt: skip
    parts = [f"headscope export prune --model {shlex.quote(str(spec))} --out exports/pruned"]
    if attention:
        parts.append(f"--attn-layers {','.join(map(str, plan.attention_layers))}")
    if blocks:
        parts.append(f"--blocks {','.join(map(str, plan.blocks))}")
    if heads:
        parts.append(f"--heads {','.join(heads)}")
    command = " ".join(parts)
    name = "prune-plan.json"

st.subheader("Preview")
st.json(preview)
st.download_button("download JSON", json.dumps(preview, indent=1), file_name=name,
                   mime="application/json")  # fmt: skip
st.subheader("The matching command")
st.code(command, language="bash")
