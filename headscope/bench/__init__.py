"""Benchmarks behind ``headscope bench`` and the scripts in benchmarks/.

Each benchmark measures its baseline in the same run (these machines are
noisy), prints ratios against it, and appends a dated section to
benchmarks/RESULTS.md naming the machine. Performance goals are checked here,
never by timed unit tests.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "RESULTS.md"


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def append_results(
    title: str, header: list[str], rows: list[tuple], results: Path = DEFAULT_RESULTS
) -> None:
    """Append a dated Markdown table to the results file (created if missing)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n### {title}, {stamp}\n", f"\nMachine: {machine_description()}.\n\n"]
    lines.append("| " + " | ".join(header) + " |\n")
    lines.append("|" + "---|" * len(header) + "\n")
    lines += ["| " + " | ".join(str(c) for c in row) + " |\n" for row in rows]
    results.parent.mkdir(parents=True, exist_ok=True)
    if not results.exists():
        results.write_text("# Benchmark results\n")
    with results.open("a") as handle:
        handle.writelines(lines)
