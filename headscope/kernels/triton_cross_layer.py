"""Triton kernel for cross-layer attention similarity (cosine and JS per row), two passes.

What: ``triton_cross_layer_similarity`` returns the same ``CrossLayerSimilarity`` as
``reference_cross_layer_similarity`` (metrics, masking and ``valid`` are defined in
``cross_layer.py``), in float32, on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests run it).

Why: comparing every layer with the previous one at long T must not write either
attention map; this kernel keeps O(BLOCK_M) state per program and never stores a score.

Algorithm: one program per (batch·head, block of query rows), holding the block's
queries of both layers.
- Pass 1, once per layer, walks only that layer's key range (causal end, sliding
  window start and end) with an online softmax (running max m, l = Σ exp(s − m)),
  giving lse = m + log l; a row with l = 0 sees no key in that layer.
- Pass 2 walks the union of the two ranges again, recomputes both layers' scores
  and the exact probabilities a = exp(s_a − lse_a), b = exp(s_b − lse_b), and sums
  Σ ab, Σ a², Σ b² and the JS terms per key, from d = log a − log b and
  r = log(1 + e^−|d|): ½ a (ln 2 − r − max(−d, 0)) + ½ b (ln 2 − r − max(d, 0)),
  which is ½ a log(a/m) + ½ b log(b/m) with no log of 0 and no large entropies
  cancelling. Hidden scores are the finite ``MASKED`` and their probabilities exactly
  0 (``tl.where``), so d stays finite and a hidden key adds nothing.
- GQA is native: head h reads KV head h // group_a of layer a and h // group_b of
  layer b by pointer arithmetic; K is never repeated. d_head may differ per layer.
- Masking reuses ``visible_keys`` and ``live_query_rows`` of ``triton_attention_stats`` (causal,
  window per layer, key padding, padded queries of self-attention dropped), with
  constexpr flags so a launch compiles only the masking it uses.
- float32 throughout; as in ``triton_attention_stats``, inputs are upcast before
  ``tl.dot`` under the interpreter (its bf16 dot is wrong) and float32 dots use
  ``input_precision="ieee"``. Blocks: 64 x 64 on CUDA (32 for d_head > 128), 32 x 32
  under the interpreter; d_head is padded to a power of two ≥ 16 by masked loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from headscope.errors import HeadscopeError
from headscope.kernels.cross_layer import CrossLayerSimilarity, check_pair, row_validity
from headscope.kernels.triton_attention_stats import (
    INTERPRETING,
    MASKED_SCORE,
    MAX_GRID_Y,
    choose_block_size,
    live_query_rows,
    visible_keys,
)

LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _key_range(first_pos, last_pos, t_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [lo, hi) some row of the block may see in a layer."""
    lo = first_pos * 0
    hi = t_k + lo
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
        hi = tl.minimum(hi, last_pos + window)
    return lo, hi


@triton.jit
def _scores(q, k_base, stride_kt, keys, dims, t_k, d_head, scale, UPCAST_FOR_DOT: tl.constexpr):
    """[rows, keys] scores of one layer for one block of keys."""
    k_mask = (keys < t_k)[:, None] & (dims < d_head)[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kt + dims[None, :], mask=k_mask, other=0.0)
    if UPCAST_FOR_DOT:
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision="ieee") * scale


