"""StreamingLLM's headline on SmolLM2-135M, past its trained context of 8192 positions.

The README's figures come from the opt-in detector on 16384 tokens
(``benchmarks/streaming_long.py``, about 5 minutes); this test runs the two
runs that carry the headline on 12288 tokens (about 2 minutes): full attention
breaks down once queries pass the trained context, the 4-sink cache does not.
The plain cache without sinks is asserted at 2048 tokens by the sink suite.
"""

from __future__ import annotations

import math

import pytest

from headscope.data import get_prompt_set
from headscope.probes.streaming_cache import CacheView, streaming_cache, token_nll

pytestmark = pytest.mark.model

LENGTH, TRAINED, LAST = 12288, 8192, 1024


def _ppl(losses) -> float:
    return math.exp(float(losses.mean()))


@pytest.fixture(scope="module")
def losses(smollm2):
    assert smollm2.arch.max_positions == TRAINED
    tokens = smollm2.tokenize(get_prompt_set("prose-book", seq_len=LENGTH)).tokens[0]
    out = {}
    for name, view in (("full", CacheView()), ("sinks", CacheView(cache_size=1024, n_sinks=4))):
        with streaming_cache(smollm2, view):
            out[name] = token_nll(smollm2, tokens)
    return out


def test_full_attention_breaks_down_past_the_trained_context(losses):
    inside = _ppl(losses["full"][1024:TRAINED])
    last = _ppl(losses["full"][-LAST:])
    assert last > 2.0 * inside  # 16384-token run: 29.4 in this stretch vs about 9 inside


def test_the_sink_cache_stays_at_its_trained_range_perplexity(losses):
    inside = _ppl(losses["sinks"][1024:TRAINED])
    last = _ppl(losses["sinks"][-LAST:])
    assert last < 1.5 * inside  # measured 7.3 vs about 10
    assert _ppl(losses["full"][-LAST:]) > 2.0 * last  # and far below full attention there
