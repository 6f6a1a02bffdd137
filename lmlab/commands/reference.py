"""docs/reference/commands.md, config.md and api.md, written from the argparse parsers, the config dataclasses and
the Python API themselves, so that the reference cannot disagree with the code: `make docs` writes them, and
tests/test_docs.py fails when a page differs from what this module makes of the code it documents."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
import tokenize
from io import StringIO
from pathlib import Path
from typing import Any

from lmlab.commands.common import HelpFormatter, subcommands
from lmlab.core import config
from lmlab.core.config_toml import SECTIONS, toml_value

WIDTH = 100  # the usage lines' width, fixed so the page is the same on every terminal
GENERATED = ("<!-- Written by `make docs` from {source}; do not edit: change the code and run `make docs`. -->\n")


def cell(text: str) -> str:
    """Text inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def option_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:  # not -h, a group's subcommands, nor a hidden option (finetune --run)
        hidden = action.help == argparse.SUPPRESS
        if hidden or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            takes = "" if action.nargs == 0 else " " + formatter._format_args(action, action.dest.upper())
            name = ", ".join(f"`{flag}{takes}`" for flag in action.option_strings)
        else:
            name = f"`{formatter._format_args(action, action.dest)}`"
        rows.append(f"| {name} | {cell(formatter._expand_help(action))} |")
    return rows


def commands_page() -> str:
    from lmlab.commands import EXAMPLES, build_parser

    commands = subcommands(build_parser())
    for _, _, sub in commands:  # as a terminal WIDTH wide wraps it (argparse keeps 2 free)
        sub.formatter_class = functools.partial(HelpFormatter, width=WIDTH - 2)
    lines = [GENERATED.format(source="the command-line parsers (lmlab/commands)"), "# Commands and options", "",
             "Every `lmlab` command and option, as `lmlab COMMAND --help` prints them. The guides in "
             "[docs/guides](../guides/) show them at work.", ""]
    lines += [f"- [`lmlab {name}`](#lmlab-{name.replace(' ', '-')}): {cell(help_)}"
              for name, help_, _ in commands]
    for name, help_, sub in commands:
        summary = cell(help_)
        lines += ["", f"## lmlab {name}", "", summary[:1].upper() + summary[1:] + ".", "", "```text",
                  sub.format_usage().strip(), "```", "", "| option | what it does |", "|---|---|",
                  *option_rows(sub), "", "Example:", "", "```bash", EXAMPLES[name], "```"]
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source: the comment at the end of its line, or the comment lines just
    above it."""
    source = inspect.getsource(cls)
    docs, above, comments = {}, [], {}
    for token in tokenize.generate_tokens(StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.line.strip().startswith("#"), token.string.lstrip("# ").strip())
    for number, line in enumerate(source.splitlines(), start=1):
        alone, text = comments.get(number, (False, ""))
        if alone:
            above.append(text)
            continue
        name = line.strip().partition(":")[0]
        if name.isidentifier() and name in {f.name for f in dataclasses.fields(cls)}:
            docs[name] = " ".join(above + ([text] if text else []))
        above = []
    return docs


def default_text(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return "{}" if isinstance(field.default_factory(), dict) else "[]"
    return toml_value(field.default)


def listed() -> dict[tuple[type, str], str]:
    """The fields whose choices are an extension table's entries, and those entries as the reference lists them in
    place of the field comment's parenthesis (so a new entry is documented without an edit here)."""
    from lmlab.core import schedules
    from lmlab.train import optim  # imports torch: only when the reference is written

    return {(config.TrainConfig, "optimizer"): optim.choices(), (config.TrainConfig, "schedule"): schedules.choices()}


