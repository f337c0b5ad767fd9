"""Typed results of the analyses: one row per head (HeadTable) or per layer (LayerTable).

Every detector returns one of these instead of a bare tensor, so that "not
scored" is an absent row rather than a magic -1, and the threshold and
parameters that produced a flag travel with the scores (in ``params``).
Table-level figures such as a model's sink rate go in ``summary``.
"""

from __future__ import annotations

import html
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from headscope.errors import HeadscopeError

HEAD_COLUMNS = ("layer", "head", "score", "flagged", "evidence")
LAYER_COLUMNS = ("layer", "score", "flagged", "evidence")


def _check_frame(frame: pd.DataFrame, columns: tuple[str, ...], kind: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HeadscopeError(f"{kind} frame lacks columns {missing}; it needs {list(columns)}")
    frame = frame.loc[:, list(columns)].copy()
    frame["layer"] = frame["layer"].astype("int64")
    if "head" in columns:
        frame["head"] = frame["head"].astype("int64")
    frame["score"] = frame["score"].astype("float64")
    frame["flagged"] = frame["flagged"].astype(bool)
    return frame.reset_index(drop=True)


def _jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and arrays so json.dumps accepts them."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _short(value: Any) -> str:
    """A summary value for display: numbers to 4 significant digits, the rest as text."""
    if isinstance(value, int | float | np.number) and not isinstance(value, bool):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, kw_only=True)
class _Table:
    """What every table holds besides its rows.

    ``detector`` and ``group`` are stamped by the registry when a detector
    runs (``headscope.analyses.registry``); a detector function leaves them empty.
    """

    prompt_set: str
    frame: pd.DataFrame
    detector: str = ""
    group: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def metadata(self) -> dict[str, Any]:
        """Everything but the rows, as plain JSON-able values (for run manifests)."""
        return {
            "detector": self.detector,
            "group": self.group,
            "prompt_set": self.prompt_set,
            "params": _jsonable(dict(self.params)),
            "summary": _jsonable(dict(self.summary)),
            "description": self.description,
        }

    def flagged(self) -> pd.DataFrame:
        return self.frame[self.frame["flagged"]].sort_values("score", ascending=False)

    def top(self, n: int = 5) -> pd.DataFrame:
        return self.frame.sort_values("score", ascending=False).head(n)

    def _repr_html_(self) -> str:
        summary = ", ".join(f"{k} = {_short(v)}" for k, v in self.summary.items())
        head = (
            f"<b>{html.escape(self.detector)}</b> on <i>{html.escape(self.prompt_set)}</i>"
            f" ({int(self.frame['flagged'].sum())} flagged of {len(self.frame)})"
            + (f"<br>{html.escape(summary)}" if summary else "")
        )
        return head + self.top(10).drop(columns=["evidence"]).to_html(index=False)


@dataclass(frozen=True, kw_only=True)
class HeadTable(_Table):
    """Scores of one detector on one prompt set: a row per (layer, head).

    ``frame`` columns: layer, head, score (float), flagged (bool), evidence
    (a dict per row with the numbers behind the score).
    """

    n_layers: int
    n_heads: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "frame", _check_frame(self.frame, HEAD_COLUMNS, "HeadTable"))

    def matrix(self) -> np.ndarray:
        """Scores as a [layer, head] array; NaN where a head has no row."""
        out = np.full((self.n_layers, self.n_heads), np.nan)
        out[self.frame["layer"].to_numpy(), self.frame["head"].to_numpy()] = self.frame["score"]
        return out

    def score(self, layer: int, head: int) -> float:
        row = self.frame[(self.frame["layer"] == layer) & (self.frame["head"] == head)]
        if row.empty:
            raise KeyError(f"no row for L{layer}H{head} in {self.detector}")
        return float(row["score"].iloc[0])

    @classmethod
    def from_matrix(
        cls,
        scores: np.ndarray,
        flagged: np.ndarray,
        evidence: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> HeadTable:
        """Build a table from [layer, head] arrays of scores and flags."""
        scores = np.asarray(scores, dtype=np.float64)
        n_layers, n_heads = scores.shape
        layers, heads = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        frame = pd.DataFrame(
            {
                "layer": layers.ravel(),
                "head": heads.ravel(),
                "score": scores.ravel(),
                "flagged": np.asarray(flagged, dtype=bool).ravel(),
                "evidence": evidence if evidence is not None else [{}] * scores.size,
            }
        )
        return cls(frame=frame, n_layers=n_layers, n_heads=n_heads, **kwargs)


@dataclass(frozen=True, kw_only=True)
class LayerTable(_Table):
    """Scores of one detector on one prompt set: a row per layer."""

    n_layers: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "frame", _check_frame(self.frame, LAYER_COLUMNS, "LayerTable"))


