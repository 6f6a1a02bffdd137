"""How a model plugin declares that it grows (`Growth`), so that lmlab sizes it along its depth as it sizes a GPT
(lmlab.experiments.family): which of its settings is its depth and which its width. lmlab.model.plugins reads a
plugin's declaration and checks it against the preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmlab.core.config import ModelConfig

OPTION = "options."  # what names a key of [model.options] rather than a [model] field


@dataclass(frozen=True)
class Growth:
    """The setting that is a plugin's depth (its layers) and the one that is its width, each a [model] field
    ("n_layer") or a key of [model.options] ("options.hidden") that the preset sets to a whole number. Depth d of its
    family sets the depth to d and the width to d x the preset's width per layer, as a GPT's family does; a fit's LR
    rule reads that width. A plugin declares it as the `growth` of its entry point (the model class, or the function
    that builds it)."""

    depth: str
    width: str

    def setting(self, config: ModelConfig, part: str) -> Any:
        """What `config` sets as the `part` ("depth" or "width") this names; None where it has no such setting."""
        name: str = getattr(self, part)
        if name.startswith(OPTION):
            return config.options.get(name.removeprefix(OPTION))
        return getattr(config, name) if name in {f.name for f in dataclasses.fields(config)} else None

    def grown(self, config: ModelConfig, depth: int, width: int) -> ModelConfig:
        """`config` at `depth` and `width`, its other settings and options kept."""
        sized = {self.depth: depth, self.width: width}
        options = {name.removeprefix(OPTION): v for name, v in sized.items() if name.startswith(OPTION)}
        fields: dict[str, Any] = {name: v for name, v in sized.items() if not name.startswith(OPTION)}
        return dataclasses.replace(config, **fields, options={**config.options, **options})
