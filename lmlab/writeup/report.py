"""`lmlab report`: the write-up of one or several runs, from what their folders hold.

A report is `report.md` with its PNGs beside it (relative links, so the folder renders on a code host as is) and
the same as one self-contained `report.html`. Its sections: a summary (with several runs: the comparison table,
the overlay plot and a reading of what differs), the machine and software, the data, the model and config,
training, the full-split evaluation (kept in each run's evaluations.json, so a second report is quick), the task
and judge scores kept for the reported weights, the Chinchilla position with `plan`'s estimate to the
compute-optimal point, and samples for one prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lmlab.analysis.history import EVAL_COLUMNS, evaluations
from lmlab.analysis.plots import plot_comparison, plot_document_lengths, plot_losses
from lmlab.analysis.runs import (
    COMPARE_COLUMNS,
    RunSummary,
    by_bytes_columns,
    comparison,
    judge_cell,
    score_cell,
    summarize,
    task_columns,
    unfair,
)
from lmlab.analysis.scaling import CHINCHILLA_TOKENS_PER_PARAM, REPEAT_LIMIT
from lmlab.core.config import SamplingParams, checkpoint_label, checkpoint_name
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text, check_folder_name, check_writable
from lmlab.core.humanize import fmt, format_duration
from lmlab.core.version import __version__
from lmlab.data.stats import dataset_stats
from lmlab.evals.evaluate import evaluate_run, evaluation_cost
from lmlab.experiments.plan import compute_note, make_plan
from lmlab.inference.generate import sample
from lmlab.run.rundir import LoadedRun, RunDir, check_steps
from lmlab.writeup.document import Block, Bullets, Code, Folded, Heading, Image, Paragraph, Table, to_html, to_markdown
from lmlab.writeup.findings import NOT_RECORDED, RunFacts, data_share, describe_run, reading, run_caveats
from lmlab.writeup.grid import Grid, run_cells


@dataclass
class Report:
    markdown: Path
    html: Path
    images: list[Path] = field(default_factory=list)


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
    track: Track | None = None
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
        facts.not_evaluated = facts.not_sampled = str(err)
        return facts
    facts.checkpoint = loaded.checkpoint
    facts.fell_back = loaded.checkpoint != checkpoint_name(options.checkpoint)
    facts.evaluation, facts.not_evaluated = _evaluate(loaded, options)
    options.say(f"Sampling {path} ({checkpoint_label(loaded.checkpoint, loaded.step)}): "
                f"{options.params.max_new_tokens} tokens at most...")
    if options.grid is not None:
        facts.cells = run_cells(loaded, facts.name, *options.grid, options.params, chat=options.chat)
        return facts
    try:
        facts.sample = sample(loaded, options.prompt, options.params)
    except UserError as err:
        facts.not_sampled = str(err)
    return facts


def _evaluate(loaded: LoadedRun, options: Options) -> tuple[dict[str, Any] | None, str]:
    """The full-split evaluation of a loaded checkpoint and, when there is none, why: a kept one is reused, a new
    one is announced with its size, and its time once its first batches are timed (`_foretold`), with its
    progress."""
    name = f"{loaded.run.path} ({checkpoint_label(loaded.checkpoint, loaded.step)})"
    kept = [r for r in loaded.run.evaluations() if r.get("weights_sha256") == loaded.weights_sha256
            and r.get("max_tokens") is None]
    try:
        tokens, cached = evaluation_cost(loaded)
    except UserError as err:  # e.g. its dataset is not on this machine: an earlier evaluation of the weights may be
        return ({**kept[-1], "cached": True}, "") if kept else (None, str(err))
    if cached or (kept and not options.evaluate):
        options.say(f"{name}: reusing its kept full-split evaluation.")
        return (evaluate_run(loaded, fresh=False) if cached else {**kept[-1], "cached": True}), ""
    if not options.evaluate:
        return None, "not evaluated (`lmlab report --no-eval`); `lmlab eval RUN` evaluates it"
    title = f"Evaluating {name} on its full val split ({tokens:,} tokens; --no-eval skips it)"
    if options.track is None:
        options.say(title + "...")
        return evaluate_run(loaded, fresh=False, progress=_foretold(options.say, name)), ""
    with options.track("window", title) as tick:
        return evaluate_run(loaded, fresh=False, progress=_foretold(options.say, name, tick)), ""


def _foretold(say: Callable[[str], None], name: str, tick: Callable[[int, int], None] | None = None
              ) -> Callable[[int, int], None]:
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
        if tick:
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
    blocks = [*_summary(facts, out), *_machine(facts), *_data(facts, out), *_model(facts), *_training(facts, out),
              *_evaluation(facts, options.checkpoint), *_scores(facts), *_chinchilla(facts),
              *_samples(facts, options)]
    title = f"Report: {', '.join(names)}"
    markdown, page = out / "report.md", out / "report.html"
    atomic_write_text(markdown, to_markdown(title, blocks))
    atomic_write_text(page, to_html(title, blocks, out))
    return Report(markdown, page, [out / b.file for b in _images(blocks)])


def _images(blocks: list[Block]) -> list[Image]:
    found = []
    for b in blocks:
        found += [b] if isinstance(b, Image) else _images(b.blocks) if isinstance(b, Folded) else []
    return found


def by_run(facts: list[RunFacts], rows: list[tuple[str, Callable[[RunFacts], str]]]) -> Table:
    """A figure per row, a run per column."""
    return Table(["", *(f"`{f.name}`" for f in facts)], [[label, *(cell(f) for f in facts)] for label, cell in rows])


def _summary(facts: list[RunFacts], out: Path) -> list[Block]:
    generated = f"Generated by lmlab {__version__} on {datetime.now().strftime('%Y-%m-%d %H:%M')}."
    blocks: list[Block] = [Paragraph(generated), Heading("Summary")]
    if len(facts) == 1:
        caveats = run_caveats(facts[0])
        return blocks + [Paragraph(describe_run(facts[0]))] + [Bullets(caveats)] * bool(caveats)
    blocks.append(Bullets(reading(facts)))
    compared = [f.summary for f in facts if f.summary.best_val_loss is not None and f.summary.flops]
    if len(compared) < 2:
        return blocks
    rows, reason = comparison(compared), unfair(compared)
    columns = [*by_bytes_columns(COMPARE_COLUMNS, rows), *task_columns(rows)]
    change = f"bits per byte, as {reason}" if reason else "best val loss"
    blocks.append(Paragraph(f"Each run against `{compared[0].name}` (× its figure; % change of the {change}; the "
                            "losses are the fixed-batch estimates at the evals):"))
    blocks.append(Table([c.header for c in columns], [[c.cell(r) for c in columns] for r in rows],
                        [not c.left for c in columns]))
    try:
        plot_comparison(compared, out / "compare.png", x="tokens")
    except UserError as err:  # runs that cannot share an axis: the report says why instead of drawing one
        return blocks + [Paragraph(f"No overlay plot: {err}")]
    what = "bits per byte" if reason else "val and train loss"
    return blocks + [Image("compare.png", f"{what} of every run against tokens seen")]


def _machine(facts: list[RunFacts]) -> list[Block]:
    def recorded(f: RunFacts, key: str, show: Callable[[Any], str] = str) -> str:
        if key not in f.machine:
            return NOT_RECORDED
        return "none" if f.machine[key] is None else show(f.machine[key])

    def gpu(f: RunFacts) -> str:
        if not f.machine or not f.machine.get("gpu"):
            return recorded(f, "gpu")
        memory = f.machine.get("gpu_memory_bytes")
        return f"{f.machine['gpu_count']} × {f.machine['gpu']}" + (f" ({memory / 2**30:.0f} GiB)" if memory else "")

    def start(f: RunFacts, key: str) -> str:
        return NOT_RECORDED if f.start.get(key) is None else str(f.start[key])

    rows = [
        ("CPU", lambda f: recorded(f, "cpu")),
        ("cores (torch threads)", lambda f: f"{recorded(f, 'cpu_cores')} ({recorded(f, 'torch_threads')})"),
        ("memory", lambda f: recorded(f, "memory_bytes", lambda b: f"{b / 2**30:.1f} GiB")),
        ("GPU", gpu),
        ("device, dtype", lambda f: f"{start(f, 'device')}, {start(f, 'dtype')}"),
        ("processes", lambda f: f"{start(f, 'world_size')} ({start(f, 'parallel')})"),
        ("peak for MFU", _peak),
        ("torch (CUDA)", lambda f: f"{recorded(f, 'torch')} ({recorded(f, 'cuda')})"),
        ("Python", lambda f: recorded(f, "python")),
        ("OS", lambda f: recorded(f, "os")),
        ("lmlab", lambda f: start(f, "lmlab_version")),
        ("resumed", lambda f: ", ".join(f"at step {e['step']} on {e.get('device')} ({e.get('dtype')})"
                                        for e in f.of("resume")) or "never"),
    ]
    return [Heading("Machine and software"), by_run(facts, rows)]


def _peak(f: RunFacts) -> str:
    """The peak MFU divided by, how and when it was had; a run from before lmlab checked the load says so."""
    if not f.start.get("peak_flops"):
        return NOT_RECORDED
    text = f"{f.start['peak_flops'] / 1e12:.3g} TFLOP/s ({f.start['peak_source']})"
    if f.start.get("peak_quiet") is False:
        return text + ": measured busy, so no MFU was logged"
    if "peak_quiet" not in f.start and f.start["peak_source"] == "measured matmul":
        return text + ": measured before lmlab checked the machine's load; its MFU may read high"
    return text


def _data(facts: list[RunFacts], out: Path) -> list[Block]:
    def split(f: RunFacts, key: str) -> str:
        meta = f.run.dataset()
        if "train" not in meta:
            return "none (an imported run has no training data)"
        return f"{meta['train'][key]:,} train, {meta['val'][key]:,} val"

    def chars_per_token(f: RunFacts) -> str:
        meta = f.run.dataset()
        if "train" not in meta:
            return "-"
        splits = meta["train"], meta["val"]
        return f"{sum(s['characters'] for s in splits) / sum(s['tokens'] for s in splits):.2f}"

    stats = {f.name: _dataset_stats(f) for f in facts}
    rows = [("dataset", lambda f: f"`{f.config.data.dataset}`" if f.config.data.dataset else "none"),
            ("tokenizer", lambda f: f"{f.run.dataset().get('tokenizer', '-')} ({f.config.model.vocab_size:,} tokens)"),
            ("documents", lambda f: split(f, "documents")), ("tokens", lambda f: split(f, "tokens")),
            ("characters per token", chars_per_token),
            ("tokens per document", lambda f: stats[f.name][0])]
    if any(f.run.kind() == "fine-tuned" for f in facts):
        rows.append(("fine-tuning records", _records))
    blocks: list[Block] = [Heading("Data"), by_run(facts, rows)]
    drawn = set()
    for f in facts:
        lengths = stats[f.name][1]
        if lengths is not None and f.config.data.dataset not in drawn:
            drawn.add(f.config.data.dataset)
            file = f"{Path(f.config.data.dataset).name}-doc-lengths.png"
            plot_document_lengths(lengths, f.config.model.block_size, out / file)
            blocks.append(Image(file, f"document lengths of {f.config.data.dataset}"))
    return blocks


def _records(f: RunFacts) -> str:
    origin = f.start.get("origin") or {}
    if "train_records" not in origin:
        return "-"
    return (f"`{origin['data']}`: {origin['train_records']:,} train, {origin['val_records']:,} held out, "
            f"{origin['dropped_records']:,} too long; {origin['epochs']} epochs, {origin['prompt_format']} format")


def _dataset_stats(f: RunFacts) -> tuple[str, Any]:
    """Document lengths against the run's context as a sentence, and the lengths (None where not recorded)."""
    if not f.config.data.dataset:
        return "-", None
    dataset = Path(f.config.data.dataset)
    if not (dataset / "meta.json").exists():
        return f"{NOT_RECORDED}: the dataset is not on this machine", None
    s = dataset_stats(dataset, f.config.model.block_size)
    if s["lengths"] is None:
        return f"{NOT_RECORDED}: a char dataset has no end-of-text token between documents", None
    return (f"mean {s['mean']:,.0f}, median {s['median']:,.0f}, p90 {s['p90']:,.0f}, max {s['max']:,}; "
            f"{100 * s['share_documents_beyond']:.1f}% of documents longer than the context "
            f"({f.config.model.block_size})"), s["lengths"]


