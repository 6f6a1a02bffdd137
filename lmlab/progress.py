"""The progress bar of long loops (training, fine-tuning): count, bar, a line of figures, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console, unit: str = "step") -> Progress:
    """A bar whose tasks carry an `info` field (loss, tokens/s, ...) shown after the bar; gone when it ends."""
    return Progress(TextColumn(unit), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
