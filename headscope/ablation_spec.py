"""The headscope ablation spec: its format and version, its methods, and head names.

One source for what an ablation spec says and how a head is named
(``L<layer>H<head>``, 0-based: ``L3H5``). The ablation engine
(``headscope.probes.ablation``), the exporters, the TransformerLens hooks, the
reports and the dashboard all name and parse heads through ``head_name`` and
``parse_head_name`` here, so a head is written one way everywhere.

This file is standalone on purpose: it imports only the standard library, and
``headscope export ablation`` copies it, unchanged, into every export beside
``transformer_lens_hooks.py``, which imports it from there, so an export works
without headscope installed.

Errors: being standalone, this module cannot raise headscope's
``HeadscopeError``; a malformed head name raises ``ValueError`` with a
one-line message that says how to write it (the type a user of the exported
file expects). headscope's one entry point for head names a user types,
``headscope.probes.ablation.parse_heads``, re-raises that message, unchanged,
as a ``HeadscopeError``. The other callers parse names that ``head_name``
wrote.
"""

from __future__ import annotations

import re

SPEC_FORMAT = "headscope-ablation"
SPEC_VERSION = 1
HEAD_METHODS = ("zero", "mean", "resample", "query_scale")
SKIP_MODULES = ("attn", "mlp", "block")

_HEAD_NAME = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


def head_name(layer: int, head: int) -> str:
    """The name of a head in specs, tables, reports and on the command line: L3H5."""
    return f"L{int(layer)}H{int(head)}"


def layer_name(layer: int) -> str:
    """The name of a layer in reports and figures: L3."""
    return f"L{int(layer)}"


def parse_head_name(text: str) -> tuple[int, int]:
    """``"L3H5"`` -> (3, 5); case and spaces around the parts are ignored.

    Raises ``ValueError`` naming the text and the form to use.
    """
    match = _HEAD_NAME.match(str(text))
    if match is None:
        raise ValueError(
            f"malformed head '{str(text).strip()}'; write heads as L<layer>H<head>, e.g. L3H5,L12H0"
        )
    return int(match.group(1)), int(match.group(2))
