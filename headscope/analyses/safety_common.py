"""What the safety-head detectors share: their requests, their ablations, their prompts.

- **Requests.** A detector's request parameters (``harmful``, ``harmless``,
  ``check_harmful``, ...) name a built-in request set
  (``headscope.data.requests.REQUEST_SETS``), which is what the CLI and the
  table params record. Called from Python they may also be a ``RequestSet``
  or a plain list of request strings (named "custom"): that is how the tests
  score a tiny planted model on requests it was built for. ``requests_of``
  is the one place that reads them.
- **Ablations.** ``ablation``: "query_scale" (Zhou et al.'s default: the
  head's query times ``QUERY_SCALE_EPSILON`` = 1e-5, its attention ~uniform),
  "zero" (its output z_h = 0) or "mean" (z_h = its *pooled* mean over every
  real token of the scored prompts, chat-formatted; per-position means are not
  offered, since the sweeps reuse a shared prefix at renumbered positions).
  ``HeadAblations`` builds the ``Ablation`` of any head set, so the scores and
  the generation check ablate the same way.
- **One computation, once per model.** Ships and Sahara ablate every head on
  the same prompts, and their generation checks share the clean runs and the
  random head draws (seeded per head count). ``remembered`` keeps such results
  for the model they were computed on (weakly keyed on the module, keyed on
  the exact inputs and the ablation, reference tensors included), so a scan
  that runs both detectors pays for each ablated pass and each generation once.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from headscope.ablation_spec import head_name
from headscope.errors import HeadscopeError
from headscope.probes.ablation import QUERY_SCALE_EPSILON, Ablation, capture_head_outputs
from headscope.probes.handle import ModelHandle

Head = tuple[int, int]
SAFETY_ABLATIONS = ("query_scale", "zero", "mean")
#: results kept per model; enough for every head of a 270-head model and its checks
MEMO_ENTRIES = 4096
_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()
T = TypeVar("T")


def digest(value: Any) -> str:
    """A short hash of token ids, request texts or any repr-stable value."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:24]


def ablation_key(ablation: Ablation | None) -> tuple:
    """What makes two ablations the same: method, heads, epsilon and reference values."""
    if ablation is None:
        return ("clean",)
    reference = tuple(
        (
            head,
            hashlib.sha256(ablation.reference[head].detach().cpu().numpy().tobytes()).hexdigest(),
        )
        for head in sorted(ablation.reference)
    )
    return (ablation.method, ablation.heads, ablation.skip, float(ablation.epsilon), reference)


def remembered(handle: ModelHandle, key: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned before for this model and ``key``.

    The key also holds every parameter's in-place version counter, so weights
    edited since (a planted head, a fine-tuning step) are never served stale.
    """
    memo = _MEMO.setdefault(handle.model, {})
    key = (*key, tuple(p._version for p in handle.model.parameters()))
    if key not in memo:
        if len(memo) >= MEMO_ENTRIES:
            memo.pop(next(iter(memo)))
        memo[key] = compute()
    return memo[key]


def requests_of(value: Any, n: int | None, what: str) -> tuple[str, list[str]]:
    """(name, the first ``n`` requests) of a request-set name, a RequestSet or a list of strings."""
    if isinstance(value, str):
        from headscope.data.requests import request_set

        found = request_set(value)
        name, requests = found.name, list(found.requests)
    elif hasattr(value, "requests") and hasattr(value, "name"):
        name, requests = str(value.name), list(value.requests)
    elif isinstance(value, Sequence) and all(isinstance(r, str) for r in value):
        name, requests = "custom", list(value)
    else:
        raise HeadscopeError(
            f"{what} must name a request set (e.g. 'harmful-train'), got {type(value).__name__}"
        )
    if n is not None:
        if n < 1:
            raise HeadscopeError(f"the number of {what} prompts must be at least 1, got {n}")
        if len(requests) < n:
            raise HeadscopeError(
                f"{what} set '{name}' has {len(requests)} requests, fewer than {n}; ask for fewer"
            )
        requests = requests[:n]
    return name, requests


def all_heads(handle: ModelHandle) -> list[Head]:
    arch = handle.arch
    return [(layer, head) for layer in range(arch.n_layers) for head in range(arch.n_heads)]


def names(heads: Sequence[Head]) -> list[str]:
    return [head_name(*h) for h in heads]


def check_ablation(ablation: str) -> None:
    if ablation not in SAFETY_ABLATIONS:
        raise HeadscopeError(
            f"unknown safety ablation '{ablation}'; choose one of {', '.join(SAFETY_ABLATIONS)}"
        )


def right_padded(token_ids: Sequence[Sequence[int]], pad: int, batch_size: int):
    for start in range(0, len(token_ids), batch_size):
        rows = token_ids[start : start + batch_size]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(list(row))
            mask[i, : len(row)] = 1
        yield tokens, mask


@torch.inference_mode()
def pooled_head_means(
    handle: ModelHandle, token_ids: Sequence[Sequence[int]], *, batch_size: int = 16
) -> dict[Head, torch.Tensor]:
    """Every head's mean output z_h [d_head] over every real token of the prompts."""
    arch = handle.arch
    sums = torch.zeros(arch.n_layers, arch.n_heads, arch.d_head, dtype=torch.float64)
    count = 0
    with capture_head_outputs(handle, range(arch.n_layers)) as captured:
        for tokens, mask in right_padded(token_ids, handle.pad_id, batch_size):
            handle.model(input_ids=tokens.to(handle.device), attention_mask=mask.to(handle.device))
            valid = mask.double()[..., None, None]
            for layer in range(arch.n_layers):
                sums[layer] += (captured[layer].double().cpu() * valid).sum((0, 1))
            count += int(mask.sum())
    means = (sums / count).float()
    return {(layer, head): means[layer, head] for layer, head in all_heads(handle)}


class HeadAblations:
    """The ``Ablation`` of any head set under one method (see the module doc)."""

    def __init__(
        self,
        handle: ModelHandle,
        method: str,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
        epsilon: float = QUERY_SCALE_EPSILON,
    ) -> None:
        check_ablation(method)
        self.method, self.epsilon = method, epsilon
        self.reference: dict[Head, torch.Tensor] = {}
        self.info: dict[str, Any] = {"kind": method}
        if method == "mean":
            self.reference = pooled_head_means(handle, token_ids, batch_size=batch_size)
            self.info = {"kind": "mean", "pooled": True, "n_prompts": len(token_ids)}

    def __call__(self, heads: Sequence[Head]) -> Ablation:
        heads = tuple(heads)
        if self.method == "mean":
            return Ablation(
                method="mean",
                heads=heads,
                reference={h: self.reference[h] for h in heads},
                reference_info=self.info,
            )
        return Ablation(method=self.method, heads=heads, epsilon=self.epsilon)

    def describe(self) -> dict[str, Any]:
        return {
            "ablation": self.method,
            "epsilon": self.epsilon if self.method == "query_scale" else None,
        }
