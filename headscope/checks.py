"""Checks of what a user passes in, made before any model is loaded.

The CLI and the Python API call the same functions, so a notebook user gets
the message a command-line user gets, as a ``HeadscopeError``. Each check
names the argument as the command line spells it, because that is where most
of these values come from.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from headscope.errors import HeadscopeError

#: The fraction of the memory available now that one pattern capture may plan to use.
PATTERN_MEMORY_SHARE = 0.5


def check_count(value: Any, option: str, *, allow_none: bool = True, minimum: int = 1) -> None:
    """``value`` is an integer of at least ``minimum`` (or None where that means "all")."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HeadscopeError(f"{option} must be an integer of at least {minimum}, got {value!r}")


def check_batch_size(batch_size: Any) -> None:
    check_count(batch_size, "--batch-size", allow_none=False)


def check_finite(value: Any, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HeadscopeError(f"{option} must be a finite number, got {value!r}")


def check_device(device: Any) -> str:
    """A torch device that exists and can be used here; returns its canonical name."""
    import torch

    if not isinstance(device, str | torch.device) or not str(device).strip():
        raise HeadscopeError(f"--device must name a torch device such as cpu or cuda: {device!r}")
    try:
        parsed = torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise HeadscopeError(
            f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise HeadscopeError(
                f"device {parsed} asked for, but this machine has no usable CUDA GPU "
                "(or this torch is a CPU build); use --device cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise HeadscopeError(
                f"device {parsed} does not exist: this machine has {count} CUDA device(s)"
            )
        return str(parsed)
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise HeadscopeError("device mps asked for, but MPS is not available; use --device cpu")
        return str(parsed)
    raise HeadscopeError(f"device {parsed} is not supported; use cpu, cuda, cuda:N or mps")


def has_learned_positions(model: Any) -> bool:
    """Whether ``model`` looks positions up in a table (GPT-2, BERT, OPT), which has
    no entry past its size, rather than computing them (RoPE, ALiBi)."""
    import torch

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and leaf in (
            "wpe",
            "position_embeddings",
            "embed_positions",
        ):
            return True
    return False


def check_sequence_length(handle: Any, length: int, what: str) -> None:
    """Refuse prompts longer than a learned position table; warn past a RoPE
    model's trained context (long-context experiments go there on purpose)."""
    limit = handle.arch.max_positions
    if not limit or length <= limit:
        return
    if has_learned_positions(handle.model):
        raise HeadscopeError(
            f"{what} has prompts of {length} tokens, but {handle.spec} has learned position "
            f"embeddings for only {limit}; use --seq-len {limit} or less"
        )
    warnings.warn(
        f"{what} has prompts of {length} tokens, past the {limit} positions "
        f"{handle.spec} was trained on; its attention there is extrapolated",
        stacklevel=2,
    )


def available_memory_bytes() -> int | None:
    """Memory the system can give now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_pattern_memory(needed: int, *, length: int, what: str) -> None:
    """Refuse, up front, a full-pattern capture that would not fit in memory."""
    available = available_memory_bytes()
    if available is None or needed <= PATTERN_MEMORY_SHARE * available:
        return
    raise HeadscopeError(
        f"the full attention patterns of {what} ({length} tokens per prompt) need about "
        f"{needed / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB available; "
        "use a shorter --seq-len, or only streaming detectors (e.g. --detectors "
        "first_token_sink,hidden_sink), which keep no T x T pattern"
    )
