"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` decorator runs, so it must be
set before any test module imports the kernels; pytest imports this file first.
Set ``TRITON_INTERPRET=0`` on a CUDA machine to run the same tests compiled.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
