"""The ablation engine on tiny models: methods, both capture paths, GQA, scoping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from planting import fresh_tiny_llama, plant_attention_to_token

from headscope.ablation_spec import head_name, parse_head_name
from headscope.errors import HeadscopeError
from headscope.probes.ablation import (
    Ablation,
    capture_head_outputs,
    check_heads,
    mean_ablation,
    parse_heads,
    resample_ablation,
)
from headscope.probes.loading import load_model

TOKENS = torch.tensor(
    [[1, 50, 60, 70, 80, 90, 100, 110, 120, 130], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
)


def logits(handle, tokens=TOKENS):
    with torch.no_grad():
        return handle.model(tokens).logits


def bridge_logits(handle, tokens=TOKENS):
    with torch.no_grad():
        return handle.bridge(tokens)


def ablations(handle):
    """One ablation of every kind, on heads of both layers."""
    return {
        "zero": Ablation(method="zero", heads=((1, 0), (0, 3))),
        "query_scale": Ablation(method="query_scale", heads=((1, 0), (0, 3))),
        "mean": mean_ablation(handle, [(1, 0), (0, 2)], n_prompts=4),
        "mean_per_position": mean_ablation(handle, [(1, 1)], n_prompts=4, per_position=True),
        "resample": resample_ablation(handle, [(1, 1), (0, 0)], n_prompts=3),
        "skip_attn_mlp": Ablation(skip=(("attn", 0), ("mlp", 1))),
        "skip_block": Ablation(skip=(("block", 1),)),
    }


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_every_method_changes_the_model_identically_on_both_capture_paths(arch):
    handle = load_model(f"tiny:{arch}")
    base = logits(handle)
    for name, ablation in ablations(handle).items():
        with handle.ablated(ablation, bridge=True):
            hf, tl = logits(handle), bridge_logits(handle)
        assert (hf - base).abs().max() > 1e-3, f"{arch} {name} changed nothing"
        assert (hf - tl).abs().max() <= 1e-4, f"{arch} {name}: HF and TransformerLens disagree"
    assert torch.equal(logits(handle), base), "an ablation stayed attached"
    assert torch.allclose(bridge_logits(handle), base, atol=1e-5)


def test_zero_and_mean_write_exactly_the_reference_into_z(tiny_llama):
    means = mean_ablation(tiny_llama, [(1, 2)], n_prompts=4)
    for ablation, expected in ((Ablation(heads=((1, 2),)), torch.zeros(16)), (means, None)):
        with tiny_llama.ablated(ablation), capture_head_outputs(tiny_llama, [1]) as z:
            logits(tiny_llama)
        want = expected if expected is not None else means.reference[(1, 2)]
        assert torch.allclose(z[1][:, :, 2], want.expand_as(z[1][:, :, 2]))


def test_mean_reference_is_the_mean_over_real_tokens(tiny_llama):
    pooled = mean_ablation(tiny_llama, [(0, 1)], n_prompts=3)
    per_position = mean_ablation(tiny_llama, [(0, 1)], n_prompts=3, per_position=True)
    prompts = tiny_llama.tokenize("prose", 3)  # the reference prompts of both ablations
    outputs = []
    with capture_head_outputs(tiny_llama, [0]) as z, torch.no_grad():
        for tokens in prompts.tokens:
            tiny_llama.model(tokens[None])
            outputs.append(z[0][0, :, 1])
    stacked = torch.cat(outputs)
    assert torch.allclose(pooled.reference[(0, 1)], stacked.mean(0), atol=1e-5)
    assert torch.allclose(per_position.reference[(0, 1)][0], outputs[0][0], atol=1e-5)
    assert pooled.reference_info["n_tokens"] == stacked.shape[0]


def test_gqa_siblings_are_untouched(tiny_llama):
    """Heads 0 and 1 share KV head 0: ablating head 0 leaves head 1's output bit-identical."""
    assert tiny_llama.arch.gqa_group_size == 2
    with capture_head_outputs(tiny_llama, [1]) as z:
        logits(tiny_llama)
    before = z[1].clone()
    for method in ("zero", "query_scale"):
        with tiny_llama.ablated(Ablation(method=method, heads=((1, 0),))):
            with capture_head_outputs(tiny_llama, [1]) as z:
                logits(tiny_llama)
        assert torch.equal(z[1][:, :, 1], before[:, :, 1]), method
        assert torch.equal(z[1][:, :, 2:], before[:, :, 2:]), method
        assert not torch.allclose(z[1][:, :, 0], before[:, :, 0]), method


