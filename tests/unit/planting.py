"""Plant known behaviour into the weights of a fresh tiny:llama, so detectors have a right answer.

tiny:llama: 2 layers, d_model 64, 4 query heads of 16 dims sharing 2 KV heads
(heads 0-1 read KV head 0, heads 2-3 KV head 1). Every planting edits weights
only; the probes then run the model as usual.

Attention to a chosen token: every token's embedding gets a constant feature
(column CONSTANT); the chosen token gets a marker feature of its own. The
planted head's query is that constant feature alone and its key reads the
marker, both in dim 7 of the head: in HF's RoPE layout dims 7 and 15 form the
slowest-rotating pair (about 3e-4 rad per position), so q·k barely depends on
distance and the chosen token wins every row that can see it.
"""

from __future__ import annotations

import torch

from headscope.probes.handle import ModelHandle
from headscope.probes.loading import load_model
from headscope.probes.sites import block_sites

CONSTANT = 3
SLOW_ROPE_DIM = 7
D_HEAD = 16


def fresh_tiny_llama() -> ModelHandle:
    return load_model("tiny:llama")


def _embedding(handle: ModelHandle) -> torch.Tensor:
    return handle.model.model.embed_tokens.weight


@torch.no_grad()
def plant_attention_to_token(
    handle: ModelHandle, *, layer: int, head: int, token_id: int, marker: int, strength: float = 3.0
) -> None:
    """Make (layer, head) attend to ``token_id`` wherever it is visible."""
    embedding = _embedding(handle)
    embedding[:, CONSTANT] = 10.0
    embedding[:, marker] = 0.0
    embedding[token_id, marker] = 10.0
    attention = handle.model.model.layers[layer].self_attn
    group = handle.arch.n_heads // handle.arch.n_kv_heads
    q_rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
    attention.q_proj.weight[q_rows] = 0.0
    attention.q_proj.weight[head * D_HEAD + SLOW_ROPE_DIM, CONSTANT] = strength
    kv = head // group
    attention.k_proj.weight[kv * D_HEAD + SLOW_ROPE_DIM] = 0.0
    attention.k_proj.weight[kv * D_HEAD + SLOW_ROPE_DIM, marker] = strength


@torch.no_grad()
def plant_massive_activation(
    handle: ModelHandle, *, layer: int, token_id: int, marker: int, dim: int, value: float
) -> None:
    """Make ``layer``'s MLP write about ``value`` into residual ``dim`` at ``token_id`` only.

    One MLP neuron reads the token's marker feature (gate and up), and the
    down projection sends it to ``dim``; its size is calibrated with one forward.
    """
    embedding = _embedding(handle)
    embedding[:, marker] = 0.0
    embedding[token_id, marker] = 10.0
    mlp = handle.model.model.layers[layer].mlp
    neuron = 0
    mlp.gate_proj.weight[neuron] = 0.0
    mlp.up_proj.weight[neuron] = 0.0
    mlp.gate_proj.weight[neuron, marker] = 5.0
    mlp.up_proj.weight[neuron, marker] = 5.0
    mlp.down_proj.weight[:, neuron] = 0.0
    mlp.down_proj.weight[dim, neuron] = 1.0
    written = {}
    hook = mlp.register_forward_hook(lambda _m, _i, out: written.setdefault("out", out[0, 0, dim]))
    try:
        handle.model(torch.tensor([[token_id, 5, 6, 7]]))
    finally:
        hook.remove()
    mlp.down_proj.weight[dim, neuron] = value / float(written["out"])


@torch.no_grad()
def plant_successor_head(
    handle: ModelHandle, *, layer: int, head: int, sources: list[int], successors: list[int]
) -> None:
    """Make (layer, head)'s effective OV circuit map each source token to its successor.

    Recomputes, straight from the Llama modules, what the head reads for each
    source token: layer 0's MLP on the token's embedding (its pre-MLP norm
    first, no attention), through layer ``layer``'s input norm, times the
    head's W_V. Then only this head's W_O columns of o_proj are set, by least
    squares, so that the head writes the successor's unembedding direction
    (exact while len(sources) <= d_head). W_V is shared with the sibling head
    of the same KV head, so it is left alone; every other weight is untouched.
    """
    model = handle.model.model
    first = model.layers[0]
    embedded = model.embed_tokens.weight[sources]
    effective = first.mlp(first.post_attention_layernorm(embedded))
    normed = model.layers[layer].input_layernorm(effective)
    attention = model.layers[layer].self_attn
    kv = head // (handle.arch.n_heads // handle.arch.n_kv_heads)
    values = normed @ attention.v_proj.weight[kv * D_HEAD : (kv + 1) * D_HEAD].T  # [n, d_head]
    targets = handle.model.lm_head.weight[successors]  # [n, d_model]: unembedding rows
    w_o = torch.linalg.lstsq(values.double(), targets.double()).solution  # [d_head, d_model]
    attention.o_proj.weight[:, head * D_HEAD : (head + 1) * D_HEAD] = w_o.T.float()


