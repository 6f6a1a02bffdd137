"""Multiple-choice tasks (`lmlab eval --task`): a JSON-lines file of items, each a context, its choices and the index of
the right one, in HellaSwag's layout as distributed (prepared as lm-evaluation-harness's `hellaswag` task prepares it,
so the scores are its) or the generic `{"context": str, "choices": [str, ...], "answer": INDEX}`. A choice is scored as
the continuation of its context after one space; a line that holds no item is refused naming the file, the line and the
field."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.core.errors import UserError
from lmlab.core.fileio import read_bytes
from lmlab.core.jsontext import json_lines
from lmlab.data.corpora import hf_rows
from lmlab.data.tokenizers import Tokenizer
from lmlab.inference.generate import document_start
from lmlab.inference.scoring import Choice, loglikelihoods
from lmlab.run.rundir import LoadedRun

LAYOUTS = {"hellaswag": ("activity_label", "endings", "label"), "generic": ("context", "choices", "answer")}
GENERIC = '{"context": "...", "choices": ["...", "..."], "answer": 0}'
DELIMITER = " "  # between a context and each choice


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int  # where it was in its file (the row, counting from 1, of an hf: dataset)


@dataclass(frozen=True)
class Task:
    """The items of a task file, its layout, and the sha256 of what was read (results are kept by it)."""

    name: str
    source: str
    layout: str
    items: tuple[Item, ...]
    sha256: str

    @property
    def chance(self) -> float:
        """The accuracy of a guess: the mean over the items of 1 / their number of choices."""
        return sum(1 / len(item.choices) for item in self.items) / len(self.items)


def load_task(source: str, limit: int | None = None) -> Task:
    """The task at `source` (a JSON-lines file, or `hf:OWNER/NAME[:SPLIT]`), its first `limit` items if given."""
    if source.startswith("hf:"):
        name, rows = _hf_rows(source)
        data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode("utf-8")
        numbered = list(enumerate(rows, 1))
    else:
        path = Path(source)
        try:
            data = read_bytes(path)
        except OSError as err:  # missing (what cannot be read is a ReadError)
            raise UserError(f"task file {path} cannot be read ({err.strerror or err}); pass a JSON-lines file of "
                            "items (README: Evaluating).")
        name, numbered = path.name.removesuffix(".jsonl").removesuffix(".json"), _json_lines(path, data)
    if not numbered:
        raise UserError(f"task {source} holds no items; write one JSON object per line, e.g. {GENERIC}.")
    layout = _layout(source, *numbered[0])
    items = tuple(_item(source, layout, n, row) for n, row in numbered[:limit])
    return Task(name, source, layout, items, hashlib.sha256(data).hexdigest())


def _json_lines(path: Path, data: bytes) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"task file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON lines.")
    rows = []
    for n, line, row in json_lines(text.splitlines()):
        if not isinstance(row, dict):
            hint = " (a JSON list: write one object per line instead)" if n == 1 and line.lstrip().startswith("[") \
                else ""
            raise UserError(f"task file {path}, line {n}, is not a JSON object{hint}; each line is one item, "
                            f"e.g. {GENERIC}.")
        rows.append((n, row))
    return rows


def _hf_rows(source: str) -> tuple[str, list[dict[str, Any]]]:
    """`hf:OWNER/NAME[:SPLIT]` (split `validation` unless named) through the `datasets` library."""
    name, _, split = source.removeprefix("hf:").partition(":")
    rows = hf_rows(source, f"--task {source}", ("the task as JSON lines", "a local file"), "the name and split",
                   split=split or "validation")
    return re.sub(r"[^\w.-]", "-", name) + (f"-{split}" if split else ""), [dict(row) for row in rows]


def _layout(source: str, line: int, row: dict[str, Any]) -> str:
    for layout, fields in LAYOUTS.items():
        if fields[1] in row:
            return layout
    raise UserError(f"task {source}, line {line}, is neither layout: a HellaSwag line has `endings`, a generic one "
                    f"`choices`, e.g. {GENERIC}.")


def _item(source: str, layout: str, line: int, row: dict[str, Any]) -> Item:
    where = f"task {source}, line {line},"
    missing = [f for f in LAYOUTS[layout] if f not in row]
    if layout == "hellaswag" and "ctx" not in row and not {"ctx_a", "ctx_b"} <= row.keys():
        missing.append("ctx")
    if missing:
        raise UserError(f"{where} has no `{missing[0]}`: a {layout} line needs {', '.join(LAYOUTS[layout])} and "
                        f"{'ctx (or ctx_a and ctx_b)' if layout == 'hellaswag' else 'nothing else'}.")
    if layout == "hellaswag":
        texts = [row["activity_label"], row.get("ctx_a", ""), row.get("ctx_b", ""), row.get("ctx", "")]
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"{where} has a context field that is not text; activity_label, ctx_a, ctx_b and ctx "
                            "are strings.")
        context = row["activity_label"] + ": " + (row["ctx_a"] + " " + row["ctx_b"].capitalize()
                                                  if "ctx_a" in row and "ctx_b" in row else row["ctx"])
        return _checked(where, hellaswag_text(context), row["endings"], row["label"], "endings", "label", line,
                        hellaswag_text)
    if not isinstance(row["context"], str):
        raise UserError(f"{where} `context` is {row['context']!r}; it must be text (it may be empty).")
    return _checked(where, row["context"], row["choices"], row["answer"], "choices", "answer", line, str)


def _checked(where: str, context: str, choices: Any, answer: Any, field: str, key: str, line: int,
             prepare: Callable[[str], str]) -> Item:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where} `{field}` must be a list of at least two texts.")
    prepared = tuple(prepare(c) for c in choices)
    for text in (context, *prepared):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate ("\ud800" in the JSON): no tokenizer encodes it
            raise UserError(f"{where} holds {text[err.start]!r}, half of a UTF-16 pair and not a character; fix "
                            "the text (or drop the item).")
    empty = [i for i, c in enumerate(prepared) if not c.strip()]
    if empty:
        raise UserError(f"{where} choice {empty[0]} of `{field}` is empty; every choice needs text to be scored.")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)  # HellaSwag's labels are strings
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where} `{key}` is {answer!r}; it must be the index of the right choice, from 0 (a "
                        "HellaSwag test split has no labels: use the val split).")
    if not 0 <= answer < len(prepared):
        raise UserError(f"{where} `{key}` is {answer}, out of range for {len(prepared)} choices (0 to "
                        f"{len(prepared) - 1}).")
    return Item(context, prepared, answer, line)


def hellaswag_text(text: str) -> str:
    """HellaSwag text as lm-evaluation-harness's hellaswag task prepares it."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# -- scoring a task with a run's model ---------------------------------------------------------------------------

