"""What the safety tables say, as rows: one reading shared by the text report, the
HTML report, the plots and the dashboard's Safety page.

The safety group (Zhou et al. 2024; Arditi et al. 2024; METHODS.md §5) writes
three head tables: ``safety_ships`` (Ships, the mean KL between the clean and
the head-ablated next-token distribution over harmful prompts), ``safety_sahara``
(the greedily grown head group whose joint ablation turns the harmful prompts'
final hidden states the most, by principal angle) and ``refusal_direction``
(each head's direct projection on the refusal direction). Their numbers beyond
the per-head scores live in ``params`` and ``summary``; the one claim that
matters, that ablating the heads makes the model answer harmful requests, lives
in ``params["generation_check"]``: refusal rates by generation, clean, under
the top-k heads, under random draws of k heads, under the Sahara group.

Every function here only reads a table; a table whose params are not what its
detector writes (a hand-edited run) raises one of ``report.UNREADABLE``, which
the callers turn into one line. Rates are fractions of prompts, shown in %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headscope.ablation_spec import head_name
from headscope.tables import HeadTable, LayerTable, tables_of

SAFETY_GROUP = "safety"
SHIPS, SAHARA, REFUSAL = "safety_ships", "safety_sahara", "refusal_direction"
SAFETY_DETECTORS = (SHIPS, SAHARA, REFUSAL)
#: the scan that writes every safety table (shown where a run has none)
SCAN_COMMAND = (
    "headscope scan --model smollm2-135m-refusal "
    "--detectors safety_ships,safety_sahara,refusal_direction"
)


@dataclass(frozen=True)
class Block:
    """One small table of a safety section: a title, column names, rows, and notes
    (sentences shown under it, such as the generation check's verdict)."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    notes: tuple[str, ...] = field(default=())


def is_safety(table: HeadTable | LayerTable) -> bool:
    """A table of the safety group (by its group, or its name in a run without groups)."""
    return isinstance(table, HeadTable) and (
        table.group == SAFETY_GROUP or (not table.group and table.detector in SAFETY_DETECTORS)
    )


def safety_tables(
    tables: Sequence[HeadTable | LayerTable], primary: Mapping[str, str] | None = None
) -> dict[str, HeadTable]:
    """{detector: its lead table} of the safety group, in run order (the primary
    prompt set's table first, as ``tables_of`` picks it)."""
    own = [t for t in tables if is_safety(t)]
    return {
        detector: tables_of(own, detector, None, primary or {})[0]
        for detector in dict.fromkeys(t.detector for t in own)
    }


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rate(value: Any) -> str:
    """A refusal rate (a fraction) as a percentage; "n/a" where none was measured."""
    return "n/a" if _missing(value) else f"{100 * float(value):.0f}%"


def change(value: Any) -> str:
    """A change of a rate (a fraction) in percentage points, signed."""
    return "n/a" if _missing(value) else f"{100 * float(value):+.1f} points"


def nats(value: Any, *, signed: bool = False) -> str:
    """A log-likelihood (or its change) in nats per token; "n/a" where none was measured."""
    return "n/a" if _missing(value) else format(float(value), "+.3f" if signed else ".3f")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value[:6]) + (", ..." if len(value) > 6 else "]")
    return str(value)


def evidence_text(evidence: Any) -> str:
    """A row's evidence in a few words (the detector's own text when it wrote one)."""
    if not isinstance(evidence, Mapping):
        return str(evidence)
    for key in ("note", "text"):
        if isinstance(evidence.get(key), str):
            return evidence[key]
    return ", ".join(f"{k} {_number(v)}" for k, v in evidence.items())


def _top_rows(table: HeadTable, top: int, score_format: str) -> list[tuple[Any, ...]]:
    return [
        (head_name(r.layer, r.head), format(float(r.score), score_format),
         "yes" if r.flagged else "", evidence_text(r.evidence))
        for r in table.top(top).itertuples()
    ]  # fmt: skip


def _flagged_count(table: HeadTable) -> str:
    return f"{int(table.frame['flagged'].sum())} of {len(table.frame)} flagged"


# --------------------------------------------------------------------------- Ships


def ships_block(table: HeadTable, top: int = 5) -> Block:
    """The top heads by Ships with their scores and evidence."""
    p = table.params
    ablation = p.get("ablation", "?")
    if ablation in ("query_scale", "query", "query_scaling") and "epsilon" in p:
        ablation = f"query x {float(p['epsilon']):g}"
    precision = p.get("precision", "float32")
    rounded = "" if precision == "float32" else f", {precision} products (not exact)"
    return Block(
        f"Ships on {table.prompt_set}: top {top} heads by mean KL(clean || ablated), nats "
        f"({_flagged_count(table)}; ablation {ablation}, {p.get('n_prompts', '?')} prompts"
        f"{rounded})",
        ("head", "Ships (nats)", "flagged", "evidence"),
        _top_rows(table, top, ".4g"),
    )


