"""``scan``: model + prompt sets + detectors -> tables, and a run on disk.

Everything a user can get wrong (detector names, prompt-set names, the output
folder) is checked before the model is loaded, so a bad call fails in a second
and leaves nothing behind; the run itself is written atomically by
``headscope.runs``.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headscope.analyses import HeadTable, LayerTable, resolve_detectors
from headscope.analyses.registry import Detector
from headscope.checks import (
    check_batch_size,
    check_count,
    check_device,
    check_pattern_memory,
    check_sequence_length,
)
from headscope.data import PromptSet, get_prompt_set
from headscope.errors import HeadscopeError, NotApplicable
from headscope.outputs import OutputFolder
from headscope.probes.models import DEFAULT_MODEL, ModelHandle, load_model
from headscope.probes.patterns import DEFAULT_SINK_KEYS, pattern_capture_bytes, probe_patterns
from headscope.probes.streaming import probe_streaming
from headscope.runs import RUN_FOLDER, write_run

DEFAULT_PROMPT_SETS = ("prose", "code", "random-repeat", "repeated-token")

#: on_progress(label, prompts_done, prompts_total)
ProgressCallback = Callable[[str, int, int], None]
PROBES = {"streaming": probe_streaming, "patterns": probe_patterns}


def _counter(on_progress: ProgressCallback | None, label: str, total: int) -> Callable[[int], None]:
    """Turn per-batch counts into (label, done, total) progress calls."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(label, done, total)

    return advance


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """What a scan does; the CLI and the dashboard are thin layers over this."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model spec (headscope models)"})
    prompts: tuple[str, ...] = field(
        default=DEFAULT_PROMPT_SETS,
        metadata={"help": "built-in prompt set names or prompt files (.txt / .jsonl)"},
    )
    detectors: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "detector names, 'default' or 'all'; None: all but opt-in ones"},
    )
    n_prompts: int | None = field(
        default=None, metadata={"help": "override the number of prompts of every built-in set"}
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "override the tokens per prompt (BOS included)"}
    )
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    n_sink_keys: int = field(
        default=DEFAULT_SINK_KEYS, metadata={"help": "first keys whose per-prompt α_k is kept"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        check_count(self.n_prompts, "--n-prompts")
        check_count(self.seq_len, "--seq-len", minimum=2)
        check_count(self.n_sink_keys, "n_sink_keys")
        if not self.prompts:
            raise HeadscopeError("no prompt set given; e.g. --prompts prose,random-repeat")
        object.__setattr__(self, "device", check_device(self.device))


@dataclass(kw_only=True)
class ScanResult:
    """In-memory result of a scan; ``path`` is set when it was also written as a run."""

    manifest: dict[str, Any]
    head_tables: list[HeadTable]
    stats: dict[str, dict[str, Any]]  # prompt set -> capture -> statistics
    layer_tables: list[LayerTable] = field(default_factory=list)
    path: Path | None = None

    def table(self, detector: str, prompt_set: str | None = None) -> HeadTable | LayerTable:
        """The table of ``detector`` (on ``prompt_set``, else its first one)."""
        for table in [*self.head_tables, *self.layer_tables]:
            if table.detector == detector and prompt_set in (None, table.prompt_set):
                return table
        skipped = {s["detector"]: s["reason"] for s in self.manifest.get("skipped", [])}
        if detector in skipped:
            raise HeadscopeError(f"detector '{detector}' was skipped: {skipped[detector]}")
        raise HeadscopeError(f"no table for detector '{detector}' on prompt set '{prompt_set}'")

    def head_table(self, detector: str, prompt_set: str | None = None) -> HeadTable:
        table = self.table(detector, prompt_set)
        if not isinstance(table, HeadTable):
            raise HeadscopeError(f"detector '{detector}' gives a layer table; use table()")
        return table

    def _repr_html_(self) -> str:
        model = self.manifest["model"]["spec"]
        parts = [f"<h4>headscope scan of {model}</h4>"]
        parts += [table._repr_html_() for table in [*self.head_tables, *self.layer_tables]]
        return "\n".join(parts)


def _tqdm_progress() -> ProgressCallback:
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=f"scan {name}", unit="prompt")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def scan(
    model: str | ModelHandle | None = None,
    *,
    config: ScanConfig | None = None,
    out: str | Path | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None | bool = True,
    **overrides: Any,
) -> ScanResult:
    """Probe ``model`` on prompt sets, run detectors, optionally write a run to ``out``.

    ``overrides`` are ScanConfig fields (``prompts=("prose",)``, ``detectors=...``).
    ``on_progress``: True for tqdm bars, False/None for silence, or a callback.
    """
    if isinstance(overrides.get("prompts"), str):
        overrides["prompts"] = tuple(p.strip() for p in overrides["prompts"].split(",") if p)
    if isinstance(overrides.get("detectors"), str):
        overrides["detectors"] = tuple(d.strip() for d in overrides["detectors"].split(",") if d)
    if isinstance(model, str):
        overrides["model"] = model
    elif isinstance(model, ModelHandle):
        overrides["model"] = model.spec
    config = ScanConfig(**{**(asdict(config) if config else {}), **overrides})
    detectors = resolve_detectors(list(config.detectors) if config.detectors else None)
    prompt_sets = _prompt_sets(config)
    if on_progress is True:
        on_progress = _tqdm_progress()
    elif on_progress is False:
        on_progress = None
    # claimed before the model loads: a bad or busy --out fails now, not after the scan
    with OutputFolder(out, RUN_FOLDER, force=force) if out is not None else nullcontext() as folder:
        return _scan(model, config, detectors, prompt_sets, on_progress, folder)


def _prompt_sets(config: ScanConfig) -> list[PromptSet]:
    """The scan's prompt sets, each under a name no other set of the scan has."""
    prompt_sets, given_as = [], {}
    for given in dict.fromkeys(config.prompts):
        prompt_set = get_prompt_set(given, n_prompts=config.n_prompts, seq_len=config.seq_len)
        if prompt_set.name in given_as:
            raise HeadscopeError(
                f"prompt sets '{given_as[prompt_set.name]}' and '{given}' are both named "
                f"'{prompt_set.name}', and a run keeps one result per name: rename a file"
            )
        if prompt_set.name.startswith(".") or not prompt_set.name.isprintable():
            raise HeadscopeError(
                f"prompt set '{given}' is named {prompt_set.name!r}, which cannot name its "
                "results: rename the file (letters, digits, '-', '_')"
            )
        given_as[prompt_set.name] = given
        prompt_sets.append(prompt_set)
    return prompt_sets