def _model(facts: list[RunFacts]) -> list[Block]:
    rows = [
        ("kind", lambda f: f.run.kind() + (f" from `{f.start['init_from']}`" if f.start.get("init_from") else "")),
        ("architecture", lambda f: f"{f.summary.architecture or '-'}: {f.summary.model or '-'}"),
        ("parameters", lambda f: fmt(f.summary.params, ",") + (f" (and {f.summary.padding:,} in vocabulary padding "
                                                                "rows)" if f.summary.padding else "")),
        ("without embeddings", lambda f: fmt(f.start.get("params_non_embedding"), ",", NOT_RECORDED)),
        ("FLOPs per token", lambda f: fmt(f.summary.flops_per_token, ".3g")),
        ("context", lambda f: f"{f.config.model.block_size:,} tokens"),
    ]
    configs = [Folded(f"config.toml of {f.name}", [Code((f.run.path / "config.toml").read_text(), "toml")])
               for f in facts]
    return [Heading("Model and config"), by_run(facts, rows), *configs]


def _training(facts: list[RunFacts], out: Path) -> list[Block]:
    def events(f: RunFacts, kind: str) -> str:
        steps = [e["step"] for e in f.of(kind)]
        return f"{len(steps)} (at step {', '.join(map(str, steps[:8]))}{', ...' if len(steps) > 8 else ''})" \
            if steps else "none"

    def s(f: RunFacts) -> RunSummary:
        return f.summary

    rows = [
        ("steps", lambda f: f"{s(f).steps:,} of {f.config.train.max_iters:,}"),
        ("tokens", lambda f: f"{s(f).tokens:,}"),
        ("passes over the data", lambda f: "-" if s(f).epochs is None else
         f"{s(f).epochs:.2f} over the {s(f).split_tokens:,}-token train split"),
        ("wall time", lambda f: format_duration(s(f).elapsed)),
        ("tokens/s (median)", lambda f: fmt(s(f).tokens_per_sec, ",.0f")),
        ("MFU (median)", lambda f: fmt(s(f).mfu and 100 * s(f).mfu, ".1f") + ("%" if s(f).mfu else "")),
        ("training compute", lambda f: fmt(s(f).flops, ".3g") + " FLOPs"),
        ("6·N·D", _six_nd),
        ("best val loss (estimate)", lambda f: f"{fmt(s(f).best_val_loss)} at step {s(f).best_step}"
         if s(f).best_step is not None else "no evaluation yet"),
        ("predicted by --size auto", _predicted),
        ("val - train (eval) at the best", lambda f: fmt(s(f).gap, "+.4f")),
        ("still improving at the end", lambda f: {True: "yes", False: "no", None: "-"}[s(f).still_falling]),
        ("loss spikes", lambda f: events(f, "spike")), ("skipped steps", lambda f: events(f, "skip")),
        ("rollbacks", lambda f: events(f, "rollback")), ("resumes", lambda f: events(f, "resume")),
        ("ended", _ending),
    ]
    note = Paragraph("Two train losses: the curve's is the mean loss of the training steps (dropout on, weights "
                     "moving), the val - train gap's is the train split scored like val (eval mode, the same number of "
                     "batches). Compute is lmlab's FLOPs per token × tokens; 6·N·D, beside it, counts every parameter "
                     "and no attention.")
    blocks: list[Block] = [Heading("Training"), note, by_run(facts, rows)]
    for f in facts:
        plot_losses(f.run, out / f"{f.name}-loss.png")
        blocks.append(Image(f"{f.name}-loss.png", f"train and val loss of {f.name}"))
        rows = evaluations(f.run)
        if rows:  # the write-ups' "iter / train / val" table (`lmlab log RUN`)
            table = Table([c.header for c in EVAL_COLUMNS], [[c.cell(r) for c in EVAL_COLUMNS] for r in rows],
                          [True] * len(EVAL_COLUMNS))
            blocks.append(Folded(f"every evaluation of {f.name} ({len(rows)})", [table]))
    return blocks


