"""The API's own checks of arguments that the command line's parser checks for the commands: a bad value is one
sentence naming the argument (`lmlab.UserError`), before anything loads."""

from __future__ import annotations

from typing import Any

from lmlab.core.config import MAX_COUNT, SamplingParams
from lmlab.core.errors import UserError


def shown(value: Any) -> str:
    """A value as a sentence shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value: Any) -> Any:
    """`value`, refused unless it is an integer (its range is checked where the command line's value is)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} is {shown(value)}; it must be a whole number.")
    return value


def number(name: str, value: Any) -> Any:
    """`value`, refused unless it is a number (its range is checked where the command line's value is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} is {shown(value)}; it must be a number.")
    return value


def whole(name: str, value: Any, low: int = 1) -> int:
    """`value`, refused unless it is a whole number from `low` to 2**53 (what the command line's `count` type
    takes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_COUNT:
        raise UserError(f"{name} is {shown(value)}; it must be a whole number from {low} to 2**53.")
    return value


def sampling_params(settings: dict[str, Any]) -> SamplingParams:
    """SamplingParams of the keyword arguments a sampling method was given: their types checked here, their ranges
    by SamplingParams in the sentences the command line's values get; an unknown name is refused with the names
    there are."""
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UserError(f"{', '.join(unknown)} is no sampling setting; use {', '.join(names)}.")
    for name, value in settings.items():
        if name in ("max_new_tokens", "seed") or (name == "top_k" and value is not None):
            integer(name, value)
        elif name in ("temperature", "top_p"):
            number(name, value)
    stop = settings.get("stop", ())
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UserError(f"stop is {shown(stop)}; it must be a list of strings the text stops at, e.g. [\"\\n\\n\"].")
    return SamplingParams(**{**settings, "stop": tuple(stop)})  # which checks the ranges
