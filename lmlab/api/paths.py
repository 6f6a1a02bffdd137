"""Where a command or an API call may write: never into a run folder or a dataset dir (their files are what lmlab
keeps), unless it makes that run."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.core.errors import UserError
from lmlab.core.fileio import output_target

# Each folder whose files lmlab keeps: the files every one holds (docs/ARCHITECTURE.md: a run dir), and what
# it keeps.
KEPT = {"run folder": (("config.toml", "metrics.jsonl"), "its weights, config and history"),
        "dataset dir": (("meta.json", "tokenizer.json"), "its tokens, tokenizer and meta.json")}


def _kept_folder(folder: Path) -> str | None:
    """`run folder` or `dataset dir` when `folder` is one, else None (os.path.isfile: a name too long to look up is
    no such folder, and is refused later in its own words)."""
    return next((what for what, (files, _) in KEPT.items()
                 if all(os.path.isfile(folder / f) for f in files)), None)


def check_destination(path: str | Path, option: str, kind: str = "") -> Path:
    """`path`, refused in one sentence when it is a run folder or a dataset dir, or lies in one: what a command
    writes there could replace the files lmlab keeps in it. `kind` "run": a run folder to make, which may be one
    already (its command decides about that) but not a dataset dir; "report": a report's folder, which may be a
    run's own report/; "file": one file, which may be a link (followed) or a stream (written through), never a
    folder, a disk or a socket (`lmlab.core.fileio.output_target`)."""
    path = Path(path)
    resolved = Path(os.path.realpath(path))  # Path.resolve() raises RuntimeError at a loop of links
    for folder in [resolved, *resolved.parents]:
        what = _kept_folder(folder)
        allowed = (folder == resolved and kind == "run" and what == "run folder") or (
            kind == "report" and what == "run folder" and resolved == folder / "report")
        if what and not allowed:
            where = f"is the {what} {folder}" if folder == resolved else f"is inside the {what} {folder}"
            raise UserError(f"{option} {path} {where}, where a command's output could replace "
                            f"{KEPT[what][1]}; choose a path outside it.")
    if kind == "file" or not os.path.isdir(path):  # a folder to make may be there already, but it is never a disk
        output_target(path, option)
    return path
