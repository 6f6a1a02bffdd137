"""Memory estimates kept between processes: sizing a model on the meta device runs its forward there, which makes
torch import its compiler stack (torch._dynamo, sympy: 2 to 6 s on 2 cores) at every start of `train`, `eval`,
`sample` and `serve`. An estimate depends only on the model's config, the size asked about, torch and lmlab's model
code, so it is kept, keyed by all of them, in `$XDG_CACHE_HOME/lmlab/memory.json` and measured again only when one
changes. A plugin kind is measured every time (its code is not lmlab's). A cache that cannot be read or written is
passed over: the estimate is measured, as without it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lmlab.core.config import ModelConfig
from lmlab.core.plugin_kinds import BUILT_IN_KINDS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
from lmlab.core.fileio import WriteError, atomic_write_text
from lmlab.core.jsontext import parse_json

FORMAT = 1
T = TypeVar("T", bound="DataclassInstance")  # what `kind` makes, from the fields asdict keeps
KEPT = 256  # estimates kept, the newest: a sweep over many shapes does not grow the file without end


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "memory.json"


@cache
def _code() -> str:
    """A digest of lmlab's model code, which the estimates are of."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def remembered(what: str, config: ModelConfig, extra: tuple, measure: Callable[[], T], kind: type[T]) -> T:
    """`measure()`, a `kind` (a dataclass of numbers: `memory.Need`), of `what` for `config` and `extra` (the
    optimizer, a dtype, ...): from the cache when it holds it, else measured and kept."""
    if config.kind not in BUILT_IN_KINDS:  # a plugin's code is not lmlab's: measured every time
        return measure()
    key = hashlib.sha256(json.dumps([what, dataclasses.asdict(config), [str(e) for e in extra], _code()],
                                    sort_keys=True, default=str).encode()).hexdigest()
    try:
        return kind(**_read()[key])
    except (KeyError, TypeError):  # not kept, or kept by a version whose fields differ
        pass
    value = measure()
    entries = {k: v for k, v in _read().items() if k != key}  # read now: another process may have written since
    entries[key] = dataclasses.asdict(value)
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file(), json.dumps({"format": FORMAT, "entries": dict(list(entries.items())[-KEPT:])}))
    except (OSError, WriteError):  # a read-only home: measured at every start, as without the cache
        pass
    return value


def _read() -> dict[str, Any]:
    try:
        kept = parse_json(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept.get("entries", {}) if isinstance(kept, dict) and kept.get("format") == FORMAT else {}
