"""A small byte-level BPE tokenizer trained on the standard library's prose.

The ``tiny:<arch>`` test models need a real tokenizer (so prompt sets,
duplicate-token patterns and BOS handling behave as on a real model) without
downloading one. Training a 1,024-entry BPE on 100 KB of ``pydoc_data.topics``
takes a fraction of a second and is deterministic, so it is rebuilt on demand
and memoized per process.
"""

from __future__ import annotations

import functools

TINY_VOCAB_SIZE = 1024
BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text[:100_000]], trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A fresh ``PreTrainedTokenizerFast`` with BOS/EOS/PAD/MASK special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
    )
