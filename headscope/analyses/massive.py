"""Massive activations (Sun et al. 2024): detection and the mean-vs-zero test.

A massive activation is a residual-stream entry (a decoder block's output)
with ``|h| > magnitude`` (default 100) and ``|h| ≥ ratio × median |h|`` of that
layer (default 1000; the median over the prompt's tokens and dims, exact for
prompts up to 227 tokens of a 576-wide model and from an evenly strided sample
beyond: ``EXACT_MEDIAN_ENTRIES`` in ``probes/streaming.py``). They sit in
a few fixed dims, appear from some early layer on, and at a few tokens (the
first token, the first delimiter), where they act as the bias behind the
attention sink.

``detect_massive_activations`` reads the streaming probe's record of the 16
largest entries per prompt and layer: a layer's score is the fraction of
prompts with at least one massive activation there, flagged at
``min_fraction`` (default 0.5); the evidence names the dims, positions and
tokens. The first flagged layer is where they "appear".

``run_massive_intervention`` repeats the paper's causal check: on held-out
prose, overwrite the massive entries at their first layer (in the massive dims,
wherever an entry passes the criterion) with their mean over the detection set,
or with zero, and compare perplexity with the untouched model. Setting them to
the mean should keep perplexity; zeroing them should break the model.

Definitions, defaults and our choices: docs/methods.md, "massive_activations"
and "massive_intervention".
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.perplexity import measure_perplexity
from headscope.probes.streaming import layer_median, probe_streaming
from headscope.progress import Progress
from headscope.tables import LayerTable


def massive_mask(stats, *, magnitude: float, ratio: float) -> np.ndarray:
    """[prompt, layer, k] which recorded top entries are massive (NaN slots never are)."""
    values = np.abs(stats.massive_values.numpy())
    median = stats.residual_median.numpy()[..., None]
    with np.errstate(invalid="ignore"):
        return (values > magnitude) & (values >= ratio * median)


def detect_massive_activations(
    stats, *, magnitude: float = 100.0, ratio: float = 1000.0, min_fraction: float = 0.5
) -> LayerTable:
    """Layers whose block output carries massive activations, with dims and tokens."""
    massive = massive_mask(stats, magnitude=magnitude, ratio=ratio)
    fraction = massive.any(-1).mean(0)  # [layer]
    flagged = fraction >= min_fraction
    dims = stats.massive_dims.numpy()
    positions = stats.massive_positions.numpy()
    tokens = stats.massive_tokens.numpy()
    values = np.abs(stats.massive_values.numpy())
    median = stats.residual_median.numpy()
    evidence = []
    for layer in range(stats.n_layers):
        found = massive[:, layer]
        top_ratio = np.nanmax(values[:, layer, 0] / median[:, layer])
        evidence.append(
            {
                "dims": Counter(dims[:, layer][found].astype(int).tolist()).most_common(5),
                "positions": Counter(positions[:, layer][found].astype(int).tolist()).most_common(
                    5
                ),
                "tokens": Counter(
                    stats.token_text.get(int(t), str(int(t))) for t in tokens[:, layer][found]
                ).most_common(5),
                "max_abs": float(np.nanmax(values[:, layer])),
                "largest_ratio_to_median": float(top_ratio),
                "median_abs": float(np.median(median[:, layer])),
            }
        )
    flagged_layers = np.flatnonzero(flagged)
    massive_dims = sorted(
        {d for layer in flagged_layers for d, _ in evidence[layer]["dims"]}, key=int
    )
    frame = pd.DataFrame(
        {
            "layer": np.arange(stats.n_layers),
            "score": fraction,
            "flagged": flagged,
            "evidence": evidence,
        }
    )
    return LayerTable(
        frame=frame,
        n_layers=stats.n_layers,
        prompt_set=stats.prompt_set,
        params={
            "magnitude": magnitude,
            "ratio": ratio,
            "min_fraction": min_fraction,
            "score": "fraction of prompts with a massive activation at the layer",
        },
        summary={
            "massive_dims": massive_dims,
            "first_layer": int(flagged_layers[0]) if len(flagged_layers) else None,
            "n_layers_flagged": int(flagged.sum()),
            "max_abs": float(np.nanmax(values)),
        },
        description=f"massive activations: |h| > {magnitude:g} and >= {ratio:g} x layer median",
    )


def _mean_values(stats, layer: int, dims: list[int], massive: np.ndarray) -> dict[int, float]:
    """Mean (signed) value of the massive entries of each dim at ``layer``."""
    values = stats.massive_values.numpy()[:, layer]
    found_dims = stats.massive_dims.numpy()[:, layer]
    found = massive[:, layer]
    return {d: float(values[found & (found_dims == d)].mean()) for d in dims}


def _overwrite(dims: list[int], replacement: dict[int, float] | None, magnitude, ratio, counter):
    """Block-output edit: massive entries of ``dims`` become their mean (or 0 when None)."""
    index = torch.tensor(dims)

    def edit(hidden: Tensor, lengths: Tensor) -> None:
        for row, length in enumerate(lengths.tolist()):
            part = hidden[row, :length]
            median = layer_median(part.abs())
            chosen = part[:, index]
            hit = (chosen.abs() > magnitude) & (chosen.abs() >= ratio * median)
            for column, dim in enumerate(dims):
                value = 0.0 if replacement is None else replacement[dim]
                chosen[:, column] = torch.where(hit[:, column], value, chosen[:, column])
            part[:, index] = chosen
            counter["entries"] += int(hit.sum())

    return edit


def run_massive_intervention(
    handle: ModelHandle,
    *,
    stats_by_set: dict[str, object] | None = None,
    magnitude: float = 100.0,
    ratio: float = 1000.0,
    min_fraction: float = 0.5,
    detect_on: str = "prose",
    evaluate_on: str = "prose-heldout",
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> LayerTable:
    """Held-out perplexity: untouched, massive entries set to their mean, set to zero."""
    if not handle.arch.causal:
        raise NotApplicable(f"{handle.spec} is not a causal language model; it has no perplexity")
    stats = (stats_by_set or {}).get(detect_on)
    if stats is None:
        prompts = handle.tokenize(detect_on)
        stats = probe_streaming(handle, prompts, batch_size=batch_size)
    detection = detect_massive_activations(
        stats, magnitude=magnitude, ratio=ratio, min_fraction=min_fraction
    )
    layer = detection.summary["first_layer"]
    if layer is None:
        largest = max(e["largest_ratio_to_median"] for e in detection.frame["evidence"])
        raise NotApplicable(
            f"no massive activations on '{detect_on}' (|h| > {magnitude:g} and >= {ratio:g} x "
            f"median in >= {min_fraction:.0%} of prompts); the largest ratio was {largest:.0f}"
        )
    massive = massive_mask(stats, magnitude=magnitude, ratio=ratio)
    dims = [d for d, _ in detection.frame["evidence"][layer]["dims"]]
    means = _mean_values(stats, layer, dims, massive)
    held_out = handle.tokenize(evaluate_on)
    perplexities, edited, n_tokens = {}, {}, 0
    for name, replacement in (("original", None), ("mean", means), ("zero", None)):
        counter = {"entries": 0}
        edit = None
        if name != "original":
            edit = (layer, _overwrite(dims, replacement, magnitude, ratio, counter))
        perplexity, _ = measure_perplexity(
            handle, held_out, batch_size=batch_size, edit_block=edit, on_progress=on_progress
        )
        perplexities[name] = perplexity.value()
        edited[name] = counter["entries"]
        n_tokens = perplexity.n_tokens
    if edited["mean"] == 0:
        raise HeadscopeError(
            f"massive dims {dims} of layer {layer} never pass the criterion on '{evaluate_on}'"
        )
    frame = pd.DataFrame(
        {
            "layer": [layer],
            "score": [perplexities["zero"] / perplexities["original"]],
            "flagged": [True],
            "evidence": [
                {
                    "dims": dims,
                    "mean_values": {str(d): v for d, v in means.items()},
                    "entries_edited_per_run": edited["mean"],
                }
            ],
        }
    )
    return LayerTable(
        frame=frame,
        n_layers=handle.arch.n_layers,
        prompt_set=held_out.name,
        params={
            "magnitude": magnitude,
            "ratio": ratio,
            "min_fraction": min_fraction,
            "detect_on": detect_on,
            "evaluate_on": evaluate_on,
            "score": "perplexity with the massive entries zeroed / untouched perplexity",
        },  # fmt: skip
        summary={
            "layer": layer,
            "dims": dims,
            "ppl_original": perplexities["original"],
            "ppl_mean": perplexities["mean"],
            "ppl_zero": perplexities["zero"],
            "n_tokens": n_tokens,
        },
        description="massive activations set to their mean vs zero at their first layer",
    )