def _predicted(f: RunFacts) -> str:
    """The val `--size auto` predicted, against the best reached, and why it chose the size."""
    sized = f.of("sizing")
    if not sized or sized[0].get("predicted_val") is None:
        return "-"
    e, best = sized[0], f.summary.best_val_loss
    reached = "" if best is None else f", {100 * (e['predicted_val'] / best - 1):+.1f}% against the {best:.4f} reached"
    beyond = ", fewer or more tokens than the fit's runs: extrapolated" if e.get("extrapolated") else ""
    return (f"{e['predicted_val']:.4f}{reached} ({e['shape']}: {e['tokens_per_sec']:,.0f} tokens/s measured, "
            f"{e['tokens_per_param']:.2f} tokens per parameter planned{beyond})")


def _six_nd(f: RunFacts) -> str:
    s = f.summary
    if not s.params or not s.tokens:
        return "-"
    plan = make_plan(f.config, (1.0, ""), tokens=s.tokens, split_tokens=s.split_tokens)
    return f"{plan.six_nd:.3g} FLOPs: {compute_note(plan)}"


def _ending(f: RunFacts) -> str:
    end = f.of("end")[-1] if f.of("end") else None
    if end is None:
        return f.summary.status
    if end.get("stopped_by"):
        return f"stopped by {end['stopped_by']} at step {end['step']:,}"
    if end.get("stopped_early"):
        return f"stopped early at step {end['step']:,}: no new best in {f.config.train.patience_words()}"
    return "finished"


