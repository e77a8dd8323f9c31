"""What `prunebench run` shows while it works: one progress display for the whole run, and
lmms-eval's own output (per-cell tqdm bars, logs, warnings) kept in a log file instead.

``--verbose`` shows lmms-eval's output on the terminal as it comes, and a line per finished cell.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

LOG_NAME = "lmms-eval.log"  # in the results directory


class RunProgress:
    """Cells done / total, the cell running now and its samples (rank 0 only draws it)."""

    def __init__(self, console: Console, cells: int, verbose: bool = False):
        self.console, self.verbose = console, verbose
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.cells: TaskID = self.progress.add_task("cells", total=cells)
        self.samples: TaskID = self.progress.add_task("", total=None, visible=False)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.update(self.samples, visible=False)
        self.progress.stop()

    def start_cell(self, label: str) -> None:
        self.progress.update(self.samples, description=f"  {label}", completed=0, total=None, visible=True)

    def set_samples(self, total: int) -> None:
        self.progress.update(self.samples, total=total)

    def advance_samples(self, n: int) -> None:
        self.progress.advance(self.samples, n)

    def finish_cell(self, label: str, outcome: str) -> None:
        """``outcome``: what happened ("exact_match = 0.92", "cached", "skipped: ...")."""
        self.progress.advance(self.cells)
        if self.verbose:
            self.console.log(f"{label}: {outcome}")

    def notice(self, text: str) -> None:
        """A line the user must see whatever the verbosity (a skipped cell, a taken-over lock)."""
        self.console.print(text)


@contextlib.contextmanager
def lmms_eval_output(results: Path, verbose: bool) -> Iterator[Path | None]:
    """lmms-eval's stderr output (tqdm bars, loguru logs, warnings) appended to ``results/lmms-eval.log``
    while the block runs; untouched with ``verbose``. Yields the log's path (None when verbose)."""
    if verbose:
        yield None
        return
    from loguru import logger

    path = Path(results) / LOG_NAME
    with open(path, "a", encoding="utf-8") as log:
        logger.remove()  # lmms-eval's sink writes to the terminal
        logger.add(log, level="INFO")
        try:
            with contextlib.redirect_stderr(log):
                yield path
        finally:
            logger.remove()  # ours, and any lmms-eval added while stderr was the log
            logger.add(sys.stderr, level="WARNING")