# What of a task's items a run left out or cut, after their count: `lmlab eval --task` says each of a result; a task
# of which no item can be scored is refused with the first two.
ITEM_NOTES = {"skipped_unseen": "item(s) skipped: their text has characters the run's char tokenizer never saw "
                                "({unseen!r})",
              "skipped_long": "item(s) skipped: a choice is longer than the model's context window",
              "truncated": "item(s) longer than the context window: the context of a choice that does not fit was "
                           "cut from the left, as lm-evaluation-harness does"}


@dataclass
class Encoded:
    """A task's items as token ids: a Choice per choice of each scored item, and what was left out and why."""

    items: list[Item]
    choices: list[Choice]
    unseen: str = ""  # characters a char tokenizer never saw, in the items left out for them
    skipped_unseen: int = 0
    skipped_long: int = 0  # items with a choice longer than the context window
    truncated: int = 0  # items whose context is cut from the left for at least one choice


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Choice:
    """A (context, continuation) pair as token ids, as lm-evaluation-harness makes them for a causal model."""
    stripped = context.rstrip()  # the context's trailing blanks begin the continuation
    context, continuation = stripped, context[len(stripped):] + continuation
    if not context:
        prefix, ids = document_start(tokenizer), tokenizer.encode(continuation)
        if len(prefix) == 1 and len(ids) > 1 and ids[0] == prefix[0]:  # lm-eval: then its first token is the context
            return Choice(tuple(ids[:1]), tuple(ids[1:]))
        return Choice(tuple(prefix), tuple(ids))
    whole, own = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return Choice(tuple(own), tuple(whole[len(own):]))


