"""How this machine runs a model: the one component every command that trains, fine-tunes, evaluates, samples or
serves asks. Each of its rows (`ROWS`) is a choice fixed by its setting when set, else read back from a cache kept
per machine and model shape (beside the peak's, lmlab.core.peak, and under its conventions), else measured once and
stored; the start says in one line what was chosen and how (`Machine.line`). The dtype and peak stay
lmlab.core.peak's (its own cache); the rows' measurements stay with their concerns (lmlab.core.threads,
lmlab.train.attention, lmlab.train.step, lmlab.train.timing), which decide through `Machine.decide`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.core import threads as core_threads  # its time_threads looked up at each call, as tests fake it
from lmlab.core.config import ModelConfig
from lmlab.core.fileio import WriteError, atomic_write_text, writing
from lmlab.core.peak import checksum, processor_identity
from lmlab.core.threads import Choice, ThreadChooser, forward_probe
from lmlab.model import LanguageModel

CACHE_FORMAT = 1
READ_BACK, MEASURED = "read back", "measured"


@dataclass(frozen=True)
class Row:
    """One choice of the machine: its name, the setting that fixes it, and what is measured when nothing does."""

    name: str
    setting: str
    measured: str


ROWS = (
    Row("threads", "train.threads", "a forward pass on each thread count, when other processes load the cores"),
    Row("attention", "train.attention", "a layer's forward and backward by each path (a CPU's auto)"),
    Row("compile", "train.compile", "compiled and eager steps in turns over the first steps (a CPU's auto)"),
    Row("graphs", "", "compiled steps with and without CUDA graphs in turns over the first steps (CUDA, one process)"),
    Row("timing", "", "a budget's: steps of the run's own model and an evaluation's batch, its state restored"),
)


class NotKept(LookupError):
    """A choice a machine that only recalls (`Machine(..., measuring=False)`) would have had to measure."""


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "machine.json"


def threads_shape(config: ModelConfig, rows: int, length: int, dtype: torch.dtype, most: int) -> dict[str, Any]:
    """What a thread trial of a model's forward over `rows` sequences of `length` tokens depends on besides the
    machine: the model, the dtype and the most threads a job may take (not the counts between, which the load leaves
    and which vary from start to start)."""
    return {"model": dataclasses.asdict(config), "rows": rows, "length": length, "dtype": str(dtype), "most": most}


class Machine:
    """The choices of one job on `device` in `dtype`, each made once by `decide`; `made` keeps how (the row's name
    to its value and READ_BACK, MEASURED or the setting that fixed it) for the start's line and the run's events.
    Without `measuring`, it only recalls: what a choice would be, had without measuring anything (`decide` raises
    NotKept where it would measure)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, measuring: bool = True):
        self.device, self.dtype, self.measuring = device, dtype, measuring
        self.made: dict[str, tuple[str, str]] = {}
        self.notes: list[str] = []  # one sentence per thing found wrong with the cache

    def decide(self, row: str, shape: dict[str, Any], measure: Callable[[], dict[str, Any] | None]
               ) -> tuple[dict[str, Any] | None, str]:
        """The value of `row` at `shape` (what the measurement depends on besides this machine) read back from the
        cache, else `measure`d and stored (None: nothing was measured, nothing stored); and which of the two."""
        value = self.recall(row, shape)
        if value is not None:
            return value, READ_BACK
        if not self.measuring:
            raise NotKept(row)
        value = measure()
        if value is not None:
            self.store(row, shape, value)
        return value, MEASURED

    def recall(self, row: str, shape: dict[str, Any]) -> dict[str, Any] | None:
        """What the cache holds for `row` at `shape`, if it can be trusted."""
        entry = self._read(self._key(row, shape))[1]
        return None if entry is None else entry["value"]

    def store(self, row: str, shape: dict[str, Any], value: dict[str, Any]) -> None:
        """Keep `value`, measured now, for `row` at `shape`."""
        key = self._key(row, shape)
        entries = self._read(key)[0]
        kept = json.loads(json.dumps({"row": row, "shape": shape, "value": value,
                                      "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}, default=str))
        entries[key] = {**kept, "sha256": checksum(kept)}
        self._write(entries)

    def said(self, row: str, chosen: str, how: str) -> str:
        """Keep how `row` was chosen for the start's line; `how` back, for the event that records it."""
        self.made[row] = (chosen, how)
        return how

    def line(self) -> str | None:
        """E.g. `machine: 2 threads (measured), attention math (read back), eager (train.compile)`; None when
        nothing was chosen."""
        if not self.made:
            return None
        return "machine: " + ", ".join(f"{chosen} ({how})" for chosen, how in self.made.values())

    def say(self, console: Console) -> None:
        """The cache's notes, then the start's line."""
        for note in self.notes:
            console.print(f"[yellow]note: {note}[/yellow]")
        if line := self.line():
            console.print(line, highlight=False)

    def threads(self, chooser: ThreadChooser, model: LanguageModel, rows: int, length: int,
                doing: str = "a forward pass") -> Choice:
        """`chooser`'s threads for `model`'s work of `rows` sequences of `length` tokens: timed on each count the load
        since the chooser was made leaves (or read back), else the one count it leaves."""
        counts = chooser.counts(self.device)
        if len(counts) < 2:
            choice = chooser.decide({}, doing)
            self.said("threads", f"{choice.threads} thread{'s' * (choice.threads > 1)}", choice.reason)
            return choice
        probe = forward_probe(model, rows, length, self.device, self.dtype)
        # The counts the load leaves vary from start to start: the ones timed first are read back, and the most
        # threads within MARGIN of the fastest of them win (the mid-run rule, `stepped`, hears a load that changes).
        shape = threads_shape(model.config, rows, length, self.dtype, chooser.most)
        value, how = self.decide("threads", shape, lambda: {
            "seconds": {str(n): s for n, s in core_threads.time_threads(sorted(counts, reverse=True), probe).items()}})
        assert value is not None, "a thread trial always measures"
        seconds = {int(n): float(s) for n, s in value["seconds"].items()}
        choice = dataclasses.replace(chooser.decide(seconds, doing), how=how)
        chooser.choice = choice
        self.said("threads", f"{choice.threads} of {choice.most} threads", how)
        return choice

    def _key(self, row: str, shape: dict[str, Any]) -> str:
        who = {"machine": processor_identity(self.device), "device": self.device.type, "dtype": str(self.dtype),
               "torch": torch.__version__}
        text = json.dumps({"row": row, "who": who, "shape": shape}, sort_keys=True, default=str)
        return f"{row} {hashlib.sha256(text.encode()).hexdigest()[:24]}"

    def _read(self, key: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        path = cache_path()
        try:
            cache = json.loads(path.read_text())
        except OSError:  # none yet, or none that can be: the write says why
            return {}, None
        except ValueError:
            self._note(f"the machine cache {path} is not valid JSON (damaged, or edited by hand): what it held is "
                       "measured again and the file rewritten.")
            return {}, None
        if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("entries"),
                                                                                               dict):
            self._note(f"the machine cache {path} was written by another lmlab: what it held is measured again.")
            return {}, None
        entries, entry = cache["entries"], cache["entries"].get(key)
        if entry is None:
            return entries, None
        if not isinstance(entry, dict) or entry.get("sha256") != checksum(entry) or not isinstance(entry.get("value"),
                                                                                                  dict):
            self._note(f"the machine cache entry {key} in {path} does not match its checksum (edited by hand, or "
                       "damaged): it is measured again.")
            return entries, None
        return entries, entry

    def _write(self, entries: dict[str, Any]) -> None:
        path = cache_path()
        try:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
        except WriteError as err:  # a cache only saves measuring again
            self._note(f"the machine cache {err.path} cannot be written ({err.reason}): its choices are measured "
                       "again at every start until it can (XDG_CACHE_HOME names another folder for it).")

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

