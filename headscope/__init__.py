"""headscope: an attention-head microscope.

Public API (imported lazily, so ``import headscope`` stays cheap)::

    import headscope
    handle = headscope.load_model("smollm2-135m")
    result = headscope.scan(handle, prompts=("prose", "random-repeat"), out="runs/demo")
    run = headscope.open_run("runs/demo")
    run.head_table("induction", "random-repeat").top(5)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "headscope.probes.loading",
    "available_models": "headscope.probes.model_catalog",
    "ModelHandle": "headscope.probes.handle",
    "ArchInfo": "headscope.probes.handle",
    "scan": "headscope.scanning",
    "ScanConfig": "headscope.scanning",
    "ScanResult": "headscope.scanning",
    "open_run": "headscope.runs",
    "list_runs": "headscope.runs",
    "Run": "headscope.runs",
    "get_prompt_set": "headscope.data",
    "PromptSet": "headscope.data",
    "HeadTable": "headscope.tables",
    "LayerTable": "headscope.tables",
    "detector_names": "headscope.analyses",
    "get_detector": "headscope.analyses",
    "HeadscopeError": "headscope.errors",
    "NotApplicable": "headscope.errors",
    "Ablation": "headscope.probes.ablation",
    "mean_ablation": "headscope.probes.ablation",
    "resample_ablation": "headscope.probes.ablation",
    "export_ablation": "headscope.exporters.ablation",
    "build_refusal_organism": "headscope.organisms.refusal",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