@triton.jit
def _row_lse(
    q, k_base, stride_kt, rows, live_rows, dims, b, pad_ptr, stride_pad_b,
    t_q, t_k, d_head, scale, window, key_lo, key_hi,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
    UPCAST_FOR_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Pass 1 for one layer: online softmax over [key_lo, key_hi) -> (lse, row sees a key)."""
    row_max = tl.full([BLOCK_M], MASKED_SCORE, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        scores = _scores(q, k_base, stride_kt, keys, dims, t_k, d_head, scale, UPCAST_FOR_DOT)
        visible = visible_keys(
            rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window, 0,
            CAUSAL, HAS_WINDOW, HAS_PADDING, False,
        )  # fmt: skip
        scores = tl.where(visible, scores, MASKED_SCORE)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        weights = tl.where(visible, tl.exp(scores - new_max[:, None]), 0.0)
        total = total * tl.exp(row_max - new_max) + tl.sum(weights, axis=1)
        row_max = new_max
    live = total > 0.0
    lse = tl.where(live, row_max + tl.log(tl.where(live, total, 1.0)), 0.0)
    return lse, live


@triton.jit
def _cross_layer_kernel(
    qa_ptr, ka_ptr, qb_ptr, kb_ptr, pad_ptr, cosine_ptr, js_ptr,
    stride_qab, stride_qah, stride_qat, stride_kab, stride_kah, stride_kat,
    stride_qbb, stride_qbh, stride_qbt, stride_kbb, stride_kbh, stride_kbt, stride_pad_b,
    heads, group_a, group_b, t_q, t_k, d_a, d_b, scale_a, scale_b, window_a, window_b,
    CAUSAL: tl.constexpr, HAS_WINDOW_A: tl.constexpr, HAS_WINDOW_B: tl.constexpr,
    HAS_PADDING: tl.constexpr, DROP_PADDED_QUERIES: tl.constexpr, UPCAST_FOR_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
):  # fmt: skip
    """Per query row: lse of both layers (pass 1), then cosine and JS of a vs b (pass 2)."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims_a = tl.arange(0, BLOCK_DA)
    dims_b = tl.arange(0, BLOCK_DB)
    live_rows = live_query_rows(rows, b, pad_ptr, stride_pad_b, t_q, DROP_PADDED_QUERIES)
    in_range = rows < t_q
    qa_base = qa_ptr + b.to(tl.int64) * stride_qab + h.to(tl.int64) * stride_qah
    qb_base = qb_ptr + b.to(tl.int64) * stride_qbb + h.to(tl.int64) * stride_qbh
    ka_base = ka_ptr + b.to(tl.int64) * stride_kab + (h // group_a).to(tl.int64) * stride_kah
    kb_base = kb_ptr + b.to(tl.int64) * stride_kbb + (h // group_b).to(tl.int64) * stride_kbh
    qa_mask = in_range[:, None] & (dims_a < d_a)[None, :]
    qb_mask = in_range[:, None] & (dims_b < d_b)[None, :]
    qa = tl.load(qa_base + rows[:, None] * stride_qat + dims_a[None, :], mask=qa_mask, other=0.0)
    qb = tl.load(qb_base + rows[:, None] * stride_qbt + dims_b[None, :], mask=qb_mask, other=0.0)
    if UPCAST_FOR_DOT:
        qa = qa.to(tl.float32)
        qb = qb.to(tl.float32)

    first_pos = row_block * BLOCK_M + (t_k - t_q)
    last_pos = tl.minimum(row_block * BLOCK_M + BLOCK_M, t_q) - 1 + (t_k - t_q)
    lo_a, hi_a = _key_range(first_pos, last_pos, t_k, window_a, CAUSAL, HAS_WINDOW_A)
    lo_b, hi_b = _key_range(first_pos, last_pos, t_k, window_b, CAUSAL, HAS_WINDOW_B)
    lse_a, live_a = _row_lse(
        qa, ka_base, stride_kat, rows, live_rows, dims_a, b, pad_ptr, stride_pad_b,
        t_q, t_k, d_a, scale_a, window_a, lo_a, hi_a,
        CAUSAL, HAS_WINDOW_A, HAS_PADDING, UPCAST_FOR_DOT, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    lse_b, live_b = _row_lse(
        qb, kb_base, stride_kbt, rows, live_rows, dims_b, b, pad_ptr, stride_pad_b,
        t_q, t_k, d_b, scale_b, window_b, lo_b, hi_b,
        CAUSAL, HAS_WINDOW_B, HAS_PADDING, UPCAST_FOR_DOT, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    products = tl.zeros([BLOCK_M], tl.float32)  # Σ ab
    squares_a = tl.zeros([BLOCK_M], tl.float32)  # Σ a²
    squares_b = tl.zeros([BLOCK_M], tl.float32)  # Σ b²
    js = tl.zeros([BLOCK_M], tl.float32)
    for start in range(tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        scores_a = _scores(qa, ka_base, stride_kat, keys, dims_a, t_k, d_a, scale_a, UPCAST_FOR_DOT)
        scores_b = _scores(qb, kb_base, stride_kbt, keys, dims_b, t_k, d_b, scale_b, UPCAST_FOR_DOT)
        visible_a = visible_keys(
            rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window_a, 0,
            CAUSAL, HAS_WINDOW_A, HAS_PADDING, False,
        )  # fmt: skip
        visible_b = visible_keys(
            rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window_b, 0,
            CAUSAL, HAS_WINDOW_B, HAS_PADDING, False,
        )  # fmt: skip
        log_a = tl.where(visible_a, scores_a - lse_a[:, None], MASKED_SCORE)
        log_b = tl.where(visible_b, scores_b - lse_b[:, None], MASKED_SCORE)
        a = tl.where(visible_a, tl.exp(log_a), 0.0)
        b_probs = tl.where(visible_b, tl.exp(log_b), 0.0)
        products += tl.sum(a * b_probs, axis=1)
        squares_a += tl.sum(a * a, axis=1)
        squares_b += tl.sum(b_probs * b_probs, axis=1)
        diff = log_a - log_b  # finite: both lie in [MASKED, ~0]
        shared = LN2 - tl.log(1.0 + tl.exp(-tl.abs(diff)))  # ln 2 − log(1 + e^−|d|)
        terms = a * (shared - tl.maximum(-diff, 0.0)) + b_probs * (shared - tl.maximum(diff, 0.0))
        js += 0.5 * tl.sum(terms, axis=1)

    live = live_a & live_b
    norms = tl.sqrt(squares_a * squares_b)
    cosine = tl.where(live, products / tl.where(live, norms, 1.0), 0.0)
    js = tl.where(live, tl.minimum(tl.maximum(js, 0.0), LN2), 0.0)
    out = batch_head.to(tl.int64) * t_q + rows
    tl.store(cosine_ptr + out, cosine, mask=in_range)
    tl.store(js_ptr + out, js, mask=in_range)


def triton_cross_layer_similarity(
    q_a: Tensor, k_a: Tensor, q_b: Tensor, k_b: Tensor, *, scale_a: float, scale_b: float,
    causal: bool = True, key_padding_mask: Tensor | None = None,
    window_a: int | None = None, window_b: int | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> CrossLayerSimilarity:  # fmt: skip
    """Cosine and JS of layer b's attention rows against layer a's, without the maps.

    Same arguments and result as ``chunked_cross_layer_similarity``; ``block_m`` and
    ``block_n`` (query rows and keys per block, powers of two ≥ 16) override the
    defaults, so tests cross block boundaries at small T.
    """
    batch, heads, kv_a, kv_b, t_q, t_k = check_pair(
        q_a, k_a, q_b, k_b, key_padding_mask, window_a, window_b
    )
    if not q_a.is_cuda and not INTERPRETING:
        raise HeadscopeError(
            "Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set before importing "
            "headscope.kernels.triton_cross_layer); use implementation='chunked' on CPU"
        )
    device = q_a.device
    cosine = torch.zeros(batch, heads, t_q, dtype=torch.float32, device=device)
    js = torch.zeros_like(cosine)
    valid = row_validity(key_padding_mask, batch, t_q, t_k, causal, window_a, window_b, device)
    if batch * heads * t_q == 0:
        return CrossLayerSimilarity(cosine=cosine, js=js, valid=valid)

    q_a, k_a, q_b, k_b = (x.contiguous() for x in (q_a, k_a, q_b, k_b))
    has_padding = key_padding_mask is not None
    padding = (
        key_padding_mask.to(device=device, dtype=torch.int8).contiguous()
        if has_padding
        else torch.ones(batch, 1, dtype=torch.int8, device=device)  # never read
    )
    d_a, d_b = q_a.shape[-1], q_b.shape[-1]
    block_da = triton.next_power_of_2(max(16, d_a))
    block_db = triton.next_power_of_2(max(16, d_b))
    default_block = 32 if INTERPRETING else (64 if max(block_da, block_db) <= 128 else 32)
    block_m = choose_block_size(block_m, default_block, "block_m")
    block_n = choose_block_size(block_n, default_block, "block_n")
    flags = dict(
        CAUSAL=bool(causal), HAS_WINDOW_A=window_a is not None, HAS_WINDOW_B=window_b is not None,
        HAS_PADDING=has_padding, DROP_PADDED_QUERIES=has_padding and t_q == t_k,
        UPCAST_FOR_DOT=INTERPRETING or q_a.dtype not in (torch.float16, torch.bfloat16),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DA=block_da, BLOCK_DB=block_db,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    # |pos_i − j| < T_k always, so a wider window is no window, and stays in int32.
    windows = tuple(min(w, t_k + 1) if w is not None else 0 for w in (window_a, window_b))
    sizes = (heads, heads // kv_a, heads // kv_b, t_q, t_k, d_a, d_b, float(scale_a))
    sizes = (*sizes, float(scale_b), *windows)
    batch_step = max(1, MAX_GRID_Y // heads)
    for first in range(0, batch, batch_step):  # one launch unless batch x head > 65535
        part = slice(first, first + batch_step)
        tensors = (q_a[part], k_a[part], q_b[part], k_b[part], padding[part])
        strides = (*q_a.stride()[:3], *k_a.stride()[:3], *q_b.stride()[:3], *k_b.stride()[:3])
        grid = (triton.cdiv(t_q, block_m), tensors[0].shape[0] * heads)
        _cross_layer_kernel[grid](
            *tensors, cosine[part], js[part], *strides, padding.stride(0), *sizes, **flags
        )
    return CrossLayerSimilarity(cosine=cosine, js=js, valid=valid)
