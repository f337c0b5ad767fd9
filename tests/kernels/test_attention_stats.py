"""Attention-statistics implementations against the float64 reference.

The Triton kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), so their shapes stay small; the chunked torch implementation
is cheap and goes to longer sequences. Random cases are drawn by hypothesis with a
fixed seed (derandomize) so CI sees the same examples every run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_support import IMPLEMENTATIONS, TRITON_DEVICE, needs_triton, needs_triton_installed

from headscope.errors import HeadscopeError
from headscope.kernels.attention_stats import (
    AttentionStats,
    attention_stats,
    chunked_attention_stats,
    query_validity,
    reference_attention_stats,
    visibility,
)

# Every implementation computes in float32 from the very input values the reference
# upcasts to float64 (fp16/bf16 inputs are cast once and shared), so the input dtype
# does not widen the tolerances: what is left is float32 rounding (relative ~1e-7)
# of scores up to |s| ~ 100 (sharp queries against a spiked key) and of sums over up
# to 300 keys or queries. Worst errors seen over ~400 random cases (chunked; Triton's
# are 2-4x smaller) are in the comments: the bounds leave a 3-25x margin.
LOG_ATOL = 1e-4  # lse and entropy; lse error grows with |s|: worst 2.8e-5 and 4e-6
PROB_ATOL = 1e-5  # max_prob and sink_mass, probabilities in [0, 1]: worst 1.6e-6
DISTANCE_ATOL_PER_KEY = 4e-6  # mean_distance goes up to T_k: worst 8.5e-7 x T_k
RECEIVED_ATOL = 1e-4  # received sums up to T_q probabilities of one key: worst 8.4e-6
RECEIVED_RTOL = 1e-5
OUTPUT_ATOL = 1e-5  # attention output against SDPA, both float32


@dataclass(frozen=True)
class Case:
    """One random attention call: shapes, masking options and how to draw the tensors."""

    batch: int
    heads: int
    kv_heads: int
    t_q: int
    t_k: int
    d_head: int
    causal: bool
    window: int | None
    sink_width: int
    dtype: torch.dtype
    padding: str  # none | random | left | hide_row (random, last batch row all padded)
    sharpness: float  # multiplies q: larger means peakier attention
    spike: bool  # one key with a much larger norm: the running max jumps mid-row
    seed: int
    keep_first: int = 0  # always-visible first keys (attention sinks) of a window

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.heads, self.t_q, self.d_head, generator=gen)
        k = torch.randn(self.batch, self.kv_heads, self.t_k, self.d_head, generator=gen)
        q = q * self.sharpness
        if self.spike:
            k[:, :, int(torch.randint(self.t_k, (1,), generator=gen)), :] *= 8.0
        mask = None
        if self.padding in ("random", "hide_row"):
            mask = torch.rand(self.batch, self.t_k, generator=gen) > 0.3
            if self.padding == "hide_row":
                mask[-1] = False
        elif self.padding == "left":
            lengths = torch.randint(0, self.t_k + 1, (self.batch,), generator=gen)
            mask = torch.arange(self.t_k)[None, :] >= lengths[:, None]
        return q.to(self.dtype), k.to(self.dtype), mask

    def options(self) -> dict:
        return dict(
            scale=self.d_head**-0.5, causal=self.causal, window=self.window,
            sink_width=self.sink_width, keep_first=self.keep_first,
        )  # fmt: skip


@st.composite
def cases(draw, max_t: int, dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> Case:
    # sampled_from spreads lengths over the whole range (st.integers favours its ends)
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 3, 4]))
    t_k = draw(st.sampled_from(range(1, max_t + 1)))
    self_attention = draw(st.sampled_from(["self", "cross"])) == "self"
    t_q = t_k if self_attention else draw(st.sampled_from(range(1, t_k + 1)))
    window = draw(st.sampled_from(["none", "window"]))
    padding = draw(st.sampled_from(["none", "random", "left", "hide_row"]))
    return Case(
        batch=2 if padding == "hide_row" else draw(st.integers(1, 2)),
        heads=kv_heads * group,
        kv_heads=kv_heads,
        t_q=t_q,
        t_k=t_k,
        d_head=draw(st.sampled_from([16, 24, 32, 64])),
        causal=draw(st.booleans()),
        window=None if window == "none" else draw(st.sampled_from(range(1, t_k + 1))),
        sink_width=draw(st.sampled_from([0, 1, 4])),
        dtype=draw(st.sampled_from(dtypes)),
        padding=padding,
        sharpness=draw(st.sampled_from([0.5, 1.0, 4.0])),
        spike=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        keep_first=0 if window == "none" else draw(st.sampled_from([0, 1, 4])),
    )


def fixed_examples(max_examples: int):
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip


def run_triton(q, k, mask=None, **options) -> AttentionStats:
    from headscope.kernels.triton_attention_stats import triton_attention_stats

    mask = mask.to(TRITON_DEVICE) if mask is not None else None
    stats = triton_attention_stats(
        q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), key_padding_mask=mask, **options
    )
    return AttentionStats(**{name: value.cpu() for name, value in stats.as_dict().items()})


def compute(implementation: str, q, k, mask=None, **options) -> AttentionStats:
    if implementation == "triton":
        return run_triton(q, k, mask, **options)
    return attention_stats(q, k, key_padding_mask=mask, implementation=implementation, **options)


def assert_matches_reference(actual: AttentionStats, expected: AttentionStats) -> None:
    """Same shapes, float32, no NaN, −inf exactly where the reference has it, close values."""
    t_k = expected.received.shape[-1]
    atol = {
        "lse": LOG_ATOL, "entropy": LOG_ATOL, "max_prob": PROB_ATOL, "sink_mass": PROB_ATOL,
        "mean_distance": DISTANCE_ATOL_PER_KEY * max(t_k, 1),
        "received": RECEIVED_ATOL, "received_per_kv": RECEIVED_ATOL,
    }  # fmt: skip
    for name, want in expected.as_dict().items():
        got = getattr(actual, name)
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        assert not torch.isnan(got).any(), f"NaN in {name}"
        got = got.to(torch.float64)
        if name == "lse":
            dead = torch.isneginf(want)
            assert torch.equal(torch.isneginf(got), dead), "fully masked rows differ"
            got, want = got[~dead], want[~dead]
        assert torch.isfinite(got).all(), f"inf in {name}"
        rtol = RECEIVED_RTOL if name.startswith("received") else 0.0
        torch.testing.assert_close(got, want, atol=atol[name], rtol=rtol, msg=name)


# 1. Random cases against the reference ------------------------------------------------


@fixed_examples(100)
@given(case=cases(max_t=300), block_rows=st.sampled_from([None, 16, 48]))
def test_chunked_matches_reference(case: Case, block_rows: int | None) -> None:
    q, k, mask = case.tensors()
    expected = reference_attention_stats(q, k, key_padding_mask=mask, **case.options())
    _, actual = chunked_attention_stats(
        q, k, key_padding_mask=mask, block_rows=block_rows, **case.options()
    )
    assert_matches_reference(actual, expected)


@needs_triton
@fixed_examples(50)
@given(case=cases(max_t=80), block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 32]))
def test_triton_matches_reference(case: Case, block_m: int, block_n: int) -> None:
    q, k, mask = case.tensors()
    expected = reference_attention_stats(q, k, key_padding_mask=mask, **case.options())
    actual = run_triton(q, k, mask, block_m=block_m, block_n=block_n, **case.options())
    assert_matches_reference(actual, expected)


# 2. Edge cases, every implementation ------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("sink_width", [0, 1])
def test_single_token(implementation: str, sink_width: int) -> None:
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 1, 16)
    stats = compute(implementation, q, k, scale=0.25, causal=True, sink_width=sink_width)
    ones = torch.ones(1, 2, 1)
    torch.testing.assert_close(stats.lse, (q @ k.transpose(-1, -2)).squeeze(-1) * 0.25)
    torch.testing.assert_close(stats.entropy, ones * 0)
    torch.testing.assert_close(stats.max_prob, ones)
    torch.testing.assert_close(stats.sink_mass, ones * sink_width)
    torch.testing.assert_close(stats.mean_distance, ones * 0)
    torch.testing.assert_close(stats.received, ones)
    torch.testing.assert_close(stats.received_per_kv, torch.full((1, 1, 1), 2.0))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_queries(implementation: str) -> None:
    q, k = torch.randn(2, 4, 0, 16), torch.randn(2, 2, 5, 16)
    options = dict(scale=0.25, causal=True, sink_width=1)
    stats = compute(implementation, q, k, **options)
    assert_matches_reference(stats, reference_attention_stats(q, k, **options))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_row(implementation: str) -> None:
    # Queries at positions 3, 4, 5 with window 2 see keys {2, 3}, {3, 4}, {4, 5};
    # padding hides keys 2 and 3, so the first query sees nothing.
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 6, 16)
    mask = torch.tensor([[True, True, False, False, True, True]])
    options = dict(scale=0.25, causal=True, window=2, sink_width=1)
    stats = compute(implementation, q, k, mask, **options)
    assert torch.isneginf(stats.lse[..., 0]).all()
    assert torch.isfinite(stats.lse[..., 1:]).all()
    for name in ("entropy", "max_prob", "sink_mass", "mean_distance"):
        assert (getattr(stats, name)[..., 0] == 0).all(), name
    assert (stats.received[..., :4] == 0).all()
    assert_matches_reference(
        stats, reference_attention_stats(q, k, key_padding_mask=mask, **options)
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("t_q", [20, 37])  # cross- and self-attention
def test_all_keys_padded_for_one_batch_row(implementation: str, t_q: int) -> None:
    q, k = torch.randn(2, 4, t_q, 32), torch.randn(2, 2, 37, 32)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1] = False
    options = dict(scale=32**-0.5, causal=True, sink_width=4)
    stats = compute(implementation, q, k, mask, **options)
    assert torch.isneginf(stats.lse[1]).all()
    for name, value in stats.as_dict().items():
        assert not torch.isnan(value).any(), name
        if name != "lse":
            assert (value[1] == 0).all(), name
    alone = compute(implementation, q[:1], k[:1], **options)
    for name, value in alone.as_dict().items():
        torch.testing.assert_close(getattr(stats, name)[:1], value, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_window_one_sees_only_itself(implementation: str, causal: bool) -> None:
    q, k = torch.randn(1, 2, 19, 16), torch.randn(1, 1, 19, 16)
    stats = compute(implementation, q, k, scale=0.25, causal=causal, window=1, sink_width=1)
    diagonal = (q * k).sum(-1) * 0.25
    torch.testing.assert_close(stats.lse, diagonal)
    torch.testing.assert_close(stats.entropy, torch.zeros(1, 2, 19))
    torch.testing.assert_close(stats.max_prob, torch.ones(1, 2, 19))
    torch.testing.assert_close(stats.mean_distance, torch.zeros(1, 2, 19))
    torch.testing.assert_close(stats.sink_mass, (torch.arange(19) == 0).float().expand(1, 2, 19))
    torch.testing.assert_close(stats.received, torch.ones(1, 2, 19))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_huge_window_is_no_window(implementation: str) -> None:
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 23, 16)
    options = dict(scale=0.25, causal=False, sink_width=1)
    windowed = compute(implementation, q, k, window=10**12, **options)
    plain = compute(implementation, q, k, **options)
    for name, value in plain.as_dict().items():
        torch.testing.assert_close(getattr(windowed, name), value, msg=name)


@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
@pytest.mark.parametrize("causal", [True, False])
def test_keep_first_without_window_changes_nothing(implementation: str, causal: bool) -> None:
    q, k = torch.randn(2, 4, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.rand(2, 30) > 0.3
    options = dict(scale=0.25, causal=causal, sink_width=4)
    plain = compute(implementation, q, k, mask, **options)
    for keep_first in (1, 4, 10**12):
        kept = compute(implementation, q, k, mask, keep_first=keep_first, **options)
        for name, value in plain.as_dict().items():
            assert torch.equal(getattr(kept, name), value), (keep_first, name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_keep_first_of_every_key_is_no_window(implementation: str, causal: bool) -> None:
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 23, 16)
    options = dict(scale=0.25, causal=causal, sink_width=1)
    plain = compute(implementation, q, k, **options)
    for keep_first in (23, 10**12):
        kept = compute(implementation, q, k, window=2, keep_first=keep_first, **options)
        for name, value in plain.as_dict().items():
            torch.testing.assert_close(getattr(kept, name), value, msg=(keep_first, name))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gqa_siblings_have_their_own_statistics(implementation: str) -> None:
    # Four query heads share two KV heads (pairs 0-1 and 2-3). Zeroing head 1's
    # query makes its attention uniform and must leave its sibling, head 0, alone.
    q, k = torch.randn(1, 4, 21, 16) * 2, torch.randn(1, 2, 21, 16)
    options = dict(scale=0.25, causal=False, sink_width=1)
    before = compute(implementation, q, k, **options)
    q_zeroed = q.clone()
    q_zeroed[:, 1] = 0
    after = compute(implementation, q_zeroed, k, **options)
    others = [0, 2, 3]
    for name in ("lse", "entropy", "max_prob", "sink_mass", "mean_distance", "received"):
        torch.testing.assert_close(
            getattr(after, name)[:, others], getattr(before, name)[:, others], msg=name
        )
        assert not torch.allclose(getattr(after, name)[:, 1], getattr(before, name)[:, 1])
    torch.testing.assert_close(after.entropy[:, 1], torch.full((1, 21), math.log(21)))
    torch.testing.assert_close(after.max_prob[:, 1], torch.full((1, 21), 1 / 21))
    torch.testing.assert_close(after.received_per_kv[:, 1], before.received_per_kv[:, 1])
    pairs = after.received.view(1, 2, 2, 21).sum(2)
    torch.testing.assert_close(after.received_per_kv, pairs)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t_q", [40, 29])
@pytest.mark.parametrize("window", [1, 2, 18])
@pytest.mark.parametrize("keep_first", [0, 17])
def test_triton_window_edges_on_block_edges(
    causal: bool, t_q: int, window: int, keep_first: int
) -> None:
    # With blocks of 16, windows 2 and 18 put the last key (pass 1) or query (pass 2)
    # a row block can see exactly on the first element of the next block; 17 first
    # keys end one key into the second key block, which the window range may share.
    q, k = torch.randn(1, 2, t_q, 16) * 2, torch.randn(1, 1, 40, 16)
    options = dict(scale=0.25, causal=causal, window=window, sink_width=1, keep_first=keep_first)
    expected = reference_attention_stats(q, k, **options)
    assert_matches_reference(run_triton(q, k, block_m=16, block_n=16, **options), expected)


@needs_triton
def test_triton_is_deterministic() -> None:
    case = Case(2, 6, 2, 45, 45, 16, True, 9, 4, torch.float16, "random", 4.0, True, seed=3)
    q, k, mask = case.tensors()
    first = run_triton(q, k, mask, block_m=16, block_n=16, **case.options())
    second = run_triton(q, k, mask, block_m=16, block_n=16, **case.options())
    for name, value in first.as_dict().items():
        assert torch.equal(value, getattr(second, name)), name


@needs_triton
def test_triton_launch_options(monkeypatch) -> None:
    """Batch slices past CUDA's grid limit give the same result; pass2=False marks received."""
    from headscope.kernels import triton_attention_stats as module

    case = Case(3, 2, 1, 20, 33, 16, True, None, 1, torch.float32, "left", 1.0, False, seed=5)
    q, k, mask = case.tensors()
    whole = run_triton(q, k, mask, **case.options())
    monkeypatch.setattr(module, "MAX_GRID_Y", 2 * case.heads)  # batch slices of 2 and 1
    sliced = run_triton(q, k, mask, **case.options())
    pass1_only = run_triton(q, k, mask, pass2=False, **case.options())
    for name, value in whole.as_dict().items():
        assert torch.equal(value, getattr(sliced, name)), name
        if name.startswith("received"):
            assert torch.isnan(getattr(pass1_only, name)).all(), name
        else:
            assert torch.equal(value, getattr(pass1_only, name)), name


