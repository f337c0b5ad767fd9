"""Cross-layer attention similarity: chunked torch and Triton against the float64 reference.

The Triton kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), so its shapes stay small (batch ≤ 2, heads ≤ 4, T ≤ 70,
d_head ≤ 32); the chunked implementation goes to longer sequences. Random cases are
drawn by hypothesis with a fixed seed (derandomize), so every run sees the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_support import IMPLEMENTATIONS, TRITON_DEVICE, needs_triton

import headscope.kernels.cross_layer as cross_layer
from headscope.errors import HeadscopeError
from headscope.kernels.cross_layer import (
    CrossLayerSimilarity,
    check_pair,
    chunked_cross_layer_similarity,
    cross_layer_similarity,
    reference_cross_layer_similarity,
    similarity_from_patterns,
)

# Both implementations compute in float32 from the very input values the reference
# upcasts to float64 (fp16/bf16 inputs are cast once and shared), so what is left is
# float32 rounding of scores up to |s| ~ 100 (sharp queries against a spiked key) and
# of sums over up to 200 keys. Both metrics are bounded (cosine in [0, 1], js in
# [0, ln 2]), so the tolerances are absolute. Worst errors seen over the cases below
# and over 2000 chunked (T ≤ 200) and 300 Triton (T ≤ 70) random cases of the same
# kinds run once: chunked cosine 1.8e-6, js 8.3e-7; Triton cosine 7.8e-7, js 4.5e-7
# (sharp rows: float32 scores near 100 carry ~1e-6 error); typical 2e-7. The bounds
# leave a >10x margin.
COSINE_ATOL = 2e-5
JS_ATOL = 2e-5
ANALYTIC_ATOL = 1e-6  # hand-built cases with small, exact scores: float32 rounding only


@dataclass(frozen=True)
class Case:
    """Two layers' q and k with their own scales, KV heads, d_head and windows."""

    batch: int
    heads: int
    kv_a: int
    kv_b: int
    t_q: int
    t_k: int
    d_a: int
    d_b: int
    causal: bool
    window_a: int | None
    window_b: int | None
    dtype: torch.dtype
    padding: str  # none | random | left | hide_row (random, last batch row all padded)
    sharpness_a: float  # multiplies q_a: larger means peakier attention
    sharpness_b: float
    echo: bool  # layer b is layer a plus small noise: cosine near 1, js near 0
    spike: bool  # one key with a much larger norm in layer a
    seed: int

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)

        def draw(*shape):
            return torch.randn(*shape, generator=gen)

        q_a = draw(self.batch, self.heads, self.t_q, self.d_a) * self.sharpness_a
        k_a = draw(self.batch, self.kv_a, self.t_k, self.d_a)
        if self.spike:
            k_a[:, :, int(torch.randint(self.t_k, (1,), generator=gen)), :] *= 8.0
        if self.echo:  # same shapes as layer a, by construction of the strategy
            q_b = q_a + 0.05 * draw(*q_a.shape)
            k_b = k_a + 0.05 * draw(*k_a.shape)
        else:
            q_b = draw(self.batch, self.heads, self.t_q, self.d_b) * self.sharpness_b
            k_b = draw(self.batch, self.kv_b, self.t_k, self.d_b)
        mask = None
        if self.padding in ("random", "hide_row"):
            mask = torch.rand(self.batch, self.t_k, generator=gen) > 0.3
            if self.padding == "hide_row":
                mask[-1] = False
        elif self.padding == "left":
            lengths = torch.randint(0, self.t_k + 1, (self.batch,), generator=gen)
            mask = torch.arange(self.t_k)[None, :] >= lengths[:, None]
        layers = tuple(x.to(self.dtype) for x in (q_a, k_a, q_b, k_b))
        return layers, mask

    def options(self) -> dict:
        return dict(
            scale_a=self.d_a**-0.5, scale_b=0.7 * self.d_b**-0.5, causal=self.causal,
            window_a=self.window_a, window_b=self.window_b,
        )  # fmt: skip


