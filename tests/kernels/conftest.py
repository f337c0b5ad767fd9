"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` decorator runs, so it must be
set before any test module imports the kernels; pytest imports this file first.
Set ``TRITON_INTERPRET=0`` on a CUDA machine to run the same tests compiled.

``HEADSCOPE_REQUIRE_TRITON=1`` (``.ci/run`` sets it) turns every skip for a missing
Triton into a failure: see triton_support.py, the tests' shared header.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton_support  # noqa: E402


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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton(missing): needs Triton; missing says why it cannot run here, or None"
    )


def _missing(item) -> str | None:
    marker = item.get_closest_marker("triton")
    return marker.kwargs.get("missing") if marker is not None else None


def pytest_collection_modifyitems(config, items):
    """A Triton test that cannot run here skips, with the reason (unless required)."""
    if not triton_support.REQUIRED:
        for item in items:
            if (missing := _missing(item)) is not None:
                item.add_marker(pytest.mark.skip(reason=missing))


def pytest_runtest_setup(item):
    """Under HEADSCOPE_REQUIRE_TRITON=1 a Triton test that cannot run here fails."""
    if triton_support.REQUIRED and (missing := _missing(item)) is not None:
        pytest.fail(f"{missing}, and HEADSCOPE_REQUIRE_TRITON=1 requires it", pytrace=False)
