"""``scan`` (``headscope.scan``): model + prompt sets + detectors -> tables, and a run on disk.

Everything a user can get wrong (detector names, prompt-set names, the output
folder) is checked before the model is loaded, so a bad call fails in a second
and leaves nothing behind; the run itself is written atomically by
``headscope.runs``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headscope.analyses import resolve_detectors
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
from headscope.probes.handle import DEFAULT_BOS_POLICY, ModelHandle, check_bos_policy
from headscope.probes.loading import load_model
from headscope.probes.model_catalog import DEFAULT_MODEL
from headscope.probes.patterns import DEFAULT_SINK_KEYS, pattern_capture_bytes, probe_patterns
from headscope.probes.streaming import probe_streaming
from headscope.progress import Progress, ProgressBars, counter
from headscope.runs import RUN_FOLDER, write_run
from headscope.tables import HeadTable, LayerTable, TableLookup

DEFAULT_PROMPT_SETS = ("prose", "code", "random-tokens", "random-repeat", "repeated-token")
#: the classic heads are TransformerLens's own scores, on TransformerLens's own input
PATTERNS_BOS_POLICY = "always"

PROBES = {"streaming": probe_streaming, "patterns": probe_patterns}


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
    bos: str = field(
        default=DEFAULT_BOS_POLICY,
        metadata={
            "help": "always: prepend the model's BOS; auto: as the model's tokenizer does; "
            "never: no BOS (the classic heads keep TransformerLens's BOS either way)"
        },
    )
    detector_params: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "per detector, parameters that replace its defaults"},
    )

    def __post_init__(self) -> None:
        check_bos_policy(self.bos)
        check_batch_size(self.batch_size)
        check_count(self.n_prompts, "--n-prompts")
        check_count(self.seq_len, "--seq-len", minimum=2)
        check_count(self.n_sink_keys, "n_sink_keys")
        if not self.prompts:
            raise HeadscopeError("no prompt set given; e.g. --prompts prose,random-repeat")
        object.__setattr__(self, "device", check_device(self.device))


@dataclass(kw_only=True)
class ScanResult(TableLookup):
    """In-memory result of a scan; ``path`` is set when it was also written as a run.

    Tables are looked up as in a run (``table``, ``head_table``, ``layer_table``,
    ``in_group``).
    """

    manifest: dict[str, Any]
    head_tables: list[HeadTable]
    stats: dict[str, dict[str, Any]]  # prompt set -> capture -> statistics
    layer_tables: list[LayerTable] = field(default_factory=list)
    path: Path | None = None

    def _tables(self) -> list[HeadTable | LayerTable]:
        return [*self.head_tables, *self.layer_tables]

    def _where(self) -> str:
        return "this scan" if self.path is None else f"the scan written to {self.path}"

    def _repr_html_(self) -> str:
        model = self.manifest["model"]["spec"]
        parts = [f"<h4>headscope scan of {model}</h4>"]
        parts += [table._repr_html_() for table in [*self.head_tables, *self.layer_tables]]
        return "\n".join(parts)


def scan(
    model: str | ModelHandle | None = None,
    *,
    config: ScanConfig | None = None,
    out: str | Path | None = None,
    force: bool = False,
    on_progress: Progress | None | bool = True,
    **overrides: Any,
) -> ScanResult:
    """Probe ``model`` on prompt sets, run detectors, optionally write a run to ``out``.

    ``overrides`` are ScanConfig fields (``prompts=("prose",)``, ``detectors=...``).
    ``on_progress``: True for progress bars (``headscope.progress.ProgressBars``),
    False/None for silence, or a callback ``(label, done, total)``.
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
    params = _detector_params(config, detectors)
    prompt_sets = _prompt_sets(config)
    bars = ProgressBars(prefix="scan ") if on_progress is True else None
    callback = bars if bars is not None else (on_progress or None)
    # claimed before the model loads: a bad or busy --out fails now, not after the scan
    with (
        bars if bars is not None else nullcontext(),
        OutputFolder(out, RUN_FOLDER, force=force) if out is not None else nullcontext() as folder,
    ):
        return _scan(model, config, detectors, params, prompt_sets, callback, folder)


def _detector_params(config: ScanConfig, detectors: list[Detector]) -> dict[str, dict[str, Any]]:
    """Each scanned detector's parameters: its defaults with ``detector_params`` applied.

    Checked before the model loads: a parameter for a detector the scan does not
    run, or one the detector does not take, is an error now.
    """
    names = {d.name for d in detectors}
    stray = sorted(set(config.detector_params) - names)
    if stray:
        raise HeadscopeError(
            f"parameters given for detector(s) {stray}, which this scan does not run; "
            f"it runs {', '.join(sorted(names))}"
        )
    resolved = {}
    for detector in detectors:
        given = config.detector_params.get(detector.name, {})
        if not isinstance(given, dict):
            raise HeadscopeError(f"parameters of '{detector.name}' must be a mapping")
        resolved[detector.name] = detector.resolve_params(given)
    return resolved