@st.composite
def cases(draw, max_t: int, max_batch: int = 2, max_d: int = 64) -> Case:
    # sampled_from spreads lengths over the whole range (st.integers favours its ends)
    heads = draw(st.sampled_from([1, 2, 4]))
    divisors = [n for n in (1, 2, 4) if heads % n == 0]
    kv_a, kv_b = draw(st.sampled_from(divisors)), draw(st.sampled_from(divisors))
    d_a = draw(st.sampled_from([d for d in (8, 16, 24, 32, 64) if d <= max_d]))
    d_b = draw(st.sampled_from([d for d in (8, 16, 24, 32, 64) if d <= max_d]))
    echo = draw(st.booleans())
    t_k = draw(st.sampled_from(range(1, max_t + 1)))
    self_attention = draw(st.sampled_from(["self", "cross"])) == "self"
    t_q = t_k if self_attention else draw(st.sampled_from(range(1, t_k + 1)))
    windows = draw(st.sampled_from(["none", "a", "b", "both"]))
    padding = draw(st.sampled_from(["none", "random", "left", "hide_row"]))

    def window(layer: str) -> int | None:
        if windows not in (layer, "both"):
            return None
        return draw(st.sampled_from(range(1, t_k + 1)))

    return Case(
        batch=2 if padding == "hide_row" else draw(st.integers(1, max_batch)),
        heads=heads,
        kv_a=kv_a,
        kv_b=kv_a if echo else kv_b,
        t_q=t_q,
        t_k=t_k,
        d_a=d_a,
        d_b=d_a if echo else d_b,
        causal=draw(st.booleans()),
        window_a=window("a"),
        window_b=window("b"),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        padding=padding,
        sharpness_a=draw(st.sampled_from([0.5, 1.0, 4.0])),
        sharpness_b=draw(st.sampled_from([0.5, 1.0, 4.0])),
        echo=echo,
        spike=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def fixed_examples(max_examples: int):
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip


def compute(implementation: str, layers, mask=None, **options) -> CrossLayerSimilarity:
    if implementation != "triton":
        return cross_layer_similarity(
            *layers, key_padding_mask=mask, implementation=implementation, **options
        )
    from headscope.kernels.triton_cross_layer import triton_cross_layer_similarity

    layers = [x.to(TRITON_DEVICE) for x in layers]
    mask = mask.to(TRITON_DEVICE) if mask is not None else None
    result = triton_cross_layer_similarity(*layers, key_padding_mask=mask, **options)
    return CrossLayerSimilarity(result.cosine.cpu(), result.js.cpu(), result.valid.cpu())


def assert_matches_reference(actual: CrossLayerSimilarity, expected: CrossLayerSimilarity):
    """float32, no NaN, the same valid rows, zeros on invalid rows, close values."""
    assert torch.equal(actual.valid, expected.valid), "valid rows differ"
    invalid = ~expected.valid[:, None].expand_as(expected.cosine)
    for name, atol in (("cosine", COSINE_ATOL), ("js", JS_ATOL)):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"NaN or inf in {name}"
        assert (got[invalid] == 0).all(), f"{name} of an invalid row is not 0"
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=0.0, msg=name)
    assert (actual.js >= 0).all() and (actual.js <= math.log(2) + 1e-7).all()


# 1. Random cases against the reference ------------------------------------------------


@fixed_examples(120)
@given(case=cases(max_t=200), block_rows=st.sampled_from([None, 1, 16, 37]))
def test_chunked_matches_reference(case: Case, block_rows: int | None) -> None:
    layers, mask = case.tensors()
    expected = reference_cross_layer_similarity(*layers, key_padding_mask=mask, **case.options())
    actual = chunked_cross_layer_similarity(
        *layers, key_padding_mask=mask, block_rows=block_rows, **case.options()
    )
    assert_matches_reference(actual, expected)


@needs_triton
@fixed_examples(40)
@given(
    case=cases(max_t=70, max_d=32),
    block_m=st.sampled_from([16, 32]),
    block_n=st.sampled_from([16, 32]),
)
def test_triton_matches_reference(case: Case, block_m: int, block_n: int) -> None:
    from headscope.kernels.triton_cross_layer import triton_cross_layer_similarity

    layers, mask = case.tensors()
    expected = reference_cross_layer_similarity(*layers, key_padding_mask=mask, **case.options())
    layers = [x.to(TRITON_DEVICE) for x in layers]
    mask = mask.to(TRITON_DEVICE) if mask is not None else None
    actual = triton_cross_layer_similarity(
        *layers, key_padding_mask=mask, block_m=block_m, block_n=block_n, **case.options()
    )
    actual = CrossLayerSimilarity(actual.cosine.cpu(), actual.js.cpu(), actual.valid.cpu())
    assert_matches_reference(actual, expected)


