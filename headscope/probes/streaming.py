"""Streaming probe: per-head attention statistics with memory linear in T.

The model runs with an attention function of ours, registered with
transformers' ``AttentionInterface`` as ``"headscope_stats"``. For each layer
it receives Q (RoPE applied), K and V and computes the output and the
statistics of ``headscope.kernels`` from the same scores: on CPU the chunked
kernel does both in one sweep (QK^T paid once); on CUDA SDPA (flash) gives the
output and the Triton kernels the statistics. No [T, T] tensor of any layer is
kept; the largest transient is one query block of scores.

Accumulated in float64 over a prompt set, per layer x head: the mean of every
pass-1 statistic and its profile per query position, the attention each key
position receives, the per-prompt sink scores α_k of the first keys, and the
residual-stream and value-vector norms per position (for the sink analyses).
Prompts of unequal length are right-padded; padded queries and keys are
masked out of every statistic.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.kernels.attention_stats import chunked_attention_stats
from headscope.probes.models import ModelHandle
from headscope.probes.patterns import DEFAULT_SINK_KEYS

ATTENTION_NAME = "headscope_stats"
PROFILE_FIELDS = ("entropy", "max_prob", "sink_mass", "mean_distance")


@dataclass(kw_only=True)
class StreamingStatistics:
    """Accumulated statistics of one prompt set (all float64, on CPU)."""

    prompt_set: str
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    lengths: list[int]
    sink_alpha: Float[Tensor, "prompt layer head key_pos"]
    sink_alpha_by_key: Float[Tensor, "layer head key_pos"]
    received_by_key: Float[Tensor, "layer head key_pos"]
    means: dict[str, Float[Tensor, "layer head"]]
    profiles: dict[str, Float[Tensor, "layer head query_pos"]]
    residual_norm_by_pos: Float[Tensor, "layer query_pos"]
    value_norm_by_pos: Float[Tensor, "layer kv_head query_pos"]

    @property
    def n_prompts(self) -> int:
        return len(self.lengths)

    @property
    def entropy_by_query(self) -> Tensor:
        return self.profiles["entropy"]

    def tensors(self) -> dict[str, Tensor]:
        out = {
            "sink_alpha": self.sink_alpha,
            "sink_alpha_by_key": self.sink_alpha_by_key,
            "received_by_key": self.received_by_key,
            "residual_norm_by_pos": self.residual_norm_by_pos,
            "value_norm_by_pos": self.value_norm_by_pos,
            "lengths": torch.tensor(self.lengths, dtype=torch.int64),
        }
        out |= {f"mean_{name}": value for name, value in self.means.items()}
        out |= {f"{name}_by_query": value for name, value in self.profiles.items()}
        return out


class _Session:
    """One batch's forward: the attention function and the block hooks report here,
    and each layer is reduced into the accumulator as soon as it is computed, so
    no layer's statistics outlive its own attention call."""

    def __init__(self, accumulator: _Accumulator, key_padding_mask: Tensor, lengths: Tensor):
        self.accumulator = accumulator
        self.key_padding_mask = key_padding_mask
        self.unpadded = bool(key_padding_mask.all())  # lets the kernels skip masking
        self.lengths = lengths
        self.sink_width = 1
        self.workspace: dict[str, Tensor] = {}  # score buffers shared by all layers
        self.call_order: list[int] = []
        self.layers_seen: set[int] = set()


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "headscope_stats_session", default=None
)


