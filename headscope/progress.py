"""One shape of progress report, shared by every long piece of work.

Probes, experiments and the scan all take ``on_progress(label, done, total)``:
``done`` of ``total`` units of the step ``label`` are finished (prompts for a
probe, measurements for an experiment). A caller that wants no report passes
None. Displaying progress is the caller's business: ``ProgressBars`` draws
rich bars (the CLI, and ``scan(on_progress=True)`` in a notebook); no library
module draws anything by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: on_progress(label, done, total)
Progress = Callable[[str, int, int], None]


class Counter:
    """Counts the units of one step and reports each running total to ``on_progress``.

    Call it with the units just finished; ``finish()`` reports the step complete
    (for totals that are upper bounds, such as measurements shared by orders).
    """

    def __init__(self, on_progress: Progress | None, label: str, total: int) -> None:
        self.on_progress, self.label, self.total, self.done = on_progress, label, total, 0
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.label, self.done, self.total)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self._report()

    def finish(self) -> None:
        if self.done < self.total:
            self.done = self.total
            self._report()


def counter(on_progress: Progress | None, label: str, total: int) -> Counter:
    """A ``Counter`` for step ``label`` of ``total`` units (reports 0 done at once)."""
    return Counter(on_progress, label, total)


class ProgressBars:
    """A ``Progress`` callback drawing one rich bar per label, on ``console``.

    The display starts with the first report (a call refused up front draws
    nothing) and stops at ``close()``; use it as a context manager.
    """

    def __init__(self, console: Any = None, prefix: str = "") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.prefix = prefix
        self._bars = RichProgress(
            TextColumn("{task.description}", markup=False, style="progress.description"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self._tasks:
            self._bars.start()
        if label not in self._tasks:
            self._tasks[label] = self._bars.add_task(f"{self.prefix}{label}", total=total)
        self._bars.update(self._tasks[label], completed=done, total=total)

    def close(self) -> None:
        if self._tasks:
            self._bars.stop()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
