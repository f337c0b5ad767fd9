"""Where the kernel tests can run Triton: compiled on CUDA, or its interpreter on CPU.

conftest.py sets TRITON_INTERPRET=1 unless told otherwise, before this is imported.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
TRITON_DEVICE = "cpu" if INTERPRETING else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
IMPLEMENTATIONS = ["chunked", pytest.param("triton", marks=needs_triton)]
