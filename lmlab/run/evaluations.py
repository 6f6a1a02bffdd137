"""A run's evaluations.json: the results kept of its evaluations (val-split losses, task scores, judgements), a
list per section in which a new result takes the place of an older one with the same key. Written under a lock of
its own, not the run's: a run is evaluated while it trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.core.fileio import atomic_write_text, locked_file
from lmlab.data.tokenizers import json_object

# Each section's results, and the key a new result replaces an older one by: val-split evaluations (a subset's with
# its `max_tokens`), task scores, judgements.
KEYS = {"results": ("weights_sha256", "val_sha256", "dtype", "max_tokens"),
        "tasks": ("weights_sha256", "task_sha256", "limit"), "judgements": ("answers_sha256", "judge_model")}


def kept(run: Path, section: str) -> list[dict[str, Any]]:
    """The results of `section`, oldest first; none where the file is missing or not of this shape."""
    results = json_object(run / "evaluations.json").get(section)
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def keep(run: Path, section: str, result: dict[str, Any]) -> None:
    """Add `result` to `section` in place of one of the same key (`KEYS`), the other sections left as they are."""
    with locked_file(run / ".evaluations.lock"):
        others = [r for r in kept(run, section) if any(r.get(k) != result.get(k) for k in KEYS[section])]
        sections = {**json_object(run / "evaluations.json"), section: [*others, result]}
        atomic_write_text(run / "evaluations.json", json.dumps(sections, indent=1))
