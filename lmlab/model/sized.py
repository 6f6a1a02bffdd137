"""Memory estimates kept between processes: sizing a model on the meta device runs its forward there, which makes
torch import its compiler stack (torch._dynamo, sympy: 2 to 6 s on 2 cores) at every start of `train`, `eval`,
`sample` and `serve`. An estimate depends only on the model's config, the size asked about, torch and lmlab's model
code, so it is kept, keyed by all of them, in the machine cache (lmlab.core.cache) and measured again only when one
changes. A plugin kind is measured every time (its code is not lmlab's)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from lmlab.core import cache as machine_cache
from lmlab.core.config import ModelConfig
from lmlab.core.plugin_kinds import BUILT_IN_KINDS


@cache
def _code() -> str:
    """A digest of lmlab's model code, which the estimates are of."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def remembered(what: str, config: ModelConfig, measure: Callable[[], list[int]],
               extra: tuple = ()) -> list[int]:
    """`measure()`, the bytes of `what` for `config` and `extra` (a dtype): from the cache when it holds them,
    else measured and kept."""
    if config.kind not in BUILT_IN_KINDS:  # a plugin's code is not lmlab's: measured every time
        return measure()
    key = [what, dataclasses.asdict(config), [str(e) for e in extra], _code()]
    kept = machine_cache.recall("memory", key)
    if isinstance(kept, list) and all(isinstance(n, int) for n in kept):  # else not kept, or kept otherwise
        return kept
    value = measure()
    machine_cache.keep("memory", key, value)
    return value
