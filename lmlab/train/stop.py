"""What ends a run before its end: a stop signal (the current step finishes and is checkpointed), or a write that
failed (the newest checkpoint is kept as it is, and the run ends with one sentence saying how to continue)."""

from __future__ import annotations

import _thread
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from lmlab.core.errors import PeerLost, Stopped, UserError
from lmlab.core.fileio import WriteError

if TYPE_CHECKING:  # a closed output asks for a stop (`stop_for_closed_output`) without loading torch
    from lmlab.run.rundir import RunDir


class Writes:
    """A run's writes, by rank 0 alone: a failed one (a full disk) is kept and ends the run like a stop signal after the
    step, keeping the newest checkpoint; nothing more is written meanwhile. `log` writes an event to metrics.jsonl and
    to the tracker."""

    def __init__(self, run_dir: RunDir, is_main: bool):
        self.run_dir, self.is_main = run_dir, is_main
        self.error: WriteError | None = None
        self.trackers: list[Any] = []  # each with a `log(event)`
        self.logged: Counter[str] = Counter()  # events logged, by kind
        self.drawn = -1  # how many events the last drawing showed

    def __call__(self, write: Callable[..., Any], *args: Any) -> None:
        if self.is_main and self.error is None:
            try:
                write(*args)
            except WriteError as err:
                self.error = err

    def log(self, event: dict[str, Any]) -> None:
        self(self.run_dir.log, event)
        for tracker in self.trackers:
            self(tracker.log, event)
        self.logged[event["event"]] += 1

    def redraw(self) -> None:
        """The run's loss.png drawn again, unless no event it shows was logged since; the first drawing timed."""
        from lmlab.analysis.plots import LOSS_EVENTS, plot_losses  # not loaded by a closed output's stop
        from lmlab.train.timing import kept_plot

        shown = sum(self.logged[kind] for kind in LOSS_EVENTS)
        if shown != self.drawn:
            self(kept_plot if self.drawn < 0 else plot_losses, self.run_dir)
            self.drawn = shown

    def failure(self, step: int) -> UserError:
        """The sentence a run ends with when rank 0 could not write at `step`."""
        err, saved, run = self.error, self.run_dir.step_folders(), self.run_dir.path
        if err is None:
            return UserError("rank 0 could not write the run; its message says why.")
        kept = (f"its newest checkpoint ({saved[-1].name}) is kept: {err.fix}, then continue with "
                f"`lmlab train --resume {run}`" if saved else
                f"no checkpoint was written yet: {err.fix}, then run the same command again")
        detail = f"{err.reason}; {err.free}" if err.free else err.reason
        return UserError(f"the run stopped at step {step} because {err.path} could not be written ({detail}); {kept}.")


STOP_GRACE = 3.0  # seconds a step may still run after a stop signal before it is abandoned


