"""Where each per-head quantity lives inside a Hugging Face model.

Ablations, the successor-head OV circuit, head importance and the baked
checkpoints all need the same handful of places in every block: the input of
the attention output projection (the heads' outputs ``z``, concatenated), the
query (after any query norm, so that scaling it scales the attention logits),
the value and output weights of one head, the MLP and the norms around them.
This module finds them once per architecture family, by the attribute names
transformers uses, so the rest of headscope never spells ``o_proj`` or
``c_proj``:

- Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2, Gemma 3 ...):
  ``self_attn.{q_proj,v_proj,o_proj[,q_norm]}``, ``mlp``, with Gemma's extra
  post-attention and pre/post-feed-forward norms.
- GPT-2: ``attn.{c_attn,c_proj}`` (fused QKV; ``Conv1D`` weights are [in, out]).
- BERT encoders: ``attention.self.query``, ``attention.output.dense``; heads
  only (a post-norm block has no residual branch to skip).

Everything here is read-only: callers that edit weights do so on copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.errors import HeadscopeError
from headscope.probes.handle import ArchInfo


@dataclass(frozen=True)
class BlockSites:
    """The modules of one transformer block that headscope hooks or reads."""

    layer: int
    block: torch.nn.Module
    attention: torch.nn.Module
    output_projection: torch.nn.Module  # input: the heads' outputs z, concatenated
    query_projection: torch.nn.Module  # output: the queries (layout: query_layout)
    query_layout: str  # "flat" [.., H*dh] or "fused_qkv" [.., 3*H*dh], queries first (GPT-2)
    query_norm: torch.nn.Module | None  # normalises queries after the projection, if any
    value_projection: torch.nn.Module
    value_layout: str  # "separate" (v_proj) or "fused_qkv" (GPT-2)
    mlp: torch.nn.Module | None  # None where a block has no skippable MLP branch
    input_norm: torch.nn.Module | None  # the attention's pre-norm
    pre_mlp_norm: torch.nn.Module | None
    post_attention_norm: torch.nn.Module | None  # Gemma: normalises attn output
    post_mlp_norm: torch.nn.Module | None
    pre_norm: bool  # residual branches can be skipped (False for post-norm BERT)


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


def block_list(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList of n_layers modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise HeadscopeError("cannot find the model's list of transformer blocks")


def _first(module: torch.nn.Module, *names: str) -> torch.nn.Module | None:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    return None


def block_sites(model: torch.nn.Module, arch: ArchInfo) -> list[BlockSites]:
    """The sites of every block of ``model``; a clear error for an unknown layout."""
    return [_sites_of(i, block) for i, block in enumerate(block_list(model, arch.n_layers))]


def _sites_of(layer: int, block: torch.nn.Module) -> BlockSites:
    attention = _first(block, "self_attn", "attn")
    if attention is not None and hasattr(attention, "o_proj"):  # Llama family, Gemma
        gemma_norms = hasattr(block, "pre_feedforward_layernorm")
        q_norm = _first(attention, "q_norm")
        return BlockSites(
            layer=layer,
            block=block,
            attention=attention,
            output_projection=attention.o_proj,
            query_projection=attention.q_proj,
            query_layout="flat",
            query_norm=q_norm,
            value_projection=attention.v_proj,
            value_layout="separate",
            mlp=_first(block, "mlp"),
            input_norm=_first(block, "input_layernorm"),
            pre_mlp_norm=_first(
                block, "pre_feedforward_layernorm" if gemma_norms else "post_attention_layernorm"
            ),
            post_attention_norm=_first(block, "post_attention_layernorm") if gemma_norms else None,
            post_mlp_norm=_first(block, "post_feedforward_layernorm"),
            pre_norm=True,
        )
    if attention is not None and hasattr(attention, "c_attn"):  # GPT-2
        return BlockSites(
            layer=layer,
            block=block,
            attention=attention,
            output_projection=attention.c_proj,
            query_projection=attention.c_attn,
            query_layout="fused_qkv",
            query_norm=None,
            value_projection=attention.c_attn,
            value_layout="fused_qkv",
            mlp=_first(block, "mlp"),
            input_norm=_first(block, "ln_1"),
            pre_mlp_norm=_first(block, "ln_2"),
            post_attention_norm=None,
            post_mlp_norm=None,
            pre_norm=True,
        )
    bert = _first(block, "attention")
    if bert is not None and hasattr(bert, "self") and hasattr(bert, "output"):  # BERT
        return BlockSites(
            layer=layer,
            block=block,
            attention=bert,
            output_projection=bert.output.dense,
            query_projection=bert.self.query,
            query_layout="flat",
            query_norm=None,
            value_projection=bert.self.value,
            value_layout="separate",
            mlp=None,
            input_norm=None,
            pre_mlp_norm=None,
            post_attention_norm=None,
            post_mlp_norm=None,
            pre_norm=False,
        )
    raise HeadscopeError(
        f"headscope does not know where the attention heads of {type(block).__name__} live; "
        "supported: Llama-style decoders (q_proj/o_proj), GPT-2 (c_attn/c_proj), BERT"
    )


def query_heads_view(output: Tensor, layout: str, arch: ArchInfo) -> Tensor:
    """The query part of a query projection's output as [..., head, d_head] (a view)."""
    width = arch.n_heads * arch.d_head
    if layout == "flat":
        return output.view(*output.shape[:-1], arch.n_heads, arch.d_head)
    if layout == "fused_qkv":
        return output[..., :width].unflatten(-1, (arch.n_heads, arch.d_head))
    raise ValueError(f"unknown query layout '{layout}'")


