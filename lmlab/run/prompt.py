"""Instructions: Alpaca-format records (`instruction`, optional `input`, `output`), and how an instruction is put
to a model, the prompt format a fine-tuned run was taught with (RUN/prompt.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmlab.core.errors import UserError
from lmlab.core.fileio import read_text
from lmlab.core.jsontext import parse_json
from lmlab.data.tokenizers import Tokenizer


@dataclass
class PromptFormat:
    """How an instruction is put to the model, and what ends its answer."""

    name: str
    with_input: str  # has {instruction} and {input}
    without_input: str  # has {instruction}
    end: str  # appended to every response in training; generation stops there

    def render(self, instruction: str, input: str = "") -> str:
        return (self.with_input if input else self.without_input).format(instruction=instruction, input=input)


def alpaca_format(tokenizer: Tokenizer) -> PromptFormat:
    """Stanford Alpaca's template. Tokenizers without an end-of-text token (char) end a response with a blank
    line instead, as char datasets separate documents."""
    head = "Below is an instruction that describes a task"
    return PromptFormat(
        name="alpaca",
        with_input=(f"{head}, paired with an input that provides further context. Write a response that "
                    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                    "### Input:\n{input}\n\n### Response:\n"),
        without_input=(f"{head}. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Response:\n"),
        end=tokenizer.eot_token or "\n\n",
    )


def check_format(tokenizer: Tokenizer, fmt: PromptFormat, run: Path) -> None:
    """Refuse a prompt format the run's char tokenizer cannot write: a char model reads only the characters its
    corpus had, so the way out is another tokenizer or another corpus, not fine-tuning this run."""
    unseen = tokenizer.unseen(fmt.render("", "x") + fmt.render("", "") + fmt.end)
    if unseen:
        raise UserError(f"the {fmt.name} prompt format uses characters that {run}'s char tokenizer never saw "
                        f"({unseen!r}), so this run can neither be taught nor asked instructions (a char model reads "
                        "only the characters of its corpus); sample it with --prompt, or fine-tune a run whose "
                        "tokenizer has them (bpe, word, or char from a corpus with these characters).")


def read_records(path: Path) -> list[dict[str, str]]:
    """Alpaca records from a JSON list; every problem names the file and the record."""
    try:
        records = parse_json(read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a JSON file with a list of Alpaca records.")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file.")
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} records.")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise UserError(f"{path}: record {i} has no `instruction` text; every record needs one.")
        for key in ("input", "output"):
            if not isinstance(r.get(key, ""), str):
                raise UserError(f"{path}: record {i} has a non-text `{key}`; use a string.")
        if "output" not in r:
            raise UserError(f"{path}: record {i} has no `output`; fine-tuning needs the answer to learn.")
    return records