# Hand-picked irregular cases: hypothesis's first examples are small (most of the Triton
# test's are T = 1), so these make sure both paths see long, ragged rows.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
IRREGULAR = [  # batch heads kv_a kv_b t_q t_k d_a d_b causal window_a window_b dtype padding
    Case(2, 4, 2, 1, 67, 67, 32, 16, True, None, 9, F32, "random", 4.0, 1.0, False, True, 1),
    Case(1, 4, 4, 2, 23, 70, 24, 8, False, 5, None, F32, "left", 1.0, 0.5, False, False, 2),
    Case(2, 2, 1, 2, 50, 50, 16, 32, True, 7, 20, BF16, "hide_row", 1.0, 4.0, False, True, 3),
    Case(2, 4, 1, 1, 33, 33, 32, 32, False, None, None, F16, "none", 4.0, 4.0, True, True, 4),
    Case(1, 3, 1, 3, 61, 61, 16, 24, True, 64, None, F32, "none", 0.5, 1.0, False, False, 5),
    Case(2, 4, 2, 2, 41, 53, 32, 32, True, 13, 13, F32, "random", 1.0, 1.0, True, False, 6),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", IRREGULAR, ids=lambda case: f"seed{case.seed}")
def test_irregular_cases_match_reference(implementation: str, case: Case) -> None:
    layers, mask = case.tensors()
    expected = reference_cross_layer_similarity(*layers, key_padding_mask=mask, **case.options())
    assert_matches_reference(compute(implementation, layers, mask, **case.options()), expected)


# 2. Known answers, every implementation ----------------------------------------------


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
@pytest.mark.parametrize("causal", [True, False])
def test_identical_layers_echo_perfectly(implementation: str, causal: bool) -> None:
    # T = 45 crosses block boundaries; left padding drops the first queries of row 1.
    q, k = torch.randn(2, 4, 45, 16) * 2, torch.randn(2, 2, 45, 16)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, :7] = False
    options = dict(scale_a=0.25, scale_b=0.25, causal=causal, window_a=9, window_b=9)
    result = compute(implementation, (q, k, q, k), mask, **options)
    assert torch.equal(result.valid, mask)
    live = mask[:, None].expand(2, 4, 45)
    torch.testing.assert_close(result.cosine[live], torch.ones(int(live.sum())).to(result.cosine))
    assert result.js[live].abs().max() < 1e-6
    assert (result.cosine[~live] == 0).all() and (result.js[~live] == 0).all()


