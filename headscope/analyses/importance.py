"""Head importance: Michel et al.'s gradient score next to single-head ablation.

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
- **Ablation importance**: the increase ΔL(x) of each prompt's loss when the
  head alone is ablated, and its mean over prompts. The ``ablation`` keyword
  chooses the protocol:

  - ``"zero"`` (default; protocol ``michel2019``): z_h = 0, i.e. the gate
    ξ_h = 0. This is what Michel et al. do when they remove one head
    (their Section 3 masks a head by setting its ξ_h to 0) and what the
    gradient estimates: to first order, L(ξ_h = 0) − L(ξ_h = 1) ≈ −∂L/∂ξ_h,
    so |ΔL(x)| ≈ |∂L(x)/∂ξ_h| prompt by prompt.
  - ``"mean"`` (protocol ``headscope-mean``, headscope's earlier default): z_h
    = its pooled mean output over a reference prompt set. It keeps the head's
    constant contribution, which later layers may rely on, so it is the
    gentler measure of a head's *information*, but not what the gradient
    estimates.

The gradient is a first-order (Taylor) estimate of what zeroing a head costs,
at the price of one backward pass; ablation measures the cost itself at one
forward pass per head and batch of prompts (a batch of prompts with one head
ablated is one forward). The layers below the ablated head cannot change, so
each batch's block outputs are recorded once on the unablated pass and the
blocks below the ablated layer replay them instead of recomputing (exact: the
same tensors a full forward would produce; by a count of multiply-adds about
40 % fewer on SmolLM2-135M, whose unembedding is a fifth of a forward).

``detect_head_importance`` compares the two like with like:

- Spearman's ρ across all heads (raw and per-layer-normalized gradient; the
  normalization reorders heads across layers only) and **within each layer**
  (ρ over that layer's heads, then the mean over layers; there the
  normalization changes nothing). A layer's ρ is significant when a one-sided
  permutation test (ρ > 0, 10 000 seeded permutations of its heads) gives
  p < 0.05; by chance alone about 5 % of layers pass.
- the like-with-like magnitudes E_x|ΔL(x)| against E_x|∂L(x)/∂ξ_h|, and the
  signed first-order prediction E_x[−∂L(x)/∂ξ_h] against E_x[ΔL(x)].
- Noise: percentile bootstrap intervals over prompts (``n_bootstrap``
  resamples of the evaluated prompts, seeded, the same resamples for every
  head and both measures) of each head's mean ΔL and of its gradient
  importance, of the Spearman ρs, and the number of heads whose ΔL interval
  excludes 0 (heads whose ablation effect is above its own noise).

Both losses weigh every prompt equally (the mean over prompts of each prompt's
mean NLL). Encoders have no next-token loss: the functions raise
``NotApplicable`` for them.

Definitions, defaults and our choices: docs/methods.md, "head_importance".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor

from headscope.ablation_spec import head_name
from headscope.data.prompt_sets import PaddedBatch, TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import Ablation, check_heads, mean_ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.replay import BlockReplay as _BlockReplay
from headscope.probes.sites import block_sites
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

TOP_N = 5
CONFIDENCE = 0.95
N_PERMUTATIONS = 10_000
SIGNIFICANCE = 0.05

#: ablation kind -> (protocol name, one-line note for reports)
ABLATIONS = {
    "zero": (
        "michel2019",
        "Michel et al. 2019: each head zeroed alone (gate = 0), what the gradient estimates",
    ),
    "mean": (
        "headscope-mean",
        "headscope: each head set alone to its pooled mean output over the reference prompts",
    ),
}

# ------------------------------------------------------------------ the loss


def _require_causal(handle: ModelHandle) -> None:
    if not handle.arch.causal:
        raise NotApplicable(
            f"{handle.spec} is not a causal language model; head importance needs a next-token loss"
        )


def _check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise HeadscopeError(
            f"unknown head-importance ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}"
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
        input_ids=batch.tokens.to(device),
        attention_mask=valid.long().to(device),
        use_cache=False,
    ).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = batch.tokens[:, 1:].to(device)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]
    target_mask = valid[:, 1:].to(device)
    return (nll * target_mask).sum(1) / target_mask.sum(1)


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


def prompt_gradients(
    handle: ModelHandle,
    prompts: TokenizedPrompts,
    *,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> Float[Tensor, "prompt layer head"]:
    """Each prompt's signed gate gradient ∂L(x)/∂ξ_h, float64 [prompt, layer, head] on CPU.

    Row i is prompt i of ``prompts``. ``on_progress`` counts prompts under the
    label "head importance: gradients".
    """
    _require_causal(handle)
    arch = handle.arch
    batches = _batches(handle, prompts, batch_size)
    out = torch.zeros(len(prompts), arch.n_layers, arch.n_heads, dtype=torch.float64)
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
            out[batch.indices] = gradient.double().cpu()
            advance(rows)
    return out


def _layer_normalized(raw: Tensor) -> Tensor:
    norms = raw.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, raw / norms.clamp_min(1e-300), torch.zeros_like(raw))


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
    gradients = prompt_gradients(handle, prompts, batch_size=batch_size, on_progress=on_progress)
    raw = gradients.abs().mean(0)
    return raw, _layer_normalized(raw)


# -------------------------------------------------------- ablation importance


def _single_head_ablations(
    handle: ModelHandle,
    ablation: str,
    heads: list[tuple[int, int]],
    reference_set: str,
    reference_prompts: int,
    batch_size: int,
) -> tuple[list[Ablation], dict[str, Any]]:
    if ablation == "zero":
        return [Ablation(method="zero", heads=(head,)) for head in heads], {"kind": "zero"}
    full = mean_ablation(
        handle, heads, prompt_set=reference_set, n_prompts=reference_prompts,
        batch_size=batch_size,
    )  # fmt: skip
    alone = [
        Ablation(
            method="mean",
            heads=(head,),
            reference={head: full.reference[head]},
            reference_info=full.reference_info,
        )
        for head in heads
    ]
    return alone, dict(full.reference_info)


def prompt_ablation_deltas(
    handle: ModelHandle,
    prompts: TokenizedPrompts,
    *,
    ablation: str = "zero",
    reference_set: str = "prose",
    reference_prompts: int = 32,
    batch_size: int = 8,
    replay: bool = True,
    heads: Sequence[tuple[int, int]] | None = None,
    on_progress: Progress | None = None,
) -> tuple[Float[Tensor, "prompt layer head"], Float[Tensor, " prompt"]]:
    """(ΔL per prompt and head [prompt, layer, head], base loss per prompt [prompt]), float64.

    ΔL[i, l, h] is prompt i's loss with head (l, h) ablated alone minus its
    loss unablated. ``ablation``: "zero" or "mean" (the pooled mean over the
    first ``reference_prompts`` of ``reference_set``; one reference pass for
    all heads). ``replay`` (default) skips recomputing the blocks below the
    ablated layer (exact; see ``_BlockReplay``). ``heads``: only these (the
    others' ΔL is NaN); default every head. ``on_progress`` counts head-prompt
    pairs under the label "head importance: ablations".
    """
    _require_causal(handle)
    _check_ablation(ablation)
    arch = handle.arch
    batches = _batches(handle, prompts, batch_size)
    if heads is None:
        heads = [(layer, head) for layer in range(arch.n_layers) for head in range(arch.n_heads)]
    heads = sorted({(int(layer), int(head)) for layer, head in heads})
    check_heads(heads, arch)
    alone, _ = _single_head_ablations(
        handle, ablation, heads, reference_set, reference_prompts, batch_size
    )
    replayer = _BlockReplay([site.block for site in block_sites(handle.model, arch)])
    base = torch.zeros(len(prompts), dtype=torch.float64)
    delta = torch.full((len(prompts), arch.n_layers, arch.n_heads), math.nan, dtype=torch.float64)
    advance = counter(on_progress, "head importance: ablations", len(heads) * len(prompts))
    with torch.inference_mode():
        for batch in batches:
            with replayer.recording():
                base_losses = _prompt_losses(handle, batch).double().cpu()
            base[batch.indices] = base_losses
            for (layer, head), single in zip(heads, alone, strict=True):
                below = replayer.below(layer) if replay else contextlib.nullcontext()
                with below, handle.ablated(single, bridge=False):
                    losses = _prompt_losses(handle, batch).double().cpu()
                delta[batch.indices, layer, head] = losses - base_losses
                advance(len(batch.lengths))
    return delta, base


def ablation_importance(
    handle: ModelHandle,
    prompts: TokenizedPrompts,
    *,
    ablation: str = "zero",
    reference_set: str = "prose",
    reference_prompts: int = 32,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> tuple[Float[Tensor, "layer head"], float]:
    """(mean over prompts of ΔL per head [layer, head] float64, mean base loss).

    See ``prompt_ablation_deltas``; every prompt weighs the same.
    """
    delta, base = prompt_ablation_deltas(
        handle, prompts, ablation=ablation, reference_set=reference_set,
        reference_prompts=reference_prompts, batch_size=batch_size, on_progress=on_progress,
    )  # fmt: skip
    return delta.mean(0), float(base.mean())


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


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of a with the same row of b ([..., n] -> [...]); NaN if constant."""
    rank_a = rankdata(a, axis=-1)
    rank_b = rankdata(b, axis=-1)
    rank_a = rank_a - rank_a.mean(-1, keepdims=True)
    rank_b = rank_b - rank_b.mean(-1, keepdims=True)
    denominator = np.sqrt((rank_a**2).sum(-1) * (rank_b**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rank_a * rank_b).sum(-1) / denominator, np.nan)


def layer_spearman(
    a: np.ndarray | Tensor,
    b: np.ndarray | Tensor,
    *,
    n_permutations: int = N_PERMUTATIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's ρ within each layer of two [layer, head] arrays, and its one-sided p-value.

    The p-value of layer l is the permutation test of ρ_l > 0: the share of
    ``n_permutations`` seeded shuffles of that layer's heads (one shuffle of
    a's ranks, b fixed) whose ρ is at least the observed one, counted as
    (1 + hits) / (1 + n_permutations). NaN (ρ and p) for a layer where either
    row is constant.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise HeadscopeError(
            f"layer_spearman needs two equal [layer, head] arrays, got {x.shape}, {y.shape}"
        )
    rho = _rowwise_spearman(x, y)
    generator = np.random.default_rng(seed)
    p_values = np.full(len(rho), np.nan)
    for layer, observed in enumerate(rho):
        if math.isnan(observed):
            continue
        shuffled = generator.permuted(np.tile(x[layer], (n_permutations, 1)), axis=1)
        null = _rowwise_spearman(shuffled, np.broadcast_to(y[layer], shuffled.shape))
        p_values[layer] = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_permutations)
    return rho, p_values


def resample_weights(n: int, n_resamples: int, *, seed: int = 0) -> np.ndarray:
    """Bootstrap weights [resample, n]: each row is how often each of n items was drawn, over n."""
    generator = np.random.default_rng(seed)
    return generator.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) / n


