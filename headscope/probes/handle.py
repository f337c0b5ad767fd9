"""The loaded model every probe and analysis takes: ``ModelHandle`` and ``ArchInfo``.

It exists apart from the loaders (``headscope.probes.loading``) so that the many
modules that only *use* a model import this small file, never the loading code:
a ``ModelHandle`` holds the Hugging Face module, its tokenizer, an ``ArchInfo``
summary and (built lazily, on first use) a TransformerLens ``TransformerBridge``
over the very same weights, so both capture paths see one model. It also knows
what the model wants around its tokens: the BOS to prepend and the id that pads
a batch.

Whether prompts start with a BOS token is a choice (``BOS_POLICIES``), because
sink results depend on it: ``always`` prepends the model's BOS to every prompt
(headscope's default, and TransformerLens's convention, so every prompt starts
with the same token); ``auto`` does what the model's own tokenizer does when
called with its default special tokens (SmolLM2's GGUF tokenizer adds none;
Gemma's adds ``<bos>``), which is what the model saw in pretraining; ``never``
prepends nothing (Gu et al.'s repeated-token input has no distinct first
token). ``ModelHandle.with_bos`` gives a handle that shares the model and
follows another policy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from headscope.errors import HeadscopeError, ModelLoadError

#: how a handle decides whether prompts start with the model's BOS (see the module docstring)
BOS_POLICIES = ("always", "auto", "never")
DEFAULT_BOS_POLICY = "always"

#: model types that are bidirectional encoders (no causal mask; BOS is the CLS token)
ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta"}


@dataclass(frozen=True, kw_only=True)
class ArchInfo:
    """What analyses need to know about a model's attention layout."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    causal: bool
    bos_token_id: int | None
    prepend_bos: bool
    max_positions: int | None

    @property
    def gqa_group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_info(config: Any, tokenizer: Any) -> ArchInfo:
    """Summarise an HF config (text config for multimodal wrappers) as ArchInfo."""
    config = getattr(config, "text_config", None) or config

    def pick(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    n_heads = int(pick("num_attention_heads", "n_head"))
    d_model = int(pick("hidden_size", "n_embd", "d_model"))
    model_type = getattr(config, "model_type", "unknown")
    causal = model_type not in ENCODER_MODEL_TYPES or bool(getattr(config, "is_decoder", False))
    bos = tokenizer.bos_token_id if causal else tokenizer.cls_token_id
    if bos is None and causal:
        bos = getattr(config, "bos_token_id", None)
    return ArchInfo(
        family=model_type,
        n_layers=int(pick("num_hidden_layers", "n_layer")),
        n_heads=n_heads,
        n_kv_heads=int(pick("num_key_value_heads", default=n_heads)),
        d_head=int(pick("head_dim", default=d_model // n_heads)),
        d_model=d_model,
        vocab_size=int(pick("vocab_size")),
        causal=causal,
        bos_token_id=None if bos is None else int(bos),
        prepend_bos=bos is not None,
        max_positions=pick("max_position_embeddings", "n_positions"),
    )


@dataclass(kw_only=True, eq=False)
class ModelHandle:
    """A loaded model: HF module, tokenizer, ArchInfo and a lazy TransformerLens bridge."""

    spec: str
    model: Any
    tokenizer: Any
    arch: ArchInfo
    source: str
    load_seconds: float
    cache_hit: bool | None = None
    bos_policy: str = DEFAULT_BOS_POLICY
    _bridge: Any = field(default=None, repr=False)
    _adds_bos: bool | None = field(default=None, repr=False)  # the tokenizer's own habit

    def __post_init__(self) -> None:
        check_bos_policy(self.bos_policy)

    def with_bos(self, policy: str) -> ModelHandle:
        """This model (same module, tokenizer and bridge) with BOS policy ``policy``."""
        check_bos_policy(policy)
        if policy == self.bos_policy:
            return self
        return replace(self, bos_policy=policy)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def bos_id(self) -> int | None:
        """The token id every prompt starts with under ``bos_policy``, or None for no BOS."""
        if not self.arch.prepend_bos or self.bos_policy == "never":
            return None
        if self.bos_policy == "auto" and not self.tokenizer_adds_bos:
            return None
        return self.arch.bos_token_id

    @property
    def tokenizer_adds_bos(self) -> bool:
        """Whether the model's tokenizer prepends the BOS by itself (``auto`` follows it)."""
        if self._adds_bos is None:
            self._adds_bos = tokenizer_adds_bos(self.tokenizer, self.arch.bos_token_id)
        return self._adds_bos

    def describe_bos(self) -> dict[str, Any]:
        """The BOS choice as recorded in a run manifest."""
        bos = self.bos_id
        return {
            "policy": self.bos_policy,
            "prepended": bos is not None,
            "token_id": bos,
            "token": None if bos is None else self.tokenizer.decode([bos]),
            "tokenizer_adds_bos": self.tokenizer_adds_bos,
        }

    @property
    def pad_id(self) -> int:
        """The id that right-pads a batch: the tokenizer's pad token, else 0 (masked out)."""
        pad_id = self.tokenizer.pad_token_id
        return pad_id if pad_id is not None else 0

    @property
    def bridge(self):
        """TransformerLens TransformerBridge over the same weights (built on first use).

        The bridge replaces attention submodules with its own components and
        switches attention to eager, in place. It therefore wraps a twin of
        ``self.model`` whose module tree is new but whose parameters and
        buffers are the very same tensors: no weight is copied, and the HF
        module keeps its own (fast) attention and structure.
        """
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            name = getattr(self.model.config, "_name_or_path", "") or self.spec
            self._bridge = TransformerBridge.boot_transformers(
                name,
                hf_model=_weight_sharing_twin(self.model),
                tokenizer=_tokenizer_for_bridge(self.tokenizer),
                device=str(self.device),
            )
        return self._bridge

    def tokenize(self, prompt_set: Any, n_prompts: int | None = None):
        """A prompt set (a name or a PromptSet) as this model's tokens, its first
        ``n_prompts`` prompts (all for None), with BOS prepended when the model wants it."""
        from headscope.data import get_prompt_set

        if isinstance(prompt_set, str):
            prompt_set = get_prompt_set(prompt_set)
        return prompt_set.tokenize(self.tokenizer, bos_token_id=self.bos_id).first(n_prompts)

    def encode(self, text: str, *, max_text_tokens: int | None = None) -> list[int]:
        """Token ids of one ``text``, BOS first when the model wants it (as ``tokenize``).

        No other special token is added; ``max_text_tokens`` keeps only the
        text's first tokens (the BOS not counted).
        """
        from headscope.data.prompt_sets import encode_text

        ids = encode_text(self.tokenizer, text)[:max_text_tokens]
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def ablated(self, ablation, *, bridge: bool | None = None):
        """Context manager: this model ablated inside (see ``headscope.probes.ablation``)."""
        from headscope.probes.ablation import ablate

        return ablate(self, ablation, bridge=bridge)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for run manifests."""
        return {
            "spec": self.spec,
            "source": self.source,
            "arch": self.arch.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


def check_bos_policy(policy: Any) -> str:
    if policy not in BOS_POLICIES:
        raise HeadscopeError(f"unknown BOS policy {policy!r}; use one of {', '.join(BOS_POLICIES)}")
    return policy


def tokenizer_adds_bos(tokenizer: Any, bos_token_id: int | None) -> bool:
    """Whether ``tokenizer(text)`` (its default special tokens) starts with ``bos_token_id``.

    Asked of the tokenizer itself rather than read from ``add_bos_token``,
    which not every tokenizer class has (BERT's adds its CLS by a template).
    """
    if bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True, verbose=False).input_ids
    return bool(ids) and ids[0] == bos_token_id


def _weight_sharing_twin(model: Any) -> Any:
    """A deep copy of ``model`` that shares every parameter and buffer tensor.

    Hooks attached to ``model`` at copy time (a headscope ablation or capture
    in progress, or a user's own) belong to the original only: deepcopy would
    copy them into the twin for good, so the twin's are cleared.
    """
    import copy
    import itertools

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    for module in twin.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            hooks.clear()
    return twin


def _tokenizer_for_bridge(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that prepends BOS itself, as TransformerLens expects.

    Given a tokenizer that does not, TransformerLens reloads one from
    ``name_or_path`` with ``add_bos_token=True``: slow for a GGUF (it re-reads
    the file) and impossible for an in-memory tokenizer. Doing it here keeps
    the bridge's ``to_tokens`` identical to our own BOS handling.
    """
    import copy

    if tokenizer.bos_token is None:
        return tokenizer
    bridged = copy.deepcopy(tokenizer)
    bridged.add_bos_token = True
    bridged.init_kwargs["add_bos_token"] = True
    bridged.init_kwargs.setdefault("name_or_path", "headscope-in-memory")
    probe = bridged("a", add_special_tokens=True).input_ids
    if not probe or probe[0] != tokenizer.bos_token_id:
        raise ModelLoadError(
            "this tokenizer cannot be made to prepend its BOS token; "
            "TransformerLens deep dives are unavailable for it"
        )
    return bridged