def _evaluation(facts: list[RunFacts], checkpoint: str) -> list[Block]:
    def figure(key: str, spec: str) -> Callable[[RunFacts], str]:
        return lambda f: format(f.evaluation[key], spec) if f.evaluation else "-"

    rows = [
        ("checkpoint", lambda f: checkpoint_label(f.evaluation['checkpoint'], f.evaluation['step'])
         + (" (never evaluated, so no best)" if f.fell_back else "") if f.evaluation else f.not_evaluated),
        ("val split", lambda f: f"`{f.evaluation['dataset']}`, {f.evaluation['tokens']:,} tokens" if f.evaluation
         else "-"),
        ("loss", figure("loss", ".4f")), ("perplexity", figure("perplexity", ".3f")),
        ("next-token accuracy", lambda f: f"{100 * f.evaluation['accuracy']:.1f}%" if f.evaluation else "-"),
        ("bits per byte", figure("bits_per_byte", ".4f")),
        ("", lambda f: ("kept from an earlier evaluation" if f.evaluation["cached"] else "evaluated now")
         if f.evaluation else ""),
    ]
    fallback = ", or its latest if it was never evaluated" if checkpoint == "best" else ""
    note = Paragraph(f"Every token of the val split, scored once by the {checkpoint} checkpoint{fallback} (`lmlab "
                     "eval`); kept in the run's `evaluations.json`, by weights, split and dtype.")
    return [Heading("Evaluation"), note, by_run(facts, rows)]