def _check_lengths(handle: ModelHandle, tokenized: dict, captures: set[str]) -> None:
    """Before any forward pass: prompts fit the model's positions, patterns fit memory."""
    for name, prompts in tokenized.items():
        longest = max(prompts.lengths, default=0)
        check_sequence_length(handle, longest, f"prompt set '{name}'")
        if "patterns" in captures:
            check_pattern_memory(
                pattern_capture_bytes(handle.arch, longest),
                length=longest,
                what=f"prompt set '{name}'",
            )


def _scan(
    model: str | ModelHandle | None,
    config: ScanConfig,
    detectors: list[Detector],
    prompt_sets: list[PromptSet],
    on_progress: ProgressCallback | None,
    folder: OutputFolder | None,
) -> ScanResult:
    started = time.perf_counter()
    handle = (
        model if isinstance(model, ModelHandle) else load_model(config.model, device=config.device)
    )
    timing: dict[str, float] = {"model_load_s": round(handle.load_seconds, 3)}
    tokenized = {ps.name: handle.tokenize(ps) for ps in prompt_sets}
    captures = {d.capture for d in detectors}
    if "tables" in captures:  # head families cluster on the streaming statistics too
        captures.add("streaming")
    _check_lengths(handle, tokenized, captures)
    stats: dict[str, dict[str, Any]] = {name: {} for name in tokenized}
    for prompt_set in prompt_sets:
        prompts = tokenized[prompt_set.name]
        for capture in ("streaming", "patterns"):
            if capture not in captures:
                continue
            label = f"{prompt_set.name} ({capture})"
            t0 = time.perf_counter()
            stats[prompt_set.name][capture] = PROBES[capture](
                handle,
                prompts,
                batch_size=config.batch_size,
                n_sink_keys=config.n_sink_keys,
                on_batch=_counter(on_progress, label, len(prompts)),
            )
            timing[f"probe_{prompt_set.name}_{capture}_s"] = round(time.perf_counter() - t0, 3)

    tables, skipped = _run_detectors(
        detectors, handle, stats, config=config, on_progress=on_progress, timing=timing
    )
    timing["total_s"] = round(time.perf_counter() - started, 3)
    manifest = {
        "kind": "scan",
        "model": {**handle.describe(), "cache_hit": handle.cache_hit},
        "prompt_sets": [
            {
                "name": ps.name,
                "description": ps.description,
                "content_hash": ps.content_hash,
                "token_hash": tokenized[ps.name].token_hash,
                "n_prompts": len(tokenized[ps.name]),
                "lengths": sorted(set(tokenized[ps.name].lengths)),
                "bos_prepended": tokenized[ps.name].bos_prepended,
            }
            for ps in prompt_sets
        ],
        "detectors": [
            {"name": d.name, "role": d.role, "primary_prompt_set": d.primary_prompt_set}
            for d in detectors
        ],
        "config": asdict(config),
        "captures": {
            "streaming": "headscope attention function: chunked/Triton statistics kernels",
            "patterns": "TransformerLens bridge hook_pattern, reduced per layer",
        },
        "timing": timing,
        "skipped": skipped,
    }
    head_tables = [t for t in tables if isinstance(t, HeadTable)]
    layer_tables = [t for t in tables if isinstance(t, LayerTable)]
    result = ScanResult(
        manifest=manifest, head_tables=head_tables, layer_tables=layer_tables, stats=stats
    )
    if folder is not None:
        tensors = {
            f"{name}/{capture}/{key}": value
            for name, by_capture in stats.items()
            for capture, s in by_capture.items()
            for key, value in s.tensors().items()
        }
        samples = {
            name: {"tokens": s.sample_tokens, "patterns": s.sample_patterns}
            for name, by_capture in stats.items()
            if (s := by_capture.get("patterns")) is not None and s.sample_patterns is not None
        }
        result.path = write_run(
            folder,
            manifest=manifest,
            head_tables=head_tables,
            layer_tables=layer_tables,
            tensors=tensors,
            samples=samples,
        )
    return result


