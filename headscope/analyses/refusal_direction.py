"""The refusal direction and each head's direct write onto it (Arditi et al. 2024).

"Refusal in Language Models Is Mediated by a Single Direction" (METHODS.md §5):

- **Direction.** r_l = mean over harmful requests of the residual stream at
  the last prompt position *after block l* (the block's output) − the same
  mean over harmless requests; the first ``n_prompts`` (64) of ``harmful``
  ("harmful-train") and ``harmless`` ("harmless-train"), chat-formatted
  (``headscope.probes.generation.chat_prompts``). r̂_l = r_l / ‖r_l‖.
- **Layer choice.** Candidate layers are all but the last 20 % (layers
  0 .. L − ⌊0.2 L⌋ − 1, as Arditi et al. skip the last layers). For each, r̂_l
  is ablated from the residual stream at every layer (x ← x − (x·r̂) r̂ on the
  embedding output and on every block's output) and the model generates
  greedily on the first ``val_prompts`` (32) requests of ``val``
  ("harmful-val") for ``selection_tokens`` (24) tokens, judged by
  ``headscope.analyses.refusal.is_refusal``. The best layer has the lowest
  refusal rate; ties go to the larger separation, (mean harmful projection on
  r̂_l − mean harmless projection) / pooled standard deviation of the
  projections.
- **Heads.** A head's direct contribution at the last position is its output
  after W_O (its slice z_h of the output projection's input times its W_O
  rows, ``headscope.probes.sites.head_output_weight``; no bias) projected on
  r̂ of the best layer. Score = mean over the harmful prompts − mean over the
  harmless ones (both means in the evidence); the ``top_k`` (5) heads are
  flagged.
- **Check** (``check``, default on): the refusal rate on the first
  ``check_prompts`` (32) of ``check_harmful`` ("harmful-heldout"), greedy,
  ``max_new_tokens`` (64) tokens, clean and with r̂ of the best layer
  ablated (``params["direction_ablation_refusal"]``).

Cost: two forwards of the direction prompts, then one generation run per
candidate layer (24 on SmolLM2-135M's 30 layers) and two for the check.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from headscope.ablation_spec import head_name
from headscope.analyses.safety_check import GENERATION_BATCH
from headscope.analyses.safety_common import names, requests_of, right_padded
from headscope.analyses.safety_ships import chat_token_ids, require_causal
from headscope.errors import HeadscopeError
from headscope.probes.ablation import capture_head_outputs
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import block_sites, head_output_weight
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

SKIP_LAST_FRACTION = 0.2


def candidate_layers(n_layers: int) -> list[int]:
    """Every layer but the last ⌊0.2 L⌋."""
    return list(range(n_layers - math.floor(SKIP_LAST_FRACTION * n_layers)))


@torch.inference_mode()
def last_position_reads(
    handle: ModelHandle, token_ids: Sequence[Sequence[int]], *, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(residual after each block [prompt, layer, d_model], head outputs after W_O projected
    nowhere yet: z [prompt, layer, head, d_head]) at each prompt's last token, float64."""
    arch = handle.arch
    sites = block_sites(handle.model, arch)
    residual: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(_module, _inputs, output) -> None:
            residual[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    resid_rows, z_rows = [], []
    removers = [site.block.register_forward_hook(keep(site.layer)) for site in sites]
    try:
        with capture_head_outputs(handle, range(arch.n_layers)) as captured:
            for tokens, mask in right_padded(token_ids, handle.pad_id, batch_size):
                handle.model(
                    input_ids=tokens.to(handle.device), attention_mask=mask.to(handle.device)
                )
                rows = torch.arange(len(tokens))
                last = (mask.sum(1) - 1).to(handle.device)
                resid_rows.append(
                    torch.stack([residual[i][rows, last] for i in range(arch.n_layers)], 1)
                )
                z_rows.append(
                    torch.stack([captured[i][rows, last] for i in range(arch.n_layers)], 1)
                )
    finally:
        for remover in removers:
            remover.remove()
    return torch.cat(resid_rows).double().cpu(), torch.cat(z_rows).double().cpu()


@contextlib.contextmanager
def direction_ablated(handle: ModelHandle, direction: Tensor) -> Iterator[None]:
    """Scoped: x ← x − (x·r̂) r̂ on the embedding output and on every block's output."""
    unit = (direction / direction.norm()).to(handle.device, handle.dtype)

    def project_out(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden - (hidden @ unit)[..., None] * unit
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    modules = [handle.model.get_input_embeddings()]
    modules += [site.block for site in block_sites(handle.model, handle.arch)]
    removers = [module.register_forward_hook(project_out) for module in modules]
    try:
        yield
    finally:
        for remover in removers:
            remover.remove()


def _separation(harmful: Tensor, harmless: Tensor, unit: Tensor) -> float:
    a, b = harmful @ unit, harmless @ unit
    pooled = math.sqrt((float(a.var()) + float(b.var())) / 2) if len(a) > 1 else 0.0
    difference = float(a.mean() - b.mean())
    return difference / pooled if pooled > 0 else difference


def detect_refusal_direction(
    handle: ModelHandle,
    *,
    stats_by_set: dict[str, object] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    harmful: str = "harmful-train",
    harmless: str = "harmless-train",
    n_prompts: int = 64,
    val: str = "harmful-val",
    val_prompts: int = 32,
    selection_tokens: int = 24,
    top_k: int = 5,
    check: bool = True,
    check_harmful: str = "harmful-heldout",
    check_prompts: int = 32,
    max_new_tokens: int = 64,
) -> HeadTable:
    """Arditi et al.'s refusal direction, its layer, and every head's direct write onto it.

    See the module doc. ``stats_by_set`` is not used; ``batch_size`` batches
    the forwards and generations (at least ``GENERATION_BATCH``); ``on_progress`` counts the
    candidate layers and the check's generation runs.
    """
    from headscope.analyses.refusal import JUDGE_RULE, refusal_rate
    from headscope.probes.generation import greedy_generate

    del stats_by_set
    require_causal(handle)
    if top_k < 1:
        raise HeadscopeError(f"top_k must be at least 1, got {top_k}")
    started = time.perf_counter()
    arch = handle.arch
    batch = max(batch_size, GENERATION_BATCH)
    harmful_name, harmful_requests = requests_of(harmful, n_prompts, "harmful")
    harmless_name, harmless_requests = requests_of(harmless, n_prompts, "harmless")
    val_name, val_requests = requests_of(val, val_prompts, "val")
    resid_harmful, z_harmful = last_position_reads(
        handle, chat_token_ids(handle, harmful_requests), batch_size=batch
    )
    resid_harmless, z_harmless = last_position_reads(
        handle, chat_token_ids(handle, harmless_requests), batch_size=batch
    )
    directions = resid_harmful.mean(0) - resid_harmless.mean(0)  # [layer, d_model]
    units = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    separation = {
        layer: _separation(resid_harmful[:, layer], resid_harmless[:, layer], units[layer])
        for layer in range(arch.n_layers)
    }
    layers = candidate_layers(arch.n_layers)
    advance = counter(on_progress, "refusal direction: candidate layers", len(layers))
    refusal_by_layer: dict[int, float] = {}
    for layer in layers:
        with direction_ablated(handle, directions[layer]):
            texts = greedy_generate(
                handle, val_requests, max_new_tokens=selection_tokens, batch_size=batch
            )
        refusal_by_layer[layer] = refusal_rate(texts)
        advance()
    advance.finish()
    best = min(layers, key=lambda layer: (refusal_by_layer[layer], -separation[layer]))
    unit = units[best]

    sites = block_sites(handle.model, arch)
    on_direction = torch.stack(
        [
            torch.stack(
                [
                    head_output_weight(sites[layer], head, arch).detach().double().cpu() @ unit
                    for head in range(arch.n_heads)
                ]
            )
            for layer in range(arch.n_layers)
        ]
    )  # [layer, head, d_head]: W_O r̂ per head
    harmful_proj = torch.einsum("nlhd,lhd->nlh", z_harmful, on_direction)
    harmless_proj = torch.einsum("nlhd,lhd->nlh", z_harmless, on_direction)
    mean_harmful = harmful_proj.mean(0).numpy()
    mean_harmless = harmless_proj.mean(0).numpy()
    scores = mean_harmful - mean_harmless
    order = np.argsort(-scores.ravel(), kind="stable")
    rank = np.empty(scores.size, dtype=int)
    rank[order] = np.arange(1, scores.size + 1)
    flagged = (rank <= top_k).reshape(scores.shape)
    top = [divmod(int(i), arch.n_heads) for i in order[:top_k]]
    evidence = [
        {
            "note": f"writes {scores[layer, head]:+.3g} more on r̂(L{best}) for harmful, "
            f"rank {rank[layer * arch.n_heads + head]}/{scores.size}",
            "mean_harmful": float(mean_harmful[layer, head]),
            "mean_harmless": float(mean_harmless[layer, head]),
            "rank": int(rank[layer * arch.n_heads + head]),
        }
        for layer in range(arch.n_layers)
        for head in range(arch.n_heads)
    ]
    params = {
        "protocol": "arditi2024",
        "harmful": harmful_name,
        "harmless": harmless_name,
        "n_prompts": len(harmful_requests),
        "val": val_name,
        "val_prompts": len(val_requests),
        "selection_tokens": selection_tokens,
        "position": "last prompt token; residual after block l",
        "candidate_layers": layers,
        "top_k": top_k,
        "judge": JUDGE_RULE,
        "direction_norm": float(directions[best].norm()),
        "check": check,
    }
    if check:
        check_name, check_requests = requests_of(check_harmful, check_prompts, "check_harmful")
        runs = counter(on_progress, "refusal direction: check runs", 2)
        clean_texts = greedy_generate(
            handle, check_requests, max_new_tokens=max_new_tokens, batch_size=batch
        )
        runs()
        with direction_ablated(handle, directions[best]):
            ablated_texts = greedy_generate(
                handle, check_requests, max_new_tokens=max_new_tokens, batch_size=batch
            )
        runs()
        params.update(
            check_harmful=check_name,
            check_prompts=len(check_requests),
            max_new_tokens=max_new_tokens,
            clean_refusal=refusal_rate(clean_texts),
            direction_ablation_refusal=refusal_rate(ablated_texts),
        )
    return HeadTable.from_matrix(
        scores,
        flagged,
        evidence,
        prompt_set=harmful_name,
        params=params,
        summary={
            "best_layer": best,
            "refusal_by_layer": refusal_by_layer,
            "separation_by_layer": separation,
            "top_heads": names(top),
            "top_head": head_name(*top[0]),
            "seconds": round(time.perf_counter() - started, 2),
        },
        description="direct write of each head onto the refusal direction, harmful − harmless "
        "(Arditi et al. 2024)",
    )
