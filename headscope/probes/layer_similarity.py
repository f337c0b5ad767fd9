"""How much each attention module, MLP and block changes the residual stream.

LLM-Drop (He et al. 2024) scores a module by ``Sim = mean_t cos(X, X + F(LN(X)))``
where X is the residual stream entering the module and F(LN(X)) what the
module adds to it; ShortGPT (Men et al. 2024) scores a block by its influence
``BI = 1 - mean_t cos(h_l, h_{l+1})``, with h_l the block's input and h_{l+1}
its output. A module whose output barely turns the residual stream is a
candidate for removal.

The residuals are read with scoped forward hooks on the HF module, never from
``output_hidden_states``: in transformers the last entry of that tuple has the
final norm applied, and a cosine against a normed vector is not a residual
step (docs/methods.md, "layer_redundancy"). Each branch's contribution is
read where it joins the residual: the attention module's output, or Gemma's
post-attention norm when the block has one; the MLP's output, or Gemma's
post-feed-forward norm.

Optionally the same forwards measure the cross-layer similarity of attention
maps (EchoAtt): the streaming attention function hands each layer's queries
and keys to ``headscope.kernels.cross_layer``, which compares every row with
the previous layer's row of the same head without materializing T x T.

Every mean is over the real tokens of the prompts (padding excluded), in
float64. Modules skipped by an ``Ablation`` (``skip``) are measured as they
run: a skipped branch adds nothing, so its Sim is exactly 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from headscope.errors import NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import BlockSites, block_sites
from headscope.progress import Progress, counter


@dataclass(kw_only=True)
class LayerSimilarity:
    """Per-layer residual similarities of one prompt set (float64, CPU)."""

    prompt_set: str
    n_tokens: int
    #: mean over tokens of cos(X, X + attention branch), X the block input
    attention: Float[Tensor, " layer"]
    #: mean over tokens of cos(X', X' + MLP branch), X' = X + attention branch
    mlp: Float[Tensor, " layer"]
    #: mean over tokens of cos(block input, block output) = 1 - ShortGPT's BI
    block: Float[Tensor, " layer"]
    #: mean over tokens of |branch| / |residual it joins|: how loud each branch is
    attention_ratio: Float[Tensor, " layer"]
    mlp_ratio: Float[Tensor, " layer"]
    #: mean over rows of cos(A_l[h, i], A_{l-1}[h, i]) (NaN for layer 0), if measured
    attention_map_cosine: Float[Tensor, "layer head"] | None = None
    #: the same rows' Jensen-Shannon divergence in nats (NaN for layer 0)
    attention_map_js: Float[Tensor, "layer head"] | None = None

    @property
    def block_influence(self) -> Tensor:
        return 1.0 - self.block


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Sums:
    """float64 token sums per layer, filled by the hooks of one forward at a time."""

    FIELDS = ("attention", "mlp", "block", "attention_ratio", "mlp_ratio")

    def __init__(self, n_layers: int):
        self.sums = {name: torch.zeros(n_layers, dtype=torch.float64) for name in self.FIELDS}
        self.n_tokens = 0
        self.valid: Tensor | None = None  # [batch, T] float64 on the model's device
        self.captured: dict[tuple[str, int], Tensor] = {}

    def start_batch(self, valid: Tensor) -> None:
        self.valid = valid.to(torch.float64)
        self.n_tokens += int(valid.sum())
        self.captured.clear()

    def _add(self, name: str, layer: int, per_token: Tensor) -> None:
        self.sums[name][layer] += float((per_token.to(torch.float64) * self.valid).sum())

    def add_block(self, layer: int, output: Tensor) -> None:
        """At the block's output every piece of this layer has been captured."""
        x = self.captured.pop(("input", layer)).float()
        attention = self.captured.pop(("attention", layer), None)
        mlp = self.captured.pop(("mlp", layer), None)
        y = output.float()
        self._add("block", layer, F.cosine_similarity(x, y, dim=-1))
        if attention is not None:
            attention = attention.float()
            self._add("attention", layer, F.cosine_similarity(x, x + attention, dim=-1))
            self._add("attention_ratio", layer, attention.norm(dim=-1) / x.norm(dim=-1))
            x = x + attention
        if mlp is not None:
            mlp = mlp.float()
            self._add("mlp", layer, F.cosine_similarity(x, x + mlp, dim=-1))
            self._add("mlp_ratio", layer, mlp.norm(dim=-1) / x.norm(dim=-1))

    def means(self) -> dict[str, Tensor]:
        return {name: value / max(self.n_tokens, 1) for name, value in self.sums.items()}


