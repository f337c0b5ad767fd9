"""Head importance: gate gradients against finite differences, a planted head, zero ablation as
the gradient's first-order target, the block replay, per-layer Spearman, bootstrap intervals,
the detector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from headscope.analyses import get_detector
from headscope.analyses.importance import (
    ablation_importance,
    bootstrap_interval,
    compare_importance,
    detect_head_importance,
    gradient_importance,
    layer_spearman,
    prompt_ablation_deltas,
    prompt_gradients,
    resample_weights,
    spearman,
)
from headscope.data import get_prompt_set
from headscope.data.prompt_sets import TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import Ablation, mean_ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.loading import load_model
from headscope.probes.sites import block_list
from headscope.tables import HeadTable

D_HEAD = 16


def _prompts(*tokens: torch.Tensor, name: str = "test") -> TokenizedPrompts:
    return TokenizedPrompts(name=name, prompt_set_hash="test", tokens=tokens, bos_prepended=True)


def _random_prompts(lengths: list[int], *, seed: int = 0) -> TokenizedPrompts:
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for length in lengths:
        ids = torch.randint(5, 1000, (length,), generator=generator)
        ids[0] = 0  # BOS of the tiny models
        tokens.append(ids)
    return _prompts(*tokens)


def _loss(handle: ModelHandle, tokens: torch.Tensor) -> float:
    """Mean next-token NLL of one unpadded prompt, computed in the model's own dtype."""
    with torch.inference_mode():
        logits = handle.model(input_ids=tokens[None]).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, tokens[1:]))


