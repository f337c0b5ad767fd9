"""The on-disk run format: one folder per scan, readable without running its code.

A run is a folder ``runs/<name>/`` holding::

    manifest.json          schema version, creation time, library versions, whatever
                           the caller describes (model, prompt sets, parameters,
                           timing) and the metadata of every stored table
    heads.parquet          every HeadTable, rows tagged with detector and prompt_set
    layers.parquet         the same for LayerTables (absent when there are none)
    stats.safetensors      named tensors such as "prose/sink_alpha_by_key"
    samples/<name>.safetensors   small tensor dicts for the dashboard

Why this shape: Parquet keeps the tables typed and readable from any tool,
safetensors stores tensors without pickle, and JSON holds the rest. Reading a
run therefore never executes code from it. A run is written into a hidden
sibling folder and renamed into place at the end, so an interrupted scan leaves
no half run behind, and ``--force`` only ever replaces a folder that is a run.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import safetensors.torch
import torch

from headscope.errors import HeadscopeError
from headscope.outputs import (
    FolderKind,
    OutputFolder,
    check_output_folder,
    versioned_format,
    write_folder,
)
from headscope.tables import (
    HEAD_COLUMNS,
    LAYER_COLUMNS,
    HeadTable,
    LayerTable,
    TableLookup,
    evidence_from_json,
    evidence_to_json,
)

SCHEMA_VERSION = 1
RUN_FORMAT = "headscope-run"

MANIFEST_FILE = "manifest.json"
HEADS_FILE = "heads.parquet"
LAYERS_FILE = "layers.parquet"
STATS_FILE = "stats.safetensors"
SAMPLES_DIR = "samples"
KEY_COLUMNS = ("detector", "prompt_set")
_VERSIONED_DISTRIBUTIONS = ("torch", "transformers", "transformer_lens")


def library_versions() -> dict[str, str]:
    """Versions of headscope, python and the libraries a run's numbers depend on."""

    def version_of(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    headscope_version = version_of("headscope")
    if headscope_version == "unknown":  # a source checkout that is not pip-installed
        try:
            from headscope import __version__ as headscope_version
        except ImportError:
            pass
    versions = {"headscope": headscope_version, "python": platform.python_version()}
    versions.update({name: version_of(name) for name in _VERSIONED_DISTRIBUTIONS})
    return versions


def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


def _is_run_manifest(manifest: Mapping[str, Any]) -> bool:
    """A manifest this headscope wrote: its format name and a schema version it reads.

    Runs written before the format name existed are recognised by the fields
    every schema-1 manifest has.
    """
    if "format" in manifest:
        return versioned_format(RUN_FORMAT, SCHEMA_VERSION, version_field="schema_version")(
            manifest
        )
    versions = manifest.get("versions")
    return (
        manifest.get("schema_version") == 1
        and isinstance(versions, dict)
        and "headscope" in versions
        and isinstance(manifest.get("tables"), list)
    )


RUN_FOLDER = FolderKind(
    name="headscope run",
    marker=MANIFEST_FILE,
    recognise=_is_run_manifest,
    entries=frozenset({MANIFEST_FILE, HEADS_FILE, LAYERS_FILE, STATS_FILE, SAMPLES_DIR}),
)


def _json_default(value: Any) -> Any:
    """Make numpy/torch values, paths and sets JSON-able; describe anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _table_entries(tables: Sequence[HeadTable | LayerTable], kind: str) -> list[dict[str, Any]]:
    entries, seen = [], set()
    for table in tables:
        key = (table.detector, table.prompt_set)
        if key in seen:
            raise HeadscopeError(
                f"two {kind} tables for detector {key[0]!r} on prompt set {key[1]!r}; "
                "a run stores one table per detector and prompt set"
            )
        seen.add(key)
        entry = {**table.metadata(), "kind": kind, "n_layers": int(table.n_layers)}
        if kind == "head":
            entry["n_heads"] = int(table.n_heads)
        entries.append(entry)
    return entries


def _write_tables(tables: Sequence[HeadTable | LayerTable], path: Path) -> None:
    frames = []
    for table in tables:
        frame = table.frame.copy()
        frame["evidence"] = [evidence_to_json(e) for e in frame["evidence"]]
        frame.insert(0, "prompt_set", table.prompt_set)
        frame.insert(0, "detector", table.detector)
        frames.append(frame)
    pd.concat(frames, ignore_index=True).to_parquet(path, engine="pyarrow", index=False)


def _cpu_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (copies, so no two entries share memory)."""
    out = {}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise HeadscopeError(
                f"{what} entry {name!r} is a {type(tensor).__name__}, not a tensor"
            )
        out[str(name)] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return out


def _check_sample_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise HeadscopeError(f"sample name {name!r} is not a plain file name")


def write_run(
    out: Path | str | OutputFolder,
    *,
    manifest: Mapping[str, Any],
    head_tables: Sequence[HeadTable] = (),
    layer_tables: Sequence[LayerTable] = (),
    tensors: Mapping[str, torch.Tensor] | None = None,
    samples: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    force: bool = False,
) -> Path:
    """Write a run folder atomically and return its path.

    ``out`` is a path, or an ``OutputFolder`` the caller claimed before its
    long work (as ``scan`` does). Everything goes into a hidden sibling that
    becomes ``out`` only when complete; on any failure (or Ctrl-C) it is
    removed, and an existing run at ``out`` (replaced only with ``force``) is
    untouched until the new one is complete.
    """
    full_manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(),
        "versions": library_versions(),
        **manifest,
    }
    full_manifest["format"] = RUN_FORMAT
    full_manifest["schema_version"] = SCHEMA_VERSION
    full_manifest["tables"] = _table_entries(head_tables, "head") + _table_entries(
        layer_tables, "layer"
    )
    manifest_text = json.dumps(full_manifest, indent=2, default=_json_default)
    for name in samples or {}:
        _check_sample_name(name)

    path = check_output_folder(out, RUN_FOLDER, force=force)
    with write_folder(out, RUN_FOLDER, force=force) as partial:
        if head_tables:
            _write_tables(head_tables, partial / HEADS_FILE)
        if layer_tables:
            _write_tables(layer_tables, partial / LAYERS_FILE)
        if tensors:
            safetensors.torch.save_file(_cpu_tensors(tensors, "tensor"), partial / STATS_FILE)
        if samples:
            (partial / SAMPLES_DIR).mkdir()
            for name, sample in samples.items():
                safetensors.torch.save_file(
                    _cpu_tensors(sample, f"sample {name!r}"),
                    partial / SAMPLES_DIR / f"{name}.safetensors",
                )
        # the manifest last: a folder without it is never taken for a run
        (partial / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
    return path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# --------------------------------------------------------------------------- reading
# Every check a run must pass lives in headscope.run_checks; what fails becomes
# one HeadscopeError line that names the run, the file and what is wrong.

#: what parsing a damaged JSON text can raise (ValueError covers JSONDecodeError
#: and integers too long to convert; RecursionError, arrays nested too deep)
_JSON_ERRORS = (ValueError, TypeError, RecursionError)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the run at ``path``, checked against ``MANIFEST_SCHEMA``."""
    from headscope.run_checks import manifest_problem

    if not path.is_dir():
        raise HeadscopeError(f"no run at {path}: the folder does not exist")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise HeadscopeError(f"{path} is not a headscope run: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, *_JSON_ERRORS) as err:
        raise HeadscopeError(f"{manifest_path} is not readable JSON ({_one_line(err)})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise HeadscopeError(
            f"run {path} has schema version {version} but this headscope reads up to "
            f"{SCHEMA_VERSION}; upgrade headscope to open it"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise HeadscopeError(f"run {path}: {MANIFEST_FILE} {problem}")
    return manifest


def _read_table_file(path: Path, columns: tuple[str, ...], wanted: bool) -> pd.DataFrame:
    """Rows of heads/layers.parquet with evidence decoded; an empty frame when none stored."""
    from headscope.run_checks import columns_problem

    if not os.path.lexists(path):
        if wanted:
            raise HeadscopeError(f"run {path.parent} lists tables but has no {path.name}")
        return pd.DataFrame(columns=[*KEY_COLUMNS, *columns])
    if not path.is_file():
        raise HeadscopeError(f"{path} is not a file")
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as err:  # pyarrow raises several types for damaged files
        raise HeadscopeError(f"{path} is not a readable Parquet file ({_one_line(err)})") from None
    missing = [c for c in (*KEY_COLUMNS, *columns) if c not in frame.columns]
    if missing:
        raise HeadscopeError(f"{path} lacks columns {missing}")
    problem = columns_problem(frame, columns)
    if problem:
        raise HeadscopeError(f"{path}: {problem}")
    try:
        evidence = [evidence_from_json(text) for text in frame["evidence"]]
    except _JSON_ERRORS as err:
        raise HeadscopeError(f"{path} has evidence that is not JSON ({_one_line(err)})") from None
    if not all(isinstance(e, dict) for e in evidence):
        raise HeadscopeError(f"{path} has evidence that is not a JSON object")
    frame["evidence"] = evidence
    return frame


def _check_rows(path: Path, frame: pd.DataFrame, entries: Sequence[Mapping[str, Any]]) -> None:
    from headscope.run_checks import rows_problem

    for entry in entries:
        problem = rows_problem(frame, entry)
        if problem:
            raise HeadscopeError(f"{path}: {problem}")


def _check_safetensors(path: Path) -> None:
    """Read a safetensors file's header: a truncated or damaged file fails here.

    Cheap: the tensors are memory-mapped, not read.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                handle.get_slice(name).get_shape()
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise HeadscopeError(
            f"{path} is not a readable safetensors file ({_one_line(err)})"
        ) from None


def _manifest_entries(manifest: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    tables = manifest.get("tables", [])
    return [t for t in tables if isinstance(t, dict) and t.get("kind") == kind]


class Run(TableLookup):
    """A run folder opened for reading: manifest, tables, tensors and samples.

    Look tables up with ``table``, ``head_table``, ``layer_table`` and
    ``in_group`` (shared with a scan's in-memory result).
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], heads: pd.DataFrame, layers: pd.DataFrame
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._heads = heads
        self._layers = layers

    @property
    def name(self) -> str:
        return self.path.name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def model_spec(self) -> str:
        """The spec of the model that made this run (raises when the run does not say)."""
        model = self.manifest.get("model")
        spec = model.get("spec") if isinstance(model, dict) else None
        if not isinstance(spec, str) or not spec:
            raise HeadscopeError(
                f"run {self.path} does not record which model made it; give --model"
            )
        return spec

    @staticmethod
    def _rebuild(cls: type, rows: pd.DataFrame, entry: Mapping[str, Any], **extra: Any) -> Any:
        columns = HEAD_COLUMNS if cls is HeadTable else LAYER_COLUMNS
        mine = (rows["detector"] == entry["detector"]) & (rows["prompt_set"] == entry["prompt_set"])
        return cls(
            frame=rows.loc[mine, list(columns)],
            detector=entry["detector"],
            prompt_set=entry["prompt_set"],
            params=entry.get("params", {}),
            summary=entry.get("summary", {}),
            description=entry.get("description", ""),
            group=entry.get("group") or _legacy_group(entry["detector"]),
            n_layers=entry["n_layers"],
            **extra,
        )

    def head_tables(self) -> list[HeadTable]:
        """Every HeadTable, in the order they were written."""
        return [
            self._rebuild(HeadTable, self._heads, entry, n_heads=entry["n_heads"])
            for entry in _manifest_entries(self.manifest, "head")
        ]

    def layer_tables(self) -> list[LayerTable]:
        """Every LayerTable, in the order they were written."""
        return [
            self._rebuild(LayerTable, self._layers, entry)
            for entry in _manifest_entries(self.manifest, "layer")
        ]

    def _tables(self) -> list[HeadTable | LayerTable]:
        return [*self.head_tables(), *self.layer_tables()]

    def _where(self) -> str:
        return f"run {self.path}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named statistics tensors; {} when the run stores none."""
        return _load_safetensors(self.path / STATS_FILE, missing_ok=True)

    def sample_names(self) -> list[str]:
        folder = self.path / SAMPLES_DIR
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.safetensors") if not p.name.startswith("."))

    def samples(self, name: str) -> dict[str, torch.Tensor]:
        """One sample's tensors, e.g. the full attention patterns of one prompt."""
        _check_sample_name(name)
        if name not in self.sample_names():
            stored = ", ".join(self.sample_names()) or "none"
            raise HeadscopeError(f"no sample {name!r} in run {self.path}; stored: {stored}")
        return _load_safetensors(self.path / SAMPLES_DIR / f"{name}.safetensors")

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(t.detector)}</td><td>{html.escape(t.prompt_set)}</td>"
            f"<td>{int(t.frame['flagged'].sum())} of {len(t.frame)}</td></tr>"
            for t in [*self.head_tables(), *self.layer_tables()]
        )
        prompt_sets = ", ".join(_prompt_set_names(self.manifest)) or "none"
        return (
            f"<b>headscope run {html.escape(self.name)}</b> ({html.escape(str(self.path))})<br>"
            f"model <code>{html.escape(_model_spec(self.manifest))}</code>, created "
            f"{html.escape(str(self.manifest.get('created', '?')))}<br>"
            f"prompt sets: {html.escape(prompt_sets)}"
            "<table><tr><th>detector</th><th>prompt set</th><th>flagged</th></tr>"
            f"{rows}</table>"
        )


