"""JSON text from a file lmlab reads (a user's records, prompts, task or corpus, a model folder's config, a run's own
files), parsed by one function whose every failure is a json.JSONDecodeError: the reader that called it says in its
own sentence what is wrong with its file."""

from __future__ import annotations

import json
from typing import Any


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
