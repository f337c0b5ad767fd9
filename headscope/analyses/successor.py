"""Successor heads (Gould et al. 2023): heads whose OV circuit maps an ordinal
token to the next one ("Monday" -> "Tuesday", "3" -> "4"). Such a head is defined by what
it writes, not where it attends, so it is read off the weights, then checked behaviourally.

1. **Token sets.** Eight tasks: numbers 1-200, number words one-twenty,
   ordinals first-tenth, letters A-Z, and the cyclic days, months, and their
   abbreviations. An item survives when " X" is one token, else when "X" is
   (SmolLM2 splits the space off digits); pairs item_i -> item_i+1 (and
   last -> first when cyclic) join surviving items only. Tokenizers drop many
   items, so the counts go into the table's summary.
2. **Effective embedding and OV** (``protocol``, recorded in the table):

   - ``"headscope"`` (default): ``e_t = MLP0(pre_mlp_norm_0(W_E[t]))``, layer
     0's MLP alone (Gemma's post-MLP norm too), no attention: in small models
     MLP0 acts as an extended embedding; ``include_residual=True`` adds
     ``W_E[t]``. The head reads ``input_norm_l(e_t)``; Gemma's post-attention
     norm and the final norm (``final_norm``) are applied: the model's own
     norms wherever the forward pass has them.
   - ``"gould2023"``: the paper's formula ``W_U W_OV MLP0(W_E)`` as the code
     that re-runs it computes it (Tigges et al. 2024's successor-head script,
     labelled "from SH paper": TransformerLens with ``fold_ln=False``,
     ``blocks[0].mlp(W_E)``, ``OV.AB``, ``W_U``): no norm anywhere, neither
     before MLP0, nor before the head, nor before the unembedding (so no norm
     gain either). Gould et al.'s own repository is not at hand; this is our
     reading of that re-use.
   - ``"layer0"``: the full residual stream after layer 0 for the token alone
     (a one-token sequence at position 0, no BOS: ``W_E + attn0 + MLP0``,
     attention then attends only to the token itself), read off the model's
     own forward pass; the model's norms as in ``"headscope"``.

   ``o_t = e_t W_V W_O`` for head (l, h) (no biases), then logits over the
   task's own tokens S, ``o_t W_U[:, S]``. ``final_norm=None`` takes the
   protocol's choice (on, except for ``"gould2023"``).
3. **Succession score**: the fraction of pairs, pooled over tasks, whose
   successor has the top logit among S; flagged above ``threshold``. Chance
   is ``1/|S|`` per pair (pooled: its mean over pairs); since the best of
   many heads beats chance by luck, the summary also has a null for the best
   head: the best score when each task's items are relabelled by a seeded
   random permutation (same pair graph, random order). The top heads' per-task
   accuracy goes into the summary beside each task's chance.
4. **Mod-10 check.** The digits 0-9 as a cyclic task (9 -> 0) of their own,
   scored like a task but not pooled: the fraction of the ten digits whose
   successor mod 10 tops the head's logits among the digits (chance 0.1).
5. **Behavioural check.** Prompts "Monday, Tuesday, Wednesday," -> " Thursday"
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
from headscope.data.ordinal import MOD10_TASK, ORDINAL_TASKS, OrdinalTask, task_by_name
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


def _token_set(tokenizer: Any, task: OrdinalTask) -> TokenSet:
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
    return TokenSet(
        task=task.name,
        cyclic=task.cyclic,
        n_items=len(task.items),
        positions=positions,
        items=tuple(task.items[p] for p in positions),
        token_ids=tuple(survivors[p][0] for p in positions),
        spaced=tuple(survivors[p][1] for p in positions),
        pairs=tuple(pairs),
    )


def ordinal_token_sets(tokenizer: Any, tasks: Sequence[str] | None = None) -> tuple[TokenSet, ...]:
    """One TokenSet per task (all of ``ORDINAL_TASKS`` by default), empty ones included."""
    chosen = ORDINAL_TASKS if tasks is None else tuple(task_by_name(n) for n in tasks)
    return tuple(_token_set(tokenizer, task) for task in chosen)


def mod10_token_set(tokenizer: Any) -> TokenSet:
    """The digits 0-9 as a cyclic task (the mod-10 check); pairs d -> d+1 mod 10."""
    return _token_set(tokenizer, MOD10_TASK)


# ------------------------------------------------------------ effective OV circuit


def _apply(module: torch.nn.Module | None, x: Tensor) -> Tensor:
    """``module(x)`` in the module's dtype, back in float32; identity for None."""
    if module is None:
        return x
    dtype = next(module.parameters(), x).dtype
    out = module(x.to(dtype))
    return (out[0] if isinstance(out, tuple) else out).float()


