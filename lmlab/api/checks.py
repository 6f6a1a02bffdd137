"""The API's own checks of arguments, as the command line's parser checks them for the commands: every public function
and method takes its arguments through `checked`, which refuses a value of the wrong kind (`ARGUMENT_KINDS`) and a
thread variable above the cores in one sentence naming the argument, before anything loads."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from lmlab.core.busy import env_threads
from lmlab.core.config import MAX_COUNT, RunConfig, SamplingParams, as_text
from lmlab.core.errors import UserError
from lmlab.inference.quantize import QUANTIZE

F = TypeVar("F", bound=Callable[..., Any])


def of_kind(kind: str, name: str, value: Any) -> None:
    """Refuse `value` unless it is of `kind` (`ARGUMENT_KINDS`; a number's range is checked where the command line's
    value is, but a count's here), in one sentence naming it."""
    what, test = ARGUMENT_KINDS[kind.rstrip("?")]
    if not test(value) and not (kind.endswith("?") and value is None):
        optional = " or None" if kind.endswith("?") else ""
        raise UserError(f"{name} is {as_text(repr(value))}; it must be {what}{optional}.")


def sampling_params(settings: dict[str, Any]) -> SamplingParams:
    """SamplingParams of the keyword arguments a sampling method was given: types checked here, ranges by
    SamplingParams; an unknown name is refused with the names there are."""
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UserError(f"{', '.join(unknown)} is no sampling setting; use {', '.join(names)}.")
    for name, value in settings.items():
        if name != "stop" and not (name == "top_k" and value is None):
            of_kind("number" if name in ("temperature", "top_p") else "integer", name, value)
    stop = settings.get("stop", ())
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UserError(f"stop is {as_text(repr(stop))}; it must be a list of strings the text stops at, "
                        "e.g. [\"\\n\\n\"].")
    return SamplingParams(**{**settings, "stop": tuple(stop)})  # which checks the ranges


def pandas_for(method: str, instead: str, what: str) -> Any:
    """The pandas module, which `method` needs; where it is not installed, a sentence naming `instead`: the same
    `what` as a list of records."""
    try:
        import pandas
    except ImportError:
        raise UserError(f"{method}() needs pandas, which is not installed; `pip install pandas`, or read {instead} "
                        f"(the same {what} as a list of records).") from None
    return pandas


def _path(value: Any) -> bool:
    """A path as the commands take one: a str or os.PathLike, not empty ("" would be the current folder)."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value) not in ("", b"")


def _run(value: Any) -> bool:
    """A run's path, or an lmlab.Run (looked up, not imported: lmlab.api.run imports this module)."""
    module = sys.modules.get("lmlab.api.run")
    return _path(value) or (module is not None and isinstance(value, module.Run))


def _many(one: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """One such value, or a collection of them (a generator is made a list first: `checked`)."""
    return lambda v: one(v) or (isinstance(v, Iterable) and not isinstance(v, (str, bytes)) and all(map(one, v)))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A kind of argument: what it must be, in the sentence that refuses it, and the test of a value. "?" after a kind's
# name in `checked` takes None too.
ARGUMENT_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "text": ("a string", lambda v: isinstance(v, str)),
    "name": ("a string that is not empty", lambda v: isinstance(v, str) and v.strip() != ""),
    "texts": ("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
    "flag": ("True or False", lambda v: isinstance(v, bool)),
    "quantize": (" or ".join(map(repr, QUANTIZE)), lambda v: v in QUANTIZE),
    "integer": ("a whole number", _int),
    "count": ("a whole number from 1 to 2**53", lambda v: _int(v) and 1 <= v <= MAX_COUNT),  # the CLI's `count`
    "number": ("a number", lambda v: _int(v) or isinstance(v, float)),
    "path": ("a path that is not empty (a str or pathlib.Path)", _path),
    "paths": ("a path, or a list of paths, none empty", _many(_path)),
    "spec": ("a name or a path that is not empty, e.g. \"bpe:8000\" or a tokenizer's folder", _path),
    "config": ("a TOML config's path or a RunConfig", lambda v: isinstance(v, RunConfig) or _path(v)),
    "run": ("a run folder's path or an lmlab.Run", _run),
    "runs": ("a run folder's path or an lmlab.Run, or a list of them", _many(_run)),
    "words": ("a string or a list of strings", _many(lambda v: isinstance(v, str))),
    "checkpoint": ("a checkpoint: \"best\", \"latest\", \"step_N\" or \"N\"", lambda v: isinstance(v, str) and v != ""),
    "duration": ("seconds, or a duration like \"30s\", \"5m\" or \"2h\"",
                 lambda v: _int(v) or isinstance(v, (float, str))),
    "size": ("a size: \"auto\" or a depth (a whole number)", lambda v: _int(v) or isinstance(v, str)),
    "console": ("a rich.console.Console", lambda v: type(v).__name__ == "Console" or hasattr(v, "print")),
}


MANY = ("texts", "paths", "words", "runs")  # the kinds that take a collection


def checked(**kinds: str) -> Callable[[F], F]:
    """The public function or method it decorates refuses, in one sentence naming the argument, a value not of its
    kind (`name="path?"`: a path or None), and a thread variable above the cores (`env_threads`), before it runs."""
    for kind in kinds.values():
        assert kind.rstrip("?") in ARGUMENT_KINDS, kind

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        assert set(kinds) <= set(signature.parameters), (func, kinds)

        @functools.wraps(func)
        def entry(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise UserError(f"{func.__qualname__}(): {err}; see help({func.__qualname__}).") from None
            given = bound.arguments
            for name, kind in kinds.items():
                if name in given:
                    if kind.rstrip("?") in MANY and isinstance(given[name], Iterator):
                        given[name] = list(given[name])  # read once: checked, then passed on
                    of_kind(kind, name, given[name])
            env_threads()
            return func(*bound.args, **bound.kwargs)

        entry.__checked__ = kinds  # type: ignore[attr-defined]  # what tests/test_api.py finds on every entry
        return entry  # type: ignore[return-value]

    return decorate
