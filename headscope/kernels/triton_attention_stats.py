"""Triton kernels for per-head attention statistics, in two passes over Q and K.

What: ``triton_attention_stats`` returns the same ``AttentionStats`` as
``reference_attention_stats`` (masking rules, fully masked rows, GQA and query
positions are defined in ``attention_stats.py``), in float32, on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).

Why: the streaming probe runs the model with a fast attention and wants
statistics of every head at long T. Materializing A costs T² memory per head;
these kernels keep only O(T) per head and never write a score to memory.

Algorithm (docs/methods.md, "streaming_statistics"):
- Pass 1, one program per (batch·head, block of query rows), walks the key blocks
  with an online softmax: running max m, l = Σ exp(s − m), u = Σ exp(s − m)(s − m)
  for the entropy, and sink and distance sums Σ exp(s − m)·[j < sink_width] and
  Σ exp(s − m)·|pos_i − j| (accumulated directly, never as pos_i − Σ A j). When m
  moves by δ = m_old − m_new ≤ 0, with α = exp(δ): u ← α(u + δ·l) and l, the sink and
  distance sums ← α·(sum). At the end lse = m + log l, entropy = log l − u/l,
  max_prob = 1/l and the two sums are divided by l. Causal programs stop at the key
  block holding the last visible key; sliding-window programs start at the first.
  With ``keep_first`` k (window attention with attention sinks) a program first walks
  the blocks of keys j < k that its window range misses (masked to those keys, so no
  key is counted twice), then its window range; when the two ranges touch they are
  walked as one.
- Pass 2, one program per (batch·head, block of keys), walks the query blocks that
  can see the block (causal and window bounds; a key block holding a key j < k drops
  the window bounds, since every row that causally reaches j sees it), recomputes the
  scores and sums exp(s − lse_i) over queries with pass 1's lse: attention received,
  with no atomics, so the result does not depend on scheduling. ``received_per_kv``
  sums the query heads of each KV head afterwards in torch.
- GQA is native: the program of query head h reads K of KV head h // group by
  pointer arithmetic; K is never repeated.
- Masked scores are set to a finite ``MASKED`` (−1e30) and their weights to exactly
  0 with ``tl.where``, so no 0·(−inf) arises; a row that sees no key ends with l = 0
  and is written as lse = −inf with every other statistic 0.
- Everything is computed in float32. fp16/bf16 inputs are upcast before ``tl.dot``
  under the interpreter (its bf16 dot is wrong); on CUDA they stay 16-bit in the dot,
  whose products are exact in float32 and accumulated in float32, and float32 inputs
  use ``input_precision="ieee"`` (no tf32 rounding of the scores).
- The launcher passes the key padding mask as an int8 [batch, key_pos] tensor and
  the options as constexpr flags (causal, window, padding, dropping padded queries,
  always-visible first keys; their count k itself is a runtime argument),
  so each combination compiles without the masking it does not use. Blocks are
  fixed, no autotuning: 64 x 64 on CUDA (32 x 32 for d_head > 128), 32 x 32 under
  the interpreter; d_head is padded to a power of two ≥ 16 by masked loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from headscope.errors import HeadscopeError
from headscope.kernels.attention_stats import MASKED, AttentionStats, check_inputs

# Read once, as the @triton.jit decorators below were: they chose the interpreter or not.
INTERPRETING = bool(triton.knobs.runtime.interpret)
# Compiled kernels may read module globals only when they are constexpr.
MASKED_SCORE = tl.constexpr(MASKED)


@triton.jit
def live_query_rows(rows, b, pad_ptr, stride_pad_b, t_q, DROP_PADDED_QUERIES: tl.constexpr):
    """Query rows that exist and, in self-attention with padding, are real tokens."""
    live = rows < t_q
    if DROP_PADDED_QUERIES:
        real = tl.load(pad_ptr + b * stride_pad_b + rows, mask=live, other=0)
        live = live & (real != 0)
    return live


@triton.jit
def visible_keys(
    rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window, keep_first,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
):  # fmt: skip
    """[rows, keys] mask of the (query, key) pairs the masking rules allow."""
    offset = (rows + (t_k - t_q))[:, None] - keys[None, :]  # pos_i − j
    visible = live_rows[:, None] & (keys < t_k)[None, :]
    if CAUSAL:
        visible = visible & (offset >= 0)
    if HAS_WINDOW:
        in_window = (offset < window) & (offset > -window)
        if KEEP_FIRST:  # the first keep_first keys escape the window
            in_window = in_window | (keys < keep_first)[None, :]
        visible = visible & in_window
    if HAS_PADDING:
        real = tl.load(pad_ptr + b * stride_pad_b + keys, mask=keys < t_k, other=0)
        visible = visible & (real != 0)[None, :]
    return visible


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, pad_ptr,
    lse_ptr, entropy_ptr, max_prob_ptr, sink_mass_ptr, mean_distance_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_pad_b,
    heads, group, t_q, t_k, d_head, scale, window, keep_first, sink_width,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
    DROP_PADDED_QUERIES: tl.constexpr, KEEP_FIRST: tl.constexpr, UPCAST_FOR_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 1: per query row, online softmax over key blocks -> lse and row statistics."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    live_rows = live_query_rows(rows, b, pad_ptr, stride_pad_b, t_q, DROP_PADDED_QUERIES)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // group).to(tl.int64) * stride_kh
    q_mask = (rows < t_q)[:, None] & (dims < d_head)[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST_FOR_DOT:
        q = q.to(tl.float32)

    # Keys any row of this block may see: causal ends at the last row's position,
    # a window starts W − 1 before the first row's position (and ends W − 1 after).
    first_pos = row_block * BLOCK_M + (t_k - t_q)
    last_pos = tl.minimum(row_block * BLOCK_M + BLOCK_M, t_q) - 1 + (t_k - t_q)
    key_lo = first_pos * 0
    key_hi = t_k + key_lo
    if CAUSAL:
        key_hi = tl.minimum(key_hi, last_pos + 1)
    first_hi = key_lo  # always-visible first keys [0, first_hi) below the window range
    if HAS_WINDOW:
        reach_hi = key_hi  # what the causal rule leaves to the block
        key_lo = tl.maximum(key_lo, first_pos - window + 1)
        key_hi = tl.minimum(key_hi, last_pos + window)
        if KEEP_FIRST:
            first_hi = tl.minimum(reach_hi, keep_first)
            touching = first_hi >= key_lo  # then [0, first_hi) ∪ [key_lo, key_hi) is one range
            key_hi = tl.where(touching, tl.maximum(key_hi, first_hi), key_hi)
            key_lo = tl.where(touching, 0, key_lo)
            first_hi = tl.where(touching, 0, first_hi)
    first_blocks = tl.cdiv(first_hi, BLOCK_N)
    n_blocks = first_blocks + tl.cdiv(tl.maximum(key_hi - key_lo, 0), BLOCK_N)

    positions = (rows + (t_k - t_q))[:, None]
    row_max = tl.full([BLOCK_M], MASKED_SCORE, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)  # l
    centred_total = tl.zeros([BLOCK_M], tl.float32)  # u
    sink_total = tl.zeros([BLOCK_M], tl.float32)
    distance_total = tl.zeros([BLOCK_M], tl.float32)
    for block in range(0, n_blocks):
        start = key_lo + block * BLOCK_N
        if KEEP_FIRST:  # blocks < first_blocks walk [0, first_hi), the rest the window range
            near_start = key_lo + (block - first_blocks) * BLOCK_N
            start = tl.where(block < first_blocks, block * BLOCK_N, near_start)
        keys = start + tl.arange(0, BLOCK_N)
        k_mask = (keys < t_k)[:, None] & (dims < d_head)[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kt + dims[None, :], mask=k_mask, other=0.0)
        if UPCAST_FOR_DOT:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = visible_keys(
            rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window, keep_first,
            CAUSAL, HAS_WINDOW, HAS_PADDING, KEEP_FIRST,
        )  # fmt: skip
        if KEEP_FIRST:  # keys ≥ first_hi of the last first-keys block are the window's
            visible = visible & ((keys < first_hi) | (block >= first_blocks))[None, :]
        scores = tl.where(visible, scores, MASKED_SCORE)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        shift = row_max - new_max  # δ ≤ 0
        rescale = tl.exp(shift)  # α
        centred = scores - new_max[:, None]  # ≤ 0 where visible, finite elsewhere
        weights = tl.where(visible, tl.exp(centred), 0.0)
        centred_total = rescale * (centred_total + shift * total) + tl.sum(
            weights * centred, axis=1
        )
        total = rescale * total + tl.sum(weights, axis=1)
        in_sink = keys[None, :] < sink_width
        sink_total = rescale * sink_total + tl.sum(tl.where(in_sink, weights, 0.0), axis=1)
        gaps = tl.abs(positions - keys[None, :]).to(tl.float32)
        distance_total = rescale * distance_total + tl.sum(weights * gaps, axis=1)
        row_max = new_max

    live = total > 0.0  # false exactly for rows that saw no key
    safe_total = tl.where(live, total, 1.0)
    inverse = tl.where(live, 1.0 / safe_total, 0.0)
    log_total = tl.log(safe_total)
    out = batch_head.to(tl.int64) * t_q + rows
    in_range = rows < t_q
    tl.store(lse_ptr + out, tl.where(live, row_max + log_total, float("-inf")), mask=in_range)
    entropy = tl.where(live, log_total - centred_total * inverse, 0.0)
    tl.store(entropy_ptr + out, entropy, mask=in_range)
    tl.store(max_prob_ptr + out, inverse, mask=in_range)
    tl.store(sink_mass_ptr + out, sink_total * inverse, mask=in_range)
    tl.store(mean_distance_ptr + out, distance_total * inverse, mask=in_range)


@triton.jit
def _received_kernel(
    q_ptr, k_ptr, pad_ptr, lse_ptr, received_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_pad_b,
    heads, group, t_q, t_k, d_head, scale, window, keep_first,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
    DROP_PADDED_QUERIES: tl.constexpr, KEEP_FIRST: tl.constexpr, UPCAST_FOR_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2: per key, Σ_i exp(s_ij − lse_i) over the query blocks that can see it."""
    key_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // group).to(tl.int64) * stride_kh
    k_mask = (keys < t_k)[:, None] & (dims < d_head)[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kt + dims[None, :], mask=k_mask, other=0.0)
    if UPCAST_FOR_DOT:
        k = k.to(tl.float32)

    # Query rows that may see a key of this block (row index = position − (T_k − T_q)):
    # causal starts at the first key, a window ends W − 1 after the last (and starts
    # W − 1 before the first).
    first_key = key_block * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, t_k) - 1
    row_lo = first_key * 0
    row_hi = t_q + row_lo
    if CAUSAL:
        row_lo = tl.maximum(row_lo, first_key - (t_k - t_q))
    if HAS_WINDOW:
        window_lo = tl.maximum(row_lo, first_key - window + 1 - (t_k - t_q))
        window_hi = tl.minimum(row_hi, last_key + window - (t_k - t_q))
        if KEEP_FIRST:  # a block holding a key j < keep_first: every row reaching j sees it
            near = first_key >= keep_first
            window_lo = tl.where(near, window_lo, row_lo)
            window_hi = tl.where(near, window_hi, row_hi)
        row_lo, row_hi = window_lo, window_hi

    received = tl.zeros([BLOCK_N], tl.float32)
    lse_base = lse_ptr + batch_head.to(tl.int64) * t_q
    for start in range(row_lo, row_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_base + rows, mask=rows < t_q, other=float("-inf"))
        live_rows = live_query_rows(rows, b, pad_ptr, stride_pad_b, t_q, DROP_PADDED_QUERIES)
        live_rows = live_rows & (lse > MASKED_SCORE)  # fully masked rows add nothing
        q_mask = (rows < t_q)[:, None] & (dims < d_head)[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :], mask=q_mask, other=0.0)
        if UPCAST_FOR_DOT:
            q = q.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = visible_keys(
            rows, keys, live_rows, b, pad_ptr, stride_pad_b, t_q, t_k, window, keep_first,
            CAUSAL, HAS_WINDOW, HAS_PADDING, KEEP_FIRST,
        )  # fmt: skip
        log_probs = tl.where(visible, scores - tl.where(live_rows, lse, 0.0)[:, None], MASKED_SCORE)
        received += tl.sum(tl.where(visible, tl.exp(log_probs), 0.0), axis=0)
    out = batch_head.to(tl.int64) * t_k + keys
    tl.store(received_ptr + out, received, mask=keys < t_k)


MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis, which counts batch x head


def choose_block_size(requested: int | None, default: int, name: str) -> int:
    size = requested or default
    if size < 16 or size & (size - 1):
        raise HeadscopeError(f"{name} must be a power of two of at least 16 (tl.dot), got {size}")
    return size


def triton_attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    sink_width: int = 1,
    keep_first: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
    pass2: bool = True,
) -> AttentionStats:
    """Statistics of ``softmax(q kᵀ · scale)`` per query row and key, without the matrix.

    Same arguments and result as ``reference_attention_stats``. ``block_m`` and
    ``block_n`` (query rows and keys per block, powers of two ≥ 16) override the
    defaults; the tests use them to cross block boundaries at small T.
    ``pass2=False`` skips pass 2 to time pass 1 alone: ``received`` and
    ``received_per_kv`` are then NaN, "not computed", never to be read as data.
    """
    batch, heads, kv_heads, t_q, t_k, d_head = check_inputs(
        q, k, key_padding_mask, window, sink_width, keep_first=keep_first
    )
    if not q.is_cuda and not INTERPRETING:
        raise HeadscopeError(
            "Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set before importing "
            "headscope.kernels.triton_attention_stats); use implementation='chunked' on CPU"
        )
    group = heads // kv_heads
    row_shape, device = (batch, heads, t_q), q.device
    stats = {
        name: torch.empty(row_shape, dtype=torch.float32, device=device)
        for name in ("lse", "entropy", "max_prob", "sink_mass", "mean_distance")
    }
    received = torch.zeros(batch, heads, t_k, dtype=torch.float32, device=device)
    if batch * heads * t_q == 0:  # nothing to launch: no rows, nothing received
        for name, value in stats.items():
            value.fill_(float("-inf") if name == "lse" else 0.0)
        per_kv = received.view(batch, kv_heads, group, t_k).sum(2)
        return AttentionStats(**stats, received=received, received_per_kv=per_kv)

    q, k = q.contiguous(), k.contiguous()
    has_padding = key_padding_mask is not None
    padding = (
        key_padding_mask.to(device=device, dtype=torch.int8).contiguous()
        if has_padding
        else torch.ones(batch, 1, dtype=torch.int8, device=device)  # never read
    )
    # |pos_i − j| < T_k always, so a wider window is no window, and stays in int32.
    window_size = min(window, t_k + 1) if window is not None else 0
    # keep_first matters only with a window, and k ≥ T_k keeps every key
    keep_count = min(keep_first, t_k) if window is not None else 0
    block_d = triton.next_power_of_2(max(16, d_head))
    default_block = 32 if INTERPRETING else (64 if block_d <= 128 else 32)
    block_m = choose_block_size(block_m, default_block, "block_m")
    block_n = choose_block_size(block_n, default_block, "block_n")
    flags = dict(
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_PADDING=has_padding,
        DROP_PADDED_QUERIES=has_padding and t_q == t_k, KEEP_FIRST=keep_count > 0,
        # fp16/bf16 products are exact in float32: on CUDA the dot keeps them 16-bit
        UPCAST_FOR_DOT=INTERPRETING or q.dtype not in (torch.float16, torch.bfloat16),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2,
    )  # fmt: skip
    strides = (*q.stride()[:3], *k.stride()[:3], padding.stride(0))
    sizes = (heads, group, t_q, t_k, d_head, float(scale), window_size, keep_count)

    batch_step = max(1, MAX_GRID_Y // heads)
    for first in range(0, batch, batch_step):  # one launch unless batch x head > 65535
        part = slice(first, first + batch_step)
        qs, ks, pads, rs = q[part], k[part], padding[part], received[part]
        out = {name: value[part] for name, value in stats.items()}
        grid_y = qs.shape[0] * heads
        _row_stats_kernel[(triton.cdiv(t_q, block_m), grid_y)](
            qs, ks, pads, out["lse"], out["entropy"], out["max_prob"], out["sink_mass"],
            out["mean_distance"], *strides, *sizes, sink_width, **flags,
        )  # fmt: skip
        if pass2:
            _received_kernel[(triton.cdiv(t_k, block_n), grid_y)](
                qs, ks, pads, out["lse"], rs, *strides, *sizes, **flags
            )
    if not pass2:
        received.fill_(float("nan"))
    return AttentionStats(
        **stats,
        received=received,
        received_per_kv=received.view(batch, kv_heads, group, t_k).sum(2),
    )
