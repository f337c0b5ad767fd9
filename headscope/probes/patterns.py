"""Pattern probe: sufficient statistics of attention patterns, via TransformerLens.

This is the deep-dive capture path: the TransformerLens bridge exposes each
layer's full pattern ``hook_pattern`` [batch, head, query_pos, key_pos]; a hook
reduces it on the spot to the small statistics the detectors need and lets it
go, so no layer's pattern outlives its own forward step. (The streaming
kernels of ``headscope.kernels`` replace this path for long contexts.)

What is kept, per prompt, layer and head:

- ``classic_sums[prompt, layer, head, kind, part]``: for each detection
  pattern P (kind: the all-ones pattern, previous-token, duplicate-token,
  induction) the sums Σ A⊙P over the whole matrix, over key column 0, over the
  diagonal, and the (0, 0) cell. From these four parts the TransformerLens
  "mul" score ``Σ(A'⊙P) / ΣA'`` follows exactly for every combination of
  ``exclude_bos`` (A' has column 0 zeroed) and ``exclude_current_token`` (A'
  has its diagonal zeroed), by inclusion-exclusion, without re-running.
- ``sink_alpha[prompt, layer, head, key]``: the sink score α_k of the first
  ``n_sink_keys`` keys (docs/methods.md, "first_token_sink"): the mean
  attention key k receives from the queries that can see it.

And averaged over prompts (per position, for plots): α_k for every key and the
attention entropy of every query row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.errors import NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.progress import Progress, counter

CLASSIC_KINDS = ("attention", "previous_token", "duplicate_token", "induction")
SUM_PARTS = ("total", "bos_column", "diagonal", "bos_cell")
DEFAULT_SINK_KEYS = 8
_LAYER_OF_HOOK = re.compile(r"blocks\.(\d+)\.")


def previous_token_pattern(seq_len: int) -> Float[Tensor, "query_pos key_pos"]:
    """P[i, i-1] = 1: attend to the previous token."""
    return torch.diag(torch.ones(seq_len - 1, dtype=torch.float64), -1)


def duplicate_token_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos pos"]:
    """P[i, j] = 1 when token j equals token i and j < i (an earlier copy)."""
    same = tokens[:, :, None] == tokens[:, None, :]
    return torch.tril(same, diagonal=-1).to(torch.float64)


def induction_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos pos"]:
    """The duplicate pattern shifted one key to the right: attend to the token
    after an earlier copy of the current token (TransformerLens's definition,
    which keeps j = i when token i-1 equals token i)."""
    duplicate = duplicate_token_pattern(tokens)
    shifted = torch.zeros_like(duplicate)
    shifted[:, :, 1:] = duplicate[:, :, :-1]
    return torch.tril(shifted)


def _pattern_parts(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    detection: Float[Tensor, "batch query_pos key_pos"],
) -> Float[Tensor, "batch head part"]:
    """The four SUM_PARTS of pattern ⊙ detection."""
    weighted = pattern * detection[:, None]
    return torch.stack(
        (
            weighted.sum(dim=(-1, -2)),
            weighted[..., :, 0].sum(-1),
            weighted.diagonal(dim1=-2, dim2=-1).sum(-1),
            weighted[..., 0, 0],
        ),
        dim=-1,
    )


def classic_parts(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
) -> Float[Tensor, "batch head kind part"]:
    """SUM_PARTS for every CLASSIC_KINDS detection pattern (float64)."""
    batch, _, seq_len, _ = pattern.shape
    pattern = pattern.to(torch.float64)
    ones = torch.ones(batch, seq_len, seq_len, dtype=torch.float64)
    previous = previous_token_pattern(seq_len).expand(batch, -1, -1)
    detections = (ones, previous, duplicate_token_pattern(tokens), induction_pattern(tokens))
    return torch.stack([_pattern_parts(pattern, d.to(pattern.device)) for d in detections], -2)


def classic_score(
    sums: Float[Tensor, "... kind part"],
    kind: str,
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> Float[Tensor, "..."]:
    """TransformerLens "mul" score of ``kind`` from the stored sums.

    Zeroing column 0 and/or the diagonal before summing removes those parts
    once each, and adds back the (0, 0) cell they share.
    """
    signs = torch.tensor(
        [
            1.0,
            -float(exclude_bos),
            -float(exclude_current_token),
            float(exclude_bos and exclude_current_token),
        ],
        dtype=sums.dtype,
    )
    masked = (sums * signs).sum(-1)
    return masked[..., CLASSIC_KINDS.index(kind)] / masked[..., CLASSIC_KINDS.index("attention")]


def sink_scores(
    pattern: Float[Tensor, "batch head query_pos key_pos"], *, causal: bool
) -> Float[Tensor, "batch head key_pos"]:
    """α_k = mean over the queries that can see key k of A[i, k] (Gu et al. 2024)."""
    seq_len = pattern.shape[-1]
    received = pattern.to(torch.float64).sum(-2)
    if causal:
        viewers = seq_len - torch.arange(seq_len, dtype=torch.float64, device=pattern.device)
    else:
        viewers = torch.full((seq_len,), float(seq_len), dtype=torch.float64, device=pattern.device)
    return received / viewers


def row_entropy(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
) -> Float[Tensor, "batch head query_pos"]:
    """Shannon entropy (nats) of each attention row; 0·log 0 counts as 0."""
    p = pattern.to(torch.float64)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)


@dataclass(kw_only=True)
class PatternStatistics:
    """Per-prompt sufficient statistics of one prompt set on one model."""

    prompt_set: str
    causal: bool
    n_layers: int
    n_heads: int
    lengths: list[int]
    classic_sums: Float[Tensor, "prompt layer head kind part"]
    sink_alpha: Float[Tensor, "prompt layer head key_pos"]
    sink_alpha_by_key: Float[Tensor, "layer head key_pos"]
    entropy_by_query: Float[Tensor, "layer head query_pos"]
    sample_tokens: Int[Tensor, " query_pos"] | None = None
    sample_patterns: Float[Tensor, "layer head query_pos key_pos"] | None = None

    @property
    def n_prompts(self) -> int:
        return len(self.lengths)

    def tensors(self) -> dict[str, Tensor]:
        """The statistics worth storing in a run (per prompt set prefix added by the caller)."""
        return {
            "classic_sums": self.classic_sums,
            "sink_alpha": self.sink_alpha,
            "sink_alpha_by_key": self.sink_alpha_by_key,
            "entropy_by_query": self.entropy_by_query,
            "lengths": torch.tensor(self.lengths, dtype=torch.int64),
        }


class _PatternAccumulator:
    """Reduces each layer's pattern as it is produced, then the whole set."""

    def __init__(self, n_layers: int, n_heads: int, n_sink_keys: int, causal: bool):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.n_sink_keys, self.causal = n_sink_keys, causal
        self.classic: dict[int, Tensor] = {}  # prompt -> [layer, head, kind, part]
        self.alpha: dict[int, Tensor] = {}  # prompt -> [layer, head, n_sink_keys]
        self.alpha_sum: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.key_count: Tensor | None = None
        self.seen_layers: set[int] = set()

    def _grow(self, length: int) -> None:
        if self.alpha_sum is not None and self.alpha_sum.shape[-1] >= length:
            return
        shape = (self.n_layers, self.n_heads, length)
        grown = [torch.zeros(shape, dtype=torch.float64) for _ in range(2)]
        count = torch.zeros(length, dtype=torch.float64)
        if self.alpha_sum is not None:
            old = self.alpha_sum.shape[-1]
            grown[0][..., :old], grown[1][..., :old] = self.alpha_sum, self.entropy_sum
            count[:old] = self.key_count
        self.alpha_sum, self.entropy_sum = grown
        self.key_count = count

    def start_batch(self, indices: list[int], tokens: Tensor) -> None:
        batch, seq_len = tokens.shape
        self._grow(seq_len)
        self.indices, self.tokens = indices, tokens
        shape = (batch, self.n_layers, self.n_heads)
        self.batch_classic = torch.zeros(
            *shape, len(CLASSIC_KINDS), len(SUM_PARTS), dtype=torch.float64
        )
        self.batch_alpha = torch.zeros(*shape, seq_len, dtype=torch.float64)
        self.batch_entropy = torch.zeros(*shape, seq_len, dtype=torch.float64)
        self.seen_layers = set()

    def add_layer(self, layer: int, pattern: Tensor) -> None:
        self.batch_classic[:, layer] = classic_parts(pattern, self.tokens.to(pattern.device)).cpu()
        self.batch_alpha[:, layer] = sink_scores(pattern, causal=self.causal).cpu()
        self.batch_entropy[:, layer] = row_entropy(pattern).cpu()
        self.seen_layers.add(layer)

    def end_batch(self) -> None:
        if len(self.seen_layers) != self.n_layers:
            raise NotApplicable(
                f"captured attention patterns of {len(self.seen_layers)} layers, "
                f"expected {self.n_layers}"
            )
        seq_len = self.tokens.shape[1]
        keep = min(seq_len, self.n_sink_keys)
        for row, prompt in enumerate(self.indices):
            self.classic[prompt] = self.batch_classic[row]
            alpha = torch.full(
                (self.n_layers, self.n_heads, self.n_sink_keys), torch.nan, dtype=torch.float64
            )
            alpha[..., :keep] = self.batch_alpha[row, ..., :keep]
            self.alpha[prompt] = alpha
        self.alpha_sum[..., :seq_len] += self.batch_alpha.sum(0)
        self.entropy_sum[..., :seq_len] += self.batch_entropy.sum(0)
        self.key_count[:seq_len] += len(self.indices)

    def result(self, prompt_set: str, lengths: list[int]) -> PatternStatistics:
        order = range(len(lengths))
        return PatternStatistics(
            prompt_set=prompt_set,
            causal=self.causal,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            lengths=list(lengths),
            classic_sums=torch.stack([self.classic[i] for i in order]),
            sink_alpha=torch.stack([self.alpha[i] for i in order]),
            sink_alpha_by_key=self.alpha_sum / self.key_count,
            entropy_by_query=self.entropy_sum / self.key_count,
        )


