"""The model kinds a config may name: lmlab's own (BUILT_IN_KINDS) and those installed packages register as model
plugins (entry points of PLUGIN_GROUP, found by name without importing them), and what a plugin's [model.options]
may hold. lmlab.model.plugins builds and checks the plugins themselves."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from typing import Any

from lmlab.core.errors import UserError

BUILT_IN_KINDS = ("gpt", "recurrent")  # model.kind also takes the name of an installed model plugin
PLUGIN_GROUP = "lmlab.models"  # the entry point group a package registers a model kind under


class UnknownKind(UserError):
    """model.kind names no built-in kind and no installed model plugin."""

    def __init__(self, kind: str):
        self.kind = kind
        plugins = ", ".join(plugin_kinds()) or "none"
        super().__init__(f"model.kind is {kind!r}, which is neither one of lmlab's ({', '.join(BUILT_IN_KINDS)}) nor a "
                         f"model plugin installed here (installed: {plugins}); install the package that registers it "
                         f"under the {PLUGIN_GROUP} entry point group.")


def plugin_kinds() -> list[str]:
    """The model kinds installed packages register (entry points of PLUGIN_GROUP): names only, nothing imported."""
    return sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)})


def check_options(options: Any, where: str) -> dict[str, Any]:
    """A plugin's [model.options]: a table of names to TOML values (text, numbers, booleans, lists of them)."""
    if not isinstance(options, dict):
        raise UserError(f"{where} must be a table of a model plugin's settings, e.g. [model.options] with "
                        "context_size = 256.")
    for key, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            if type(item) not in (str, int, float, bool) or (type(item) is float and not math.isfinite(item)):
                raise UserError(f"{where}.{key} is {value!r}; a plugin's setting is text, a finite number, true or "
                                "false, or a list of them.")
    return dict(options)
