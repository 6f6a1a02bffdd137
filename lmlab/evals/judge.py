"""Answers to instruction records, and LLM-as-judge scores for them through any OpenAI-compatible endpoint.

`write_answers` asks a run each record's instruction in the run's prompt format (greedy) and writes
instruction, input, reference output and the model's answer per line. `judge_answers` asks a judge model for
a 0-100 score per answer, reads the first integer in range from its reply, asks once more with a stricter
prompt when there is none, and otherwise leaves the item unscored rather than guess.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.core.config import SamplingParams
from lmlab.core.errors import UserError
from lmlab.core.extras import require
from lmlab.core.fileio import atomic_write_text, check_writable, read_text, sha256_file
from lmlab.core.jsontext import NOT_JSON, json_lines
from lmlab.core.threads import Heard
from lmlab.inference.decode import Step
from lmlab.inference.generate import continue_all, instructing
from lmlab.run.prompt import read_records
from lmlab.run.rundir import LoadedRun, RunDir

RUBRIC = (
    "You are grading a response to a task against a reference answer.\n\n"
    "Task: `{task}`\n\nReference answer: `{output}`\n\nResponse to grade: `{answer}`\n\n"
    "How good is the response, on a scale from 0 to 100, where 0 is wrong or empty and 100 is as good as the "
    "reference answer? Reply with the integer only."
)
STRICTER = ("\n\nYour reply must be a single whole number between 0 and 100 and nothing else: no words, no "
            "punctuation. For example: 70")

Progress = Callable[[int, int], None]


def write_answers(run: LoadedRun, data: Path, out: Path, params: SamplingParams, batch: int = 16,
                  step: Step | None = None, progress: Progress | None = None, threads: Heard | None = None) -> int:
    """Answer every record of an Alpaca JSON file with the run's model, `batch` decoded at once (compiled with
    `step`, its steps heard by `threads`: lmlab.inference.decode.Decoder); returns how many were written."""
    records = read_records(data)
    check_writable(Path(out))  # before the answers, not after them
    asked = instructing(run, [(r["instruction"], r.get("input", "")) for r in records])
    answers = [c.text.text for c in continue_all(run, asked, [params] * len(records), batch, step, progress,
                                                 threads=threads)]
    answered_by = {"run": str(run.run.path.resolve()), "checkpoint": run.checkpoint, "step": run.step,
                   "weights_sha256": run.weights_sha256}  # so `lmlab judge` keeps its scores in this run
    lines = [json.dumps({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"],
                         "model_answer": answer, **answered_by})
             for r, answer in zip(records, answers)]
    atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
    return len(lines)


def parse_score(reply: str | None) -> int | None:
    """The first whole number from 0 to 100 in a judge's reply (`87`, `Score: 87/100`), else None (and of no
    reply: None); a decimal (`7.5`) is not a whole number, and not read as one."""
    for match in re.finditer(r"(?<![\d.])\d+(?!\.?\d)", reply or ""):
        value = int(match.group())
        if 0 <= value <= 100:
            return value
    return None


def judge_prompt(record: dict[str, Any]) -> str:
    task = record["instruction"] + (f"\n\nInput: {record['input']}" if record.get("input") else "")
    return RUBRIC.format(task=task, output=record["output"], answer=record["model_answer"])


def read_answers(path: Path) -> list[dict[str, Any]]:
    try:
        lines = read_text(path).splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; write it with `lmlab answer RUN --data FILE.json --out {path}`.")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); write the file with `lmlab answer`.")
    records = []
    for n, _, record in json_lines(lines):
        if record is NOT_JSON:
            raise UserError(f"{path}, line {n}, is not JSON; write the file with `lmlab answer`.")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("instruction", "output", "model_answer")):
            raise UserError(f"{path}, line {n}, lacks instruction, output or model_answer text.")
        records.append(record)
    if not records:
        raise UserError(f"{path} has no answers to judge.")
    return records


@dataclass
class JudgeSummary:
    items: list[dict[str, Any]]  # each answer record with `score` (None: unscored) and the judge's replies
    attached: str = ""  # the run the scores were kept in, or why they were not
    scored: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.scored = sorted((i for i in self.items if i["score"] is not None), key=lambda i: i["score"])

    @property
    def mean(self) -> float | None:
        return sum(i["score"] for i in self.scored) / len(self.scored) if self.scored else None

    @property
    def refused(self) -> list[dict[str, Any]]:
        """Unscored items the endpoint refused (the last request of the item got an error)."""
        return [i for i in self.items if i["score"] is None and i["judge_replies"][-1] is None]

    def unscored(self) -> str:
        """Why items went unscored, in a sentence: refused by the endpoint (with its first error message), or no
        number from 0 to 100 in the judge's replies; '' when every item was scored."""
        refused = self.refused
        wordless = len(self.items) - len(self.scored) - len(refused)
        reasons = []
        if refused:
            reasons.append(f"{len(refused)} refused by the endpoint (the first: {refused[0]['judge_errors'][0]})")
        if wordless:
            reasons.append(f"{wordless} with no whole number from 0 to 100 in two replies")
        return "; ".join(reasons)


