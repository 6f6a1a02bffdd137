"""A write-up as a list of blocks (headings, paragraphs, tables, images, code, bullet lists, folded sections),
rendered as Markdown that a code host shows as is, or as one self-contained HTML page with its images inlined.

Inline text may hold `code` and **bold**, nothing else: both renderers understand exactly that much.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


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
    alt: str


@dataclass
class Code:
    text: str
    language: str = "text"


@dataclass
class Folded:
    """Blocks shown on request (`<details>`, which GitHub's Markdown and every browser understand)."""

    summary: str
    blocks: list[Block]


Block = Heading | Paragraph | Bullets | Table | Image | Code | Folded


def to_markdown(title: str, blocks: list[Block]) -> str:
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
        return f"![{block.alt}]({block.file})"
    if isinstance(block, Code):
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", block.text)), default=0))
        return f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}"
    inner = "\n\n".join(_markdown(b) for b in block.blocks)
    return f"<details><summary>{html.escape(block.summary)}</summary>\n\n{inner}\n\n</details>"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def to_html(title: str, blocks: list[Block], folder: Path) -> str:
    """One page with no outside references: images (files in `folder`) are inlined as data URIs."""
    body = "\n".join(_html(b, folder) for b in blocks)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
         "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem}"
         "th{background:#f3f3f3}td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
         ".scroll{overflow-x:auto}"
         "pre{background:#f6f6f6;padding:.8rem;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}"
         "code{background:#f3f3f3;padding:0 .2rem}pre code{background:none;padding:0}")


def _html(block: Block, folder: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_inline(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        right = block.right or [False] * len(block.headers)
        head = "".join(f"<th>{_inline(h)}</th>" for h in block.headers)
        rows = "".join("<tr>" + "".join(f"<td{' class=r' if r else ''}>{_inline(c)}</td>" for c, r in zip(row, right))
                       + "</tr>" for row in block.rows)
        return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    if isinstance(block, Image):
        data = base64.b64encode((folder / block.file).read_bytes()).decode()
        return f"<p><img alt=\"{html.escape(block.alt)}\" src=\"data:image/png;base64,{data}\"></p>"
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>"
    inner = "\n".join(_html(b, folder) for b in block.blocks)
    return f"<details><summary>{html.escape(block.summary)}</summary>\n{inner}\n</details>"


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** as HTML."""
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(p)) for p in parts)
