"""Prompt grids: every run continuing every prompt at every temperature, with the same seed and settings, as the
table a write-up comparing models needs (`lmlab sample RUN RUN --prompts FILE --temperature 0,0.8`, and the
samples of `lmlab report --prompts FILE`). A prompt a run's tokenizer cannot encode is a cell saying why. With
`chat`, a run that has a chat template (an imported instruct model) or a fine-tune's prompt format is asked each
prompt as a user's message in it and answers up to its end of turn, while the others continue it, in one grid: a
base model beside an instruct model.
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
from lmlab.core.fileio import read_text
from lmlab.core.jsontext import parse_json
from lmlab.inference.decode import Step
from lmlab.inference.generate import Asked, Continuation, chatting, continue_all, continuing
from lmlab.inference.steps import build_step, choose_step
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.writeup.document import Block, Code, Heading, Paragraph, code, plain

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
    asked: str = "continued"  # how the prompt was put: continued, or through the run's chat template or format


@dataclass
class Grid:
    runs: list[str]
    prompts: list[str]
    temperatures: list[float]
    params: SamplingParams  # the settings every cell shares but its temperature
    cells: list[Cell]
    chat: bool = False  # runs with a chat template or prompt format were asked in it

    def to_json(self) -> dict[str, Any]:
        p = self.params
        return {"runs": self.runs, "prompts": self.prompts, "temperatures": self.temperatures, "seed": p.seed,
                "top_k": p.top_k, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens, "chat": self.chat,
                "cells": [dataclasses.asdict(c) for c in self.cells]}

    def blocks(self, level: int = 2) -> list[Block]:
        """The grid as a write-up's blocks: a heading per prompt, each run's text at each temperature under it."""
        p = self.params
        checkpoints = {c.run: c.checkpoint for c in self.cells}
        blocks: list[Block] = [
            Heading("Prompt grid", level),
            Paragraph(f"{len(self.runs)} runs × {len(self.prompts)} prompts × {len(self.temperatures)} temperatures "
                      f"({', '.join(f'{t:g}' for t in self.temperatures)}), each drawn with seed {p.seed}, top_k "
                      f"{p.top_k}, top_p {p.top_p}, {p.max_new_tokens} tokens at most, from "
                      + "; ".join(f"{code(run)} ({checkpoints.get(run, '-')})" for run in self.runs) + "."
                      + (" A run with a chat template or a fine-tune's prompt format is asked each prompt as a "
                         "user's message and answers to its end of turn; the others continue the prompt."
                         if self.chat else "")),
        ]
        for i, prompt in enumerate(self.prompts, 1):
            blocks.append(Heading(f"Prompt {i}", level + 1))
            blocks.append(Code(prompt) if prompt else Paragraph("(empty: the start of a document)"))
            for cell in (c for c in self.cells if c.prompt == prompt):
                how = f", {plain(cell.asked)}" if self.chat else ""
                blocks.append(Paragraph(f"{code(cell.run)}{how}, temperature {cell.temperature:g}"
                                        + ("" if cell.text is None else f" ({cell.tokens} tokens):")))
                blocks.append(Code(cell.text) if cell.text is not None else
                              Paragraph(f"no text: {plain(cell.why_not)}"))
        return blocks


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: a JSON list of strings (`.json`), else one prompt per line, where `\\n` stands for a
    line break and blank lines are skipped. An empty file, or one that is not UTF-8, is refused in one sentence."""
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a text file with one prompt per line (or a JSON list of them).")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}); "
                        "save it as UTF-8.")
    if path.suffix == ".json":
        try:
            prompts = parse_json(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}); write a JSON list of prompts, e.g. [\"ROMEO:\"].")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{path} must hold a JSON list of strings, e.g. [\"ROMEO:\", \"Once upon a time\"].")
    else:
        prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts; write one per line (or a JSON list of them).")
    return prompts


def _how(run: LoadedRun, chat: bool) -> str:
    """How a run is put the grid's prompts: with `chat`, through its chat template or prompt format where it has
    one, else continued."""
    if chat and run.chat_template is not None:
        return "asked through its chat template"
    if chat and run.prompt_format is not None:
        return f"asked through its {run.prompt_format.name} format"
    return "continued"


