"""JSON text from a file lmlab reads (a user's records, prompts, task or corpus, a model folder's config, a run's own
files), parsed by one function whose every failure is a json.JSONDecodeError: the reader that called it says in its
own sentence what is wrong with its file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

NOT_JSON = object()  # what `json_lines` gives for a line that is not JSON


def parse_json(text: str) -> Any:
    """`text` as JSON, or a json.JSONDecodeError (a ValueError): for bad JSON, for arrays or objects nested deeper
    than the parser's recursion goes (it recurses once a level, and Python stops it at about a thousand), and for an
    integer of more digits than Python reads (4,300)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply", text, 0) from None
    except ValueError as err:
        raise json.JSONDecodeError(str(err).split(";")[0], text, 0) from None


def json_sha256(value: Any) -> str:
    """The sha256 of a JSON value, its keys sorted (what is no JSON as its str): a digest of facts that does not
    depend on their order, what a cache's key or a tokenizer's identity is."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, str, Any]]:
    """(number from 1, line, value) of every non-blank line of a JSON-lines file, the value NOT_JSON where the line is
    not JSON: its reader refuses what it cannot use in a sentence of its own."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                value = parse_json(line)
            except json.JSONDecodeError:
                value = NOT_JSON
            yield number, line, value
