"""Streaming probe: per-head attention statistics with memory linear in T.

The model runs with an attention function of ours, registered with
transformers' ``AttentionInterface`` as ``"headscope_stats"``. For each layer
it receives Q (RoPE applied), K and V and computes the output and the
statistics of ``headscope.kernels`` from the same scores: on CPU the chunked
kernel does both in one sweep (QK^T paid once); on CUDA SDPA (flash) gives the
output and the Triton kernels the statistics. No [T, T] tensor of any layer is
kept; the largest transient is one query block of scores.

Accumulated in float64 over a prompt set, per layer x head: the mean of every
pass-1 statistic and its profile per query position, the norm of each head's
output (before W_O, and after its slice of W_O where the model's output
projection is found), the attention each key position receives, the
per-prompt sink scores α_k of the first keys, and the residual-stream and
value-vector norms per position (for the sink analyses). Two sparse records serve the sink analyses
that need token identity: hidden-sink candidates (per prompt, layer and head,
the later keys whose α_j passes a floor) and the largest residual-stream
entries of every prompt and layer (massive activations) with the layer median.
Prompts of unequal length are right-padded; padded queries and keys are
masked out of every statistic.

A session may also override the attention itself (``window`` keys plus the
first ``keep_first`` keys: StreamingLLM's window attention), which is how
``headscope.probes.perplexity`` measures the model under window attention.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.data.prompt_sets import PaddedBatch
from headscope.errors import HeadscopeError, NotApplicable
from headscope.kernels.attention_stats import chunked_attention_stats
from headscope.probes.handle import ModelHandle
from headscope.probes.patterns import DEFAULT_SINK_KEYS
from headscope.probes.sites import block_list, block_sites, head_output_weight
from headscope.progress import Progress, counter

ATTENTION_NAME = "headscope_stats"
PROFILE_FIELDS = ("entropy", "max_prob", "sink_mass", "mean_distance")
#: profiles: the kernel's pass-1 statistics plus the norm of each head's output
PROFILES = (*PROFILE_FIELDS, "output_norm")
#: the norm of each head's output after its slice of the output projection,
#: ‖z_h W_O^h‖ (bias left out); profiled where the probe finds W_O (every
#: architecture of ``probes.sites``), absent otherwise
OUTPUT_NORM_AFTER_WO = "output_norm_after_wo"
#: hidden-sink candidates: later keys (j >= 1) whose α_j exceeds this floor,
#: however few queries see them (ACT's rule has no viewer floor; the detector
#: applies its own, HIDDEN_SINK_MIN_VIEWERS by default: a key near the end of a
#: prompt is seen by few queries, so its α is the attention of one or two rows)
HIDDEN_SINK_FLOOR = 0.05
HIDDEN_SINK_MIN_VIEWERS = 16
#: largest |h| entries kept per prompt and layer (massive activations are a handful)
MASSIVE_TOP_K = 16
#: the layer median |h| is exact up to this many entries (64 x 576 for a default
#: prompt); beyond, it is the median of an evenly strided sample of at least half
#: as many, since sorting T x d_model entries per layer cost 15 % of a T=2048 probe
EXACT_MEDIAN_ENTRIES = 1 << 17
CANDIDATE_COLUMNS = ("prompt", "layer", "head", "position", "token", "alpha")


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
    #: one row per candidate, columns CANDIDATE_COLUMNS (alpha as float, rest integral)
    hidden_sink_candidates: Float[Tensor, "candidate 6"]
    #: per prompt and layer: the MASSIVE_TOP_K largest |h| of the block output, the
    #: signed values, their positions, dims and tokens, and the median |h|
    massive_values: Float[Tensor, "prompt layer k"]
    massive_positions: Float[Tensor, "prompt layer k"]
    massive_dims: Float[Tensor, "prompt layer k"]
    massive_tokens: Float[Tensor, "prompt layer k"]
    residual_median: Float[Tensor, "prompt layer"]
    #: token id -> its text, for every token named by the two sparse records
    token_text: dict[int, str]

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
            "hidden_sink_candidates": self.hidden_sink_candidates,
            "massive_values": self.massive_values,
            "massive_positions": self.massive_positions,
            "massive_dims": self.massive_dims,
            "massive_tokens": self.massive_tokens,
            "residual_median": self.residual_median,
            "lengths": torch.tensor(self.lengths, dtype=torch.int64),
        }
        out |= {f"mean_{name}": value for name, value in self.means.items()}
        out |= {f"{name}_by_query": value for name, value in self.profiles.items()}
        return out


def layer_median(magnitude: Tensor) -> Tensor:
    """Median of |h| entries: exact up to EXACT_MEDIAN_ENTRIES, else of a strided sample."""
    flat = magnitude.flatten()
    stride = -(-flat.numel() // EXACT_MEDIAN_ENTRIES)  # ceil; 1 = exact
    return flat[::stride].median()


class _Session:
    """One batch's forward: the attention function and the block hooks report here,
    and each layer is reduced into the accumulator as soon as it is computed, so
    no layer's statistics outlive its own attention call."""

    def __init__(
        self,
        accumulator: StreamingAccumulator | None,
        key_padding_mask: Tensor,
        *,
        window: int | None = None,
        keep_first: int = 0,
        cross_layer=None,
    ):
        self.accumulator = accumulator  # None: run the attention, keep no statistics
        self.cross_layer = cross_layer  # compares each layer's attention with the previous
        self.key_padding_mask = key_padding_mask
        self.unpadded = bool(key_padding_mask.all())  # lets the kernels skip masking
        self.window, self.keep_first = window, keep_first  # attention override, if any
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
        raise NotApplicable("attention logit soft-capping is not supported by the probe")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(getattr(module, "is_causal", True))
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = len(session.call_order)
    session.call_order.append(layer)
    padding = None if session.unpadded else session.key_padding_mask
    window, keep_first = sliding_window, 0
    if session.window is not None and sliding_window is None:
        # StreamingLLM's window replaces full attention only: a layer with a
        # sliding window of its own (Gemma 3's local layers) keeps the span it
        # was trained with, since first tokens at distances beyond it are
        # outside anything it has seen
        window, keep_first = session.window, session.keep_first
    common = dict(
        scale=scale, causal=causal, key_padding_mask=padding,
        window=window, sink_width=session.sink_width,
    )  # fmt: skip
    if keep_first:
        common["keep_first"] = keep_first
    if query.is_cuda and session.window is None:
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
    if session.accumulator is not None:
        session.accumulator.add_attention(
            layer, stats, value_norms=value.detach().float().norm(dim=-1), head_outputs=output
        )
    if session.cross_layer is not None:
        session.cross_layer.add(
            layer, query, key, scale=scale, window=window, causal=causal, key_padding_mask=padding
        )
    session.layers_seen.add(layer)
    return output, None


