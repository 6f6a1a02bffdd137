"""Rows of figures as a table: for a terminal, fitted to its width by the columns' priorities (what the commands
print); for a notebook, as HTML."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

if TYPE_CHECKING:
    from lmlab.analysis.columns import Column


def fitted_table(console: Console, width: int, title: str, columns: list[Column], rows: list[Any],
                 wide: bool = False, every: str = "--wide shows every column") -> tuple[Table, int]:
    """Rows as a table no wider than `width` on `console`: the columns of lowest priority are left out until it
    fits (the caption names them, and `every`: where the others are); with `wide`, every column at its full
    width, however wide that is. Returns the table and its width."""
    shown = list(columns)
    while True:
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, caption_justify="left")
        for c in shown:
            table.add_column(c.header, justify="left" if c.left else "right", no_wrap=c.priority > 0,
                             overflow="fold")
        for row in rows:
            table.add_row(*(c.cell(row) for c in shown))
        measured = Measurement.get(console, console.options.update_width(10_000), table).maximum
        if wide or measured <= width or len(shown) <= 2:
            break
        shown.remove(max(reversed(shown), key=lambda c: c.priority))
    left_out = [c.header for c in columns if c not in shown]
    if left_out:
        table.caption = f"not shown, to fit {width} columns: {', '.join(left_out)} ({every})"
    return table, measured


def html_table(title: str, columns: list[Column], rows: list[Any]) -> str:
    """Every column of the rows as an HTML table, scrolled sideways where it is wider than the page, figures
    aligned right."""
    def cell(tag: str, text: str, left: bool) -> str:
        return f'<{tag} style="text-align:{"left" if left else "right"}">{html.escape(text)}</{tag}>'

    head = "".join(cell("th", c.header, c.left) for c in columns)
    body = "".join("<tr>" + "".join(cell("td", c.cell(row), c.left) for c in columns) + "</tr>" for row in rows)
    return (f'<div style="overflow-x:auto"><table><caption style="text-align:left">{html.escape(title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
