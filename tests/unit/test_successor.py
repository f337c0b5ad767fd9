"""Successor heads on tiny models: token sets, effective OV, planted head, ablation.

The tiny BPE tokenizer keeps numbers 1-9, "one"/"two", "first" and all 26
letters as single tokens (some with a leading space, some without) and no day
or month; cyclic tasks are exercised with a word-level fake tokenizer.
Planted: tiny:llama's L1H2 gets a W_O that sends each number / number word to
its successor's unembedding direction (see planting.py). The method (Gould et
al. 2023): docs/methods.md, "successor".
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from planting import fresh_tiny_llama, plant_successor_head

from headscope.analyses import get_detector
from headscope.analyses.successor import (
    continuation_accuracy,
    continuation_prompts,
    detect_successor_heads,
    effective_embeddings,
    mod10_token_set,
    ordinal_token_sets,
    random_head_draws,
    succession_scores,
)
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.handle import ModelHandle
from headscope.probes.loading import load_model

PLANTED_HEAD = (1, 2)
SIBLING_HEAD = (1, 3)  # shares KV head 1 (and so W_V) with the planted head
PLANTED_TASKS = ("numbers", "number_words")  # 11 single-token items, 9 pairs: fits d_head 16


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def planted():
    handle = fresh_tiny_llama()
    token_sets = ordinal_token_sets(handle.tokenizer, PLANTED_TASKS)
    pairs = [(s.token_ids[a], s.token_ids[b]) for s in token_sets for a, b in s.pairs]
    plant_successor_head(
        handle,
        layer=PLANTED_HEAD[0],
        head=PLANTED_HEAD[1],
        sources=[a for a, _ in pairs],
        successors=[b for _, b in pairs],
    )
    return handle


# ------------------------------------------------------------------ token sets


def test_token_sets_on_the_tiny_tokenizer_match_direct_tokenizer_calls(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    by_task = {s.task: s for s in ordinal_token_sets(tokenizer)}
    assert by_task["numbers"].items == tuple(str(i) for i in range(1, 10))  # "10" is 2 tokens
    assert {t: s.counts() for t, s in by_task.items() if s.pairs} == {
        "numbers": {"items": 200, "single_token": 9, "pairs": 8},
        "number_words": {"items": 20, "single_token": 2, "pairs": 1},
        "letters": {"items": 26, "single_token": 26, "pairs": 25},
    }
    assert by_task["days"].counts() == {"items": 7, "single_token": 0, "pairs": 0}
    for token_set in by_task.values():
        for item, token, spaced in zip(
            token_set.items, token_set.token_ids, token_set.spaced, strict=True
        ):
            spaced_ids = _encode(tokenizer, " " + item)
            assert spaced == (len(spaced_ids) == 1)
            assert [token] == (spaced_ids if spaced else _encode(tokenizer, item))
    numbers = by_task["numbers"]
    assert numbers.spaced[0] and not numbers.spaced[3]  # " 1" is one token, " 4" is two
    assert len(_encode(tokenizer, " 10")) > 1 and len(_encode(tokenizer, "10")) > 1


class WordTokenizer:
    """Word-level fake: listed " word"/"word" pieces and "," are tokens, anything else bytes."""

    def __init__(self, spaced: list[str], bare: list[str]):
        pieces = [","] + [" " + w for w in spaced] + bare
        self.vocab = {piece: i for i, piece in enumerate(pieces)}
        self.text_of = {i: piece for piece, i in self.vocab.items()}

    def __call__(self, text: str, add_special_tokens: bool = False, **options) -> dict:
        ids = []
        for piece in re.findall(r" ?[^, ]+|,", text):
            ids += [self.vocab[piece]] if piece in self.vocab else [1000 + ord(c) for c in piece]
        return {"input_ids": ids}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.text_of[i] if i in self.text_of else chr(i - 1000) for i in ids)


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
#: Wednesday is not a token; Sunday is one only without its leading space
FAKE = WordTokenizer(spaced=[d for d in DAYS if d not in ("Wednesday", "Sunday")], bare=["Sunday"])


def test_cyclic_pairs_wrap_and_never_include_dropped_items():
    (days,) = ordinal_token_sets(FAKE, ["days"])
    assert days.items == ("Monday", "Tuesday", "Thursday", "Friday", "Saturday", "Sunday")
    assert days.spaced == (True, True, True, True, True, False)
    named = {(days.items[a], days.items[b]) for a, b in days.pairs}
    assert named == {
        ("Monday", "Tuesday"),
        ("Thursday", "Friday"),
        ("Friday", "Saturday"),
        ("Saturday", "Sunday"),
        ("Sunday", "Monday"),  # cyclic wrap
    }  # no Tuesday -> Thursday across the dropped Wednesday
    (letters,) = ordinal_token_sets(FAKE, ["letters"])
    assert letters.counts() == {"items": 26, "single_token": 26, "pairs": 25}  # one byte each
    assert (25, 0) not in letters.pairs and not any(letters.spaced)  # no Z -> A: not cyclic
    with pytest.raises(HeadscopeError, match="unknown ordinal task"):
        ordinal_token_sets(FAKE, ["weekdays"])


def test_continuation_runs_wrap_and_skip_texts_not_ending_in_the_target_token(tiny_llama):
    fake_handle = ModelHandle(
        spec="fake",
        model=None,
        tokenizer=FAKE,
        arch=dataclasses.replace(tiny_llama.arch, prepend_bos=True, bos_token_id=999),
        source="word tokenizer",
        load_seconds=0.0,
    )
    prompts = continuation_prompts(fake_handle, ordinal_token_sets(FAKE, ["days"]))
    # runs of four surviving days: Thu-Sun (its text ends in " Sunday", not a token: skipped),
    # Fri-Mon and Sat-Tue (both wrap past Sunday)
    assert [p.text for p in prompts] == [
        "Friday, Saturday, Sunday, Monday",
        "Saturday, Sunday, Monday, Tuesday",
    ]
    assert [p.target_id for p in prompts] == [FAKE.vocab[" Monday"], FAKE.vocab[" Tuesday"]]
    assert prompts[0].tokens[0] == 999 and FAKE.vocab[" Monday"] not in prompts[0].tokens


def test_continuation_prompts_end_right_before_the_successor(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    token_sets = {s.task: s for s in ordinal_token_sets(tokenizer)}
    prompts = continuation_prompts(tiny_llama, list(token_sets.values()))
    assert len(prompts) == 6 + 23  # runs of four: 1-4 .. 6-9, A-D .. W-Z
    for prompt in prompts:
        items = prompt.text.split(", ")
        task = token_sets[prompt.task]
        positions = [task.positions[task.items.index(item)] for item in items]
        assert positions == list(range(positions[0], positions[0] + 4))  # consecutive
        assert prompt.target_item == items[-1]
        assert prompt.target_id == task.token_ids[task.items.index(items[-1])]
        assert prompt.tokens[0] == tiny_llama.arch.bos_token_id
        assert list(prompt.tokens[1:]) + [prompt.target_id] == _encode(tokenizer, prompt.text)
    capped = continuation_prompts(tiny_llama, [token_sets["letters"]], per_task=5)
    assert [p.text for p in capped][::4] == ["A, B, C, D", "W, X, Y, Z"]  # evenly spread
    assert len(capped) == 5


# ------------------------------------------------------------ effective OV circuit


def _naive_predictions(handle, token_set, layer: int, head: int, final_norm: bool) -> torch.Tensor:
    """The effective OV argmax of one head, straight from the Llama / Gemma 3 modules."""
    model, d_head = handle.model.model, handle.arch.d_head
    ids = torch.tensor(token_set.token_ids)
    first, block = model.layers[0], model.layers[layer]
    gemma = hasattr(first, "pre_feedforward_layernorm")
    embedded = model.embed_tokens(ids[None])[0]  # Gemma 3 scales it
    if gemma:
        effective = first.post_feedforward_layernorm(
            first.mlp(first.pre_feedforward_layernorm(embedded))
        )
    else:
        effective = first.mlp(first.post_attention_layernorm(embedded))
    kv = head // handle.arch.gqa_group_size
    w_v = block.self_attn.v_proj.weight[kv * d_head : (kv + 1) * d_head].double()
    w_o = block.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head].double()
    written = (block.input_layernorm(effective).double() @ w_v.T @ w_o.T).float()
    if gemma:
        written = block.post_attention_layernorm(written)
    if final_norm:
        written = model.norm(written)
    return (written.double() @ handle.model.lm_head.weight[ids].double().T).argmax(-1)


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:gemma3"])
@pytest.mark.parametrize("final_norm", [True, False])
def test_succession_scores_match_a_naive_per_head_computation(spec, final_norm):
    handle = load_model(spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms start at unit gain, where they only rescale rows: randomize
        for name, weight in handle.model.named_parameters():
            if "norm" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    token_sets = ordinal_token_sets(handle.tokenizer)
    with torch.no_grad():
        result = succession_scores(handle, token_sets, final_norm=final_norm)
        assert {s.task for s in result.token_sets} == {"numbers", "number_words", "letters"}
        for layer in range(handle.arch.n_layers):
            for head in range(handle.arch.n_heads):
                right = 0
                for token_set in result.token_sets:
                    naive = _naive_predictions(handle, token_set, layer, head, final_norm)
                    mine = result.predictions[token_set.task][layer, head]
                    np.testing.assert_array_equal(mine, naive.numpy())
                    right += sum(int(naive[a]) == b for a, b in token_set.pairs)
                assert result.scores[layer, head] == pytest.approx(right / result.n_pairs)


def test_include_residual_adds_the_token_embedding(tiny_llama):
    ids = [20, 36, 500]
    plain = effective_embeddings(tiny_llama, ids)
    with_residual = effective_embeddings(tiny_llama, ids, include_residual=True)
    embedding = tiny_llama.model.model.embed_tokens.weight[ids].detach()
    torch.testing.assert_close(with_residual - plain, embedding)
    assert plain.abs().sum() > 0 and plain.shape == (3, tiny_llama.arch.d_model)


def test_planted_successor_head_ranks_first(planted):
    control = fresh_tiny_llama()
    control_o = control.model.model.layers[1].self_attn.o_proj.weight
    planted_o = planted.model.model.layers[1].self_attn.o_proj.weight
    sibling = slice(SIBLING_HEAD[1] * 16, (SIBLING_HEAD[1] + 1) * 16)
    assert torch.equal(control_o[:, sibling], planted_o[:, sibling])  # sibling untouched
    for final_norm in (True, False):
        table = detect_successor_heads(
            planted, tasks=PLANTED_TASKS, behaviour=False, final_norm=final_norm
        )
        scores = table.matrix()
        best = tuple(int(i) for i in np.unravel_index(np.argmax(scores), scores.shape))
        assert best == PLANTED_HEAD
        assert scores[PLANTED_HEAD] >= 0.9
        others = np.delete(scores.ravel(), PLANTED_HEAD[0] * 4 + PLANTED_HEAD[1])
        assert others.max() <= scores[PLANTED_HEAD] - 0.5
        assert table.flagged()[["layer", "head"]].values.tolist() == [list(PLANTED_HEAD)]
        assert table.summary["best_head"] == "L1H2" and table.summary["n_pairs"] == 9
    evidence = table.frame["evidence"][PLANTED_HEAD[0] * 4 + PLANTED_HEAD[1]]
    assert evidence["task_accuracy"] == {"numbers": 1.0, "number_words": 1.0}
    unplanted = detect_successor_heads(control, tasks=PLANTED_TASKS, behaviour=False)
    assert unplanted.score(*PLANTED_HEAD) < 0.5


def test_other_architectures_and_not_applicable_cases(tiny_llama):
    for spec in ("tiny:gpt2", "tiny:gemma3"):
        table = detect_successor_heads(load_model(spec), behaviour=False)
        assert len(table.frame) == 8 and table.prompt_set == "ordinal"
        # a fraction of the successor pairs: whole multiples of 1 / n_pairs
        wins = table.frame["score"] * table.summary["n_pairs"]
        np.testing.assert_allclose(wins, wins.round(), atol=1e-9)
        best = table.frame.loc[table.frame["score"].idxmax()]
        assert table.summary["best_score"] == best["score"]
    with pytest.raises(NotApplicable, match="encoder"):
        detect_successor_heads(load_model("tiny:bert"), behaviour=False)
    with pytest.raises(NotApplicable, match="no ordinal task"):
        detect_successor_heads(tiny_llama, tasks=["days", "months"], behaviour=False)


# ------------------------------------------------------------ behavioural check


def test_registered_as_a_model_experiment_with_at_least_20_random_draws():
    detector = get_detector("successor")
    assert detector.capture == "model" and detector.primary_prompt_set == "ordinal"
    assert detector.defaults["n_random"] >= 20 and detector.defaults["threshold"] == 0.4
    assert not {"stats_by_set", "batch_size", "on_progress"} & set(detector.defaults)


def test_behavioural_check_with_the_default_random_draws(tiny_llama):
    reports = {}
    run = get_detector("successor").run_experiment
    table = run(
        tiny_llama, on_progress=lambda *r: reports.__setitem__(r[0], r[1:]), reference_prompts=2
    )
    summary = table.summary
    # clean, top ablated, 20 random draws
    assert reports == {"successor: ablation conditions": (2 + 20, 2 + 20)}
    assert summary["behaviour_prompts"] == 29
    assert summary["ablated_heads"] == [table.summary["best_head"]]
    assert len(summary["random_heads"]) == len(summary["accuracy_random_draws"]) == 20
    assert all(
        len(draw) == 1 and summary["best_head"] not in draw for draw in summary["random_heads"]
    )
    accuracies = [summary["accuracy_clean"], summary["accuracy_top_ablated"]]
    # fractions of the 29 behaviour prompts: whole multiples of 1 / 29
    correct = np.array(accuracies + summary["accuracy_random_draws"]) * 29
    np.testing.assert_allclose(correct, correct.round(), atol=1e-9)
    assert all(lp < 0 for lp in summary["mean_log_prob_random_draws"])
    assert summary["mean_log_prob_random_std"] > 0  # draws differ: the ablation is applied
    assert abs(summary["mean_log_prob_top_ablated"] - summary["mean_log_prob_clean"]) > 1e-6
    assert summary["ablation_reference"]["n_prompts"] == 2
    again = run(tiny_llama, reference_prompts=2).summary
    assert again == summary  # deterministic for a seed
    other_seed = run(tiny_llama, reference_prompts=2, seed=1).summary
    assert other_seed["random_heads"] != summary["random_heads"]


def test_random_draws_with_top_k_two_avoid_the_top_heads(tiny_llama):
    table = detect_successor_heads(tiny_llama, top_k=2, n_random=5, reference_prompts=2)
    top = [f"L{r.layer}H{r.head}" for r in table.top(2).itertuples()]
    assert table.summary["ablated_heads"] == top
    for draw in table.summary["random_heads"]:
        assert len(set(draw)) == 2 and not set(draw) & set(top)
    draws = random_head_draws(2, 4, [(0, 0), (1, 1)], 2, 50, seed=3)
    assert len(draws) == 50 and len(set(draws)) > 5
    assert all((0, 0) not in d and (1, 1) not in d and len(set(d)) == 2 for d in draws)
    assert draws == random_head_draws(2, 4, [(0, 0), (1, 1)], 2, 50, seed=3)
    with pytest.raises(HeadscopeError, match="top_k"):
        detect_successor_heads(tiny_llama, top_k=0)


def test_continuation_accuracy_reads_the_last_real_position_of_padded_batches(tiny_llama):
    prompts = continuation_prompts(tiny_llama, ordinal_token_sets(tiny_llama.tokenizer))
    prompts = prompts[::3]  # numbers (8 tokens) and letters (10 tokens): batches get padding
    assert len({len(p.tokens) for p in prompts}) > 1
    own_choice = []
    with torch.no_grad():
        for prompt in prompts:
            logits = tiny_llama.model(torch.tensor([prompt.tokens])).logits[0, -1]
            own_choice.append(dataclasses.replace(prompt, target_id=int(logits.argmax())))
    batched = continuation_accuracy(tiny_llama, own_choice, batch_size=4)
    assert batched.accuracy == 1.0 and all(batched.correct)
    single = continuation_accuracy(tiny_llama, own_choice, batch_size=1)
    np.testing.assert_allclose(batched.log_probs, single.log_probs, atol=1e-5)
    original = continuation_accuracy(tiny_llama, prompts)
    assert original.mean_log_prob < batched.mean_log_prob  # the argmax token is likelier
    with pytest.raises(HeadscopeError, match="no continuation prompts"):
        continuation_accuracy(tiny_llama, [])


def test_a_planted_copying_head_has_the_top_copy_score_and_no_succession():
    handle = fresh_tiny_llama()
    (numbers,) = ordinal_token_sets(handle.tokenizer, ["numbers"])
    items = list(numbers.token_ids)
    plant_successor_head(handle, layer=1, head=2, sources=items, successors=items)  # maps t -> t
    table = detect_successor_heads(handle, tasks=["numbers"], behaviour=False)
    assert table.summary["best_copy_head"] == "L1H2" and table.summary["best_copy_score"] == 1.0
    assert table.score(1, 2) == 0.0  # copying is never the successor
    result = succession_scores(handle, [numbers])
    others = np.delete(result.copy_scores.ravel(), 1 * 4 + 2)
    assert others.max() < 0.5


# ------------------------------------------------ protocols, chance, null, mod-10


@torch.no_grad()
def _plant_on(handle, layer: int, head: int, effective: torch.Tensor, successors, *, normed: bool):
    """Set (layer, head)'s W_O so that the rows ``effective`` (read through the
    layer's input norm if ``normed``) write their successors' unembedding rows."""
    block = handle.model.model.layers[layer]
    read = block.input_layernorm(effective) if normed else effective
    kv = head // handle.arch.gqa_group_size
    values = read @ block.self_attn.v_proj.weight[kv * 16 : (kv + 1) * 16].T
    targets = handle.model.lm_head.weight[successors]
    w_o = torch.linalg.lstsq(values.double(), targets.double()).solution
    block.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = w_o.T.float()


def _pairs(token_sets):
    pairs = [(s.token_ids[a], s.token_ids[b]) for s in token_sets for a, b in s.pairs]
    return [a for a, _ in pairs], [b for _, b in pairs]


@torch.no_grad()
def _randomize_norms(handle, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, weight in handle.model.named_parameters():
        if "norm" in name:
            weight.copy_(torch.randn(weight.shape, generator=generator))


def test_gould2023_uses_no_norm_anywhere(tiny_llama):
    handle = load_model("tiny:llama")
    _randomize_norms(handle)
    model = handle.model.model
    ids = [20, 36, 500]
    with torch.no_grad():
        raw = model.layers[0].mlp(model.embed_tokens.weight[ids])
        torch.testing.assert_close(effective_embeddings(handle, ids, protocol="gould2023"), raw)
        with_we = effective_embeddings(handle, ids, protocol="gould2023", include_residual=True)
        torch.testing.assert_close(with_we, raw + model.embed_tokens.weight[ids])
        token_sets = ordinal_token_sets(handle.tokenizer)
        result = succession_scores(handle, token_sets, protocol="gould2023")
        layer, head = 1, 3
        kv = head // handle.arch.gqa_group_size
        block = model.layers[layer]
        w_v = block.self_attn.v_proj.weight[kv * 16 : (kv + 1) * 16]
        w_o = block.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16]
        for token_set in result.token_sets:
            e = model.layers[0].mlp(model.embed_tokens.weight[list(token_set.token_ids)])
            logits = e @ w_v.T @ w_o.T @ handle.model.lm_head.weight[list(token_set.token_ids)].T
            mine = result.predictions[token_set.task][layer, head]
            np.testing.assert_array_equal(mine, logits.argmax(-1).numpy())
        # the final norm is the protocol's choice unless asked for: with it, other winners
        normed = succession_scores(handle, token_sets, protocol="gould2023", final_norm=True)
        assert any(
            (normed.predictions[t] != result.predictions[t]).any() for t in result.predictions
        )


def test_layer0_protocol_is_the_residual_after_layer_0_on_the_token_alone():
    handle = load_model("tiny:llama")
    _randomize_norms(handle)
    model = handle.model.model
    ids = [20, 36, 500]
    with torch.no_grad():
        x = model.embed_tokens.weight[ids]
        first = model.layers[0]
        values = first.self_attn.v_proj(first.input_layernorm(x))  # [token, n_kv * 16]
        group = handle.arch.gqa_group_size  # a lone token attends only to itself
        heads = values.view(len(ids), -1, 16).repeat_interleave(group, dim=1).flatten(1)
        middle = x + first.self_attn.o_proj(heads)
        expected = middle + first.mlp(first.post_attention_layernorm(middle))
        got = effective_embeddings(handle, ids, protocol="layer0")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, effective_embeddings(handle, ids, include_residual=True))
    with pytest.raises(HeadscopeError, match="already includes W_E"):
        effective_embeddings(handle, ids, protocol="layer0", include_residual=True)
    for spec in ("tiny:gpt2", "tiny:gemma3"):  # runs through the model's own forward
        other = load_model(spec)
        out = effective_embeddings(other, ids, protocol="layer0")
        assert out.shape == (3, other.arch.d_model) and torch.isfinite(out).all()


def test_unknown_protocol_is_refused_listing_the_choices(tiny_llama):
    with pytest.raises(HeadscopeError, match="headscope, gould2023, layer0"):
        detect_successor_heads(tiny_llama, protocol="gould", behaviour=False)
    with pytest.raises(HeadscopeError, match="unknown successor protocol"):
        succession_scores(tiny_llama, ordinal_token_sets(tiny_llama.tokenizer), protocol="x")


@pytest.mark.parametrize("protocol", ["headscope", "gould2023", "layer0"])
def test_a_head_planted_for_each_protocol_ranks_first_under_it(protocol):
    handle = fresh_tiny_llama()
    token_sets = ordinal_token_sets(handle.tokenizer, PLANTED_TASKS)
    sources, successors = _pairs(token_sets)
    with torch.no_grad():
        model = handle.model.model
        embedded = model.embed_tokens.weight[sources]
        if protocol == "gould2023":
            effective = model.layers[0].mlp(embedded)
        elif protocol == "headscope":
            effective = model.layers[0].mlp(model.layers[0].post_attention_layernorm(embedded))
        else:
            captured = model(torch.tensor(sources)[:, None], output_hidden_states=True)
            effective = captured.hidden_states[1][:, 0]
    _plant_on(handle, *PLANTED_HEAD, effective, successors, normed=protocol != "gould2023")
    table = detect_successor_heads(handle, tasks=PLANTED_TASKS, behaviour=False, protocol=protocol)
    scores = table.matrix()
    assert table.summary["best_head"] == "L1H2" and scores[PLANTED_HEAD] >= 0.9
    assert table.params["protocol"] == protocol
    assert table.params["protocol_note"] and table.summary["protocol"] == protocol
    assert table.params["final_norm_applied"] == (protocol != "gould2023")
    # the best head of the relabelled null is far below the planted head
    assert table.summary["null_best_score_q95"] < scores[PLANTED_HEAD] - 0.4
    assert table.summary["null_p"] == pytest.approx(1 / 201)  # no relabelling does as well
    top = table.summary["top_heads"][0]
    assert top["head"] == "L1H2"
    assert top["task_accuracy"] == {"numbers": 1.0, "number_words": 1.0}


def test_chance_levels_and_the_relabelled_null(planted):
    result = succession_scores(planted, ordinal_token_sets(planted.tokenizer, PLANTED_TASKS))
    sizes = {s.task: len(s.items) for s in result.token_sets}
    assert sizes == {"numbers": 9, "number_words": 2}
    assert result.task_chance == {"numbers": 1 / 9, "number_words": 1 / 2}
    assert result.chance == pytest.approx((8 / 9 + 1 / 2) / 9)  # 8 pairs at 1/9, 1 at 1/2
    null = result.null_best_scores(30, seed=1)
    assert null.shape == (30,) and (null >= 0).all() and (null <= 1).all()
    np.testing.assert_array_equal(null, result.null_best_scores(30, seed=1))  # seeded
    assert null.mean() < 0.6 < result.scores[PLANTED_HEAD]


def test_mod10_check_finds_a_planted_digit_successor_and_scores_the_wrap():
    handle = fresh_tiny_llama()
    digits = mod10_token_set(handle.tokenizer)
    assert digits.items == tuple("0123456789") and digits.cyclic
    assert (9, 0) in digits.pairs and len(digits.pairs) == 10  # 9 -> 0 mod 10
    sources, successors = _pairs([digits])
    with torch.no_grad():
        first = handle.model.model.layers[0]
        embedded = handle.model.model.embed_tokens.weight[sources]
        effective = first.mlp(first.post_attention_layernorm(embedded))
    _plant_on(handle, *PLANTED_HEAD, effective, successors, normed=True)
    table = detect_successor_heads(handle, behaviour=False)
    mod10 = table.summary["mod10"]
    assert mod10["single_token_digits"] == 10 and mod10["n_pairs"] == 10
    assert mod10["chance"] == pytest.approx(0.1)
    assert mod10["best_head"] == "L1H2" and mod10["best_score"] == 1.0
    assert mod10["null_best_score_q95"] < 0.7 and mod10["null_p"] < 0.01
    evidence = table.frame["evidence"][PLANTED_HEAD[0] * 4 + PLANTED_HEAD[1]]
    assert evidence["mod10"] == 1.0
    # a head that maps 9 to itself (no wrap) fails that one pair: 9 of 10
    wrapless = [s if s != successors[-1] else sources[-1] for s in successors]
    _plant_on(handle, *PLANTED_HEAD, effective, wrapless, normed=True)
    again = detect_successor_heads(handle, behaviour=False).summary["mod10"]
    assert again["best_head"] == "L1H2" and again["best_score"] == pytest.approx(0.9)