def _scores(facts: list[RunFacts]) -> list[Block]:
    """The task scores (`lmlab eval --task`) and the judge's scores (`lmlab judge`) kept for the reported weights."""
    tasks = sorted({name for f in facts for name in f.summary.tasks})
    judged = any(f.summary.judge for f in facts)
    if not tasks and not judged:
        return [Heading("Tasks and judge"),
                Paragraph("None kept for these weights: `lmlab eval RUN --task FILE` scores a multiple-choice task, "
                          "`lmlab answer` and `lmlab judge` score answers to instructions.")]

    def task(name: str, key: str) -> Callable[[RunFacts], str]:
        def cell(f: RunFacts) -> str:
            r = f.summary.tasks.get(name)
            return "-" if r is None else f"{score_cell(r[key], r[key + '_stderr'])} ({r['items']:,} items)"
        return cell

    rows = [row for name in tasks for row in ((f"{name} acc", task(name, "acc")),
                                              (f"{name} acc_norm", task(name, "acc_norm")))]
    rows.append(("judge mean (scored of total, model)", lambda f: judge_cell(f.summary.judge)))
    note = Paragraph("acc: the choice with the highest summed log-likelihood; acc_norm: the highest per character "
                     "(lm-evaluation-harness's definitions), ± the standard error; the judge: mean 0-100 score of the "
                     "run's answers, with the answers it scored.")
    return [Heading("Tasks and judge"), note, by_run(facts, rows)]


