"""What ends a run before its end: a stop signal (the current step finishes and is checkpointed), or a write that
failed (the newest checkpoint is kept as it is, and the run ends with one sentence saying how to continue)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lmlab.errors import UserError
from lmlab.fileio import WriteError


def write_failure(err: WriteError | None, run: Path, step: int, saved: list[Path]) -> UserError:
    """The sentence a run ends with when rank 0 could not write (`err`, None on the other ranks) at `step`; `saved`
    are the run's step folders."""
    if err is None:
        return UserError("rank 0 could not write the run; its message says why.")
    kept = (f"its newest checkpoint ({saved[-1].name}) is kept: free some space, then continue with "
            f"`lmlab train --resume {run}`" if saved else
            "no checkpoint was written yet: free some space, then run the same command again")
    return UserError(f"the run stopped at step {step} because {err.path} could not be written ({err.reason}; "
                     f"{err.free}); {kept}.")


class StopOnSignal:
    """SIGINT/SIGTERM end the run after the current step (which is then checkpointed); a second one aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