def encode_task(task: Task, tokenizer: Tokenizer, block_size: int) -> Encoded:
    """Every item of `task` as Choices, but those the model cannot score, counted."""
    encoded, unseen = Encoded([], []), set()
    for item in task.items:
        missing = tokenizer.unseen(item.context + "".join(item.choices) + DELIMITER)
        if missing:
            encoded.skipped_unseen += 1
            unseen |= set(missing)
            continue
        pairs = [encode_pair(tokenizer, item.context, DELIMITER + c) for c in item.choices]
        if any(len(p.continuation) > block_size for p in pairs):
            encoded.skipped_long += 1
            continue
        encoded.truncated += any(p.truncated(block_size) for p in pairs)
        encoded.items.append(item)
        encoded.choices += pairs
    encoded.unseen = "".join(sorted(unseen))
    return encoded


@dataclass
class TaskResult:
    """What `evaluate_task` found: the summary kept in the run, and per scored item (`samples`) its line, the
    right answer, each choice's log-likelihood, and the choices picked by acc and acc_norm."""

    summary: dict[str, Any]
    samples: list[dict[str, Any]]


def _pick(values: list[float]) -> int:
    """The index of the largest value, the first one on a tie (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean_stderr(hits: list[float]) -> tuple[float, float]:
    """The mean and its standard error (the sample standard deviation over sqrt(n)), as lm-eval reports them."""
    n, mean = len(hits), sum(hits) / len(hits)
    return mean, (math.nan if n < 2 else math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n))


def evaluate_task(run: LoadedRun, task: Task, limit: int | None,
                  progress: Callable[[int, int], None]) -> TaskResult:
    """Score every item of `task` with the run's model in fp32 (`progress` told the choices scored and their
    total), and keep the summary in the run. acc picks the choice of the highest summed log-likelihood,
    acc_norm the highest per character (lm-eval's)."""
    started = time.perf_counter()
    encoded = encode_task(task, run.tokenizer, run.config.model.block_size)
    if not encoded.items:
        left_out = "; ".join(f"{getattr(encoded, key):,} {ITEM_NOTES[key].format(unseen=encoded.unseen)}"
                             for key in ("skipped_unseen", "skipped_long") if getattr(encoded, key))
        raise UserError(f"no item of task {task.source} can be scored by {run.run.path}: {left_out}.")
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress(done[0], len(encoded.choices))

    flat = loglikelihoods(run.model, encoded.choices, progress=advance)
    ends = list(itertools.accumulate((len(item.choices) for item in encoded.items), initial=0))
    per_item = [flat[a:b] for a, b in zip(ends, ends[1:])]
    samples = [{"line": item.line, "answer": item.answer, "loglikelihoods": lls, "pred": _pick(lls),
                "pred_norm": _pick([ll / len(c) for ll, c in zip(lls, item.choices)])}
               for item, lls in zip(encoded.items, per_item)]
    acc = _mean_stderr([float(s["pred"] == s["answer"]) for s in samples])
    acc_norm = _mean_stderr([float(s["pred_norm"] == s["answer"]) for s in samples])
    summary = {
        "task": task.name, "source": task.source, "layout": task.layout, "task_sha256": task.sha256, "limit": limit,
        "run": str(run.run.path), "checkpoint": run.checkpoint, "step": run.step,
        "weights_sha256": run.weights_sha256, "dtype": "float32", "items": len(encoded.items),
        "acc": acc[0], "acc_stderr": acc[1], "acc_norm": acc_norm[0], "acc_norm_stderr": acc_norm[1],
        "chance": sum(1 / len(i.choices) for i in encoded.items) / len(encoded.items),
        "skipped_unseen": encoded.skipped_unseen, "unseen": encoded.unseen, "skipped_long": encoded.skipped_long,
        "truncated": encoded.truncated, "seconds": time.perf_counter() - started,
    }
    run.run.keep("tasks", summary)
    return TaskResult(summary, samples)