def _chinchilla(facts: list[RunFacts]) -> list[Block]:
    def to_optimal(f: RunFacts) -> str:
        s = f.summary
        if not s.tokens_per_sec or not s.params:
            return "no throughput recorded"
        plan = make_plan(f.config, (s.tokens_per_sec, "this run's median"), chinchilla=True,
                         split_tokens=s.split_tokens)
        text = (f"{plan.tokens:,} tokens, {plan.flops:.3g} FLOPs: {format_duration(plan.seconds)} at this run's "
                f"{s.tokens_per_sec:,.0f} tokens/s, {format_duration(max(0.0, plan.seconds - s.elapsed))} more")
        if plan.passes and plan.passes > 1:
            text += (f"; but its train split holds only {plan.split_tokens:,} tokens: that is {plan.passes:.1f} "
                     f"passes" + (f", past the ~{REPEAT_LIMIT:g} after which repeats are worth much less"
                                  if plan.passes > REPEAT_LIMIT else "") + ": more text is the way there")
        return text

    rows = [
        ("tokens per parameter", lambda f: f"{f.summary.unique_tokens / f.summary.params:.2f} unique, "
         f"{f.summary.tokens / f.summary.params:.2f} seen" if f.summary.params else "-"),
        ("data", lambda f: data_share(f.summary)),
        ("to the compute-optimal point", to_optimal),
    ]
    note = Paragraph(f"Compute-optimal training sees about {CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter "
                     "(Hoffmann et al. 2022), of distinct text: the share is stated in unique tokens (at most the "
                     "train split's), with the tokens seen beside it. Past about "
                     f"{REPEAT_LIMIT:g} passes over the same data a repeated token is worth much less than a new one "
                     "(Muennighoff et al. 2023). The time to get there is `lmlab plan RUN --chinchilla` at the run's "
                     "own throughput.")
    return [Heading("Chinchilla"), note, by_run(facts, rows)]


def _samples(facts: list[RunFacts], options: Options) -> list[Block]:
    prompt, params = options.prompt, options.params
    if options.grid is not None:
        cells = [c for f in facts for c in f.cells]
        unsampled = [Paragraph(f"`{f.name}`: {f.not_sampled}") for f in facts if f.not_sampled]
        grid = Grid([f.name for f in facts], *options.grid, params, cells, options.chat)
        return [Heading("Samples"), *grid.blocks(3),
                *unsampled]
    asked = f"prompt `{prompt}`" if prompt else "an empty prompt (the start of a document)"
    fallback = " (its latest if it was never evaluated)" if options.checkpoint == "best" else ""
    said = f"From the {options.checkpoint} checkpoint{fallback}, {asked}, {params.describe()}, " \
        f"{params.max_new_tokens} tokens at most:"
    blocks: list[Block] = [Heading("Samples"), Paragraph(said)]
    for f in facts:
        blocks += [Heading(f"`{f.name}`", 3), *([Paragraph(f"From its {f.which}.")] if f.fell_back else []),
                   Code(f.sample) if f.sample is not None else Paragraph(f.not_sampled)]
    return blocks
