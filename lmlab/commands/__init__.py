"""The `lmlab` command line: one module per command family, each registering its subcommands; a command parses
its arguments, calls the library and prints. Library imports happen inside the commands, so `lmlab --help`
and a mistyped option answer at once."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn

from lmlab.commands import data, evaluate, hf, plan, runs, serve, sweep, train
from lmlab.errors import UserError

FAMILIES = (data, train, evaluate, hf, serve, plan, runs, sweep)  # the order of `lmlab --help`


class Parser(argparse.ArgumentParser):
    """argparse, with a mistyped command line refused as every other mistake is: one line, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmlab", description="Train GPT-style language models from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands get the same Parser class
    for family in FAMILIES:
        family.register(sub)
    return parser


def report(message: str) -> None:
    """Say why a command stopped, in one line on stderr. Under torchrun every rank usually stops for the same
    reason: rank 0 alone prints it, and each rank leaves it in torchrun's error file, so that the launcher's
    failure summary shows the sentence (instead of a link) for whichever rank it names."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # torchrun's own format; its summary prints `py_callstack`, which here is the sentence, not a traceback.
        info = {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w", encoding="utf-8") as f:
            json.dump({"message": {"message": f"UserError: {message}", "extraInfo": info}}, f)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        report(str(err))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
