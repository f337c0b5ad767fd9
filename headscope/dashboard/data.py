"""Every Streamlit cache wrapper of the dashboard, and the shared page helpers.

Pages import from here, never from each other: importing a page module runs
that page.

Cache keys: a run by its resolved path and its manifest's modification time
(a re-scanned run is re-read); a model by spec and device (the dtype is
always float32 here, see ``load_model``); an attention pattern by model spec,
device, prompt text and layer.

A run's strings (its name, model spec, prompt-set and detector names,
descriptions, error messages that quote them) are data: every element that
renders Markdown gets them through ``md``, which escapes them to show as typed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import streamlit as st

from headscope.errors import HeadscopeError
from headscope.report import UNREADABLE, unreadable
from headscope.text import plain

RUNS_DIR_ENV = "HEADSCOPE_RUNS_DIR"
RUN_KEY, COMPARE_KEY, HEAD_KEY = "run", "compare_run", "head"
#: every ASCII punctuation character: CommonMark lets each be backslash-escaped,
#: which covers emphasis, links, images, code, HTML tags, tables, math and directives
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")


def md(value: object) -> str:
    """``value`` as Markdown that renders as its literal text, on one line.

    For st.title/header/caption/error/info/tabs and any other element that
    renders Markdown; tables (st.dataframe) and st.text/st.code need no escaping.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", plain(value))


def show_error(message: object) -> None:
    """An error panel with one line of literal text."""
    st.error(md(message))


def table_figures(table) -> list:
    """``figures_for(table)``; an error line instead when its summary or evidence is
    not what its detector writes (a hand-edited run)."""
    from headscope.plots import figures_for

    try:
        return figures_for(table)
    except UNREADABLE as err:
        show_error(unreadable(table, err))
        return []


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, "runs")).expanduser()


@st.cache_data(show_spinner=False, ttl=30)
def run_summaries(root: str) -> list[dict[str, Any]]:
    from headscope.runs import list_runs

    return [
        {"name": s.name, "path": str(s.path), "model": s.model, "created": s.created,
         "detectors": ", ".join(s.detectors), "prompt sets": ", ".join(s.prompt_sets)}
        for s in list_runs(root)
    ]  # fmt: skip


@st.cache_resource(show_spinner=False, max_entries=8)
def _opened_run(path: str, modified: float):
    from headscope.runs import open_run

    del modified  # part of the cache key only
    return open_run(path)


def opened_run(path: str | Path):
    """The run at ``path`` (cached until its manifest changes); raises HeadscopeError."""
    manifest = Path(path) / "manifest.json"
    try:
        modified = manifest.stat().st_mtime
    except OSError as err:
        raise HeadscopeError(f"{path} is not a readable run ({err.strerror})") from None
    return _opened_run(str(Path(path).resolve()), modified)


@st.cache_resource(show_spinner=False, max_entries=2)
def model(spec: str, device: str = "cpu"):
    from headscope.probes.loading import load_model

    return load_model(spec, device=device)


@st.cache_data(show_spinner=False, max_entries=64)
def attention_on_prompt(spec: str, device: str, text: str, layer: int) -> dict[str, Any]:
    """One layer's patterns [head, query, key] on ``text``, through the TransformerLens bridge."""
    import torch

    handle = model(spec, device)
    ids = handle.encode(text, max_text_tokens=256)  # BOS first when the model wants one
    if not ids:
        raise HeadscopeError("the prompt has no tokens")
    tokens = torch.tensor([ids], device=handle.device)
    captured: dict[str, Any] = {}

    def keep(pattern, hook) -> None:
        captured["pattern"] = pattern[0].detach().float().cpu().numpy()

    with torch.inference_mode():
        handle.bridge.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keep)], return_type=None
        )
    return {"pattern": captured["pattern"], "tokens": [handle.tokenizer.decode([i]) for i in ids]}


@st.cache_data(show_spinner=False, max_entries=64)
def decoded_tokens(spec: str, device: str, token_ids: tuple[int, ...]) -> list[str]:
    """The text of each token id, with the model's own tokenizer."""
    tokenizer = model(spec, device).tokenizer
    return [tokenizer.decode([i]) for i in token_ids]


def current_run():
    """The run picked in the sidebar, or an error panel and a stop."""
    path = st.session_state.get(RUN_KEY)
    if not path:
        st.info(f"No run selected. Pick one in the sidebar (runs folder: {md(runs_dir())}).")
        st.stop()
    return checked_run(path)


def checked_run(path: str):
    """Open ``path``; a corrupt or partial run becomes an error panel, never a traceback."""
    try:
        return opened_run(path)
    except HeadscopeError as err:
        show_error(f"Cannot read the run {path}: {err}")
        st.stop()
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in any reader
        show_error(f"Cannot read the run {path}: {type(err).__name__}: {err}")
        st.stop()