def _sample(handle: ModelHandle, n: int, length: int, *, seed: int) -> TokenizedPrompts:
    """Texts drawn from the model itself (temperature 1): there, every ablation costs KL >= 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), handle.arch.bos_token_id)
    with torch.inference_mode():
        for _ in range(length - 1):
            probs = torch.softmax(handle.model(input_ids=ids).logits[:, -1].double(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return _prompts(*ids, name="sampled")


def _rank(values: torch.Tensor, layer: int, head: int) -> int:
    return int((values.flatten() > values[layer, head]).sum()) + 1


@pytest.fixture(scope="module")
def double_llama() -> ModelHandle:
    """A fresh tiny:llama in float64, so finite differences are exact enough to compare."""
    handle = load_model("tiny:llama")
    handle.model.double()
    return handle


def test_gradient_matches_finite_differences(double_llama):
    # scaling a head's slice of o_proj's input columns by s is the same as gating z_h by s,
    # so this reference never touches the module's hooks
    handle = double_llama
    (tokens,) = _random_prompts([23]).tokens
    raw, _ = gradient_importance(handle, _prompts(tokens))
    delta = 1e-3
    finite = torch.zeros_like(raw)
    for layer, block in enumerate(handle.model.model.layers):
        weight = block.self_attn.o_proj.weight
        for head in range(handle.arch.n_heads):
            columns = slice(head * D_HEAD, (head + 1) * D_HEAD)
            original = weight[:, columns].clone()
            losses = []
            for scale in (1 + delta, 1 - delta):
                with torch.no_grad():
                    weight[:, columns] = original * scale
                losses.append(_loss(handle, tokens))
            with torch.no_grad():
                weight[:, columns] = original
            finite[layer, head] = abs(losses[0] - losses[1]) / (2 * delta)
    assert raw.shape == (2, 4)
    assert finite.min() > 1e-4  # every head matters a little: the comparison is not 0 == 0
    torch.testing.assert_close(raw, finite, rtol=1e-3, atol=1e-6)


def test_batch_gives_each_prompt_its_own_gradient(double_llama):
    prompts = _random_prompts([9, 17, 12, 5], seed=1)
    raw_batch, normalized = gradient_importance(double_llama, prompts, batch_size=4)
    singles = [gradient_importance(double_llama, _prompts(t))[0] for t in prompts.tokens]
    # the mean of |per-prompt gradient|, not |gradient of the summed loss| / n
    torch.testing.assert_close(raw_batch, torch.stack(singles).mean(0), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(normalized, raw_batch / raw_batch.norm(dim=1, keepdim=True))
    # signed and in prompt order, though batches are sorted by length
    signed = prompt_gradients(double_llama, prompts, batch_size=3)
    assert signed.shape == (4, 2, 4) and (signed < 0).any() and (signed > 0).any()
    torch.testing.assert_close(signed.abs(), torch.stack(singles), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize(("layer", "head"), [(0, 2), (1, 2)])
def test_planted_head_is_the_most_important(layer, head, ablation):
    handle = load_model("tiny:llama")
    with torch.no_grad():
        handle.model.model.layers[layer].self_attn.o_proj.weight[
            :, head * D_HEAD : (head + 1) * D_HEAD
        ] *= 20
    prompts = _sample(handle, 16, 32, seed=0)
    raw, normalized = gradient_importance(handle, prompts, batch_size=8)
    delta, base_loss = ablation_importance(
        handle, prompts, ablation=ablation, reference_prompts=8, batch_size=8
    )
    assert 6.0 < base_loss < 7.5  # a random model: about log(1024)
    assert _rank(delta, layer, head) == 1
    assert delta[layer, head] > 2 * delta.flatten().sort(descending=True).values[1]
    assert _rank(normalized, layer, head) == 1
    assert normalized[layer, head] > 0.8  # it dominates its layer's row
    if layer == 0:
        assert _rank(raw, layer, head) == 1
    else:  # a big late head amplifies the gradients of the heads that feed it
        assert raw[layer, head] == raw[layer].max()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablation_delta_is_the_loss_increase_of_that_head_alone(double_llama, ablation):
    handle = double_llama
    prompts = _random_prompts([16, 11, 16], seed=2)
    calls = []
    deltas, base = prompt_ablation_deltas(
        handle, prompts, ablation=ablation, reference_prompts=4, batch_size=2,
        on_progress=lambda *r: calls.append(r),
    )  # fmt: skip
    # head-prompt pairs: batch [0, 2] then [1], each through the 8 heads
    assert calls[0] == ("head importance: ablations", 0, 24) and calls[-1][1:] == (24, 24)
    assert [c[1] for c in calls[1:9]] == [2 * i for i in range(1, 9)]
    expected_base = [_loss(handle, t) for t in prompts.tokens]
    np.testing.assert_allclose(base, expected_base, rtol=1e-9)
    if ablation == "zero":
        alone = Ablation(method="zero", heads=((1, 3),))
    else:
        alone = mean_ablation(handle, [(1, 3)], prompt_set="prose", n_prompts=4)
    with handle.ablated(alone):
        ablated = [_loss(handle, t) for t in prompts.tokens]
    np.testing.assert_allclose(deltas[:, 1, 3], np.subtract(ablated, expected_base), atol=1e-9)
    assert deltas.abs().min() > 0
    delta, base_loss = ablation_importance(
        handle, prompts, ablation=ablation, reference_prompts=4, batch_size=2
    )
    torch.testing.assert_close(delta, deltas.mean(0))
    assert base_loss == pytest.approx(np.mean(expected_base))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_replaying_the_blocks_below_is_exact(arch):
    handle = load_model(f"tiny:{arch}")
    prompts = _random_prompts([14, 9, 14], seed=4)
    replayed, base = prompt_ablation_deltas(handle, prompts, batch_size=2)
    full, base_full = prompt_ablation_deltas(handle, prompts, batch_size=2, replay=False)
    assert torch.equal(base, base_full)
    torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
    assert replayed.abs().min() > 0
    # a subset of heads: the same figures for those, NaN for the rest
    some, _ = prompt_ablation_deltas(handle, prompts, batch_size=2, heads=[(1, 2), (0, 3)])
    assert torch.equal(some[:, [0, 1], [3, 2]], replayed[:, [0, 1], [3, 2]])
    assert int(some.isnan().sum()) == 3 * 6
    with pytest.raises(HeadscopeError, match="outside this model"):
        prompt_ablation_deltas(handle, prompts, heads=[(2, 0)])
    # nothing stays swapped: every block runs its own forward again
    blocks = block_list(handle.model, handle.arch.n_layers)
    assert all("forward" not in block.__dict__ for block in blocks)


def test_zero_ablation_is_what_the_gradient_estimates():
    # with every head's output shrunk 50-fold, zeroing one head is a small step along its
    # gate: then delta L(x) = -dL(x)/d gate + O(step^2), prompt by prompt; mean ablation
    # replaces the head by its mean instead and is not that step
    handle = load_model("tiny:llama")
    handle.model.double()
    with torch.no_grad():
        for block in handle.model.model.layers:
            block.self_attn.o_proj.weight *= 0.02
    prompts = _random_prompts([20, 20, 15, 20], seed=5)
    gradients = prompt_gradients(handle, prompts, batch_size=4)
    zero, _ = prompt_ablation_deltas(handle, prompts, batch_size=4)
    torch.testing.assert_close(zero, -gradients, rtol=0.05, atol=1e-6)
    mean, _ = prompt_ablation_deltas(
        handle, prompts, ablation="mean", reference_prompts=4, batch_size=4
    )
    assert (mean + gradients).abs().max() > 10 * (zero + gradients).abs().max()
    found = compare_importance(gradients, zero, n_bootstrap=200)["summary"]
    assert found["pearson_first_order_per_prompt"] > 0.999
    assert found["spearman_first_order_signed"] > 0.95
    assert found["spearman_raw_vs_abs_ablation"] > 0.95


def test_unknown_ablation_is_a_clear_error(tiny_llama):
    prompts = _random_prompts([8])
    with pytest.raises(HeadscopeError, match="choose one of zero, mean"):
        prompt_ablation_deltas(tiny_llama, prompts, ablation="resample")
    with pytest.raises(HeadscopeError, match="choose one of zero, mean"):
        detect_head_importance(tiny_llama, ablation="Zero", n_prompts=2, reference_prompts=2)


def test_layer_spearman_on_a_planted_case():
    # within every layer the two measures agree exactly (or exactly disagree in layer 1),
    # while the layers' levels run the other way: across layers the agreement is negative
    rng = np.random.default_rng(0)
    within = np.stack([rng.permutation(9) for _ in range(4)]).astype(float)
    level = 100 * np.arange(4)[:, None]
    a = within + level
    b = within * np.array([1, -1, 1, 0])[:, None] - level
    b[3] += rng.permutation(9)  # unrelated to a[3] by construction
    rho, p = layer_spearman(a, b, n_permutations=2000, seed=1)
    np.testing.assert_allclose(rho[:3], [1, -1, 1])
    assert rho[3] == pytest.approx(scipy.stats.spearmanr(a[3], b[3]).statistic)
    assert p[0] == p[2] == pytest.approx(1 / 2001)  # no shuffle of 9 heads beats rho = 1
    assert p[1] == 1.0  # every shuffle is at least rho = -1
    assert spearman(a, b) < -0.8  # across layers, the level of the layer wins
    # a constant layer has no rank correlation
    b[2] = 1.0
    rho, p = layer_spearman(a, b, n_permutations=100)
    assert math.isnan(rho[2]) and math.isnan(p[2])
    with pytest.raises(HeadscopeError):
        layer_spearman(a, b[:2])


def test_layer_spearman_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 9)), rng.normal(size=(400, 9))
    _, p = layer_spearman(a, b, n_permutations=500, seed=3)
    assert 0.02 < (p < 0.05).mean() < 0.09  # about 5 % of unrelated layers pass
    assert 0.4 < np.median(p) < 0.6


def test_bootstrap_interval_shape_and_coverage():
    # 2000 independent "heads", each the mean of 40 prompts of a skewed variable (true mean 1):
    # a 95 % interval should hold the true mean for about 95 % of them
    rng = np.random.default_rng(0)
    samples = rng.exponential(1.0, size=(40, 50, 40))
    low, high = bootstrap_interval(samples, n_resamples=1000)
    assert low.shape == high.shape == (50, 40)
    assert (low < samples.mean(0)).all() and (samples.mean(0) < high).all()
    coverage = ((low < 1) & (1 < high)).mean()
    assert 0.90 < coverage < 0.96
    # more prompts, narrower intervals (about 1 / sqrt(n))
    wide = np.median(high - low)
    low4, high4 = bootstrap_interval(rng.exponential(1.0, size=(160, 50, 40)))
    assert np.median(high4 - low4) == pytest.approx(wide / 2, rel=0.15)
    # the same weights resample every measure with the same prompts
    weights = resample_weights(40, 300, seed=1)
    assert weights.shape == (300, 40) and np.allclose(weights.sum(1), 1)
    same = bootstrap_interval(samples, weights=weights)
    again = bootstrap_interval(samples, weights=weights)
    np.testing.assert_array_equal(same[0], again[0])


def test_compare_importance_counts_heads_above_their_noise():
    # 3 layers x 4 heads over 30 prompts: head (0, 0) raises the loss clearly, (1, 1) lowers
    # it clearly, the others are pure noise around 0
    rng = np.random.default_rng(0)
    deltas = rng.normal(0, 0.01, size=(30, 3, 4))
    deltas[:, 0, 0] += 0.05
    deltas[:, 1, 1] -= 0.05
    gradients = -deltas + rng.normal(0, 0.001, size=deltas.shape)
    found = compare_importance(gradients, deltas, n_bootstrap=500)
    summary = found["summary"]
    assert summary["n_heads_delta_raises_loss"] >= 1 and summary["n_heads_delta_lowers_loss"] >= 1
    assert found["delta_low"][0, 0] > 0 and found["delta_high"][1, 1] < 0
    assert summary["n_heads_delta_above_noise"] <= 4  # of 10 noise heads, about 0.5 by chance
    assert summary["spearman_first_order_signed"] > 0.9
    assert len(summary["spearman_within_layers"]) == 3
    low, high = summary["spearman_raw_vs_ablation_interval"]
    assert -1 <= low <= summary["spearman_raw_vs_ablation"] <= high <= 1


def test_spearman_agrees_with_scipy_on_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=40).astype(float)
    b = a + rng.integers(0, 4, size=40)
    expected = scipy.stats.spearmanr(a, b).statistic
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(torch.tensor(a).reshape(5, 8), b) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(HeadscopeError):
        spearman([1, 2], [1, 2, 3])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_detector_table(tiny_llama, ablation):
    progress: dict[str, tuple[int, int]] = {}
    table = get_detector("head_importance").run_experiment(
        tiny_llama,
        ablation=ablation,
        n_prompts=6,
        reference_prompts=4,
        batch_size=4,
        n_bootstrap=200,
        on_progress=lambda *r: progress.__setitem__(r[0], r[1:]),
    )
    assert isinstance(table, HeadTable)
    assert (table.detector, table.group, table.prompt_set) == (
        "head_importance",
        "importance",
        "prose",
    )
    assert len(table.frame) == 8
    params = table.params
    assert params["evaluated_prompts"] == [4, 10] and params["ablation"] == ablation
    assert params["protocol"] == {"zero": "michel2019", "mean": "headscope-mean"}[ablation]
    assert params["protocol_note"] and params["n_bootstrap"] == 200
    summary = table.summary
    for key in (
        "base_loss",
        "n_prompts",
        "n_target_tokens",
        "spearman_normalized_vs_ablation",
        "spearman_raw_vs_ablation",
        "spearman_raw_vs_ablation_interval",
        "spearman_within_layers_mean",
        "spearman_within_layers_mean_interval",
        "spearman_within_layers",
        "spearman_within_layers_p",
        "n_layers_significant",
        "spearman_raw_vs_abs_ablation",
        "spearman_first_order_signed",
        "n_heads_delta_above_noise",
        "top_gradient_normalized",
        "top_gradient_raw",
        "top_ablation",
        "fraction_ablation_raises_loss",
    ):
        assert key in summary, key
    assert summary["n_prompts"] == 6 and summary["n_target_tokens"] == 6 * 63
    # the summary's figures, recomputed from the per-head evidence
    evidence = table.frame["evidence"]
    deltas = np.array([e["ablation_delta_loss"] for e in evidence])
    normalized = np.array([e["gradient_normalized"] for e in evidence])
    raw = np.array([e["gradient_raw"] for e in evidence])
    expected_rho = scipy.stats.spearmanr(normalized, deltas).statistic
    assert summary["spearman_normalized_vs_ablation"] == pytest.approx(expected_rho, abs=1e-9)
    within = [scipy.stats.spearmanr(raw[i : i + 4], deltas[i : i + 4]).statistic for i in (0, 4)]
    assert summary["spearman_within_layers"] == pytest.approx(within, abs=1e-9)
    assert summary["spearman_within_layers_mean"] == pytest.approx(np.mean(within), abs=1e-9)
    assert summary["fraction_ablation_raises_loss"] == (deltas > 0).mean()
    noisy = [e["delta_above_noise"] for e in evidence]
    assert summary["n_heads_delta_above_noise"] == sum(noisy)
    for e in evidence:
        low, high = e["ablation_delta_interval"]
        assert low <= e["ablation_delta_loss"] <= high
        assert e["delta_above_noise"] == (low > 0 or high < 0)
        low, high = e["gradient_raw_interval"]
        assert 0 <= low <= e["gradient_raw"] <= high
        assert e["ablation_abs_delta"] >= abs(e["ablation_delta_loss"])
    assert len(summary["top_ablation"]) == 5 and summary["top_ablation"][0].startswith("L")
    # evaluated on prose prompts 4-9, the ones after the reference prompts 0-3
    prose = get_prompt_set("prose").tokenize(tiny_llama.tokenizer, bos_token_id=0)
    expected = np.mean([_loss(tiny_llama, t) for t in prose.tokens[4:10]])
    assert summary["base_loss"] == pytest.approx(expected, rel=1e-5)
    # flags: the top 20 % (2 of 8) by score; evidence holds both measures and ranks
    assert table.frame["flagged"].sum() == 2
    assert set(table.flagged().index) == set(table.top(2).index)
    assert list(table.frame["score"]) == [e["gradient_normalized"] for e in evidence]
    assert sorted(e["rank_gradient"] for e in evidence) == list(range(1, 9))
    best = min(range(8), key=lambda i: evidence[i]["rank_ablation"])
    assert evidence[best]["ablation_delta_loss"] == max(e["ablation_delta_loss"] for e in evidence)
    top = table.frame.iloc[best]
    assert summary["top_ablation"][0] == f"L{top['layer']}H{top['head']}"
    assert progress == {  # the gradient pass over 6 prompts, then 8 heads x 6 prompts ablated
        "head importance: gradients": (6, 6), "head importance: ablations": (48, 48),
    }  # fmt: skip


def test_zero_and_mean_ablation_differ_on_the_same_prompts(tiny_llama):
    tables = {
        kind: detect_head_importance(
            tiny_llama, ablation=kind, n_prompts=3, reference_prompts=2, n_bootstrap=100
        )
        for kind in ("zero", "mean")
    }
    zero, mean = (tables[k] for k in ("zero", "mean"))
    assert zero.summary["base_loss"] == mean.summary["base_loss"]
    assert list(zero.frame["score"]) == list(mean.frame["score"])  # the gradient is the same
    zero_delta = [e["ablation_delta_loss"] for e in zero.frame["evidence"]]
    mean_delta = [e["ablation_delta_loss"] for e in mean.frame["evidence"]]
    assert not np.allclose(zero_delta, mean_delta)


def test_registered_and_runs_through_the_registry(tiny_llama):
    detector = get_detector("head_importance")
    assert detector.capture == "model" and detector.defaults == {
        "ablation": "zero", "prompt_set": "prose", "n_prompts": 24, "reference_set": "prose",
        "reference_prompts": 32, "flag_fraction": 0.2, "n_bootstrap": 1000,
    }  # fmt: skip
    table = detector.run_experiment(
        tiny_llama, batch_size=8, n_prompts=2, reference_prompts=2, n_bootstrap=100
    )
    assert len(table.frame) == 8 and table.params["evaluated_prompts"] == [2, 4]


def test_too_few_prompts_is_a_clear_error(tiny_llama):
    with pytest.raises(HeadscopeError, match="prompt set 'prose' has 128 prompts"):
        detect_head_importance(tiny_llama, n_prompts=100, reference_prompts=32)
    with pytest.raises(HeadscopeError, match="flag_fraction"):
        detect_head_importance(tiny_llama, n_prompts=2, reference_prompts=2, flag_fraction=0)
    with pytest.raises(HeadscopeError, match="at least 2"):
        detect_head_importance(tiny_llama, n_prompts=1, reference_prompts=2)
    with pytest.raises(HeadscopeError, match="n_bootstrap"):
        detect_head_importance(tiny_llama, n_prompts=2, reference_prompts=2, n_bootstrap=10)


def test_encoders_are_not_applicable():
    bert = load_model("tiny:bert")
    prompts = _random_prompts([8])
    with pytest.raises(NotApplicable, match="not a causal language model"):
        detect_head_importance(bert)
    with pytest.raises(NotApplicable):
        gradient_importance(bert, prompts)
    with pytest.raises(NotApplicable):
        ablation_importance(bert, prompts)


def _hook_count(handle: ModelHandle) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in handle.model.modules())


def test_nothing_stays_attached(tiny_llama):
    (tokens,) = _random_prompts([12], seed=3).tokens
    with torch.inference_mode():
        before = tiny_llama.model(input_ids=tokens[None]).logits
    hooks = _hook_count(tiny_llama)
    gradient_importance(tiny_llama, _prompts(tokens))
    ablation_importance(tiny_llama, _prompts(tokens), reference_prompts=2)
    broken = tokens.clone()
    broken[3] = 10**6  # outside the vocabulary: the forward raises inside the gated pass
    with pytest.raises(IndexError):
        gradient_importance(tiny_llama, _prompts(broken))
    assert _hook_count(tiny_llama) == hooks
    assert all(p.grad is None for p in tiny_llama.model.parameters())  # gates only
    with torch.inference_mode():
        after = tiny_llama.model(input_ids=tokens[None]).logits
    assert torch.equal(before, after)


def test_head_importance_is_opt_in_for_scans():
    from headscope.analyses import resolve_detectors

    default = [d.name for d in resolve_detectors(None)]
    assert "head_importance" not in default and "successor" in default
    assert [d.name for d in resolve_detectors("default")] == default
    assert "head_importance" in [d.name for d in resolve_detectors("all")]
    assert [d.name for d in resolve_detectors("head_importance")] == ["head_importance"]
