"""`lmlab report`: the write-up of one or several runs, from what their folders hold.

A report is `report.md` with its PNGs beside it (relative links, so the folder renders on a code host as is) and
the same as one self-contained `report.html`. Its sections: a summary (with several runs: the comparison table,
the overlay plot and a reading of what differs), the machine and software, the data, the model and config,
training, the full-split evaluation (kept in each run's evaluations.json, so a second report is quick), the
Chinchilla position with `plan`'s estimate to the compute-optimal point, and samples for one prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lmlab
from lmlab.config import SamplingParams
from lmlab.data.stats import dataset_stats
from lmlab.document import Block, Bullets, Code, Folded, Heading, Image, Paragraph, Table, to_html, to_markdown
from lmlab.errors import UserError
from lmlab.evaluate import evaluate_run
from lmlab.fileio import atomic_write_text
from lmlab.findings import NOT_RECORDED, RunFacts, describe_run, reading
from lmlab.generate import sample
from lmlab.grid import Grid, run_cells
from lmlab.humanize import fmt, format_duration
from lmlab.plan import make_plan
from lmlab.plots import plot_comparison, plot_document_lengths, plot_losses
from lmlab.rundir import RunDir
from lmlab.runs import COMPARE_COLUMNS, RunSummary, comparison, summarize
from lmlab.scaling import CHINCHILLA_TOKENS_PER_PARAM, chinchilla_percent


@dataclass
class Report:
    markdown: Path
    html: Path
    images: list[Path] = field(default_factory=list)


def gather(path: Path, prompt: str, params: SamplingParams, device: str, say: Callable[[str], None],
           grid: tuple[list[str], list[float]] | None = None) -> RunFacts:
    """A run's facts: its folder read, its best checkpoint evaluated on the full val split (or the kept result)
    and sampled (with `grid`, its cells of the prompt grid: prompts x temperatures); a run with no checkpoint yet
    is reported without those two, saying why."""
    run = RunDir(path)
    facts = RunFacts(run, summarize(run.path), run.events(), run.config())
    try:
        loaded = run.load("best", device)
    except UserError as err:
        facts.not_evaluated = facts.not_sampled = str(err)
        return facts
    say(f"Evaluating {path} on its full val split...")
    try:
        facts.evaluation = evaluate_run(loaded, fresh=False)
    except UserError as err:  # e.g. its dataset is not on this machine: an earlier evaluation of the weights may be
        kept = [r for r in run.evaluations() if r.get("weights_sha256") == loaded.weights_sha256]
        facts.evaluation, facts.not_evaluated = ({**kept[-1], "cached": True}, "") if kept else (None, str(err))
    say(f"Sampling {path}...")
    if grid is not None:
        facts.cells = run_cells(loaded, facts.name, *grid, params)
        return facts
    try:
        facts.sample = sample(loaded, prompt, params)
    except UserError as err:
        facts.not_sampled = str(err)
    return facts


def build_report(paths: list[Path], out: Path, prompt: str = "", params: SamplingParams = SamplingParams(300),
                 device: str = "auto", say: Callable[[str], None] = lambda _: None,
                 grid: tuple[list[str], list[float]] | None = None) -> Report:
    """Write out/report.md, its PNGs and out/report.html for the runs at `paths`; with `grid` (prompts,
    temperatures), its samples are the prompt grid of every run."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        raise UserError(f"two of the runs share a folder name ({', '.join(names)}); the report names runs by it, so "
                        "copy or rename one.")
    facts = [gather(Path(p), prompt, params, device, say, grid) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    say("Drawing the plots...")
    blocks = [*_summary(facts, out), *_machine(facts), *_data(facts, out), *_model(facts), *_training(facts, out),
              *_evaluation(facts), *_chinchilla(facts), *_samples(facts, prompt, params, grid)]
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
    generated = f"Generated by lmlab {lmlab.__version__} on {datetime.now().strftime('%Y-%m-%d %H:%M')}."
    blocks: list[Block] = [Paragraph(generated), Heading("Summary")]
    if len(facts) == 1:
        return blocks + [Paragraph(describe_run(facts[0]))]
    blocks.append(Bullets(reading(facts)))
    compared = [f.summary for f in facts if f.summary.best_val_loss is not None and f.summary.flops]
    if len(compared) < 2:
        return blocks
    rows = comparison(compared)
    blocks.append(Paragraph(f"Each run against `{compared[0].name}` (× its figure; best val loss: the fixed-batch "
                            "estimate at the evals, % change):"))
    blocks.append(Table([c.header for c in COMPARE_COLUMNS], [[c.cell(r) for c in COMPARE_COLUMNS] for r in rows],
                        [not c.left for c in COMPARE_COLUMNS]))
    plot_comparison(compared, out / "compare.png", x="tokens")
    return blocks + [Image("compare.png", "val and train loss of every run against tokens seen")]


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
        ("peak for MFU", lambda f: NOT_RECORDED if not f.start.get("peak_flops") else
         f"{f.start['peak_flops'] / 1e12:.3g} TFLOP/s ({f.start['peak_source']})"),
        ("torch (CUDA)", lambda f: f"{recorded(f, 'torch')} ({recorded(f, 'cuda')})"),
        ("Python", lambda f: recorded(f, "python")),
        ("OS", lambda f: recorded(f, "os")),
        ("lmlab", lambda f: start(f, "lmlab_version")),
        ("resumed", lambda f: ", ".join(f"at step {e['step']} on {e.get('device')} ({e.get('dtype')})"
                                        for e in f.of("resume")) or "never"),
    ]
    return [Heading("Machine and software"), by_run(facts, rows)]


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
        ("parameters", lambda f: fmt(f.summary.params, ",")),
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
        ("wall time", lambda f: format_duration(s(f).elapsed)),
        ("tokens/s (median)", lambda f: fmt(s(f).tokens_per_sec, ",.0f")),
        ("MFU (median)", lambda f: fmt(s(f).mfu and 100 * s(f).mfu, ".1f") + ("%" if s(f).mfu else "")),
        ("training compute", lambda f: fmt(s(f).flops, ".3g") + " FLOPs"),
        ("best val loss (estimate)", lambda f: f"{fmt(s(f).best_val_loss)} at step {s(f).best_step}"
         if s(f).best_step is not None else "no evaluation yet"),
        ("val - train at the best", lambda f: fmt(s(f).gap, "+.4f")),
        ("still improving at the end", lambda f: {True: "yes", False: "no", None: "-"}[s(f).still_falling]),
        ("loss spikes", lambda f: events(f, "spike")), ("skipped steps", lambda f: events(f, "skip")),
        ("rollbacks", lambda f: events(f, "rollback")), ("resumes", lambda f: events(f, "resume")),
        ("ended", _ending),
    ]
    blocks: list[Block] = [Heading("Training"), by_run(facts, rows)]
    for f in facts:
        plot_losses(f.run, out / f"{f.name}-loss.png")
        blocks.append(Image(f"{f.name}-loss.png", f"train and val loss of {f.name}"))
    return blocks


