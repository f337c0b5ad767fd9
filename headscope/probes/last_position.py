"""The last-position hidden state of many prompts, clean and under many ablations, fast.

Safety-head scores (Ships, Sahara; METHODS.md §5) read one thing per prompt:
the final-normed hidden state at the last prompt position (what the
unembedding reads), once clean and once per ablated head or head set. A
naive sweep runs one full forward per head; ``LastPositionSweep`` runs the
same computation with three exact savings:

- **Only the last position is unembedded.** Batches are right-padded and the
  model body (blocks and final norm) runs alone; the hidden state at each
  prompt's last real token is gathered, and logits (``logits``) are computed
  on those [prompt, d_model] rows only.
- **Block replay** (``headscope.probes.replay``): the blocks below the lowest
  ablated layer cannot change, so they return the clean pass's outputs.
- **Shared prefix**: chat-formatted prompts share a long common token prefix
  (a system prompt and the chat markers). Per ablation, the prefix runs once
  at batch 1 with the ablation on; its KV cache is repeated over the batch
  and only each prompt's suffix runs, at positions offset by the prefix
  length. The prefix is the longest common prefix of the token ids, kept at
  least one token shorter than the shortest prompt.

Precision (``precision``): "float32" (default) runs the model as loaded.
"bfloat16" runs the body under CPU/GPU autocast: matrix products in
bfloat16, the residual stream, norms and the unembedding in float32. On CPUs
with AVX-512 BF16 the products run about 4x faster (``python
benchmarks/safety_sweep.py --matmul`` prints both rates), at the cost of
bfloat16's rounding in every product; the clean and the ablated passes are
rounded alike, so a no-op ablation still scores exactly 0. Not exact: the
tests bound its difference from float32, and the README reports how Ships'
ranking changes on SmolLM2.

Ablations: anything ``headscope.probes.ablation.Ablation`` expresses whose
effect at a position does not depend on that position: zero, pooled mean and
query scaling. Per-position mean or resample references are refused (they
would index positions the suffix pass renumbers); use ``share_prefix=False``
with replay only, or the plain forward, for those.

The fast path is checked against the plain full forward in
tests/unit/test_safety.py (all three methods, several heads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.errors import HeadscopeError
from headscope.probes.ablation import Ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.replay import BlockReplay
from headscope.probes.sites import block_sites, model_body

#: ``precision`` values: the dtype matrix products run in (None: as loaded)
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the token lists, capped so that every
    list keeps at least one token after it (0 for fewer than two lists)."""
    if len(token_ids) < 2:
        return 0
    shortest = min(len(ids) for ids in token_ids)
    first = token_ids[0]
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in token_ids):
        length += 1
    return length


