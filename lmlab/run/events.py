"""metrics.jsonl's events: the schema of each (docs/ARCHITECTURE.md, a run dir) and the one bounded reader of a line.

Every reader of a run's events goes through `read_events` (by `RunDir.events`): a line that is not JSON,
nests deeper than any event does, is longer than any event is, or is an event of a known name whose fields are
missing or of the wrong type is not an event, and is skipped with its reason, so no reader meets a field it cannot
use. An event of a name not in `SCHEMA` (one of an older or newer lmlab) is kept when its `step`, if it has one, is
an integer.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.core.fileio import open_file
from lmlab.core.jsontext import parse_json

if TYPE_CHECKING:
    from lmlab.core.peak import Peak

MAX_LINE = 1 << 20  # bytes: the longest event written (a `sizing` event with its candidates) is a few KB
MAX_DEPTH = 32  # brackets: events nest 3 deep at most (a `sizing` event's candidates); strings may hold a few more

# A field's type: its JSON kinds. "number" takes null, as a figure that was not finite is written null.
TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,), "integer|null": (int, type(None)), "number": (int, float, type(None)),
    "string": (str,), "string|null": (str, type(None)), "boolean": (bool,), "boolean|null": (bool, type(None)),
    "object|null": (dict, type(None)), "list": (list,),
}


def _fields(required: str, optional: str = "") -> dict[str, tuple[str, bool]]:
    """`name:type` pairs, space-separated, as {name: (type, required)}."""
    return {name: (kind, needed) for text, needed in ((required, True), (optional, False))
            for name, kind in (p.split(":") for p in text.split())}


_PEAK = "peak_flops:number peak_source:string|null peak_quiet:boolean|null"
_STEP = "step:integer"
_FIGURES = "loss:number grad_norm:number lr:number"

# Each event's fields: required ones are what readers cannot do without (a train line's loss, an eval's val_loss);
# the others are checked when present (older runs, and runs written by hand or by other tools, lack some; readers
# take them with .get). docs/ARCHITECTURE.md says what each field is.
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "start": _fields("", "step:integer kind:string lmlab_version:string|null model:string|null architecture:string "
                         "params:integer params_non_embedding:integer params_padding:integer flops_per_token:number "
                         "dataset:string|null tokenizer:string|null init_from:string|null device:string|null "
                         "dtype:string|null dtype_reason:string|null world_size:integer parallel:string|null "
                         f"{_PEAK} train_tokens:integer|null origin:object|null machine:object|null "
                         "plugin:object|null"),
    "train": _fields(f"{_STEP} loss:number", "tokens:integer lr:number elapsed:number grad_norm:number epoch:number "
                                             "tokens_per_sec:number ms_per_step:number mfu:number"),
    "eval": _fields(f"{_STEP} val_loss:number", "tokens:integer elapsed:number train_loss:number "
                                                "best_val_loss:number is_best:boolean train_eval_loss:number "
                                                "val_accuracy:number epoch:number seconds:number"),
    "checkpoint": _fields(_STEP, "best:boolean seconds:number"),
    "skip": _fields(_STEP, _FIGURES),
    "spike": _fields(_STEP, _FIGURES),
    "rollback": _fields(_STEP, "to_step:integer lr_scale:number"),
    "resume": _fields(_STEP, "checkpoint:string device:string|null dtype:string|null world_size:integer "
                             f"machine:object|null {_PEAK}"),
    "threads": _fields(_STEP, "threads:integer most:integer reason:string|null others:number"),
    "machine": _fields(f"{_STEP} choices:object|null"),
    "budget": _fields(_STEP, "seconds:number max_iters:integer spent:number step_seconds:number eval_seconds:number "
                             "checkpoint_seconds:number finish_seconds:number position:number reason:string "
                             "eval_iters:integer warmup:integer"),
    "sizing": _fields("", "budget:number spent:number fit:string|null depth:integer shape:string|null "
                          "params:integer multiplied_params:integer tokens_per_sec:number threads:integer|null "
                          "steps:integer tokens:integer tokens_per_param:number predicted_val:number "
                          "extrapolated:boolean learning_rate:number warmup_iters:integer candidates:list"),
    "end": _fields(_STEP, "tokens:integer elapsed:number lr:number stopped_early:boolean stopped_by:string|null "
                          "best_val_loss:number best_step:integer|null best_epoch:integer base_val_loss:number "
                          "budget_seconds:number budget_spent:number"),
}


def _event(line: bytes) -> dict[str, Any] | str:
    """A line as an event, or why it is not one."""
    if _depth(line) > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    try:
        event = parse_json(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not JSON in UTF-8"
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return "not an object with an event name"
    name = event["event"]
    fields = SCHEMA.get(name, {"step": ("integer", False)})
    for field, (kind, required) in fields.items():
        if field not in event:
            if required:
                return f"{_a(name)} event without {field}"
            continue
        value = event[field]
        if not isinstance(value, TYPES[kind]) or (isinstance(value, bool) and bool not in TYPES[kind]):
            return f"{_a(name)} event whose {field} is not {_a(kind.replace('|', ' or '))}"
        if not _finite(value):
            return f"{_a(name)} event whose {field} is {str(value)[:20]}, past any figure lmlab writes"
    return event


def _finite(value: Any) -> bool:
    """A number lmlab can have written: standard JSON (no NaN or Infinity: those are written null), an integer
    within 64 bits (a step of 10^400 parses, and overflows every reader that does arithmetic or plots with it)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or isinstance(value, bool) or abs(value) < 2**63


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _depth(line: bytes) -> int:
    """How deep a line's brackets nest, an upper bound (brackets inside strings count too): checked before parsing,
    as json's parser recurses once a level and a line of many brackets ends in RecursionError."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    for byte in line.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def read_events(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl (the first `limit` of them), each read against its schema, a line at a
    time and bounded (at most MAX_LINE bytes of a line are held). A damaged line is skipped, said once per file
    on stderr with its line number and why; a last line cut short by a crash silently."""
    try:
        f = open_file(path)  # a pipe or a device put in its place is refused, not read without end
    except FileNotFoundError:
        return []
    events, damaged = [], {}
    with f:
        for number, line in enumerate(iter(functools.partial(f.readline, MAX_LINE + 1), b""), 1):
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while (line := f.readline(MAX_LINE)) and not line.endswith(b"\n"):
                    pass  # the rest of an overlong line, read in bounded pieces and dropped
                event: dict[str, Any] | str = f"longer than {MAX_LINE:,} bytes"
            else:
                event = _event(line)
            if isinstance(event, str):
                if line.endswith(b"\n"):  # not the unfinished end of a killed writer's last append
                    damaged[number] = event
                continue
            events.append(event)
            if limit is not None and len(events) >= limit:
                break
    if damaged and (limit is None or len(events) < limit):
        _say_damaged(path, damaged)
    elif damaged:
        read_events(path)  # says every damaged line of the file, where a first few events were read
    return events


