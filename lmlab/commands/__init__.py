"""The `lmlab` command line: one module per command family, each registering its subcommands, which run the
family's cmd_NAME (`lmlab export-hf`: hf.cmd_export_hf); a command parses its arguments, calls the library and
prints. Library imports happen inside the commands, so `lmlab --help` and a mistyped option answer at once."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from typing import Any, NoReturn

from lmlab import __version__
from lmlab.commands import data, evaluate, hf, log, plan, report, runs, serve, sweep, train
from lmlab.commands.common import HelpFormatter, silence_stdout, subcommands
from lmlab.core.busy import env_threads
from lmlab.core.compile_cache import discard_partial_builds
from lmlab.core.errors import PeerLost, UserError, classify

FAMILIES = (data, train, evaluate, hf, serve, plan, runs, log, report, sweep)  # the order of `lmlab --help`

# One example per subcommand, shown at the end of its --help (tests/test_terminal.py checks that each has one).
EXAMPLES = {
    "prepare": "lmlab prepare shakespeare --tokenizer char",
    "data": "lmlab data stats data/shakespeare-char",
    "data stats": "lmlab data stats data/wikitext2-bpe8192 --block-size 512",
    "train": "lmlab train configs/shakespeare-char-modern-cpu.toml --run runs/demo --set train.max_iters=300",
    "finetune": "lmlab finetune runs/gpt2 --data alpaca.json --out runs/gpt2-sft --set finetune.epochs=3",
    "eval": "lmlab eval runs/demo --checkpoint latest --json",
    "sample": "lmlab sample runs/demo --prompt \"ROMEO:\" --max-new-tokens 300 --temperature 0.7",
    "import-hf": "lmlab import-hf ~/models/gpt2 --out runs/gpt2",
    "export-hf": "lmlab export-hf runs/gpt2-sft exported/gpt2-sft",
    "export-gguf": "lmlab export-gguf runs/demo exported/demo.gguf --type q8_0",
    "serve": "lmlab serve runs/gpt2-sft --port 8000",
    "answer": "lmlab answer runs/gpt2-sft --data test.json --out answers.jsonl",
    "judge": "lmlab judge --answers answers.jsonl --endpoint http://127.0.0.1:8001/v1 --model judge",
    "bench": "lmlab bench configs/gpt2-small.toml --batch-sizes 4,8,16 --find-max-batch",
    "plan": "lmlab plan configs/gpt2-small.toml --chinchilla --gpu H100",
    "runs": "lmlab runs runs --wide",
    "log": "lmlab log runs/demo --csv > demo-evals.csv",
    "compare": "lmlab compare runs/shakespeare-char-cpu runs/demo --plot compare.png --x flops",
    "scaling": "lmlab scaling runs/depth-lr/*/ --plot scaling.png",
    "report": "lmlab report runs/demo runs/shakespeare-char-cpu --out reports/modern-vs-gpt2",
    "sweep": "lmlab sweep configs/shakespeare-char-cpu.toml --set train.learning_rate=1e-3,2e-3 "
             "--budget-tokens 2000000",
}


class Version(argparse.Action):
    """`--version`: lmlab's version, and torch's and Python's (what a bug report needs), without importing torch;
    read when asked for: every other command skips reading the installed packages' metadata (a tenth of a second at
    each start)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from importlib.metadata import distributions

        torch = next((found.version for found in distributions(name="torch")), "not installed")
        print(f"lmlab {__version__} (torch {torch}, Python {platform.python_version()})")
        parser.exit()

# At exit the interpreter collects every object it can reach, torch's and sympy's included: ~0.9 s on 2 cores
# after a training run. Frozen objects are left for the OS to free at once: lmlab closes its own files.
atexit.register(gc.freeze)


class Parser(argparse.ArgumentParser):
    """argparse, with a mistyped command line refused as every other mistake is: one line, status 2."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"\S{80,}", lambda long: long.group()[:40] + "...", message)  # a 5,000-digit value, cut
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, each with the help formatter, its example after its options, and its family's
    cmd_NAME to run (`lmlab data stats`: data.cmd_data_stats; `lmlab data`, none)."""
    parser = Parser(prog="lmlab", description="Train GPT-style language models from scratch.",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action=Version, nargs=0, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        help="show lmlab's, torch's and Python's versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands get the same Parser class
    for family in FAMILIES:
        family.register(sub)
    runs = {name: value for family in FAMILIES for name, value in vars(family).items() if name.startswith("cmd_")}
    for name, _, command in subcommands(parser):
        command.formatter_class = HelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[name]}"
        command.set_defaults(func=runs.get("cmd_" + re.sub("[ -]", "_", name)))
    return parser


NOT_UTF8 = re.compile("[\udc80-\udcff]")  # how Python keeps a command-line byte that is not UTF-8


