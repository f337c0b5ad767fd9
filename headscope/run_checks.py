"""What a run must look like before anything reads it: its manifest's shape and its rows.

``open_run`` calls these so a damaged or hand-edited run fails when it is
opened, with one line that names the bad field (``tables[3].n_heads must be a
positive integer, got 'abc'``), instead of a KeyError deep inside a report or
a dashboard page. ``MANIFEST_SCHEMA`` lists every field a reader uses and
what it must be; fields it does not name, and extra fields anywhere, are
allowed, so a newer writer can add to a manifest without breaking readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from headscope.ablation_spec import head_name, layer_name

#: the most heads (layers x heads) a table or a model may have: a figure or a
#: head picker is drawn for all of them, so a damaged count must not ask for billions
MAX_HEADS = 1 << 20


@dataclass(frozen=True)
class Check:
    """A test on one value and the words an error uses for what it must be."""

    test: Callable[[Any], bool]
    words: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _or_null(check: Check) -> Check:
    return Check(lambda v: v is None or check.test(v), f"{check.words} or null")


STRING = Check(lambda v: isinstance(v, str), "a string")
OBJECT = Check(lambda v: isinstance(v, dict), "a JSON object")
LIST = Check(lambda v: isinstance(v, list), "a list")
NUMBER = Check(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number")
COUNT = Check(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = Check(lambda v: _is_int(v) and v > 0, "a positive integer")
NAME_OR_OBJECT = Check(lambda v: isinstance(v, str | dict), "a name or a JSON object")
TABLE_KIND = Check(lambda v: v in ("head", "layer"), "'head' or 'layer'")

#: (path, check) for every manifest field a reader uses. ``a.b`` is field b of
#: object a, ``a[]`` every item of list a, ``a.*`` every value of object a; a
#: trailing ``?`` marks a field that may be absent. A parent comes before its
#: children; a check on a child applies only where the parent has the right type.
MANIFEST_SCHEMA: tuple[tuple[str, Check], ...] = (
    ("schema_version", POSITIVE),
    ("created", STRING),
    ("format?", STRING),
    ("kind?", STRING),
    ("versions?", OBJECT),
    ("versions.*", STRING),
    ("model?", OBJECT),
    ("model.spec?", STRING),
    ("model.source?", STRING),
    ("model.arch?", OBJECT),
    ("model.arch.family?", STRING),
    *(
        (f"model.arch.{name}?", POSITIVE)
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "vocab_size")
    ),
    ("model.arch.max_positions?", _or_null(POSITIVE)),
    ("model.arch.bos_token_id?", _or_null(COUNT)),
    ("prompt_sets?", LIST),
    ("prompt_sets[]", NAME_OR_OBJECT),
    ("prompt_sets[].name", STRING),
    ("prompt_sets[].description?", STRING),
    ("prompt_sets[].n_prompts?", COUNT),
    ("prompt_sets[].lengths?", LIST),
    ("prompt_sets[].lengths[]", COUNT),
    ("detectors?", LIST),
    ("detectors[]", OBJECT),
    ("detectors[].name", STRING),
    ("detectors[].role?", STRING),
    ("detectors[].primary_prompt_set?", _or_null(STRING)),
    ("detectors[].group?", STRING),
    ("detectors[].params?", OBJECT),
    ("tables", LIST),
    ("tables[]", OBJECT),
    ("tables[].kind", TABLE_KIND),
    ("tables[].detector", STRING),
    ("tables[].prompt_set", STRING),
    ("tables[].n_layers", POSITIVE),
    ("tables[].n_heads?", POSITIVE),  # required of head tables: see _tables_problem
    ("tables[].params?", OBJECT),
    ("tables[].summary?", OBJECT),
    ("tables[].description?", STRING),
    ("tables[].group?", STRING),
    ("config?", OBJECT),
    ("timing?", OBJECT),
    ("timing.*", _or_null(NUMBER)),
    ("skipped?", LIST),
    ("skipped[]", OBJECT),
    ("skipped[].detector", STRING),
    ("skipped[].reason", STRING),
)

_MISSING = object()
_STEP = re.compile(r"\[\]|[^.\[\]]+")


def shown(value: Any, width: int = 60) -> str:
    """A value for an error message: its repr on one line, shortened."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _key_label(label: str, key: Any) -> str:
    key = str(key)
    if key.isidentifier():
        return f"{label}.{key}" if label else key
    return f"{label}[{json.dumps(key)}]"


