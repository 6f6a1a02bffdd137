"""What a Jupyter or Colab notebook shows of lmlab's work besides printed lines: outputs of the cell updated in place
(the progress bar's, `lmlab.core.progress.NotebookProgress`, and statuses that go when their work ends), and the
console that uses them. A notebook needs no widget library for any of it: IPython's display handles do it, and
IPython is imported only when a notebook's kernel runs the code."""

from __future__ import annotations

import html
from typing import Any

from rich.console import Console


def show(bundle: dict[str, str], handle: Any = None) -> Any:
    """Show `bundle` (text/plain, and text/html where the page shows HTML) as a new output of the cell and return
    its display handle, or show it in place of what `handle` shows."""
    from IPython.display import display

    if handle is None:
        return display(bundle, raw=True, display_id=True)
    handle.update(bundle, raw=True)
    return handle


def bundle(text: str, html_body: str) -> dict[str, str]:
    """An output as `text`, and as `html_body` in lmlab's monospace block where the page shows HTML."""
    return {"text/plain": text, "text/html": f'<div style="font-family:monospace;font-size:12px">{html_body}</div>'}


class NotebookStatus:
    """rich's Status (`with console.status("Checking...")`, `.update(text)`) as an output that shows the text
    while its work runs and is emptied when it ends."""

    def __init__(self, console: Console, text: str):
        self.console, self.text, self._handle = console, text, None

    def __enter__(self) -> NotebookStatus:
        if not self.console.quiet:
            self._handle = show(bundle(self.text, html.escape(self.text)))
        return self

    def update(self, status: str) -> None:
        self.text = status
        if self._handle is not None:
            show(bundle(status, html.escape(status)), self._handle)

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            show({"text/plain": ""}, self._handle)


class NotebookConsole(Console):
    """rich's Console in a notebook, whose statuses are NotebookStatus outputs: rich's own live displays need the
    ipywidgets package, which a notebook may not have."""

    def __init__(self, **kwargs: Any):
        super().__init__(force_jupyter=True, **kwargs)

    def status(self, status: Any, **kwargs: Any) -> NotebookStatus:  # type: ignore[override]
        return NotebookStatus(self, str(status))


def console_here() -> Console:
    """The console for where the code runs: a NotebookConsole in Jupyter or Colab, else rich's own (a live display
    on a terminal, plain lines in a log or a pipe)."""
    console = Console()
    return NotebookConsole() if console.is_jupyter else console