def evidence_to_json(evidence: Any) -> str:
    return json.dumps(_jsonable(evidence), sort_keys=True)


def evidence_from_json(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}


Table = HeadTable | LayerTable


def primary_prompt_sets(manifest: Mapping[str, Any]) -> dict[str, str]:
    """{detector: the prompt set it is defined on}, as a scan's manifest records it."""
    detectors = manifest.get("detectors", [])
    return {
        d["name"]: d["primary_prompt_set"]
        for d in (detectors if isinstance(detectors, list) else [])
        if isinstance(d, dict)
        and isinstance(d.get("name"), str)
        and isinstance(d.get("primary_prompt_set"), str)
    }


def tables_of(
    tables: list[Table], detector: str, prompt_set: str | None, primary: Mapping[str, str]
) -> list[Table]:
    """``detector``'s tables (on ``prompt_set`` when given), the one on its primary
    prompt set first, then in the order they were made. The one rule for which
    table stands for a detector: lookups, reports and the dashboard use it."""
    own = [t for t in tables if t.detector == detector]
    if prompt_set is not None:
        return [t for t in own if t.prompt_set == prompt_set]
    lead = primary.get(detector)
    return sorted(own, key=lambda t: t.prompt_set != lead)


class TableLookup(ABC):
    """``table``/``head_table``/``layer_table``/``in_group`` for a scan's result and a run.

    Subclasses give ``manifest`` and ``_tables()`` (every table, in the order
    written) and ``_where()`` (how error messages name them).
    """

    manifest: Mapping[str, Any]

    @abstractmethod
    def _tables(self) -> list[Table]: ...

    @abstractmethod
    def _where(self) -> str: ...

    def table(self, detector: str, prompt_set: str | None = None, *, kind: type = _Table) -> Table:
        """The table of ``detector`` (or of a table name such as "block_influence").

        On ``prompt_set`` when given; without one: the only table, else the one
        on the detector's primary prompt set; several others are an error that
        lists them.
        """
        every = [t for t in self._tables() if isinstance(t, kind)]
        primary = primary_prompt_sets(self.manifest)
        found = tables_of(every, detector, prompt_set, primary)
        if found and (prompt_set is not None or len(found) == 1 or
                      found[0].prompt_set == primary.get(detector)):  # fmt: skip
            return found[0]
        what = {HeadTable: "head table", LayerTable: "layer table"}.get(kind, "table")
        wanted = detector if prompt_set is None else f"{detector}/{prompt_set}"
        skipped = self.manifest.get("skipped", [])
        reason = next(
            (s.get("reason") for s in (skipped if isinstance(skipped, list) else [])
             if isinstance(s, dict) and s.get("detector") == detector),
            None,
        )  # fmt: skip
        if not found and reason is not None:
            raise HeadscopeError(f"detector '{detector}' was skipped: {reason}")
        stored = ", ".join(f"{t.detector}/{t.prompt_set}" for t in every) or "none"
        problem = f"no {what}" if not found else f"several {what}s; name a prompt set"
        raise HeadscopeError(f"{problem} for {wanted} in {self._where()}; stored: {stored}")

    def head_table(self, detector: str, prompt_set: str | None = None) -> HeadTable:
        """``table`` among the head tables."""
        return self.table(detector, prompt_set, kind=HeadTable)

    def layer_table(self, detector: str, prompt_set: str | None = None) -> LayerTable:
        """``table`` among the layer tables."""
        return self.table(detector, prompt_set, kind=LayerTable)

    def in_group(self, group: str) -> list[Table]:
        """Every table of a detector group ("sinks", "roles", ...), in the order written."""
        return [t for t in self._tables() if t.group == group]