#: the protocols of the effective OV circuit: name -> one-line description (the table's note)
PROTOCOLS: dict[str, str] = {
    "headscope": (
        "headscope: e_t = MLP0(pre-MLP norm(W_E[t])), the model's own norms before the head "
        "(Gemma: after it) and before W_U"
    ),
    "gould2023": (
        "Gould et al. 2023 (their formula W_U W_OV MLP0(W_E), as re-run by Tigges et al. 2024's "
        "code): e_t = MLP0(W_E[t]), no norm anywhere"
    ),
    "layer0": (
        "full layer-0 residual: e_t = W_E + attn0 + MLP0 on the one-token sequence [t], "
        "the model's own norms"
    ),
}


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise HeadscopeError(
            f"unknown successor protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}"
        )


def _check_decoder(handle: ModelHandle) -> None:
    if not handle.arch.causal:
        raise NotApplicable(f"{handle.spec} is an encoder; successor heads need a decoder")
    first = block_sites(handle.model, handle.arch)[0]
    if not first.pre_norm or first.mlp is None:
        raise NotApplicable(f"{handle.spec} has no layer-0 MLP to build effective embeddings")


@torch.no_grad()
def _layer0_residual(handle: ModelHandle, ids: Tensor) -> Float[Tensor, "token d_model"]:
    """The output of block 0 for each token run alone (a batch of one-token sequences)."""
    block = block_sites(handle.model, handle.arch)[0].block
    captured: list[Tensor] = []

    def keep(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    hook = block.register_forward_hook(keep)
    try:
        handle.model(input_ids=ids[0][:, None], use_cache=False)  # [token, 1]
    finally:
        hook.remove()
    return captured[0][:, 0].float()


@torch.no_grad()
def effective_embeddings(
    handle: ModelHandle,
    token_ids: Sequence[int],
    *,
    include_residual: bool = False,
    protocol: str = "headscope",
) -> Float[Tensor, "vocab d_model"]:
    """Each token's effective embedding under ``protocol`` (module docstring), float32.

    ``"headscope"``: ``MLP0(pre_mlp_norm_0(W_E[t]))``; ``"gould2023"``:
    ``MLP0(W_E[t])``, no norm; both plus ``W_E[t]`` if ``include_residual``.
    ``"layer0"``: the residual after layer 0 on the token alone (it already
    holds ``W_E[t]``, so ``include_residual`` is refused).
    """
    _check_protocol(protocol)
    _check_decoder(handle)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=handle.device)[None]
    if protocol == "layer0":
        if include_residual:
            raise HeadscopeError("protocol 'layer0' already includes W_E; drop include_residual")
        return _layer0_residual(handle, ids)
    first = block_sites(handle.model, handle.arch)[0]
    embedded = embed_tokens(handle.model, ids).float()  # [1, token, d_model]
    if protocol == "gould2023":
        out = _apply(first.mlp, embedded)
    else:
        out = _apply(first.post_mlp_norm, _apply(first.mlp, _apply(first.pre_mlp_norm, embedded)))
    if include_residual:
        out = out + embedded
    return out[0]


