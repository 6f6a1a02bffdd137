"""Config files read into lmlab.core.config's dataclasses and written back: TOML presets and config.toml, `--set
section.key=value` overrides, and older spellings of settings. Every value is checked for type; an unknown key is an
error that lists the valid ones."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from lmlab.core.config import (
    MAX_BUDGET_SECONDS,
    MAX_COUNT,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    as_text,
)
from lmlab.core.errors import UserError
from lmlab.core.fileio import read_text
from lmlab.core.plugin_kinds import check_options

MOST_BYTES = 1 << 20  # of a config file: a resolved config.toml is a few KB
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "finetune": FinetuneConfig}


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Check a TOML or command-line value against a field's type; ints widen to floats."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise UserError(f"{where} is an integer of {len(str(value)):,} digits, beyond any number it may be.")
    if kind is float and type(value) is float and not math.isfinite(value):  # a float, but no number to use
        raise UserError(f"{where} is {value}; it must be a finite number.")
    if type(value) is not kind:
        raise UserError(f"{where} must be {kind.__name__}, got {as_text(repr(value))} ({type(value).__name__}).")
    return value


def _parse_literal(text: str) -> Any:
    """A `--set` value is read as a TOML value, so `3e-4`, `true` and `"x"` mean what they do in a preset."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as `bfloat16` or a path is a string


