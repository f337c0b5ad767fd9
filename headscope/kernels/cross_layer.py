"""Cross-layer attention similarity (EchoAtt-style layer redundancy), without T x T matrices.

What: for two layers a (the previous one) and b (this one), per batch, head h and
query row i, compare row i of head h's attention in layer a, A_i, with row i of
head h in layer b, B_i:
- ``cosine`` = Σ_j A_ij B_ij / (‖A_i‖₂ ‖B_i‖₂);
- ``js`` = Jensen–Shannon divergence in nats, ½ Σ_j A log(A/M) + ½ Σ_j B log(B/M) with
  M = (A + B)/2 and 0 log 0 = 0; it lies in [0, ln 2].
Why: layers whose maps echo the previous layer's (cosine near 1, js near 0) are
candidates for sharing attention or for removal; at long T neither map may be
materialized, so each implementation keeps O(block) memory.

Inputs are each layer's post-RoPE q [batch, head, query_pos, d_head] and
k [batch, kv_head, key_pos, d_head], as transformers' attention functions receive
them. Each layer has its own softmax scale, KV heads (GQA: head h reads KV head
h // (head / kv_head)), d_head and optional sliding window (Gemma 3 mixes local and
global layers); both share batch, heads, T, ``causal`` and ``key_padding_mask``. The
masking rules are those of ``attention_stats.py`` (``visibility``, ``query_validity``),
without ``keep_first``. ``valid`` [batch, query_pos] is False for padded queries of
self-attention and for rows that see no key in either layer; those rows give
cosine 0 and js 0.

Implementations: ``reference_cross_layer_similarity`` (float64, materializes both
maps; tests and short inputs), ``chunked_cross_layer_similarity`` (float32, query
blocks, CPU) and ``triton_cross_layer.triton_cross_layer_similarity`` (CUDA);
``cross_layer_similarity`` dispatches. ``similarity_from_patterns`` reads the same
metrics off full attention patterns (e.g. TransformerLens ``hook_pattern``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.errors import HeadscopeError
from headscope.kernels.attention_stats import MASKED, check_inputs, query_validity, visibility

LN2 = math.log(2.0)


@dataclass(frozen=True)
class CrossLayerSimilarity:
    """Per-row similarity of layer b's attention to layer a's (float32 unless reference)."""

    cosine: Float[Tensor, "batch head query_pos"]
    js: Float[Tensor, "batch head query_pos"]
    valid: Bool[Tensor, "batch query_pos"]


def check_pair(
    q_a: Tensor,
    k_a: Tensor,
    q_b: Tensor,
    k_b: Tensor,
    key_padding_mask: Tensor | None,
    window_a: int | None,
    window_b: int | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate both layers; return (batch, heads, kv_heads_a, kv_heads_b, T_q, T_k)."""
    shape_a = check_inputs(q_a, k_a, key_padding_mask, window_a, sink_width=0)
    shape_b = check_inputs(q_b, k_b, key_padding_mask, window_b, sink_width=0)
    batch, heads, kv_a, t_q, t_k, _ = shape_a
    batch_b, heads_b, kv_b, t_q_b, t_k_b, _ = shape_b
    if (batch, heads, t_q, t_k) != (batch_b, heads_b, t_q_b, t_k_b):
        raise HeadscopeError(
            "layers a and b must share batch, heads, query_pos and key_pos (kv heads and "
            f"d_head may differ); got q_a {tuple(q_a.shape)}, k_a {tuple(k_a.shape)}, "
            f"q_b {tuple(q_b.shape)}, k_b {tuple(k_b.shape)}"
        )
    if q_a.dtype != q_b.dtype or q_a.device != q_b.device:
        raise HeadscopeError(
            f"layers a and b must share dtype and device; got {q_a.dtype} on {q_a.device} "
            f"and {q_b.dtype} on {q_b.device}"
        )
    return batch, heads, kv_a, kv_b, t_q, t_k