def _resolve_final_norm(final_norm: bool | None, protocol: str) -> bool:
    return final_norm if final_norm is not None else protocol != "gould2023"


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
    def task_chance(self) -> dict[str, float]:
        """Each task's chance accuracy: 1 / (its candidate tokens), the argmax of random logits."""
        return {s.task: 1 / len(s.items) for s in self.token_sets}

    @property
    def chance(self) -> float:
        """The pooled score's chance level: 1 / |S| averaged over all pairs."""
        return sum(len(s.pairs) / len(s.items) for s in self.token_sets) / self.n_pairs

    def null_best_scores(self, n_draws: int = 20, seed: int = 0) -> np.ndarray:
        """The best head's score against relabelled tasks, one per draw.

        Each draw relabels every task's items by a seeded random permutation
        (pair (a, b) becomes (p[a], p[b]): the same pair graph in a random
        order) and takes the best head's pooled score: what the top of the
        ranking reaches by luck.
        """
        rng = np.random.default_rng(seed)
        best = []
        for _ in range(n_draws):
            hits = 0
            for s in self.token_sets:
                relabel = rng.permutation(len(s.items))
                sources, targets = (relabel[list(x)] for x in zip(*s.pairs, strict=True))
                hits = hits + (self.predictions[s.task][..., sources] == targets).sum(-1)
            best.append(float((hits / self.n_pairs).max()))
        return np.array(best)

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
    final_norm: bool | None = None,
    include_residual: bool = False,
    protocol: str = "headscope",
) -> SuccessionScores:
    """Score every head's effective OV circuit on ``token_sets`` (those with pairs).

    ``final_norm=None``: the protocol's choice (on, except for ``"gould2023"``).
    """
    _check_protocol(protocol)
    arch = handle.arch
    scored = tuple(s for s in token_sets if s.pairs)
    if not scored:
        raise NotApplicable(
            f"no ordinal task has two consecutive single-token items in {handle.spec}'s tokenizer"
        )
    all_ids = [t for s in scored for t in s.token_ids]
    starts = np.cumsum([0] + [len(s.token_ids) for s in scored])
    embedded = effective_embeddings(
        handle, all_ids, include_residual=include_residual, protocol=protocol
    )
    w_u = unembedding(handle.model)[:, all_ids].float()  # [d_model, token]
    norm = final_norm_module(handle.model) if _resolve_final_norm(final_norm, protocol) else None
    model_norms = protocol != "gould2023"
    shape = (arch.n_layers, arch.n_heads)
    correct = {s.task: np.zeros(shape, dtype=np.int64) for s in scored}
    predictions = {s.task: np.zeros((*shape, len(s.items)), dtype=np.int64) for s in scored}
    for layer, site in enumerate(block_sites(handle.model, arch)):
        w_v, w_o = _layer_weights(site, arch)
        normed = _apply(site.input_norm if model_norms else None, embedded[None])[0]
        written = torch.einsum("td,hde->hte", normed, w_v) @ w_o  # [head, token, d_model]
        if model_norms:
            written = _apply(site.post_attention_norm, written)
        written = _apply(norm, written)
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


#: heads whose per-task accuracy (and mod-10 fraction) the summary spells out
REPORTED_HEADS = 5
#: relabelled-task draws for the best-head null
NULL_DRAWS = 200


def _null_summary(observed: float, null: np.ndarray) -> dict[str, float]:
    """The null's mean and 95th percentile, and the share of draws at least as good
    as ``observed`` (with the +1 of a permutation test)."""
    return {
        "null_best_score_mean": float(null.mean()),
        "null_best_score_q95": float(np.quantile(null, 0.95)),
        "null_p": float((1 + (null >= observed - 1e-12).sum()) / (1 + len(null))),
    }


def _mod10_scores(
    handle: ModelHandle, *, final_norm: bool | None, include_residual: bool, protocol: str
) -> tuple[SuccessionScores | None, int]:
    """Every head's mod-10 succession (None if fewer than two digits are single tokens)."""
    digits = mod10_token_set(handle.tokenizer)
    if not digits.pairs:
        return None, len(digits.items)
    scores = succession_scores(
        handle,
        [digits],
        final_norm=final_norm,
        include_residual=include_residual,
        protocol=protocol,
    )
    return scores, len(digits.items)