class LastPositionSweep:
    """Final-normed last-position hidden states of fixed prompts, clean and ablated.

    ``token_ids``: one list of ids per prompt (BOS and chat markers included,
    as the model should see them). Prompts are sorted by length and batched
    up to ``batch_size`` rows and ``max_tokens`` padded suffix tokens (one
    long prompt may exceed it alone), so batches pad little. ``share_prefix``
    and ``replay`` switch the two exact savings (see the module doc); the
    plain path (both off) is one ordinary forward per batch. ``precision``:
    "float32" or "bfloat16" (autocast; see the module doc).
    """

    def __init__(
        self,
        handle: ModelHandle,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 64,
        max_tokens: int = 256,
        share_prefix: bool = True,
        replay: bool = True,
        precision: str = "float32",
    ) -> None:
        if not token_ids or any(len(ids) == 0 for ids in token_ids):
            raise HeadscopeError("the sweep needs at least one prompt, each of at least one token")
        if batch_size < 1:
            raise HeadscopeError(f"batch size must be a positive integer, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise HeadscopeError(
                f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}"
            )
        self.precision = precision
        self.handle = handle
        self.token_ids = [list(map(int, ids)) for ids in token_ids]
        self.prefix_length = common_prefix_length(self.token_ids) if share_prefix else 0
        self.replay = replay
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.blocks = [site.block for site in block_sites(handle.model, handle.arch)]
        self._batches = self._make_batches()
        self._replayers = [BlockReplay(self.blocks) for _ in self._batches]
        self._clean: Tensor | None = None

    @property
    def n_prompts(self) -> int:
        return len(self.token_ids)

    def _make_batches(self) -> list[tuple[list[int], Tensor, Tensor]]:
        """(prompt indices, right-padded suffix ids [b, s], mask [b, s]) per batch."""
        pad = self.handle.pad_id
        suffixes = [ids[self.prefix_length :] for ids in self.token_ids]
        # by length, so that a batch's rows are alike and padding is little
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        groups: list[list[int]] = [[]]
        for i in order:  # close a batch at batch_size rows or max_tokens padded tokens
            group = groups[-1]
            full = len(group) >= self.batch_size
            if group and (full or (len(group) + 1) * len(suffixes[i]) > self.max_tokens):
                groups.append([])
            groups[-1].append(i)
        batches = []
        for indices in groups:
            width = max(len(suffixes[i]) for i in indices)
            tokens = torch.full((len(indices), width), pad, dtype=torch.long)
            mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                tokens[row, : len(suffixes[i])] = torch.tensor(suffixes[i])
                mask[row, : len(suffixes[i])] = 1
            batches.append((indices, tokens, mask))
        return batches

    def _prefix_cache(self) -> list[tuple[Tensor, Tensor]] | None:
        """The prefix's (keys, values) per layer, run at batch 1 under whatever is installed."""
        if not self.prefix_length:
            return None
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([self.token_ids[0][: self.prefix_length]], device=self.handle.device)
        with self._autocast():
            model_body(self.handle.model)(input_ids=ids, cache=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _run(
        self, batch: int, prefix: list[tuple[Tensor, Tensor]] | None
    ) -> Float[Tensor, "batch d_model"]:
        indices, tokens, mask = self._batches[batch]
        device = self.handle.device
        rows = len(indices)
        kwargs: dict = {"input_ids": tokens.to(device)}
        if prefix is None:
            kwargs.update(attention_mask=mask.to(device), use_cache=False)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer, (keys, values) in enumerate(prefix):
                cache.update(
                    keys.expand(rows, *keys.shape[1:]),
                    values.expand(rows, *values.shape[1:]),
                    layer,
                )
            full_mask = torch.cat(
                [torch.ones(rows, self.prefix_length, dtype=torch.long), mask], dim=1
            )
            positions = self.prefix_length + torch.arange(tokens.shape[1])
            kwargs.update(
                attention_mask=full_mask.to(device),
                position_ids=positions[None].expand(rows, -1).to(device),
                cache=cache,
                use_cache=True,
            )
        with self._autocast():
            hidden = model_body(self.handle.model)(**kwargs).last_hidden_state
        last = mask.sum(1) - 1
        return hidden[torch.arange(rows, device=device), last.to(device)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.handle.device.type, dtype=dtype)

    @torch.inference_mode()
    def clean(self) -> Float[Tensor, "prompt d_model"]:
        """The unablated hidden states (computed once, recording the blocks for replay)."""
        if self._clean is None:
            prefix = self._prefix_cache()
            out = []
            for batch, replayer in enumerate(self._replayers):
                recording = replayer.recording() if self.replay else contextlib.nullcontext()
                with recording:
                    out.append(self._run(batch, prefix))
            self._clean = self._in_prompt_order(out)
        return self._clean

    @torch.inference_mode()
    def ablated(self, ablation: Ablation) -> Float[Tensor, "prompt d_model"]:
        """The hidden states with ``ablation`` installed."""
        self._check(ablation)
        self.clean()  # records the blocks replayed below
        lowest = min(ablation.layers) if ablation.layers else 0
        with self.handle.ablated(ablation, bridge=False):
            prefix = self._prefix_cache()
            out = []
            for batch, replayer in enumerate(self._replayers):
                below = replayer.below(lowest) if self.replay else contextlib.nullcontext()
                with below:
                    out.append(self._run(batch, prefix))
        return self._in_prompt_order(out)

    def _in_prompt_order(self, rows: list[Tensor]) -> Tensor:
        order = [i for indices, _, _ in self._batches for i in indices]
        out = torch.empty_like(torch.cat(rows))
        out[torch.tensor(order, device=out.device)] = torch.cat(rows)
        return out

    def _check(self, ablation: Ablation) -> None:
        if ablation.skip:
            raise HeadscopeError("the last-position sweep ablates heads only, not whole modules")
        if ablation.method == "resample" or any(v.dim() > 1 for v in ablation.reference.values()):
            if self.prefix_length:
                raise HeadscopeError(
                    "per-position references (resample, per-position mean) need the plain "
                    "path: build the sweep with share_prefix=False"
                )

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Float[Tensor, "prompt vocab"]:
        """The unembedding of ``hidden`` (float32 at least)."""
        output = self.handle.model.get_output_embeddings()
        logits = output(hidden.to(self.handle.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def kl_divergence(
    clean_logits: Tensor, ablated_logits: Tensor, *, eps: float = 1e-12
) -> Float[Tensor, " prompt"]:
    """KL(p_clean ‖ p_ablated) per row, nats, with ``eps`` inside the logs (float64)."""
    p = torch.softmax(clean_logits.double(), dim=-1)
    q = torch.softmax(ablated_logits.double(), dim=-1)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


@torch.inference_mode()
def plain_last_hidden(
    handle: ModelHandle, token_ids: Sequence[Sequence[int]], ablation: Ablation | None = None
) -> Float[Tensor, "prompt d_model"]:
    """The reference: one ordinary full forward per prompt, hidden state at its last token."""
    rows = []
    context = handle.ablated(ablation, bridge=False) if ablation else contextlib.nullcontext()
    with context:
        for ids in token_ids:
            tokens = torch.tensor([list(ids)], device=handle.device)
            rows.append(model_body(handle.model)(input_ids=tokens).last_hidden_state[0, -1])
    return torch.stack(rows)