# 3. The chunked attention output is the attention ----------------------------------


@fixed_examples(30)
@given(case=cases(max_t=120, dtypes=(torch.float32,)), d_value=st.sampled_from([16, 40]))
def test_chunked_output_matches_sdpa(case: Case, d_value: int) -> None:
    q, k, mask = case.tensors()
    gen = torch.Generator().manual_seed(case.seed + 1)
    v = torch.randn(case.batch, case.kv_heads, case.t_k, d_value, generator=gen)
    output, _ = chunked_attention_stats(
        q, k, v, key_padding_mask=mask, block_rows=16, **case.options()
    )
    group = case.heads // case.kv_heads
    query_pos = torch.arange(case.t_k - case.t_q, case.t_k)
    allowed = visibility(
        query_pos, torch.arange(case.t_k), causal=case.causal, window=case.window,
        keep_first=case.keep_first,
    )  # fmt: skip
    allowed = allowed.expand(case.batch, 1, case.t_q, case.t_k)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    valid_rows = query_validity(mask, case.t_q, case.t_k)
    if valid_rows is not None:
        allowed = allowed & valid_rows[:, None, :, None]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
        attn_mask=allowed, scale=case.options()["scale"],
    )  # fmt: skip
    live = allowed.any(-1).expand(case.batch, case.heads, case.t_q)
    assert output.shape == expected.shape
    torch.testing.assert_close(output[live], expected[live], atol=OUTPUT_ATOL, rtol=0)
    assert (output[~live] == 0).all()  # SDPA leaves NaN or 0 there; chunked gives 0