def check_text(argv: list[str]) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (a Latin-1 file name, a stray byte), naming its option:
    Python keeps each as a lone surrogate, which every later write of the text (a lock's holder, a log line, JSON)
    fails on."""
    args = list(map(str, argv))
    for i, arg in enumerate(args):
        option, value = ("", arg) if not (arg.startswith("--") and "=" in arg) else arg.split("=", 1)
        bad = NOT_UTF8.search(value) or NOT_UTF8.search(option)
        if bad is None:
            continue
        option = option or (args[i - 1] if i and args[i - 1].startswith("-") else "the argument")
        shown = repr(value.encode("utf-8", "surrogateescape"))[1:]  # its bytes, escaped: one line whatever they are
        raise UserError(f"{option} is not valid text ({shown}): it holds the byte 0x{ord(bad.group()) - 0xdc00:02x}, "
                        f"which is not UTF-8, at character {bad.start():,}; lmlab reads its command line as UTF-8: "
                        "retype it, or rename the file to a UTF-8 name.")


PEER_GRACE_SECONDS = 2.0


def _say(message: str, own: bool = False) -> int:
    """Say why a command stopped, in one line on stderr (even when stderr's reader has gone too), and return its
    status, 2. Under torchrun every rank usually stops for the same reason: the first process of each node alone
    prints it (a node's terminal shows only its own processes, and its launcher may end without a summary when the
    rendezvous host's goes first), and each rank leaves it in torchrun's error file, so that the launcher's failure
    summary shows the sentence (instead of a link) for whichever rank it names. A rank's `own` reason (a peer it
    lost: the node's first process may be the one gone) it says itself, at once."""
    with suppress(BrokenPipeError):
        says = own or os.environ.get("LOCAL_RANK", "0") == "0"
        if says:  # after the notes the command has not said yet: its last line is why it stopped
            for note in cache.take_notes() if (cache := sys.modules.get("lmlab.core.cache")) else []:
                print(f"note: {note}", file=sys.stderr)
            print(f"error: {message}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # torchrun's own format; its summary prints `py_callstack`, which here is the sentence, not a traceback.
            info = {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w", encoding="utf-8") as f:
                json.dump({"message": {"message": f"UserError: {message}", "extraInfo": info}}, f)
        if not says:
            # torchrun stops every rank once one exits: a rank that got here first waits for its node's first
            # process, which stops for the same reason a moment later, to say it (else the sentence is only in the
            # summary).
            time.sleep(PEER_GRACE_SECONDS)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever stops it, the user reads one line (status 2: a mistake, a refusal, a destination
    that cannot be written; 130: interrupted), never a traceback; a reader that goes away (`| head`) ends it as
    SIGPIPE ends any Unix tool, silently with status 141."""
    args = None
    try:
        check_text(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)  # a destination option's refusal is a UserError (common.destination)
        env_threads()  # torch's and tokenizers' first parallel calls start that many threads, whatever the command
        discard_partial_builds()  # a kernel a signal cut short would be loaded by this command's first compile
        args.func(args)
    except BrokenPipeError:
        silence_stdout()
        return 141
    except UserError as err:
        return _say(str(err), own=isinstance(err, PeerLost))
    except ModuleNotFoundError as err:  # an optional package a command imported without asking first
        from lmlab.core.extras import OPTIONAL, refusal

        module = (err.name or "").partition(".")[0]
        if module not in OPTIONAL:
            raise
        return _say(refusal(f"lmlab {getattr(args, 'command', '') or ''}".strip(), [module]))
    except OSError as err:  # a file or folder no command checked itself: named, with what to do
        from lmlab.core.fileio import os_fix

        path = err.filename or "a file"  # a refusal as any other, its path cut short as UserError cuts one
        return _say(str(UserError(f"{path}: {err.strerror or err}; {os_fix(err, path, writing=False)}, then run the "
                                  "command again.")))
    except MemoryError:
        return _say("this machine ran out of memory; use a smaller size (batch, --num-samples, --max-batch) or model.")
    except KeyboardInterrupt as err:  # Ctrl-C, or a `Stopped` with its own line
        print(str(err) or "interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if (stop := _compile_stopped(err)) is not None:
            discard_partial_builds()
            print(f"stopped by {stop} while torch.compile compiled (train.compile): nothing of the unfinished step "
                  "was kept, nor the builds the signal cut short", file=sys.stderr)
            return 130
        failed = classify(err)
        if "RANK" in os.environ and failed in ("peer", "timeout"):  # a collective of this torchrun job
            return _say(f"rank {os.environ['RANK']} stops: another process of this torchrun job ended first "
                        f"({_peer_words(err)}); torchrun's summary says which and why.", own=True)
        if failed != "memory":  # torch's OutOfMemoryError, raised by a GPU's caching allocator
            raise
        return _say(f"the device ran out of memory ({str(err).splitlines()[0]}); use a smaller batch size, "
                    "--num-samples or --max-batch, or a smaller model.")
    finally:  # what the command found wrong with the machine cache and did not say (train says it at its start)
        with suppress(BrokenPipeError):
            for note in cache.take_notes() if (cache := sys.modules.get("lmlab.core.cache")) else []:
                print(f"note: {note}", file=sys.stderr)
    return 0


def _compile_stopped(err: BaseException | None) -> str | None:
    """The stop signal that ended a compile, as torch.compile reports it (its error wraps what the signal did: the
    step abandoned after the stop's grace, or a C++ compiler the terminal's Ctrl-C killed), else None."""
    from lmlab.train.stop import StepAbandoned

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, StepAbandoned):  # raised inside the compiling step
            return err.signal
        if isinstance(err, subprocess.CalledProcessError) and err.returncode < 0:
            return signal.Signals(-err.returncode).name
        err = err.__cause__ or err.__context__ or getattr(err, "inner_exception", None)
    return None


def _peer_words(err: RuntimeError) -> str:
    """The library's first sentence, without the source file it names: `Connection closed by peer [::1]:6539`."""
    return re.sub(r"^\[[^\]]*\] ", "", (str(err).strip() or type(err).__name__).splitlines()[0]).split(". ")[0][:200]