def run_cells(run: LoadedRun, name: str, prompts: Sequence[str], temperatures: Sequence[float],
              params: SamplingParams, step: Step | None = None, chat: bool = False,
              progress: Callable[[int, int], None] | None = None, into: list[Cell] | None = None) -> list[Cell]:
    """One loaded run's cells, prompt by prompt and temperature by temperature, decoded together; each drawn with
    `params.seed`, so a cell is the text `lmlab sample RUN --prompt P --temperature T --seed S` prints (with
    `chat`, of a run that has a chat template or prompt format, `lmlab sample RUN --chat P ...`). `progress`
    hears (cells done, cells) as they end; each is kept in the run's samples.txt as it ends, and `into` (a list the
    caller holds) has them all from the start, their text as it comes: what a stop leaves."""
    cells = [] if into is None else into
    first, todo, checkpoint, how = len(cells), [], f"{run.checkpoint}, step {run.step}", _how(run, chat)
    talking = how != "continued"
    for prompt in prompts:
        try:  # as a user's message, or continued (an empty prompt: the start of a document)
            asking = chatting(run, [("user", prompt)]) if talking else continuing(run, prompt, what="the prompt")
        except UserError as err:
            cells += [Cell(name, checkpoint, prompt, t, why_not=str(err), asked=how) for t in temperatures]
            continue
        for t in temperatures:
            cells.append(Cell(name, checkpoint, prompt, t, asked=how))
            todo.append((cells[-1], asking.prompts[0], asking.stopping(dataclasses.replace(params, temperature=t))))
    total = len(cells) - first
    skipped = total - len(todo)
    if progress:
        progress(skipped, total)

    def ended(i: int, continuation: Continuation) -> None:
        cell, _, drawn = todo[i]
        cell.text, cell.tokens = continuation.text.text, continuation.tokens
        cell.finish_reason = continuation.finish_reason
        kept, asked = (cell.text, f"chat {cell.prompt!r}") if talking else (cell.prompt + cell.text,
                                                                            f"prompt {cell.prompt!r}")
        run.run.add_sample(kept, run.checkpoint, run.step, f"{drawn.describe()}, {asked}")

    if todo:
        # A continuation runs on across documents, as `sample` does; an answer ends with its turn.
        continue_all(run, Asked([ids for _, ids, _ in todo], past_eot=not talking), [p for _, _, p in todo],
                     min(MOST_AT_ONCE, len(todo)), step, ended=ended,
                     progress=progress and (lambda finished, _: progress(skipped + finished, total)))
    return cells[first:]


def sample_grid(paths: Sequence[Path], prompts: Sequence[str], temperatures: Sequence[float],
                params: SamplingParams, checkpoint: str = "best", device: str = "auto",
                progress: Callable[[int, int], None] = lambda done, total: None, chat: bool = False) -> Grid:
    """Every run x prompt x temperature, a run loaded at a time; with `chat`, put to each run as `run_cells` says;
    `progress` hears (cells done, cells) as they end."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise UserError(f"two of the runs share a folder name ({', '.join(names)}); the grid names runs by it, so "
                        "copy or rename one.")
    for path in paths:  # every run checked before any is sampled (sampling appends to its samples.txt)
        RunDir(path).config()
        RunDir(path).checkpoint("latest")
    cells: list[Cell] = []
    total = len(paths) * len(prompts) * len(temperatures)
    progress(0, total)
    try:
        for path, name in zip(paths, names):
            run = RunDir(path).load(checkpoint, device)  # one at a time: the next loads into the memory this one held

            def advance(done: int, _: int, before: int = len(cells)) -> None:  # the cells of the runs before it first
                progress(before + done, total)

            # the step `sample` would choose (on a GPU, CUDA graphs); never the compiled one, a minute per run
            step, _ = build_step(choose_step(run.model, run.device, False), run.model, run.dtype, MOST_AT_ONCE)
            run_cells(run, name, prompts, temperatures, params, step, chat=chat, into=cells, progress=advance)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as the command raises it: the grid as far as it got
        signal = getattr(stop, "signal", "SIGINT")
        done = sum(c.text is not None or c.why_not is not None for c in cells)
        begun = {c.run for c in cells}
        cells += [Cell(name, "-", prompt, t) for name in names if name not in begun for prompt in prompts
                  for t in temperatures]
        for cell in cells:
            if cell.text is None and cell.why_not is None:
                cell.why_not = f"stopped by {signal} before it ended"
        raise GridStopped(Grid(names, list(prompts), list(temperatures), params, cells, chat), signal, done, total)
    return Grid(names, list(prompts), list(temperatures), params, cells, chat)


class GridStopped(Exception):
    """A grid a stop signal ended: `grid` holds every cell begun, those that had ended with their text (each kept
    in its run's samples.txt already), `done` of `total` cells."""

    def __init__(self, grid: Grid, signal: str, done: int, total: int):
        super().__init__(f"stopped by {signal} after {done} of {total} cells")
        self.grid, self.signal, self.done, self.total = grid, signal, done, total
