"""Shared fixtures. Models are loaded once per session, never at import time."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    from headscope.probes.loading import load_model

    return load_model("tiny:llama")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (converted once into the user cache)."""
    from headscope.probes.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small valid run of tiny:llama (previous_token, first_token_sink on prose).
    Shared: tests copy it before changing anything."""
    import headscope

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    headscope.scan(
        "tiny:llama", prompts="prose", detectors="previous_token,first_token_sink",
        n_prompts=4, seq_len=16, out=out, on_progress=False,
    )  # fmt: skip
    return out
