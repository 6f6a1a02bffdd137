"""`lmlab bench` (training speed per micro-batch) and `lmlab plan` (what a run will cost, where one stands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import add_device, add_set, console, count, counts, positive


def cmd_bench(args: argparse.Namespace) -> None:
    from lmlab.bench import bench_batch, eval_cost, find_max_batch
    from lmlab.config import load_config
    from lmlab.device import resolve_device

    cfg = load_config(Path(args.config), args.set)
    sizes = args.batch_sizes or [cfg.train.batch_size]
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
    from lmlab.config import load_config
    from lmlab.plan import format_duration, make_plan
    from lmlab.rundir import RunDir
    from lmlab.runs import summarize
    from lmlab.scaling import chinchilla_percent

    target = Path(args.target)
    run = summarize(target) if target.is_dir() else None
    cfg = RunDir(target).config(args.set) if run else load_config(target, args.set)
    with console.status("Measuring throughput..."):
        plan = make_plan(cfg, args.tokens, args.chinchilla, args.tokens_per_sec, args.device)
    table = Table(title=f"Plan for {target}", show_header=False)
    table.add_row("parameters", f"{plan.params:,} ({plan.params_non_embedding:,} without embeddings)")
    table.add_row("tokens per step", f"{plan.tokens_per_step:,}")
    table.add_row("training tokens", f"{plan.tokens:,} ({plan.tokens_source}; {plan.tokens / plan.params:.1f} "
                  "per parameter)")
    table.add_row("Chinchilla-optimal tokens", f"{plan.chinchilla_tokens:,}")
    table.add_row("training compute", f"{plan.flops:.3g} FLOPs ({plan.flops_per_token:.3g} per token)")
    table.add_row("throughput", f"{plan.tokens_per_sec:,.0f} tokens/s ({plan.rate_source})")
    table.add_row("wall time", format_duration(plan.seconds))
    if run:
        table.add_row("tokens seen so far", f"{run.tokens:,} ({chinchilla_percent(run.tokens, plan.params):.1f}% of "
                      f"Chinchilla-optimal; {run.status})")
        table.add_row("time to finish", format_duration(max(0, plan.tokens - run.tokens) / plan.tokens_per_sec))
    console.print(table)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="tokens/s, ms/step, MFU and peak memory per micro-batch size")
    p.add_argument("config")
    add_set(p)
    p.add_argument("--batch-sizes", type=counts, help="comma-separated micro-batch sizes (default: the config's)")
    p.add_argument("--steps", type=count(), default=5, help="timed steps per batch size (after 2 warmup steps)")
    add_device(p)
    p.add_argument("--find-max-batch", action="store_true", help="find the largest micro-batch that fits")
    p.add_argument("--eval", action="store_true", help="time one evaluation and size eval_iters to under 5%%")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="parameters, tokens, FLOPs and wall time of a config, or where a run stands")
    p.add_argument("target", help="a TOML config or a run dir")
    add_set(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokens", type=count(), help="training tokens to plan for")
    group.add_argument("--chinchilla", action="store_true", help="plan for 20 tokens per parameter")
    p.add_argument("--tokens-per-sec", type=positive, help="throughput to assume instead of measuring it")
    add_device(p)
    p.set_defaults(func=cmd_plan)
