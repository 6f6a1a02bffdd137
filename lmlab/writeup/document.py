"""A write-up as a list of blocks (headings, paragraphs, tables, images, code, bullet lists, folded sections),
rendered as Markdown that a code host shows as is, or as one self-contained HTML page with its images inlined: that
Markdown rendered as CommonMark with GitHub's tables (markdown-it, which rich brings), raw HTML in it escaped.

Inline text is Markdown: `code` and **bold** are what the sections write. Text from outside lmlab (a run's or a
dataset's name, a path, a prompt, a setting's value, what a run's files say, an error naming any of these) enters it
through `code` or `plain` only, so none of it can close a code span or become a link, an image or a block: the page
stays self-contained whatever the names.
"""

from __future__ import annotations

import base64
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: list[bool] = field(default_factory=list)  # per column: right-aligned (figures); default left


@dataclass
class Image:
    file: str  # a name in the report's folder
    alt: str  # plain text, escaped here


@dataclass
class Code:
    text: str
    language: str = "text"


@dataclass
class Folded:
    """Blocks shown on request (`<details>`, which GitHub's Markdown and every browser understand)."""

    summary: str  # plain text, escaped here
    blocks: list[Block]


Block = Heading | Paragraph | Bullets | Table | Image | Code | Folded


def code(text: object) -> str:
    """Outside text as an inline code span: fenced by one backtick more than its longest run of them (padded where it
    starts or ends with one or a space), its line breaks written `\\n`, since a block could begin on the next line."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    fence = "`" * (1 + max(map(len, re.findall("`+", text)), default=0))
    pad = " " if text[:1] in "` " or text[-1:] in "` " else ""  # CommonMark takes one space off each end
    return f"{fence}{pad}{text}{pad}{fence}"


def plain(text: object) -> str:
    """Outside text, or a sentence holding some (an error naming a path), as literal text: on one line, every
    character that opens inline Markdown escaped (but `_` inside a word, as in a path, where it cannot), and at its
    start what would open a block (`- `, `---`, `1. `)."""
    text = re.sub(r"[\\`*\[\]<>!#~&]|(?<![^\W_])_|_(?![^\W_])", r"\\\g<0>", " ".join(str(text).split()))
    text = re.sub(r"^[-+](?=[\s-]|$)", r"\\\g<0>", text)
    return re.sub(r"^\d+(?=[.)](\s|$))", r"\g<0>\\", text)


def to_markdown(title: str, blocks: list[Block]) -> str:
    """The document as Markdown; `title` is Markdown too (outside text in it through `code` or `plain`)."""
    return "\n\n".join([f"# {title}", *map(_markdown, blocks)]) + "\n"


def _markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        right = block.right or [False] * len(block.headers)
        lines = [_row(block.headers), "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        return "\n".join(lines + [_row(row) for row in block.rows])
    if isinstance(block, Image):
        return f"![{plain(block.alt)}]({urllib.parse.quote(block.file)})"
    if isinstance(block, Code):
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", block.text)), default=0))
        return f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}"
    inner = "\n\n".join(_markdown(b) for b in block.blocks)  # the summary on one line: a blank one ends HTML
    return f"<details><summary>{html.escape(' '.join(block.summary.split()))}</summary>\n\n{inner}\n\n</details>"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def to_html(title: str, blocks: list[Block], folder: Path) -> str:
    """One page with no outside references: images (files in `folder`) are inlined as data URIs."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = "\n".join(_html(b, folder, renderer) for b in [Heading(title, 1), *blocks])
    text = re.sub(r"<[^>]*>", "", renderer.renderInline(title))  # the title's text, escaped, for the browser's tab
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{text}</title>\n"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
         "table{border-collapse:collapse;margin:1rem 0;display:block;overflow-x:auto}"
         "th,td{border:1px solid #ccc;padding:.25rem .6rem}th{background:#f3f3f3}"
         "td[style*=right]{font-variant-numeric:tabular-nums;white-space:nowrap}"
         "pre{background:#f6f6f6;padding:.8rem;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}"
         "code{background:#f3f3f3;padding:0 .2rem;overflow-wrap:anywhere}pre code{background:none;padding:0}"
         # On paper nothing scrolls: a table is as wide as the page, its figures wrapping where they must.
         "@media print{body{max-width:none;margin:0;padding:0;font-size:10pt}table{display:table;font-size:8.5pt}"
         "th,td{padding:.1rem .3rem}td[style*=right]{white-space:normal}h2,h3{break-after:avoid}"
         "tr,img{break-inside:avoid}}")


def _html(block: Block, folder: Path, renderer: Any) -> str:
    """A block as HTML: its Markdown rendered, but for an image, inlined, and a folded section, whose blocks are."""
    if isinstance(block, Image):
        data = base64.b64encode((folder / block.file).read_bytes()).decode()
        return f"<p><img alt=\"{html.escape(block.alt)}\" src=\"data:image/png;base64,{data}\"></p>"
    if isinstance(block, Folded):
        inner = "\n".join(_html(b, folder, renderer) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"
    return renderer.render(_markdown(block))