def sink_and_uniform(t: int, d: int = 16):
    """Layer a: every head puts all its attention on key 0 (score 60 against 0, so the
    rest gets e^−60 ≈ 1e−26). Layer b: zero queries, uniform attention over i + 1 keys."""
    q_a = torch.zeros(1, 2, t, d)
    q_a[..., 0] = 1.0
    k_a = torch.zeros(1, 1, t, d)
    k_a[:, :, 0, 0] = 60.0
    k_a[:, :, 1:, 1:] = torch.randn(1, 1, t - 1, d - 1)  # orthogonal to q_a: score 0
    q_b, k_b = torch.zeros(1, 2, t, 8), torch.randn(1, 2, t, 8)
    return q_a, k_a, q_b, k_b


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_sink_against_uniform_is_analytic(implementation: str) -> None:
    t = 37
    layers = sink_and_uniform(t)
    result = compute(implementation, layers, scale_a=1.0, scale_b=0.3, causal=True)
    n = torch.arange(1, t + 1, dtype=torch.float64)  # keys seen by row i: i + 1
    cosine = 1 / n.sqrt()
    # A = δ_0, B = 1/n, M_0 = (1 + 1/n)/2, M_j = 1/(2n) for j ≥ 1:
    # js = ½ log(1/M_0) + ½ [(1/n) log((1/n)/M_0) + (n − 1)/n · ln 2]
    m0 = (1 + 1 / n) / 2
    js = 0.5 * (1 / m0).log() + 0.5 * ((1 / n) * ((1 / n) / m0).log() + (n - 1) / n * math.log(2))
    assert result.valid.all()
    for name, want in (("cosine", cosine), ("js", js)):
        got = getattr(result, name).double()
        torch.testing.assert_close(got, want.expand_as(got), atol=ANALYTIC_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_window_of_one_is_a_one_hot(implementation: str) -> None:
    # Layer b with window 1 sees only itself (a one-hot on the diagonal), layer a is
    # uniform over its i + 1 causal keys: cosine = 1/sqrt(i + 1) again, from the diagonal.
    t = 23
    q_a, k_a = torch.zeros(1, 2, t, 16), torch.randn(1, 1, t, 16)
    q_b, k_b = torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    result = compute(
        implementation, (q_a, k_a, q_b, k_b), scale_a=1.0, scale_b=0.25, causal=True, window_b=1
    )
    want = (1 / torch.arange(1, t + 1, dtype=torch.float64).sqrt()).expand(1, 2, t)
    torch.testing.assert_close(result.cosine.double(), want, atol=ANALYTIC_ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_padded_queries_are_invalid(implementation: str) -> None:
    # Self-attention: batch row 1 is left-padded by 5, row 0 has keys 10 and 11 padded.
    # Padded queries are dropped; every real query sees at least itself (window 2 too).
    q, k = torch.randn(2, 2, 20, 16), torch.randn(2, 1, 20, 16)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :5] = False
    mask[0, 10:12] = False
    options = dict(scale_a=0.25, scale_b=0.25, causal=True, window_b=2)
    result = compute(implementation, (q, k, q * 2, k), mask, **options)
    assert torch.equal(result.valid, mask)
    dead = ~mask[:, None].expand(2, 2, 20)
    assert (result.cosine[dead] == 0).all() and (result.js[dead] == 0).all()
    assert (result.cosine[~dead] > 0).all()
    if implementation == "reference":
        return
    assert_matches_reference(
        result,
        reference_cross_layer_similarity(q, k, q * 2, k, key_padding_mask=mask, **options),
    )


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_cross_attention_row_without_keys(implementation: str) -> None:
    # 3 queries at positions 5..7 of 8 keys, window 2 in layer a: query 5 sees keys
    # {4, 5}, both padded; layer b (no window) still sees keys 0..3. Cross-attention
    # (T_q < T_k) drops no query, so only that row is invalid.
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 8, 16)
    mask = torch.tensor([[True, True, True, True, False, False, True, True]])
    options = dict(scale_a=0.25, scale_b=0.25, causal=True, window_a=2)
    result = compute(implementation, (q, k, q, k), mask, **options)
    assert result.valid.tolist() == [[False, True, True]]
    assert (result.cosine[..., 0] == 0).all() and (result.js[..., 0] == 0).all()


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_no_queries(implementation: str) -> None:
    q, k = torch.randn(2, 4, 0, 16), torch.randn(2, 2, 5, 16)
    result = compute(implementation, (q, k, q, k), scale_a=0.25, scale_b=0.25)
    assert result.cosine.shape == result.js.shape == (2, 4, 0)
    assert result.valid.shape == (2, 0)


# 3. From attention patterns ----------------------------------------------------------