def detect_successor_heads(
    handle: ModelHandle,
    *,
    stats_by_set: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    on_progress: Progress | None = None,
    protocol: str = "headscope",
    threshold: float = 0.4,
    final_norm: bool | None = None,
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

    ``protocol`` picks the effective embedding and norms (``PROTOCOLS``; module
    docstring); ``final_norm=None`` is the protocol's own choice. ``stats_by_set``
    is accepted for the experiment signature and unused (the score needs
    weights only). ``tasks`` restricts the ordinal tasks (default: all of
    ``ORDINAL_TASKS``). ``behaviour=False`` skips the continuation check.
    """
    params = {
        name: value
        for name, value in locals().items()
        if name in keyword_defaults(detect_successor_heads)
    }
    del stats_by_set
    _check_protocol(protocol)
    if top_k < 1:
        raise HeadscopeError(f"top_k must be at least 1, got {top_k}")
    if n_random < 0:
        raise HeadscopeError(f"n_random must be non-negative, got {n_random}")
    token_sets = ordinal_token_sets(handle.tokenizer, tasks)
    options = {"final_norm": final_norm, "include_residual": include_residual, "protocol": protocol}
    succession = succession_scores(handle, token_sets, **options)
    mod10, n_digits = _mod10_scores(handle, **options)
    scores = succession.scores
    evidence = [
        {
            "task_accuracy": succession.task_accuracy(layer, head),
            "n_correct": int(sum(c[layer, head] for c in succession.correct.values())),
            "mod10": None if mod10 is None else float(mod10.scores[layer, head]),
        }
        for layer in range(handle.arch.n_layers)
        for head in range(handle.arch.n_heads)
    ]
    best = succession.top_heads(1)[0]
    null = succession.null_best_scores(NULL_DRAWS, seed)
    summary: dict[str, Any] = {
        "protocol": protocol,
        "items": {s.task: s.counts() for s in token_sets},
        "n_items": sum(s.n_items for s in token_sets),
        "n_single_token_items": sum(len(s.items) for s in token_sets),
        "n_pairs": succession.n_pairs,
        "best_head": head_name(*best),
        "best_score": float(scores[best]),
        "chance": succession.chance,
        "task_chance": succession.task_chance,
        **_null_summary(float(scores[best]), null),
        "median_score": float(np.median(scores)),
        "n_flagged": int((scores > threshold).sum()),
        "top_heads": [
            {
                "head": head_name(*h),
                "score": float(scores[h]),
                "task_accuracy": succession.task_accuracy(*h),
                "mod10": None if mod10 is None else float(mod10.scores[h]),
            }
            for h in succession.top_heads(REPORTED_HEADS)
        ],
    }
    summary["mod10"] = {"single_token_digits": n_digits, "chance": 0.1}
    if mod10 is not None:
        best_mod10 = mod10.top_heads(1)[0]
        null_mod10 = mod10.null_best_scores(NULL_DRAWS, seed)
        summary["mod10"].update(
            n_pairs=mod10.n_pairs,
            chance=mod10.chance,
            best_head=head_name(*best_mod10),
            best_score=float(mod10.scores[best_mod10]),
            **_null_summary(float(mod10.scores[best_mod10]), null_mod10),
            top_successor_head=float(mod10.scores[best]),
            predictions_top_successor_head=[
                mod10.token_sets[0].items[i] for i in mod10.predictions["digits_mod10"][best]
            ],
        )
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
    effective = {
        "headscope": "MLP0(pre_mlp_norm(W_E[t]))",
        "gould2023": "MLP0(W_E[t])",
        "layer0": "resid_post_0([t])",
    }[protocol]
    if include_residual:
        effective = f"W_E[t] + {effective}"
    return HeadTable.from_matrix(
        scores,
        scores > threshold,
        evidence=evidence,
        prompt_set="ordinal",
        params={
            **params,
            "protocol_note": PROTOCOLS[protocol],
            "final_norm_applied": _resolve_final_norm(final_norm, protocol),
            "tasks": list(tasks) if tasks is not None else None,
            "effective_embedding": effective,
            "score": "fraction of successor pairs whose successor tops the task's OV logits",
        },
        summary=summary,
        description=f"successor heads: effective OV of {effective} maps ordinals to successors",
    )