_said: set[tuple[Path, tuple[int, ...]]] = set()  # damaged lines already reported by this process


def _say_damaged(path: Path, lines: dict[int, str]) -> None:
    """One line on stderr naming a file's damaged lines and why (the first five), once per process (a command reads
    a run's events often)."""
    key = (path.resolve(), tuple(lines))
    if key in _said:
        return
    _said.add(key)
    named = [f"{n} ({why})" for n, why in list(lines.items())[:5]] + \
        ([f"{len(lines) - 5} more"] if len(lines) > 5 else [])
    shown = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    print(f"note: {path}: line{'s' * (len(lines) > 1)} {shown} {'are' if len(lines) > 1 else 'is'} not events of "
          "metrics.jsonl's schema and skipped; the run reads as if they were not there.", file=sys.stderr)


def as_json(value: Any) -> str:
    """`value` as standard JSON, every non-finite number (a NaN loss, an infinite grad norm, the best val loss of a
    run stopped before its first evaluation) as null: Python's json writes them as NaN and Infinity, which other
    readers (jq, JavaScript, pandas' strict parser) refuse."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(finite(value), allow_nan=False)


def peak_fields(peak: Peak | None, world_size: int) -> dict[str, Any]:
    """`peak_flops` (the job's: every rank's), `peak_source` (how and when it was had) and `peak_quiet`."""
    if peak is None:
        return {"peak_flops": None, "peak_source": None, "peak_quiet": None}
    return {"peak_flops": peak.flops * world_size, "peak_source": peak.describe(), "peak_quiet": peak.quiet}
