"""The streaming probe on tiny models: equal to the full-pattern probe, padded or
not, on every tiny architecture; scoped; deterministic."""

from __future__ import annotations

import pytest
import torch

from headscope.data import get_prompt_set
from headscope.probes.loading import load_model
from headscope.probes.patterns import probe_patterns
from headscope.probes.streaming import ATTENTION_NAME, probe_streaming, streaming_attention

TOLERANCE = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan())
    both = ~a.isnan()
    return float((a[both] - b[both]).abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bert"])
@pytest.mark.parametrize("prompt_set", ["prose", "ordinal"])
def test_streaming_equals_full_patterns(arch, prompt_set):
    handle = load_model(f"tiny:{arch}")
    # gemma3's tiny config has a 16-token sliding window: 33 tokens cross it
    prompts = get_prompt_set(prompt_set, n_prompts=6, seq_len=33).tokenize(
        handle.tokenizer, bos_token_id=handle.arch.bos_token_id
    )
    if prompt_set == "ordinal":
        assert len(set(prompts.lengths)) > 1  # unequal lengths: right padding
    streaming = probe_streaming(handle, prompts, batch_size=4)
    patterns = probe_patterns(handle, prompts, batch_size=4)
    assert _max_diff(streaming.sink_alpha, patterns.sink_alpha) <= TOLERANCE
    assert _max_diff(streaming.sink_alpha_by_key, patterns.sink_alpha_by_key) <= TOLERANCE
    assert _max_diff(streaming.entropy_by_query, patterns.entropy_by_query) <= TOLERANCE
    assert streaming.residual_norm_by_pos.shape == (2, max(prompts.lengths))
    assert (streaming.residual_norm_by_pos > 0).all()


def test_probe_is_scoped_and_deterministic(tiny_llama):
    prompts = get_prompt_set("ordinal").tokenize(
        tiny_llama.tokenizer, bos_token_id=tiny_llama.arch.bos_token_id
    )
    before = tiny_llama.model.config._attn_implementation
    first = probe_streaming(tiny_llama, prompts, batch_size=5)
    second = probe_streaming(tiny_llama, prompts, batch_size=5)
    assert tiny_llama.model.config._attn_implementation == before != ATTENTION_NAME
    for name, value in first.tensors().items():
        assert torch.equal(value.nan_to_num(-1), second.tensors()[name].nan_to_num(-1)), name


def test_attention_function_outside_a_probe_is_plain_sdpa(tiny_llama):
    tokens = torch.tensor([[0, 17, 300, 41, 17, 300]])
    with torch.inference_mode():
        expected = tiny_llama.model(tokens).logits
        with streaming_attention(tiny_llama):
            inside = tiny_llama.model(tokens).logits
    assert torch.allclose(expected, inside, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bert"])
def test_output_norm_after_w_o_equals_each_heads_projected_output(arch):
    """‖z_h W_O^h‖ from the Gram matrix equals the head's slice of the output
    projection applied to the z the model itself feeds that projection."""
    from headscope.probes.sites import block_sites, head_output_weight

    handle = load_model(f"tiny:{arch}")
    arch_info = handle.arch
    prompts = get_prompt_set("prose", n_prompts=4, seq_len=24).tokenize(
        handle.tokenizer, bos_token_id=arch_info.bos_token_id
    )
    assert len(set(prompts.lengths)) == 1  # one unpadded batch: the profile is a plain mean
    sites = block_sites(handle.model, arch_info)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        s.output_projection.register_forward_pre_hook(
            lambda _m, args, layer=s.layer: seen.setdefault(layer, args[0].detach().clone())
        )
        for s in sites
    ]
    try:
        stats = probe_streaming(handle, prompts, batch_size=4)
    finally:
        for hook in hooks:
            hook.remove()
    dh = arch_info.d_head
    for s in sites:
        z = seen[s.layer].double()  # [b, T, H * d_head]
        expected = torch.stack(
            [
                (z[..., h * dh : (h + 1) * dh] @ head_output_weight(s, h, arch_info).double())
                .norm(dim=-1)
                .mean(0)
                for h in range(arch_info.n_heads)
            ]
        )  # [H, T]
        got = stats.profiles["output_norm_after_wo"][s.layer]
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), s.layer
    # and the norm before W_O is not the same quantity
    assert not torch.allclose(stats.profiles["output_norm"], stats.profiles["output_norm_after_wo"])