def _legacy_group(table_name: str) -> str:
    """The group of a table in a run written before tables carried one.

    Only such runs pay for importing the detectors; a table no registered
    detector writes has no group.
    """
    from headscope.analyses import all_detectors

    owner = next((d for d in all_detectors() if table_name in d.table_names), None)
    return owner.group if owner is not None else ""


def _load_safetensors(path: Path, missing_ok: bool = False) -> dict[str, torch.Tensor]:
    if not path.exists() and missing_ok:
        return {}
    try:
        return safetensors.torch.load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise HeadscopeError(
            f"{path} is not a readable safetensors file ({_one_line(err)})"
        ) from None


def open_run(path: Path | str) -> Run:
    """Open a run folder, checked before anything reads it (see ``headscope.run_checks``).

    A HeadscopeError names the path and what is wrong: a manifest field of the
    wrong type, rows outside the model, a truncated Parquet or safetensors file.
    """
    path = Path(path).expanduser()
    manifest = _read_manifest(path)
    head_entries = _manifest_entries(manifest, "head")
    layer_entries = _manifest_entries(manifest, "layer")
    heads = _read_table_file(path / HEADS_FILE, HEAD_COLUMNS, wanted=bool(head_entries))
    layers = _read_table_file(path / LAYERS_FILE, LAYER_COLUMNS, wanted=bool(layer_entries))
    _check_rows(path / HEADS_FILE, heads, head_entries)
    _check_rows(path / LAYERS_FILE, layers, layer_entries)
    if os.path.lexists(path / STATS_FILE):
        _check_safetensors(path / STATS_FILE)
    run = Run(path, manifest, heads, layers)
    for name in run.sample_names():
        _check_safetensors(path / SAMPLES_DIR / f"{name}.safetensors")
    try:  # build every table once so a damaged run fails here, not in the dashboard
        run.head_tables()
        run.layer_tables()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise HeadscopeError(
            f"run {path} has tables that do not match its {MANIFEST_FILE} ({_one_line(err)!r})"
        ) from None
    return run