def _mlp_out(mlp: torch.nn.Module) -> torch.nn.Module:
    return getattr(mlp, "down_proj", None) or mlp.c_proj


@torch.no_grad()
def plant_identity_block(handle, layer: int) -> None:
    """Zero what ``layer``'s attention and MLP add to the residual: the block is a no-op."""
    site = block_sites(handle.model, handle.arch)[layer]
    for projection in (site.output_projection, _mlp_out(site.mlp)):
        projection.weight.zero_()
        if projection.bias is not None:
            projection.bias.zero_()


# ------------------------------------------------------------ a refusal head

HARM_WORD = "bomb"
REFUSE_TEXT = " I cannot."
COMPLY_TEXT = " Sure."
HARM_MARKER = 5  # embedding column marking the harm word
REFUSE_DIM = 40  # residual column only the refusal head writes
VALUE_DIM = 0  # the head's value dim that carries the marker


@torch.no_grad()
def plant_refusal_head(
    handle: ModelHandle, *, layer: int = 1, head: int = 2, write: float = 5.0, unembed: float = 4.0
) -> dict[str, int]:
    """Make (layer, head) the model's only refusal mechanism; returns the token ids used.

    Three tokens are added to the tokenizer: the harm word "bomb", a refusal
    " I cannot." and a compliance " Sure." (one token each, so one greedy step
    says it all, and a repeated refusal still reads as one to the judge). The
    head attends to the harm word wherever it is visible
    (``plant_attention_to_token``); its value reads the word's marker and its
    W_O writes residual column ``REFUSE_DIM``, which the unembedding maps to
    the refusal token, while the constant column every token carries maps to
    the compliance token. So with the head intact the greedy continuation of a
    prompt containing "bomb" is " I cannot." and otherwise " Sure."; with the
    head zeroed, or its query scaled (attention spread over the prompt), it is
    " Sure." everywhere. The sibling head sharing its KV head stops writing
    the value dim, so no other head carries the signal.
    """
    tokenizer = handle.tokenizer
    tokenizer.add_tokens([HARM_WORD, REFUSE_TEXT, COMPLY_TEXT])
    handle.model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = {
        text: tokenizer.convert_tokens_to_ids(text)
        for text in (HARM_WORD, REFUSE_TEXT, COMPLY_TEXT)
    }
    harm, refuse, comply = ids[HARM_WORD], ids[REFUSE_TEXT], ids[COMPLY_TEXT]
    plant_attention_to_token(handle, layer=layer, head=head, token_id=harm, marker=HARM_MARKER)
    _embedding(handle)[:, REFUSE_DIM] = 0.0
    attention = handle.model.model.layers[layer].self_attn
    group = handle.arch.n_heads // handle.arch.n_kv_heads
    kv = head // group
    attention.v_proj.weight[kv * D_HEAD + VALUE_DIM] = 0.0
    attention.v_proj.weight[kv * D_HEAD + VALUE_DIM, HARM_MARKER] = 1.0
    for sibling in range(kv * group, (kv + 1) * group):
        attention.o_proj.weight[:, sibling * D_HEAD + VALUE_DIM] = 0.0
    attention.o_proj.weight[REFUSE_DIM, head * D_HEAD + VALUE_DIM] = write
    unembedding = handle.model.lm_head.weight
    unembedding[refuse] = 0.0
    unembedding[refuse, REFUSE_DIM] = unembed
    unembedding[comply] = 0.0
    unembedding[comply, CONSTANT] = unembed
    return {"harm": harm, "refuse": refuse, "comply": comply}