def _branch_modules(site: BlockSites) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The modules whose outputs are exactly what the attention and MLP add to the residual."""
    attention = site.post_attention_norm or site.attention
    mlp = site.post_mlp_norm or site.mlp
    return attention, mlp


@contextlib.contextmanager
def _similarity_hooks(sites: Sequence[BlockSites], sums: _Sums) -> Iterator[None]:
    def capture(kind: str, layer: int) -> Callable:
        def hook(_module, _inputs, output) -> None:
            sums.captured[(kind, layer)] = _first_output(output).detach()

        return hook

    def block_input(layer: int) -> Callable:
        def hook(_module, args: tuple, kwargs: dict) -> None:
            sums.captured[("input", layer)] = _block_input(args, kwargs).detach()

        return hook

    def block_output(layer: int) -> Callable:
        def hook(_module, _inputs, output) -> None:
            sums.add_block(layer, _first_output(output).detach())

        return hook

    removers = []
    try:
        for site in sites:
            attention, mlp = _branch_modules(site)
            removers.append(
                site.block.register_forward_pre_hook(block_input(site.layer), with_kwargs=True)
            )
            removers.append(attention.register_forward_hook(capture("attention", site.layer)))
            if mlp is not None:
                removers.append(mlp.register_forward_hook(capture("mlp", site.layer)))
            removers.append(site.block.register_forward_hook(block_output(site.layer)))
        yield
    finally:
        for remover in removers:
            remover.remove()


def measure_layer_similarity(
    handle: ModelHandle,
    prompts,
    *,
    batch_size: int = 8,
    skip: Sequence[tuple[str, int]] = (),
    attention_maps: bool = False,
    on_progress: Progress | None = None,
) -> LayerSimilarity:
    """LLM-Drop Sim of every attention module, MLP and block on ``prompts``.

    ``skip``: modules removed while measuring (("attn" | "mlp" | "block", layer)),
    for iterative dropping. ``attention_maps``: also the cross-layer similarity
    of attention maps (runs the streaming attention, so costs about twice the
    attention of a plain forward).
    """
    from headscope.probes.ablation import Ablation
    from headscope.probes.streaming import forward_batch, streaming_attention

    sites = block_sites(handle.model, handle.arch)
    if not sites[0].pre_norm:
        raise NotApplicable(
            "a post-norm block (BERT) normalizes X + F(X), so the residual step LLM-Drop "
            "and ShortGPT measure does not exist"
        )
    arch = handle.arch
    sums = _Sums(arch.n_layers)
    maps = _MapSums(arch.n_layers, arch.n_heads) if attention_maps else None
    ablation = Ablation(skip=tuple(skip)) if skip else None
    advance = counter(on_progress, f"{prompts.name} (layer similarity)", len(prompts))
    with contextlib.ExitStack() as stack:
        if ablation is not None:  # first, so the capture hooks see the skipped outputs
            stack.enter_context(handle.ablated(ablation, bridge=False))
        stack.enter_context(_similarity_hooks(sites, sums))
        if maps is not None:
            stack.enter_context(streaming_attention(handle))
        for batch in prompts.padded(batch_size, handle.pad_id):
            valid = batch.mask
            sums.start_batch(valid.to(handle.device))
            if maps is not None:
                maps.start_batch(valid)
                forward_batch(handle, batch, cross_layer=maps)
            else:
                with torch.inference_mode():
                    handle.model.base_model(
                        input_ids=batch.tokens.to(handle.device),
                        attention_mask=valid.long().to(handle.device),
                        use_cache=False,
                    )
            advance(len(batch.lengths))
    means = sums.means()
    cosine, js = maps.means() if maps is not None else (None, None)
    if not any(site.mlp is not None for site in sites):
        means["mlp"][:] = math.nan
        means["mlp_ratio"][:] = math.nan
    return LayerSimilarity(
        prompt_set=prompts.name,
        n_tokens=sums.n_tokens,
        attention=means["attention"],
        mlp=means["mlp"],
        block=means["block"],
        attention_ratio=means["attention_ratio"],
        mlp_ratio=means["mlp_ratio"],
        attention_map_cosine=cosine,
        attention_map_js=js,
    )


class _MapSums:
    """Cross-layer attention-map similarity, fed by the streaming attention function.

    Keeps the previous layer's queries and keys of the current batch (O(T d),
    never a score matrix) and compares each layer with it as soon as it runs.
    """

    def __init__(self, n_layers: int, n_heads: int):
        self.cosine = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.js = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.rows = torch.zeros(n_layers, dtype=torch.float64)
        self.previous: tuple | None = None

    def start_batch(self, valid: Tensor) -> None:
        self.previous = None
        self.valid = valid

    def add(
        self,
        layer: int,
        query: Tensor,
        key: Tensor,
        *,
        scale: float,
        window: int | None,
        causal: bool,
        key_padding_mask: Tensor | None,
    ) -> None:
        """Compare ``layer``'s attention with the previous layer's, then remember it."""
        from headscope.kernels.cross_layer import cross_layer_similarity

        previous, self.previous = self.previous, (layer, query, key, scale, window)
        if previous is None or previous[0] != layer - 1:
            return
        _, q_a, k_a, scale_a, window_a = previous
        result = cross_layer_similarity(
            q_a, k_a, query, key, scale_a=scale_a, scale_b=scale, causal=causal,
            key_padding_mask=key_padding_mask, window_a=window_a, window_b=window,
        )  # fmt: skip
        rows = self.valid.to(torch.float64)[:, None, :]  # [b, 1, T]
        self.cosine[layer] += (result.cosine.double().cpu() * rows).sum((0, 2))
        self.js[layer] += (result.js.double().cpu() * rows).sum((0, 2))
        self.rows[layer] += float(self.valid.sum())

    def means(self) -> tuple[Tensor, Tensor]:
        rows = self.rows[:, None]
        cosine = torch.where(rows > 0, self.cosine / rows.clamp(min=1), math.nan)
        js = torch.where(rows > 0, self.js / rows.clamp(min=1), math.nan)
        return cosine, js
