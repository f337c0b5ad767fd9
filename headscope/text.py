"""User and run text shown as one plain line, never as markup or escape sequences.

Model specs, paths, prompt-set names and run summaries are data. Printed to a
terminal they must not start a rich markup tag, a terminal escape sequence or
a bidi override, must stay on one line, and must survive bytes that are not
UTF-8 (file names Python decoded with surrogate escapes).
"""

from __future__ import annotations

import re
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(value: Any) -> str:
    """``value`` as one line: runs of whitespace become one space; control
    characters, bidi overrides and undecodable bytes are shown as escapes."""
    text = _CONTROL.sub(_escaped, " ".join(str(value).split()))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"