def _ask(client: Any, model: str, prompt: str, max_tokens: int, endpoint: str) -> tuple[str | None, str | None]:
    """The judge's reply, or (None, error) when the endpoint refused this one request."""
    import openai

    try:
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=max_tokens, seed=0)
        return response.choices[0].message.content or "", None
    except openai.APIConnectionError:
        raise UserError(f"cannot reach the judge at {endpoint}; start the server or fix --endpoint.")
    except (openai.AuthenticationError, openai.NotFoundError, openai.PermissionDeniedError) as err:
        raise UserError(f"the judge at {endpoint} refused model {model!r} ({err.status_code}: {err.message}); "
                        "check --model, --endpoint and OPENAI_API_KEY.")
    except openai.APIStatusError as err:  # e.g. one prompt too long for the judge: that item stays unscored
        return None, f"{err.status_code}: {err.message}"


def judge_answers(answers: Path, endpoint: str, model: str, out: Path, max_tokens: int = 16,
                  progress: Progress | None = None) -> JudgeSummary:
    """Score every answer 0-100 with the judge model; per-item results go to `out` (JSON lines)."""
    records = read_answers(answers)
    check_writable(Path(out))  # before the judge is asked, not after
    require("openai", user="lmlab judge")
    import openai

    # Local servers (lmlab serve, vLLM, llama.cpp) ignore the key; OpenAI itself reads it from the environment.
    client = openai.OpenAI(base_url=endpoint, api_key=os.environ.get("OPENAI_API_KEY") or "unused", max_retries=1)
    items = []
    for n, record in enumerate(records, 1):
        prompt, replies, errors, score = judge_prompt(record), [], [], None
        for attempt in (prompt, prompt + STRICTER):
            reply, error = _ask(client, model, attempt, max_tokens, endpoint)
            replies.append(reply)
            errors += [error] if error else []
            score = parse_score(reply)
            if score is not None:
                break
        items.append({**record, "score": score, "judge_model": model, "judge_replies": replies,
                      "judge_errors": errors})
        if progress:
            progress(n, len(records))
    atomic_write_text(Path(out), "".join(json.dumps(i) + "\n" for i in items))
    summary = JudgeSummary(items)
    if summary.scored:
        summary.attached = attach(summary, Path(answers))
    return summary


def attach(summary: JudgeSummary, answers: Path) -> str:
    """Keep the judgement (what a run keeps of it: `RunDir.keep`) in the run that answered (the answers file
    names it), so `runs`, `compare` and `report` show it; the run it was kept in, or why it was not."""
    runs = {item.get("run") for item in summary.items}
    if len(runs) != 1 or not isinstance(named := next(iter(runs)), str):
        return (f"not kept in a run: {answers} does not name one run that answered (written by an older lmlab, or "
                "several files joined); write it again with `lmlab answer`")
    run = RunDir(named)
    if not (run.path / "config.toml").exists():
        return f"not kept in a run: {run.path}, which answered, is not on this machine"
    first = summary.items[0]
    run.keep("judgements", {"answers": str(answers), "answers_sha256": sha256_file(answers),
                        "judge_model": first["judge_model"], "mean": summary.mean, "scored": len(summary.scored),
                        "total": len(summary.items), "refused": len(summary.refused),
                        "checkpoint": first.get("checkpoint"), "step": first.get("step"),
                        "weights_sha256": first.get("weights_sha256"), "judged": time.strftime("%Y-%m-%dT%H:%M:%S")})
    # Named as a user names it here: the answers file holds its absolute path, for a judge run from anywhere.
    return os.path.relpath(run.path) if run.path.is_relative_to(Path.cwd()) else str(run.path)
