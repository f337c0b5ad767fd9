"""Drop simulation: held-out perplexity as attention layers or whole blocks are removed.

LLM-Drop (He et al. 2024) reports that dropping the attention layers with the
highest Sim costs little, and beats dropping them at random; ShortGPT (Men et
al. 2024) prunes the blocks of lowest influence. This experiment checks both
claims on the model at hand. Orders, most redundant first:

- ``similarity``: LLM-Drop Sim measured once on the calibration set (for
  blocks, the block Sim, which is 1 - BI by definition, so this curve is the
  ShortGPT curve and is stored once, as ``block_influence``);
- ``similarity_iterative``: LLM-Drop's iterative variant: drop the most
  similar module, measure Sim again on the pruned model, drop the next;
- ``block_influence``: ShortGPT's BI order (for attention: the attention
  modules of the lowest-BI blocks);
- ``random``: ``n_random`` seeded random orders; the curve is their mean
  perplexity, with the median, the geometric mean, the spread and every draw.

Dropping is done with the ablation engine's module skips (an attention branch
zeroed, a block returning its input), which is exactly what ``headscope export
prune`` bakes into a checkpoint (a test holds the two equal). Perplexity is
measured on a held-out prose set the calibration never saw. The table has one
row per layer: the perplexity cost of dropping that layer's attention alone
(and, in the evidence, its whole block alone), a direct check of whether Sim
predicts harm (their Spearman correlation is in the summary). The curves are
in the table's summary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from headscope.analyses.redundancy import one_shot_orders, redundancy_order
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.layer_similarity import LayerSimilarity, measure_layer_similarity
from headscope.progress import Progress, counter
from headscope.tables import LayerTable

KINDS = {"attention": "attn", "block": "block"}  # curve kind -> ablation skip module


def drop_steps(max_drops: int, n_points: int) -> list[int]:
    """Evenly spaced drop counts from 0 to ``max_drops`` (both included), unique."""
    if max_drops < 0 or n_points < 2:
        raise HeadscopeError("need max_drops >= 0 and at least 2 points per curve")
    return sorted({round(x) for x in np.linspace(0, max_drops, n_points)})


class _HeldOut:
    """Held-out negative log-likelihood under a set of skips, each set measured once."""

    def __init__(self, handle: ModelHandle, prompts, batch_size: int, on_eval: Callable | None):
        self.handle, self.prompts, self.batch_size = handle, prompts, batch_size
        self.cache: dict[frozenset, float] = {}
        self.on_eval = on_eval

    def nll(self, skip: Sequence[tuple[str, int]]) -> float:
        """Mean NLL per token (nats) with the modules in ``skip`` removed."""
        from headscope.probes.ablation import Ablation
        from headscope.probes.perplexity import plain_perplexity

        key = frozenset(skip)
        if key not in self.cache:
            ablation = Ablation(skip=tuple(sorted(key)))
            with self.handle.ablated(ablation, bridge=False):
                perplexity = plain_perplexity(
                    self.handle.model, self.prompts,
                    pad_id=self.handle.pad_id, batch_size=self.batch_size,
                )  # fmt: skip
            self.cache[key] = math.log(perplexity.value())
            if self.on_eval is not None:
                self.on_eval(1)
        return self.cache[key]

    def curve(self, module: str, order: Sequence[int], steps: Sequence[int]) -> list[float]:
        """Perplexity after dropping the first n layers of ``order``, for n in ``steps``."""
        return [math.exp(self.nll([(module, layer) for layer in order[:n]])) for n in steps]


def iterative_order(
    handle: ModelHandle,
    calibration,
    module: str,
    n_drops: int,
    *,
    batch_size: int,
    removed_blocks: Sequence[int] = (),
    unpruned: LayerSimilarity | None = None,
) -> list[int]:
    """LLM-Drop's iterative dropping: re-measure Sim after each drop, drop the highest.

    ``removed_blocks`` are skipped throughout and never chosen (attention
    layers to drop from a model whose blocks are being dropped too).
    ``unpruned``: the measurement of the whole model on ``calibration``, if the
    caller has it, so the first round is not measured again.
    """
    field = "attention" if module == "attn" else "block"
    removed = [("block", i) for i in removed_blocks]
    dropped: list[int] = []
    for _ in range(n_drops):
        skip = removed + [(module, i) for i in dropped]
        if not skip and unpruned is not None:
            similarity = unpruned
        else:
            similarity = measure_layer_similarity(
                handle, calibration, batch_size=batch_size, skip=skip
            )
        order = redundancy_order(getattr(similarity, field))
        taken = set(dropped) | set(removed_blocks)
        dropped.append(next(layer for layer in order if layer not in taken))
    return dropped


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def run_drop_simulation(
    handle: ModelHandle,
    *,
    stats_by_set: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    calibration: str = "prose",
    calibration_prompts_n: int | None = 64,
    held_out: str = "prose-heldout",
    held_out_prompts: int | None = 16,
    max_attention_drops: int | None = None,
    max_block_drops: int | None = None,
    n_points: int = 6,
    n_random: int = 5,
    seed: int = 0,
    harmless_nats: float = 0.01,
) -> LayerTable:
    """Perplexity curves of dropping attention layers and blocks in four orders.

    ``max_attention_drops`` defaults to half the layers, ``max_block_drops`` to a
    quarter; each curve has ``n_points`` evenly spaced drop counts.
    ``harmless_nats``: a layer whose attention alone costs at most this much
    held-out NLL (0.01 nats = 1 % perplexity) is flagged as cheap to drop.
    """
    del stats_by_set
    if not handle.arch.causal:
        raise NotApplicable("perplexity needs a causal language model")
    n_layers = handle.arch.n_layers
    max_attention = n_layers // 2 if max_attention_drops is None else max_attention_drops
    max_block = max(1, n_layers // 4) if max_block_drops is None else max_block_drops
    if not 0 <= max_attention <= n_layers or not 0 <= max_block < n_layers:
        raise HeadscopeError(
            f"cannot drop {max_attention} attention layers / {max_block} blocks "
            f"of a {n_layers}-layer model"
        )
    calibration_set = handle.tokenize(calibration, calibration_prompts_n)
    evaluation = handle.tokenize(held_out, held_out_prompts)
    n_evaluations = (
        1 + 2 * n_layers  # baseline, single drops
        + (len(drop_steps(max_attention, n_points)) - 1) * (3 + n_random)
        + (len(drop_steps(max_block, n_points)) - 1) * (2 + n_random)
    )  # fmt: skip
    # an upper bound: orders sharing a prefix share evaluations (finish() fills the bar)
    progress = counter(on_progress, "drop simulation", max_attention + max_block + n_evaluations)
    held = _HeldOut(handle, evaluation, batch_size, progress)
    similarity = measure_layer_similarity(handle, calibration_set, batch_size=batch_size)
    iterative = {
        module: iterative_order(
            handle, calibration_set, module, n, batch_size=batch_size, unpruned=similarity
        )
        for module, n in (("attn", max_attention), ("block", max_block))
    }
    progress(max_attention + max_block)
    one_shot = one_shot_orders(similarity)
    orders = {
        "attention": {
            "similarity": one_shot["attention"]["similarity"],
            "similarity_iterative": iterative["attn"],
            "block_influence": one_shot["attention"]["block_influence"],
        },
        "block": {  # the one-shot block Sim order is the BI order: stored once
            "similarity_iterative": iterative["block"],
            "block_influence": one_shot["block"]["block_influence"],
        },
    }
    generator = random.Random(seed)
    draws = [generator.sample(range(n_layers), n_layers) for _ in range(n_random)]
    base_nll = held.nll([])
    curves: dict[str, Any] = {}
    for kind, max_drops in (("attention", max_attention), ("block", max_block)):
        module, steps = KINDS[kind], drop_steps(max_drops, n_points)
        entry: dict[str, Any] = {"n_dropped": steps}
        for name, order in orders[kind].items():
            perplexity = held.curve(module, order, steps)
            entry[name] = {"order": order[:max_drops], "perplexity": perplexity}
        if draws:
            per_draw = np.array([held.curve(module, draw, steps) for draw in draws])
            # one unlucky draw (an early layer dropped) dominates the mean, so the
            # median and the geometric mean (exp of the mean NLL) come with it
            entry["random"] = {
                "perplexity": per_draw.mean(0).tolist(),
                "sd": per_draw.std(0).tolist(),
                "median": np.median(per_draw, axis=0).tolist(),
                "geometric_mean": np.exp(np.log(per_draw).mean(0)).tolist(),
                "draws": per_draw.tolist(),
                "orders": [draw[:max_drops] for draw in draws],
            }
            # per ordered curve: at how many of the drop counts (n > 0) it is below random
            entry["beats_random"] = {
                name: int(np.sum(np.array(value["perplexity"][1:]) < per_draw.mean(0)[1:]))
                for name, value in entry.items()
                if isinstance(value, dict) and "order" in value
            }
            entry["n_compared"] = len(steps) - 1
        curves[kind] = entry
    single_attention = np.array([held.nll([("attn", i)]) - base_nll for i in range(n_layers)])
    single_block = np.array([held.nll([("block", i)]) - base_nll for i in range(n_layers)])
    progress.finish()
    frame = pd.DataFrame(
        {
            "layer": np.arange(n_layers),
            "score": single_attention,
            "flagged": single_attention <= harmless_nats,
            "evidence": [
                {
                    "attention_sim": float(similarity.attention[i]),
                    "block_drop_delta_nll": float(single_block[i]),
                    "block_influence": float(similarity.block_influence[i]),
                }
                for i in range(n_layers)
            ],
        }
    )
    summary = {
        "baseline_perplexity": math.exp(base_nll),
        "held_out_targets": int(sum(length - 1 for length in evaluation.lengths)),
        "curves": curves,
        "spearman_attention_sim_vs_drop_cost": _spearman(
            similarity.attention.numpy(), single_attention
        ),
        "spearman_block_influence_vs_drop_cost": _spearman(
            similarity.block_influence.numpy(), single_block
        ),
        "n_harmless_attention": int((single_attention <= harmless_nats).sum()),
        "n_evaluations": len(held.cache),
    }
    return LayerTable(
        prompt_set=evaluation.name,
        frame=frame,
        n_layers=n_layers,
        params={
            "calibration": calibration,
            "calibration_prompts": len(calibration_set),
            "held_out": held_out,
            "held_out_prompts": len(evaluation),
            "max_attention_drops": max_attention,
            "max_block_drops": max_block,
            "n_points": n_points,
            "n_random": n_random,
            "seed": seed,
            "harmless_nats": harmless_nats,
        },
        summary=summary,
        description="held-out NLL increase (nats) from dropping one layer's attention alone; "
        "flagged: at most harmless_nats. Curves of dropping many in the summary",
    )