def test_query_scaling_makes_attention_uniform_on_both_capture_paths():
    """A head planted to attend to BOS becomes uniform under query scaling, in the
    streaming statistics and in TransformerLens patterns; its GQA sibling does not move."""
    from headscope.data import get_prompt_set
    from headscope.probes.patterns import probe_patterns
    from headscope.probes.streaming import probe_streaming

    handle = fresh_tiny_llama()
    bos = handle.arch.bos_token_id
    plant_attention_to_token(handle, layer=1, head=3, token_id=bos, marker=11)
    prompts = get_prompt_set("prose", n_prompts=2, seq_len=12).tokenize(
        handle.tokenizer, bos_token_id=bos
    )
    uniform = torch.log(torch.arange(1, 13, dtype=torch.float64))  # row i sees i + 1 keys
    plain = probe_streaming(handle, prompts)
    assert (plain.entropy_by_query[1, 3] - uniform).abs().max() > 1.0  # a sharp sink head
    with handle.ablated(Ablation(method="query_scale", heads=((1, 3),)), bridge=True):
        streaming = probe_streaming(handle, prompts)
        patterns = probe_patterns(handle, prompts)
    for stats in (streaming, patterns):
        assert torch.allclose(stats.entropy_by_query[1, 3], uniform, atol=1e-4)
        assert torch.allclose(stats.entropy_by_query[1, 2], plain.entropy_by_query[1, 2], atol=1e-6)


def test_hooks_are_removed_when_the_body_raises(tiny_llama):
    base = logits(tiny_llama)
    with pytest.raises(RuntimeError, match="inside"):
        with tiny_llama.ablated(Ablation(heads=((0, 0), (1, 1))), bridge=True):
            raise RuntimeError("inside")
    assert torch.equal(logits(tiny_llama), base)
    assert torch.allclose(bridge_logits(tiny_llama), base, atol=1e-5)


def test_parse_and_check_heads():
    assert parse_heads("L3H5, l12h0,L3H5") == ((3, 5), (12, 0))
    assert parse_heads(["L0H1"]) == ((0, 1),)
    for bad in ("L3", "3.5", "L3H5;L1H1", "", "LxH1"):
        with pytest.raises(HeadscopeError, match="head"):
            parse_heads(bad)
    assert head_name(12, 0) == "L12H0" and parse_head_name(" l12 H0 ") == (12, 0)
    assert all(parse_head_name(head_name(layer, 7)) == (layer, 7) for layer in range(30))
    with pytest.raises(ValueError) as standalone:  # the exportable module cannot use headscope's
        parse_head_name("L3H5;L1H1")
    with pytest.raises(HeadscopeError) as ours:
        parse_heads("L0H0,L3H5;L1H1")
    assert str(ours.value) == str(standalone.value)
    assert str(ours.value).startswith("malformed head 'L3H5;L1H1'; write heads as L<layer>H<head>")
    arch = load_model("tiny:llama").arch
    check_heads([(1, 3)], arch)
    with pytest.raises(HeadscopeError, match=r"L2H0, L0H4 are outside this model"):
        check_heads([(2, 0), (0, 4), (1, 1)], arch)


def test_invalid_ablations_are_refused(tiny_llama):
    with pytest.raises(HeadscopeError, match="unknown ablation method"):
        Ablation(method="scramble", heads=((0, 0),))
    with pytest.raises(HeadscopeError, match="needs reference outputs for L0H0"):
        Ablation(method="mean", heads=((0, 0),))
    with pytest.raises(HeadscopeError, match="cannot skip 'ffn'"):
        Ablation(skip=(("ffn", 0),))
    with pytest.raises(HeadscopeError, match="outside this model"):
        with tiny_llama.ablated(Ablation(heads=((5, 0),))):
            pass
    with pytest.raises(HeadscopeError, match="post-norm encoder"):
        with load_model("tiny:bert").ablated(Ablation(skip=(("mlp", 0),))):
            pass
    short = mean_ablation(tiny_llama, [(0, 0)], n_prompts=1, per_position=True)
    short = Ablation(
        method="mean", heads=short.heads, reference={(0, 0): short.reference[(0, 0)][:4]}
    )
    with pytest.raises(ValueError, match="covers 4 positions but the input has 10"):
        with tiny_llama.ablated(short):
            logits(tiny_llama)


def test_spec_round_trip_keeps_every_field(tiny_llama):
    original = resample_ablation(tiny_llama, [(1, 2)], n_prompts=2)
    rebuilt = Ablation.from_spec(original.to_spec(tiny_llama))
    assert rebuilt.heads == original.heads and rebuilt.method == "resample"
    assert torch.equal(rebuilt.reference[(1, 2)], original.reference[(1, 2)])
    assert rebuilt.reference_info["n_prompts"] == 2
    scaled = Ablation(method="query_scale", heads=((0, 1),), epsilon=1e-3)
    assert math.isclose(Ablation.from_spec(scaled.to_spec(tiny_llama)).epsilon, 1e-3)
    with pytest.raises(HeadscopeError, match="newer"):
        Ablation.from_spec({**scaled.to_spec(tiny_llama), "version": 99})
