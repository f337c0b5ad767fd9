"""Where the kernel tests can run Triton: compiled on CUDA, or its interpreter on CPU.

conftest.py sets TRITON_INTERPRET=1 unless told otherwise, before this is imported.
A test that needs Triton carries ``needs_triton`` (Triton and a place to run it) or
``needs_triton_installed`` (the package alone). Without what it needs such a test
skips, with the reason; under ``HEADSCOPE_REQUIRE_TRITON=1`` (set by ``.ci/run``) it
fails instead (conftest.py), so a CI image that lost Triton cannot pass with the
Triton half of the kernel tests quietly skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
TRITON_DEVICE = "cpu" if INTERPRETING else ("cuda" if torch.cuda.is_available() else None)
REQUIRED = os.environ.get("HEADSCOPE_REQUIRE_TRITON") == "1"

#: why the package is unusable here, or None
NOT_INSTALLED = None if HAS_TRITON else "triton is not installed"
#: why no Triton kernel can run here, or None
CANNOT_RUN = NOT_INSTALLED or (
    None if TRITON_DEVICE is not None else "Triton needs CUDA or TRITON_INTERPRET=1"
)


# conftest.py skips a test so marked whose ``missing`` is not None, with it as the
# reason, or fails it under HEADSCOPE_REQUIRE_TRITON=1.
needs_triton = pytest.mark.triton(missing=CANNOT_RUN)
needs_triton_installed = pytest.mark.triton(missing=NOT_INSTALLED)
IMPLEMENTATIONS = ["chunked", pytest.param("triton", marks=needs_triton)]
