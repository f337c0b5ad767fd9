"""headscope dashboard: ``streamlit run headscope/dashboard/app.py`` (or ``headscope dashboard``).

The sidebar picks the run every page reads (from the runs folder named by
HEADSCOPE_RUNS_DIR); each page is a file in ``views/``. Adding a page is one
``st.Page`` line below and one file.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from headscope.dashboard.data import RUN_KEY, run_summaries, runs_dir

VIEWS = Path(__file__).parent / "views"
PAGES = [
    st.Page(VIEWS / "runs.py", title="Runs", url_path="runs", default=True),
    st.Page(VIEWS / "overview.py", title="Overview", url_path="overview"),
    st.Page(VIEWS / "head.py", title="Head", url_path="head"),
    st.Page(VIEWS / "sinks.py", title="Sinks", url_path="sinks"),
    st.Page(VIEWS / "roles.py", title="Roles", url_path="roles"),
    st.Page(VIEWS / "redundancy.py", title="Redundancy", url_path="redundancy"),
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
        st.caption(f"no runs under {runs_dir()}")

navigation.run()
