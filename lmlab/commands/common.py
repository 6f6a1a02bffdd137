"""What the command modules share: the console, the options several commands take, number formatting."""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lmlab.api.paths import check_destination
from lmlab.api.tables import fitted_table
from lmlab.core.config import MAX_COUNT, SamplingParams, checkpoint_name
from lmlab.core.errors import UserError
from lmlab.core.progress import ticking as progress_ticking
from lmlab.inference.quantize import QUANTIZE

if TYPE_CHECKING:  # the command modules import the library when a command runs, not when the CLI starts
    from lmlab.analysis.columns import Column


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing more (the interpreter's last flush included) writes to a pipe
    whose reader has gone."""
    with suppress(OSError, ValueError):  # no file descriptor (a test's captured stdout)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class PipeConsole(Console):
    """rich's Console, whose output into a pipe that has no reader any more raises BrokenPipeError, as a print
    does, for `main` to end the command as every Unix tool ends (rich's own exits with status 1). While a run
    trains, the output only goes quiet and the run stops as SIGTERM stops it (checkpoint first)."""

    def on_broken_pipe(self) -> None:
        from lmlab.train.stop import stop_for_closed_output

        self.quiet = True
        silence_stdout()
        if not stop_for_closed_output():
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


# Piped output (logs, CI, tests) is not cut to 80 columns unless COLUMNS says so: tables stay whole and greppable.
console = PipeConsole(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200)


def print_table(title: str, columns: list[Column], rows: list[Any], wide: bool = False) -> None:
    """Rows as a table that fits the console (`lmlab.api.tables.fitted_table`); with `wide`, every column."""
    table, width = fitted_table(console, console.width, title, columns, rows, wide)
    # A console prints no wider than itself: a wide table gets one of its own width, on the same output.
    (PipeConsole(file=console.file, width=width) if wide and width > console.width else console).print(table)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default at the end of its help, unless the help names it already or there is none (a flag,
    an option that is off or empty unless given); the example epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], "", argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Every command under `parser`, depth first: (its name after `lmlab`, e.g. "data stats", its one-line help,
    its parser)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((sub.prog.removeprefix("lmlab "), helps.get(name, ""), sub))
                found += subcommands(sub)
    return found


# Types of the numeric options that go straight to a function (those of a dataclass, e.g. SamplingParams or
# PrepareOptions, are checked by it): a bad value is refused by argparse, in one line, before anything loads.

def count(low: int = 1, high: int = MAX_COUNT) -> Callable[[str], int]:
    """A whole number from `low` to `high` (2**53 unless given)."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            most = "2**53" if high == MAX_COUNT else f"{high:,}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {most}")
        return value
    return whole_number


def counts(text: str) -> list[int]:
    """Comma-separated whole numbers, e.g. 1,2,4."""
    return [count()(part.strip()) for part in text.split(",")]


def within(low: float, high: float, above: bool = False) -> Callable[[str], float]:
    """A finite number from `low` (with `above`, above it) to `high`."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            bounds = f"{'above' if above else 'of at least'} {low:g}"
            bounds += f", at most {high:,.0f}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {bounds}")
        return value
    return number


positive = within(0, math.inf, above=True)  # a finite number above 0


def port(text: str) -> int:
    """A TCP port to listen on: 0 asks the system for a free one, which the command prints."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 0 (any free one) to 65535")
    return int(text)


@dataclass(frozen=True)
class destination:  # named as the argparse types beside it (port, positive): a callable checking a value
    """The type of an option naming where a command writes (`check_destination`), checked as the command line is
    parsed, before anything loads; its refusal is the command's one line. `destination` tells it from the numeric
    types (tests/test_bad_values.py)."""

    option: str
    kind: str = ""
    destination = True

    def __call__(self, text: str) -> str:
        if not text.strip():  # else taken as not given: a plot, an output asked for and silently not written
            raise UserError(f"{self.option} is {text!r}; it must be a path that is not empty.")
        check_destination(text, self.option, self.kind)
        return text


def add_set(parser: argparse.ArgumentParser, example: str = "train.learning_rate=3e-4") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a config setting, e.g. {example} (repeatable)")


def add_size(parser: argparse.ArgumentParser, budget: str = "--budget") -> None:
    parser.add_argument("--size", metavar="auto|DEPTH", help="the model's size, along the preset's depth dial (its "
                        f"width per layer, head size, batch and LR following): auto, with {budget}, times the sizes "
                        "on this machine and trains the one the fit of its recipe (PRESET.fit.json, or lmlab's own) "
                        "predicts best on its data; a number is that many layers")


def add_device(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps" + note)


def checkpoint(text: str) -> str:
    """A checkpoint spec (best, latest, step_N or N) as the run names it: `lmlab.core.config.checkpoint_name`."""
    try:
        return checkpoint_name(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).rstrip(".")) from None


def add_checkpoint(parser: argparse.ArgumentParser, what: str = "the checkpoint to use") -> None:
    parser.add_argument("--checkpoint", type=checkpoint, default="best",
                        help=f"{what}: best (lowest val loss), latest, or a step: step_N or N (e.g. 500)")


def add_sampling(parser: argparse.ArgumentParser, several: bool = False, **defaults: Any) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, defaulting to SamplingParams' own values
    unless the command gives others (e.g. greedy answers); with `several`, --temperature takes a list (a grid)."""
    d = SamplingParams(**defaults)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate at most")
    if several:
        parser.add_argument("--temperature", type=temperatures, default=[d.temperature],
                            help=f"0 is greedy; several, comma-separated (0,0.8), make a grid of them (default: "
                            f"{d.temperature:g})")
    else:
        parser.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="sample only from the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="sample only from the likeliest tokens whose "
                        "probabilities sum to P (nucleus sampling)")
    parser.add_argument("--seed", type=int, default=d.seed, help="the same seed draws the same text")


def add_compile(parser: argparse.ArgumentParser, default: bool, why: str) -> None:
    """--compile, and --quantize beside it: int8 weights decode through the compiled step too."""
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=default,
                        help=f"decode with a compiled step on a CPU ({why}; default {'on' if default else 'off'}); on "
                             "a GPU the step replays as CUDA graphs either way")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="int8: decode on the CPU from 8-bit weights (a quarter of float32's bytes read per "
                        "token; compiled with --compile, where it pays most; logits within a tolerance of float32's "
                        "the line naming it states); none: the checkpoint's own")


def ticking(unit: str, title: str, stderr: bool = False) -> AbstractContextManager[Callable[[int, int], None]]:
    """`lmlab.core.progress.ticking` on the commands' console; with `stderr` (a command printing JSON), on stderr."""
    return progress_ticking(Console(stderr=True) if stderr else console, unit, title)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt (`signal` names which)."""

    signal = "SIGTERM"


@contextmanager
def terminating() -> Iterator[None]:
    """Within it, SIGTERM stops the command as Ctrl-C does (`Terminated`), so what it finished is kept and said;
    Python's default ends the process silently, mid-write."""
    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def temperatures(text: str) -> list[float]:
    """Comma-separated numbers, e.g. 0,0.8 (each checked as a temperature by SamplingParams)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated numbers, e.g. 0,0.8")


def samplings(args: argparse.Namespace) -> list[SamplingParams]:
    """The SamplingParams of the options `add_sampling` added, one per --temperature (one without `several`), checked:
    a bad value is one sentence."""
    values = args.temperature if isinstance(args.temperature, list) else [args.temperature]
    return [SamplingParams(args.max_new_tokens, t, args.top_k, args.top_p, args.seed) for t in values]

