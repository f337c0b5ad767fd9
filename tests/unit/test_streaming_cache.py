"""StreamingLLM's rolling cache as one forward (probes/streaming_cache.py) and the
long-context experiment built on it (analyses/streaming_long.py).

The reference is the cache itself: for a one-layer model, the loss at query t
under a cache equals the model run on just the cached tokens with their cache
positions (0..cache_size-1), since layer-0 keys and values depend only on the
token and its position. That is what StreamingLLM's code computes.
"""

from __future__ import annotations

import math

import pytest
import torch

from headscope.analyses.streaming_long import run_streaming_window_long
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes import streaming_cache as cache_module
from headscope.probes.loading import load_model
from headscope.probes.streaming_cache import CacheView, rotate, streaming_cache, token_nll

LENGTH, CACHE, SINKS = 40, 12, 4


@pytest.fixture(scope="module")
def one_layer():
    return load_model("tiny:llama:1")


@pytest.fixture(scope="module")
def text(one_layer):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(5, one_layer.arch.vocab_size, (LENGTH,), generator=generator)


def _reference_nll(handle, tokens, view: CacheView) -> torch.Tensor:
    """Loss of each target from the cached tokens alone, at their cache positions."""
    out = []
    for t in range(len(tokens) - 1):
        if view.cache_size is None or t < view.cache_size:
            ids = tokens[: t + 1]
        else:
            recent = tokens[t - view.recent + 1 : t + 1]
            ids = torch.cat([tokens[: view.n_sinks], recent])
        with torch.no_grad():
            logits = handle.model(
                input_ids=ids[None], position_ids=torch.arange(len(ids))[None]
            ).logits[0, -1]
        out.append(-torch.log_softmax(logits.double(), -1)[tokens[t + 1]])
    return torch.stack(out)


@pytest.mark.parametrize(
    "view",
    [CacheView(), CacheView(cache_size=CACHE), CacheView(cache_size=CACHE, n_sinks=SINKS)],
    ids=["full", "window", "sinks"],
)
def test_one_forward_equals_the_cache_run_token_by_token(one_layer, text, view):
    with streaming_cache(one_layer, view):
        nll = token_nll(one_layer, text)
    assert nll.shape == (LENGTH - 1,)
    assert torch.allclose(nll, _reference_nll(one_layer, text, view), atol=1e-5)


def test_sink_keys_must_move_to_their_cache_distance(one_layer, text, monkeypatch):
    """Control: leaving the sink keys at their text distance is measurably wrong."""
    view = CacheView(cache_size=CACHE, n_sinks=SINKS)
    monkeypatch.setattr(cache_module, "rotate", lambda x, offsets, inv_freq: x)
    with streaming_cache(one_layer, view):
        unmoved = token_nll(one_layer, text)
    reference = _reference_nll(one_layer, text, view)
    late = slice(CACHE, None)  # queries whose sinks are evicted from the recent window
    assert (unmoved[late] - reference[late]).abs().max() > 1e-3
    assert torch.allclose(unmoved[: CACHE - SINKS], reference[: CACHE - SINKS], atol=1e-5)


def test_rotations_compose():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=generator)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, 8, 2).float() / 8))
    a, b = torch.tensor([1, -2, 3, 0, 7]), torch.tensor([-4, 2, 5, 1, -7])
    assert torch.allclose(rotate(rotate(x, a, inv_freq), b, inv_freq), rotate(x, a + b, inv_freq),
                          atol=1e-5)  # fmt: skip
    assert torch.allclose(rotate(x, torch.zeros(5, dtype=torch.long), inv_freq), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cache_size=1), "cache_size must be at least 2"),
        (dict(cache_size=8, n_sinks=7), r"n_sinks \(7\) must be in \[0, cache_size - 1 = 7\)"),
        (dict(n_sinks=2), "sink tokens need a cache"),
    ],
)
def test_cache_view_refuses_impossible_caches(kwargs, message):
    with pytest.raises(HeadscopeError, match=message):
        CacheView(**kwargs)


def test_long_experiment_reports_buckets_and_sink_attention(tiny_llama):
    # tiny:llama's trained context is 512 positions: a 600-token text passes it
    table = run_streaming_window_long(tiny_llama, cache_size=64, seq_len=600, bucket=128)
    s, p = table.summary, table.params
    assert p["trained_context"] == 512 and p["seq_len"] == 600 and p["protocol"] == "xiao2023"
    assert s["n_tokens"] == 599 and s["n_tokens_past_trained_context"] == 599 - 512
    assert s["bucket_end"] == [128, 256, 384, 512, 599]
    for name in ("full", "window", "sinks"):
        buckets = s[f"ppl_{name}_by_bucket"]
        assert len(buckets) == 5 and all(math.isfinite(v) and v > 1 for v in buckets)
        assert math.isfinite(s[f"ppl_{name}_past_trained_context"])
    # every target of the first bucket sees at most 128 keys; only the cache runs
    # differ from full attention there once past 64
    assert s["ppl_full_by_bucket"][0] != s["ppl_window_by_bucket"][0]
    scores = table.frame["score"].to_numpy()
    assert ((scores > 0) & (scores < 1)).all()  # attention mass on the 4 sinks


def test_long_experiment_refuses_what_it_cannot_run(tiny_llama):
    with pytest.raises(NotApplicable, match="causal"):
        run_streaming_window_long(load_model("tiny:bert"))
    with pytest.raises(HeadscopeError, match="fits in the 1024-token cache"):
        run_streaming_window_long(tiny_llama, seq_len=600)
    with pytest.raises(HeadscopeError, match="bucket must be a positive"):
        run_streaming_window_long(tiny_llama, cache_size=64, seq_len=600, bucket=0)