PATTERN_BYTES_BUDGET = 1 << 30


def _layer_pattern_bytes(n_heads: int, max_len: int) -> int:
    """One prompt's eager pattern of one layer with its softmax temporaries:
    about 3 live float32 copies of [head, T, T]."""
    return 3 * n_heads * max_len * max_len * 4


def _fitting_batch_size(batch_size: int, n_heads: int, max_len: int) -> int:
    """Shrink batches so one layer's patterns stay under ~1 GiB: this path is for
    short prompts, and long ones should not exhaust memory because a batch size
    was left at its default."""
    per_prompt = _layer_pattern_bytes(n_heads, max_len)
    return max(1, min(batch_size, PATTERN_BYTES_BUDGET // per_prompt))


def pattern_capture_bytes(arch, max_len: int) -> int:
    """Peak bytes the pattern capture needs for one prompt of ``max_len`` tokens
    (its smallest batch): one layer's live patterns plus the float16 sample of
    every layer."""
    sample = arch.n_layers * arch.n_heads * max_len * max_len * 2
    return _layer_pattern_bytes(arch.n_heads, max_len) + sample


def probe_patterns(
    handle: ModelHandle,
    prompts,
    *,
    batch_size: int = 16,
    n_sink_keys: int = DEFAULT_SINK_KEYS,
    keep_sample: bool = True,
    on_progress: Progress | None = None,
) -> PatternStatistics:
    """Run ``prompts`` (TokenizedPrompts) through the bridge and reduce every pattern.

    Each layer's pattern is reduced inside its hook and dropped, so at most one
    layer's [batch, head, T, T] pattern exists at a time. The hooks live only
    for the duration of each forward (TransformerLens removes them on exit).
    ``on_progress`` counts prompts under the label "<prompt set> (patterns)".
    """
    arch = handle.arch
    bridge = handle.bridge
    accumulator = _PatternAccumulator(arch.n_layers, arch.n_heads, n_sink_keys, arch.causal)
    batch_size = _fitting_batch_size(batch_size, arch.n_heads, max(prompts.lengths, default=1))
    sample_rows: dict[int, Tensor] = {}
    sample_tokens: Tensor | None = None
    advance = counter(on_progress, f"{prompts.name} (patterns)", len(prompts))
    for indices, tokens in prompts.batches(batch_size):
        accumulator.start_batch(indices, tokens)
        sample_row = indices.index(0) if keep_sample and 0 in indices else None

        def reduce_pattern(pattern: Tensor, hook, sample_row: int | None = sample_row) -> None:
            layer = int(_LAYER_OF_HOOK.search(hook.name).group(1))
            accumulator.add_layer(layer, pattern.detach())
            if sample_row is not None:
                sample_rows[layer] = pattern[sample_row].detach().to(torch.float16).cpu()

        with torch.inference_mode():
            bridge.run_with_hooks(
                tokens.to(handle.device),
                fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), reduce_pattern)],
                return_type=None,
            )
        accumulator.end_batch()
        if sample_row is not None:
            sample_tokens = tokens[sample_row].clone()
        advance(len(indices))
    stats = accumulator.result(prompts.name, prompts.lengths)
    if sample_tokens is not None:
        stats.sample_tokens = sample_tokens
        stats.sample_patterns = torch.stack([sample_rows[i] for i in range(arch.n_layers)])
    return stats