def test_similarity_from_patterns_matches_reference() -> None:
    layers, heads, t, d = 4, 3, 29, 16
    qs, ks = torch.randn(layers, 1, heads, t, d) * 2, torch.randn(layers, 1, heads, t, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = (qs @ ks.transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf"))
    patterns = scores.softmax(-1)[:, 0]  # [layer, head, query, key], float32 like hook_pattern
    cosine, js = similarity_from_patterns(patterns)
    assert cosine.shape == js.shape == (layers - 1, heads, t) and cosine.dtype == torch.float32
    for layer in range(1, layers):
        want = reference_cross_layer_similarity(
            qs[layer - 1], ks[layer - 1], qs[layer], ks[layer], scale_a=0.25, scale_b=0.25
        )
        # float32 softmax of the patterns, otherwise float64: ~1e-7
        torch.testing.assert_close(cosine[layer - 1].double(), want.cosine[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(js[layer - 1].double(), want.js[0], atol=1e-6, rtol=0)
    valid = torch.arange(t) >= 4
    masked_cos, masked_js = similarity_from_patterns(patterns, valid)
    assert (masked_cos[..., :4] == 0).all() and (masked_js[..., :4] == 0).all()
    assert torch.equal(masked_cos[..., 4:], cosine[..., 4:])
    same_cos, same_js = similarity_from_patterns(patterns[[0, 0]].double())
    assert same_cos.dtype == torch.float64
    torch.testing.assert_close(same_cos, torch.ones_like(same_cos))
    assert same_js.abs().max() < 1e-12


def test_similarity_from_patterns_errors() -> None:
    with pytest.raises(HeadscopeError, match="layer, head, query_pos, key_pos"):
        similarity_from_patterns(torch.rand(2, 3, 4))
    with pytest.raises(HeadscopeError, match="valid must be bool"):
        similarity_from_patterns(torch.rand(2, 3, 4, 4), torch.ones(5, dtype=torch.bool))


# 4. Errors and dispatch --------------------------------------------------------------


def test_mismatched_layers_raise_clear_errors() -> None:
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    options = dict(scale_a=0.25, scale_b=0.25)
    shared = "must share batch, heads, query_pos and key_pos"
    for q_b, k_b in (
        (torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)),  # batch
        (torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)),  # heads
        (torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)),  # T
    ):
        with pytest.raises(HeadscopeError, match=shared):
            chunked_cross_layer_similarity(q, k, q_b, k_b, **options)
    # kv heads and d_head may differ between layers
    check_pair(q, k, torch.randn(2, 4, 10, 8), torch.randn(2, 1, 10, 8), None, None, None)
    with pytest.raises(HeadscopeError, match="share dtype and device"):
        chunked_cross_layer_similarity(q, k, q.double(), k.double(), **options)
    with pytest.raises(HeadscopeError, match="cannot share"):
        chunked_cross_layer_similarity(q, k, q, torch.randn(2, 3, 10, 16), **options)
    with pytest.raises(HeadscopeError, match="window must be at least 1"):
        chunked_cross_layer_similarity(q, k, q, k, window_b=0, **options)
    with pytest.raises(HeadscopeError, match="key_padding_mask"):
        chunked_cross_layer_similarity(q, k, q, k, key_padding_mask=torch.ones(2, 9), **options)
    with pytest.raises(HeadscopeError, match="block_rows"):
        chunked_cross_layer_similarity(q, k, q, k, block_rows=0, **options)
    with pytest.raises(HeadscopeError, match="unknown implementation"):
        cross_layer_similarity(q, k, q, k, implementation="fast", **options)


def test_dispatch_on_cpu_is_chunked() -> None:
    q, k = torch.randn(1, 2, 12, 16), torch.randn(1, 1, 12, 16)
    options = dict(scale_a=0.25, scale_b=0.5, window_a=3)
    auto = cross_layer_similarity(q, k, q, k, **options)
    chunked = chunked_cross_layer_similarity(q, k, q, k, **options)
    assert torch.equal(auto.cosine, chunked.cosine) and torch.equal(auto.js, chunked.js)


# 5. Long sequences: the chunked path stays O(block) ---------------------------------


def test_chunked_long_sequence_never_scores_t_by_t(monkeypatch) -> None:
    t, rows, window = 4096, 64, 300
    q_a, k_a = torch.randn(1, 2, t, 32), torch.randn(1, 1, t, 32)
    q_b, k_b = torch.randn(1, 2, t, 32), torch.randn(1, 2, t, 32)
    blocks: list[tuple[int, ...]] = []
    score_block = cross_layer._block_log_probs

    def recording(*args, **kwargs):
        log_probs, probs = score_block(*args, **kwargs)
        blocks.append(tuple(log_probs.shape))
        return log_probs, probs

    monkeypatch.setattr(cross_layer, "_block_log_probs", recording)
    options = dict(scale_a=32**-0.5, scale_b=32**-0.5, causal=True)
    # both layers local: every block scores at most rows + window − 1 keys
    local = chunked_cross_layer_similarity(
        q_a, k_a, q_b, k_b, window_a=window, window_b=window, block_rows=rows, **options
    )
    assert len(blocks) == 2 * (t // rows)
    assert max(shape[-2] for shape in blocks) == rows
    assert max(shape[-1] for shape in blocks) == rows + window - 1
    # a global layer against a local one: the budget picks the rows, keys ≤ T
    blocks.clear()
    mixed = chunked_cross_layer_similarity(
        q_a, k_a, q_b, k_b, window_b=window, max_block_elements=2 * 8 * t, **options
    )
    assert max(shape[-2] * shape[-1] for shape in blocks) <= 8 * t  # 8 rows x T keys
    assert local.valid.all() and mixed.valid.all()
    # The last 48 rows against the reference, as cross-attention (T_q < T_k): the same rows.
    tail = slice(t - 48, t)
    for result, windows in ((local, (window, window)), (mixed, (None, window))):
        want = reference_cross_layer_similarity(
            q_a[:, :, tail], k_a, q_b[:, :, tail], k_b, window_a=windows[0],
            window_b=windows[1], **options,
        )  # fmt: skip
        torch.testing.assert_close(
            result.cosine[..., tail].double(), want.cosine, atol=COSINE_ATOL, rtol=0
        )
        torch.testing.assert_close(result.js[..., tail].double(), want.js, atol=JS_ATOL, rtol=0)