def _run_detectors(
    detectors: list[Detector],
    handle: ModelHandle,
    stats: dict[str, dict[str, Any]],
    *,
    config: ScanConfig,
    on_progress: ProgressCallback | None,
    timing: dict[str, float],
) -> tuple[list[HeadTable | LayerTable], list[dict[str, str]]]:
    """Every detector's tables; those that do not apply are skipped with a reason.

    "tables" detectors (head families) run last, on everything found before.
    """
    tables: list[HeadTable | LayerTable] = []
    skipped: list[dict[str, str]] = []
    streaming = {name: s["streaming"] for name, s in stats.items() if "streaming" in s}
    ordered = sorted(detectors, key=lambda d: d.capture == "tables")
    for detector in ordered:
        try:
            if detector.capture == "model":
                t0 = time.perf_counter()
                if on_progress is not None:  # experiments run a few long forwards: a step bar
                    on_progress(detector.name, 0, 1)
                found = detector.run_experiment(
                    handle, stats_by_set=streaming, batch_size=config.batch_size
                )
                tables += found if isinstance(found, list) else [found]
                if on_progress is not None:
                    on_progress(detector.name, 1, 1)
                timing[f"experiment_{detector.name}_s"] = round(time.perf_counter() - t0, 3)
            elif detector.capture == "tables":
                tables.append(detector.run_tables(tables, streaming))
            elif detector.across_prompt_sets:
                if len(stats) < 2:
                    raise NotApplicable("it compares prompt sets and the scan has only one")
                by_set = {name: s[detector.capture] for name, s in stats.items()}
                tables.append(detector.run(by_set))
            else:
                tables += [detector.run(s[detector.capture]) for s in stats.values()]
        except NotApplicable as reason:
            skipped.append({"detector": detector.name, "reason": str(reason)})
    return tables, skipped


class _CallableModule(types.ModuleType):
    """``headscope.scan`` is both this module and the function: importing the
    submodule (as the CLI does) binds the module to the package's ``scan``
    attribute, so the module forwards calls to the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> ScanResult:
        return scan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
