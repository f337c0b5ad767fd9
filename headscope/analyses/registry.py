"""The detector registry: every analysis reachable by name, registered once.

Registration is explicit and happens in one place (``headscope/analyses/__init__.py``),
so the list of detectors can be read in one screen; registering a name twice is
an error rather than a silent override. No detector is ever looked up by
building a function name from a string.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headscope.errors import HeadscopeError


@dataclass(frozen=True, kw_only=True)
class Detector:
    """A named analysis returning a HeadTable or LayerTable.

    ``primary_prompt_set`` is the built-in prompt set on which the role is
    defined (induction on repeated random tokens, sinks on prose); reports lead
    with it. ``capture`` names what it reads:

    - "streaming" (kernels, memory linear in T) or "patterns" (TransformerLens
      full patterns, reduced per layer; for token-aware scores such as the
      classic heads): ``function(stats, **params)``, run once per prompt set,
      or, with ``across_prompt_sets``, once with ``{prompt set: stats}`` (for
      comparisons between domains);
    - "model": an experiment that runs the model itself on its own inputs
      (perplexity under an intervention): ``function(handle, *, stats_by_set,
      batch_size, on_batch, **params)``, run once per scan; ``stats_by_set``
      holds the scan's streaming statistics, which it may reuse;
    - "tables": an analysis of what the other detectors found (head
      families): ``function(tables, stats_by_set, **params)``, run once after
      every other detector, with their tables and the streaming statistics.

    A detector returns one table named after it, or, when ``tables`` lists
    names, one table per name (layer redundancy measures five at once).

    ``defaults`` are the parameters used when the caller gives none.
    ``opt_in`` experiments are too slow for every scan (head importance runs
    one forward per head): they run when named, or with "all", not by default.
    """

    name: str
    role: str
    function: Callable[..., Any]
    primary_prompt_set: str
    description: str
    capture: str = "streaming"
    across_prompt_sets: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    opt_in: bool = False
    tables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got '{self.capture}'")
        if self.across_prompt_sets and self.capture in ("model", "tables"):
            raise ValueError(
                f"a '{self.capture}' detector runs once per scan; across_prompt_sets is moot"
            )

    @property
    def table_names(self) -> tuple[str, ...]:
        """The names of the tables this detector writes."""
        return self.tables or (self.name,)

    def _params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise HeadscopeError(
                f"detector '{self.name}' has no parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.defaults)}"
            )
        return {**self.defaults, **params}

    def run(self, stats: Any, **params: Any):
        """Run on probe statistics (one set's, or ``{set: stats}`` when across sets)."""
        if self.capture in ("model", "tables"):
            use = "run_experiment" if self.capture == "model" else "run_tables"
            raise TypeError(f"'{self.name}' is a '{self.capture}' detector; use {use}")
        return self.function(stats, **self._params(params))

    def run_tables(self, tables: Any, stats_by_set: Mapping[str, Any], **params: Any):
        """Run a "tables" analysis on other detectors' tables and the streaming statistics."""
        if self.capture != "tables":
            raise TypeError(f"'{self.name}' does not read tables")
        return self.function(list(tables), dict(stats_by_set), **self._params(params))

    def run_experiment(
        self,
        handle: Any,
        *,
        stats_by_set: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
        **params: Any,
    ):
        """Run a "model" experiment on ``handle``."""
        if self.capture != "model":
            raise TypeError(f"'{self.name}' reads probe statistics; use run")
        return self.function(
            handle,
            stats_by_set=dict(stats_by_set or {}),
            batch_size=batch_size,
            on_batch=on_batch,
            **self._params(params),
        )


CAPTURES = ("streaming", "patterns", "model", "tables")
#: what a scan passes to every model experiment; not a parameter of the detector
EXPERIMENT_ARGUMENTS = ("stats_by_set", "batch_size", "on_batch")


def keyword_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """A detector's ``defaults``: its keyword-only parameters and their defaults, less
    what the scan passes to every experiment."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in EXPERIMENT_ARGUMENTS
    }


_REGISTRY: dict[str, Detector] = {}


def register_detector(detector: Detector) -> Detector:
    """Add ``detector``; a second detector or table with the same name is an error."""
    if detector.name in _REGISTRY:
        raise ValueError(f"detector '{detector.name}' is already registered")
    taken = {name for d in _REGISTRY.values() for name in (d.name, *d.table_names)}
    clash = taken & {detector.name, *detector.table_names}
    if clash:
        raise ValueError(f"table name(s) {sorted(clash)} of '{detector.name}' are already taken")
    _REGISTRY[detector.name] = detector
    return detector


def get_detector(name: str) -> Detector:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HeadscopeError(
            f"unknown detector '{name}'; available: {', '.join(detector_names())}"
        ) from None


def detector_names() -> list[str]:
    return list(_REGISTRY)


def resolve_detectors(names: str | list[str] | tuple[str, ...] | None) -> list[Detector]:
    """Detectors for a comma-separated string or list.

    None or "default": every detector but the opt-in ones; "all": every one.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if names is not None:
        names = [n for n in names if n]
        if not names:
            raise HeadscopeError(f"no detector named; choose from: {', '.join(detector_names())}")
    if names is None or names == ["default"]:
        return [d for d in _REGISTRY.values() if not d.opt_in]
    if names == ["all"]:
        return list(_REGISTRY.values())
    return [get_detector(n) for n in dict.fromkeys(names)]
