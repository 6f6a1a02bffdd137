"""What the command modules share: the console, the options several commands take, number formatting."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console

from lmlab.config import SamplingParams
from lmlab.errors import UserError

# Piped output (logs, CI, tests) is not cut to 80 columns: tables stay whole and greppable.
console = Console(width=None if sys.stdout.isatty() else 200)


def add_set(parser: argparse.ArgumentParser, example: str = "train.learning_rate=3e-4") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a config setting, e.g. {example} (repeatable)")


def add_device(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps" + note)


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="best", help="best or latest")


def add_sampling(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, defaulting to SamplingParams' own values
    unless the command gives others (e.g. greedy answers)."""
    d = SamplingParams(**defaults)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="sample only from the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="sample only from the likeliest tokens whose "
                        "probabilities sum to P (nucleus sampling)")
    parser.add_argument("--seed", type=int, default=d.seed)


def add_compile(parser: argparse.ArgumentParser, default: bool, why: str) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=default,
                        help=f"decode with a compiled step ({why}; default {'on' if default else 'off'})")


def compiled_step(args: argparse.Namespace, model: Any, capacity: int, dtype: Any) -> Any:
    """The compiled decode step for `capacity` rows when --compile was given, else None (decode eagerly)."""
    if not args.compile:
        return None
    from lmlab.compiled import compile_step

    with console.status("Compiling the decode step..."):
        return compile_step(model, capacity, dtype)


def positive(args: argparse.Namespace, name: str) -> None:
    """An integer option that must be at least 1; one sentence naming it otherwise."""
    value = getattr(args, name)
    if value < 1:
        raise UserError(f"--{name.replace('_', '-')} is {value}; it must be at least 1.")


def sampling(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the options `add_sampling` added (checked: a bad value is one sentence)."""
    return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)


def fmt(value: float | None, spec: str = ".4f", none: str = "-") -> str:
    return none if value is None else format(value, spec)
