"""What using a loaded run (sampled, scored, served) takes: notes on what stands in for the checkpoint asked
for, the CPU threads its work computes with, and the decode step. `lmlab.Run` (and `used_run`, for the
commands) load with these."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lmlab.core.config import SamplingParams, checkpoint_name

if TYPE_CHECKING:  # the commands import this module at start; the library loads when a run is loaded
    from lmlab.core.threads import Choice, Heard, ThreadChooser
    from lmlab.run.rundir import LoadedRun


def pick_threads(chooser: ThreadChooser, run: LoadedRun, doing: str) -> str | None:
    """The threads of `run`'s work from `chooser`, made before the run loaded, by the machine's rule (the cores the
    load leaves: lmlab.core.machine); the note to print when other processes' load lowered them, else None. The caller
    prints it once its input has passed its checks, so that a refusal stays one line."""
    choice = chooser.start(run.device)
    if choice.lowered and choice.load is not None and choice.load.busy:
        return f"note: {doing} on {choice.describe(chooser.override)}"
    return None


class ThreadNotes:
    """What a command that decodes says on stderr of its threads: the start's note (`pick_threads`), held until its
    input passed its checks (`flush`), and each change the load makes mid-decode (`heard`, the training loop's rule:
    lmlab.core.threads), in the same words, after the start's."""

    def __init__(self, chooser: ThreadChooser | None, note: str | None, doing: str):
        self.chooser, self.note, self.doing = chooser, note, doing

    def heard(self) -> Heard | None:
        """The rule a decoder's steps go to; None where nothing chose the threads (a run loaded to compute nothing)."""
        from lmlab.core.threads import Heard

        return None if self.chooser is None else Heard(self.chooser, self._changed)

    def flush(self) -> None:
        print_note(self.note)
        self.note = None

    def _changed(self, choice: Choice) -> None:
        assert self.chooser is not None, "only a chooser's rule changes the threads"
        self.flush()
        print_note(f"note: {self.doing} on {choice.describe(self.chooser.override)}")


def print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)


def note_checkpoint(path: str, asked: str, used: str, step: int) -> None:
    """Notes on stderr on what is loaded: the latest checkpoint standing in for a missing best; a fine-tune that has not
    reached its end."""
    from lmlab.run.rundir import RunDir

    if used != checkpoint_name(asked):
        print(f"note: {path} has no {asked} checkpoint (never evaluated, or its pointer is gone); using {used} "
              f"(step {step})", file=sys.stderr)
    run = RunDir(path)
    unfinished = run.unfinished()
    if unfinished:
        then = "wait for it to end" if run.running() else f"finish it with: {run.resume_command()}"
        print(f"note: {path} is {unfinished}, not a finished result; {then}", file=sys.stderr)


def decode_step(run: LoadedRun, capacity: int, setting: str, params: SamplingParams, compile: bool,
                console: Console, quantize: str, prompt_length: int = 0) -> Any:
    """The decode step for `capacity` rows as `lmlab.inference.steps` chooses it (None: decode eagerly), from weights
    held as `quantize` says, said on stderr with why unless it is the eager step nobody asked to change; first, rows
    that would not fit in memory are refused: each row its context (the block, or a longer `prompt_length`) and
    `params`' max_new_tokens more."""
    from lmlab.inference.generate import decoding_only
    from lmlab.inference.quantize import state_dtype
    from lmlab.inference.steps import build_step, choose_step
    from lmlab.model.memory import check_decoding

    choice = choose_step(run.model, run.device, compile, quantize)
    dtype = decoding_only(run, compiled=choice.compiled)
    tokens_per_row = max(prompt_length, run.config.model.block_size) + params.max_new_tokens
    check_decoding(run.config.model, capacity, tokens_per_row, setting, run.device, dtype, state_dtype(quantize, dtype))
    with console.status(f"Building the decode step ({choice.kind})..."):
        step, used = build_step(choice, run.model, dtype, capacity, weights_sha256=run.weights_sha256,
                                say=lambda line: print_note(f"note: {line}"))
    if compile or used.kind != "eager":
        print_note(f"note: decoding with {used.describe()}")
    return step
