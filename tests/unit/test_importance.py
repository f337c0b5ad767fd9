"""Head importance: gate gradients against finite differences, a planted head, the detector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from headscope.analyses import get_detector
from headscope.analyses.importance import (
    ablation_importance,
    detect_head_importance,
    gradient_importance,
    spearman,
)
from headscope.data import get_prompt_set
from headscope.data.prompt_sets import TokenizedPrompts
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import mean_ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.loading import load_model
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


@pytest.mark.parametrize(("layer", "head"), [(0, 2), (1, 2)])
def test_planted_head_is_the_most_important(layer, head):
    handle = load_model("tiny:llama")
    with torch.no_grad():
        handle.model.model.layers[layer].self_attn.o_proj.weight[
            :, head * D_HEAD : (head + 1) * D_HEAD
        ] *= 20
    prompts = _sample(handle, 16, 32, seed=0)
    raw, normalized = gradient_importance(handle, prompts, batch_size=8)
    delta, base_loss = ablation_importance(handle, prompts, reference_prompts=8, batch_size=8)
    assert 6.0 < base_loss < 7.5  # a random model: about log(1024)
    assert _rank(delta, layer, head) == 1
    assert delta[layer, head] > 2 * delta.flatten().sort(descending=True).values[1]
    assert _rank(normalized, layer, head) == 1
    assert normalized[layer, head] > 0.8  # it dominates its layer's row
    if layer == 0:
        assert _rank(raw, layer, head) == 1
    else:  # a big late head amplifies the gradients of the heads that feed it
        assert raw[layer, head] == raw[layer].max()


def test_ablation_delta_is_the_loss_increase_of_that_head_alone(double_llama):
    handle = double_llama
    prompts = _random_prompts([16, 16, 16], seed=2)
    calls = []
    delta, base_loss = ablation_importance(
        handle, prompts, reference_prompts=4, batch_size=2, on_progress=lambda *r: calls.append(r)
    )
    assert calls == [("head importance: ablations", i, 8) for i in range(9)]
    assert base_loss == pytest.approx(np.mean([_loss(handle, t) for t in prompts.tokens]))
    alone = mean_ablation(handle, [(1, 3)], prompt_set="prose", n_prompts=4)
    with handle.ablated(alone):
        ablated = np.mean([_loss(handle, t) for t in prompts.tokens])
    assert delta[1, 3] == pytest.approx(ablated - base_loss, abs=1e-9)
    assert delta.abs().min() > 0


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


def test_detector_table(tiny_llama):
    progress: dict[str, tuple[int, int]] = {}
    table = get_detector("head_importance").run_experiment(
        tiny_llama,
        n_prompts=4,
        reference_prompts=4,
        batch_size=4,
        on_progress=lambda *r: progress.__setitem__(r[0], r[1:]),
    )
    assert isinstance(table, HeadTable)
    assert (table.detector, table.group, table.prompt_set) == (
        "head_importance",
        "importance",
        "prose",
    )
    assert len(table.frame) == 8
    assert table.params["evaluated_prompts"] == [4, 8]
    summary = table.summary
    for key in (
        "base_loss",
        "n_prompts",
        "n_target_tokens",
        "spearman_normalized_vs_ablation",
        "spearman_raw_vs_ablation",
        "top_gradient_normalized",
        "top_gradient_raw",
        "top_ablation",
        "fraction_ablation_raises_loss",
    ):
        assert key in summary, key
    assert summary["n_prompts"] == 4 and summary["n_target_tokens"] == 4 * 63
    # the summary's figures, recomputed from the per-head evidence
    deltas = np.array([e["ablation_delta_loss"] for e in table.frame["evidence"]])
    normalized = np.array([e["gradient_normalized"] for e in table.frame["evidence"]])
    expected_rho = scipy.stats.spearmanr(normalized, deltas).statistic
    assert summary["spearman_normalized_vs_ablation"] == pytest.approx(expected_rho, abs=1e-9)
    assert summary["fraction_ablation_raises_loss"] == (deltas > 0).mean()
    assert len(summary["top_ablation"]) == 5 and summary["top_ablation"][0].startswith("L")
    # evaluated on prose prompts 4-7, the ones after the reference prompts 0-3
    prose = get_prompt_set("prose").tokenize(tiny_llama.tokenizer, bos_token_id=0)
    expected = np.mean([_loss(tiny_llama, t) for t in prose.tokens[4:8]])
    assert summary["base_loss"] == pytest.approx(expected, rel=1e-5)
    # flags: the top 20 % (2 of 8) by score; evidence holds both measures and ranks
    assert table.frame["flagged"].sum() == 2
    assert set(table.flagged().index) == set(table.top(2).index)
    evidence = table.frame["evidence"]
    assert list(table.frame["score"]) == [e["gradient_normalized"] for e in evidence]
    assert sorted(e["rank_gradient"] for e in evidence) == list(range(1, 9))
    best = min(range(8), key=lambda i: evidence[i]["rank_ablation"])
    assert evidence[best]["ablation_delta_loss"] == max(e["ablation_delta_loss"] for e in evidence)
    top = table.frame.iloc[best]
    assert summary["top_ablation"][0] == f"L{top['layer']}H{top['head']}"
    assert progress == {  # the gradient pass over 4 prompts, then 8 ablated heads
        "head importance: gradients": (4, 4), "head importance: ablations": (8, 8),
    }  # fmt: skip


def test_registered_and_runs_through_the_registry(tiny_llama):
    detector = get_detector("head_importance")
    assert detector.capture == "model" and detector.defaults == {
        "prompt_set": "prose", "n_prompts": 16, "reference_set": "prose",
        "reference_prompts": 32, "flag_fraction": 0.2,
    }  # fmt: skip
    table = detector.run_experiment(tiny_llama, batch_size=8, n_prompts=2, reference_prompts=2)
    assert len(table.frame) == 8 and table.params["evaluated_prompts"] == [2, 4]


def test_too_few_prompts_is_a_clear_error(tiny_llama):
    with pytest.raises(HeadscopeError, match="prompt set 'prose' has 128 prompts"):
        detect_head_importance(tiny_llama, n_prompts=100, reference_prompts=32)
    with pytest.raises(HeadscopeError, match="flag_fraction"):
        detect_head_importance(tiny_llama, n_prompts=2, reference_prompts=2, flag_fraction=0)


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
