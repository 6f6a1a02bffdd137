"""Progress that suits where it runs, for the renderers a test can read: a log's or a pipe's lines (the live bar is
rich's; a notebook's output is read in tests/test_notebooks.py, from a real kernel)."""

from __future__ import annotations

import io

from rich.console import Console

from lmlab.core.progress import LogProgress, task_lines


def test_a_log_gets_each_tasks_line_as_it_goes_and_its_last_at_its_end():
    out = io.StringIO()
    lines = task_lines(Console(file=out, width=100), "documents", every=0)  # not a terminal: lines
    assert isinstance(lines, LogProgress)
    with lines:
        scan = lines.add_task("scanning", total=3, tokens="")
        for done in (1, 2):
            lines.update(scan, completed=done, tokens=f"{done * 100:,} tokens")
        lines.remove_task(scan)  # ended where its last line stood: not said again
        tokenize = lines.add_task("tokenizing", total=None)
        lines.update(tokenize, advance=5)
    said = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in said] == ["scanning documents 1/3", "scanning documents 2/3",
                                                      "tokenizing documents 5"]
    assert said[1].split(" | ")[1] == "200 tokens" and " | elapsed " in said[1] and " | ETA " in said[1]
    assert said[2].endswith("ETA -")  # no total, no ETA


def test_a_short_task_prints_nothing_in_a_log():
    out = io.StringIO()
    with task_lines(Console(file=out), "documents", every=10**9) as lines:
        task = lines.add_task("scanning", total=2)
        lines.update(task, completed=2)
    assert out.getvalue() == ""


def test_a_terminal_draws_rich_bar_and_a_notebook_its_own_output():
    assert task_lines(Console(file=io.StringIO(), force_terminal=True), "documents") is None
    assert type(task_lines(Console(file=io.StringIO(), force_jupyter=True), "documents")).__name__ == \
        "NotebookProgress"