def _sees_a_key(
    key_padding_mask: Tensor | None, batch: int, t_q: int, t_k: int, causal: bool,
    window: int | None, device: torch.device,
) -> Tensor:  # fmt: skip
    """[batch, query_pos]: rows with at least one visible key, from prefix counts (O(T))."""
    pos = torch.arange(t_k - t_q, t_k, device=device)
    hi = pos + 1 if causal else torch.full_like(pos, t_k)
    lo = torch.zeros_like(pos)
    if window is not None:
        hi = torch.minimum(hi, pos + window)
        lo = (pos - window + 1).clamp(min=0)
    if key_padding_mask is None:
        return (hi > lo).expand(batch, t_q)
    prefix = torch.zeros(batch, t_k + 1, dtype=torch.long, device=device)
    prefix[:, 1:] = key_padding_mask.long().cumsum(1)
    return prefix[:, hi] > prefix[:, lo]


def row_validity(
    key_padding_mask: Tensor | None, batch: int, t_q: int, t_k: int, causal: bool,
    window_a: int | None, window_b: int | None, device: torch.device,
) -> Tensor:  # fmt: skip
    """[batch, query_pos] rows that are real queries and see a key in both layers."""
    valid = _sees_a_key(key_padding_mask, batch, t_q, t_k, causal, window_a, device)
    valid = valid & _sees_a_key(key_padding_mask, batch, t_q, t_k, causal, window_b, device)
    dropped = query_validity(key_padding_mask, t_q, t_k)
    return valid & dropped if dropped is not None else valid.clone()


