"""How far a `train`'s config travels before the first step: the calls of `lmlab.train(...)` traced
(sys.setprofile) from its entry (`lmlab.api.training.train`) to the first optimizer step (`TrainStep.__call__`), on
the tests' tiny model and data.

    python -m benchmarks.module_visits [--list "budget, second run"]

(from the repository root). The config's calls are those whose arguments (`self` too) hold the config or one of its
sections (RunConfig, DataConfig, ModelConfig, TrainConfig). A visit is such a call that enters an lmlab module other
than its caller's (the nearest of the config's calls below it); only calls are followed, so what a module runs
while it is imported is not counted, nor anything torch calls back (a forward pass through nn.Module.__call__, an
optimizer's step), torch's no_grad wrappers aside. A return is a visit to a module entered before and left since.
Three trains, each on an empty cache folder (XDG_CACHE_HOME: the machine's choices, measured) and then again on what
it kept (read back): by steps, with a 5-minute --budget, and with --size auto (a fit written beside the preset, as
the tests write it). Prints, per train, the visits, the modules visited, the returns, the calls of read_meta (every
call, the config's or not), and on the sizing path (inside `sized_run`) and the budget's (inside
`Trainer._plan_budget`) the visits and the modules entered more than once. --list prints one train's visits in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.table import Table

import lmlab
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.experiments.sizing import with_vocab
from lmlab.model import build_model
from tests.helpers import write_config, write_corpus, write_fit

PACKAGE = str(Path(lmlab.__file__).parent) + os.sep
TORCH = str(Path(torch.__file__).parent) + os.sep
SEE_THROUGH = os.path.join(TORCH, "utils", "_contextlib.py")  # @torch.no_grad() on an lmlab function
PATHS = {"sizing": ("lmlab.experiments.sizing", "sized_run"), "budget": ("lmlab.train.loop", "Trainer._plan_budget")}
FIRST_STEP = ("lmlab.train.step", "TrainStep.__call__")
ENTRY = ("lmlab.api.training", "train")
CONFIGS = (RunConfig, DataConfig, ModelConfig, TrainConfig)


class FirstStep(BaseException):
    """Ends the traced train at its first optimizer step."""


@dataclass
class Visits:
    """What a trace counted."""

    order: list[str] = field(default_factory=list)  # the modules visited, in order
    calls: list[str] = field(default_factory=list)  # and the functions entered
    returns: int = 0
    read_meta: int = 0
    on_path: dict[str, Counter[str]] = field(default_factory=lambda: {p: Counter() for p in PATHS})


class Tracer:
    """The profile function: a shadow of the stack, each frame as its lmlab module, "torch", "<module>" (an import)
    or None (another library's, looked through), whether it carries the config, and the PATHS it opens."""

    def __init__(self) -> None:
        self.stack: list[tuple[str | None, bool, str | None]] = []
        self.found = Visits()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.enter(frame)
        elif event == "return" and self.stack:
            self.stack.pop()

    def enter(self, frame: FrameType) -> None:
        code = frame.f_code
        module = "<module>" if code.co_name == "<module>" else where(code.co_filename)
        name = (module, code.co_qualname)
        opens = next((path for path, opening in PATHS.items() if name == opening), None)
        modules = [m for m, _, _ in self.stack]
        below = next((m for m in reversed(modules) if m is not None), None)
        counted = not ("<module>" in modules or module in (None, "torch", "<module>") or below == "torch")
        carries = counted and (name == ENTRY or carries_config(frame))
        self.stack.append((module, carries, opens))
        if not counted:
            return
        if name == FIRST_STEP:
            sys.setprofile(None)
            raise FirstStep
        self.found.read_meta += name == ("lmlab.data.shards", "read_meta")
        caller = next((m for m, c, _ in reversed(self.stack[:-1]) if c), None)
        if not carries or module == caller:
            return
        found, left = self.found, [m for m, c, _ in self.stack[:-1] if c]
        found.returns += module in found.order and module not in left
        found.order.append(module)
        found.calls.append(f"{module.removeprefix('lmlab.')}:{code.co_qualname}")
        for path in {p for _, _, p in self.stack if p}:
            found.on_path[path][module] += 1


def carries_config(frame: FrameType) -> bool:
    """Whether a call's arguments (its `self` too) hold the config or one of its sections."""
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
    values = [frame.f_locals.get(name) for name in code.co_varnames[:count]]
    values += [v for group in values if isinstance(group, (tuple, dict)) for v in
               (group.values() if isinstance(group, dict) else group)]
    return any(isinstance(v, CONFIGS) for v in values)


def where(filename: str) -> str | None:
    """The lmlab module of a file, "torch" for torch's (but its decorators' wrappers), None for another's."""
    if filename.startswith(PACKAGE):
        return "lmlab." + filename[len(PACKAGE):].removesuffix(".py").replace(os.sep, ".").removesuffix(".__init__")
    return "torch" if filename.startswith(TORCH) and filename != SEE_THROUGH else None


def traced(**kwargs: Any) -> Visits:
    """The visits of `lmlab.train(**kwargs)` up to its first optimizer step."""
    tracer = Tracer()
    sys.setprofile(tracer)
    try:
        lmlab.train(**kwargs)
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return tracer.found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", help='print this train\'s visits in order, e.g. "budget, second run"')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        dataset, _, _ = prepare([str(write_corpus(root / "corpus"))], "char", name="tiny", out_dir=root / "data")
        preset = write_config(root / "tiny.toml", dataset)
        with torch.device("meta"):
            write_fit(preset, dataset, build_model(with_vocab(load_config(preset)).model).num_params() // 2)
        trains = {"steps": {}, "budget": {"budget": "5m"}, "size auto": {"budget": "5m", "size": "auto"}}
        found: dict[str, Visits] = {}
        for name, options in trains.items():
            os.environ["XDG_CACHE_HOME"] = str(root / f"cache-{name}")
            for start in ("first run", "second run"):
                run = root / f"{name}-{start}".replace(" ", "-")
                found[f"{name}, {start}"] = traced(config=preset, run=run, device="cpu", console=quiet(), **options)
    table = Table(title="`lmlab.train` from its entry to the first optimizer step: module visits")
    for column in ("train", "visits", "modules", "returns", "read_meta", *(f"{p}: visits, twice" for p in PATHS)):
        table.add_column(column, justify="left" if column == "train" else "right")
    for name, v in found.items():
        again = [", ".join(m.removeprefix("lmlab.") for m, n in v.on_path[p].items() if n > 1) or "-" for p in PATHS]
        table.add_row(name, str(len(v.order)), str(len(set(v.order))), str(v.returns), str(v.read_meta),
                      *(f"{sum(v.on_path[p].values())}: {again[i]}" for i, p in enumerate(PATHS)))
    console.print(table)
    if args.list:
        console.print("\n".join(found[args.list].calls), highlight=False)


def quiet() -> Any:
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))  # noqa: SIM115 (the process's: closed at its exit)


if __name__ == "__main__":
    main()