def _attention_with_stats(
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
    """transformers attention function: output plus statistics into the active session."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session = _ACTIVE.get()
    if session is None:  # used outside a probe: behave exactly like SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the probe")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(getattr(module, "is_causal", True))
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = len(session.call_order)
    session.call_order.append(layer)
    padding = None if session.unpadded else session.key_padding_mask
    common = dict(
        scale=scale, causal=causal, key_padding_mask=padding,
        window=sliding_window, sink_width=session.sink_width,
    )  # fmt: skip
    if query.is_cuda:
        from headscope.kernels.triton_attention_stats import triton_attention_stats

        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scale, **kwargs
        )
        stats = triton_attention_stats(query, key, **common)
    else:
        output, stats = chunked_attention_stats(
            query, key, value, workspace=session.workspace, **common
        )
        output = output.transpose(1, 2).contiguous()
    session.accumulator.add_attention(session, layer, stats, value.detach().float().norm(dim=-1))
    session.layers_seen.add(layer)
    return output, None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention_with_stats)


def _block_list(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList of n_layers modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise RuntimeError("cannot find the model's list of transformer blocks")


@contextlib.contextmanager
def streaming_attention(handle: ModelHandle) -> Iterator[None]:
    """Scoped: the HF module uses our attention function inside, its own outside."""
    _register_attention()
    model = handle.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _Accumulator:
    """float64 running sums over prompts; grows its position axis as needed."""

    def __init__(self, handle: ModelHandle, n_sink_keys: int):
        self.arch, self.n_sink_keys = handle.arch, n_sink_keys
        self.length = 0
        self.sums: dict[str, Tensor] = {}
        self.alpha: dict[int, Tensor] = {}
        self.batch_alpha: Tensor | None = None

    def _buffer(self, name: str, *leading: int) -> Tensor:
        buffer = self.sums.get(name)
        if buffer is None or buffer.shape[-1] < self.length:
            grown = torch.zeros(*leading, self.length, dtype=torch.float64)
            if buffer is not None:
                grown[..., : buffer.shape[-1]] = buffer
            self.sums[name] = buffer = grown
        return buffer

    def start_batch(self, mask: Tensor, lengths: Tensor) -> None:
        arch = self.arch
        self.length = max(self.length, int(mask.shape[1]))
        self.valid = mask.to(torch.float64).cpu()  # [b, T]
        seq_len = mask.shape[1]
        positions = torch.arange(seq_len, dtype=torch.float64)
        if arch.causal:
            viewers = (lengths.to(torch.float64)[:, None] - positions[None]).clamp(min=1.0)
        else:
            viewers = lengths.to(torch.float64)[:, None].expand(-1, seq_len)
        self.viewers = viewers
        keep = min(seq_len, self.n_sink_keys)
        shape = (len(lengths), arch.n_layers, arch.n_heads, self.n_sink_keys)
        self.batch_alpha = torch.full(shape, torch.nan, dtype=torch.float64)
        self.keep = keep

    def _add(self, name: str, leading: tuple[int, ...], layer: int, values: Tensor) -> None:
        """Add per-prompt ``values`` [b, *leading[1:], T] (zero where padded) at ``layer``."""
        seq_len = values.shape[-1]
        self._buffer(name, *leading)[layer, ..., :seq_len] += values.sum(0)

    def add_attention(self, session: _Session, layer: int, stats, value_norms: Tensor) -> None:
        arch, valid = self.arch, self.valid
        heads = (arch.n_layers, arch.n_heads)
        row_valid = valid[:, None]  # [b, 1, T]
        for name in PROFILE_FIELDS:
            values = getattr(stats, name).to(torch.float64).cpu() * row_valid
            self._add(f"{name}_by_query", heads, layer, values)
        received = stats.received.to(torch.float64).cpu()
        alpha = received / self.viewers[:, None] * row_valid
        self._add("received_by_key", heads, layer, received)
        self._add("alpha_by_key", heads, layer, alpha)
        self.batch_alpha[:, layer, :, : self.keep] = alpha[..., : self.keep]
        values = value_norms.to(torch.float64).cpu() * row_valid
        self._add("value_norm", (arch.n_layers, arch.n_kv_heads), layer, values)

    def add_residual(self, layer: int, norms: Tensor) -> None:
        values = norms.to(torch.float64).cpu() * self.valid
        self._add("residual_norm", (self.arch.n_layers,), layer, values)

    def end_batch(self, indices: list[int], lengths: Tensor) -> None:
        seq_len = self.valid.shape[1]
        self._buffer("query_count")[..., :seq_len] += self.valid.sum(0)
        for row, prompt in enumerate(indices):
            alpha = self.batch_alpha[row].clone()
            alpha[..., int(lengths[row]) :] = torch.nan  # keys beyond this prompt's end
            self.alpha[prompt] = alpha

    def result(self, prompt_set: str, lengths: list[int]) -> StreamingStatistics:
        count = self.sums["query_count"]
        per_position = count.clamp(min=1.0)
        total_rows = count.sum()
        profiles = {name: self.sums[f"{name}_by_query"] / per_position for name in PROFILE_FIELDS}
        means = {name: self.sums[f"{name}_by_query"].sum(-1) / total_rows
                 for name in PROFILE_FIELDS}  # fmt: skip
        return StreamingStatistics(
            prompt_set=prompt_set,
            causal=self.arch.causal,
            n_layers=self.arch.n_layers,
            n_heads=self.arch.n_heads,
            n_kv_heads=self.arch.n_kv_heads,
            lengths=list(lengths),
            sink_alpha=torch.stack([self.alpha[i] for i in range(len(lengths))]),
            sink_alpha_by_key=self.sums["alpha_by_key"] / per_position,
            received_by_key=self.sums["received_by_key"] / per_position,
            means=means,
            profiles=profiles,
            residual_norm_by_pos=self.sums["residual_norm"] / per_position,
            value_norm_by_pos=self.sums["value_norm"] / per_position,
        )


def _padded_batches(
    prompts, batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Batches of prompts sorted by length, right-padded: (indices, tokens, lengths)."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts.tokens[i]), i))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        lengths = torch.tensor([len(prompts.tokens[i]) for i in indices])
        tokens = torch.full((len(indices), int(lengths.max())), pad_id, dtype=torch.int64)
        for row, i in enumerate(indices):
            tokens[row, : lengths[row]] = prompts.tokens[i]
        yield indices, tokens, lengths


@contextlib.contextmanager
def _residual_norms(blocks: torch.nn.ModuleList, accumulator: _Accumulator) -> Iterator[None]:
    """Scoped forward hooks adding ‖h‖ of each block's output per position."""

    def recorder(layer: int) -> Callable:
        def hook(_module, _inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            accumulator.add_residual(layer, hidden.detach().float().norm(dim=-1))

        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward(handle: ModelHandle, blocks, tokens: Tensor, mask: Tensor, session: _Session):
    """One forward with ``session`` active (statistics flow into its accumulator)."""
    token = _ACTIVE.set(session)
    try:
        # The transformer body only: the probe needs no logits, and skipping the
        # LM head saves a [batch, T, vocab] tensor and its matmul.
        with _residual_norms(blocks, session.accumulator), torch.inference_mode():
            handle.model.base_model(
                input_ids=tokens.to(handle.device),
                attention_mask=mask.to(handle.device).long(),
                use_cache=False,
            )
    finally:
        _ACTIVE.reset(token)


def probe_streaming(
    handle: ModelHandle,
    prompts,
    *,
    batch_size: int = 16,
    n_sink_keys: int = DEFAULT_SINK_KEYS,
    on_batch: Callable[[int], None] | None = None,
) -> StreamingStatistics:
    """Run ``prompts`` (TokenizedPrompts) through the model and accumulate statistics.

    Deterministic: batches are formed by (length, index) order, and every
    accumulation is a float64 sum in that order.
    """
    arch = handle.arch
    blocks = _block_list(handle.model, arch.n_layers)
    pad_id = handle.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    accumulator = _Accumulator(handle, n_sink_keys)
    with streaming_attention(handle):
        for indices, tokens, lengths in _padded_batches(prompts, batch_size, pad_id):
            mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
            accumulator.start_batch(mask, lengths)
            session = _Session(accumulator, mask.to(handle.device), lengths)
            _forward(handle, blocks, tokens, mask, session)
            if len(session.layers_seen) != arch.n_layers:
                raise RuntimeError(
                    f"the attention function ran for {len(session.layers_seen)} of "
                    f"{arch.n_layers} layers; this architecture does not route attention "
                    "through transformers' AttentionInterface"
                )
            accumulator.end_batch(indices, lengths)
            if on_batch is not None:
                on_batch(len(indices))
    return accumulator.result(prompts.name, prompts.lengths)
