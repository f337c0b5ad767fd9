"""Head: one head's scores across detectors, its statistics, its attention on prompts."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from headscope.ablation_spec import head_name, parse_head_name
from headscope.dashboard.data import (
    HEAD_KEY,
    attention_on_prompt,
    current_run,
    decoded_tokens,
    md,
    show_error,
)
from headscope.errors import HeadscopeError
from headscope.plots import attention_pattern


def _fits(tensor, *sizes: int | None) -> bool:
    """Whether ``tensor`` has len(sizes) dimensions, each larger than the given index
    (None: any size)."""
    return tensor.dim() == len(sizes) and all(
        size is None or tensor.shape[i] > size for i, size in enumerate(sizes)
    )


def _sample_pattern(stored: dict, sample: str, layer: int, head: int):
    """One head's [query, key] pattern of a stored sample and its token ids."""
    patterns, tokens = stored.get("patterns"), stored.get("tokens")
    if (
        patterns is None
        or tokens is None
        or not _fits(tokens, None)
        or not _fits(patterns, layer, head, None, None)
        or patterns.shape[-1] != len(tokens)
        or patterns.is_complex()
    ):
        raise HeadscopeError(
            f"sample {sample!r} of run {run.path} does not hold a pattern [layer, head, query, "
            f"key] for L{layer}H{head} and its tokens"
        )
    return patterns[layer, head].float().numpy(), [int(t) for t in tokens]


run = current_run()
arch = run.manifest.get("model", {}).get("arch", {})
n_layers, n_heads = int(arch.get("n_layers", 0)), int(arch.get("n_heads", 0))
if not n_layers or not n_heads:
    st.error("The run's manifest does not describe the model's layers and heads.")
    st.stop()
labels = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]
if st.session_state.get(HEAD_KEY) not in labels:
    st.session_state[HEAD_KEY] = labels[0]
choice = st.selectbox("head", labels, key=HEAD_KEY)
layer, head = parse_head_name(choice)
st.title(f"Head {choice}")

rows = []
for table in run.head_tables():
    frame = table.frame
    mine = frame[(frame["layer"] == layer) & (frame["head"] == head)]
    if mine.empty:
        continue
    score = float(mine["score"].iloc[0])
    rank = int((frame["score"] > score).sum()) + 1
    flagged = bool(mine["flagged"].iloc[0])
    rows.append({"detector": table.detector, "prompt set": table.prompt_set, "score": score,
                 "flagged": flagged, "rank": f"{rank} of {len(frame)}"})  # fmt: skip
st.subheader("Scores across detectors")
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.caption("No head table in this run.")

st.subheader("Statistics by query position")
tensors = run.tensors()
profiles = sorted({name.split("/")[-1] for name in tensors if name.endswith("_by_query")})
sets = sorted({name.split("/")[0] for name in tensors if "/streaming/" in name})
if profiles and sets:
    statistic = st.selectbox("statistic", profiles)
    figure = go.Figure()
    for prompt_set in sets:
        values = tensors.get(f"{prompt_set}/streaming/{statistic}")
        if values is None or not _fits(values, layer, head, None) or values.is_complex():
            continue
        values = values.float()
        mine = values[layer, head].numpy()
        label = html.escape(prompt_set)
        figure.add_trace(go.Scatter(y=mine, mode="lines", name=f"{label}: {choice}"))
        layer_mean = values[layer].mean(0).numpy()
        figure.add_trace(go.Scatter(y=layer_mean, mode="lines", line={"dash": "dot"},
                                    name=f"{label}: layer {layer} mean"))  # fmt: skip
    figure.update_layout(xaxis={"title": "query position"},
                         yaxis={"title": html.escape(statistic)})  # fmt: skip
    st.plotly_chart(figure, key="profile")
else:
    st.caption("This run has no streaming statistics (scan with a streaming detector).")

alphas = {
    name.split("/")[0]: value
    for name, value in tensors.items()
    if name.endswith("/streaming/sink_alpha") and _fits(value, None, layer, head, 0)
    and not value.is_complex()
}  # fmt: skip
if alphas:
    st.subheader("Distribution over prompts of its first-token sink score α_0")
    figure = go.Figure()
    for prompt_set, value in alphas.items():
        figure.add_trace(go.Histogram(x=value[:, layer, head, 0].float().numpy(),
                                      name=html.escape(prompt_set),
                                      opacity=0.6, nbinsx=30))  # fmt: skip
    figure.update_layout(barmode="overlay", xaxis={"title": "α_0 per prompt"},
                         yaxis={"title": "prompts"})  # fmt: skip
    st.plotly_chart(figure, key="alpha_histogram")

st.subheader("Attention on the run's sample prompts")
samples = run.sample_names()
sample = st.selectbox("sample", samples) if samples else None
pattern = None
if sample is None:
    st.caption("No sample patterns stored (they come from the patterns capture).")
else:
    try:
        pattern, token_ids = _sample_pattern(run.samples(sample), sample, layer, head)
    except HeadscopeError as err:
        show_error(err)
if pattern is not None:
    words = [str(t) for t in token_ids]
    if st.toggle("show token texts (loads the model's tokenizer once)", key="decode"):
        spec = run.manifest.get("model", {}).get("spec", "")
        try:
            with st.spinner(f"loading {md(spec)}..."):
                words = decoded_tokens(spec, "cpu", tuple(token_ids))
        except HeadscopeError as err:
            show_error(err)
        except Exception as err:  # noqa: BLE001 - a run's token ids may not fit its model
            show_error(f"cannot decode the sample's tokens with {spec}: {err}")
    title = f"{choice} on the first '{html.escape(sample)}' prompt"
    st.plotly_chart(
        attention_pattern(pattern, [html.escape(w) for w in words], title=title),
        key="sample_pattern",
    )
    received = pattern.sum(0)
    top = np.argsort(-received)[:8]
    st.caption("Most-attended key positions (attention summed over queries):")
    st.dataframe(
        pd.DataFrame({"position": top, "token": [words[i] for i in top],
                      "attention received": received[top]}),
        hide_index=True,
    )  # fmt: skip

st.subheader("Attention on your own prompt")
st.caption("Computed through the TransformerLens bridge on demand (loads the model once).")
with st.form("own_prompt"):
    text = st.text_input("prompt", "The cat sat on the mat. The cat sat on the")
    submitted = st.form_submit_button("show attention")
if submitted:
    spec = run.manifest.get("model", {}).get("spec", "")
    try:
        with st.spinner(f"running {md(spec)} on the prompt..."):
            result = attention_on_prompt(spec, "cpu", text, layer)
    except HeadscopeError as err:
        show_error(err)
    else:
        pattern = result["pattern"][head]
        tokens = [html.escape(t) for t in result["tokens"]]
        st.plotly_chart(attention_pattern(pattern, tokens, title=f"{choice}"),
                        key="own_pattern")  # fmt: skip
        received = pattern.sum(0)
        top = np.argsort(-received)[:8]
        st.dataframe(
            pd.DataFrame({"token": [result["tokens"][i] for i in top], "position": top,
                          "attention received": received[top]}),
            hide_index=True,
        )  # fmt: skip
