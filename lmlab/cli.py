"""`lmlab` command line: each subcommand parses its arguments, calls the library and prints the result."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from lmlab.errors import UserError

if TYPE_CHECKING:
    from lmlab.runs import RunSummary

# Piped output (logs, CI, tests) is not cut to 80 columns: tables stay whole and greppable.
console = Console(width=None if sys.stdout.isatty() else 200)


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmlab.data.prepare import PrepareOptions, prepare
    from lmlab.data.stats import dataset_stats

    options = PrepareOptions(val_tokens=args.val_tokens, max_tokens=args.max_tokens, pack=args.pack,
                             block_size=args.block_size, shard_tokens=args.shard_tokens, text_field=args.text_field,
                             gpt2_dir=args.gpt2_dir and Path(args.gpt2_dir),
                             **({"workers": args.workers} if args.workers else {}))
    target, meta, built = prepare(args.source, args.tokenizer, args.name, Path(args.out_dir), args.val_fraction,
                                  args.force, options, console)
    table = Table(title=f"{target} ({'written' if built else 'already up to date'})")
    for column in ("split", "documents", "characters", "tokens", "chars/token"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("train", "val"):
        s = meta[split]
        table.add_row(split, f"{s['documents']:,}", f"{s['characters']:,}", f"{s['tokens']:,}",
                      f"{s['characters'] / s['tokens']:.2f}")
    console.print(table)
    console.print(f"tokenizer {meta['tokenizer']}: vocab size {meta['vocab_size']:,}, stored as {meta['dtype']}")
    _print_stats(dataset_stats(target, args.block_size))


def _print_stats(s: dict) -> None:
    table = Table(title=f"{s['dataset']}: {s['tokenizer']}, pack {s['pack']}", show_header=False)
    table.add_row("documents", f"{s['documents']:,}")
    table.add_row("tokens", f"{s['tokens']:,} in {s['shards']['train']} train + {s['shards']['val']} val shards")
    table.add_row("characters per token", f"{s['chars_per_token']:.2f}")
    if s["lengths"] is None:
        table.add_row("tokens per document", "not recorded: a char dataset has no end-of-text token between documents")
    else:
        table.add_row("tokens per document", f"mean {s['mean']:,.1f}, median {s['median']:,.0f}, p90 {s['p90']:,.0f}, "
                      f"p99 {s['p99']:,.0f}, max {s['max']:,}")
        table.add_row(f"beyond the context length {s['block_size']}",
                      f"{100 * s['share_documents_beyond']:.1f}% of documents, "
                      f"{100 * s['share_tokens_beyond']:.1f}% of tokens")
        if s["pack"] == "crop":
            table.add_row("tokens lost by cropping", f"{s['lost_tokens']:,} ({100 * s['share_tokens_lost']:.1f}%)")
    if "share_padding" in s:
        table.add_row("padding in the rows", f"{100 * s['share_padding']:.1f}% of the stored ids")
    console.print(table)


def cmd_data_stats(args: argparse.Namespace) -> None:
    from lmlab.data.stats import dataset_stats
    from lmlab.plots import plot_document_lengths

    stats = dataset_stats(Path(args.dataset), args.block_size)
    _print_stats(stats)
    if stats["lengths"] is not None:
        plot = plot_document_lengths(stats["lengths"], stats["block_size"], Path(args.dataset) / "doc_lengths.png")
        console.print(f"histogram: {plot}")


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.config import load_config
    from lmlab.train.loop import Trainer

    if args.resume and (args.config or args.init_from):
        raise UserError("--resume RUN continues a run; pass no CONFIG.toml or --init-from with it "
                        "(use --set to change a resumed run).")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").exists():
            raise UserError(f"{run_dir} is not an lmlab run (no config.toml); pass the run dir to resume.")
        if (run_dir / "prompt.json").exists():
            raise UserError(f"{run_dir} was made by `lmlab finetune`, which does not resume; fine-tune its base "
                            "run again, or fine-tune this run further into a new --run.")
        cfg = load_config(run_dir / "config.toml", args.set)
    elif args.config:
        cfg = load_config(Path(args.config), args.set)
        run_dir = Path(args.run or Path("runs") / Path(args.config).stem)
    else:
        raise UserError("lmlab train needs a CONFIG.toml, or --resume RUN to continue a run.")
    trainer = Trainer(cfg, run_dir, args.device, resume=bool(args.resume), console=console, force=args.force,
                      init_from=args.init_from, keep_optimizer=args.keep_optimizer)
    m = trainer.model
    console.print(f"model: {m.num_params() / 1e6:.2f}M parameters ({m.num_params(False) / 1e6:.2f}M without "
                  f"embeddings) | device {trainer.device} | {str(trainer.dtype).removeprefix('torch.')}")
    result = trainer.run()
    if result.stopped_by:
        console.print(f"stopped by {result.stopped_by} at step {result.steps}; a checkpoint was written. "
                      f"Continue with: lmlab train --resume {result.run_dir}")
    if result.stopped_early:
        console.print(f"stopped early at step {result.steps}: no new best val loss in {cfg.train.patience} evals")
    console.print(f"best val loss {result.best_val_loss:.4f} at step {result.best_step}")
    console.print(f"run: {result.run_dir}")
    console.print(f"loss plot: {result.loss_plot}")


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.evaluate import evaluate_run

    with console.status("Evaluating the val split...") as status:
        result = evaluate_run(Path(args.run), args.dataset and Path(args.dataset), args.checkpoint, args.batch_size,
                              args.device,
                              lambda done, total: status.update(f"Evaluating the val split: {done}/{total} batches"))
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({args.checkpoint}, step {result['step']}) on {result['dataset']} val")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmlab.generate import sample_run

    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction; pass the instruction too.")
    text, step = sample_run(Path(args.run), args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                            args.seed, args.checkpoint, args.device, args.instruction, args.input)
    print(text)
    asked = f"instruction {args.instruction!r}, input {args.input!r}" if args.instruction else f"prompt {args.prompt!r}"
    header = (f"--- checkpoint {args.checkpoint} (step {step}), seed {args.seed}, temperature "
              f"{args.temperature}, top_k {args.top_k}, {asked}\n")
    with open(Path(args.run) / "samples.txt", "a", encoding="utf-8") as f:
        f.write(header + text + "\n\n")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import import_hf

    with console.status(f"Importing {args.dir}..."):
        result = import_hf(Path(args.dir), Path(args.out))
    m = result["model"]
    console.print(f"imported {args.dir} into {result['run']}: {result['params'] / 1e6:.2f}M parameters, "
                  f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab "
                  f"{m.vocab_size:,}; tokenizer {result['tokenizer'] or 'none (the folder has no tokenizer files)'}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import export_hf

    with console.status(f"Exporting {args.run}..."):
        result = export_hf(Path(args.run), Path(args.out), args.checkpoint)
    console.print(f"wrote {result['out']} (checkpoint {args.checkpoint}, step {result['step']}); load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({result['out']!r})")
    if result["tokenizer_skipped"]:
        console.print(f"no tokenizer files written: {result['tokenizer_skipped']}, which GPT-2's tokenizer "
                      "classes cannot load")


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmlab.finetune import finetune

    run_dir = Path(args.run or Path("runs") / f"{Path(args.base).name}-{Path(args.data).stem}")
    result = finetune(Path(args.base), Path(args.data), run_dir, args.epochs, args.learning_rate, args.batch_size,
                      args.val_fraction, args.seed, args.device, console)
    if result.dropped:
        console.print(f"[yellow]{result.dropped} records longer than the context were left out[/yellow]")
    console.print(f"val loss by epoch: {', '.join(f'{v:.4f}' for v in result.val_losses)} (base model "
                  f"{result.base_val_loss:.4f}); best epoch {result.best_epoch} is the `best` checkpoint")
    console.print(f"run: {result.run_dir}")
    console.print(f"loss plot: {result.loss_plot}")
    console.print(f'ask it: lmlab sample {result.run_dir} --instruction "..." [--input "..."]')


def cmd_serve(args: argparse.Namespace) -> None:
    from lmlab.serve import load_served, require_extras, run_server

    require_extras()
    with console.status(f"Loading {args.run}..."):
        served = load_served(Path(args.run), args.checkpoint, args.device, args.max_tokens_cap, args.max_concurrent)
    chat = f"the {served.fmt.name} prompt format" if served.fmt else "a plain role: content transcript"
    console.print(f"serving {args.run} as model {served.name!r} at http://{args.host}:{args.port}/v1 "
                  f"(chat rendered through {chat}); Ctrl-C stops it")
    run_server(served, args.host, args.port)


def cmd_answer(args: argparse.Namespace) -> None:
    from lmlab.judge import write_answers

    with console.status("Answering...") as status:
        n = write_answers(Path(args.run), Path(args.data), Path(args.out), args.max_new_tokens, args.checkpoint,
                          args.device, lambda done, total: status.update(f"Answering: {done}/{total} records"))
    console.print(f"wrote {n} answers to {args.out}")


def cmd_judge(args: argparse.Namespace) -> None:
    from lmlab.judge import judge_answers

    answers = Path(args.answers)
    out = Path(args.out or answers.with_name(f"{answers.stem}-judged.jsonl"))
    with console.status("Judging...") as status:
        summary = judge_answers(answers, args.endpoint, args.model, out, args.max_tokens,
                                lambda done, total: status.update(f"Judging: {done}/{total} answers"))
    total = len(summary.items)
    mean = "-" if summary.mean is None else f"{summary.mean:.1f}"
    console.print(f"judge {args.model}: mean score {mean} over {len(summary.scored)} of {total} answers scored "
                  f"({total - len(summary.scored)} unscored: no number from 0 to 100 in two tries, or the request "
                  "was refused)")
    if summary.scored:
        table = Table(title=f"Lowest-scored answers (of {len(summary.scored)})")
        for column in ("score", "instruction", "input", "model answer", "reference"):
            table.add_column(column, overflow="fold", justify="right" if column == "score" else "left")
        for item in summary.scored[:args.lowest]:
            table.add_row(str(item["score"]), item["instruction"], item.get("input", ""), item["model_answer"],
                          item["output"])
        console.print(table)
    console.print(f"per-item scores: {summary.out}")


def _fmt(value, spec: str = ".4f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def cmd_runs(args: argparse.Namespace) -> None:
    from lmlab.runs import find_runs, summarize

    table = Table(title=f"Runs under {args.dir}")
    columns = ("run", "status", "model", "params", "dataset", "tokenizer", "tokens", "steps", "best val",
               "bits/byte", "val-train", "wall time", "device")
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "status", "model", "dataset", "tokenizer",
                                                               "device") else "right")
    for path in find_runs(Path(args.dir)):
        s = summarize(path)
        table.add_row(str(path.relative_to(args.dir)), s.status, s.model or "-",
                      f"{s.params / 1e6:.2f}M" if s.params else "-", Path(s.dataset).name if s.dataset else "-",
                      s.tokenizer or "-", f"{s.tokens:,}",
                      f"{s.steps:,}", _fmt(s.best_val_loss), _fmt(s.best_bpb), _fmt(s.gap, "+.4f"),
                      f"{s.elapsed:,.0f} s", s.device or "-")
    console.print(table)


def cmd_compare(args: argparse.Namespace) -> None:
    from lmlab.plots import plot_comparison
    from lmlab.runs import summarize

    runs = [summarize(Path(r)) for r in args.runs]
    for s in runs:
        if s.best_val_loss is None or not s.params:
            raise UserError(f"{s.path} has no evaluation to compare ({s.status}); train it past one eval_interval.")
    console.print(comparison_table(runs))
    if args.plot:
        console.print(f"plot: {plot_comparison(runs, Path(args.plot), args.x, args.log)}")
    if args.prompt is not None:
        from lmlab.generate import sample_run

        samples = Table(title=f"Samples, prompt {args.prompt!r}, seed {args.seed}", show_lines=True)
        for s in runs:
            samples.add_column(s.name, overflow="fold")
        samples.add_row(*(sample_run(s.path, args.prompt, args.max_new_tokens, seed=args.seed)[0] for s in runs))
        console.print(samples)


def comparison_table(runs: list[RunSummary]) -> Table:
    """Runs (RunSummary objects with an evaluation) side by side, each figure relative to the first run."""
    from lmlab.scaling import chinchilla_percent

    base = runs[0]
    table = Table(title=f"Compared with {base.name}")
    rows = {
        "parameters": lambda s: f"{s.params / 1e6:.2f}M ({s.params / base.params:.2f}×)",
        "tokens seen": lambda s: f"{s.tokens:,} ({s.tokens / base.tokens:.2f}×)",
        "wall time": lambda s: f"{s.elapsed:,.0f} s ({s.elapsed / base.elapsed:.2f}×)",
        "best val loss": lambda s: f"{s.best_val_loss:.4f} ({100 * (s.best_val_loss / base.best_val_loss - 1):+.1f}%)",
        "bits per byte": lambda s: _fmt(s.best_bpb),
        "tokens per parameter": lambda s: f"{s.tokens / s.params:.2f}",
        "% of Chinchilla-optimal": lambda s: f"{chinchilla_percent(s.tokens, s.params):.1f}%",
        "overfitting (val - train at best)": lambda s: _fmt(s.gap, "+.4f"),
        "still falling at the end": lambda s: "yes" if s.still_falling else "no",
        "status": lambda s: s.status,
    }
    table.add_column("figure")
    for s in runs:
        table.add_column(s.name, justify="right")
    for label, cell in rows.items():
        table.add_row(label, *(cell(s) for s in runs))
    return table


def cmd_sweep(args: argparse.Namespace) -> None:
    from lmlab.sweep import run_sweep

    result = run_sweep(Path(args.config), args.set, args.name, Path(args.dir), args.budget_tokens or 0,
                       args.budget_seconds or 0.0, args.device, console)
    evaluated = [s for s in result.summaries if s.best_val_loss is not None and s.params]
    if evaluated:
        console.print(comparison_table(evaluated))
    if result.stopped_by:
        console.print(f"sweep stopped by {result.stopped_by}; run the same command again to continue it.")
    best = result.best
    if best:
        console.print(f"best setting: {best.name} (best val loss {best.best_val_loss:.4f}, run {best.path})")


def cmd_scaling(args: argparse.Namespace) -> None:
    from lmlab.plots import plot_scaling
    from lmlab.runs import summarize
    from lmlab.scaling import fit_power_law

    runs = [s for s in map(summarize, map(Path, args.runs)) if s.best_val_loss is not None and s.params]
    names = [s.name for s in runs]
    fits = [fit_power_law([s.flops for s in runs], [s.best_val_loss for s in runs], names, "compute (FLOPs, 6·N·D)"),
            fit_power_law([s.params for s in runs], [s.best_val_loss for s in runs], names, "parameters")]
    table = Table(title=f"Power-law fits of best val loss over {len(runs)} runs")
    for column in ("against", "fit", "rmse (loss)", "R² (log-log)", "predicted loss at 10×"):
        table.add_column(column)
    for fit in fits:
        table.add_row(fit.x_label, f"L = {fit.a:.4g} · x^{fit.b:.4f}", f"{fit.rmse:.4f}", f"{fit.r2:.3f}",
                      f"{fit.predict(10 * max(fit.x)):.4f} at x = {10 * max(fit.x):.3g}")
    console.print(table)
    console.print(f"plot: {plot_scaling(fits, Path(args.plot))}")


def cmd_bench(args: argparse.Namespace) -> None:
    from lmlab.bench import bench_batch, eval_cost, find_max_batch
    from lmlab.config import load_config
    from lmlab.device import resolve_device

    cfg = load_config(Path(args.config), args.set)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [cfg.train.batch_size]
    if args.find_max_batch:
        with console.status("Finding the largest micro-batch that fits..."):
            biggest = find_max_batch(cfg, args.device)
        console.print(f"largest micro-batch that fits: {biggest}")
        sizes = sorted(set(sizes) | {biggest})
    memory_note = "; peak memory is the process's high-water RSS" if resolve_device(args.device).type == "cpu" else ""
    table = Table(title=f"{args.config}: {args.steps} training steps per batch size ({args.device}{memory_note})")
    for column in ("micro-batch", "tokens/s", "ms/step", "MFU", "peak memory"):
        table.add_column(column, justify="right")
    rows = []
    for size in sizes:
        with console.status(f"Timing micro-batch {size}..."):
            rows.append(bench_batch(cfg, size, args.steps, args.device))
        r = rows[-1]
        if r.out_of_memory:
            table.add_row(str(size), "out of memory", "-", "-", "-")
        else:
            table.add_row(str(size), f"{r.tokens_per_sec:,.0f}", f"{r.ms_per_step:.1f}", f"{100 * r.mfu:.1f}%",
                          f"{r.peak_memory / 2**20:,.0f} MiB")
    console.print(table)
    if args.eval:
        at_config = next((r for r in rows if r.batch_size == cfg.train.batch_size and not r.out_of_memory), None)
        at_config = at_config or bench_batch(cfg, cfg.train.batch_size, args.steps, args.device)
        cost = eval_cost(cfg, at_config.ms_per_step, args.device)
        console.print(f"one evaluation ({cfg.train.eval_iters} batches per split) takes {cost['eval_seconds']:.2f} s, "
                      f"{100 * cost['share']:.1f}% of the time at eval_interval {cfg.train.eval_interval}; "
                      f"eval_iters <= {cost['max_eval_iters_under_5pct']} keeps evaluation under 5%.")


def cmd_plan(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from lmlab.bench import bench_batch, with_vocab
    from lmlab.config import load_config
    from lmlab.device import resolve_device
    from lmlab.model import build_model
    from lmlab.runs import summarize
    from lmlab.scaling import Plan, chinchilla_percent, format_duration

    target = Path(args.target)
    run = summarize(target) if target.is_dir() else None
    cfg = with_vocab(load_config(target / "config.toml" if run else target, args.set))
    with torch.device("meta"):  # counts parameters without allocating them
        model = build_model(cfg.model)
    params, non_embedding = model.num_params(), model.num_params(embeddings=False)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.model.block_size
    if args.tokens:
        tokens, source = args.tokens, "--tokens"
    elif args.chinchilla:
        tokens, source = 20 * params, "20 tokens per parameter (Chinchilla)"
    else:
        tokens, source = cfg.train.max_iters * tokens_per_step, "train.max_iters x tokens per step"
    if args.tokens_per_sec:
        rate, rate_source = args.tokens_per_sec, "given"
    else:
        # Tokens/s does not depend on accumulation, so one micro-batch per step is timed. A CPU's matmuls
        # are already large at a micro-batch of 2, and a GPU-sized batch could exhaust a laptop's memory.
        device = resolve_device(args.device)
        micro = cfg.train.batch_size if device.type != "cpu" else min(cfg.train.batch_size, 2)
        one_step = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=1))
        with console.status("Measuring throughput..."):
            row = bench_batch(one_step, micro, 3, args.device, warmup=1)
        if row.out_of_memory:
            raise UserError(f"train.batch_size {cfg.train.batch_size} does not fit on this device; lower it or "
                            "pass --tokens-per-sec.")
        rate, rate_source = row.tokens_per_sec, f"measured here on {device}, micro-batch {micro}"
    plan = Plan(params, non_embedding, tokens, source, rate, rate_source)
    table = Table(title=f"Plan for {target}", show_header=False)
    table.add_row("parameters", f"{plan.params:,} ({plan.params_non_embedding:,} without embeddings)")
    table.add_row("tokens per step", f"{tokens_per_step:,}")
    table.add_row("training tokens", f"{plan.tokens:,} ({plan.tokens_source}; {plan.tokens / plan.params:.1f} "
                  "per parameter)")
    table.add_row("Chinchilla-optimal tokens", f"{plan.chinchilla_tokens:,}")
    table.add_row("training compute (6·N·D)", f"{plan.flops:.3g} FLOPs")
    table.add_row("throughput", f"{plan.tokens_per_sec:,.0f} tokens/s ({plan.rate_source})")
    table.add_row("wall time", format_duration(plan.seconds))
    if run:
        table.add_row("tokens seen so far", f"{run.tokens:,} ({chinchilla_percent(run.tokens, params):.1f}% of "
                      f"Chinchilla-optimal; {run.status})")
        table.add_row("time to finish", format_duration(max(0, plan.tokens - run.tokens) / plan.tokens_per_sec))
    console.print(table)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config setting, e.g. train.learning_rate=3e-4 (repeatable)")


def _add_device(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps" + note)


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="best", help="best or latest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Train GPT-style language models from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into a dataset dir (token shards, tokenizer, meta.json)")
    p.add_argument("source", nargs="+", help="`shakespeare`, hf:OWNER/NAME[:CONFIG], or .txt/.jsonl/.jsonl.gz/"
                   ".parquet files or folders of them")
    p.add_argument("--tokenizer", required=True,
                   help="char, word:N, bpe:N, gpt2 (local files) or tiktoken:NAME (e.g. tiktoken:gpt2)")
    p.add_argument("--gpt2-dir", help="with --tokenizer gpt2: folder with GPT-2's tokenizer.json, or vocab.json + "
                   "merges.txt (default: $LMLAB_GPT2_DIR)")
    p.add_argument("--name", help="dataset name (default: the corpus name); the dir is NAME-SPEC")
    p.add_argument("--out-dir", default="data", help="where dataset dirs go (default: data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of characters held out (default 0.1)")
    p.add_argument("--val-tokens", type=int, help="size the val split in tokens (documents in sha256-of-name order)")
    p.add_argument("--max-tokens", type=int, help="stop after this many train tokens (at a document boundary)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet/hf: sources")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument("--pack", choices=["concat", "crop"], default="concat",
                   help="concat: documents joined by end-of-text (default); crop: one row per document, cut to "
                   "--block-size + 1 tokens and padded with end-of-text (train with model.block_size = --block-size)")
    p.add_argument("--block-size", type=int, default=1024, help="context length for --pack crop and the stats "
                   "(default 1024)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset made from other inputs")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="inspect a prepared dataset")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("stats", help="documents, tokens, document lengths against the context, a histogram PNG")
    p.add_argument("dataset", help="a dataset dir made by `lmlab prepare`")
    p.add_argument("--block-size", type=int, help="context length to compare with (default: the dataset's, or 1024)")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("train", help="train a model from a TOML config, or resume a run")
    p.add_argument("config", nargs="?", help="TOML preset, e.g. configs/shakespeare-char-cpu.toml")
    _add_set(p)
    p.add_argument("--run", help="run dir (default: runs/<config name>)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    _add_device(p, " (may differ from the original on resume)")
    p.add_argument("--init-from", metavar="RUN[:best|latest]", help="start a new run from another run's weights")
    p.add_argument("--keep-optimizer", action="store_true", help="with --init-from: carry the optimizer state too")
    p.add_argument("--force", action="store_true", help="resume even though the dataset's content changed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run")
    p.add_argument("run")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    _add_checkpoint(p)
    p.add_argument("--batch-size", type=int, default=32)
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K likeliest tokens")
    p.add_argument("--seed", type=int, default=1337)
    _add_checkpoint(p)
    p.add_argument("--instruction", help="ask in the run's prompt format (Alpaca unless fine-tuned otherwise) "
                   "and print the answer alone")
    p.add_argument("--input", default="", help="with --instruction: the record's input")
    _add_device(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("finetune", help="instruction-tune a run on Alpaca-format records (loss on responses only)")
    p.add_argument("base", metavar="RUN", help="the run whose best checkpoint is fine-tuned")
    p.add_argument("--data", required=True, help="JSON list of {instruction, input, output} records")
    p.add_argument("--run", help="the new run dir (default: runs/<RUN name>-<data name>)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak LR (5%% warmup, cosine to a tenth)")
    p.add_argument("--batch-size", type=int, default=8, help="records per step")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of records held out (by content hash)")
    p.add_argument("--seed", type=int, default=1337)
    _add_device(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2 folder (config.json + model.safetensors) "
                       "into a run")
    p.add_argument("dir", help="folder with config.json, model.safetensors and optionally tokenizer files")
    p.add_argument("--out", required=True, help="the new run dir, e.g. runs/gpt2")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a GPT-2-architecture run as a Hugging Face folder")
    p.add_argument("run")
    p.add_argument("out", help="new folder for config.json, model.safetensors and tokenizer files")
    _add_checkpoint(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API (needs the serve extra)")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _add_checkpoint(p)
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=2,
                   help="requests generating at once; one more gets HTTP 429 (default 2)")
    _add_device(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("answer", help="answer every Alpaca record with a run's model, for `lmlab judge`")
    p.add_argument("run")
    p.add_argument("--data", required=True, help="JSON list of {instruction, input, output} records")
    p.add_argument("--out", required=True, help="JSON-lines file to write (instruction, input, output, model_answer)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    _add_checkpoint(p)
    _add_device(p)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("judge", help="score answers 0-100 with a judge model behind an OpenAI-compatible endpoint")
    p.add_argument("--answers", required=True, help="JSON-lines file written by `lmlab answer`")
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY)")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--out", help="per-item scores, JSON lines (default: ANSWERS-judged.jsonl)")
    p.add_argument("--max-tokens", type=int, default=16, help="longest judge reply read")
    p.add_argument("--lowest", type=int, default=5, help="how many of the lowest-scored answers to show")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("bench", help="tokens/s, ms/step, MFU and peak memory per micro-batch size")
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--batch-sizes", help="comma-separated micro-batch sizes (default: the config's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after 2 warmup steps)")
    _add_device(p)
    p.add_argument("--find-max-batch", action="store_true", help="find the largest micro-batch that fits")
    p.add_argument("--eval", action="store_true", help="time one evaluation and size eval_iters to under 5%%")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="parameters, tokens, FLOPs and wall time of a config, or where a run stands")
    p.add_argument("target", help="a TOML config or a run dir")
    _add_set(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokens", type=int, help="training tokens to plan for")
    group.add_argument("--chinchilla", action="store_true", help="plan for 20 tokens per parameter")
    p.add_argument("--tokens-per-sec", type=float, help="throughput to assume instead of measuring it")
    _add_device(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("runs", help="one row per run: size, data, tokens, best val loss, status")
    p.add_argument("dir", nargs="?", default="runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("compare", help="compare runs against the first: table, overlay plot, samples")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", help="write an overlay of the loss curves to this PNG")
    p.add_argument("--x", choices=["step", "tokens", "time", "flops"], default="step", help="x axis of the plot")
    p.add_argument("--log", action="store_true", help="log-scale axes")
    p.add_argument("--prompt", help="sample every run from this prompt with the same seed")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="train every combination of a few settings under one budget, then compare")
    p.add_argument("config", help="TOML preset the trials start from")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep, comma-separated (one value: a setting for every trial); repeatable")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=int, help="training tokens per trial (sets train.max_iters)")
    budget.add_argument("--budget-seconds", type=float, help="wall-clock seconds per trial (sets train.max_seconds)")
    p.add_argument("--name", help="sweep name: trials go to DIR/NAME/<trial> (default: <config name>-sweep)")
    p.add_argument("--dir", default="runs", help="where the sweep folder goes (default: runs)")
    _add_device(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("scaling", help="fit best val loss against compute and parameters as power laws")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default="scaling.png", help="where to draw the fits (default scaling.png)")
    p.set_defaults(func=cmd_scaling)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
