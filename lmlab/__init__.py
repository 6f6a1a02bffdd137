"""lmlab: train GPT-style language models from scratch and measure every step.

From Python, the same runs as the command line (which is built on these; docs/reference/api.md):

    import lmlab
    data = lmlab.prepare("shakespeare", tokenizer="char")
    run = lmlab.train("configs/shakespeare-char-cpu.toml", run="runs/demo", budget="1m", dataset=data)
    run.sample("ROMEO:", max_new_tokens=200)
    lmlab.compare([run, "runs/other"])

Each name loads its module when first used, so `import lmlab` (and the `lmlab` command's start) does not import
torch.
"""

from __future__ import annotations

import importlib
import sys
import types

from lmlab.core.errors import UserError
from lmlab.core.version import __version__

# The public names and the modules that hold them: the API's reference page is written from this list.
API = {"prepare": "lmlab.api.data", "Dataset": "lmlab.api.data", "train": "lmlab.api.training",
       "Run": "lmlab.api.run", "Checkpoint": "lmlab.api.run", "compare": "lmlab.api.compare",
       "Comparison": "lmlab.api.compare"}

__all__ = ["__version__", "UserError", *API]


def __getattr__(name: str) -> object:
    """A name of the API, imported from its module at its first use (PEP 562)."""
    if name not in API:
        raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value  # later uses find it at once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))


class _Package(types.ModuleType):
    """The package, whose API names stay what they are when a subpackage of the same name is imported: Python binds
    an imported subpackage on its parent, and the training loop's package (lmlab.train, imported by its full name:
    `from lmlab.train.loop import Trainer`) would hide the function `lmlab.train`."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
