"""Successor heads (Gould et al. 2023): heads whose OV circuit maps an ordinal
token to the next one ("Monday" -> "Tuesday", "3" -> "4"). Such a head is defined by what
it writes, not where it attends, so it is read off the weights, then checked behaviourally.

1. **Token sets.** Eight tasks: numbers 1-200, number words one-twenty,
   ordinals first-tenth, letters A-Z, and the cyclic days, months, and their
   abbreviations. An item survives when " X" is one token, else when "X" is
   (SmolLM2 splits the space off digits); pairs item_i -> item_i+1 (and
   last -> first when cyclic) join surviving items only. Tokenizers drop many
   items, so the counts go into the table's summary.
2. **Effective embedding.** ``e_t = MLP0(pre_mlp_norm_0(W_E[t]))``: layer 0's
   MLP alone (Gemma's post-MLP norm too), no attention: in small models MLP0
   acts as an extended embedding. ``include_residual=True`` uses
   ``W_E[t] + MLP0(...)``, the residual stream after layer 0 with attention skipped.
3. **Effective OV.** ``o_t = input_norm_l(e_t) W_V W_O`` for head (l, h), no
   biases (Gemma's post-attention norm applied), then logits over the task's
   own tokens S, ``final_norm(o_t) W_U[:, S]``; ``final_norm=False`` skips the
   final norm (its per-dimension gain, or LayerNorm's centring, can change the
   winner). **Succession score**: the fraction of pairs, pooled over tasks,
   whose successor has the top logit among S; flagged above ``threshold``.
4. **Behavioural check.** Prompts "Monday, Tuesday, Wednesday," -> " Thursday"
   from runs of four surviving items: next-token accuracy and mean target
   log-probability clean, with the top successor heads mean-ablated, and with
   as many random other heads mean-ablated (``n_random`` seeded draws). A real
   successor head hurts the continuation more than random heads do.

Definitions, defaults and our choices: docs/methods.md, "successor".
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from headscope.ablation_spec import head_name
from headscope.analyses.registry import keyword_defaults
from headscope.data.ordinal import ORDINAL_TASKS, task_by_name
from headscope.data.prompt_sets import PaddedBatch, encode_text
from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.ablation import Ablation, Head, mean_ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import (
    block_sites,
    embed_tokens,
    head_output_weight,
    head_value_weight,
    unembedding,
)
from headscope.probes.sites import final_norm as final_norm_module
from headscope.progress import Progress, counter
from headscope.tables import HeadTable

RUN_LENGTH = 4  # items per continuation prompt: three shown, the fourth predicted


@dataclass(frozen=True, kw_only=True)
class TokenSet:
    """The single-token items of one task for one tokenizer.

    ``positions[i]`` is the index in the task's full list of surviving item
    ``items[i]``, whose token is ``token_ids[i]`` (``spaced[i]``: the " X" form);
    ``pairs`` are (source, successor) indices into ``items``.
    """

    task: str
    cyclic: bool
    n_items: int
    positions: tuple[int, ...]
    items: tuple[str, ...]
    token_ids: tuple[int, ...]
    spaced: tuple[bool, ...]
    pairs: tuple[tuple[int, int], ...]

    def counts(self) -> dict[str, int]:
        return {"items": self.n_items, "single_token": len(self.items), "pairs": len(self.pairs)}


def _item_token(tokenizer: Any, item: str) -> tuple[int, bool] | None:
    """(token id, spaced): " X" if that is one token, else "X"; None if neither is.

    The token must decode back to the item (not an unknown or byte-fallback token).
    """
    for text, spaced in ((" " + item, True), (item, False)):
        ids = encode_text(tokenizer, text)
        if len(ids) == 1 and tokenizer.decode(ids).strip() == item:
            return ids[0], spaced
    return None


def _successor_index(position: int, n_items: int, cyclic: bool) -> int | None:
    if position + 1 < n_items:
        return position + 1
    return 0 if cyclic and n_items > 1 else None


def ordinal_token_sets(tokenizer: Any, tasks: Sequence[str] | None = None) -> tuple[TokenSet, ...]:
    """One TokenSet per task (all of ``ORDINAL_TASKS`` by default), empty ones included."""
    chosen = ORDINAL_TASKS if tasks is None else tuple(task_by_name(n) for n in tasks)
    token_sets = []
    for task in chosen:
        survivors: dict[int, tuple[int, bool]] = {}  # position -> (token id, spaced)
        taken: set[int] = set()
        for position, item in enumerate(task.items):
            found = _item_token(tokenizer, item)
            if found is not None and found[0] not in taken:  # one token, two items: keep the first
                survivors[position] = found
                taken.add(found[0])
        positions = tuple(sorted(survivors))
        index_of = {p: i for i, p in enumerate(positions)}
        pairs = []
        for position in positions:
            successor = _successor_index(position, len(task.items), task.cyclic)
            if successor is not None and successor in survivors:
                pairs.append((index_of[position], index_of[successor]))
        token_sets.append(
            TokenSet(
                task=task.name,
                cyclic=task.cyclic,
                n_items=len(task.items),
                positions=positions,
                items=tuple(task.items[p] for p in positions),
                token_ids=tuple(survivors[p][0] for p in positions),
                spaced=tuple(survivors[p][1] for p in positions),
                pairs=tuple(pairs),
            )
        )
    return tuple(token_sets)


# ------------------------------------------------------------ effective OV circuit


def _apply(module: torch.nn.Module | None, x: Tensor) -> Tensor:
    """``module(x)`` in the module's dtype, back in float32; identity for None."""
    if module is None:
        return x
    dtype = next(module.parameters(), x).dtype
    out = module(x.to(dtype))
    return (out[0] if isinstance(out, tuple) else out).float()


