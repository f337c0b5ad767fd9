"""Tiny randomly initialised models of real architectures, for tests and demos.

``tiny:<arch>`` (``tiny:<arch>:<n_layers>`` for more than the default 2
layers) builds a small model of one of ``TINY_ARCHS`` with the built-in tiny
tokenizer. Initialisation is seeded, so every load gives identical weights and
tests can assert exact numbers. It lives apart from the loaders of real weights
because it needs no file, no cache and no download, only the transformers
config classes.
"""

from __future__ import annotations

from typing import Any

import torch

from headscope.errors import ModelLoadError

#: llama has grouped-query attention (4 heads, 2 KV heads), gemma3 one KV head, bert is an encoder
TINY_ARCHS = ("llama", "gpt2", "gemma3", "bert")


def load_tiny(name: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, source) of ``tiny:<name>``: a seeded random model of a real arch."""
    from headscope.probes.tiny_tokenizer import tiny_tokenizer

    arch, _, layers = name.partition(":")
    n_layers = None
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ModelLoadError(f"tiny:{name}: the layer count must be a positive integer")
        n_layers = int(layers)
    if arch not in TINY_ARCHS:
        raise ModelLoadError(
            f"unknown tiny architecture '{arch}'; choose one of "
            + ", ".join(f"tiny:{a}" for a in TINY_ARCHS)
        )
    tokenizer = tiny_tokenizer()
    config, model_class = tiny_config(arch, vocab_size=len(tokenizer), n_layers=n_layers)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = [model_class.__name__]  # TransformerLens picks its adapter by this
    torch.manual_seed(0)
    model = model_class(config)
    if arch == "bert":
        tokenizer.cls_token = tokenizer.bos_token
        tokenizer.sep_token = tokenizer.eos_token
    return model, tokenizer, f"tiny:{name} (random init, seed 0)"


def tiny_config(arch: str, *, vocab_size: int, n_layers: int | None = None) -> tuple[Any, Any]:
    """Config and model class of a tiny ``arch`` model (2 layers unless told, d_model 64)."""
    import transformers as tf

    common = {"vocab_size": vocab_size}
    layers = n_layers or 2
    if arch == "llama":
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        return config, tf.LlamaForCausalLM
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
        return config, tf.GPT2LMHeadModel
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=16,
            **common,
        )
        return config, tf.Gemma3ForCausalLM
    config = tf.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        **common,
    )
    return config, tf.BertForMaskedLM