@contextlib.contextmanager
def using_attention(handle: ModelHandle, name: str, function: Callable) -> Iterator[None]:
    """Scoped: the HF module runs ``function`` (registered with transformers'
    ``AttentionInterface`` as ``name``) as its attention inside, its own outside."""
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
    model = handle.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def streaming_attention(handle: ModelHandle) -> contextlib.AbstractContextManager[None]:
    """Scoped: the HF module uses the probe's attention function inside, its own outside."""
    return using_attention(handle, ATTENTION_NAME, _attention_with_stats)


class StreamingAccumulator:
    """float64 running sums over prompts; grows its position axis as needed."""

    def __init__(self, handle: ModelHandle, n_sink_keys: int):
        self.arch, self.n_sink_keys = handle.arch, n_sink_keys
        try:  # each layer's output projection, for the per-head norm after W_O
            self.sites = block_sites(handle.model, handle.arch)
        except HeadscopeError:
            self.sites = None
        self.grams: dict[int, Tensor] = {}  # layer -> [H, d_head, d_head], made on first use
        self.length = 0
        self.sums: dict[str, Tensor] = {}
        self.alpha: dict[int, Tensor] = {}
        self.massive: dict[int, Tensor] = {}  # prompt -> [layer, 5, k] (value, pos, dim, token)
        self.medians: dict[int, Tensor] = {}  # prompt -> [layer]
        self.candidates: list[Tensor] = []

    def _buffer(self, name: str, *leading: int) -> Tensor:
        buffer = self.sums.get(name)
        if buffer is None or buffer.shape[-1] < self.length:
            grown = torch.zeros(*leading, self.length, dtype=torch.float64)
            if buffer is not None:
                grown[..., : buffer.shape[-1]] = buffer
            self.sums[name] = buffer = grown
        return buffer

    def start_batch(self, batch: PaddedBatch) -> None:
        arch, lengths = self.arch, batch.lengths
        seq_len = batch.tokens.shape[1]
        self.length = max(self.length, seq_len)
        self.indices, self.tokens, self.lengths = batch.indices, batch.tokens, lengths
        self.valid = batch.mask.to(torch.float64)  # [b, T]
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
        k = MASSIVE_TOP_K
        self.batch_massive = torch.full((len(lengths), arch.n_layers, 4, k), torch.nan)
        self.batch_median = torch.full((len(lengths), arch.n_layers), torch.nan)

    def _add(self, name: str, leading: tuple[int, ...], layer: int, values: Tensor) -> None:
        """Add per-prompt ``values`` [b, *leading[1:], T] (zero where padded) at ``layer``."""
        seq_len = values.shape[-1]
        self._buffer(name, *leading)[layer, ..., :seq_len] += values.sum(0)

    def add_attention(
        self,
        layer: int,
        stats,
        *,
        value_norms: Tensor,
        head_outputs: Tensor,
    ) -> None:
        """One layer's statistics; ``head_outputs`` [b, T, H, d_head] are the heads'
        outputs z_h before W_O (their norms, and after W_O where it is found)."""
        arch, valid = self.arch, self.valid
        head_outputs = head_outputs.detach().float()
        output_norms = head_outputs.norm(dim=-1).transpose(1, 2)  # [b, H, T]
        heads = (arch.n_layers, arch.n_heads)
        row_valid = valid[:, None]  # [b, 1, T]
        for name in PROFILE_FIELDS:
            values = getattr(stats, name).to(torch.float64).cpu() * row_valid
            self._add(f"{name}_by_query", heads, layer, values)
        self._add("output_norm_by_query", heads, layer, output_norms.double().cpu() * row_valid)
        after = self._norm_after_wo(layer, head_outputs)
        if after is not None:
            self._add(f"{OUTPUT_NORM_AFTER_WO}_by_query", heads, layer, after * row_valid)
        received = stats.received.to(torch.float64).cpu()
        alpha = received / self.viewers[:, None] * row_valid
        self._add("received_by_key", heads, layer, received)
        self._add("alpha_by_key", heads, layer, alpha)
        self.batch_alpha[:, layer, :, : self.keep] = alpha[..., : self.keep]
        values = value_norms.to(torch.float64).cpu() * row_valid
        self._add("value_norm", (arch.n_layers, arch.n_kv_heads), layer, values)
        self._add_hidden_sink_candidates(layer, alpha)

    def _norm_after_wo(self, layer: int, z: Tensor) -> Tensor | None:
        """‖z_h W_O^h‖ per prompt, head and query [b, H, T] (float64, CPU), or None.

        From the Gram matrix G_h = W_O^h W_O^h^T [d_head, d_head]: ‖z W_O^h‖² =
        z G_h z^T, so the [.., d_model] per-head outputs are never formed. The
        Gram matrices are made once per layer (weights do not change during a probe)."""
        if self.sites is None:
            return None
        gram = self.grams.get(layer)
        if gram is None:
            arch, sites = self.arch, self.sites[layer]
            weights = torch.stack(
                [head_output_weight(sites, h, arch) for h in range(arch.n_heads)]
            ).float()
            gram = self.grams[layer] = (weights @ weights.transpose(1, 2)).to(z.device)
        squared = (torch.einsum("bthd,hde->bthe", z, gram) * z).sum(-1).transpose(1, 2)
        return squared.clamp(min=0.0).sqrt().to(torch.float64).cpu()

    def _add_hidden_sink_candidates(self, layer: int, alpha: Tensor) -> None:
        """Record later keys (j >= 1) with α_j above the floor, whatever their viewers."""
        later = self.valid.bool().clone()  # [b, T]
        later[:, 0] = False  # the first token is the ordinary sink, not a hidden one
        rows, heads, positions = torch.nonzero(
            (alpha > HIDDEN_SINK_FLOOR) & later[:, None], as_tuple=True
        )
        if len(rows) == 0:
            return
        prompts = torch.tensor(self.indices, dtype=torch.float64)[rows]
        record = torch.stack(
            [
                prompts,
                torch.full_like(prompts, layer),
                heads.double(),
                positions.double(),
                self.tokens[rows, positions].double(),
                alpha[rows, heads, positions],
            ],
            dim=1,
        )
        self.candidates.append(record)

    def add_residual(self, layer: int, hidden: Tensor) -> None:
        """Norms per position, and the largest entries of each prompt's block output."""
        hidden = hidden.detach().float()
        values = hidden.norm(dim=-1).to(torch.float64).cpu() * self.valid
        self._add("residual_norm", (self.arch.n_layers,), layer, values)
        d_model = hidden.shape[-1]
        for row, length in enumerate(self.lengths.tolist()):
            entries = hidden[row, :length].flatten()
            magnitude = entries.abs()
            top = magnitude.topk(min(MASSIVE_TOP_K, magnitude.numel())).indices
            positions = torch.div(top, d_model, rounding_mode="floor")
            found = torch.stack(
                [entries[top], positions.float(), (top % d_model).float(),
                 self.tokens[row, positions.cpu()].float().to(entries.device)]
            )  # fmt: skip
            self.batch_massive[row, layer, :, : found.shape[1]] = found.cpu()
            self.batch_median[row, layer] = float(layer_median(magnitude))

    def end_batch(self) -> None:
        seq_len = self.valid.shape[1]
        self._buffer("query_count")[..., :seq_len] += self.valid.sum(0)
        for row, prompt in enumerate(self.indices):
            alpha = self.batch_alpha[row].clone()
            alpha[..., int(self.lengths[row]) :] = torch.nan  # keys beyond this prompt's end
            self.alpha[prompt] = alpha
            self.massive[prompt] = self.batch_massive[row]
            self.medians[prompt] = self.batch_median[row]

    def token_ids(self) -> set[int]:
        """Every token named by the sparse records (for their texts)."""
        ids = {int(t) for record in self.candidates for t in record[:, 4].tolist()}
        for record in self.massive.values():
            ids |= {int(t) for t in record[:, 3].flatten().tolist() if t == t}  # skip NaN
        return ids

    def result(
        self, prompt_set: str, lengths: list[int], token_text: dict[int, str]
    ) -> StreamingStatistics:
        count = self.sums["query_count"]
        per_position = count.clamp(min=1.0)
        total_rows = count.sum()
        after_wo = f"{OUTPUT_NORM_AFTER_WO}_by_query" in self.sums
        names = [*PROFILES, *([OUTPUT_NORM_AFTER_WO] if after_wo else [])]
        profiles = {name: self.sums[f"{name}_by_query"] / per_position for name in names}
        means = {name: self.sums[f"{name}_by_query"].sum(-1) / total_rows
                 for name in names}  # fmt: skip
        order = range(len(lengths))
        massive = torch.stack([self.massive[i] for i in order])  # [prompt, layer, 4, k]
        candidates = (
            torch.cat(self.candidates)
            if self.candidates
            else torch.zeros(0, len(CANDIDATE_COLUMNS), dtype=torch.float64)
        )
        return StreamingStatistics(
            prompt_set=prompt_set,
            causal=self.arch.causal,
            n_layers=self.arch.n_layers,
            n_heads=self.arch.n_heads,
            n_kv_heads=self.arch.n_kv_heads,
            lengths=list(lengths),
            sink_alpha=torch.stack([self.alpha[i] for i in order]),
            sink_alpha_by_key=self.sums["alpha_by_key"] / per_position,
            received_by_key=self.sums["received_by_key"] / per_position,
            means=means,
            profiles=profiles,
            residual_norm_by_pos=self.sums["residual_norm"] / per_position,
            value_norm_by_pos=self.sums["value_norm"] / per_position,
            hidden_sink_candidates=candidates,
            massive_values=massive[:, :, 0],
            massive_positions=massive[:, :, 1],
            massive_dims=massive[:, :, 2],
            massive_tokens=massive[:, :, 3],
            residual_median=torch.stack([self.medians[i] for i in order]),
            token_text=token_text,
        )