def _unique(names: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(str(n) for n in names if n is not None))


def _model_spec(manifest: Mapping[str, Any]) -> str:
    model = manifest.get("model", {})
    return str(model.get("spec", "?")) if isinstance(model, dict) else "?"


def _detector_names(manifest: Mapping[str, Any]) -> list[str]:
    return _unique([t.get("detector") for t in manifest.get("tables", []) if isinstance(t, dict)])


def _prompt_set_names(manifest: Mapping[str, Any]) -> list[str]:
    """Prompt sets the caller described (dicts with a name, or names), then those of tables."""
    described = manifest.get("prompt_sets", [])
    described = [p.get("name") if isinstance(p, dict) else p for p in described]
    tables = [t.get("prompt_set") for t in manifest.get("tables", []) if isinstance(t, dict)]
    return _unique([*described, *tables])


@dataclass(frozen=True)
class RunSummary:
    """One line of ``headscope runs``: what a run holds, read from its manifest only."""

    name: str
    path: Path
    model: str
    created: str
    detectors: list[str]
    prompt_sets: list[str]


def list_runs(root: Path | str = "runs") -> list[RunSummary]:
    """The runs directly under ``root``, newest first.

    Hidden folders (including unfinished ``.x.partial-*`` writes) and folders
    whose manifest is unreadable are skipped; a missing root gives [].
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not _is_run(path):
            continue
        try:
            manifest = _read_manifest(path)
            summary = RunSummary(
                name=path.name,
                path=path,
                model=_model_spec(manifest),
                created=str(manifest.get("created", "")),
                detectors=_detector_names(manifest),
                prompt_sets=_prompt_set_names(manifest),
            )
        except (HeadscopeError, AttributeError, TypeError):
            continue  # one damaged run must not hide the others
        found.append(summary)
    return sorted(found, key=lambda s: (s.created, s.name), reverse=True)
