"""The progress of long loops (training, fine-tuning): on a terminal a live bar (count, bar, a line of figures,
ETA); anywhere else (a log file under nohup or Slurm, `| tee`, CI) plain lines that a log keeps."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column


def progress_bar(console: Console, unit: str = "step", plain_every: int = 1) -> Progress | PlainProgress:
    """A bar whose tasks carry an `info` field (loss, tokens/s, ...) shown after the bar, gone when it ends; or,
    when the console is not a terminal, a `PlainProgress` printing every `plain_every`-th count that brings info."""
    if console.is_terminal or console.is_jupyter:
        # The bar takes what the count, the figures and the ETA leave: the line fits 80 columns.
        return Progress(TextColumn(unit), MofNCompleteColumn(), BarColumn(None, table_column=Column(ratio=1)),
                        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True)), TextColumn("ETA"),
                        TimeRemainingColumn(compact=True), console=console, transient=True, expand=True)
    return PlainProgress(console, unit, plain_every)


def clock(seconds: float) -> str:
    """0:04:10, as the bar writes times; beyond what a timedelta holds (an ETA of a plan for millennia), in days."""
    if not seconds < 10**9:
        return f"{seconds / 86400:,.0f} days"
    return str(timedelta(seconds=round(seconds)))


class PlainProgress:
    """The bar's interface (one task) as lines such as `step 120/1500 | loss 2.0412 | ... | elapsed 0:00:31 |
    ETA 0:06:10`, printed when an update brings `info` at a count that is a multiple of `every` (or the last).
    Elapsed and ETA are this process's: the rate is that of the counts it has seen."""

    def __init__(self, console: Console, unit: str, every: int):
        self.console, self.unit, self.every = console, unit, max(1, every)
        self.total, self.completed, self._first, self._started = 0, 0, 0, 0.0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: int | None, completed: int = 0, **fields: Any) -> int:
        self.total, self.completed, self._first = total, completed, completed
        self._started = time.perf_counter()
        return 0

    def update(self, task: int, completed: int | None = None, advance: int = 0, info: str | None = None,
               total: int | None = None) -> None:
        """As the bar's: `total` is given once a count not known at the start is (a budgeted run's steps)."""
        self.total = self.total if total is None else total
        self.completed = (self.completed if completed is None else completed) + advance
        if info is not None and (self.completed % self.every == 0 or self.completed == self.total):
            self.console.print(self.line(info), highlight=False, soft_wrap=True)

    def line(self, info: str) -> str:
        elapsed, done = time.perf_counter() - self._started, self.completed - self._first
        if self.total is None:
            return f"{self.unit} {self.completed:,} | {info} | elapsed {clock(elapsed)} | ETA -"
        eta = clock(elapsed / done * (self.total - self.completed)) if done > 0 else "-"
        return f"{self.unit} {self.completed:,}/{self.total:,} | {info} | elapsed {clock(elapsed)} | ETA {eta}"


class ItemProgress:
    """A line as each of `total` units of work begins, e.g. `[3/12] GPT-2 small, micro-batch 8 | elapsed 0:01:10 |
    ETA 0:03:20` (the ETA from the mean of the units done): what a benchmark or a batch of runs shows, on a terminal
    and in a log alike."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done, self._started = console, total, 0, time.perf_counter()

    def start(self, what: str) -> None:
        elapsed = time.perf_counter() - self._started
        eta = clock(elapsed / self.done * (self.total - self.done)) if self.done else "-"
        self.done += 1
        self.console.print(f"[{self.done}/{self.total}] {what} | elapsed {clock(elapsed)} | ETA {eta}",
                           highlight=False, markup=False)
