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
prose, overwrite the massive entries at one layer with a mean, or with zero,
and compare perplexity with the untouched model. Setting them to the mean
should keep perplexity; zeroing them should break the model. Two protocols
(``protocol=``):

- ``"sun2024"`` (default): Sun et al.'s own. Their code
  (locuslab/massive-activations, ``lib/hook.py``) edits one layer's output,
  the layer where the massive activations first appear (LLaMA2-7B: layer 2,
  dims 1415 and 2533), at two fixed positions: the first token, and the
  position of the layer's largest entry when it is not the first (the first
  delimiter, "." or "\n"); each position gets its own mean value (over many
  sequences), written whatever the entry is, and the zero run writes 0 at the
  same entries. Here: the layer is the first with a *first-token-specific*
  massive dim (massive at position 0 in >= ``min_fraction`` of the detection
  prompts and, in >= ``min_fraction`` of them, at no more than
  ``max_positions`` positions; a dim that is massive at many ordinary tokens,
  as Gemma 3's dim 400 at commas in layers 0-3, does not qualify); the dims
  are that layer's qualifying dims; the delimiter is, per sequence, the
  position >= 1 with the largest |h| in those dims, edited only when that
  entry is massive; the two means come from a forward over the detection set.
- ``"pooled"``: headscope's earlier protocol, kept as a variant. The first
  flagged layer of ``detect_massive_activations`` and its (up to five) most
  common massive dims; every entry of those dims that passes the criterion
  (recomputed per prompt) is set to one mean per dim, pooled over positions
  and prompts.

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


#: protocol name -> the one-line note recorded in the table's params
PROTOCOLS = {
    "sun2024": (
        "Sun et al. 2024: the first token and the top delimiter set to their own "
        "per-position means, at the first layer with first-token-specific massive dims"
    ),
    "pooled": (
        "headscope's earlier protocol: every entry of the massive dims that passes the "
        "criterion set to one mean per dim pooled over positions, at the first flagged layer"
    ),
}


def sink_specific_dims(
    stats, *, magnitude: float, ratio: float, min_fraction: float, max_positions: int
) -> list[list[int]]:
    """Per layer, the dims whose massive entries sit at the first token and few positions.

    A dim qualifies at a layer when it is massive at position 0 in at least
    ``min_fraction`` of the prompts, and is massive at no more than
    ``max_positions`` positions (the first token and the delimiters) in at
    least ``min_fraction`` of them. Read from the probe's record of the 16
    largest entries, which holds every massive entry of a prompt and layer
    unless there are more than 16 (then the count is a lower bound).
    """
    massive = massive_mask(stats, magnitude=magnitude, ratio=ratio)
    dims = stats.massive_dims.numpy()
    positions = stats.massive_positions.numpy()
    n_prompts = massive.shape[0]
    found = []
    for layer in range(stats.n_layers):
        at_first, spread = Counter(), Counter()
        for prompt in range(n_prompts):
            hit = massive[prompt, layer]
            seen: dict[int, set[int]] = {}
            pairs = zip(dims[prompt, layer][hit], positions[prompt, layer][hit], strict=True)
            for dim, position in pairs:
                seen.setdefault(int(dim), set()).add(int(position))
            for dim, where in seen.items():
                at_first[dim] += 0 in where
                spread[dim] += len(where) > max_positions
        found.append(
            sorted(
                dim
                for dim, count in at_first.items()
                if count >= min_fraction * n_prompts
                and n_prompts - spread[dim] >= min_fraction * n_prompts
            )
        )
    return found


def _mean_values(stats, layer: int, dims: list[int], massive: np.ndarray) -> dict[int, float]:
    """Mean (signed) value of the massive entries of each dim at ``layer``."""
    values = stats.massive_values.numpy()[:, layer]
    found_dims = stats.massive_dims.numpy()[:, layer]
    found = massive[:, layer]
    return {d: float(values[found & (found_dims == d)].mean()) for d in dims}


def _overwrite(dims: list[int], replacement: dict[int, float] | None, magnitude, ratio, counter):
    """Pooled: massive entries of ``dims`` become their dim's mean (or 0 when None)."""
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
            counter["entries_at_first_token"] += int(hit[0].sum())

    return edit


def _top_delimiter(part: Tensor, index: Tensor, magnitude: float, ratio: float) -> int | None:
    """The position >= 1 with the largest |h| in the sink dims, if that entry is massive."""
    if part.shape[0] < 2:
        return None
    largest = part[1:, index].abs().amax(dim=1)
    position = int(largest.argmax())
    value = float(largest[position])
    if value > magnitude and value >= ratio * float(layer_median(part.abs())):
        return position + 1
    return None


def _fixed_positions(dims: list[int], magnitude: float, ratio: float, calls: list, values=None):
    """Sun et al.: read (``values`` None) or set the first token and the top delimiter.

    Appends, per call, one (first-token entries, delimiter position or None,
    delimiter entries or None) per row. ``values`` maps "first"/"delimiter" to
    the replacement [len(dims)] (the delimiter's may be None: left untouched).
    """
    index = torch.tensor(dims)

    def edit(hidden: Tensor, lengths: Tensor) -> None:
        rows = []
        for row, length in enumerate(lengths.tolist()):
            part = hidden[row, :length]
            delimiter = _top_delimiter(part, index, magnitude, ratio)
            first = part[0, index].double().cpu()
            at_delimiter = None if delimiter is None else part[delimiter, index].double().cpu()
            rows.append((first, delimiter, at_delimiter))
            if values is None:
                continue
            part[0, index] = values["first"].to(part)
            if delimiter is not None and values["delimiter"] is not None:
                part[delimiter, index] = values["delimiter"].to(part)
        calls.append(rows)

    return edit


def _delimiter_tokens(handle: ModelHandle, prompts, batch_size: int, calls: list) -> list:
    """The five most common tokens at the delimiter positions found by ``calls``."""
    tokens = Counter()
    for batch, rows in zip(prompts.padded(batch_size, handle.pad_id), calls, strict=True):
        for row, (_first, delimiter, _values) in enumerate(rows):
            if delimiter is not None:
                token = int(batch.tokens[row, delimiter])
                tokens[handle.tokenizer.decode([token])] += 1
    return tokens.most_common(5)


def _choose(
    protocol: str,
    stats,
    detection: LayerTable,
    *,
    layer: int,
    magnitude,
    ratio,
    min_fraction,
    max_positions,
) -> tuple[int | None, list[int]]:
    """The layer and dims a protocol edits (layer None: nothing qualifies)."""
    if protocol == "pooled":
        if layer < 0:
            layer = detection.summary["first_layer"]
        if layer is None or not detection.frame["evidence"][layer]["dims"]:
            return None, []
        return layer, [d for d, _ in detection.frame["evidence"][layer]["dims"]]
    per_layer = sink_specific_dims(
        stats, magnitude=magnitude, ratio=ratio, min_fraction=min_fraction,
        max_positions=max_positions,
    )  # fmt: skip
    if layer >= 0:
        return (layer, per_layer[layer]) if per_layer[layer] else (None, [])
    for found, dims in enumerate(per_layer):
        if dims:
            return found, dims
    return None, []


def run_massive_intervention(
    handle: ModelHandle,
    *,
    protocol: str = "sun2024",
    stats_by_set: dict[str, object] | None = None,
    magnitude: float = 100.0,
    ratio: float = 1000.0,
    min_fraction: float = 0.5,
    max_positions: int = 2,
    layer: int = -1,
    detect_on: str = "prose",
    evaluate_on: str = "prose-heldout",
    held_out_prompts: int | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> LayerTable:
    """Held-out perplexity: untouched, massive entries set to their mean, set to zero.

    ``protocol``: "sun2024" (default; the first token and the top delimiter,
    each with its own mean, at the first layer with first-token-specific dims)
    or "pooled" (every massive entry of the first flagged layer's dims, one
    mean per dim). See the module docstring. ``layer`` >= 0 edits that layer
    instead of the protocol's choice (with the dims the protocol finds there);
    ``held_out_prompts`` keeps the first prompts of ``evaluate_on`` (None: all).
    """
    if protocol not in PROTOCOLS:
        raise HeadscopeError(
            f"unknown protocol {protocol!r} for massive_intervention; choose one of "
            + ", ".join(PROTOCOLS)
        )
    if max_positions < 1:
        raise HeadscopeError(f"max_positions must be at least 1, got {max_positions}")
    if layer >= handle.arch.n_layers:
        raise HeadscopeError(f"layer {layer} is out of range: the model has {handle.arch.n_layers}")
    if not handle.arch.causal:
        raise NotApplicable(f"{handle.spec} is not a causal language model; it has no perplexity")
    stats = (stats_by_set or {}).get(detect_on)
    if stats is None:
        stats = probe_streaming(handle, handle.tokenize(detect_on), batch_size=batch_size)
    detection = detect_massive_activations(
        stats, magnitude=magnitude, ratio=ratio, min_fraction=min_fraction
    )
    if detection.summary["first_layer"] is None:
        largest = max(e["largest_ratio_to_median"] for e in detection.frame["evidence"])
        raise NotApplicable(
            f"no massive activations on '{detect_on}' (|h| > {magnitude:g} and >= {ratio:g} x "
            f"median in >= {min_fraction:.0%} of prompts); the largest ratio was {largest:.0f}"
        )
    requested = layer
    layer, dims = _choose(
        protocol, stats, detection, layer=requested, magnitude=magnitude, ratio=ratio,
        min_fraction=min_fraction, max_positions=max_positions,
    )  # fmt: skip
    if layer is None:
        at = "" if requested < 0 else f" at layer {requested}"
        raise NotApplicable(
            f"massive activations on '{detect_on}', but no dim{at} is massive at the first "
            f"token and at <= {max_positions} positions in >= {min_fraction:.0%} of prompts "
            "(protocol='pooled' edits them wherever they are)"
            if protocol == "sun2024"
            else f"no massive activations at layer {requested} on '{detect_on}'"
        )
    held_out = handle.tokenize(evaluate_on, held_out_prompts)
    if protocol == "pooled":
        massive = massive_mask(stats, magnitude=magnitude, ratio=ratio)
        means = _mean_values(stats, layer, dims, massive)
        runs = {"mean": means, "zero": None}
        evidence = {"mean_values": {str(d): v for d, v in means.items()}}

        def make_edit(name, counter):
            return _overwrite(dims, runs[name], magnitude, ratio, counter)
    else:
        calls: list = []
        measure_perplexity(
            handle, handle.tokenize(detect_on), batch_size=batch_size,
            edit_block=(layer, _fixed_positions(dims, magnitude, ratio, calls)),
        )  # fmt: skip
        rows = [row for rows in calls for row in rows]
        first = torch.stack([r[0] for r in rows]).mean(0)
        at_delimiter = [r[2] for r in rows if r[1] is not None]
        delimiter = torch.stack(at_delimiter).mean(0) if at_delimiter else None
        runs = {
            "mean": {"first": first, "delimiter": delimiter},
            "zero": {"first": torch.zeros(len(dims)),
                     "delimiter": None if delimiter is None else torch.zeros(len(dims))},
        }  # fmt: skip
        evidence = {
            "mean_values": {
                "first_token": {str(d): float(v) for d, v in zip(dims, first, strict=True)},
                "delimiter": None if delimiter is None
                else {str(d): float(v) for d, v in zip(dims, delimiter, strict=True)},
            },
            "detect_prompts_with_delimiter": len(at_delimiter),
            "detect_prompts": len(rows),
        }  # fmt: skip

        def make_edit(name, counter):
            counter["calls"] = []
            return _fixed_positions(dims, magnitude, ratio, counter["calls"], runs[name])

    perplexities, counters, n_tokens = {}, {}, 0
    for name in ("original", "mean", "zero"):
        counter = {"entries": 0, "entries_at_first_token": 0}
        edit = None if name == "original" else (layer, make_edit(name, counter))
        perplexity, _ = measure_perplexity(
            handle, held_out, batch_size=batch_size, edit_block=edit, on_progress=on_progress
        )
        perplexities[name] = perplexity.value()
        counters[name] = counter
        n_tokens = perplexity.n_tokens
    summary = {
        "protocol": protocol,
        "layer": layer,
        "dims": dims,
        "ppl_original": perplexities["original"],
        "ppl_mean": perplexities["mean"],
        "ppl_zero": perplexities["zero"],
        "n_tokens": n_tokens,
    }
    if protocol == "pooled":
        edited = counters["mean"]
        if edited["entries"] == 0:
            raise HeadscopeError(
                f"massive dims {dims} of layer {layer} never pass the criterion on '{evaluate_on}'"
            )
        evidence["entries_edited_per_run"] = edited["entries"]
        summary["positions"] = "every entry of the dims that passes the criterion"
        summary["entries_at_first_token"] = edited["entries_at_first_token"]
        summary["entries_elsewhere"] = edited["entries"] - edited["entries_at_first_token"]
    else:
        calls = counters["mean"]["calls"]
        n_delimiters = sum(r[1] is not None for rows in calls for r in rows)
        applied = n_delimiters if runs["mean"]["delimiter"] is not None else 0
        summary["positions"] = "the first token and the top delimiter"
        summary["first_token_edits"] = len(held_out)
        summary["delimiter_edits"] = applied
        # a delimiter is edited only when the detection set gave it a mean
        summary["delimiter_tokens"] = (
            _delimiter_tokens(handle, held_out, batch_size, calls) if applied else []
        )
        summary["delimiters_found"] = n_delimiters
        evidence["entries_edited_per_run"] = len(dims) * (len(held_out) + applied)
    frame = pd.DataFrame(
        {
            "layer": [layer],
            "score": [perplexities["zero"] / perplexities["original"]],
            "flagged": [True],
            "evidence": [{"dims": dims, **evidence}],
        }
    )
    return LayerTable(
        frame=frame,
        n_layers=handle.arch.n_layers,
        prompt_set=held_out.name,
        params={
            "protocol": protocol,
            "protocol_note": PROTOCOLS[protocol],
            "magnitude": magnitude,
            "ratio": ratio,
            "min_fraction": min_fraction,
            "max_positions": max_positions,
            "layer": requested,
            "detect_on": detect_on,
            "evaluate_on": evaluate_on,
            "held_out_prompts": len(held_out),
            "score": "perplexity with the massive entries zeroed / untouched perplexity",
        },  # fmt: skip
        summary=summary,
        description=(
            f"massive activations set to their mean vs zero at layer {layer} ({protocol})"
        ),
    )
