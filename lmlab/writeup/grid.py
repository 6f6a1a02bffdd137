"""Prompt grids: every run continuing every prompt at every temperature, with the same seed and settings, as the
table a write-up comparing models needs (`lmlab sample RUN RUN --prompts FILE --temperature 0,0.8`, and the
samples of `lmlab report --prompts FILE`). A prompt a run's tokenizer cannot encode is a cell saying why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.core.config import SamplingParams
from lmlab.core.errors import UserError
from lmlab.inference.decode import Step
from lmlab.inference.generate import continue_all, decode_dtype, document_start
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.writeup.document import Block, Code, Heading, Paragraph

MOST_AT_ONCE = 8  # cells of one run decoded together (each row holds a KV cache of the run's whole context)


@dataclass
class Cell:
    """One run's continuation of one prompt at one temperature, or why there is none."""

    run: str
    checkpoint: str  # which was sampled, e.g. "best, step 400"
    prompt: str
    temperature: float
    text: str | None = None
    why_not: str | None = None  # why there is no text: the run's tokenizer cannot encode the prompt
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Grid:
    runs: list[str]
    prompts: list[str]
    temperatures: list[float]
    params: SamplingParams  # the settings every cell shares but its temperature
    cells: list[Cell]

    def to_json(self) -> dict[str, Any]:
        p = self.params
        return {"runs": self.runs, "prompts": self.prompts, "temperatures": self.temperatures, "seed": p.seed,
                "top_k": p.top_k, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens,
                "cells": [dataclasses.asdict(c) for c in self.cells]}

    def blocks(self, level: int = 2) -> list[Block]:
        """The grid as a write-up's blocks: a heading per prompt, each run's text at each temperature under it."""
        p = self.params
        checkpoints = {c.run: c.checkpoint for c in self.cells}
        blocks: list[Block] = [
            Heading("Prompt grid", level),
            Paragraph(f"{len(self.runs)} runs × {len(self.prompts)} prompts × {len(self.temperatures)} temperatures "
                      f"({', '.join(map(_number, self.temperatures))}), each drawn with seed {p.seed}, top_k "
                      f"{p.top_k}, top_p {p.top_p}, {p.max_new_tokens} tokens at most, from "
                      + "; ".join(f"`{run}` ({checkpoints.get(run, '-')})" for run in self.runs) + "."),
        ]
        for i, prompt in enumerate(self.prompts, 1):
            blocks.append(Heading(f"Prompt {i}", level + 1))
            blocks.append(Code(prompt) if prompt else Paragraph("(empty: the start of a document)"))
            for cell in (c for c in self.cells if c.prompt == prompt):
                blocks.append(Paragraph(f"`{cell.run}`, temperature {_number(cell.temperature)}"
                                        + ("" if cell.text is None else f" ({cell.tokens} tokens):")))
                blocks.append(Code(cell.text) if cell.text is not None else Paragraph(f"no text: {cell.why_not}"))
        return blocks


def _number(value: float) -> str:
    return f"{value:g}"


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: a JSON list of strings (`.json`), else one prompt per line, where `\\n` stands for a
    line break and blank lines are skipped. An empty file, or one that is not UTF-8, is refused in one sentence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a text file with one prompt per line (or a JSON list of them).")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}); "
                        "save it as UTF-8.")
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); pass a text file with one prompt per line.")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}); write a JSON list of prompts, e.g. [\"ROMEO:\"].")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{path} must hold a JSON list of strings, e.g. [\"ROMEO:\", \"Once upon a time\"].")
    else:
        prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts; write one per line (or a JSON list of them).")
    return prompts


def run_cells(run: LoadedRun, name: str, prompts: Sequence[str], temperatures: Sequence[float],
              params: SamplingParams, step: Step | None = None) -> list[Cell]:
    """One loaded run's cells, prompt by prompt and temperature by temperature, decoded together; each drawn with
    `params.seed`, so a cell is the text `lmlab sample RUN --prompt P --temperature T --seed S` prints."""
    cells, todo, checkpoint = [], [], f"{run.checkpoint}, step {run.step}"
    for prompt in prompts:
        try:
            run.tokenizer.check(prompt, "the prompt")
            ids = run.tokenizer.encode(prompt) if prompt else document_start(run.tokenizer)
        except UserError as err:
            cells += [Cell(name, checkpoint, prompt, t, why_not=str(err)) for t in temperatures]
            continue
        for t in temperatures:
            cells.append(Cell(name, checkpoint, prompt, t))
            todo.append((cells[-1], ids, dataclasses.replace(params, temperature=t)))
    if todo:
        dtype = decode_dtype(run.device, run.dtype, step is not None)
        done = continue_all(run.model, run.tokenizer, [ids for _, ids, _ in todo], [p for _, _, p in todo],
                            min(MOST_AT_ONCE, len(todo)), dtype, step, past_eot=True)
        for (cell, _, drawn), continuation in zip(todo, done):
            cell.text, cell.tokens = continuation.text.text, continuation.tokens
            cell.finish_reason = continuation.finish_reason
            run.run.add_sample(cell.prompt + cell.text, run.checkpoint, run.step,
                               f"{drawn.describe()}, prompt {cell.prompt!r}")
    return cells


def sample_grid(paths: Sequence[Path], prompts: Sequence[str], temperatures: Sequence[float],
                params: SamplingParams, checkpoint: str = "best", device: str = "auto",
                say: Callable[[str], None] = lambda _: None) -> Grid:
    """Every run x prompt x temperature, a run loaded at a time."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise UserError(f"two of the runs share a folder name ({', '.join(names)}); the grid names runs by it, so "
                        "copy or rename one.")
    for path in paths:  # every run checked before any is sampled (sampling appends to its samples.txt)
        RunDir(path).config()
        RunDir(path).checkpoint("latest")
    cells = []
    for path, name in zip(paths, names):
        say(f"Sampling {path}...")
        run = RunDir(path).load(checkpoint, device)  # one at a time: the next loads into the memory this one held
        cells += run_cells(run, name, prompts, temperatures, params)
    return Grid(names, list(prompts), list(temperatures), params, cells)