def head_value_weight(
    sites: BlockSites, head: int, arch: ArchInfo
) -> tuple[Float[Tensor, "d_model d_head"], Float[Tensor, " d_head"] | None]:
    """W_V of query head ``head`` (its KV head's value map, GQA-aware) and its bias."""
    kv = head // arch.gqa_group_size
    dh = arch.d_head
    module = sites.value_projection
    if sites.value_layout == "fused_qkv":  # Conv1D [d_model, 3 * H * dh]: q | k | v
        start = 2 * arch.n_heads * dh + kv * dh
        weight = module.weight[:, start : start + dh]
        bias = None if module.bias is None else module.bias[start : start + dh]
        return weight, bias
    weight = module.weight[kv * dh : (kv + 1) * dh].T  # Linear [n_kv * dh, d_model]
    bias = None if module.bias is None else module.bias[kv * dh : (kv + 1) * dh]
    return weight, bias


def head_output_weight(
    sites: BlockSites, head: int, arch: ArchInfo
) -> Float[Tensor, "d_head d_model"]:
    """W_O of ``head``: the rows of the output projection its d_head outputs feed."""
    dh = arch.d_head
    weight = sites.output_projection.weight
    if is_conv1d(sites.output_projection):  # [H * dh, d_model]
        return weight[head * dh : (head + 1) * dh]
    return weight[:, head * dh : (head + 1) * dh].T  # Linear [d_model, H * dh]


def zero_head_output_weight(sites: BlockSites, head: int, arch: ArchInfo) -> None:
    """Zero ``head``'s slice of the output projection in place (callers pass a copy)."""
    dh = arch.d_head
    with torch.no_grad():
        weight = sites.output_projection.weight
        if is_conv1d(sites.output_projection):
            weight[head * dh : (head + 1) * dh] = 0
        else:
            weight[:, head * dh : (head + 1) * dh] = 0


def model_body(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its unembedding (LlamaModel inside LlamaForCausalLM): run it
    alone to unembed only the positions a caller needs."""
    return getattr(model, "base_model", model)


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm applied before the unembedding (model.norm, ln_f), if any."""
    return _first(model_body(model), "norm", "ln_f", "final_layernorm")


def unembedding(model: torch.nn.Module) -> Float[Tensor, "d_model vocab"]:
    """W_U as [d_model, vocab] (the output embedding's weight, transposed)."""
    output = model.get_output_embeddings()
    if output is None:
        raise HeadscopeError("this model has no output embedding (unembedding) to read")
    return output.weight.T


def embed_tokens(model: torch.nn.Module, token_ids: Tensor) -> Tensor:
    """The model's own token embedding (Gemma's scaled embedding included), no positions."""
    return model.get_input_embeddings()(token_ids)