def window_with_first_keys(t: int, window: int, keep_first: int) -> torch.Tensor:
    """[query, key] mask of causal self-attention with a window and the first keys kept,
    written out from the rule itself: j < keep_first or i − window < j, and j ≤ i."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return ((j < keep_first) | (j > i - window)) & (j <= i)


@pytest.mark.parametrize(("window", "keep_first"), [(1, 1), (5, 4), (3, 20)])
def test_keep_first_mask_in_reference_probabilities(window: int, keep_first: int) -> None:
    # A lone query that is the last of its keys reads row i of the attention matrix
    # off ``received``: keys[: i + 1] and the query at position i, as in the full call.
    t = 40
    q, k = torch.randn(1, 4, t, 16) * 2, torch.randn(1, 2, t, 16)
    allowed = window_with_first_keys(t, window, keep_first)
    options = dict(scale=0.25, causal=True, window=window, sink_width=1, keep_first=keep_first)
    for i in range(t):
        row = reference_attention_stats(q[:, :, i : i + 1], k[:, :, : i + 1], **options)
        probs = row.received[0]  # [head, i + 1]
        assert (probs[:, ~allowed[i, : i + 1]] == 0).all(), i
        assert (probs[:, allowed[i, : i + 1]] > 0).all(), i
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(("window", "keep_first"), [(1, 1), (5, 4), (3, 20)])
def test_chunked_output_with_keep_first_is_masked_softmax(window: int, keep_first: int) -> None:
    # 45 self-attention queries in blocks of 16: later blocks' windows lie well past
    # the first keys. Batch row 1 pads keys 0 and 2: kept keys stay subject to padding,
    # and the padded query 0 (which sees only key 0) is dropped.
    t, group, scale = 45, 2, 0.25
    q, k = torch.randn(2, 4, t, 16) * 2, torch.randn(2, 2, t, 16)
    v = torch.randn(2, 2, t, 24)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, [0, 2]] = False
    allowed = window_with_first_keys(t, window, keep_first)[None, None] & mask[:, None, None, :]
    allowed = allowed & mask[:, None, :, None]  # padded queries of self-attention dropped
    scores = torch.einsum(
        "bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(group, 1)
    ) * scale  # fmt: skip
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    expected = (probs @ v.double().repeat_interleave(group, 1)).float()
    options = dict(
        scale=scale, causal=True, window=window, sink_width=1, keep_first=keep_first,
        key_padding_mask=mask, block_rows=16,
    )  # fmt: skip
    output, _ = chunked_attention_stats(q, k, v, **options)
    torch.testing.assert_close(output, expected, atol=OUTPUT_ATOL, rtol=0)
    live = allowed.any(-1).expand(2, 4, t)
    assert not live[1, :, 0].any() and (output[~live] == 0).all()
    # V = identity: the output rows are the probabilities themselves, exactly 0 off the mask
    identity = torch.eye(t).expand(2, 2, t, t)
    chunked_probs, _ = chunked_attention_stats(q, k, identity, **options)
    assert (chunked_probs[~allowed.expand(2, 4, t, t)] == 0).all()
    torch.testing.assert_close(chunked_probs, probs.float(), atol=PROB_ATOL, rtol=0)


# 4. Clear errors for bad inputs ----------------------------------------------------

BAD_INPUTS = {
    "q not 4-d": (dict(q=torch.randn(2, 5, 16)), HeadscopeError, "q must be"),
    "batch mismatch": (dict(k=torch.randn(3, 2, 5, 16)), HeadscopeError, "disagree"),
    "d_head mismatch": (dict(k=torch.randn(2, 2, 5, 8)), HeadscopeError, "disagree"),
    "heads not divisible": (dict(q=torch.randn(2, 3, 5, 16)), HeadscopeError, "cannot share"),
    "more queries than keys": (dict(q=torch.randn(2, 4, 6, 16)), HeadscopeError, "more queries"),
    "float mask": (dict(key_padding_mask=torch.ones(2, 5)), HeadscopeError, "must be bool"),
    "mask shape": (
        dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
        HeadscopeError,
        "must be bool",
    ),
    "dtype mismatch": (dict(k=torch.randn(2, 2, 5, 16).half()), HeadscopeError, "share dtype"),
    "integer dtype": (
        dict(q=torch.ones(2, 4, 5, 16, dtype=torch.int32), k=torch.ones(2, 2, 5, 16).int()),
        HeadscopeError,
        "unsupported dtype",
    ),
    "window 0": (dict(window=0), HeadscopeError, "window"),
    "negative sink": (dict(sink_width=-1), HeadscopeError, "sink_width"),
    "negative keep_first": (dict(keep_first=-1), HeadscopeError, "keep_first must be non-negative"),
}


@pytest.mark.parametrize(
    "implementation",
    [
        "chunked",
        pytest.param("triton", marks=needs_triton_installed),
    ],
)
@pytest.mark.parametrize("bad", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(implementation: str, bad: str) -> None:
    overrides, error, message = BAD_INPUTS[bad]
    arguments = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 5, 16), scale=0.25)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        attention_stats(causal=True, implementation=implementation, **arguments)


@needs_triton_installed
def test_triton_refuses_bad_blocks_and_cpu_without_interpreter(monkeypatch) -> None:
    from headscope.kernels import triton_attention_stats as module

    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16)
    monkeypatch.setattr(module, "INTERPRETING", True)  # CPU tensors get past the device check
    with pytest.raises(HeadscopeError, match="power of two"):
        module.triton_attention_stats(q, k, scale=0.25, causal=True, block_m=24)
    monkeypatch.setattr(module, "INTERPRETING", False)
    with pytest.raises(HeadscopeError, match="need a CUDA device or TRITON_INTERPRET=1"):
        module.triton_attention_stats(q, k, scale=0.25, causal=True)


# 5. The compiled path, which the interpreter does not exercise ---------------------

COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from headscope.kernels import triton_attention_stats as module

for dtype, causal, window, padding, keep_first in (
    ("bf16", True, True, True, True), ("bf16", True, True, False, False),
    ("fp32", False, False, False, False),
):
    flags = dict(
        CAUSAL=causal, HAS_WINDOW=window, HAS_PADDING=padding, DROP_PADDED_QUERIES=padding,
        KEEP_FIRST=keep_first, UPCAST_FOR_DOT=dtype == "fp32", BLOCK_M=64, BLOCK_N=64,
        BLOCK_D=128,
    )
    pointers = {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "pad_ptr": "*i8"}
    for kernel in (module._row_stats_kernel, module._received_kernel):
        names = kernel.arg_names
        signature = {
            name: "constexpr" if name in flags
            else pointers.get(name, "*fp32") if name.endswith("_ptr")
            else "fp32" if name == "scale" else "i32"
            for name in names
        }
        constexprs = {(names.index(name),): value for name, value in flags.items()}
        source = ASTSource(kernel, signature, constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
"""


@needs_triton_installed
def test_kernels_compile_for_a_gpu_without_one(tmp_path) -> None:
    """Compiled Triton rejects what the interpreter allows (e.g. non-constexpr globals)."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
