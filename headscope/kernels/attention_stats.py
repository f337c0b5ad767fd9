"""Per-head attention statistics without keeping the T x T attention matrix.

Inputs are the attention's own Q [batch, head, query_pos, d_head] (RoPE already
applied) and K [batch, kv_head, key_pos, d_head]; GQA is native: query head h
reads KV head h // (head / kv_head), and K is never repeated.

Pass 1, per (batch, head, query row i), from the row's scores s_ij
(docs/methods.md, "streaming_statistics"):
``lse`` (log-sum-exp), ``entropy`` (nats), ``max_prob``, ``sink_mass``
(Σ_{j<sink_width} A_ij) and ``mean_distance`` (Σ_j A_ij |pos_i − j|).
Pass 2, per key j: ``received`` = Σ_i A_ij (column sums), per query head, and
``received_per_kv`` summed over the query heads sharing a KV head.

Masking rules, shared by every implementation:
- queries are the last ``query_pos`` positions of the keys (pos_i = i + T_k − T_q);
- ``causal``: key j is visible to query i when j ≤ pos_i;
- ``window`` W: only keys with pos_i − j < W (causal) or |pos_i − j| < W are visible;
- ``keep_first`` k (StreamingLLM's attention sinks, Xiao et al. 2023): with a window,
  keys j < k (key positions 0..k−1) stay visible however far outside the window they
  are, so query i sees {j < k} ∪ window; the causal rule (j ≤ pos_i) and key padding
  still apply to them. Without a window it changes nothing (every key in reach is
  visible already); k = 0 (the default) is the plain sliding window;
- ``key_padding_mask`` [batch, key_pos] (True = real token) hides padded keys, and
  for self-attention (T_q == T_k) also drops padded *queries*;
- a row that sees no key is "fully masked": lse = −inf, every other statistic 0,
  and it adds nothing to ``received``. No NaN anywhere.

Three implementations sit behind ``attention_stats``: ``reference_attention_stats``
(materializes everything in float64; tests only), ``chunked_attention_stats``
(CPU: query blocks, never more than block x visible keys of scores, fully
masked causal blocks skipped; it can also produce the attention output from the
same scores so a forward pays for QK^T once) and the Triton kernels of
``triton_attention_stats`` (CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.errors import HeadscopeError

PASS1_FIELDS = ("lse", "entropy", "max_prob", "sink_mass", "mean_distance")
MASKED = -1.0e30  # finite "minus infinity": exp() gives 0 and 0 * MASKED stays 0


@dataclass(frozen=True)
class AttentionStats:
    """Statistics of one attention call (float32 unless the reference made them)."""

    lse: Float[Tensor, "batch head query_pos"]
    entropy: Float[Tensor, "batch head query_pos"]
    max_prob: Float[Tensor, "batch head query_pos"]
    sink_mass: Float[Tensor, "batch head query_pos"]
    mean_distance: Float[Tensor, "batch head query_pos"]
    received: Float[Tensor, "batch head key_pos"]
    received_per_kv: Float[Tensor, "batch kv_head key_pos"]

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def check_inputs(
    q: Tensor,
    k: Tensor,
    key_padding_mask: Tensor | None,
    window: int | None,
    sink_width: int,
    v: Tensor | None = None,
    keep_first: int = 0,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes and dtypes; return (batch, heads, kv_heads, T_q, T_k, d_head)."""
    if q.dim() != 4 or k.dim() != 4:
        raise HeadscopeError(
            f"q must be [batch, head, query_pos, d_head] and k [batch, kv_head, key_pos, d_head]; "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    batch, heads, t_q, d_head = q.shape
    k_batch, kv_heads, t_k, k_d = k.shape
    if k_batch != batch or k_d != d_head:
        raise HeadscopeError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or d_head"
        )
    if heads % kv_heads:
        raise HeadscopeError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    if t_q > t_k:
        raise HeadscopeError(
            f"more queries ({t_q}) than keys ({t_k}): queries must be the last keys"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise HeadscopeError(
            f"unsupported dtype {q.dtype}; use float32, float16, bfloat16 or float64"
        )
    if k.dtype != q.dtype or k.device != q.device:
        raise HeadscopeError("q and k must share dtype and device")
    if key_padding_mask is not None and (
        key_padding_mask.shape != (batch, t_k) or key_padding_mask.dtype != torch.bool
    ):
        raise HeadscopeError(f"key_padding_mask must be bool [batch={batch}, key_pos={t_k}]")
    if window is not None and window < 1:
        raise HeadscopeError(f"window must be at least 1, got {window}")
    if sink_width < 0:
        raise HeadscopeError(f"sink_width must be non-negative, got {sink_width}")
    if keep_first < 0:
        raise HeadscopeError(f"keep_first must be non-negative (first keys kept), got {keep_first}")
    if v is not None and (v.shape[:3] != k.shape[:3] or v.dtype != q.dtype):
        raise HeadscopeError(
            f"v {tuple(v.shape)} must match k {tuple(k.shape)} in its first 3 dims"
        )
    return batch, heads, kv_heads, t_q, t_k, d_head


def visibility(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    window: int | None,
    keep_first: int = 0,
) -> Bool[Tensor, "query_pos key_pos"]:
    """Which (query, key) pairs the masking rules allow, ignoring padding."""
    offset = query_positions[:, None] - key_positions[None, :]
    visible = offset >= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    if window is not None:
        in_window = offset.abs() < window
        if keep_first > 0:  # attention sinks: the first keys escape the window
            in_window = in_window | (key_positions < keep_first)[None, :]
        visible = visible & in_window
    return visible


def query_validity(key_padding_mask: Tensor | None, t_q: int, t_k: int) -> Tensor | None:
    """Padded queries of self-attention (T_q == T_k) are dropped; None = all valid."""
    if key_padding_mask is None or t_q != t_k:
        return None
    return key_padding_mask


def reference_attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    sink_width: int = 1,
    keep_first: int = 0,
) -> AttentionStats:
    """Materialize the full attention matrix in float64 and read the statistics off it."""
    batch, heads, kv_heads, t_q, t_k, _ = check_inputs(
        q, k, key_padding_mask, window, sink_width, keep_first=keep_first
    )
    group = heads // kv_heads
    k_full = k.to(torch.float64).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(torch.float64), k_full) * scale
    query_pos = torch.arange(t_k - t_q, t_k, device=q.device)
    key_pos = torch.arange(t_k, device=q.device)
    visible = visibility(query_pos, key_pos, causal=causal, window=window, keep_first=keep_first)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    valid_rows = query_validity(key_padding_mask, t_q, t_k)
    if valid_rows is not None:
        visible = visible & valid_rows[:, None, :, None]
    visible = visible.expand(batch, heads, t_q, t_k)
    row_live = visible.any(-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(visible, torch.exp(scores - lse.unsqueeze(-1)), 0.0)
    log_probs = torch.where(probs > 0, probs.log(), 0.0)
    distance = (query_pos[:, None] - key_pos[None, :]).abs().to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    received = probs.sum(-2)
    return AttentionStats(
        lse=torch.where(row_live, lse, float("-inf")),
        entropy=-(probs * log_probs).sum(-1),
        max_prob=torch.where(row_live, probs.amax(-1), zero),
        sink_mass=probs[..., :sink_width].sum(-1),
        mean_distance=(probs * distance).sum(-1),
        received=received,
        received_per_kv=received.view(batch, kv_heads, group, t_k).sum(2),
    )


def _block_rows(batch: int, heads: int, t_k: int, max_block_elements: int) -> int:
    """Query rows per block: 64 (measured best on CPU: blocks small enough to stay
    in cache, large enough to amortize per-op overhead), fewer when one block of
    scores would exceed ``max_block_elements``, never fewer than 16."""
    rows = max_block_elements // max(1, batch * heads * t_k)
    return int(max(16, min(64, rows)))


def _buffers(
    workspace: dict[str, Tensor] | None, size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Two flat float32 buffers of at least ``size`` elements, reused when possible."""
    workspace = {} if workspace is None else workspace
    for name in ("scores", "weights"):
        current = workspace.get(name)
        if current is None or current.numel() < size or current.device != device:
            workspace[name] = torch.empty(size, dtype=torch.float32, device=device)
    return workspace["scores"], workspace["weights"]


def _key_block(tensor: Tensor, dim: int, first_hi: int, key_lo: int, key_hi: int) -> Tensor:
    """The block's keys along ``dim``: [0, first_hi) then [key_lo, key_hi) (a view if
    ``first_hi`` is 0)."""
    near = tensor.narrow(dim, key_lo, key_hi - key_lo)
    if not first_hi:
        return near
    return torch.cat((tensor.narrow(dim, 0, first_hi), near), dim)


def chunked_attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor | None = None,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    sink_width: int = 1,
    keep_first: int = 0,
    block_rows: int | None = None,
    max_block_elements: int = 1 << 23,
    workspace: dict[str, Tensor] | None = None,
) -> tuple[Tensor | None, AttentionStats]:
    """Statistics (and, given ``v``, the attention output) block of queries by block.

    For each block of query rows only the keys some row of the block can see
    are scored (causal and window trimming), as one [batch, kv_head, group,
    rows, keys] tensor: K and V are broadcast over the group, never copied.
    With ``window`` and ``keep_first`` the scored keys are the first
    ``keep_first`` keys (as far as the causal rule lets the block see them)
    followed by the block's window range; when the two ranges are apart, the
    first keys' scores are a second matmul into the first columns of the same
    block, so memory stays block x visible keys and K is still not copied.
    Returns ``(output or None, stats)``; the output is [batch, head, query_pos,
    d_v] in the input dtype, computed in float32 from the same probabilities
    (so it obeys the same mask, ``keep_first`` included).

    CPU cost is memory traffic over the score block, so the block lives in two
    buffers reused across blocks (no page faults from fresh allocations; pass
    the same ``workspace`` dict to reuse them across calls, e.g. layers), and
    the common case (causal, no padding, no window) masks only the block's
    diagonal square, where no row can be fully masked.
    """
    batch, heads, kv_heads, t_q, t_k, d_head = check_inputs(
        q, k, key_padding_mask, window, sink_width, v, keep_first=keep_first
    )
    group = heads // kv_heads
    device = q.device
    rows = block_rows or _block_rows(batch, heads, t_k, max_block_elements)
    # Queries laid out [b, kv, query, group, d]: a block of query rows of all the
    # heads sharing a KV head is one contiguous [rows * group, d] matrix, so
    # Q K^T and P V are plain batched matmuls with K and V neither copied nor
    # broadcast. Scores of a block are viewed as [b, kv, rows, group, keys].
    qf = (q.to(torch.float32) * scale).view(batch, kv_heads, group, t_q, d_head)
    qf = qf.permute(0, 1, 3, 2, 4).contiguous()
    kf = k.to(torch.float32)
    vf = v.to(torch.float32) if v is not None else None
    valid_rows = query_validity(key_padding_mask, t_q, t_k)
    simple = causal and key_padding_mask is None and window is None
    keep = keep_first if window is not None else 0  # no window: every key is in reach anyway
    layout = (batch, kv_heads, t_q, group)
    stats = {name: torch.zeros(layout, dtype=torch.float32, device=device) for name in PASS1_FIELDS}
    stats["lse"].fill_(float("-inf"))
    received = torch.zeros(batch, kv_heads, group, t_k, dtype=torch.float32, device=device)
    output = (
        torch.zeros(*layout, v.shape[-1], dtype=torch.float32, device=device)
        if v is not None
        else None
    )
    buffer_size = batch * heads * min(rows, t_q) * t_k
    score_buffer, weight_buffer = _buffers(workspace, buffer_size, device)
    above_diagonal = torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1)[:, None]
    offset = t_k - t_q
    all_key_pos = torch.arange(t_k, device=device)
    for start in range(0, t_q, rows):
        stop = min(t_q, start + rows)
        n_rows = stop - start
        first_pos, last_pos = start + offset, stop - 1 + offset
        reach_hi = last_pos + 1 if causal else t_k  # keys the causal rule leaves to the block
        key_lo = 0 if window is None else max(0, first_pos - window + 1)
        key_hi = reach_hi if window is None else min(reach_hi, last_pos + window)
        # Always-visible first keys [0, first_hi): scored apart only when they do not
        # touch the window range [key_lo, key_hi); otherwise the ranges merge.
        first_hi = min(keep, reach_hi)
        if first_hi >= key_lo:
            key_lo, key_hi, first_hi = 0, max(key_hi, first_hi), 0
        n_keys = first_hi + key_hi - key_lo
        if n_keys <= 0:
            continue
        query_pos = torch.arange(first_pos, last_pos + 1, device=device)
        key_pos = _key_block(all_key_pos, 0, first_hi, key_lo, key_hi)
        flat_shape = (batch, kv_heads, n_rows * group, n_keys)
        block_shape = (batch, kv_heads, n_rows, group, n_keys)
        flat_scores = score_buffer[: math.prod(flat_shape)].view(flat_shape)
        queries = qf[:, :, start:stop].reshape(batch, kv_heads, n_rows * group, d_head)
        near_keys = kf[:, :, key_lo:key_hi].transpose(-1, -2)
        if first_hi:  # two matmuls writing column ranges of the same block, K not copied
            first_keys = kf[:, :, :first_hi].transpose(-1, -2)
            torch.matmul(queries, first_keys, out=flat_scores[..., :first_hi])
            torch.matmul(queries, near_keys, out=flat_scores[..., first_hi:])
        else:
            torch.matmul(queries, near_keys, out=flat_scores)
        scores = flat_scores.view(block_shape)
        if simple:
            # keys after the block's first query: an upper triangle in the last n_rows columns
            diagonal = above_diagonal[:n_rows, :, :n_rows]
            scores[..., n_keys - n_rows :].masked_fill_(diagonal, MASKED)
            live = None
        else:
            visible = visibility(query_pos, key_pos, causal=causal, window=window, keep_first=keep)
            mask = ~visible[None, None, :, None, :]
            if key_padding_mask is not None:
                real = _key_block(key_padding_mask, 1, first_hi, key_lo, key_hi)
                mask = mask | ~real[:, None, None, None, :]
            if valid_rows is not None:
                mask = mask | ~valid_rows[:, None, start:stop, None, None]
            scores.masked_fill_(mask, MASKED)
        row_max = scores.amax(-1, keepdim=True)
        scores.sub_(row_max)  # ≤ 0 on visible keys, ≈ MASKED elsewhere
        weights = torch.exp(scores, out=weight_buffer[: scores.numel()].view(block_shape))
        row_max = row_max.squeeze(-1)  # [b, kv, rows, group]
        if not simple:
            live = row_max > MASKED / 2
            # a fully masked row has every score equal to its max: exp(0) = 1
            weights.masked_fill_(~live[..., None], 0.0)
        total = weights.sum(-1)
        if live is not None:
            total = torch.where(live, total, torch.ones_like(total))
        inv_total = 1.0 / total if live is None else torch.where(live, 1.0 / total, 0.0)
        centred = torch.linalg.vecdot(weights, scores)  # Σ e (s − m) ≤ 0
        flat_weights = weights.view(flat_shape)
        if causal:
            # |pos_i − j| = pos_i − j; measured from the block's last position,
            # so no large offsets cancel: Σ e (last − j) / l − (last − pos_i).
            from_last = (last_pos - key_pos).to(torch.float32)
            weighted = (flat_weights @ from_last).view(batch, kv_heads, n_rows, group)
            distance = weighted * inv_total - (last_pos - query_pos).float()[:, None]
        else:
            gaps = (query_pos[:, None] - key_pos[None, :]).abs().to(torch.float32)
            distance = (weights * gaps[:, None, :]).sum(-1) * inv_total
        # key_pos is increasing, so the keys j < sink_width are a prefix of the columns
        sink_cols = min(sink_width, first_hi) + min(max(0, sink_width - key_lo), key_hi - key_lo)
        lse = row_max + total.log()
        entropy = total.log() - centred * inv_total
        if live is not None:
            lse = torch.where(live, lse, float("-inf"))
            entropy = torch.where(live, entropy, 0.0)
            distance = torch.where(live, distance, 0.0)
        block = slice(start, stop)
        stats["lse"][:, :, block] = lse
        stats["entropy"][:, :, block] = entropy
        stats["max_prob"][:, :, block] = inv_total
        stats["mean_distance"][:, :, block] = distance
        probs = weights.mul_(inv_total[..., None])  # normalized in place
        stats["sink_mass"][:, :, block] = probs[..., :sink_cols].sum(-1)
        column_sums = probs.sum(2)
        received[..., key_lo:key_hi] += column_sums[..., first_hi:]
        if first_hi:
            received[..., :first_hi] += column_sums[..., :first_hi]
        if output is not None:
            flat_probs = probs.view(flat_shape)
            values = flat_probs[..., first_hi:] @ vf[:, :, key_lo:key_hi]
            if first_hi:
                values += flat_probs[..., :first_hi] @ vf[:, :, :first_hi]
            output[:, :, block] = values.view(batch, kv_heads, n_rows, group, -1)
    flat = {
        name: value.permute(0, 1, 3, 2).reshape(batch, heads, t_q) for name, value in stats.items()
    }
    result = AttentionStats(
        **flat,
        received=received.reshape(batch, heads, t_k),
        received_per_kv=received.sum(2),
    )
    if output is not None:
        output = output.permute(0, 1, 3, 2, 4).reshape(batch, heads, t_q, -1).to(q.dtype)
    return output, result


def attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    sink_width: int = 1,
    keep_first: int = 0,
    implementation: str = "auto",
) -> AttentionStats:
    """Dispatch: Triton on CUDA, chunked torch elsewhere ("reference" for tests)."""
    kwargs = dict(
        scale=scale, causal=causal, key_padding_mask=key_padding_mask, window=window,
        sink_width=sink_width, keep_first=keep_first,
    )  # fmt: skip
    if implementation == "auto":
        implementation = "triton" if q.is_cuda else "chunked"
    if implementation == "reference":
        return reference_attention_stats(q, k, **kwargs)
    if implementation == "chunked":
        return chunked_attention_stats(q, k, **kwargs)[1]
    if implementation == "triton":
        from headscope.kernels.triton_attention_stats import triton_attention_stats

        return triton_attention_stats(q, k, **kwargs)
    raise HeadscopeError(
        f"unknown implementation '{implementation}': auto, reference, chunked, triton"
    )