def _ending(f: RunFacts) -> str:
    end = f.of("end")[-1] if f.of("end") else None
    if end is None:
        return f.summary.status
    if end.get("stopped_by"):
        return f"stopped by {end['stopped_by']} at step {end['step']:,}"
    if end.get("stopped_early"):
        return f"stopped early at step {end['step']:,}: no new best in {f.config.train.patience} evaluations"
    return "finished"


def _evaluation(facts: list[RunFacts]) -> list[Block]:
    def figure(key: str, spec: str) -> Callable[[RunFacts], str]:
        return lambda f: format(f.evaluation[key], spec) if f.evaluation else "-"

    rows = [
        ("checkpoint", lambda f: f"best, step {f.evaluation['step']:,}" if f.evaluation else f.not_evaluated),
        ("val split", lambda f: f"`{f.evaluation['dataset']}`, {f.evaluation['tokens']:,} tokens" if f.evaluation
         else "-"),
        ("loss", figure("loss", ".4f")), ("perplexity", figure("perplexity", ".3f")),
        ("next-token accuracy", lambda f: f"{100 * f.evaluation['accuracy']:.1f}%" if f.evaluation else "-"),
        ("bits per byte", figure("bits_per_byte", ".4f")),
        ("", lambda f: ("kept from an earlier evaluation" if f.evaluation["cached"] else "evaluated now")
         if f.evaluation else ""),
    ]
    note = Paragraph("Every token of the val split, scored once by the best checkpoint (`lmlab eval`); kept in the "
                     "run's `evaluations.json`, by weights, split and dtype.")
    return [Heading("Evaluation"), note, by_run(facts, rows)]


def _chinchilla(facts: list[RunFacts]) -> list[Block]:
    def to_optimal(f: RunFacts) -> str:
        s = f.summary
        if not s.tokens_per_sec or not s.params:
            return "no throughput recorded"
        plan = make_plan(f.config, (s.tokens_per_sec, "this run's median"), chinchilla=True)
        return (f"{plan.tokens:,} tokens, {plan.flops:.3g} FLOPs: {format_duration(plan.seconds)} at this run's "
                f"{s.tokens_per_sec:,.0f} tokens/s, {format_duration(max(0.0, plan.seconds - s.elapsed))} more")

    rows = [
        ("tokens per parameter", lambda f: f"{f.summary.tokens / f.summary.params:.2f}" if f.summary.params else "-"),
        ("share of Chinchilla-optimal", lambda f: f"{chinchilla_percent(f.summary.tokens, f.summary.params):.1f}%"
         if f.summary.params else "-"),
        ("to the compute-optimal point", to_optimal),
    ]
    note = Paragraph(f"Compute-optimal training sees about {CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter "
                     "(Hoffmann et al. 2022); the time to get there is `lmlab plan RUN --chinchilla` at the run's own "
                     "throughput.")
    return [Heading("Chinchilla"), note, by_run(facts, rows)]


def _samples(facts: list[RunFacts], prompt: str, params: SamplingParams,
             grid: tuple[list[str], list[float]] | None) -> list[Block]:
    if grid is not None:
        cells = [c for f in facts for c in f.cells]
        unsampled = [Paragraph(f"`{f.name}`: {f.not_sampled}") for f in facts if f.not_sampled]
        return [Heading("Samples"), *Grid([f.name for f in facts], *grid, params, cells).blocks(3), *unsampled]
    asked = f"prompt `{prompt}`" if prompt else "an empty prompt (the start of a document)"
    blocks: list[Block] = [Heading("Samples"), Paragraph(f"From the best checkpoint, {asked}, {params.describe()}, "
                                                         f"{params.max_new_tokens} tokens at most:")]
    for f in facts:
        blocks += [Heading(f"`{f.name}`", 3), Code(f.sample) if f.sample is not None else Paragraph(f.not_sampled)]
    return blocks

