"""Export a head ablation: a versioned JSON spec, a baked checkpoint, TransformerLens hooks.

``export_ablation(handle, ablation, out)`` writes one folder:

- ``ablation.json``: the spec (format ``headscope-ablation``, version 1): the
  heads, the method, the reference outputs a mean or resample ablation needs,
  the modules skipped, and the model it was made for (spec, source, shape).
- ``checkpoint/`` (zero ablation only): the model with the ablation baked into
  its weights, each ablated head's slice of the attention output projection
  zeroed (a skipped attention or MLP branch: its whole output projection and
  bias), saved with ``save_pretrained`` so that stock transformers loads it
  with ``AutoModelForCausalLM.from_pretrained``. Zeroing a head's rows of W_O
  is exactly zero ablation of that head's output z (the bias, applied once for
  all heads, stays); a mean or resample ablation has no such weight-only form.
- ``transformer_lens_hooks.py``: a standalone copy of
  ``headscope.exporters.transformer_lens_hooks``, the function that installs
  the spec as TransformerLens hooks.
- ``ablation_spec.py``: a standalone copy of ``headscope.ablation_spec`` (the
  spec's format, methods and head names), which the hooks file imports from
  beside it; the two need torch only, not headscope.

Everything is checked before anything is written, and the folder is written
under a temporary name and renamed at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headscope import ablation_spec
from headscope.ablation_spec import SPEC_FORMAT, SPEC_VERSION
from headscope.errors import HeadscopeError
from headscope.exporters import transformer_lens_hooks
from headscope.outputs import (
    FolderKind,
    OutputFolder,
    check_output_folder,
    versioned_format,
    write_folder,
)
from headscope.probes.ablation import Ablation
from headscope.probes.handle import ModelHandle
from headscope.probes.sites import block_sites, is_conv1d, zero_head_output_weight

SPEC_FILE = "ablation.json"
HOOKS_FILE = "transformer_lens_hooks.py"
SPEC_MODULE_FILE = "ablation_spec.py"
CHECKPOINT_DIR = "checkpoint"
ABLATION_FOLDER = FolderKind(
    name="headscope ablation export",
    marker=SPEC_FILE,
    recognise=versioned_format(SPEC_FORMAT, SPEC_VERSION),
    entries=frozenset({SPEC_FILE, HOOKS_FILE, SPEC_MODULE_FILE, CHECKPOINT_DIR, "__pycache__"}),
)


@dataclass(frozen=True)
class AblationExport:
    """Where an export was written."""

    folder: Path
    spec: Path
    hooks: Path
    checkpoint: Path | None


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


def heads_from_run(
    run: str | Path, role: str, *, top: int, prompt_set: str | None = None
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The model spec of ``run`` and the ``top`` heads of detector ``role`` by score."""
    from headscope.runs import open_run

    if top < 1:
        raise HeadscopeError(f"--top must be at least 1, got {top}")
    opened = open_run(run)
    table = opened.head_table(role, prompt_set)
    ranked = table.frame.dropna(subset=["score"]).sort_values(
        ["score", "layer", "head"], ascending=[False, True, True]
    )
    if len(ranked) < top:
        raise HeadscopeError(
            f"{role} in {run} scores {len(ranked)} heads; cannot take the top {top}"
        )
    heads = tuple((int(r.layer), int(r.head)) for r in ranked.head(top).itertuples())
    return opened.model_spec(), heads


def recorded_ablation(
    run: str | Path, role: str, *, prompt_set: str | None = None
) -> tuple[str, float | None] | None:
    """(method, epsilon) of the ablation ``role``'s table says its heads were scored with
    (its params "ablation" and "epsilon": the safety tables record "query_scale"), or None
    when it records none a spec can hold. Exporting those heads the same way reproduces
    what was measured."""
    from headscope.runs import open_run

    params = open_run(run).head_table(role, prompt_set).params
    method = params.get("ablation")
    if not isinstance(method, str) or method not in ablation_spec.HEAD_METHODS:
        return None
    epsilon = params.get("epsilon")
    number = isinstance(epsilon, int | float) and not isinstance(epsilon, bool)
    return method, float(epsilon) if number and method == "query_scale" else None


def spec_json(handle: ModelHandle, ablation: Ablation) -> dict[str, Any]:
    """The spec as plain JSON values, with provenance."""
    import headscope

    spec = _to_json(ablation.to_spec(handle))
    spec["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    spec["headscope_version"] = headscope.__version__
    return spec


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read and check an ablation spec written by ``export_ablation``."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HeadscopeError(f"cannot read ablation spec {path}: {err}") from err
    Ablation.from_spec(spec)  # raises on a wrong format or version
    return spec


def bake_zero_ablation(handle: ModelHandle, ablation: Ablation) -> torch.nn.Module:
    """A copy of ``handle.model`` with the zero ablation written into its weights."""
    if ablation.method != "zero":
        raise HeadscopeError(
            f"only zero ablation can be baked into weights; '{ablation.method}' ablation "
            "is exported as the JSON spec and TransformerLens hooks"
        )
    if any(module == "block" for module, _ in ablation.skip):
        raise HeadscopeError(
            "skipping a whole block cannot be baked into weights; drop the layer instead "
            "(headscope export prune)"
        )
    ablation.check(handle)
    model = copy.deepcopy(handle.model)
    sites = block_sites(model, handle.arch)
    for layer, head in ablation.heads:
        zero_head_output_weight(sites[layer], head, handle.arch)
    for module, layer in ablation.skip:
        projection = (
            sites[layer].output_projection if module == "attn" else _mlp_output(sites[layer].mlp)
        )
        with torch.no_grad():
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()
    return model


def _mlp_output(mlp: torch.nn.Module | None) -> torch.nn.Module:
    """The MLP's last projection (down_proj, c_proj, fc2): zero it and the branch is zero."""
    if mlp is None:
        raise HeadscopeError("this block has no MLP branch")
    for name in ("down_proj", "c_proj", "fc2", "dense_4h_to_h"):
        found = getattr(mlp, name, None)
        if isinstance(found, torch.nn.Linear) or (found is not None and is_conv1d(found)):
            return found
    raise HeadscopeError(f"cannot find the output projection of {type(mlp).__name__}")


def export_ablation(
    handle: ModelHandle,
    ablation: Ablation,
    out: str | Path | OutputFolder,
    *,
    force: bool = False,
    checkpoint: bool | None = None,
) -> AblationExport:
    """Write the spec, the hooks and spec modules and (zero) the baked checkpoint to ``out``.

    ``checkpoint``: None bakes one whenever the method is zero; True demands it.
    """
    ablation.check(handle)
    folder = check_output_folder(out, ABLATION_FOLDER, force=force)
    bake = ablation.method == "zero" if checkpoint is None else checkpoint
    baked = bake_zero_ablation(handle, ablation) if bake else None
    spec = spec_json(handle, ablation)
    with write_folder(out, ABLATION_FOLDER, force=force) as tmp:
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1, allow_nan=False) + "\n")
        shutil.copyfile(transformer_lens_hooks.__file__, tmp / HOOKS_FILE)
        shutil.copyfile(ablation_spec.__file__, tmp / SPEC_MODULE_FILE)
        if baked is not None:
            baked.save_pretrained(tmp / CHECKPOINT_DIR, safe_serialization=True)
            handle.tokenizer.save_pretrained(tmp / CHECKPOINT_DIR)
    return AblationExport(
        folder=folder,
        spec=folder / SPEC_FILE,
        hooks=folder / HOOKS_FILE,
        checkpoint=folder / CHECKPOINT_DIR if baked is not None else None,
    )