def _qkv_bias(value: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    if not _coerce(where, value, bool):
        return {}
    if values.get("bias", True) is not False:
        raise UserError(f"{where} = true adds biases to the query/key/value projection of a model that has no others "
                        "(model.bias = false, as Qwen2); with model.bias set every place it names has them already: "
                        "set model.qkv_bias = false, or list qkv in model.bias.")
    return {"bias": "qkv"}


def _max_seconds(value: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    seconds = _coerce(where, value, float)
    if not 0 <= seconds <= MAX_BUDGET_SECONDS:
        raise UserError(f"{where} ({seconds}) must be 0 (no limit) or positive, at most {MAX_BUDGET_SECONDS:,} (366 "
                        "days).")
    if seconds and values.get("budget_seconds"):
        raise UserError(f"{where} is the older name of train.budget_seconds; set one of them, the other to 0.")
    return {"budget_seconds": seconds} if seconds else {}


def _eval_every(value: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    if value in ("steps", "epoch"):
        return {"eval_interval": value} if value == "epoch" else {}
    if type(value) in (int, float) and math.isfinite(value) and 0 < value <= MAX_COUNT:
        return {"eval_interval": f"{value} epochs"}
    raise UserError(f"{where} is {as_text(value)}; use \"steps\" (every eval_interval steps), \"epoch\", or a number "
                    "of passes over the train split above 0 and at most 2**53, such as 0.5.")


# Older spellings of a setting, still read from runs' config.toml, presets and --set: each as the settings it
# stands for today (nothing when it is its default), said to be deprecated once a process.
OLD_SPELLINGS = {"model": {"qkv_bias": _qkv_bias}, "train": {"max_seconds": _max_seconds, "eval_every": _eval_every}}
_SAID: set[str] = set()


def _todays_spelling(name: str, values: dict[str, Any], source: str) -> dict[str, Any]:
    values = dict(values)
    for key, read in OLD_SPELLINGS.get(name, {}).items():
        if key in values:
            settings = read(values.pop(key), values, f"{source}: {name}.{key}")
            values.update(settings)
            if settings and f"{name}.{key}" not in _SAID:
                _SAID.add(f"{name}.{key}")
                today = ", ".join(f"{name}.{k} = {toml_value(v)}" for k, v in settings.items())
                print(f"note: {name}.{key} is deprecated and read as {today}; write that instead.", file=sys.stderr)
    return values


def build_section(name: str, values: Any, source: str, overrides: Sequence[str] = ()) -> Any:
    """One section's dataclass from a dict of settings, each checked for type; errors name `source`, or --set for a
    key one of `overrides` set."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: [{name}] must be a table of settings.")
    values = _todays_spelling(name, values, source)
    types = {f.name: f.type for f in dataclasses.fields(SECTIONS[name])}
    given = {(section, _keys(key)[0]) for section, key, _ in map(parse_override, overrides)}
    kwargs = {}
    for key, value in values.items():
        origin = "--set" if (name, key) in given else source
        where = f"{origin}: {name}.{key}"
        if key not in types:
            raise UserError(f"{origin}: unknown key {name}.{as_text(key)}; valid keys in [{name}] are: "
                            f"{', '.join(types)}.")
        if types[key].startswith("dict"):  # model.options: a plugin's table, checked by the plugin
            kwargs[key] = check_options(value, where)
            continue
        kinds = [{"int": int, "float": float, "bool": bool, "str": str}[t] for t in types[key].split(" | ")]
        if len(kinds) > 1 and type(value) in kinds:  # a field that takes either, e.g. compile = true or "auto"
            kinds = [type(value)]
        kwargs[key] = _coerce(where, value, kinds[0])
    return SECTIONS[name](**kwargs)


def build_config(raw: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Build a RunConfig from nested dicts, naming `source` in any error (or --set, for what `overrides` set)."""
    for name in raw:
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section [{as_text(name)}]; valid sections are: {', '.join(SECTIONS)}.")
    return RunConfig(**{name: build_section(name, raw.get(name, {}), source, overrides) for name in SECTIONS
                        if name in raw or name != "finetune"})


def parse_override(item: str) -> tuple[str, str, str]:
    """`section.key=value` as (section, key, value text); `sweep` splits the text into its values."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set {as_text(repr(item))} must look like section.key=value, e.g. train.learning_rate=3e-4.")
    return section, name, text.strip()


def _keys(name: str) -> list[str]:
    """The keys of a dotted name as TOML reads them: `options."a.b"` is options, then a.b."""
    return [part.strip().strip("\"'") for part in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", name)] or [name]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings on top of a raw config dict; `model.options.NAME=value` sets a plugin's
    setting."""
    for item in overrides:
        section, name, text = parse_override(item)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):  # `section` is not a table in the file
            raise UserError(f"--set {as_text(repr(item))}: [{as_text(section)}] is not a section of settings; use "
                            "section.key=value with a section such as model or train.")
        *parents, leaf = _keys(name)
        for parent in parents:
            table = table.setdefault(parent, {}) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            inside = f"{as_text(section)}.{as_text('.'.join(parents))}"
            raise UserError(f"--set {as_text(repr(item))} sets a key inside {inside}, which is not a table.")
        try:
            table[leaf] = _parse_literal(text)
        except ValueError:  # an integer of thousands of digits (beyond Python's int-parsing limit)
            raise UserError(f"--set {as_text(section)}.{as_text(name)}: {text[:20]}... ({len(text):,} characters) is "
                            "too large a number to read; give a number in the setting's range.")
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path, MOST_BYTES))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass a TOML preset such as "
                        "configs/shakespeare-char-cpu.toml.")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as err:  # ValueError: an int of 5,000 digits
        raise UserError(f"{path} is not valid TOML ({err}); fix the file.")


def load_config(path: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML preset and apply overrides; every error names the file or the field."""
    return build_config(apply_overrides(read_toml(path), list(overrides)), str(path), overrides)


def load_finetune_config(path: Path | None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """The [finetune] section of a TOML file (the base run supplies everything else), with overrides."""
    raw = apply_overrides(read_toml(path) if path else {}, list(overrides))
    others = sorted(set(raw) - {"finetune"})
    if others:
        raise UserError(f"{path or '--set'}: fine-tuning reads only [finetune] (the model and the rest come from the "
                        f"base run); remove [{'], ['.join(map(as_text, others))}].")
    return build_section("finetune", raw.get("finetune", {}), str(path or "--set"), overrides)


def to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(value) for name, value in vars(config).items() if value is not None}


def toml_value(value: Any) -> str:
    """A value as TOML writes it (and as a `--set` value is read)."""
    return tomli_w.dumps({"v": value}).partition(" = ")[2].strip()


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML: a table a section, a plugin's settings as [model.options]."""
    return tomli_w.dumps(to_dict(config))
