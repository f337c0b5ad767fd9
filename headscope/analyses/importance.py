"""Head importance: Michel et al.'s gradient score next to mean ablation.

Two ways to ask how much the next-token loss L depends on a head:

- **Gradient importance** (Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?"): multiply every head's output z_h by a gate ξ_h = 1 and take
  ``I_h = E_x |∂L(x)/∂ξ_h|``, where L(x) is the mean next-token NLL of prompt
  x (padding excluded). The absolute value is taken per prompt, so a head that
  pushes some prompts' loss up and others' down still counts. ``normalized``
  divides each layer's row by its ℓ2 norm, as the paper does before ranking
  heads across layers. One backward pass per batch gives every prompt's
  gradient: each batch row has its own gates ([batch, layer, head]), and since
  rows never interact, ∂(Σ_i L_i)/∂ξ[i] = ∂L_i/∂ξ[i]. Only the gates are
  differentiated (``torch.autograd.grad``); no parameter gradient is stored.
- **Ablation importance**: the increase of the mean loss when the head alone
  is replaced by its mean output over a reference prompt set (pooled mean;
  mean rather than zero for importance, since zero also removes the head's
  constant contribution, which the next layers may rely on).

The gradient is a first-order (Taylor) estimate of what removing a head costs,
at the price of one backward pass; ablation measures the cost itself at one
forward pass per head. ``detect_head_importance`` reports both and their rank
agreement (Spearman ρ). Both losses weigh every prompt equally (the mean over
prompts of each prompt's mean NLL). Encoders have no next-token loss: the
functions raise ``NotApplicable`` for them.

Definitions, defaults and our choices: docs/methods.md, "head_importance".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor

from headscope.ablation_spec import head_name
from headscope.data.prompt_sets import PaddedBatch, TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import Ablation, mean_ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import block_sites
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

TOP_N = 5

# ------------------------------------------------------------------ the loss


def _require_causal(handle: ModelHandle) -> None:
    if not handle.arch.causal:
        raise NotApplicable(
            f"{handle.spec} is not a causal language model; head importance needs a next-token loss"
        )


def _batches(handle: ModelHandle, prompts: TokenizedPrompts, batch_size: int) -> list[PaddedBatch]:
    """Right-padded batches, kept so that every pass sees the very same inputs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HeadscopeError(f"batch size must be a positive integer, got {batch_size!r}")
    short = [i for i, length in enumerate(prompts.lengths) if length < 2]
    if short:
        raise HeadscopeError(
            f"prompt(s) {short[:5]} of '{prompts.name}' have fewer than 2 tokens: "
            "they have no next token to predict"
        )
    return list(prompts.padded(batch_size, handle.pad_id))


def _prompt_losses(handle: ModelHandle, batch: PaddedBatch) -> Float[Tensor, " batch"]:
    """Each prompt's mean next-token NLL (nats) over its real targets (padding excluded)."""
    device = handle.device
    valid = batch.mask
    logits = handle.model(
        input_ids=batch.tokens.to(device), attention_mask=valid.long().to(device)
    ).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = batch.tokens[:, 1:].to(device)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]
    target_mask = valid[:, 1:].to(device)
    return (nll * target_mask).sum(1) / target_mask.sum(1)


