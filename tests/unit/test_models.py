"""Model loading: specs, ArchInfo, the bridge over the same weights, and errors."""

from __future__ import annotations

import json

import pytest
import torch

from headscope.data import PromptSet
from headscope.errors import ModelLoadError
from headscope.probes.loading import load_model
from headscope.probes.model_catalog import available_models


@pytest.mark.parametrize(
    ("arch", "n_heads", "n_kv_heads", "causal"),
    [("llama", 4, 2, True), ("gpt2", 4, 4, True), ("gemma3", 4, 1, True), ("bert", 4, 4, False)],
)
def test_tiny_models_load_with_their_layout(arch, n_heads, n_kv_heads, causal):
    handle = load_model(f"tiny:{arch}")
    info = handle.arch
    assert (info.n_layers, info.n_heads, info.n_kv_heads) == (2, n_heads, n_kv_heads)
    assert info.causal is causal
    assert info.bos_token_id == handle.tokenizer.bos_token_id
    assert info.d_head * info.n_heads == info.d_model or arch == "gemma3"
    assert not handle.model.training


def test_tiny_models_are_deterministic():
    first, second = load_model("tiny:llama"), load_model("tiny:llama")
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_the_handle_encodes_a_text_as_its_prompt_sets_do(tiny_llama):
    text = "Monday, Tuesday, Wednesday"
    one = PromptSet(name="one", description="one text", kind="texts", texts=(text,))
    (tokens,) = tiny_llama.tokenize(one).tokens
    assert tiny_llama.encode(text) == tokens.tolist()
    assert tokens[0] == tiny_llama.bos_id == tiny_llama.arch.bos_token_id
    assert tiny_llama.encode(text, max_text_tokens=3) == tokens[:4].tolist()  # BOS not counted
    assert tiny_llama.pad_id == tiny_llama.tokenizer.pad_token_id


def test_bridge_wraps_the_same_weights(tiny_llama):
    tokens = tiny_llama.bridge.to_tokens("the quick brown fox jumps over the lazy dog")
    assert tokens[0, 0].item() == tiny_llama.arch.bos_token_id
    with torch.inference_mode():
        hf_logits = tiny_llama.model(tokens).logits
        bridge_logits = tiny_llama.bridge(tokens)
    assert torch.allclose(hf_logits, bridge_logits, atol=1e-5)
    hf_params = {p.data_ptr() for p in tiny_llama.model.parameters()}
    assert any(p.data_ptr() in hf_params for p in tiny_llama.bridge.parameters())


def test_available_models_lists_bundled_and_tiny_specs():
    specs = {row["spec"]: row for row in available_models()}
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6", "tiny:llama", "tiny:bert"} <= set(specs)
    assert specs["tiny:llama"]["available"] == "yes"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no-such-model", "unknown model spec"),
        ("tiny:mamba", "unknown tiny architecture"),
        ("", "empty model spec"),
        ("nobody/not-a-cached-model", "never downloads"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec, expected):
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_corrupt_weights_in_a_model_folder(tmp_path):
    handle = load_model("tiny:gpt2")
    handle.model.save_pretrained(tmp_path)
    handle.tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).arch.n_layers == 2
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="missing or corrupt"):
        load_model(str(tmp_path))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_arch_info_is_json_serialisable(tiny_llama):
    assert json.loads(json.dumps(tiny_llama.describe()))["arch"]["n_kv_heads"] == 2


def test_a_corrupt_weight_cache_entry_is_dropped_not_fatal(tmp_path, monkeypatch):
    """More in test_weight_cache.py; here the loader's own read and publish."""
    from headscope.probes import loading, weight_cache

    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"stands in for a GGUF")
    key = weight_cache.key_for("some-model", [source])
    handle = load_model("tiny:llama")
    loading._publish(key, handle.model, handle.tokenizer)
    model, _ = loading._read_cache(key)
    assert model.config.num_hidden_layers == 2
    (key.path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert loading._read_cache(key) is None
    assert not key.path.exists()
    key.path.mkdir()  # a folder without a marker
    assert loading._read_cache(key) is None
    assert not key.path.exists()