# --------------------------------------------------------------------------- Sahara


def sahara_steps(table: HeadTable) -> list[tuple[int, str, float | None, float]]:
    """(step, head added, its angle ablated alone, the group's angle) per greedy step."""
    group = list(table.params["group"])
    angles = [float(a) for a in table.params["angles_by_step"]]
    if len(group) != len(angles):
        raise ValueError(f"{len(group)} heads in the group but {len(angles)} angles by step")
    alone = {head_name(r.layer, r.head): float(r.score) for r in table.frame.itertuples()}
    return [
        (i + 1, str(h), alone.get(str(h)), a)
        for i, (h, a) in enumerate(zip(group, angles, strict=True))
    ]


def sahara_block(table: HeadTable) -> Block:
    """The Sahara group, head by head, with the angle after each step."""
    steps = sahara_steps(table)
    return Block(
        f"Sahara group on {table.prompt_set}: {', '.join(s[1] for s in steps) or 'empty'} "
        f"(greedy over {len(table.frame)} candidate heads; principal angle, degrees)",
        ("step", "head added", "angle alone", "group angle"),
        [(step, head, "" if alone is None else f"{alone:.2f}", f"{angle:.2f}")
         for step, head, alone, angle in steps],
    )  # fmt: skip


# --------------------------------------------------------------------------- refusal direction


def refusal_by_layer(table: HeadTable) -> list[tuple[int, float | None, float | None]]:
    """(layer, refusal rate with that layer's direction ablated, separation) by layer."""
    refusal = {int(k): float(v) for k, v in dict(table.summary.get("refusal_by_layer", {})).items()}
    separation = {
        int(k): float(v) for k, v in dict(table.summary.get("separation_by_layer", {})).items()
    }
    return [(layer, refusal.get(layer), separation.get(layer))
            for layer in sorted({*refusal, *separation})]  # fmt: skip


def refusal_blocks(table: HeadTable, top: int = 5) -> list[Block]:
    """The best layer, the heads that write most along its direction, the curve by layer."""
    best = table.summary["best_layer"]
    notes = []
    ablated = table.params.get("direction_ablation_refusal")
    if isinstance(ablated, int | float) and not isinstance(ablated, bool):
        p = table.params
        notes.append(
            f"refusal on {p.get('check_prompts', '?')} prompts of "
            f"{p.get('check_harmful', 'the harmful check set')}: clean "
            f"{rate(p.get('clean_refusal'))}, with the L{int(best)} direction ablated at every "
            f"layer {rate(ablated)}"
        )
    elif ablated is not None:
        notes.append(f"direction ablation: {_number(ablated)}")
    heads = Block(
        f"refusal direction on {table.prompt_set}: best layer L{int(best)}; top {top} heads by "
        f"direct projection on it, harmful minus harmless ({_flagged_count(table)})",
        ("head", "projection", "flagged", "evidence"),
        _top_rows(table, top, ".4g"),
        tuple(notes),
    )
    layers = Block(
        "refusal direction by layer: refusal rate with the layer's direction ablated, and "
        "the separation of harmful from harmless",
        ("layer", "refusal", "separation", "best"),
        [(f"L{layer}", rate(r), "" if s is None else f"{s:.4g}", "yes" if layer == best else "")
         for layer, r, s in refusal_by_layer(table)],
    )  # fmt: skip
    return [heads, layers]


# --------------------------------------------------------------------------- generation check


def generation_check(table: HeadTable) -> dict[str, Any] | None:
    """The table's generation check, or None when its detector ran without one."""
    check = table.params.get("generation_check")
    return check if isinstance(check, Mapping) and check else None