def bootstrap_interval(
    samples: np.ndarray | Tensor,
    *,
    weights: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over axis 0 (the prompts), per other entry.

    ``samples`` is [prompt, ...]; returns (low, high), each of shape
    ``samples.shape[1:]``. Pass the same ``weights`` (``resample_weights``) to
    resample every measure with the same prompts.
    """
    values = np.asarray(samples, dtype=np.float64)
    n = values.shape[0]
    if weights is None:
        weights = resample_weights(n, n_resamples, seed=seed)
    means = (weights @ values.reshape(n, -1)).reshape(len(weights), *values.shape[1:])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return low, high


def _interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(low), float(high)]


def _descending_ranks(values: np.ndarray) -> np.ndarray:
    """1 for the largest; ties share the best rank."""
    return rankdata(-values, method="min").reshape(values.shape).astype(int)


def _top_heads(values: np.ndarray, n: int = TOP_N) -> list[str]:
    order = np.argsort(-values.ravel(), kind="stable")[:n]
    return [head_name(*divmod(int(i), values.shape[1])) for i in order]


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def compare_importance(
    gradients: np.ndarray | Tensor,
    deltas: np.ndarray | Tensor,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the detector reports, from per-prompt gradients and ablation deltas.

    ``gradients`` and ``deltas`` are [prompt, layer, head] (signed ∂L/∂ξ_h and
    ΔL). Returns the per-head arrays ([layer, head]: "raw", "normalized",
    "delta", "abs_delta", "signed_gradient" and the bootstrap bounds
    "delta_low", "delta_high", "raw_low", "raw_high") and the "summary" dict.
    """
    g = np.asarray(gradients, dtype=np.float64)
    d = np.asarray(deltas, dtype=np.float64)
    if g.shape != d.shape or g.ndim != 3:
        raise HeadscopeError(
            f"need two equal [prompt, layer, head] arrays, got {g.shape}, {d.shape}"
        )
    n_prompts, n_layers, n_heads = g.shape
    raw = np.abs(g).mean(0)
    normalized = _layer_normalized(torch.from_numpy(raw)).numpy()
    delta = d.mean(0)
    abs_delta = np.abs(d).mean(0)
    signed_gradient = g.mean(0)

    weights = resample_weights(n_prompts, n_bootstrap, seed=seed)
    delta_low, delta_high = bootstrap_interval(d, weights=weights)
    raw_low, raw_high = bootstrap_interval(np.abs(g), weights=weights)
    # the comparison itself under the same resamples of prompts
    boot_raw = (weights @ np.abs(g).reshape(n_prompts, -1)).reshape(-1, n_layers, n_heads)
    boot_delta = (weights @ d.reshape(n_prompts, -1)).reshape(-1, n_layers, n_heads)
    boot_norm = _layer_normalized(torch.from_numpy(boot_raw)).numpy()
    flat = (n_bootstrap, n_layers * n_heads)
    boot_across_raw = _rowwise_spearman(boot_raw.reshape(flat), boot_delta.reshape(flat))
    boot_across_norm = _rowwise_spearman(boot_norm.reshape(flat), boot_delta.reshape(flat))
    with np.errstate(all="ignore"), _quiet_nanmean():
        boot_within = np.nanmean(_rowwise_spearman(boot_raw, boot_delta), axis=1)

    within, p_values = layer_spearman(raw, delta, seed=seed)
    within_abs, _ = layer_spearman(raw, abs_delta, n_permutations=1, seed=seed)
    significant = p_values < SIGNIFICANCE
    above = delta_low > 0
    below = delta_high < 0
    mean_of = _finite_mean
    summary = {
        "n_prompts": n_prompts,
        "spearman_normalized_vs_ablation": spearman(normalized, delta),
        "spearman_raw_vs_ablation": spearman(raw, delta),
        "spearman_normalized_vs_ablation_interval": _interval(boot_across_norm),
        "spearman_raw_vs_ablation_interval": _interval(boot_across_raw),
        "spearman_within_layers_mean": mean_of(within),
        "spearman_within_layers_mean_interval": _interval(boot_within),
        "spearman_within_layers": _nan_to_none(within),
        "spearman_within_layers_p": _nan_to_none(p_values),
        "n_layers_significant": int(significant.sum()),
        "n_layers_expected_by_chance": SIGNIFICANCE * int(np.isfinite(p_values).sum()),
        "spearman_raw_vs_abs_ablation": spearman(raw, abs_delta),
        "spearman_within_layers_mean_abs": mean_of(within_abs),
        "spearman_first_order_signed": spearman(-signed_gradient, delta),
        "pearson_first_order_per_prompt": _pearson(-g.ravel(), d.ravel()),
        "n_heads_delta_above_noise": int((above | below).sum()),
        "n_heads_delta_raises_loss": int(above.sum()),
        "n_heads_delta_lowers_loss": int(below.sum()),
        "median_delta_interval_width": float(np.median(delta_high - delta_low)),
        "median_gradient_relative_interval_width": float(
            np.median((raw_high - raw_low) / np.where(raw > 0, raw, np.nan))
        ),
        "fraction_ablation_raises_loss": float((delta > 0).mean()),
        "top_gradient_normalized": _top_heads(normalized),
        "top_gradient_raw": _top_heads(raw),
        "top_ablation": _top_heads(delta),
    }
    return {
        "raw": raw,
        "normalized": normalized,
        "delta": delta,
        "abs_delta": abs_delta,
        "signed_gradient": signed_gradient,
        "delta_low": delta_low,
        "delta_high": delta_high,
        "raw_low": raw_low,
        "raw_high": raw_high,
        "summary": summary,
    }


@contextlib.contextmanager
def _quiet_nanmean() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float((a**2).sum() * (b**2).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


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
    ablation: str = "zero",
    prompt_set: str = "prose",
    n_prompts: int = 24,
    reference_set: str = "prose",
    reference_prompts: int = 32,
    flag_fraction: float = 0.2,
    n_bootstrap: int = 1000,
) -> HeadTable:
    """Gradient importance (the score) and the single-head ablation loss increase of every head.

    ``ablation``: "zero" (default, protocol michel2019: what the gradient
    estimates) or "mean" (protocol headscope-mean: the pooled mean over the
    first ``reference_prompts`` of ``reference_set``). Evaluated on
    ``n_prompts`` of ``prompt_set``; when it is also the reference set, on
    prompts ``[reference_prompts, reference_prompts + n_prompts)`` whichever
    the ablation, so that zero and mean are measured on the same prompts and
    the loss never on the prompts that gave the means. Flags the top
    ``flag_fraction`` of heads by normalized gradient importance (ties broken
    by order). Bootstrap intervals: ``n_bootstrap`` resamples of the prompts
    (seed 0). ``stats_by_set`` is not used (the experiment runs the model
    itself). ``on_progress`` reports the gradient pass (prompts) and the
    ablations (head-prompt pairs).
    """
    del stats_by_set
    _require_causal(handle)
    _check_ablation(ablation)
    if n_prompts < 2 or reference_prompts < 1:
        raise HeadscopeError(
            f"n_prompts must be at least 2 (for the bootstrap) and reference_prompts at least 1, "
            f"got {n_prompts} and {reference_prompts}"
        )
    if not 0 < flag_fraction <= 1:
        raise HeadscopeError(f"flag_fraction must be in (0, 1], got {flag_fraction}")
    if n_bootstrap < 100:
        raise HeadscopeError(f"n_bootstrap must be at least 100, got {n_bootstrap}")
    prompts, start = _evaluation_prompts(
        handle, prompt_set, n_prompts, reference_set, reference_prompts
    )
    gradients = prompt_gradients(handle, prompts, batch_size=batch_size, on_progress=on_progress)
    deltas, base = prompt_ablation_deltas(
        handle, prompts, ablation=ablation, reference_set=reference_set,
        reference_prompts=reference_prompts, batch_size=batch_size, on_progress=on_progress,
    )  # fmt: skip
    found = compare_importance(gradients, deltas, n_bootstrap=n_bootstrap)
    raw, normalized, delta = found["raw"], found["normalized"], found["delta"]
    rank_gradient = _descending_ranks(normalized)
    rank_ablation = _descending_ranks(delta)
    n_flagged = max(1, round(flag_fraction * normalized.size))
    flagged = np.zeros(normalized.size, dtype=bool)
    flagged[np.argsort(-normalized.ravel(), kind="stable")[:n_flagged]] = True
    evidence = [
        {
            "gradient_raw": float(raw[layer, head]),
            "gradient_raw_interval": [
                float(found["raw_low"][layer, head]), float(found["raw_high"][layer, head])
            ],
            "gradient_normalized": float(normalized[layer, head]),
            "gradient_signed": float(found["signed_gradient"][layer, head]),
            "ablation_delta_loss": float(delta[layer, head]),
            "ablation_delta_interval": [
                float(found["delta_low"][layer, head]), float(found["delta_high"][layer, head])
            ],
            "ablation_abs_delta": float(found["abs_delta"][layer, head]),
            "delta_above_noise": bool(
                found["delta_low"][layer, head] > 0 or found["delta_high"][layer, head] < 0
            ),
            "rank_gradient": int(rank_gradient[layer, head]),
            "rank_ablation": int(rank_ablation[layer, head]),
        }
        for layer in range(raw.shape[0])
        for head in range(raw.shape[1])
    ]  # fmt: skip
    protocol, note = ABLATIONS[ablation]
    return HeadTable.from_matrix(
        normalized,
        flagged.reshape(normalized.shape),
        evidence,
        prompt_set=prompts.name,
        params={
            "protocol": protocol,
            "protocol_note": note,
            "ablation": ablation,
            "n_prompts": n_prompts,
            "evaluated_prompts": [start, start + n_prompts],
            "reference_set": reference_set,
            "reference_prompts": reference_prompts,
            "flag_fraction": flag_fraction,
            "n_bootstrap": n_bootstrap,
            "confidence": CONFIDENCE,
            "score": "E_x |dL(x)/d gate_h|, divided by the l2 norm of its layer (Michel et al.)",
        },
        summary={
            "base_loss": float(base.mean()),
            "n_target_tokens": int(sum(length - 1 for length in prompts.lengths)),
            **found["summary"],
            "n_flagged": n_flagged,
        },
        description="normalized gradient importance E|dL/d gate_h| (Michel et al. 2019)",
    )