def parse_detector_params(assignments: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["massive_intervention.protocol=sun2024", ...]`` as ``{detector: {name: value}}``.

    A value is read as JSON when it is valid JSON (numbers, true/false, null,
    quoted strings, lists), else taken as a plain string.
    """
    import json

    out: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        target, sep, text = assignment.partition("=")
        detector, dot, name = target.strip().partition(".")
        if not sep or not dot or not detector or not name.strip():
            raise HeadscopeError(
                f"--param {assignment!r}: write DETECTOR.NAME=VALUE, e.g. "
                "streaming_window.window=512"
            )
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(detector, {})[name.strip()] = value
    return out


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


def _patterns_tokens(patterns, streaming) -> dict[str, Any]:
    """The classic heads' own tokens of a set, when they differ (another BOS choice)."""
    if patterns is None or patterns is streaming:
        return {}
    return {
        "patterns_token_hash": patterns.token_hash,
        "patterns_bos_prepended": patterns.bos_prepended,
    }


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
    params: dict[str, dict[str, Any]],
    prompt_sets: list[PromptSet],
    on_progress: Progress | None,
    folder: OutputFolder | None,
) -> ScanResult:
    started = time.perf_counter()
    handle = (
        model if isinstance(model, ModelHandle) else load_model(config.model, device=config.device)
    ).with_bos(config.bos)
    timing: dict[str, float] = {"model_load_s": round(handle.load_seconds, 3)}
    tokenized = {ps.name: handle.tokenize(ps) for ps in prompt_sets}
    captures = {d.capture for d in detectors}
    if "tables" in captures:  # head families cluster on the streaming statistics too
        captures.add("streaming")
    patterns_handle = handle.with_bos(PATTERNS_BOS_POLICY)
    tokenized_for = {"streaming": tokenized, "patterns": tokenized}
    if "patterns" in captures and patterns_handle.bos_id != handle.bos_id:
        tokenized_for["patterns"] = {ps.name: patterns_handle.tokenize(ps) for ps in prompt_sets}
    _check_lengths(handle, tokenized, captures - {"patterns"})
    if "patterns" in captures:
        _check_lengths(handle, tokenized_for["patterns"], {"patterns"})
    stats: dict[str, dict[str, Any]] = {name: {} for name in tokenized}
    for prompt_set in prompt_sets:
        for capture in ("streaming", "patterns"):
            if capture not in captures:
                continue
            t0 = time.perf_counter()
            stats[prompt_set.name][capture] = PROBES[capture](
                handle,
                tokenized_for[capture][prompt_set.name],
                batch_size=config.batch_size,
                n_sink_keys=config.n_sink_keys,
                on_progress=on_progress,
            )
            timing[f"probe_{prompt_set.name}_{capture}_s"] = round(time.perf_counter() - t0, 3)

    tables, skipped = _run_detectors(
        detectors, handle, stats, params=params, config=config, on_progress=on_progress,
        timing=timing,
    )  # fmt: skip
    timing["total_s"] = round(time.perf_counter() - started, 3)
    manifest = {
        "kind": "scan",
        "model": {**handle.describe(), "cache_hit": handle.cache_hit},
        "bos": {
            **handle.describe_bos(),
            "classic_heads": f"{PATTERNS_BOS_POLICY} (TransformerLens's convention: its "
            "scores are computed on prompts that start with the BOS)",
        },
        "prompt_sets": [
            {
                "name": ps.name,
                "description": ps.description,
                "content_hash": ps.content_hash,
                "token_hash": tokenized[ps.name].token_hash,
                "n_prompts": len(tokenized[ps.name]),
                "lengths": sorted(set(tokenized[ps.name].lengths)),
                "bos_prepended": tokenized[ps.name].bos_prepended,
                **_patterns_tokens(tokenized_for["patterns"].get(ps.name), tokenized[ps.name]),
            }
            for ps in prompt_sets
        ],
        "detectors": [
            {
                "name": d.name,
                "role": d.role,
                "group": d.group,
                "primary_prompt_set": d.primary_prompt_set,
                "params": params[d.name],
            }
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
    params: dict[str, dict[str, Any]],
    config: ScanConfig,
    on_progress: Progress | None,
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
        given = params[detector.name]
        try:
            if detector.capture == "model":
                t0 = time.perf_counter()
                step = counter(on_progress, detector.name, 1)  # one step; its probes report too
                found = detector.run_experiment(
                    handle, stats_by_set=streaming, batch_size=config.batch_size,
                    on_progress=on_progress, **given,
                )  # fmt: skip
                tables += found if isinstance(found, list) else [found]
                step()
                timing[f"experiment_{detector.name}_s"] = round(time.perf_counter() - t0, 3)
            elif detector.capture == "tables":
                tables.append(detector.run_tables(tables, streaming, **given))
            elif detector.across_prompt_sets:
                if len(stats) < 2:
                    raise NotApplicable("it compares prompt sets and the scan has only one")
                by_set = {name: s[detector.capture] for name, s in stats.items()}
                tables.append(detector.run(by_set, **given))
            else:
                tables += [detector.run(s[detector.capture], **given) for s in stats.values()]
        except NotApplicable as reason:
            skipped.append({"detector": detector.name, "reason": str(reason)})
    return tables, skipped