class StepAbandoned(Exception):
    """A step (or an evaluation) still running STOP_GRACE seconds after a stop signal, given up part-way: nothing of it
    may be saved."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class StopOnSignal:
    """SIGINT/SIGTERM end the run after the current step (which is then checkpointed); a step still running STOP_GRACE
    seconds later is abandoned (StepAbandoned is raised inside it, only in `interruptible()`, never in a checkpoint's
    write); a second signal aborts at once. An output whose reader has gone is a stop named SIGPIPE
    (`stop_for_closed_output`).

    A stop `setting_up` a run ends it at once, nothing written, until `begun()`; from then on a signal stops the run
    after a step. `stuck`, where given, is called (from a timer's thread) with the signal's name when a stretch still
    runs twice the grace after the signal: a long call into C lets no Python code run until it returns."""

    def __init__(self, stuck: Callable[[str], None] | None = None, setting_up: bool = False) -> None:
        self.signal: str | None = None
        self.stuck, self.setting_up = stuck, setting_up
        self._previous: dict[int, Any] = {}
        self._region = 0  # which interruptible stretch runs now (0: none), so a late timer cannot hit the next one
        self._regions = 0
        self._overdue = False
        # while `_watching` reads it: the wake-up fd's write end, and the fd it replaced
        self._wakeup: tuple[int, int] | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._overdue:
            self._overdue = False
            if self._region:
                raise StepAbandoned(self.signal or signal.Signals(signum).name)
            return  # the stretch ended as the timer fired: the loop stops after it as usual
        if self.setting_up:  # in one line (`Stopped`, status 130)
            raise Stopped(f"stopped by {signal.Signals(signum).name} while it set up: nothing was written")
        if self.signal:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def request(self, name: str) -> None:
        if not self.signal:
            self.signal = name
            if self._region:
                self._arm(self._region)

    def _arm(self, region: int) -> None:
        def overdue() -> None:
            if self._region == region:
                self._overdue = True
                _thread.interrupt_main(signal.SIGTERM)  # runs `_handle` in the main thread, between two bytecodes

        _later(STOP_GRACE, overdue)

    def _watching(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as wakeups:
            while number := wakeups.read(1):  # b"" once __exit__ closed the other end
                if number[0] in (signal.SIGINT, signal.SIGTERM) and (self._region or self.setting_up):
                    _later(2 * STOP_GRACE, partial(self._still_in, self._region, signal.Signals(number[0]).name))

    def _still_in(self, region: int, name: str) -> None:
        """Called twice the grace after a signal: the stretch it came in still runs (or the set-up, a C call having held
        the handler off)."""
        stuck = (region and self._region == region) or (not region and self.setting_up and self in _IN_FORCE)
        if stuck and self.stuck is not None:
            self.stuck(self.signal or name)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch (a training step, an evaluation) that a stop signal may abandon after the grace period. What fails
        in it once a stop signal came is the signal's doing (Ctrl-C reaches the process group, so torch.compile's
        compiler dies of it), and abandons it too, rather than ending the run as a crash."""
        self._regions += 1
        self._region = self._regions
        if self.signal:  # the signal came between two stretches, while the ranks were still agreeing on it
            self._arm(self._region)
        try:
            yield
        except Exception as err:
            if self.signal is None or isinstance(err, StepAbandoned):
                raise
            raise StepAbandoned(self.signal) from err
        finally:
            self._region = 0

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            if self.stuck is not None:
                # Each stop signal heard as it arrives (the byte Python's C handler writes to the wake-up fd), not when
                # the main thread next runs Python code.
                read, write = os.pipe()
                os.set_blocking(write, False)
                self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
                threading.Thread(target=self._watching, args=(read,), daemon=True).start()
        if _IN_FORCE and _IN_FORCE[-1].signal:  # the set-up around it was asked to stop
            self.request(_IN_FORCE[-1].signal)
        _IN_FORCE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _IN_FORCE.remove(self)
        self._region = 0
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)
            self._wakeup = None


def begun() -> None:
    """The run of the stops in force is begun (its folder written to from here): a signal stops it after a step."""
    for stop in _IN_FORCE:
        stop.setting_up = False


def _later(seconds: float, call: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, call)
    timer.daemon = True
    timer.start()


_IN_FORCE: list[StopOnSignal] = []  # the stops of this process's runs, innermost last


def stop_for_closed_output() -> bool:
    """Ask the stop in force, if any, to end its run after the current step (`stopped_by` SIGPIPE): the output's reader
    has gone. False when no run is stopping this way."""
    if not _IN_FORCE or _IN_FORCE[-1].setting_up:  # nothing begun: the command ends as a pipe's reader left it
        return False
    _IN_FORCE[-1].request("SIGPIPE")
    return True


def peer_lost(said: str, run_dir: RunDir, step: int | None) -> PeerLost:
    """The sentence a job ends with when a collective failed because another process died or stopped answering
    (`said`: who was lost), and how to continue."""
    saved, when = run_dir.step_folders(), f"after step {step}" if step else "during start-up"
    again = (f"its newest checkpoint ({saved[-1].name}) is whole: once every host is up and reaches the others, "
             f"run `lmlab train --resume {run_dir.path}` on each under the same torchrun command "
             "(with --max-restarts, torchrun continues on its own when the host joins again)" if saved else
             "no checkpoint was written yet: once every host is up and reaches the others, run the same command "
             "on each again")
    return PeerLost(f"{said} {when}; {again}.")
