"""Model kinds from other packages: a package registers a kind under the `lmlab.models` entry point group, e.g.

    [project.entry-points."lmlab.models"]
    context-vector = "lmlab_context_vector:ContextVectorLM"

and `[model] kind = "context-vector"` builds it: the entry point is called with the run's ModelConfig (its own
settings in `config.options`, the [model.options] table) and returns a `LanguageModel`. Only installed entry points
are loaded (importlib.metadata): nothing is imported from a path a config or a run folder names.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from lmlab.core.config import PLUGIN_GROUP, ModelConfig, UnknownKind
from lmlab.core.errors import UserError
from lmlab.model.base import LanguageModel


def _entry_point(kind: str) -> EntryPoint:
    found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == kind]
    if not found:
        raise UnknownKind(kind)
    return found[0]


def provider(kind: str) -> dict[str, Any]:
    """The installed package that provides a model kind: {"package", "version", "entry_point"} (kept in a run's
    start event, so that loading the run where it is not installed names the package)."""
    ep = _entry_point(kind)
    return {"package": ep.dist.name if ep.dist else None, "version": ep.dist.version if ep.dist else None,
            "entry_point": ep.value}


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip() or '-').splitlines()[0]}"


def build_plugin(config: ModelConfig) -> LanguageModel:
    """The model a plugin builds from `config`. A plugin that fails to import or to build, or that returns something
    other than a LanguageModel, is refused in one sentence naming the plugin and its package."""
    ep = _entry_point(config.kind)
    who = f"the model plugin {config.kind!r} (package {ep.dist.name if ep.dist else 'unknown'}, {ep.value})"
    try:
        factory = ep.load()
    except Exception as err:  # a plugin's import can raise anything; what matters is that it failed, and why
        raise UserError(f"{who} fails to import ({_first_line(err)}); fix or reinstall the package.")
    try:
        model = factory(config)
    except UserError:  # the plugin's own sentence, e.g. about an option it does not take
        raise
    except Exception as err:
        raise UserError(f"{who} cannot build a model from [model] and [model.options] ({_first_line(err)}).")
    if not isinstance(model, LanguageModel):
        raise UserError(f"{who} returned a {type(model).__name__}, not a model: its entry point must build an "
                        "lmlab.model.LanguageModel from the ModelConfig.")
    model.config = config  # what training, sampling and checkpoints read the shape from
    return model
