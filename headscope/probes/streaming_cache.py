"""StreamingLLM's rolling cache as one forward, with the cache's own positions.

StreamingLLM (Xiao et al.) keeps a fixed cache: the first ``n_sinks`` tokens
plus the most recent ``cache_size - n_sinks`` ones, and assigns positions by
slot *inside the cache*: once the cache is full, the query sits at cache
position ``P = cache_size - 1`` and sink j at position j, whatever their
distance in the text. Past a model's trained context this is the whole point:
no query ever sees a relative distance above ``cache_size``.

With RoPE, a score depends only on the relative distance between query and
key, so the cache can be run as one causal forward over the whole text:

- a recent key j (t - j < cache_size - n_sinks) has the same distance in the
  cache as in the text, so its score is the ordinary one;
- a sink key j (j < n_sinks, outside the recent window) is at distance
  ``min(t, P) - j`` in the cache: its score uses the query rotated back by
  ``min(0, P - t)`` positions (rotations compose: R(P - t) R(t) q = R(P) q).

Each token's keys and values at every layer are those it computed as a query,
under its own view at that time, exactly as a cache stores them. A plain
rolling window (``n_sinks = 0``) and full attention (no cache) run through the
same code, so the three perplexities differ only in what each query sees.

Memory is linear in T: the cache runs take one block of queries against the
cache's keys at a time, and full attention is torch's causal SDPA (a flash
kernel on CPU too, with no mask tensor): no T x T tensor exists.
``sink_attention`` accumulates, per layer and head, the attention the
queries from ``count_from`` on give to the sink keys.

Supported: models whose attention modules apply RoPE with Hugging Face's
``rotate_half`` convention (Llama, Gemma 3, Qwen, Mistral) and route through
``AttentionInterface``. Layers with a sliding window of their own (Gemma 3's
local layers) keep it, as in ``headscope.probes.streaming``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.streaming import using_attention

ATTENTION_NAME = "headscope_streaming_cache"
#: queries per block: bounds the scores to block x (window or T) per head
QUERY_BLOCK = 256


@dataclass(kw_only=True)
class CacheView:
    """What each query sees. ``cache_size`` None: full attention (no cache)."""

    cache_size: int | None = None
    n_sinks: int = 0

    def __post_init__(self) -> None:
        if self.cache_size is not None:
            if self.cache_size < 2:
                raise HeadscopeError(f"cache_size must be at least 2, got {self.cache_size}")
            if not 0 <= self.n_sinks < self.cache_size - 1:
                raise HeadscopeError(
                    f"n_sinks ({self.n_sinks}) must be in [0, cache_size - 1 = "
                    f"{self.cache_size - 1})"
                )
        elif self.n_sinks:
            raise HeadscopeError("sink tokens need a cache; give cache_size")

    @property
    def recent(self) -> int | None:
        """Recent keys each query sees (itself included), or None for all."""
        return None if self.cache_size is None else self.cache_size - self.n_sinks


@dataclass(kw_only=True)
class _Session:
    view: CacheView
    inv_freq: Tensor
    n_layers: int
    n_heads: int
    count_from: int
    sink_attention: Tensor = field(init=False)
    layers_seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sink_attention = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "headscope_streaming_cache", default=None
)


def rotate(x: Tensor, offsets: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate RoPE'd vectors ``x`` [..., T, d] further by ``offsets`` [T] positions.

    Hugging Face's convention (``rotate_half``): dimension i and i + d/2 form
    a plane turned by angle position x inv_freq[i].
    """
    angles = offsets.to(inv_freq.dtype)[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def _cache_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: each query sees what the active CacheView gives it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session = _ACTIVE.get()
    if session is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if softcap is not None:
        raise NotApplicable("attention logit soft-capping is not supported by the cache probe")
    if query.shape[0] != 1:
        raise HeadscopeError("the streaming-cache probe runs one unpadded text per forward")
    layer = getattr(module, "layer_idx", len(session.layers_seen))
    session.layers_seen.add(layer)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    view = session.view
    recent, n_sinks = view.recent, view.n_sinks
    if sliding_window is not None:  # a local layer keeps its own trained span
        recent, n_sinks = sliding_window, 0
    if recent is None:  # full attention: torch's causal SDPA, memory-efficient on CPU too
        return sdpa_attention_forward(
            module, query, key, value, None, dropout=0.0, scaling=scale, is_causal=True
        )
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)[0]  # [heads, T, d]
    value = value.repeat_interleave(group, dim=1)[0]
    query = query[0]
    length = query.shape[1]
    output = torch.empty_like(query)
    sink_keys = key[:, :n_sinks] if n_sinks else None
    last_slot = (view.cache_size or 0) - 1  # P: the query's slot once the cache is full
    for start in range(0, length, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, length)
        positions = torch.arange(start, stop, device=query.device)
        low = 0 if recent is None else max(0, start - recent + 1)
        keys = torch.arange(low, stop, device=query.device)
        offset = positions[:, None] - keys[None, :]
        visible = offset >= 0
        if recent is not None:
            visible &= offset < recent
        scores = (query[:, start:stop] @ key[:, low:stop].transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        if sink_keys is not None:
            # a sink outside the recent window, at its distance in the cache
            moved = rotate(
                query[:, start:stop],
                (last_slot - positions).clamp(max=0),
                session.inv_freq.to(query.device),
            )
            sink_scores = (moved @ sink_keys.transpose(-1, -2)).float() * scale
            in_window = positions[:, None] - torch.arange(n_sinks, device=query.device) < recent
            sink_scores = sink_scores.masked_fill(in_window, float("-inf"))
            scores = torch.cat([sink_scores, scores], dim=-1)
            values = torch.cat([value[:, :n_sinks], value[:, low:stop]], dim=1)
        else:
            values = value[:, low:stop]
        probs = torch.softmax(scores, dim=-1)
        output[:, start:stop] = (probs.to(values.dtype) @ values).to(output.dtype)
        if sink_keys is not None and stop > session.count_from:
            counted = probs[:, max(0, session.count_from - start) :, :n_sinks]
            session.sink_attention[layer] += counted.sum(dim=(1, 2)).double().cpu()
    return output.transpose(0, 1)[None].contiguous(), None  # [1, T, heads, d]


def _rotary_inv_freq(handle: ModelHandle) -> Tensor:
    """The inverse frequencies of the model's (global) RoPE, or NotApplicable."""
    base = getattr(handle.model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise NotApplicable(
            f"{handle.spec} has no RoPE rotary embedding this probe knows how to re-position"
        )
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type != "default" or scaling != 1.0:
        raise NotApplicable(
            f"{handle.spec} uses '{rope_type}' RoPE scaling; the cache probe re-positions "
            "plain RoPE only"
        )
    return inv_freq.detach().float()


@contextlib.contextmanager
def streaming_cache(
    handle: ModelHandle, view: CacheView, *, count_from: int = 0
) -> Iterator[_Session]:
    """Scoped: the model attends as ``view`` says; yields the session (sink attention)."""
    session = _Session(
        view=view,
        inv_freq=_rotary_inv_freq(handle),
        n_layers=handle.arch.n_layers,
        n_heads=handle.arch.n_heads,
        count_from=count_from,
    )
    token = _ACTIVE.set(session)
    try:
        with using_attention(handle, ATTENTION_NAME, _cache_attention):
            yield session
    finally:
        _ACTIVE.reset(token)
    if len(session.layers_seen) not in (0, handle.arch.n_layers):
        raise NotApplicable(
            f"the cache attention ran for {len(session.layers_seen)} of "
            f"{handle.arch.n_layers} layers; this architecture does not route attention "
            "through transformers' AttentionInterface"
        )


def token_nll(handle: ModelHandle, tokens: Tensor, *, chunk: int = 1024) -> Tensor:
    """-log p(token t | < t) for t = 1..T-1 of one text [T], float64, under the active view.

    The LM head runs on ``chunk`` positions at a time, so the [T, vocab] logits of a
    long text never exist at once (32K tokens x 49K vocab would be 6 GB).
    """
    model = handle.model
    with torch.inference_mode():
        hidden = model.base_model(input_ids=tokens[None].to(handle.device), use_cache=False)[0][0]
        head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        out = torch.empty(len(tokens) - 1, dtype=torch.float64)
        for start in range(0, len(tokens) - 1, chunk):
            stop = min(start + chunk, len(tokens) - 1)
            logits = head(hidden[start:stop]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            targets = tokens[start + 1 : stop + 1].to(logits.device)
            picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            out[start:stop] = -picked.double().cpu()
    return out
