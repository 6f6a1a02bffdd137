"""`lmlab report`: the write-up of one or several runs, from what their folders hold: each run's facts gathered
(its checkpoint evaluated on the full val split, or the kept evaluation reused, and sampled), then written as
`report.md` with its PNGs beside it (relative links, so the folder renders on a code host as is) and as one
self-contained `report.html`. The sections but the samples are in `sections`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.runs import summarize
from lmlab.core.config import SamplingParams, checkpoint_label, checkpoint_name
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text, check_folder_name, check_writable
from lmlab.core.humanize import format_duration
from lmlab.evals.evaluate import evaluate_run, evaluation_cost
from lmlab.inference.generate import sample
from lmlab.run.rundir import LoadedRun, RunDir, check_steps
from lmlab.writeup import sections
from lmlab.writeup.document import Block, Code, Heading, Image, Paragraph, code, plain, to_html, to_markdown
from lmlab.writeup.findings import RunFacts
from lmlab.writeup.grid import Grid, run_cells


@dataclass
class Report:
    markdown: Path
    html: Path
    images: list[Path]


Track = Callable[[str, str], AbstractContextManager[Callable[[int, int], None]]]  # (unit, title) -> a progress callback


@dataclass
class Options:
    """How a report is made: the samples' prompt and settings, the device, the checkpoint reported on, whether to
    evaluate the val split (else kept results only), where it says what it does (`say` a line, `track` a long
    step's progress), and `grid` (prompts, temperatures): samples as the prompt grid of every run, `chat` or not."""

    prompt: str = ""
    params: SamplingParams = field(default_factory=lambda: SamplingParams(300))
    device: str = "auto"
    checkpoint: str = "best"
    evaluate: bool = True
    say: Callable[[str], None] = lambda _: None
    track: Track = lambda unit, title: nullcontext(lambda done, total: None)
    grid: tuple[list[str], list[float]] | None = None
    chat: bool = False  # in the grid, runs with a chat template or prompt format are asked in it


def gather(path: Path, options: Options) -> RunFacts:
    """A run's facts: its folder read, its checkpoint evaluated on the full val split (or the kept result; with
    `evaluate` off, the kept result only) and sampled (with a grid, its cells of the prompt grid: prompts x
    temperatures), and its kept task and judge scores; a run with no checkpoint yet is reported without those,
    saying why."""
    run = RunDir(path)
    facts = RunFacts(run, summarize(run.path, options.checkpoint), run.events(), run.config())
    try:
        loaded = run.load(options.checkpoint, options.device)
    except UserError as err:
        facts.not_evaluated = facts.not_sampled = plain(err)
        return facts
    facts.checkpoint = loaded.checkpoint
    facts.fell_back = loaded.checkpoint != checkpoint_name(options.checkpoint)
    facts.evaluation, facts.not_evaluated = _evaluate(loaded, options, facts.summary.evaluation)
    if facts.evaluation and not facts.evaluation["cached"]:  # kept now: the comparison's columns show it too
        facts.summary = summarize(run.path, options.checkpoint)
    options.say(f"Sampling {path} ({checkpoint_label(loaded.checkpoint, loaded.step)}): "
                f"{options.params.max_new_tokens} tokens at most...")
    if options.grid is not None:
        facts.cells = run_cells(loaded, facts.name, *options.grid, options.params, chat=options.chat)
        return facts
    try:
        facts.sample = sample(loaded, options.prompt, options.params)
    except UserError as err:
        facts.not_sampled = plain(err)
    return facts


def _evaluate(loaded: LoadedRun, options: Options, kept: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """The full-split evaluation of a loaded checkpoint and, when there is none, why: the one `kept` for its weights
    (`RunSummary.evaluation`) is reused, a new one is announced with its size, and its time once its first batches
    are timed (`_foretold`), with its progress."""
    name = f"{loaded.run.path} ({checkpoint_label(loaded.checkpoint, loaded.step)})"
    kept = {**kept, "cached": True} if kept else None
    try:
        tokens, cached = evaluation_cost(loaded)
    except UserError as err:  # e.g. its dataset is not on this machine: an earlier evaluation of the weights may be
        return (kept, "") if kept else (None, plain(err))
    if cached or (kept and not options.evaluate):
        options.say(f"{name}: reusing its kept full-split evaluation.")
        return (evaluate_run(loaded, fresh=False) if cached else kept), ""
    if not options.evaluate:
        return None, "not evaluated (`lmlab report --no-eval`); `lmlab eval RUN` evaluates it"
    title = f"Evaluating {name} on its full val split ({tokens:,} tokens; --no-eval skips it)"
    with options.track("window", title) as tick:
        return evaluate_run(loaded, fresh=False, progress=_foretold(options.say, name, tick)), ""


def _foretold(say: Callable[[str], None], name: str, tick: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """A progress callback that says once, at the end of the evaluation's second batch (the first warms it up), how
    long the rest will take at that batch's pace: measured on the run as it is evaluated now, where a guess from its
    training speed was off by twice either way (other threads, batch and load than its training had)."""
    marks: list[tuple[float, int]] = []

    def progress(done: int, total: int) -> None:
        marks.append((time.perf_counter(), done))
        if len(marks) == 2 and done < total:
            (then, before), (now, _) = marks
            rest = (total - done) * (now - then) / (done - before)
            say(f"{name}: about {format_duration(rest)} more, at the pace of its second batch of windows")
        tick(done, total)
    return progress


def build_report(paths: list[Path], out: Path, options: Options | None = None, **fields: Any) -> Report:
    """Write out/report.md, its PNGs and out/report.html for the runs at `paths`, made as `options` (or Options of
    the `fields` given, e.g. device="cpu") say."""
    options = options or Options(**fields)
    check_steps(paths, options.checkpoint)
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise UserError(f"two of the runs share a folder name ({', '.join(names)}); the report names runs by it, so "
                        "copy or rename one.")
    check_folder_name(out)
    check_writable(out / "report.md")  # before the runs are evaluated: a folder that cannot be written is said at once
    facts = [gather(Path(p), options) for p in paths]
    options.say("Drawing the plots...")
    blocks = [*sections.summary(facts, out), *sections.machine(facts), *sections.data(facts, out),
              *sections.model(facts), *sections.training(facts, out), *sections.evaluation(facts, options.checkpoint),
              *sections.scores(facts), *sections.chinchilla(facts), *_samples(facts, options)]
    title = f"Report: {', '.join(map(code, names))}"
    markdown, page = out / "report.md", out / "report.html"
    atomic_write_text(markdown, to_markdown(title, blocks))
    atomic_write_text(page, to_html(title, blocks, out))
    return Report(markdown, page, [out / b.file for b in blocks if isinstance(b, Image)])  # no section folds one


def _samples(facts: list[RunFacts], options: Options) -> list[Block]:
    prompt, params = options.prompt, options.params
    if options.grid is not None:
        unsampled = [Paragraph(f"{code(f.name)}: {f.not_sampled}") for f in facts if f.not_sampled]
        grid = Grid([f.name for f in facts], *options.grid, params, [c for f in facts for c in f.cells], options.chat)
        return [Heading("Samples"), *grid.blocks(3),
                *unsampled]
    asked = f"prompt {code(prompt)}" if prompt else "an empty prompt (the start of a document)"
    fallback = " (its latest if it was never evaluated)" if options.checkpoint == "best" else ""
    said = f"From the {options.checkpoint} checkpoint{fallback}, {asked}, {params.describe()}, " \
        f"{params.max_new_tokens} tokens at most:"
    blocks: list[Block] = [Heading("Samples"), Paragraph(said)]
    for f in facts:
        blocks += [Heading(code(f.name), 3), *([Paragraph(f"From its {f.which}.")] if f.fell_back else []),
                   Code(f.sample) if f.sample is not None else Paragraph(f.not_sampled)]
    return blocks
