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
from typing import TYPE_CHECKING, TypeVar

import torch

from lmlab.core import cache as machine_cache
from lmlab.core.config import ModelConfig
from lmlab.core.plugin_kinds import BUILT_IN_KINDS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # what `kind` makes, from the fields asdict keeps


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
    key = [what, dataclasses.asdict(config), [str(e) for e in extra], _code()]
    try:
        return kind(**machine_cache.recall("memory", key))
    except TypeError:  # not kept, or kept by a version whose fields differ
        pass
    value = measure()
    machine_cache.keep("memory", key, dataclasses.asdict(value))
    return value
