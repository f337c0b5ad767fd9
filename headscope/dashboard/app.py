"""headscope dashboard: ``streamlit run headscope/dashboard/app.py`` (or ``headscope dashboard``).

The sidebar picks the run every page reads (from the runs folder named by
HEADSCOPE_RUNS_DIR); each page is a file in ``views/``. Adding a page is one
``st.Page`` line below and one file.

A page never shows a traceback: a HeadscopeError (a damaged run, a model that
will not load) becomes an error panel with its one line, and so does, as a
last resort, anything else a page raises (its traceback goes to the log).
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

from headscope.dashboard.data import RUN_KEY, md, run_summaries, runs_dir, show_error
from headscope.errors import HeadscopeError

VIEWS = Path(__file__).parent / "views"
PAGES = [
    st.Page(VIEWS / "runs.py", title="Runs", url_path="runs", default=True),
    st.Page(VIEWS / "overview.py", title="Overview", url_path="overview"),
    st.Page(VIEWS / "head.py", title="Head", url_path="head"),
    st.Page(VIEWS / "sinks.py", title="Sinks", url_path="sinks"),
    st.Page(VIEWS / "roles.py", title="Roles", url_path="roles"),
    st.Page(VIEWS / "redundancy.py", title="Redundancy", url_path="redundancy"),
    st.Page(VIEWS / "safety.py", title="Safety", url_path="safety"),
    st.Page(VIEWS / "export.py", title="Export", url_path="export"),
]

st.set_page_config(page_title="headscope", layout="wide")
navigation = st.navigation(PAGES)

with st.sidebar:
    st.markdown("### headscope")
    summaries = run_summaries(str(runs_dir()))
    paths = [s["path"] for s in summaries]
    if st.session_state.get(RUN_KEY) not in paths and paths:
        st.session_state[RUN_KEY] = paths[0]
    if paths:
        st.selectbox(
            "run",
            paths,
            key=RUN_KEY,
            format_func=lambda p: next(f"{s['name']} ({s['model']})" for s in summaries
                                       if s["path"] == p),
        )  # fmt: skip
    else:
        st.caption(f"no runs under {md(runs_dir())}")

try:
    navigation.run()
except HeadscopeError as err:
    show_error(err)
except Exception as err:  # noqa: BLE001 - a damaged run can fail a page anywhere
    logging.getLogger("headscope.dashboard").exception("page failed")
    show_error(f"This page failed: {type(err).__name__}: {err}")
