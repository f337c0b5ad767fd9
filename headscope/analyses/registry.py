"""The detector registry: every analysis reachable by name, registered once.

Registration is explicit and happens in one place (``headscope/analyses/__init__.py``),
so the list of detectors can be read in one screen; registering a name twice is
an error rather than a silent override. No detector is ever looked up by
building a function name from a string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headscope.errors import HeadscopeError


@dataclass(frozen=True, kw_only=True)
class Detector:
    """A named analysis: ``function(stats, **params) -> HeadTable``.

    ``primary_prompt_set`` is the built-in prompt set on which the role is
    defined (induction on repeated random tokens, sinks on prose); reports lead
    with it. ``capture`` names the probe whose statistics it reads:
    "streaming" (kernels, memory linear in T) or "patterns" (TransformerLens
    full patterns, reduced per layer; for token-aware scores such as the
    classic heads). ``defaults`` are the parameters used when the caller gives none.
    """

    name: str
    role: str
    function: Callable[..., Any]
    primary_prompt_set: str
    description: str
    capture: str = "streaming"
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got '{self.capture}'")

    def run(self, stats: Any, **params: Any):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise HeadscopeError(
                f"detector '{self.name}' has no parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.defaults)}"
            )
        return self.function(stats, **{**self.defaults, **params})


CAPTURES = ("streaming", "patterns")
_REGISTRY: dict[str, Detector] = {}


def register_detector(detector: Detector) -> Detector:
    """Add ``detector``; a second detector with the same name is an error."""
    if detector.name in _REGISTRY:
        raise ValueError(f"detector '{detector.name}' is already registered")
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
    """Detectors for a comma-separated string or list; None or 'all' means every one."""
    if names is None or names == "all":
        return list(_REGISTRY.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    if not names:
        raise HeadscopeError(f"no detector named; choose from: {', '.join(detector_names())}")
    return [get_detector(n) for n in dict.fromkeys(names)]
