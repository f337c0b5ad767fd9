"""The detector registry: every analysis reachable by name, declared once.

A detector is one module (its function) and one registration block in
``headscope/analyses/__init__.py``; nothing else names it. The block says what
the detector is (name, role, group, primary prompt set, what it reads); its
parameters and their defaults are the function's keyword-only signature, read
here, so they cannot drift from the code. Running a detector through its
``Detector`` stamps the detector's name and group on every table it returns
and checks them, so the function itself never writes its own name.

Registering a name twice is an error rather than a silent override, and no
detector is ever looked up by building a function name from a string.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headscope.errors import HeadscopeError
from headscope.progress import Progress
from headscope.tables import HeadTable, LayerTable

#: what a detector reads; see ``Detector``
CAPTURES = ("streaming", "patterns", "model", "tables")
#: where a detector's tables are shown: the dashboard's pages, the report's
#: sections and the tests select tables by group, never by lists of names
GROUPS = ("sinks", "roles", "importance", "redundancy", "families", "safety")
#: what a scan passes to every model experiment; not a parameter of the detector
EXPERIMENT_ARGUMENTS = ("stats_by_set", "batch_size", "on_progress")
#: the positional parameters each capture's function takes, in order
POSITIONAL = {
    "streaming": ("stats",),
    "patterns": ("stats",),
    "model": ("handle",),
    "tables": ("tables", "stats_by_set"),
}


def keyword_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """A function's keyword-only parameters and their defaults, less what the
    scan passes to every experiment: the detector's parameters."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in EXPERIMENT_ARGUMENTS
    }


def _check_signature(name: str, function: Callable[..., Any], capture: str) -> None:
    """The function's signature is the detector's declaration: hold it to the contract."""
    parameters = inspect.signature(function).parameters.values()
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) != len(POSITIONAL[capture]):
        raise TypeError(
            f"detector '{name}' ({capture}) must take {len(POSITIONAL[capture])} positional "
            f"argument(s) {POSITIONAL[capture]}, not {positional}"
        )
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD or p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"detector '{name}' must spell out its parameters, not '{p}'")
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty:
            raise TypeError(f"parameter '{p.name}' of detector '{name}' needs a default")
    keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if capture == "model" and not set(EXPERIMENT_ARGUMENTS) <= keywords:
        missing = sorted(set(EXPERIMENT_ARGUMENTS) - keywords)
        raise TypeError(f"model experiment '{name}' must accept the keyword(s) {missing}")


@dataclass(frozen=True, kw_only=True)
class Detector:
    """A named analysis returning HeadTables or LayerTables.

    ``group`` (one of ``GROUPS``) says where its tables are shown.
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
      batch_size, on_progress, **params)``, run once per scan; ``stats_by_set``
      holds the scan's streaming statistics, which it may reuse;
    - "tables": an analysis of what the other detectors found (head
      families): ``function(tables, stats_by_set, **params)``, run once after
      every other detector, with their tables and the streaming statistics.

    A detector returns one table, which gets the detector's name; or, when
    ``tables`` lists names, a list of tables each carrying one of those names
    (layer redundancy measures five things at once).

    ``defaults`` (read-only) are the function's keyword-only parameters.
    ``opt_in`` experiments are too slow for every scan (head importance runs
    one forward per head): they run when named, or with "all", not by default.
    """

    name: str
    role: str
    group: str
    function: Callable[..., Any]
    primary_prompt_set: str
    description: str
    capture: str = "streaming"
    across_prompt_sets: bool = False
    opt_in: bool = False
    tables: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got '{self.capture}'")
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got '{self.group}'")
        if self.across_prompt_sets and self.capture in ("model", "tables"):
            raise ValueError(
                f"a '{self.capture}' detector runs once per scan; across_prompt_sets is moot"
            )
        _check_signature(self.name, self.function, self.capture)
        object.__setattr__(self, "defaults", keyword_defaults(self.function))

    @property
    def table_names(self) -> tuple[str, ...]:
        """The names of the tables this detector writes."""
        return self.tables or (self.name,)

    def resolve_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults with ``params`` applied; a name the detector does not take is an error."""
        return self._params(params)

    def _params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise HeadscopeError(
                f"detector '{self.name}' has no parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.defaults)}"
            )
        return {**self.defaults, **params}

    def _stamp(self, found: Any) -> Any:
        """The function's table (or, with ``tables``, its list of tables) with this
        detector's name and group stamped on, checked against the declaration."""
        if not self.tables:
            if not isinstance(found, HeadTable | LayerTable) or found.detector not in (
                "",
                self.name,
            ):
                raise TypeError(f"detector '{self.name}' must return one table of its own")
            return dataclasses.replace(found, detector=self.name, group=self.group)
        if not isinstance(found, list) or not all(
            isinstance(t, HeadTable | LayerTable) for t in found
        ):
            raise TypeError(f"detector '{self.name}' must return a list of tables")
        stray = [t.detector for t in found if t.detector not in self.tables]
        if stray:
            raise TypeError(f"detector '{self.name}' returned tables {stray} it does not declare")
        return [dataclasses.replace(t, group=self.group) for t in found]

    def run(self, stats: Any, **params: Any) -> Any:
        """Run on probe statistics (one set's, or ``{set: stats}`` when across sets)."""
        if self.capture in ("model", "tables"):
            use = "run_experiment" if self.capture == "model" else "run_tables"
            raise TypeError(f"'{self.name}' is a '{self.capture}' detector; use {use}")
        return self._stamp(self.function(stats, **self._params(params)))

    def run_tables(self, tables: Any, stats_by_set: Mapping[str, Any], **params: Any) -> Any:
        """Run a "tables" analysis on other detectors' tables and the streaming statistics."""
        if self.capture != "tables":
            raise TypeError(f"'{self.name}' does not read tables")
        return self._stamp(self.function(list(tables), dict(stats_by_set), **self._params(params)))

    def run_experiment(
        self,
        handle: Any,
        *,
        stats_by_set: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        on_progress: Progress | None = None,
        **params: Any,
    ) -> Any:
        """Run a "model" experiment on ``handle``."""
        if self.capture != "model":
            raise TypeError(f"'{self.name}' reads probe statistics; use run")
        found = self.function(
            handle,
            stats_by_set=dict(stats_by_set or {}),
            batch_size=batch_size,
            on_progress=on_progress,
            **self._params(params),
        )
        return self._stamp(found)


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


def all_detectors() -> list[Detector]:
    """Every registered detector, in registration order."""
    return list(_REGISTRY.values())


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
