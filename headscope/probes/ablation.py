"""The ablation engine: knock out heads or whole modules, scoped, on both capture paths.

An ``Ablation`` is plain data (which heads, which method, the reference
outputs it needs, which modules to skip); ``ablate(handle, ablation)`` is a
context manager that installs it and removes it on exit, whatever happens
inside. Inside the context:

- the Hugging Face module is ablated (forward hooks on the output projection's
  input and on the query), so the streaming probe, perplexity and plain
  ``handle.model(...)`` calls all see the ablated model, whatever attention
  implementation is active;
- the TransformerLens bridge is ablated too (when it has been built, or when
  ``bridge=True``), through the hook functions that ``headscope export
  ablation`` ships (``headscope.exporters.transformer_lens_hooks``).

The spec's format, methods and head names (``L3H5``) live in
``headscope.ablation_spec``, which every export carries too.

Methods (docs/methods.md, "ablation"): zero, mean (over a reference prompt
set, pooled or per position), resample (the head's output on another input)
and query-scaling by epsilon (attention becomes ~uniform). A head is a query head:
every edit touches that head's own slice of z or q, so under grouped-query
attention the sibling query heads sharing its key/value head are untouched.
Mean vs zero matters: mean keeps the head's average contribution (the usual
choice for importance), zero is what pruning the head's weights does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from headscope.ablation_spec import (
    HEAD_METHODS,
    SKIP_MODULES,
    SPEC_FORMAT,
    SPEC_VERSION,
    head_name,
    parse_head_name,
)
from headscope.data.prompt_sets import PaddedBatch
from headscope.errors import HeadscopeError
from headscope.exporters.transformer_lens_hooks import ablation_hooks, replacement_for
from headscope.probes.handle import ArchInfo, ModelHandle
from headscope.probes.sites import BlockSites, block_sites, query_heads_view

Head = tuple[int, int]
QUERY_SCALE_EPSILON = 1e-5


def parse_heads(text: str | Sequence[str]) -> tuple[Head, ...]:
    """``"L3H5,L12H0"`` (or a list of such names) -> ((3, 5), (12, 0)), in order, no repeats.

    Each name goes through ``ablation_spec.parse_head_name``; its ValueError
    becomes a HeadscopeError with the same one-line message.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    heads: list[Head] = []
    for part in parts:
        if not str(part).strip():
            continue
        try:
            heads.append(parse_head_name(part))
        except ValueError as err:
            raise HeadscopeError(str(err)) from None
    if not heads:
        raise HeadscopeError("no heads given; write heads as L<layer>H<head>, e.g. L3H5,L12H0")
    return tuple(dict.fromkeys(heads))


def check_method(method: str) -> None:
    if method not in HEAD_METHODS:
        raise HeadscopeError(
            f"unknown ablation method '{method}'; choose one of {', '.join(HEAD_METHODS)}"
        )