def _mean_loss(handle: ModelHandle, batches: list[PaddedBatch]) -> float:
    """The mean over prompts of each prompt's mean NLL, without gradients."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            total += float(_prompt_losses(handle, batch).double().sum())
            count += len(batch.lengths)
    return total / count


# ------------------------------------------------------- gradient importance


@contextlib.contextmanager
def _head_gates(handle: ModelHandle) -> Iterator[dict[str, Tensor]]:
    """Scoped: inside, z_h of every layer is multiplied by ``current["gates"][row, layer, h]``."""
    arch = handle.arch
    current: dict[str, Tensor] = {}

    def gate(layer: int) -> Callable:
        def hook(_module, inputs: tuple) -> tuple:
            z = inputs[0]
            gates = current["gates"][:, layer].to(z.dtype)  # [batch, head]
            per_head = z.unflatten(-1, (arch.n_heads, arch.d_head)) * gates[:, None, :, None]
            return (per_head.flatten(-2), *inputs[1:])

        return hook

    removers = []
    try:
        for site in block_sites(handle.model, arch):
            removers.append(site.output_projection.register_forward_pre_hook(gate(site.layer)))
        yield current
    finally:
        for remover in removers:
            remover.remove()


def gradient_importance(
    handle: ModelHandle,
    prompts: TokenizedPrompts,
    *,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """Michel et al.'s ``I_h = E_x |∂L(x)/∂ξ_h|`` (raw) and its per-layer ℓ2-normalized form.

    Both are float64 [layer, head] on CPU; a layer whose raw row is all zero
    stays zero when normalized. ``on_progress`` counts prompts under the label
    "head importance: gradients".
    """
    _require_causal(handle)
    arch = handle.arch
    batches = _batches(handle, prompts, batch_size)
    total = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float64)
    advance = counter(on_progress, "head importance: gradients", len(prompts))
    with torch.inference_mode(False), torch.enable_grad(), _head_gates(handle) as current:
        for batch in batches:
            rows = len(batch.lengths)
            gates = torch.ones(
                rows, arch.n_layers, arch.n_heads, device=handle.device, requires_grad=True
            )
            current["gates"] = gates
            losses = _prompt_losses(handle, batch)
            (gradient,) = torch.autograd.grad(losses.sum(), gates)
            total += gradient.abs().sum(0).double().cpu()
            advance(rows)
    raw = total / len(prompts)
    norms = raw.norm(dim=1, keepdim=True)
    normalized = torch.where(norms > 0, raw / norms.clamp_min(1e-300), torch.zeros_like(raw))
    return raw, normalized


# -------------------------------------------------------- ablation importance


def ablation_importance(
    handle: ModelHandle,
    prompts: TokenizedPrompts,
    *,
    reference_set: str = "prose",
    reference_prompts: int = 32,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> tuple[Float[Tensor, "layer head"], float]:
    """(ablated loss − base loss per head [layer, head] float64, base loss).

    Each head is mean-ablated alone, with its pooled mean output over the first
    ``reference_prompts`` of ``reference_set`` (one reference pass for all
    heads). ``on_progress`` counts heads under the label "head importance: ablations".
    """
    _require_causal(handle)
    arch = handle.arch
    batches = _batches(handle, prompts, batch_size)
    heads = [(layer, head) for layer in range(arch.n_layers) for head in range(arch.n_heads)]
    full = mean_ablation(
        handle, heads, prompt_set=reference_set, n_prompts=reference_prompts,
        batch_size=batch_size,
    )  # fmt: skip
    base_loss = _mean_loss(handle, batches)
    delta = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float64)
    advance = counter(on_progress, "head importance: ablations", len(heads))
    for head in heads:
        alone = Ablation(
            method="mean",
            heads=(head,),
            reference={head: full.reference[head]},
            reference_info=full.reference_info,
        )
        with handle.ablated(alone, bridge=False):
            delta[head] = _mean_loss(handle, batches) - base_loss
        advance()
    return delta, base_loss


# ------------------------------------------------------------------ comparing


def spearman(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise HeadscopeError(f"spearman needs equal sizes, got {x.size} and {y.size}")
    rank_x = rankdata(x) - (x.size + 1) / 2
    rank_y = rankdata(y) - (y.size + 1) / 2
    denominator = math.sqrt(float((rank_x**2).sum() * (rank_y**2).sum()))
    return float((rank_x * rank_y).sum() / denominator) if denominator > 0 else math.nan


def _descending_ranks(values: np.ndarray) -> np.ndarray:
    """1 for the largest; ties share the best rank."""
    return rankdata(-values, method="min").reshape(values.shape).astype(int)


def _top_heads(values: np.ndarray, n: int = TOP_N) -> list[str]:
    order = np.argsort(-values.ravel(), kind="stable")[:n]
    return [head_name(*divmod(int(i), values.shape[1])) for i in order]


# ------------------------------------------------------------------ detector


def _evaluation_prompts(
    handle: ModelHandle, prompt_set: str, n_prompts: int, reference_set: str, reference_prompts: int
) -> tuple[TokenizedPrompts, int]:
    """``n_prompts`` of ``prompt_set``, after the reference prompts when the sets coincide."""
    evaluated = handle.tokenize(prompt_set)
    reference = evaluated
    if reference_set != prompt_set:
        reference = handle.tokenize(reference_set)
    if len(reference) < reference_prompts:
        raise HeadscopeError(
            f"reference set '{reference_set}' has {len(reference)} prompts, fewer than "
            f"reference_prompts = {reference_prompts}; lower reference_prompts"
        )
    start = reference_prompts if prompt_set == reference_set else 0
    if len(evaluated) < start + n_prompts:
        held_out = " after the reference prompts" if start else ""
        raise HeadscopeError(
            f"prompt set '{prompt_set}' has {len(evaluated)} prompts; head importance needs "
            f"{n_prompts}{held_out} (prompts {start}-{start + n_prompts - 1}); lower n_prompts "
            "or reference_prompts, or evaluate on another prompt set"
        )
    return dataclasses.replace(evaluated, tokens=evaluated.tokens[start : start + n_prompts]), start


def detect_head_importance(
    handle: ModelHandle,
    *,
    stats_by_set: dict[str, object] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    prompt_set: str = "prose",
    n_prompts: int = 16,
    reference_set: str = "prose",
    reference_prompts: int = 32,
    flag_fraction: float = 0.2,
) -> HeadTable:
    """Gradient importance (the score) and mean-ablation loss increase of every head.

    Evaluated on ``n_prompts`` of ``prompt_set``; when it is also the reference
    set, on prompts ``[reference_prompts, reference_prompts + n_prompts)``, so
    the loss is never measured on the prompts that gave the ablation means.
    Flags the top ``flag_fraction`` of heads by normalized gradient importance
    (ties broken by order). ``stats_by_set`` is not used (the experiment runs
    the model itself). ``on_progress`` reports the gradient pass (prompts) and
    the ablations (heads).
    """
    del stats_by_set
    _require_causal(handle)
    if n_prompts < 1 or reference_prompts < 1:
        raise HeadscopeError(
            f"n_prompts and reference_prompts must be at least 1, got {n_prompts} and "
            f"{reference_prompts}"
        )
    if not 0 < flag_fraction <= 1:
        raise HeadscopeError(f"flag_fraction must be in (0, 1], got {flag_fraction}")
    prompts, start = _evaluation_prompts(
        handle, prompt_set, n_prompts, reference_set, reference_prompts
    )
    raw, normalized = gradient_importance(
        handle, prompts, batch_size=batch_size, on_progress=on_progress
    )
    delta, base_loss = ablation_importance(
        handle, prompts, reference_set=reference_set, reference_prompts=reference_prompts,
        batch_size=batch_size,
        on_progress=on_progress,
    )  # fmt: skip
    raw_np, normalized_np, delta_np = raw.numpy(), normalized.numpy(), delta.numpy()
    rank_gradient = _descending_ranks(normalized_np)
    rank_ablation = _descending_ranks(delta_np)
    n_flagged = max(1, round(flag_fraction * normalized_np.size))
    flagged = np.zeros(normalized_np.size, dtype=bool)
    flagged[np.argsort(-normalized_np.ravel(), kind="stable")[:n_flagged]] = True
    evidence = [
        {
            "gradient_raw": float(raw_np[layer, head]),
            "gradient_normalized": float(normalized_np[layer, head]),
            "ablation_delta_loss": float(delta_np[layer, head]),
            "rank_gradient": int(rank_gradient[layer, head]),
            "rank_ablation": int(rank_ablation[layer, head]),
        }
        for layer in range(raw_np.shape[0])
        for head in range(raw_np.shape[1])
    ]
    return HeadTable.from_matrix(
        normalized_np,
        flagged.reshape(normalized_np.shape),
        evidence,
        prompt_set=prompts.name,
        params={
            "n_prompts": n_prompts,
            "evaluated_prompts": [start, start + n_prompts],
            "reference_set": reference_set,
            "reference_prompts": reference_prompts,
            "flag_fraction": flag_fraction,
            "score": "E_x |dL(x)/d gate_h|, divided by the l2 norm of its layer (Michel et al.)",
            "ablation": "pooled mean over the reference prompts, one head at a time",
        },
        summary={
            "base_loss": base_loss,
            "n_prompts": len(prompts),
            "n_target_tokens": int(sum(length - 1 for length in prompts.lengths)),
            "spearman_normalized_vs_ablation": spearman(normalized_np, delta_np),
            "spearman_raw_vs_ablation": spearman(raw_np, delta_np),
            "top_gradient_normalized": _top_heads(normalized_np),
            "top_gradient_raw": _top_heads(raw_np),
            "top_ablation": _top_heads(delta_np),
            "fraction_ablation_raises_loss": float((delta_np > 0).mean()),
            "n_flagged": n_flagged,
        },
        description="normalized gradient importance E|dL/d gate_h| (Michel et al. 2019)",
    )
