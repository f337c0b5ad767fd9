"""Safety: the run's safety heads (Ships, the Sahara group, the refusal direction) and the
generation check that says whether ablating them makes the model answer harmful requests.

Everything shown is read from the safety tables (``headscope.safety_summary``);
nothing is generated here. A table whose params are not what its detector
writes gets one error line; the rest of the page is still drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from headscope.dashboard.data import current_run, md, show_error
from headscope.plots import head_heatmap, refusal_layers, refusal_rates, sahara_angles
from headscope.report import UNREADABLE, unreadable
from headscope.safety_summary import (
    REFUSAL,
    SAHARA,
    SCAN_COMMAND,
    SHIPS,
    Block,
    generation_block,
    generation_check,
    generation_choices,
    generations,
    merged_checks,
    refusal_blocks,
    safety_tables,
    sahara_block,
    ships_block,
)
from headscope.tables import HeadTable, primary_prompt_sets


def _block(block: Block) -> None:
    st.caption(md(block.title))
    st.dataframe(pd.DataFrame(block.rows, columns=list(block.columns)), hide_index=True)
    for note in block.notes:
        st.markdown(f"- {md(note)}")


def _section(table: HeadTable, draw: Callable[[HeadTable], None]) -> None:
    """Draw one table's part; a hand-edited table becomes one error line."""
    if table.description:
        st.caption(md(table.description))
    try:
        draw(table)
    except UNREADABLE as err:
        show_error(unreadable(table, err))


def _ships(table: HeadTable) -> None:
    st.plotly_chart(head_heatmap(table, score_label="Ships (nats)"), key="ships_heatmap")
    _block(ships_block(table, top))


def _sahara(table: HeadTable) -> None:
    st.plotly_chart(sahara_angles(table), key="sahara_angles")
    _block(sahara_block(table))


def _refusal(table: HeadTable) -> None:
    columns = st.columns(2)
    with columns[0]:
        st.plotly_chart(head_heatmap(table, score_label="projection"), key="refusal_heatmap")
    with columns[1]:
        st.plotly_chart(refusal_layers(table), key="refusal_layers")
    for block in refusal_blocks(table, top):
        _block(block)


def _generations(check: dict, key: str) -> None:
    """The stored generations one click away: pick a condition and a set."""
    st.markdown("**Generations**")
    names, sets = generation_choices(check)
    if not names:
        st.caption("The check stored no generations.")
        return
    left, right = st.columns(2)
    condition = left.selectbox("condition", names, key=f"gen_condition_{key}")
    prompt_set = right.selectbox("prompts", sets, key=f"gen_set_{key}")
    shown = generations(check, condition, prompt_set)
    if shown:
        st.dataframe(pd.DataFrame(shown), hide_index=True)
    else:
        st.caption(md(f"No stored generation of {condition} on the {prompt_set} prompts."))


def _generation_checks(tables: list[HeadTable]) -> None:
    """One chart per set of checks run the same way (Ships' top-k beside Sahara's group),
    each table's verdict in words, then the generations."""
    checks = merged_checks([generation_check(t) for t in tables])
    for i, check in enumerate(checks):
        title = "refusal rate under ablation" + (f" ({i + 1})" if len(checks) > 1 else "")
        st.plotly_chart(refusal_rates(check, title=title), key=f"rates_{i}")
    for table in tables:
        _block(generation_block(generation_check(table), f"{table.detector} on {table.prompt_set}"))
    for i, check in enumerate(checks):
        _generations(check, str(i))


run = current_run()
st.title("Safety heads")
found = safety_tables(run.head_tables(), primary_prompt_sets(run.manifest))
if not found:
    st.info(f"This run has no safety tables. Produce them with `{SCAN_COMMAND}`")
    st.code(SCAN_COMMAND, language="bash")
    st.stop()
top = int(st.number_input("heads listed per table", 1, 50, 5))

st.header("Ships: heads the refusal depends on")
if SHIPS in found:
    _section(found[SHIPS], _ships)
else:
    st.caption("No safety_ships table in this run.")
st.header("Sahara: the head group that turns the harmful states")
if SAHARA in found:
    _section(found[SAHARA], _sahara)
else:
    st.caption("No safety_sahara table in this run.")
st.header("Refusal direction")
if REFUSAL in found:
    _section(found[REFUSAL], _refusal)
else:
    st.caption("No refusal_direction table in this run.")

st.header("Generation check: does ablating the heads remove refusal?")
checked = [table for table in found.values() if generation_check(table) is not None]
if not checked:
    st.caption(
        "No generation check in this run (it runs with the safety detectors' generation "
        "option; without it, the head scores are not tested against refusal)."
    )
try:
    _generation_checks(checked)
except UNREADABLE as err:
    show_error(unreadable(checked[0], err) if len(checked) == 1 else
               f"the generation checks are not readable ({type(err).__name__}: {err})")  # fmt: skip