def conditions(check: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every condition of a check, clean first: name, kind, k, heads, both refusal
    rates and the harmless answer NLL (None in checks from before it was measured)."""
    clean = check["clean"]
    rows = [{"name": "clean", "kind": "clean", "k": 0, "heads": [],
             "harmful_refusal": clean["harmful_refusal"],
             "harmless_refusal": clean.get("harmless_refusal"),
             "harmless_answer_nll": clean.get("harmless_answer_nll")}]  # fmt: skip
    for c in check.get("conditions", []):
        rows.append({"name": str(c["name"]), "kind": str(c["kind"]), "k": int(c.get("k") or 0),
                     "heads": list(c.get("heads", [])), "harmful_refusal": c["harmful_refusal"],
                     "harmless_refusal": c.get("harmless_refusal"),
                     "harmless_answer_nll": c.get("harmless_answer_nll")})  # fmt: skip
    return rows


def nll_change(check: Mapping[str, Any], row: Mapping[str, Any]) -> float | None:
    """How much a condition raised the clean harmless answers' NLL (nats/token)."""
    clean = check["clean"].get("harmless_answer_nll")
    value = row.get("harmless_answer_nll")
    return None if _missing(clean) or _missing(value) else float(value) - float(clean)


def random_draws(check: Mapping[str, Any]) -> dict[int, list[float]]:
    """{k: harmful refusal rate of each random draw of k heads}."""
    draws: dict[int, list[float]] = {}
    for c in conditions(check):
        if c["kind"] == "random":
            draws.setdefault(c["k"], []).append(float(c["harmful_refusal"]))
    return draws


def _heads(k: int) -> str:
    return f"{k} head" if k == 1 else f"{k} heads"


def random_nll_changes(check: Mapping[str, Any]) -> dict[int, list[float]]:
    """{k: harmless answer NLL change of each random draw of k heads} (where measured)."""
    changes: dict[int, list[float]] = {}
    for c in conditions(check):
        value = nll_change(check, c)
        if c["kind"] == "random" and value is not None:
            changes.setdefault(c["k"], []).append(value)
    return changes


def _harmless_words(check: Mapping[str, Any], v: Mapping[str, Any]) -> str:
    """The harmless side of one verdict in words (refusal change, answer NLL, closeness)."""
    words = f"harmless refusal changes by {change(v.get('harmless_change'))}"
    if "harmless_nll_change" not in v:  # a check from before the answer NLL was measured
        return words
    words += (
        f", the clean harmless answers' NLL by {nats(v['harmless_nll_change'], signed=True)} "
        f"nats/token (random draws: median {nats(v.get('random_nll_change_median'), signed=True)}"
        f", max {nats(v.get('random_nll_change_max'), signed=True)})"
    )
    points = check.get("harmless_refusal_tolerance")
    points = "n/a" if _missing(points) else f"{100 * float(points):.0f}"
    tolerance = (
        f"close means refusal within ±{points} points and an NLL rise of at most "
        f"{nats(check.get('harmless_tolerance'))} nats/token"
    )
    close = "stays close to clean" if v.get("harmless_close") else "does NOT stay close to clean"
    holds = "the claim HOLDS" if v.get("claim_holds") else "the claim does not hold"
    return f"{words}: harmless behaviour {close} ({tolerance}), so {holds}"


def verdict_lines(check: Mapping[str, Any]) -> list[str]:
    """The verdict per k in words: does ablating the top-k heads cut refusal below
    every random draw of k heads, and do harmless answers stay close to clean."""
    clean = check["clean"]["harmful_refusal"]
    draws = random_draws(check)
    lines = []
    for k, v in sorted(dict(check.get("verdict", {})).items(), key=lambda item: int(item[0])):
        k = int(k)
        n = len(draws.get(k, []))
        if n == 0:
            against = "with no random draw of as many heads to compare against"
        else:
            below = "below every" if v["top_below_every_random"] else "NOT below every"
            against = (
                f"{below} one of {n} random draws of {_heads(k)} (min "
                f"{rate(v.get('random_min'))}, median {rate(v.get('random_median'))})"
            )
        lines.append(
            f"k={k}: ablating {v.get('condition', f'top-{k}')} ({_heads(k)}) leaves "
            f"{rate(v['top_harmful_refusal'])} of harmful prompts refused (clean "
            f"{rate(clean)}), {against}; {_harmless_words(check, v)}"
        )
    return lines


def generation_block(check: Mapping[str, Any], where: str) -> Block:
    """Refusal rates and the harmless answer NLL by condition, with the verdict per k
    and how they were judged."""
    draws = random_draws(check)
    rises = random_nll_changes(check)

    def random_row(k: int, values: list[float]) -> tuple[Any, ...]:
        nll = rises.get(k)
        nll_text = (f"median {nats(float(np.median(nll)), signed=True)}, max "
                    f"{nats(max(nll), signed=True)}") if nll else "n/a"  # fmt: skip
        return (f"random-{k} ({len(values)} draws)", f"{_heads(k)} at random",
                f"min {rate(min(values))}, median {rate(float(np.median(values)))}", "n/a",
                nll_text)  # fmt: skip

    rows = []
    for c in conditions(check):
        if c["kind"] != "random":
            nll = nats(c["harmless_answer_nll"])
            if c["kind"] != "clean" and nll_change(check, c) is not None:
                nll += f" ({nats(nll_change(check, c), signed=True)})"
            rows.append((c["name"], ", ".join(map(str, c["heads"])) or "-",
                         rate(c["harmful_refusal"]), rate(c["harmless_refusal"]), nll))  # fmt: skip
        if c["kind"] == "top" and draws.get(c["k"]):  # its random draws, summarised, next to it
            rows.append(random_row(c["k"], draws.pop(c["k"])))
    for k, values in sorted(draws.items()):  # draws of a k with no top-k condition
        rows.append(random_row(k, values))
    how = (
        f"{check.get('n_harmful', '?')} prompts of {check.get('harmful_set', '?')}, "
        f"{check.get('n_harmless', '?')} of {check.get('harmless_set', '?')}; greedy, "
        f"{check.get('max_new_tokens', '?')} new tokens; refused: {check.get('judge', '?')}; "
        "harmless answer NLL: the clean greedy answers to the harmless prompts, "
        "teacher-forced under each ablation, nats/token (change from clean in brackets)"
    )
    return Block(
        f"generation check ({where}): refusal rate by condition",
        (
            "condition",
            "heads ablated",
            "harmful refused",
            "harmless refused",
            "harmless answer NLL",
        ),
        rows,
        (*verdict_lines(check), how),
    )


#: what two checks must share for their refusal rates to be compared on one chart
_SAME_RUN = ("harmful_set", "harmless_set", "n_harmful", "n_harmless", "max_new_tokens", "judge")


def merged_checks(checks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks run the same way (Ships' top-k and Sahara's group, on the same requests)
    folded into one, so one chart shows clean, every top-k, the random draws and the
    group; checks run otherwise stay apart. A random draw both made (same k, same
    heads: the same seed) counts once; each check's verdict stays with its own table."""
    merged: list[dict[str, Any]] = []
    for check in checks:
        into = next((m for m in merged if all(m.get(k) == check.get(k) for k in _SAME_RUN)), None)
        if into is None:
            merged.append({**check, "conditions": list(check.get("conditions", [])),
                           "generations": list(check.get("generations", []))})  # fmt: skip
            continue
        names = {str(c["name"]) for c in into["conditions"]}
        draws = {(int(c["k"]), tuple(c["heads"])) for c in into["conditions"]
                 if c["kind"] == "random"}  # fmt: skip
        added = set()
        for c in check.get("conditions", []):
            if c["kind"] == "random":
                if (int(c["k"]), tuple(c["heads"])) in draws:
                    continue
                c = {**c, "name": f"{c['name']} ({len(merged)})"}
            elif str(c["name"]) in names:
                continue
            into["conditions"].append(c)
            added.add(str(c["name"]))
        into["generations"] += [g for g in check.get("generations", [])
                                if str(g["condition"]) in added]  # fmt: skip
    return merged


def generation_choices(check: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The conditions and prompt sets the check's stored generations come in, in order."""
    stored = list(check.get("generations", []))
    return (list(dict.fromkeys(str(g["condition"]) for g in stored)),
            list(dict.fromkeys(str(g["set"]) for g in stored)))  # fmt: skip


def generations(check: Mapping[str, Any], condition: str, prompt_set: str) -> list[dict]:
    """The stored generations of one condition on one set: request, text, refused."""
    return [
        {"request": str(g["request"]), "text": str(g["text"]), "refused": bool(g["refused"])}
        for g in check.get("generations", [])
        if str(g["condition"]) == condition and str(g["set"]) == prompt_set
    ]


# --------------------------------------------------------------------------- one section


def safety_blocks(table: HeadTable, top: int = 5) -> list[Block]:
    """Everything a report shows of one safety table, as blocks."""
    if table.detector == SHIPS:
        blocks = [ships_block(table, top)]
    elif table.detector == SAHARA:
        blocks = [sahara_block(table)]
    elif table.detector == REFUSAL:
        blocks = refusal_blocks(table, top)
    else:  # a safety detector added later: its top heads
        blocks = [Block(f"{table.detector} on {table.prompt_set}: top {top} "
                        f"({_flagged_count(table)})", ("head", "score", "flagged", "evidence"),
                        _top_rows(table, top, ".4g"))]  # fmt: skip
    check = generation_check(table)
    if check is not None:
        blocks.append(generation_block(check, f"{table.detector} on {table.prompt_set}"))
    return blocks