def _check_decoder(handle: ModelHandle) -> None:
    if not handle.arch.causal:
        raise NotApplicable(f"{handle.spec} is an encoder; successor heads need a decoder")
    first = block_sites(handle.model, handle.arch)[0]
    if not first.pre_norm or first.mlp is None:
        raise NotApplicable(f"{handle.spec} has no layer-0 MLP to build effective embeddings")


@torch.no_grad()
def effective_embeddings(
    handle: ModelHandle, token_ids: Sequence[int], *, include_residual: bool = False
) -> Float[Tensor, "vocab d_model"]:
    """Rows ``MLP0(pre_mlp_norm_0(W_E[t]))`` (+ ``W_E[t]`` if ``include_residual``), float32."""
    _check_decoder(handle)
    first = block_sites(handle.model, handle.arch)[0]
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=handle.device)[None]
    embedded = embed_tokens(handle.model, ids).float()  # [1, token, d_model]
    out = _apply(first.post_mlp_norm, _apply(first.mlp, _apply(first.pre_mlp_norm, embedded)))
    if include_residual:
        out = out + embedded
    return out[0]


@dataclass(frozen=True, kw_only=True)
class SuccessionScores:
    """Effective-OV succession of every head on some token sets.

    ``scores`` [layer, head]: pooled fraction of pairs right. ``correct[task]``
    [layer, head]: pairs right in that task. ``predictions[task]`` [layer, head,
    item]: index (into the task's items) of the top-logit token for each item.
    """

    token_sets: tuple[TokenSet, ...]
    scores: np.ndarray
    correct: Mapping[str, np.ndarray]
    predictions: Mapping[str, np.ndarray]

    @property
    def n_pairs(self) -> int:
        return sum(len(s.pairs) for s in self.token_sets)

    def task_accuracy(self, layer: int, head: int) -> dict[str, float]:
        """Fraction of each task's pairs right for one head."""
        return {s.task: self.correct[s.task][layer, head] / len(s.pairs) for s in self.token_sets}

    @property
    def copy_scores(self) -> np.ndarray:
        """[layer, head]: fraction of items whose own token tops the head's logits.

        A copying head, not a successor head; it shows what a head's OV circuit
        does when its succession score is low.
        """
        hits = sum((p == np.arange(p.shape[-1])).sum(-1) for p in self.predictions.values())
        return hits / sum(p.shape[-1] for p in self.predictions.values())

    def top_heads(self, k: int) -> list[Head]:
        """The ``k`` best heads, best first (ties: lower layer, then lower head)."""
        order = np.argsort(-self.scores.ravel(), kind="stable")[:k]
        n_heads = self.scores.shape[1]
        return [(int(i // n_heads), int(i % n_heads)) for i in order]


def _layer_weights(site, arch) -> tuple[Tensor, Tensor]:
    """W_V [head, d_model, d_head] and W_O [head, d_head, d_model] of every head, float32."""
    w_v = torch.stack([head_value_weight(site, h, arch)[0] for h in range(arch.n_heads)])
    w_o = torch.stack([head_output_weight(site, h, arch) for h in range(arch.n_heads)])
    return w_v.float(), w_o.float()


@torch.no_grad()
def succession_scores(
    handle: ModelHandle,
    token_sets: Sequence[TokenSet],
    *,
    final_norm: bool = True,
    include_residual: bool = False,
) -> SuccessionScores:
    """Score every head's effective OV circuit on ``token_sets`` (those with pairs)."""
    arch = handle.arch
    scored = tuple(s for s in token_sets if s.pairs)
    if not scored:
        raise NotApplicable(
            f"no ordinal task has two consecutive single-token items in {handle.spec}'s tokenizer"
        )
    all_ids = [t for s in scored for t in s.token_ids]
    starts = np.cumsum([0] + [len(s.token_ids) for s in scored])
    embedded = effective_embeddings(handle, all_ids, include_residual=include_residual)
    w_u = unembedding(handle.model)[:, all_ids].float()  # [d_model, token]
    norm = final_norm_module(handle.model) if final_norm else None
    shape = (arch.n_layers, arch.n_heads)
    correct = {s.task: np.zeros(shape, dtype=np.int64) for s in scored}
    predictions = {s.task: np.zeros((*shape, len(s.items)), dtype=np.int64) for s in scored}
    for layer, site in enumerate(block_sites(handle.model, arch)):
        w_v, w_o = _layer_weights(site, arch)
        normed = _apply(site.input_norm, embedded[None])[0]  # [token, d_model]
        written = torch.einsum("td,hde->hte", normed, w_v) @ w_o  # [head, token, d_model]
        written = _apply(norm, _apply(site.post_attention_norm, written))
        for token_set, start, stop in zip(scored, starts[:-1], starts[1:], strict=True):
            logits = written[:, start:stop] @ w_u[:, start:stop]  # [head, item, item]
            predicted = logits.argmax(-1).cpu()  # [head, item]
            sources, successors = (torch.tensor(x) for x in zip(*token_set.pairs, strict=True))
            hits = predicted[:, sources] == successors
            correct[token_set.task][layer] = hits.sum(-1).numpy()
            predictions[token_set.task][layer] = predicted.numpy()
    scores = sum(correct.values()) / sum(len(s.pairs) for s in scored)
    return SuccessionScores(
        token_sets=scored, scores=scores, correct=correct, predictions=predictions
    )


# ------------------------------------------------------------ behavioural check


@dataclass(frozen=True, kw_only=True)
class ContinuationPrompt:
    """``text`` is four items joined by ", "; ``tokens`` is it tokenized minus the last."""

    task: str
    text: str
    tokens: tuple[int, ...]
    target_id: int
    target_item: str


def _runs(token_set: TokenSet) -> list[list[int]]:
    """Runs (indices into items) of RUN_LENGTH consecutive surviving items of the task."""
    index_of = {p: i for i, p in enumerate(token_set.positions)}
    runs = []
    for start in token_set.positions:
        run = [start + k for k in range(RUN_LENGTH)]  # past the end: not in index_of
        if token_set.cyclic:
            run = [p % token_set.n_items for p in run]
        if len(set(run)) == RUN_LENGTH and all(p in index_of for p in run):
            runs.append([index_of[p] for p in run])
    return runs


def _evenly_spread(values: list, cap: int) -> list:
    if len(values) <= cap:
        return values
    picks = np.unique(np.linspace(0, len(values) - 1, cap).round().astype(int))
    return [values[i] for i in picks]


def continuation_prompts(
    handle: ModelHandle, token_sets: Sequence[TokenSet], *, per_task: int = 40
) -> list[ContinuationPrompt]:
    """Prompts whose next token is an item's successor, at most ``per_task`` per task.

    A run whose text does not end in the target item's own token (a tokenizer
    that merges across the comma) is skipped. BOS is prepended when the model
    expects one.
    """
    n_bos = 0 if handle.bos_id is None else 1
    prompts = []
    for token_set in token_sets:
        task_prompts = []
        for run in _runs(token_set):
            text = ", ".join(token_set.items[i] for i in run)
            ids = handle.encode(text)  # BOS first when the model wants one
            target = token_set.token_ids[run[-1]]
            if len(ids) - n_bos < 2 or ids[-1] != target:
                continue
            task_prompts.append(
                ContinuationPrompt(
                    task=token_set.task,
                    text=text,
                    tokens=tuple(ids[:-1]),
                    target_id=target,
                    target_item=token_set.items[run[-1]],
                )
            )
        prompts += _evenly_spread(task_prompts, per_task)
    return prompts


@dataclass(frozen=True, kw_only=True)
class ContinuationScore:
    """Next-token accuracy and mean target log-probability over some prompts."""

    accuracy: float
    mean_log_prob: float
    correct: tuple[bool, ...]
    log_probs: tuple[float, ...]


@torch.inference_mode()
def continuation_accuracy(
    handle: ModelHandle,
    prompts: Sequence[ContinuationPrompt],
    *,
    ablation: Ablation | None = None,
    batch_size: int = 8,
) -> ContinuationScore:
    """Whether the argmax next token (whole vocabulary) is each prompt's target.

    Batches are right-padded with an attention mask; the prediction is read at
    each prompt's last real position. ``ablation`` is installed for the forwards.
    """
    if not prompts:
        raise HeadscopeError("no continuation prompts to score")
    correct: list[bool] = []
    log_probs: list[float] = []
    scope = handle.ablated(ablation) if ablation is not None else contextlib.nullcontext()
    with scope:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            padded = PaddedBatch.from_sequences(
                range(start, start + len(batch)), [p.tokens for p in batch], handle.pad_id
            )
            tokens = padded.tokens.to(handle.device)
            mask = padded.mask.long().to(handle.device)
            logits = handle.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
            last = logits[torch.arange(len(batch)), padded.lengths - 1].float().cpu()
            targets = torch.tensor([p.target_id for p in batch])
            log_prob = torch.log_softmax(last, -1).gather(1, targets[:, None])[:, 0]
            correct += (last.argmax(-1) == targets).tolist()
            log_probs += log_prob.tolist()
    return ContinuationScore(
        accuracy=float(np.mean(correct)),
        mean_log_prob=float(np.mean(log_probs)),
        correct=tuple(correct),
        log_probs=tuple(log_probs),
    )


@dataclass(frozen=True, kw_only=True)
class BehaviouralCheck:
    """Continuation scores: clean, top heads mean-ablated, random heads mean-ablated."""

    n_prompts: int
    top_heads: tuple[Head, ...]
    random_heads: tuple[tuple[Head, ...], ...]
    clean: ContinuationScore
    top_ablated: ContinuationScore
    random_ablated: tuple[ContinuationScore, ...]
    reference: Mapping[str, Any]

    def summary(self) -> dict[str, Any]:
        """Flat, JSON-able figures (random: mean, sample std over draws, every draw)."""
        out: dict[str, Any] = {
            "behaviour_prompts": self.n_prompts,
            "ablated_heads": [head_name(*h) for h in self.top_heads],
            "random_heads": [[head_name(*h) for h in draw] for draw in self.random_heads],
            "ablation_reference": dict(self.reference),
        }
        for name in ("accuracy", "mean_log_prob"):
            draws = [getattr(s, name) for s in self.random_ablated]
            out[f"{name}_clean"] = getattr(self.clean, name)
            out[f"{name}_top_ablated"] = getattr(self.top_ablated, name)
            out[f"{name}_random_mean"] = float(np.mean(draws)) if draws else None
            out[f"{name}_random_std"] = float(np.std(draws, ddof=1)) if len(draws) > 1 else None
            out[f"{name}_random_draws"] = draws
        return out


def random_head_draws(
    n_layers: int, n_heads: int, exclude: Sequence[Head], k: int, n_draws: int, seed: int
) -> tuple[tuple[Head, ...], ...]:
    """``n_draws`` sets of ``k`` distinct heads, none in ``exclude``; seeded."""
    every_head = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    others = [h for h in every_head if h not in exclude]
    if len(others) < k:
        raise HeadscopeError(f"only {len(others)} heads outside the top {k}; cannot draw {k}")
    rng = random.Random(seed)
    return tuple(tuple(sorted(rng.sample(others, k))) for _ in range(n_draws))


def behavioural_check(
    handle: ModelHandle,
    prompts: Sequence[ContinuationPrompt],
    top_heads: Sequence[Head],
    *,
    n_random: int = 20,
    reference_set: str = "prose",
    reference_prompts: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    on_progress: Progress | None = None,
) -> BehaviouralCheck:
    """Continuation accuracy clean, with ``top_heads`` and with random heads mean-ablated.

    Each head's mean output is measured once, on the first ``reference_prompts``
    of ``reference_set``, for the union of all heads ablated in any condition.
    ``on_progress`` counts the conditions (clean, top heads, each random draw).
    """
    arch = handle.arch
    top = tuple(top_heads)
    draws = random_head_draws(arch.n_layers, arch.n_heads, top, len(top), n_random, seed)
    needed = tuple(dict.fromkeys([*top, *(h for draw in draws for h in draw)]))
    means = mean_ablation(
        handle, needed, prompt_set=reference_set, n_prompts=reference_prompts, batch_size=batch_size
    )

    scored: dict[tuple[Head, ...], ContinuationScore] = {}  # () is clean; a repeat runs once
    advance = counter(on_progress, "successor: ablation conditions", 2 + len(draws))
    for heads in ((), top, *draws):
        if heads not in scored:
            ablation = None
            if heads:
                reference = {h: means.reference[h] for h in heads}
                ablation = Ablation(method="mean", heads=heads, reference=reference)
            scored[heads] = continuation_accuracy(
                handle, prompts, ablation=ablation, batch_size=batch_size
            )
        advance()
    return BehaviouralCheck(
        n_prompts=len(prompts),
        top_heads=top,
        random_heads=draws,
        clean=scored[()],
        top_ablated=scored[top],
        random_ablated=tuple(scored[draw] for draw in draws),
        reference=dict(means.reference_info),
    )


# ------------------------------------------------------------------- detector


def detect_successor_heads(
    handle: ModelHandle,
    *,
    stats_by_set: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    threshold: float = 0.4,
    final_norm: bool = True,
    include_residual: bool = False,
    behaviour: bool = True,
    top_k: int = 1,
    n_random: int = 20,
    reference_set: str = "prose",
    reference_prompts: int = 32,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    prompts_per_task: int = 40,
) -> HeadTable:
    """Succession score of every head (Gould et al.'s effective OV) and the ablation check.

    ``stats_by_set`` is accepted for the experiment signature and unused (the
    score needs weights only). ``tasks`` restricts the ordinal tasks (default:
    all of ``ORDINAL_TASKS``). ``behaviour=False`` skips the continuation check.
    """
    params = {
        name: value
        for name, value in locals().items()
        if name in keyword_defaults(detect_successor_heads)
    }
    del stats_by_set
    if top_k < 1:
        raise HeadscopeError(f"top_k must be at least 1, got {top_k}")
    if n_random < 0:
        raise HeadscopeError(f"n_random must be non-negative, got {n_random}")
    token_sets = ordinal_token_sets(handle.tokenizer, tasks)
    succession = succession_scores(
        handle, token_sets, final_norm=final_norm, include_residual=include_residual
    )
    scores = succession.scores
    evidence = [
        {
            "task_accuracy": succession.task_accuracy(layer, head),
            "n_correct": int(sum(c[layer, head] for c in succession.correct.values())),
        }
        for layer in range(handle.arch.n_layers)
        for head in range(handle.arch.n_heads)
    ]
    best = succession.top_heads(1)[0]
    summary: dict[str, Any] = {
        "items": {s.task: s.counts() for s in token_sets},
        "n_items": sum(s.n_items for s in token_sets),
        "n_single_token_items": sum(len(s.items) for s in token_sets),
        "n_pairs": succession.n_pairs,
        "best_head": head_name(*best),
        "best_score": float(scores[best]),
        "n_flagged": int((scores > threshold).sum()),
    }
    copying = succession.copy_scores
    best_copy = np.unravel_index(int(np.argmax(copying)), copying.shape)
    summary["best_copy_head"] = head_name(*map(int, best_copy))
    summary["best_copy_score"] = float(copying[best_copy])
    if behaviour:
        prompts = continuation_prompts(handle, token_sets, per_task=prompts_per_task)
        if prompts:
            check = behavioural_check(
                handle,
                prompts,
                succession.top_heads(top_k),
                n_random=n_random,
                reference_set=reference_set,
                reference_prompts=reference_prompts,
                seed=seed,
                batch_size=batch_size,
                on_progress=on_progress,
            )
            summary.update(check.summary())
        else:
            summary["behaviour_prompts"] = 0  # no task has four consecutive single-token items
    effective = "W_E[t] + MLP0(W_E[t])" if include_residual else "MLP0(W_E[t])"
    return HeadTable.from_matrix(
        scores,
        scores > threshold,
        evidence=evidence,
        prompt_set="ordinal",
        params={
            **params,
            "tasks": list(tasks) if tasks is not None else None,
            "effective_embedding": effective,
            "score": "fraction of successor pairs whose successor tops the task's OV logits",
        },
        summary=summary,
        description=f"successor heads: effective OV of {effective} maps ordinals to successors",
    )


#: detect_successor_heads's parameters and defaults (from its signature, so they cannot drift)
