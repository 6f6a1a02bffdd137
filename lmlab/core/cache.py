"""The machine cache, `$XDG_CACHE_HOME/lmlab/machine.json` (default `~/.cache/lmlab/`): the one file that keeps what
was measured on this machine, the matmul peak per dtype (lmlab.core.peak) and a config's step timing
(lmlab.train.timing), and what is slow to compute again, memory estimates (lmlab.model.memory.remembered).
Each entry sits under its kind and a digest of what it depends on, with a checksum of its fields, and its value is
checked by its reader before it is trusted. It only saves work: a file that cannot be read, is damaged, edited or
written by another lmlab, an entry that holds what no measurement gives, or a file that cannot be written is a note
(`take_notes`, said once a process) and the value is had again."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.core.fileio import ReadError, WriteError, atomic_write_text, locked_file, os_fix, read_text
from lmlab.core.jsontext import json_sha256, parse_json

FORMAT = 3  # 1 and 2 were peak_flops.json's and machine.json's, each a file of its own
KEPT = 512  # entries kept, the newest: a sweep over many shapes does not grow the file without end
MOST_BYTES = 16 << 20  # what is read of the file: KEPT entries come to a few hundred KB
_notes: dict[str, bool] = {}  # a note and whether it was taken (said)


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "machine.json"


def checksum(entry: dict[str, Any]) -> str:
    """An entry's `sha256`, of its other fields."""
    fields = {k: v for k, v in entry.items() if k != "sha256"}
    return json_sha256(fields)


def entry_key(kind: str, key: Any) -> str:
    """The name of `kind`'s entry for `key` (what its value depends on)."""
    return f"{kind} {json_sha256(key)[:24]}"


def recall(kind: str, key: Any, problem: Callable[[Any], str | None]) -> Any:
    """The value kept for `key`, if it can be trusted: its checksum matches, and `problem(value)` finds nothing in it
    that no measurement here gives (a type, or a figure out of what this machine could do: an edit may recompute the
    checksum), else it says what; None otherwise, with a note."""
    name = entry_key(kind, key)
    entry = _entries().get(name)
    if entry is None:
        return None
    whole = isinstance(entry, dict) and entry.get("sha256") == checksum(entry) and "value" in entry
    if wrong := problem(entry["value"]) if whole else "fields that do not match its checksum":
        _note(f"the machine cache's entry {name} in {cache_path()} holds {wrong} (edited by hand, or damaged): it "
              "is measured again.")
        return None
    return entry["value"]


def keep(kind: str, key: Any, value: Any) -> None:
    """Keep `value` for `key`, beside what other processes kept meanwhile."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked_file(path.with_name(".machine.json.lock")):
            # _read, not _entries: a pipe or a device in the file's place is never written through
            entries = {k: v for k, v in _read().items() if k != entry_key(kind, key)}
            kept = json.loads(json.dumps({"kind": kind, "key": key, "value": value,
                                          "at": time.strftime("%Y-%m-%d %H:%M:%S")}, default=str))
            entries[entry_key(kind, key)] = {**kept, "sha256": checksum(kept)}
            atomic_write_text(path, json.dumps({"format": FORMAT, "entries": dict(list(entries.items())[-KEPT:])},
                                               indent=1))
    except (OSError, ReadError, WriteError) as err:  # of the file or its lock; OSError: its folder cannot be made
        _unusable(err, path)


def take_notes() -> list[str]:
    """What was found wrong with the cache and not yet said, once each per process."""
    fresh = [note for note, said in _notes.items() if not said]
    _notes.update(dict.fromkeys(fresh, True))
    return fresh


def _entries() -> dict[str, Any]:
    try:
        return _read()
    except ReadError as err:
        _unusable(err, cache_path())
        return {}


def _read() -> dict[str, Any]:
    """The entries of the file; none where it is missing or damaged (a note); ReadError where it cannot be read."""
    path = cache_path()
    try:
        cache = parse_json(read_text(path, MOST_BYTES))
    except FileNotFoundError:
        return {}
    except ValueError:  # not UTF-8, or not JSON
        _note(f"the machine cache {path} is not valid JSON (damaged, or edited by hand): what it held is measured "
              "again and the file rewritten.")
        return {}
    if not isinstance(cache, dict) or cache.get("format") != FORMAT or not isinstance(cache.get("entries"), dict):
        _note(f"the machine cache {path} was written by another lmlab: what it held is measured again.")
        return {}
    return cache["entries"]


def _unusable(err: OSError | ReadError | WriteError, path: Path) -> None:
    """Note the file that kept the cache from being read or written (the cache, or its lock), why and the fix."""
    if isinstance(err, (ReadError, WriteError)):
        path, how, why = err.path, "read" if isinstance(err, ReadError) else "written", f"{err.reason}; {err.fix}"
    else:
        how, why = "written", f"{err.strerror}; {os_fix(err, path)}"
    _note(f"the machine cache {path} cannot be {how} ({why}, or set XDG_CACHE_HOME to another folder): what it would "
          "keep is measured again.")


def _note(note: str) -> None:
    _notes.setdefault(note, False)