def _pattern_metrics(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine and JS over the last dim of two probability tensors (zero rows give 0)."""
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cosine = torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), 0.0)
    m = (a + b) / 2
    safe_m = torch.where(m > 0, m, 1.0)
    a_terms = torch.where(a > 0, a * (torch.where(a > 0, a, 1.0) / safe_m).log(), 0.0)
    b_terms = torch.where(b > 0, b * (torch.where(b > 0, b, 1.0) / safe_m).log(), 0.0)
    js = (0.5 * (a_terms + b_terms).sum(-1)).clamp(0.0, LN2)
    live = (a.sum(-1) > 0) & (b.sum(-1) > 0)
    return cosine, torch.where(live, js, 0.0)


def similarity_from_patterns(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    valid: Bool[Tensor, " query_pos"] | None = None,
) -> tuple[Float[Tensor, "layer_1 head query_pos"], Float[Tensor, "layer_1 head query_pos"]]:
    """Cosine and js of row i of layer l against layer l − 1, from full attention patterns.

    ``patterns`` holds probabilities (rows sum to 1, or 0 for masked rows) of one
    sequence; entry l of the results compares layer l + 1 with layer l. Rows where
    ``valid`` is False, or that are all zero in either layer, give 0. Computed in
    float64, returned as float32 (float64 for float64 input). Short inputs only.
    """
    if patterns.dim() != 4 or patterns.shape[-1] < patterns.shape[-2]:
        raise HeadscopeError(
            "patterns must be [layer, head, query_pos, key_pos] with query_pos ≤ key_pos; "
            f"got {tuple(patterns.shape)}"
        )
    if valid is not None and (valid.shape != patterns.shape[2:3] or valid.dtype != torch.bool):
        raise HeadscopeError(f"valid must be bool [query_pos={patterns.shape[2]}]")
    p = patterns.to(torch.float64)
    cosine, js = _pattern_metrics(p[:-1], p[1:])
    if valid is not None:
        cosine, js = (torch.where(valid, x, 0.0) for x in (cosine, js))
    out = torch.float64 if patterns.dtype == torch.float64 else torch.float32
    return cosine.to(out), js.to(out)


def _reference_probs(q, k, scale, visible) -> Tensor:
    """Float64 attention probabilities; rows with no visible key are all 0."""
    group = q.shape[1] // k.shape[1]
    k_full = k.to(torch.float64).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(torch.float64), k_full) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.where(visible, torch.exp(scores - lse), 0.0)


def reference_cross_layer_similarity(
    q_a: Tensor, k_a: Tensor, q_b: Tensor, k_b: Tensor, *, scale_a: float, scale_b: float,
    causal: bool = True, key_padding_mask: Tensor | None = None,
    window_a: int | None = None, window_b: int | None = None,
) -> CrossLayerSimilarity:  # fmt: skip
    """Materialize both attention maps in float64 and compare them row by row."""
    batch, heads, _, _, t_q, t_k = check_pair(
        q_a, k_a, q_b, k_b, key_padding_mask, window_a, window_b
    )
    query_pos = torch.arange(t_k - t_q, t_k, device=q_a.device)
    key_pos = torch.arange(t_k, device=q_a.device)
    shared = torch.ones(batch, 1, t_q, t_k, dtype=torch.bool, device=q_a.device)
    if key_padding_mask is not None:
        shared = shared & key_padding_mask[:, None, None, :]
    dropped = query_validity(key_padding_mask, t_q, t_k)
    if dropped is not None:
        shared = shared & dropped[:, None, :, None]
    visible_a = shared & visibility(query_pos, key_pos, causal=causal, window=window_a)
    visible_b = shared & visibility(query_pos, key_pos, causal=causal, window=window_b)
    a = _reference_probs(q_a, k_a, scale_a, visible_a)
    b = _reference_probs(q_b, k_b, scale_b, visible_b)
    cosine, js = _pattern_metrics(a, b)
    valid = (visible_a.any(-1) & visible_b.any(-1))[:, 0]
    keep = valid[:, None]
    return CrossLayerSimilarity(
        cosine=torch.where(keep, cosine, 0.0), js=torch.where(keep, js, 0.0), valid=valid
    )


def _key_range(first_pos: int, last_pos: int, reach_hi: int, window: int | None):
    """Keys [lo, hi) some row of the block may see in a layer with this window."""
    if window is None:
        return 0, reach_hi
    return max(0, first_pos - window + 1), min(reach_hi, last_pos + window)


def _block_log_probs(
    q: Tensor, k: Tensor, start: int, stop: int, lo: int, hi: int, key_lo: int, key_hi: int,
    mask: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(log probs, probs) [batch, head, rows, key_hi − key_lo] of one layer for one block.

    ``q`` is [batch, kv, group, query, d] (scaled), ``k`` [batch, kv, key, d]. Only
    the layer's own keys [lo, hi) are scored, as one matmul per KV head with the
    block's queries of the whole group stacked (K is neither copied nor repeated);
    ``mask`` (True = hidden) covers the block's key range [key_lo, key_hi).
    """
    batch, kv, group, _, d_head = q.shape
    n_rows = stop - start
    queries = q[:, :, :, start:stop].reshape(batch, kv, group * n_rows, d_head)
    scores = torch.full(
        (batch, kv, group * n_rows, key_hi - key_lo), MASKED, dtype=q.dtype, device=q.device
    )
    if hi > lo:
        own = scores[..., lo - key_lo : hi - key_lo]
        torch.matmul(queries, k[:, :, lo:hi].transpose(-1, -2), out=own)
    scores = scores.view(batch, kv * group, n_rows, key_hi - key_lo)
    scores.masked_fill_(mask, MASKED)
    scores.sub_(torch.logsumexp(scores, dim=-1, keepdim=True))  # log probs, ≈ MASKED if hidden
    return scores, torch.exp(scores).masked_fill_(mask, 0.0)


def chunked_cross_layer_similarity(
    q_a: Tensor, k_a: Tensor, q_b: Tensor, k_b: Tensor, *, scale_a: float, scale_b: float,
    causal: bool = True, key_padding_mask: Tensor | None = None,
    window_a: int | None = None, window_b: int | None = None,
    block_rows: int | None = None, max_block_elements: int = 1 << 22,
) -> CrossLayerSimilarity:  # fmt: skip
    """Float32, block of query rows by block: only the keys the block can see are scored.

    Each block holds a few float32 [batch, head, rows, keys] tensors per layer, with
    rows chosen so batch·head·rows·T_k ≤ ``max_block_elements`` (at least 1 row, at
    most 64), so memory is O(block), never T x T. JS is summed per key as
    ½ a (ln 2 − softplus(lb − la)) + ½ b (ln 2 − softplus(la − lb)) from the log
    probabilities la, lb: no entropies of size log T cancel, and no log(0) arises.
    """
    batch, heads, kv_a, kv_b, t_q, t_k = check_pair(
        q_a, k_a, q_b, k_b, key_padding_mask, window_a, window_b
    )
    device = q_a.device
    if block_rows is not None and block_rows < 1:
        raise HeadscopeError(f"block_rows must be at least 1, got {block_rows}")
    rows = block_rows or max(1, min(64, max_block_elements // max(1, batch * heads * t_k)))
    layers = []
    for q, k, kv, scale in ((q_a, k_a, kv_a, scale_a), (q_b, k_b, kv_b, scale_b)):
        qf = (q.to(torch.float32) * scale).view(batch, kv, heads // kv, t_q, q.shape[-1])
        layers.append((qf, k.to(torch.float32)))
    cosine = torch.zeros(batch, heads, t_q, dtype=torch.float32, device=device)
    js = torch.zeros_like(cosine)
    offset = t_k - t_q
    for start in range(0, t_q, rows):
        stop = min(t_q, start + rows)
        first_pos, last_pos = start + offset, stop - 1 + offset
        reach_hi = last_pos + 1 if causal else t_k
        lo_a, hi_a = _key_range(first_pos, last_pos, reach_hi, window_a)
        lo_b, hi_b = _key_range(first_pos, last_pos, reach_hi, window_b)
        key_lo, key_hi = min(lo_a, lo_b), max(hi_a, hi_b)
        if key_hi <= key_lo:
            continue
        query_pos = torch.arange(first_pos, last_pos + 1, device=device)
        key_pos = torch.arange(key_lo, key_hi, device=device)
        hidden = torch.zeros(1, 1, stop - start, key_hi - key_lo, dtype=torch.bool, device=device)
        if key_padding_mask is not None:
            hidden = hidden | ~key_padding_mask[:, None, None, key_lo:key_hi]
        log_probs, probs = [], []
        for (qf, kf), window, (lo, hi) in zip(
            layers, (window_a, window_b), ((lo_a, hi_a), (lo_b, hi_b)), strict=True
        ):
            seen = visibility(query_pos, key_pos, causal=causal, window=window)
            mask = hidden | ~seen
            la, pa = _block_log_probs(qf, kf, start, stop, lo, hi, key_lo, key_hi, mask)
            log_probs.append(la)
            probs.append(pa)
        (la, lb), (pa, pb) = log_probs, probs
        norms = (torch.linalg.vecdot(pa, pa) * torch.linalg.vecdot(pb, pb)).sqrt_()
        cos = torch.linalg.vecdot(pa, pb) / norms.clamp_min(1e-30)
        diff = la.sub_(lb)  # la − lb, ±~1e30 where one layer hides the key (finite)
        ln2_minus_r = diff.abs().neg_().exp_().log1p_().neg_().add_(LN2)  # ln 2 − log1p(e^−|d|)
        js_a = torch.linalg.vecdot(pa, ln2_minus_r - torch.relu(-diff))
        js_b = torch.linalg.vecdot(pb, ln2_minus_r.sub_(torch.relu(diff)))
        cosine[:, :, start:stop] = cos
        js[:, :, start:stop] = (0.5 * (js_a + js_b)).clamp_(0.0, LN2)
    # padded queries were scored like real ones: zeroed here with the keyless rows
    valid = row_validity(key_padding_mask, batch, t_q, t_k, causal, window_a, window_b, device)
    keep = valid[:, None]
    return CrossLayerSimilarity(
        cosine=torch.where(keep, cosine, 0.0), js=torch.where(keep, js, 0.0), valid=valid
    )


def cross_layer_similarity(
    q_a: Tensor, k_a: Tensor, q_b: Tensor, k_b: Tensor, *, scale_a: float, scale_b: float,
    causal: bool = True, key_padding_mask: Tensor | None = None,
    window_a: int | None = None, window_b: int | None = None, implementation: str = "auto",
) -> CrossLayerSimilarity:  # fmt: skip
    """Dispatch: Triton on CUDA, chunked torch elsewhere ("reference" for tests)."""
    kwargs = dict(
        scale_a=scale_a, scale_b=scale_b, causal=causal, key_padding_mask=key_padding_mask,
        window_a=window_a, window_b=window_b,
    )  # fmt: skip
    if implementation == "auto":
        implementation = "triton" if q_a.is_cuda else "chunked"
    if implementation == "reference":
        return reference_cross_layer_similarity(q_a, k_a, q_b, k_b, **kwargs)
    if implementation == "chunked":
        return chunked_cross_layer_similarity(q_a, k_a, q_b, k_b, **kwargs)
    if implementation == "triton":
        from headscope.kernels.triton_cross_layer import triton_cross_layer_similarity

        return triton_cross_layer_similarity(q_a, k_a, q_b, k_b, **kwargs)
    raise HeadscopeError(
        f"unknown implementation '{implementation}': auto, reference, chunked, triton"
    )
