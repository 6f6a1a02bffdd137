"""The progress of long loops as suits where they run: a live bar on a terminal, one output updated in place in a
notebook, plain lines that a log keeps anywhere else (nohup, Slurm, `| tee`, CI)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Column

from lmlab.core.notebook import bundle, show


def progress_bar(console: Console, unit: str = "step") -> Progress | NotebookProgress | PlainProgress:
    """A bar whose tasks carry an `info` field (loss, tokens/s, ...) shown after the bar, gone when it ends; in a
    notebook, a `NotebookProgress`; elsewhere a `PlainProgress` printing every count that brings info."""
    if console.is_jupyter:
        return NotebookProgress(console, unit)
    if console.is_terminal:
        # The bar takes what the count, the figures and the ETA leave: the line fits 80 columns.
        return Progress(TextColumn(unit), MofNCompleteColumn(), BarColumn(None, table_column=Column(ratio=1)),
                        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True)), TextColumn("ETA"),
                        TimeRemainingColumn(compact=True), console=console, transient=True, expand=True)
    return PlainProgress(console, unit)


def clock(seconds: float) -> str:
    """0:04:10, as the bar writes times; beyond what a timedelta holds (an ETA of a plan for millennia), in days."""
    if not seconds < 10**9:
        return f"{seconds / 86400:,.0f} days"
    return str(timedelta(seconds=round(seconds)))


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


REFRESH_SECONDS = 0.2  # a notebook's bar is redrawn at most this often (each redraw is a message to the browser)


@dataclass
class _Task:
    description: str
    total: int | None
    completed: int
    fields: dict[str, Any] = field(default_factory=dict)
    first: int = 0  # the count when the task was added: the rate is that of the counts this process has seen
    started: float = field(default_factory=time.perf_counter)
    said: float = 0.0  # when a log last printed its line (0: never)
    said_count: int = -1  # the count that line showed


class TaskLines:
    """The bar's interface (`add_task`, `update`, `remove_task`: tasks with a description, a count, a total and
    fields such as `info` or `tokens`), each task shown as the line a log keeps: `train step 120/1,500 | loss 2.0412
    | elapsed 0:00:31 | ETA 0:06:10`. Where the lines go is the subclass's (`_changed`, told of each task added,
    updated and ended; by default nowhere)."""

    def __init__(self, console: Console, unit: str = "step"):
        self.console, self.unit = console, unit
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> TaskLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        for t in list(self.tasks.values()):
            self._changed(t, "ended")

    def add_task(self, description: str, total: int | None = None, completed: int = 0, **fields: Any) -> TaskID:
        task = TaskID(len(self.tasks))  # an int, typed as the bar's task ids are
        self.tasks[task] = _Task(description, total, completed, dict(fields), completed)
        self._changed(self.tasks[task], "added")
        return task

    def update(self, task: int, completed: int | None = None, advance: int = 0, total: int | None = None,
               **fields: Any) -> None:
        """As the bar's: `total` is given once a count not known at the start is (a budgeted run's steps)."""
        t = self.tasks[task]
        t.total = t.total if total is None else total
        t.completed = (t.completed if completed is None else completed) + advance
        t.fields.update(fields)
        self._changed(t, "updated")

    def remove_task(self, task: int) -> None:
        if task in self.tasks:
            self._changed(self.tasks.pop(task), "ended")

    def _changed(self, t: _Task, event: str) -> None:
        return None  # a PlainProgress prints from `update` alone

    def line(self, t: _Task) -> str:
        """A task as a log line: what, how far, its fields, elapsed and ETA."""
        head = self.unit if t.description == self.unit else f"{t.description} {self.unit}"
        count = f"{t.completed:,}" if t.total is None else f"{t.completed:,}/{t.total:,}"
        elapsed, done = time.perf_counter() - t.started, t.completed - t.first
        eta = "-" if t.total is None or done <= 0 else clock(elapsed / done * max(0, t.total - t.completed))
        figures = [str(v) for v in t.fields.values() if str(v)]
        return " | ".join([f"{head} {count}", *figures, f"elapsed {clock(elapsed)}", f"ETA {eta}"])


class PlainProgress(TaskLines):
    """The bar's interface (one task) as lines such as `step 120/1500 | loss 2.0412 | ... | elapsed 0:00:31 |
    ETA 0:06:10`, printed when an update brings `info`.
    Elapsed and ETA are this process's: the rate is that of the counts it has seen."""

    def add_task(self, description: str, total: int | None = None, completed: int = 0, **fields: Any) -> TaskID:
        return super().add_task(self.unit, total, completed, **fields)  # a line names the unit alone

    def update(self, task: int, completed: int | None = None, advance: int = 0, total: int | None = None,
               **fields: Any) -> None:
        super().update(task, completed, advance, total, **fields)
        if fields.get("info") is not None:
            self.console.print(self.line(self.tasks[task]), highlight=False, soft_wrap=True)


class NotebookProgress(TaskLines):
    """Tasks as one output of a notebook's cell updated in place: per task an HTML progress bar beside its line,
    the line alone where HTML is not shown, redrawn at most every REFRESH_SECONDS and at each task's end. The last
    state stays when the work ends; a quiet console shows nothing."""

    def __init__(self, console: Console, unit: str = "step"):
        super().__init__(console, unit)
        self._handle: Any = None
        self._shown_at = 0.0

    def __enter__(self) -> NotebookProgress:
        if not self.console.quiet:
            self._handle = show(self._bundle())
        return self

    def _changed(self, t: _Task, event: str) -> None:
        now, due = time.perf_counter(), event != "updated" or t.completed == t.total
        if self._handle is None or not (due or now - self._shown_at >= REFRESH_SECONDS):
            return
        self._shown_at = now
        show(self._bundle(), self._handle)

    def _bundle(self) -> dict[str, str]:
        lines = [(t, self.line(t)) for t in self.tasks.values()]
        rows = "".join(
            f'<div><progress {"" if t.total is None else f"value={t.completed} max={max(t.total, 1)} "}'
            f'style="width:14em;vertical-align:middle"></progress> {html.escape(text)}</div>' for t, text in lines)
        return bundle("\n".join(text for _, text in lines), rows)


class LogProgress(TaskLines):
    """Tasks as plain lines for a log or a pipe: each task's line every `every` seconds while it runs, and its last
    when it ends if it printed any (a short task prints nothing) or, with `last`, always."""

    def __init__(self, console: Console, unit: str = "step", every: float = 5.0, last: bool = False):
        super().__init__(console, unit)
        self.every, self.last = every, last

    def _changed(self, t: _Task, event: str) -> None:
        now = time.perf_counter()
        last = event == "ended" and (t.said or self.last) and t.said_count != t.completed
        if last or (event == "updated" and now - (t.said or t.started) >= self.every):
            t.said, t.said_count = now, t.completed
            self.console.print(self.line(t), highlight=False, soft_wrap=True)


def task_lines(console: Console, unit: str, every: float = 5.0) -> NotebookProgress | LogProgress | None:
    """Progress as lines where a live bar is not drawn: a notebook's output updated in place, or a log's lines
    every `every` seconds; None on a terminal, where the caller draws rich's bar with its own columns."""
    if console.is_jupyter:
        return NotebookProgress(console, unit)
    return None if console.is_terminal else LogProgress(console, unit, every)


@contextmanager
def ticking(out: Console, unit: str, title: str, every: float = 5.0) -> Iterator[Callable[[int, int], None]]:
    """A progress callback (done, total) in `unit`s that says `title` on `out` at its first call (a refusal before
    the work begins stays one line): a bar on a terminal and in a notebook, a plain line with the rate and ETA every
    `every` seconds and at the end elsewhere (a log, a pipe: `LogProgress`), so no long step is silent."""
    live = out.is_terminal or out.is_jupyter
    with progress_bar(out, unit) if live else LogProgress(out, unit, every, last=True) as bar:
        started = time.perf_counter()

        def tick(done: int, total: int) -> None:
            if not bar.tasks:  # the first call: the title, then the task
                out.print(f"{title}...", highlight=False)
                bar.add_task(unit, total=total, info="")
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(TaskID(0), completed=done, total=total, info=f"{rate:,.1f}/s")

        yield tick