def _walk(value: Any, steps: list[str], label: str) -> Iterator[tuple[str, Any]]:
    """(label, value) of everything ``steps`` reach from ``value``; a missing last field
    gives ``_MISSING``. A step that does not fit the value's type reaches nothing."""
    if not steps:
        yield label, value
        return
    step, rest = steps[0], steps[1:]
    if step == "[]":
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield from _walk(item, rest, f"{label}[{i}]")
    elif step == "*":
        if isinstance(value, dict):
            for key, item in value.items():
                yield from _walk(item, rest, _key_label(label, key))
    elif isinstance(value, dict):
        if step in value:
            yield from _walk(value[step], rest, _key_label(label, step))
        elif not rest:
            yield _key_label(label, step), _MISSING


def _field_problem(manifest: Mapping[str, Any], path: str, check: Check) -> str | None:
    optional = path.endswith("?")
    for label, value in _walk(manifest, _STEP.findall(path.removesuffix("?")), ""):
        if value is _MISSING:
            if not optional:
                return f"lacks the field {label}"
        elif not check.test(value):
            return f"field {label} must be {check.words}, got {shown(value)}"
    return None


def _size_problem(label: str, n_layers: Any, n_heads: Any) -> str | None:
    if _is_int(n_layers) and _is_int(n_heads) and n_layers * n_heads > MAX_HEADS:
        return (
            f"field {label} describes {n_layers} x {n_heads} heads; "
            f"headscope reads at most {MAX_HEADS}"
        )
    return None


def _tables_problem(tables: list[dict[str, Any]]) -> str | None:
    seen = set()
    for i, entry in enumerate(tables):
        if entry["kind"] == "head":
            if "n_heads" not in entry:
                return f"lacks the field tables[{i}].n_heads (a head table)"
            problem = _size_problem(f"tables[{i}]", entry["n_layers"], entry["n_heads"])
            if problem:
                return problem
        key = (entry["kind"], entry["detector"], entry["prompt_set"])
        if key in seen:
            return (
                f"lists two {key[0]} tables of {shown(key[1])} on {shown(key[2])} "
                f"(the second is tables[{i}])"
            )
        seen.add(key)
    return None


def manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest, as the end of a sentence; None when nothing.

    The caller checks for a newer schema version first: a newer run may have
    another shape, and then the fix is a newer headscope, not a repair.
    """
    if not isinstance(manifest, dict):
        return f"is not a JSON object (it holds {type(manifest).__name__})"
    for path, check in MANIFEST_SCHEMA:
        problem = _field_problem(manifest, path, check)
        if problem:
            return problem
    arch = manifest.get("model", {}).get("arch", {})
    problem = _size_problem("model.arch", arch.get("n_layers"), arch.get("n_heads"))
    return problem or _tables_problem(manifest["tables"])


# --------------------------------------------------------------------------- rows


def columns_problem(frame: pd.DataFrame, columns: tuple[str, ...]) -> str | None:
    """Whether the columns of a heads/layers file hold what tables need."""
    for column in ("detector", "prompt_set"):
        if not frame[column].map(lambda v: isinstance(v, str)).all():
            return f"column {column} must hold strings"
    for column in ("layer", "head"):
        if column not in columns:
            continue
        values = frame[column]
        if not pd.api.types.is_integer_dtype(values) or values.isna().any():
            return f"column {column} must hold integers, it holds {values.dtype}"
    score = frame["score"]
    if not pd.api.types.is_numeric_dtype(score) or pd.api.types.is_bool_dtype(score):
        return f"column score must hold numbers, it holds {score.dtype}"
    if not pd.api.types.is_bool_dtype(frame["flagged"]):
        return f"column flagged must hold true/false, it holds {frame['flagged'].dtype}"
    return None


def rows_problem(frame: pd.DataFrame, entry: Mapping[str, Any]) -> str | None:
    """Whether the rows of one manifest table fit it: every layer (and head) in
    range, each at most once."""
    mine = frame[
        (frame["detector"] == entry["detector"]) & (frame["prompt_set"] == entry["prompt_set"])
    ]
    where = f"rows of {shown(entry['detector'])} on {shown(entry['prompt_set'])}"
    keys = ["layer"]
    limits = {"layer": entry["n_layers"]}
    if entry["kind"] == "head":
        keys.append("head")
        limits["head"] = entry["n_heads"]
    for column, limit in limits.items():
        outside = mine[(mine[column] < 0) | (mine[column] >= limit)]
        if len(outside):
            return (
                f"{where} have {column} {int(outside[column].iloc[0])}, outside 0..{limit - 1} "
                f"(the manifest says {limit} {column}s)"
            )
    repeated = mine[mine.duplicated(keys)]
    if len(repeated):
        first = repeated.iloc[0]
        name = (
            head_name(first["layer"], first["head"])
            if "head" in keys
            else layer_name(first["layer"])
        )
        return f"{where} hold {name} twice"
    return None
