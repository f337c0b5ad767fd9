"""The one exception family users see.

Every error a user can cause (a bad model spec, an empty prompt set, an
unknown detector, an existing output folder) is a ``HeadscopeError`` whose
message is one line that names the fix. The CLI prints that line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations


class HeadscopeError(Exception):
    """A user-facing error with a one-line message that says what to do."""


class NotApplicable(HeadscopeError):
    """An analysis that cannot run on this model or input; a scan skips it and says why."""


class ModelLoadError(HeadscopeError):
    """A model spec that cannot be loaded here; the message names the fix."""
