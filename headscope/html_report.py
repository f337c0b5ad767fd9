"""A static HTML report of a run: ``headscope report RUN --html report.html``.

One self-contained file (plotly.js inlined once, so it opens offline and can
be mailed around): the model and prompt sets, the sink summary, a role census,
then every detector's figures from ``headscope.plots`` with its summary, the
detector's primary prompt set first. It reads the run only; nothing is
recomputed.

A run is data, not markup: every string taken from it is HTML-escaped, and the
figures' JSON is embedded by plotly with ``<``, ``>`` and ``/`` as ``\\u``
escapes, so no title or tick label can close the ``<script>`` it sits in.

Writing is atomic and never overwrites a user's file: the report goes to a
hidden temporary file beside ``out``, is synced to disk and renamed into
place; an existing ``out`` is replaced only when it is a report headscope
wrote (it carries ``REPORT_MARKER``).
"""

from __future__ import annotations

import contextlib
import html
import importlib.metadata
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headscope.errors import HeadscopeError
from headscope.plots import figures_for, role_census
from headscope.report import UNREADABLE, run_context, sink_summary, unreadable
from headscope.safety_summary import Block, is_safety, safety_blocks
from headscope.tables import HeadTable, LayerTable, primary_prompt_sets, tables_of

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-top: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.meta { color: #666; } .figure { margin: 1em 0; }
"""

#: every report carries this in its <head>; only a file with it (or the opening
#: of a report from before it existed) is ever replaced
REPORT_MARKER = '<meta name="generator" content="headscope'
_LEGACY_OPENING = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>headscope: "
_SNIFF_BYTES = 4096


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rows_table(rows: Sequence[tuple[Any, Any]], header: tuple[str, str]) -> str:
    cells = "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in rows)
    return f"<table><tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>{cells}</table>"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _objects(manifest: dict[str, Any], field: str) -> list[dict[str, Any]]:
    items = manifest.get(field, [])
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _ordered(tables: Sequence[HeadTable | LayerTable], manifest: dict) -> list:
    """Detectors in run order; within one, its primary prompt set first."""
    primary = primary_prompt_sets(manifest)
    detectors = dict.fromkeys(t.detector for t in tables)
    return [t for d in detectors for t in tables_of(list(tables), d, None, primary)]


def _prompt_set_rows(manifest: dict[str, Any]) -> list[tuple[Any, str]]:
    sets = manifest.get("prompt_sets", [])
    rows = []
    for p in sets if isinstance(sets, list) else []:
        if not isinstance(p, dict):
            rows.append((p, ""))
            continue
        contents = f"{p.get('n_prompts', '?')} prompts, lengths {p.get('lengths', '?')}"
        rows.append((p.get("name", "?"), f"{contents}; {p.get('description', '')}"))
    return rows


def _table_section(table: HeadTable | LayerTable) -> list[Any]:
    """Heading, description, figures and summary of one table (figures as objects)."""
    parts: list[Any] = [f"<h2>{_e(table.detector)} on {_e(table.prompt_set)}</h2>"]
    if table.description:
        parts.append(f"<p class='meta'>{_e(table.description)}</p>")
    try:
        figures = figures_for(table)
        summary = [(k, _short(v)) for k, v in table.summary.items() if k != "curves"]
    except UNREADABLE as err:
        return [*parts, f"<p class='meta'>{_e(unreadable(table, err))}</p>"]
    parts += figures
    if is_safety(table):  # its top heads, the Sahara steps, the generation check's verdict
        try:
            parts += [_block_html(block) for block in safety_blocks(table)]
        except UNREADABLE as err:
            parts.append(f"<p class='meta'>{_e(unreadable(table, err))}</p>")
    if summary:
        parts.append(_rows_table(summary, ("summary", "value")))
    return parts


def _block_html(block: Block) -> str:
    """A safety block: its title, a table of its rows, its notes as paragraphs."""
    header = "".join(f"<th>{_e(c)}</th>" for c in block.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
    )
    notes = "".join(f"<p>{_e(note)}</p>" for note in block.notes)
    return f"<h3>{_e(block.title)}</h3><table><tr>{header}</tr>{rows}</table>{notes}"


def _version() -> str:
    try:
        return importlib.metadata.version("headscope")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_html_report(manifest: dict[str, Any], tables: Sequence[HeadTable | LayerTable]) -> str:
    """The report as one HTML document."""
    model = _dict(manifest.get("model"))
    arch = _dict(model.get("arch"))
    versions = _dict(manifest.get("versions"))
    parts: list[Any] = [  # HTML text, and figures drawn in place at the end
        f"<h1>headscope report: {_e(model.get('spec', '?'))}</h1>",
        f"<p class='meta'>{_e(arch.get('n_layers', '?'))} layers x "
        f"{_e(arch.get('n_heads', '?'))} heads ({_e(arch.get('n_kv_heads', '?'))} KV heads), "
        f"d_model {_e(arch.get('d_model', '?'))}; created {_e(manifest.get('created', '?'))}; "
        f"headscope {_e(versions.get('headscope', '?'))}</p>",
        "<h2>Prompt sets</h2>",
        _rows_table(_prompt_set_rows(manifest), ("set", "contents")),
        "".join(
            f"<p class='meta'>{_e(line)}</p>"
            for line in run_context(manifest, tables).plain.splitlines()
        ),
    ]
    sinks = sink_summary(tables, primary=primary_prompt_sets(manifest))
    if sinks:
        parts += ["<h2>Attention sinks</h2>", _rows_table(sinks, ("quantity", "value"))]
    if tables:
        parts += ["<h2>Role census</h2>", role_census(tables)]
    for table in _ordered(tables, manifest):
        parts += _table_section(table)
    for skipped in _objects(manifest, "skipped"):
        parts.append(
            f"<p class='meta'>skipped {_e(skipped.get('detector'))}: "
            f"{_e(skipped.get('reason'))}</p>"
        )
    body, n_figures = [], 0
    for part in parts:
        if isinstance(part, str):
            body.append(part)
            continue
        rendered = part.to_html(
            full_html=False, include_plotlyjs=n_figures == 0, div_id=f"figure-{n_figures}"
        )
        body.append(f"<div class='figure'>{rendered}</div>")
        n_figures += 1
    title = _e(f"headscope: {model.get('spec', 'run')}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f'{REPORT_MARKER} {_e(_version())}">'
        f"<title>{title}</title><style>{STYLE}</style></head><body>{chr(10).join(body)}"
        "</body></html>"
    )


def _is_report(path: Path) -> bool:
    """Whether the regular file ``path`` is an HTML report headscope wrote."""
    with open(path, "rb") as file:
        opening = file.read(_SNIFF_BYTES).decode("utf-8", "replace")
    return REPORT_MARKER in opening or opening.startswith(_LEGACY_OPENING)


def check_report_path(out: str | Path) -> Path:
    """Refuse a report path headscope must not write; returns the path to write.

    Refused: an empty path, a folder, a path whose folder does not exist or is
    a file, a symbolic link, and an existing file that is not a report
    headscope wrote (headscope never overwrites a user's file).
    """
    given = Path(out)
    if not str(out).strip():
        raise HeadscopeError("empty report path; give a file such as report.html")
    path = given.expanduser()
    if path.is_symlink():
        raise HeadscopeError(f"{given} is a symbolic link; give the real path of the report")
    if path.is_dir():
        raise HeadscopeError(
            f"{given} is a folder; give a file name for the report, such as {given}/report.html"
        )
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists():
        raise HeadscopeError(
            f"cannot write {given}: the folder {parent} does not exist; create it first"
        )
    if not parent.is_dir():
        raise HeadscopeError(f"cannot write {given}: {parent} is a file, not a folder")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as err:
        raise HeadscopeError(f"cannot write {given}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise HeadscopeError(f"{given} exists and is not a regular file; choose another path")
    try:
        ours = _is_report(path)
    except OSError as err:
        raise HeadscopeError(
            f"{given} exists and cannot be read to check that headscope wrote it "
            f"({err.strerror}); choose another path"
        ) from None
    if not ours:
        raise HeadscopeError(
            f"{given} exists and is not an HTML report headscope wrote; headscope never "
            "overwrites it: choose another path"
        )
    return path


def _write_atomically(path: Path, text: str) -> None:
    """``text`` at ``path`` complete or not at all: a synced hidden file renamed over it."""
    temporary = path.parent / f".{path.name}.partial-{secrets.token_hex(4)}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as file:
            file.write(text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        check_report_path(path)  # again: something may have appeared there meanwhile
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash too
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_html_report(run: str | Path, out: str | Path) -> Path:
    """Read ``run`` and write its HTML report to ``out`` atomically; returns ``out``.

    ``out`` is checked before the run is read (see ``check_report_path``); on
    any failure no partial file remains and an existing report is untouched.
    """
    from headscope.runs import open_run

    path = check_report_path(out)
    opened = open_run(run)
    document = build_html_report(opened.manifest, [*opened.head_tables(), *opened.layer_tables()])
    try:
        _write_atomically(path, document)
    except OSError as err:
        raise HeadscopeError(f"cannot write {out}: {err.strerror or err}") from None
    return path