def config_page() -> str:
    derived = listed()
    lines = [GENERATED.format(source="the config dataclasses (lmlab/core/config.py)"), "# Config files", "",
             "A run's config is a TOML file with the sections below (`configs/` holds the presets). Every key can "
             "be set on the command line too, `--set section.key=value`, e.g. `--set train.learning_rate=3e-4`; "
             "a key left out takes its default. A run folder's `config.toml` holds every key as the run used it.",
             ""]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        intro = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        lines += ["", f"## [{section}]", ""] + ([cell(intro), ""] if intro else [])
        lines += ["| key | type | default | what it sets |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            if not docs.get(field.name):
                raise ValueError(f"{cls.__name__}.{field.name} has no comment to document it; add one in "
                                 "lmlab/core/config.py.")
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            doc = f"{docs[field.name].partition(' (')[0]}: {derived[cls, field.name]}" if (cls, field.name) in derived \
                else docs[field.name]
            lines.append(f"| `{field.name}` | `{cell(kind)}` | `{default_text(field)}` | {cell(doc)} |")
    return "\n".join(lines) + "\n"


def signature(func: Any, name: str) -> str:
    """`name(params) -> result` as the code declares it (annotations as written, not evaluated: some name types
    imported only for type checkers)."""
    parts, star = [], False
    for param in inspect.signature(func).parameters.values():
        if param.name == "self":
            continue
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
        star = star or param.kind in (param.KEYWORD_ONLY, param.VAR_POSITIONAL)
        # inspect's own form of a parameter (`*args`, `name: type = default`), but its annotation, kept as text
        # (`from __future__ import annotations`), unquoted
        parts.append(str(param).replace(repr(param.annotation), str(param.annotation), 1))
    returns = inspect.signature(func).return_annotation
    arrow = "" if returns in (inspect.Signature.empty, None, "None") else f" -> {returns}"
    line = f"{name}({', '.join(parts)}){arrow}"
    return line if len(line) <= WIDTH else f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){arrow}"


def _members(cls: type) -> list[tuple[str, Any]]:
    """A class's public methods (a static one as its function) and properties, in the order its source defines
    them."""
    return [(name, value.__func__ if isinstance(value, staticmethod) else value) for name, value in vars(cls).items()
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, (property, staticmethod)))]


def _class_lines(name: str, cls: type) -> list[str]:
    lines = ["```python", signature(cls, f"lmlab.{name}"), "```", "", inspect.getdoc(cls) or "", ""]
    if dataclasses.is_dataclass(cls):
        docs = field_docs(cls)
        lines += ["| field | type | what it is |", "|---|---|---|"]
        lines += [f"| `{f.name}` | `{cell(str(f.type))}` | {cell(docs.get(f.name, ''))} |"
                  for f in dataclasses.fields(cls)]
        lines.append("")
    for member, value in _members(cls):
        if isinstance(value, property):
            assert value.fget is not None, f"{name}.{member} is a property with no getter"
            returns = inspect.signature(value.fget).return_annotation
            lines += [f"### `{name}.{member}`", "", f"A property: `{returns}`. {inspect.getdoc(value) or ''}", ""]
        else:
            called = f"{name}.{member}" if isinstance(vars(cls)[member], staticmethod) else member
            lines += [f"### `{name}.{member}`", "", "```python", signature(value, called), "```", "",
                      inspect.getdoc(value) or "", ""]
    return lines


def api_page() -> str:
    import lmlab

    lines = [GENERATED.format(source="the Python API's code (lmlab/api)"), "# The Python API", "",
             "What `import lmlab` names: the same runs as the command line, which is built on them (`lmlab train` "
             "calls `lmlab.train`, `lmlab eval` calls `Run.eval`). [docs/notebooks](../notebooks/) shows them at "
             "work. A bad input raises `lmlab.UserError` with the sentence the command prints; in a notebook it "
             "shows as that sentence alone.", ""]
    lines += [f"- [`lmlab.{name}`](#lmlab{name.lower()})" for name in [*lmlab.API, "UserError"]]
    for name in lmlab.API:
        value = getattr(lmlab, name)
        lines += ["", f"## lmlab.{name}", ""]
        if inspect.isclass(value):
            lines += _class_lines(name, value)
        else:
            lines += ["```python", signature(value, f"lmlab.{name}"), "```", "", inspect.getdoc(value) or "", ""]
    lines += ["## lmlab.UserError", "", inspect.getdoc(lmlab.UserError) or ""]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])).rstrip() + "\n"


PAGES = {"commands.md": commands_page, "config.md": config_page, "api.md": api_page}


def main(argv: list[str]) -> int:
    """Write the pages into the folder given (docs/reference by default)."""
    folder = Path(argv[0] if argv else "docs/reference")
    folder.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        (folder / name).write_text(page(), encoding="utf-8")
        print(f"wrote {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