@contextlib.contextmanager
def _residual_hooks(
    blocks: torch.nn.ModuleList, accumulator: StreamingAccumulator
) -> Iterator[None]:
    """Scoped forward hooks passing each block's output (the residual stream) on."""

    def recorder(layer: int) -> Callable:
        def hook(_module, _inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            accumulator.add_residual(layer, hidden)

        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_batch(
    handle: ModelHandle,
    batch: PaddedBatch,
    *,
    accumulator: StreamingAccumulator | None = None,
    window: int | None = None,
    keep_first: int = 0,
    with_logits: bool = False,
    cross_layer=None,
) -> Tensor | None:
    """One forward of a right-padded ``batch`` through the headscope attention.

    Must run inside ``streaming_attention(handle)``. Statistics flow into
    ``accumulator`` when one is given; ``window``/``keep_first`` replace the
    model's attention span (StreamingLLM); ``cross_layer`` (an object with
    ``add(layer, query, key, ...)``, see ``probes.layer_similarity``) receives
    each layer's queries and keys. Returns the logits when asked;
    otherwise only the transformer body runs, which saves the LM head's
    [batch, T, vocab] tensor and matmul.
    """
    arch, mask = handle.arch, batch.mask
    session = _Session(
        accumulator, mask.to(handle.device), window=window, keep_first=keep_first,
        cross_layer=cross_layer,
    )  # fmt: skip
    hooks = (
        _residual_hooks(block_list(handle.model, arch.n_layers), accumulator)
        if accumulator is not None
        else contextlib.nullcontext()
    )
    module = handle.model if with_logits else handle.model.base_model
    token = _ACTIVE.set(session)
    try:
        with hooks, torch.inference_mode():
            output = module(
                input_ids=batch.tokens.to(handle.device),
                attention_mask=mask.to(handle.device).long(),
                use_cache=False,
            )
    finally:
        _ACTIVE.reset(token)
    if len(session.layers_seen) != arch.n_layers:
        raise NotApplicable(
            f"the attention function ran for {len(session.layers_seen)} of "
            f"{arch.n_layers} layers; this architecture does not route attention "
            "through transformers' AttentionInterface"
        )
    return output.logits if with_logits else None


def token_texts(tokenizer, ids: set[int]) -> dict[int, str]:
    """Readable text of each token id (``decode`` of the single token)."""
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def probe_streaming(
    handle: ModelHandle,
    prompts,
    *,
    batch_size: int = 16,
    n_sink_keys: int = DEFAULT_SINK_KEYS,
    on_progress: Progress | None = None,
) -> StreamingStatistics:
    """Run ``prompts`` (TokenizedPrompts) through the model and accumulate statistics.

    Deterministic: batches are formed by (length, index) order, and every
    accumulation is a float64 sum in that order. ``on_progress`` counts prompts
    under the label "<prompt set> (streaming)".
    """
    accumulator = StreamingAccumulator(handle, n_sink_keys)
    advance = counter(on_progress, f"{prompts.name} (streaming)", len(prompts))
    with streaming_attention(handle):
        for batch in prompts.padded(batch_size, handle.pad_id):
            accumulator.start_batch(batch)
            forward_batch(handle, batch, accumulator=accumulator)
            accumulator.end_batch()
            advance(len(batch.indices))
    texts = token_texts(handle.tokenizer, accumulator.token_ids())
    return accumulator.result(prompts.name, prompts.lengths, texts)
