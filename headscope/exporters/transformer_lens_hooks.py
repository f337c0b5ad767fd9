"""Install a headscope ablation spec as TransformerLens hooks.

This file is standalone on purpose: ``headscope export ablation`` copies it,
unchanged, next to the JSON spec, so a user can apply the ablation in their own
TransformerLens code (a ``HookedTransformer`` or a ``TransformerBridge``)
without installing headscope. headscope itself uses these very functions for
its TransformerLens capture path, so the exported hooks are the tested ones.
The spec's format, methods and head names come from ``ablation_spec.py``
(``headscope.ablation_spec``), which the export copies beside this file; the
copy here loads that neighbour by its path, never an installed headscope.

Usage::

    import json
    from transformer_lens_hooks import ablation_hooks

    spec = json.load(open("ablation.json"))
    with model.hooks(fwd_hooks=ablation_hooks(spec, model)):
        logits = model(tokens)

Methods: ``zero`` sets a head's output z to 0; ``mean`` sets it to its mean
over a reference prompt set (one vector, or one per position); ``resample``
sets it to the head's output on another input (row i of the batch takes source
row i mod n_source); ``query_scale`` multiplies the head's query by epsilon so
its attention becomes nearly uniform (the ablation of Zhou et al. 2024, "On the
Role of Attention Heads in Large Language Model Safety"). Heads are
query heads: under grouped-query attention the other query heads that share
the ablated head's key/value head are untouched. ``skip`` entries remove a
whole attention branch, MLP branch or block from the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

if __package__ == "headscope.exporters":  # headscope's own copy
    from headscope import ablation_spec
else:  # the standalone copy in an export folder: the ablation_spec.py beside this file
    import importlib.util
    from pathlib import Path

    _found = importlib.util.spec_from_file_location(
        "ablation_spec", Path(__file__).with_name("ablation_spec.py")
    )
    ablation_spec = importlib.util.module_from_spec(_found)
    _found.loader.exec_module(ablation_spec)


def replacement_for(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A head's stored output, shaped to replace ``like`` [batch, pos, d_head].

    ``value`` is [d_head] (a pooled mean), [pos, d_head] (a mean per position)
    or [source, pos, d_head] (resampled outputs of another input).
    """
    value = torch.as_tensor(value).to(device=like.device, dtype=like.dtype)
    batch, length = like.shape[0], like.shape[1]
    if value.dim() == 1:
        return value.expand(batch, length, -1)
    if value.shape[-2] < length:
        raise ValueError(
            f"the ablation's reference covers {value.shape[-2]} positions but the input "
            f"has {length}; use a pooled mean or a longer reference"
        )
    if value.dim() == 2:
        return value[:length].expand(batch, -1, -1)
    rows = torch.arange(batch, device=like.device) % value.shape[0]
    return value[rows, :length]


def _check_model(spec: dict, model: Any) -> None:
    cfg = getattr(model, "cfg", None)
    expected = spec.get("model", {})
    for ours, theirs in (("n_layers", "n_layers"), ("n_heads", "n_heads"), ("d_head", "d_head")):
        have = getattr(cfg, theirs, None)
        want = expected.get(ours)
        if have is not None and want is not None and int(have) != int(want):
            raise ValueError(
                f"this ablation was made for a model with {ours} = {want}; "
                f"the given model has {have}"
            )


def ablation_hooks(spec: dict, model: Any) -> list[tuple[str, Callable]]:
    """(hook name, hook function) pairs for ``model.hooks(fwd_hooks=...)``."""
    fmt, version = ablation_spec.SPEC_FORMAT, ablation_spec.SPEC_VERSION
    if spec.get("format") != fmt or int(spec.get("version", 0)) > version:
        raise ValueError(
            f"not a {fmt} spec of version <= {version} "
            f"(format={spec.get('format')!r}, version={spec.get('version')!r})"
        )
    _check_model(spec, model)
    method, methods = spec["method"], ablation_spec.HEAD_METHODS
    if method not in methods:
        raise ValueError(f"unknown ablation method {method!r}; expected one of {methods}")
    hook_names = set(getattr(model, "hook_dict", {}))
    by_layer: dict[int, list[int]] = {}
    for layer, head in spec.get("heads", []):
        by_layer.setdefault(int(layer), []).append(int(head))
    values = spec.get("reference", {}).get("values", {})
    hooks: list[tuple[str, Callable]] = []
    for layer, heads in sorted(by_layer.items()):
        if method == "query_scale":
            hooks.append(_query_hook(layer, heads, float(spec["epsilon"]), hook_names))
        else:
            stored = (
                None
                if method == "zero"
                else {h: values[ablation_spec.head_name(layer, h)] for h in heads}
            )
            hooks.append((f"blocks.{layer}.attn.hook_z", _replace_outputs(heads, stored)))
    for entry in spec.get("skip", []):
        hooks += _skip_hooks(entry["module"], int(entry["layer"]))
    return hooks


def _query_hook(layer: int, heads: list[int], epsilon: float, hook_names: set) -> tuple:
    """Scale the queries where the attention scores see them: after a query norm
    (``hook_q_normed``, [batch, head, pos, d_head] in TransformerBridge), else
    after the rotary embedding (``hook_rot_q``), else ``hook_q`` ([batch, pos,
    head, d_head]); scaling before a norm would be undone by it."""
    candidates = (("hook_q_normed", 1), ("hook_rot_q", 2), ("hook_q", 2))
    name, head_axis = next(
        (f"blocks.{layer}.attn.{suffix}", axis)
        for suffix, axis in candidates
        if f"blocks.{layer}.attn.{suffix}" in hook_names or suffix == "hook_q"
    )

    def hook(query: torch.Tensor, hook: Any) -> torch.Tensor:
        query = query.clone()
        index = [slice(None)] * query.dim()
        index[head_axis] = heads
        query[tuple(index)] *= epsilon
        return query

    return name, hook


def _replace_outputs(heads: list[int], stored: dict[int, Any] | None) -> Callable:
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        for head in heads:
            if stored is None:
                z[:, :, head] = 0
            else:
                z[:, :, head] = replacement_for(stored[head], z[:, :, head])
        return z

    return hook


def _skip_hooks(module: str, layer: int) -> list[tuple[str, Callable]]:
    if module not in ablation_spec.SKIP_MODULES:
        raise ValueError(
            f"unknown module to skip {module!r}; expected one of {ablation_spec.SKIP_MODULES}"
        )
    if module in ("attn", "mlp"):
        name = f"blocks.{layer}.hook_{module}_out"
        return [(name, lambda output, hook: torch.zeros_like(output))]
    stash: dict[str, torch.Tensor] = {}

    def keep_input(resid: torch.Tensor, hook: Any) -> None:
        stash["resid"] = resid

    def return_input(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return stash.pop("resid")

    return [
        (f"blocks.{layer}.hook_resid_pre", keep_input),
        (f"blocks.{layer}.hook_resid_post", return_input),
    ]
