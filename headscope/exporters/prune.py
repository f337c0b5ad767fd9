"""Export a pruned checkpoint that stock transformers loads: blocks removed, layers zeroed.

``export_pruned(handle, plan, out)`` writes one folder:

- ``checkpoint/``: ``save_pretrained`` of a pruned copy of the model, loadable
  with ``AutoModelForCausalLM.from_pretrained``. Dropped blocks are removed
  from the block list, and the config follows (``num_hidden_layers``, and
  ``layer_types`` for models that mix local and global attention, so each
  kept layer keeps its own kind); each kept attention module's ``layer_idx``
  is renumbered so the KV cache stays consistent. A dropped attention layer is
  baked as zero output (its output projection and bias zeroed): stock
  transformers has no block without attention. Dropped heads: their slices of
  the output projection zeroed, as ``headscope export ablation`` does.
- ``prune.json``: what was removed, in which order and why (the redundancy
  scores that chose it), parameter counts and checkpoint size, and the
  measured held-out perplexity of the original and of the pruned copy itself.

Removing a block is the same function as skipping it (the block returns its
input), and zeroing an attention layer's output projection the same as
skipping its branch, so the checkpoint computes what the ablation engine's
``Ablation(skip=...)`` computes in memory; a test holds their logits equal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headscope.ablation_spec import head_name
from headscope.checks import check_batch_size, check_count
from headscope.errors import HeadscopeError
from headscope.outputs import (
    FolderKind,
    OutputFolder,
    check_output_folder,
    versioned_format,
    write_folder,
)
from headscope.probes.ablation import Ablation, Head, check_heads
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import block_list

PRUNE_FILE = "prune.json"
CHECKPOINT_DIR = "checkpoint"
FORMAT = "headscope-prune"
FORMAT_VERSION = 1
NOTHING_TO_PRUNE = "nothing to prune: give --drop-attn, --drop-blocks or --heads"
PRUNE_FOLDER = FolderKind(
    name="headscope prune export",
    marker=PRUNE_FILE,
    recognise=versioned_format(FORMAT, FORMAT_VERSION),
    entries=frozenset({PRUNE_FILE, CHECKPOINT_DIR}),
)


@dataclass(frozen=True, kw_only=True)
class PrunePlan:
    """What to remove; ``reason`` records how it was chosen (order, scores)."""

    attention_layers: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    heads: tuple[Head, ...] = ()
    reason: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", tuple(sorted({*self.attention_layers})))
        object.__setattr__(self, "blocks", tuple(sorted({*self.blocks})))
        object.__setattr__(self, "heads", tuple(sorted({*self.heads})))

    def check(self, handle: ModelHandle) -> None:
        n_layers = handle.arch.n_layers
        if not (self.attention_layers or self.blocks or self.heads):
            raise HeadscopeError(NOTHING_TO_PRUNE)
        bad = [i for i in (*self.attention_layers, *self.blocks) if not 0 <= i < n_layers]
        if bad:
            raise HeadscopeError(f"layer(s) {bad} out of range: the model has {n_layers} layers")
        if len(self.blocks) >= n_layers:
            raise HeadscopeError(f"cannot drop all {n_layers} blocks")
        check_heads(self.heads, handle.arch)
        Ablation(skip=self.skips()).check(handle)  # refuses post-norm models

    def skips(self) -> tuple[tuple[str, int], ...]:
        """The same removal as ablation-engine skips (for in-memory measurement)."""
        return tuple(("attn", i) for i in self.attention_layers) + tuple(
            ("block", i) for i in self.blocks
        )

    def ablation(self) -> Ablation:
        return Ablation(heads=self.heads, skip=self.skips())

    def to_json(self) -> dict[str, Any]:
        return {
            "attention_layers": list(self.attention_layers),
            "blocks": list(self.blocks),
            "heads": [head_name(layer, head) for layer, head in self.heads],
            "reason": dict(self.reason),
        }


def _parent_of(model: torch.nn.Module, target: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise HeadscopeError("cannot find the module holding the block list")


def pruned_model(handle: ModelHandle, plan: PrunePlan) -> torch.nn.Module:
    """A pruned copy of ``handle.model`` (the original is not touched)."""
    from headscope.exporters.ablation import bake_zero_ablation

    plan.check(handle)
    zeroed = Ablation(heads=plan.heads, skip=tuple(("attn", i) for i in plan.attention_layers))
    model = bake_zero_ablation(handle, zeroed)  # a deep copy
    if plan.blocks:
        _remove_blocks(model, handle.arch.n_layers, plan.blocks)
    return model


def _remove_blocks(model: torch.nn.Module, n_layers: int, blocks: Sequence[int]) -> None:
    layers = block_list(model, n_layers)
    kept = [i for i in range(n_layers) if i not in set(blocks)]
    parent, name = _parent_of(model, layers)
    setattr(parent, name, torch.nn.ModuleList([layers[i] for i in kept]))
    for new_index, old_index in enumerate(kept):
        for module in layers[old_index].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class PruneExport:
    folder: Path
    checkpoint: Path
    manifest: dict[str, Any]


def export_pruned(
    handle: ModelHandle,
    plan: PrunePlan,
    out: str | Path | OutputFolder,
    *,
    force: bool = False,
    eval_prompt_set: str | None = "prose-heldout",
    eval_prompts: int | None = 16,
    batch_size: int = 8,
) -> PruneExport:
    """Write the pruned checkpoint and ``prune.json`` to ``out``.

    The perplexity of the original and of the pruned copy is measured on
    ``eval_prompts`` prompts of ``eval_prompt_set`` (None: not measured).
    """
    import headscope
    from headscope.probes.perplexity import plain_perplexity

    folder = check_output_folder(out, PRUNE_FOLDER, force=force)
    check_batch_size(batch_size)
    check_count(eval_prompts, "--eval-prompts")
    model = pruned_model(handle, plan)
    perplexity = None
    if eval_prompt_set is not None and handle.arch.causal:
        prompts = handle.tokenize(eval_prompt_set, eval_prompts)
        pad = handle.pad_id
        before = plain_perplexity(handle.model, prompts, pad_id=pad, batch_size=batch_size)
        after = plain_perplexity(model, prompts, pad_id=pad, batch_size=batch_size)
        perplexity = {
            "prompt_set": eval_prompt_set,
            "n_prompts": len(prompts),
            "n_tokens": after.n_tokens,
            "original": before.value(),
            "pruned": after.value(),
            "ratio": after.value() / before.value(),
        }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "headscope_version": headscope.__version__,
        "model": handle.describe(),
        "removed": plan.to_json(),
        "n_layers": {"original": handle.arch.n_layers, "pruned": model.config.num_hidden_layers},
        "parameters": {"original": _parameters(handle.model), "pruned": _parameters(model)},
        "perplexity": perplexity,
        "how_to_load": "transformers.AutoModelForCausalLM.from_pretrained('<folder>/checkpoint')",
    }
    with write_folder(out, PRUNE_FOLDER, force=force) as tmp:
        model.save_pretrained(tmp / CHECKPOINT_DIR, safe_serialization=True)
        handle.tokenizer.save_pretrained(tmp / CHECKPOINT_DIR)
        manifest["checkpoint_bytes"] = _size_of(tmp / CHECKPOINT_DIR)
        (tmp / PRUNE_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return PruneExport(folder=folder, checkpoint=folder / CHECKPOINT_DIR, manifest=manifest)


ORDERS = ("similarity", "block_influence", "iterative")


def orders_from_run(run: str | Path) -> tuple[str, dict[str, dict[str, list[int]]]]:
    """The model spec of ``run`` and the drop orders its redundancy tables hold."""
    from headscope.runs import open_run

    opened = open_run(run)
    needed = ("llm_drop_attention", "llm_drop_block", "block_influence")
    stored = {t.detector for t in opened.layer_tables()}
    missing = [name for name in needed if name not in stored]
    if missing:
        raise HeadscopeError(
            f"run {run} has no {', '.join(missing)} table; scan it with "
            "--detectors layer_redundancy, or leave out --from to measure here"
        )
    tables = {name: opened.layer_table(name) for name in needed}
    n_layers = len(tables["llm_drop_block"].frame)

    def order_of(name: str) -> list[int]:
        order = tables[name].summary.get("order")
        if not (
            isinstance(order, list)
            and sorted(order) == list(range(n_layers))
            and all(isinstance(i, int) and not isinstance(i, bool) for i in order)
        ):
            raise HeadscopeError(
                f"run {run}: the {name} table's summary has no drop order over its "
                f"{n_layers} layers; re-scan with --detectors layer_redundancy"
            )
        return order

    bi_order = order_of("block_influence")
    orders = {
        "attention": {"similarity": order_of("llm_drop_attention"), "block_influence": bi_order},
        "block": {"similarity": order_of("llm_drop_block"), "block_influence": bi_order},
    }
    return opened.model_spec(), orders


def measured_orders(
    handle: ModelHandle,
    *,
    calibration: str = "prose",
    n_prompts: int | None = 64,
    batch_size: int = 8,
) -> dict[str, dict[str, list[int]]]:
    """One-shot drop orders measured now on ``calibration`` (most redundant first)."""
    from headscope.analyses.redundancy import one_shot_orders
    from headscope.probes.layer_similarity import measure_layer_similarity

    prompts = handle.tokenize(calibration, n_prompts)
    return one_shot_orders(measure_layer_similarity(handle, prompts, batch_size=batch_size))


def check_prune_request(
    *,
    n_attention: int = 0,
    n_blocks: int = 0,
    order: str = "similarity",
    attention_layers: Sequence[int] = (),
    blocks: Sequence[int] = (),
    heads: Sequence[Head] = (),
    calibration_prompts: int | None = 64,
    batch_size: int = 8,
) -> None:
    """What ``choose_plan`` can check without the model (the CLI calls it before loading)."""
    check_batch_size(batch_size)
    check_count(calibration_prompts, "--calibration-prompts")
    check_count(n_attention, "--drop-attn", minimum=0)
    check_count(n_blocks, "--drop-blocks", minimum=0)
    if order not in ORDERS:
        raise HeadscopeError(f"unknown order '{order}'; choose one of {', '.join(ORDERS)}")
    if (n_attention and attention_layers) or (n_blocks and blocks):
        raise HeadscopeError("give a count (--drop-attn/--drop-blocks) or a list, not both")
    if not (n_attention or n_blocks or attention_layers or blocks or heads):
        raise HeadscopeError(NOTHING_TO_PRUNE)
    if any(layer < 0 for layer in (*attention_layers, *blocks)):
        raise HeadscopeError(f"layers are numbered from 0; got {[*attention_layers, *blocks]}")


def choose_plan(
    handle: ModelHandle,
    *,
    n_attention: int = 0,
    n_blocks: int = 0,
    order: str = "similarity",
    attention_layers: Sequence[int] = (),
    blocks: Sequence[int] = (),
    heads: Sequence[Head] = (),
    run_orders: Mapping[str, Mapping[str, list[int]]] | None = None,
    calibration: str = "prose",
    calibration_prompts: int | None = 64,
    batch_size: int = 8,
) -> PrunePlan:
    """A plan from counts (the first n of ``order``) and/or explicit layers and heads.

    ``run_orders``: orders read from a run (``orders_from_run``); otherwise
    they are measured now on ``calibration``.
    """
    from headscope.analyses.drop_simulation import iterative_order

    check_prune_request(
        n_attention=n_attention, n_blocks=n_blocks, order=order,
        attention_layers=attention_layers, blocks=blocks, heads=heads,
        calibration_prompts=calibration_prompts, batch_size=batch_size,
    )  # fmt: skip
    n_layers = handle.arch.n_layers
    if n_attention < 0 or n_blocks < 0 or n_attention > n_layers or n_blocks >= n_layers:
        raise HeadscopeError(
            f"cannot drop {n_attention} attention layers and {n_blocks} blocks "
            f"of a {n_layers}-layer model"
        )
    reason: dict[str, Any] = {"order": order if (n_attention or n_blocks) else "explicit"}
    if n_attention or n_blocks:
        if order == "iterative":
            if run_orders is not None:
                raise HeadscopeError("the iterative order is measured here, not read from a run")
            prompts = handle.tokenize(calibration, calibration_prompts)
            chosen_blocks = (
                iterative_order(handle, prompts, "block", n_blocks, batch_size=batch_size,
                                removed_blocks=blocks)
                if n_blocks else []
            )  # fmt: skip
            chosen_attention = (
                iterative_order(handle, prompts, "attn", n_attention, batch_size=batch_size,
                                removed_blocks=(*blocks, *chosen_blocks))
                if n_attention else []
            )  # fmt: skip
            reason["calibration"] = {"prompt_set": calibration, "n_prompts": len(prompts)}
        else:
            orders = run_orders
            if orders is None:
                orders = measured_orders(
                    handle, calibration=calibration, n_prompts=calibration_prompts,
                    batch_size=batch_size,
                )  # fmt: skip
                reason["calibration"] = {
                    "prompt_set": calibration,
                    "n_prompts": calibration_prompts,
                }
            explicit_blocks = set(blocks)
            chosen_blocks = [i for i in orders["block"][order] if i not in explicit_blocks]
            chosen_blocks = chosen_blocks[:n_blocks]
            # an attention layer inside a removed block is gone already: take the next
            gone = explicit_blocks | set(chosen_blocks)
            chosen_attention = [i for i in orders["attention"][order] if i not in gone]
            chosen_attention = chosen_attention[:n_attention]
            if len(chosen_attention) < n_attention:
                raise HeadscopeError(
                    f"only {len(chosen_attention)} attention layers are left outside "
                    f"the removed blocks; cannot drop {n_attention}"
                )
            reason["attention_order"] = list(orders["attention"][order])
            reason["block_order"] = list(orders["block"][order])
        attention_layers = (*attention_layers, *chosen_attention)
        blocks = (*blocks, *chosen_blocks)
        reason["dropped_in_order"] = {"attention": chosen_attention, "blocks": chosen_blocks}
    plan = PrunePlan(
        attention_layers=tuple(attention_layers), blocks=tuple(blocks), heads=tuple(heads),
        reason=reason,
    )  # fmt: skip
    plan.check(handle)
    return plan
