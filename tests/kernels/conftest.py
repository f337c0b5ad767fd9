"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` decorator runs, so it must be
set before any test module imports the kernels; pytest imports this file first.
Set ``TRITON_INTERPRET=0`` on a CUDA machine to run the same tests compiled.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    """These tensors are tiny, and with the second core busy, OpenMP's spin-waiting
    threads made the chunked-vs-reference test 20x slower (1 s -> 24 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Hand-written edge cases draw their tensors from torch's global generator."""
    torch.manual_seed(0)