def check_heads(heads: Sequence[Head], arch: ArchInfo) -> None:
    """Raise naming every head outside the model (layers and heads are 0-based)."""
    bad = [
        head_name(layer, head)
        for layer, head in heads
        if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads)
    ]
    if bad:
        raise HeadscopeError(
            f"head(s) {', '.join(bad)} are outside this model: it has layers 0-"
            f"{arch.n_layers - 1} and heads 0-{arch.n_heads - 1} per layer"
        )


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """Which heads to ablate and how, plus modules to skip (plain data; see module doc).

    ``reference`` maps a head to the output that replaces it: for "mean" a
    [d_head] or [position, d_head] tensor, for "resample" [source, position,
    d_head]. ``reference_info`` says where it came from (prompt set, counts).
    """

    method: str = "zero"
    heads: tuple[Head, ...] = ()
    skip: tuple[tuple[str, int], ...] = ()
    epsilon: float = QUERY_SCALE_EPSILON
    reference: Mapping[Head, Tensor] = field(default_factory=dict)
    reference_info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple((int(layer), int(h)) for layer, h in self.heads))
        object.__setattr__(self, "skip", tuple((str(m), int(layer)) for m, layer in self.skip))
        check_method(self.method)
        for module, _ in self.skip:
            if module not in SKIP_MODULES:
                raise HeadscopeError(
                    f"cannot skip '{module}'; choose one of {', '.join(SKIP_MODULES)}"
                )
        if self.method == "query_scale" and not 0 <= self.epsilon < 1:
            raise HeadscopeError(f"query-scaling epsilon must be in [0, 1), got {self.epsilon}")
        if self.method in ("mean", "resample"):
            missing = [head_name(*h) for h in self.heads if h not in self.reference]
            if missing:
                raise HeadscopeError(
                    f"{self.method} ablation needs reference outputs for {', '.join(missing)}; "
                    f"build it with {self.method}_ablation(handle, heads, ...)"
                )

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def check(self, handle: ModelHandle) -> None:
        """Raise if any head or module is outside ``handle``'s model or cannot be ablated."""
        arch = handle.arch
        check_heads(self.heads, arch)
        bad = [f"{m}:{layer}" for m, layer in self.skip if not 0 <= layer < arch.n_layers]
        if bad:
            raise HeadscopeError(
                f"module(s) {', '.join(bad)} are outside this model (layers 0-{arch.n_layers - 1})"
            )
        if self.skip and not block_sites(handle.model, arch)[0].pre_norm:
            raise HeadscopeError(
                f"{handle.spec} is a post-norm encoder: its attention/MLP are not residual "
                "branches, so they cannot be skipped (heads can be ablated)"
            )
        for (layer, head), value in self.reference.items():
            if value.shape[-1] != arch.d_head:
                raise HeadscopeError(
                    f"reference for {head_name(layer, head)} has width {value.shape[-1]}, "
                    f"the model's heads have {arch.d_head}"
                )

    def to_spec(self, handle: ModelHandle) -> dict[str, Any]:
        """The versioned spec dict (tensors kept as tensors; the exporter writes JSON)."""
        arch = handle.arch
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "model": {
                "spec": handle.spec,
                "source": handle.source,
                **{
                    k: getattr(arch, k)
                    for k in ("family", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")
                },
            },
            "method": self.method,
            "heads": [list(h) for h in self.heads],
            "head_names": [head_name(*h) for h in self.heads],
            "epsilon": self.epsilon if self.method == "query_scale" else None,
            "skip": [{"module": m, "layer": layer} for m, layer in self.skip],
            "reference": {
                **dict(self.reference_info),
                "values": {head_name(*h): v for h, v in self.reference.items()},
            },
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Ablation:
        """Rebuild an Ablation from a spec dict (as written by ``to_spec`` or read from JSON)."""
        if spec.get("format") != SPEC_FORMAT:
            raise HeadscopeError(f"not a headscope ablation spec (format={spec.get('format')!r})")
        if int(spec.get("version", 0)) > SPEC_VERSION:
            raise HeadscopeError(
                f"ablation spec version {spec['version']} is newer than this headscope "
                f"understands ({SPEC_VERSION}); upgrade headscope"
            )
        reference = dict(spec.get("reference") or {})
        values = reference.pop("values", {}) or {}
        heads = tuple((int(layer), int(h)) for layer, h in spec.get("heads", []))
        by_name = {head_name(*h): h for h in heads}
        return cls(
            method=spec["method"],
            heads=heads,
            skip=tuple((e["module"], e["layer"]) for e in spec.get("skip", [])),
            epsilon=QUERY_SCALE_EPSILON if spec.get("epsilon") is None else float(spec["epsilon"]),
            reference={
                by_name[name]: torch.as_tensor(v, dtype=torch.float32) for name, v in values.items()
            },
            reference_info=reference,
        )


# ----------------------------------------------------------------- installing it


@contextlib.contextmanager
def ablate(
    handle: ModelHandle, ablation: Ablation, *, bridge: bool | None = None
) -> Iterator[None]:
    """Scoped: ``handle``'s model (and bridge) are ablated inside, untouched after.

    ``bridge``: True installs on the TransformerLens bridge too (building it if
    needed), False never does, None (default) does when it is already built.
    """
    ablation.check(handle)
    sites = block_sites(handle.model, handle.arch)
    removers: list[Any] = []
    use_bridge = bridge if bridge is not None else handle._bridge is not None
    try:
        with contextlib.ExitStack() as stack:
            if use_bridge:  # built before the HF hooks go on, though the twin drops them anyway
                model = handle.bridge
                stack.enter_context(
                    model.hooks(fwd_hooks=ablation_hooks(ablation.to_spec(handle), model))
                )
            removers += _install_head_hooks(sites, ablation, handle.arch)
            removers += _install_skip_hooks(sites, ablation)
            yield
    finally:
        for remover in removers:
            remover.remove()


def _heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def _install_head_hooks(sites: list[BlockSites], ablation: Ablation, arch: ArchInfo) -> list:
    removers = []
    for layer, heads in _heads_by_layer(ablation.heads).items():
        site = sites[layer]
        if ablation.method == "query_scale":
            removers += _QueryScaler(heads, ablation.epsilon, site, arch).install()
        else:
            stored = {h: ablation.reference.get((layer, h)) for h in heads}
            hook = _output_replacer(heads, stored, arch)
            removers.append(site.output_projection.register_forward_pre_hook(hook))
    return removers


class _QueryScaler:
    """Multiplies some heads' queries by epsilon where the attention scores see them.

    That is the query projection's output, or the query norm's output when the
    model normalises queries (Gemma 3, Qwen 3, OLMo 2): a norm would undo a
    scaling applied before it. Models disagree on the layout the query norm
    sees ([batch, pos, head, d_head], [batch, head, pos, d_head] or the flat
    [batch, pos, head * d_head]), so the layout is read off each call: the
    projection's hook records the sequence length and output, and the norm's
    hook finds the head axis from them.
    """

    def __init__(self, heads: list[int], epsilon: float, site: BlockSites, arch: ArchInfo):
        self.heads, self.epsilon, self.site, self.arch = heads, epsilon, site, arch
        self.projected: Tensor | None = None

    def install(self) -> list:
        site = self.site
        if site.query_norm is None:
            return [site.query_projection.register_forward_hook(self._scale_projection)]
        return [
            site.query_projection.register_forward_hook(self._remember_projection),
            site.query_norm.register_forward_hook(self._scale_normed),
        ]

    def _scale_projection(self, _module, _inputs, output: Tensor) -> Tensor:
        output = output.clone()
        query_heads_view(output, self.site.query_layout, self.arch)[..., self.heads, :] *= (
            self.epsilon
        )
        return output

    def _remember_projection(self, _module, _inputs, output: Tensor) -> None:
        self.projected = output

    def _scale_normed(self, _module, inputs: tuple, output: Tensor) -> Tensor:
        output = output.clone()
        n_heads, d_head = self.arch.n_heads, self.arch.d_head
        if output.dim() == 3:  # a norm over all heads at once: [batch, pos, head * d_head]
            output.view(*output.shape[:-1], n_heads, d_head)[..., self.heads, :] *= self.epsilon
            return output
        head_axis = self._head_axis(inputs[0])
        index = [slice(None)] * output.dim()
        index[head_axis] = self.heads
        output[tuple(index)] *= self.epsilon
        return output

    def _head_axis(self, normed_input: Tensor) -> int:
        projected = self.projected
        if projected is None:
            raise HeadscopeError("query norm ran before the query projection; cannot scale queries")
        length = projected.shape[1]
        by_position = projected[..., : self.arch.n_heads * self.arch.d_head].unflatten(
            -1, (self.arch.n_heads, self.arch.d_head)
        )
        if normed_input.shape[1] != normed_input.shape[2]:
            return 1 if normed_input.shape[2] == length else 2
        return 2 if torch.equal(normed_input, by_position) else 1


def _output_replacer(
    heads: list[int], stored: dict[int, Tensor | None], arch: ArchInfo
) -> Callable:
    def hook(_module, inputs: tuple) -> tuple:
        z = inputs[0].clone()
        per_head = z.view(*z.shape[:-1], arch.n_heads, arch.d_head)
        for head in heads:
            value = stored[head]
            if value is None:
                per_head[..., head, :] = 0
            else:
                per_head[..., head, :] = replacement_for(value, per_head[..., head, :])
        return (z, *inputs[1:])

    return hook


def _install_skip_hooks(sites: list[BlockSites], ablation: Ablation) -> list:
    removers = []
    for module, layer in ablation.skip:
        site = sites[layer]
        if module == "attn":
            removers.append(site.attention.register_forward_hook(_zero_first_output))
        elif module == "mlp":
            if site.mlp is None:
                raise HeadscopeError(f"block {layer} has no MLP branch to skip")
            removers.append(site.mlp.register_forward_hook(_zero_first_output))
        else:
            removers.append(site.block.register_forward_hook(_return_input, with_kwargs=True))
    return removers


def _zero_first_output(_module, _inputs, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _return_input(_module, args: tuple, kwargs: dict, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


# ----------------------------------------------------------- reference outputs


@contextlib.contextmanager
def capture_head_outputs(handle: ModelHandle, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Scoped: each forward inside fills ``{layer: z [batch, pos, head, d_head]}``."""
    sites = block_sites(handle.model, handle.arch)
    arch = handle.arch
    captured: dict[int, Tensor] = {}

    def recorder(layer: int) -> Callable:
        def hook(_module, inputs: tuple) -> None:
            z = inputs[0].detach()
            captured[layer] = z.view(*z.shape[:-1], arch.n_heads, arch.d_head)

        return hook

    removers = [
        sites[layer].output_projection.register_forward_pre_hook(recorder(layer))
        for layer in sorted(set(layers))
    ]
    try:
        yield captured
    finally:
        for remover in removers:
            remover.remove()


def _prompt_batches(handle: ModelHandle, prompt_set: str, n_prompts: int | None, batch_size: int):
    prompts = handle.tokenize(prompt_set, n_prompts)
    return prompts, prompts.padded(batch_size, handle.pad_id)


def _forward(handle: ModelHandle, batch: PaddedBatch) -> None:
    mask = batch.mask.long()
    handle.model(input_ids=batch.tokens.to(handle.device), attention_mask=mask.to(handle.device))


def mean_ablation(
    handle: ModelHandle,
    heads: Sequence[Head],
    *,
    prompt_set: str = "prose",
    per_position: bool = False,
    n_prompts: int | None = None,
    batch_size: int = 8,
) -> Ablation:
    """Mean ablation of ``heads`` with each head's mean output over ``prompt_set``.

    Pooled (default): one [d_head] vector, the mean over every real token of
    every prompt. ``per_position``: one vector per position (padding excluded),
    which applies only to inputs no longer than the reference prompts.
    """
    from headscope.checks import check_count

    check_count(n_prompts, "--reference-prompts")
    heads = tuple(heads)
    check_heads(heads, handle.arch)
    prompts, batches = _prompt_batches(handle, prompt_set, n_prompts, batch_size)
    layers = sorted({layer for layer, _ in heads})
    length = max(prompts.lengths)
    sums = {h: torch.zeros(length, handle.arch.d_head, dtype=torch.float64) for h in heads}
    counts = torch.zeros(length, dtype=torch.float64)
    with capture_head_outputs(handle, layers) as captured, torch.inference_mode():
        for batch in batches:
            _forward(handle, batch)
            valid = batch.mask.double()
            width = batch.tokens.shape[1]
            counts[:width] += valid.sum(0)
            for layer, head in heads:
                z = captured[layer][..., head, :].double().cpu()
                sums[(layer, head)][:width] += (z * valid[..., None]).sum(0)
    if per_position:
        reference = {h: (s / counts[:, None]).float() for h, s in sums.items()}
    else:
        reference = {h: (s.sum(0) / counts.sum()).float() for h, s in sums.items()}
    info = {
        "kind": "mean",
        "prompt_set": prompt_set,
        "per_position": per_position,
        "n_prompts": len(prompts),
        "n_tokens": int(counts.sum()),
    }
    return Ablation(method="mean", heads=heads, reference=reference, reference_info=info)


def resample_ablation(
    handle: ModelHandle,
    heads: Sequence[Head],
    *,
    prompt_set: str = "prose",
    n_prompts: int = 8,
    batch_size: int = 8,
) -> Ablation:
    """Resample ablation: each head's output on the first ``n_prompts`` of ``prompt_set``.

    Row i of an ablated batch takes source prompt i mod n_prompts, position by
    position; the sources are cut to the shortest source prompt.
    """
    from headscope.checks import check_count

    check_count(n_prompts, "--reference-prompts")
    heads = tuple(heads)
    check_heads(heads, handle.arch)
    prompts, batches = _prompt_batches(handle, prompt_set, n_prompts, batch_size)
    length = min(prompts.lengths)
    rows: dict[Head, dict[int, Tensor]] = {h: {} for h in heads}
    layers = [layer for layer, _ in heads]
    with capture_head_outputs(handle, layers) as captured, torch.inference_mode():
        for batch in batches:
            _forward(handle, batch)
            for layer, head in heads:
                z = captured[layer][..., head, :].float().cpu()
                for row, index in enumerate(batch.indices):
                    rows[(layer, head)][index] = z[row, :length]
    reference = {h: torch.stack([r[i] for i in sorted(r)]) for h, r in rows.items()}
    info = {
        "kind": "resample",
        "prompt_set": prompt_set,
        "n_prompts": len(prompts),
        "positions": length,
        "source_tokens": [prompts.tokens[i][:length].tolist() for i in range(len(prompts))],
    }
    return Ablation(method="resample", heads=heads, reference=reference, reference_info=info)
