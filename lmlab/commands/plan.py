"""`lmlab bench` (training speed per micro-batch) and `lmlab plan` (what a run will cost, where one stands)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from lmlab.commands.common import add_device, add_set, add_size, console, count, counts, positive, print_table, within
from lmlab.core.errors import UserError


def cmd_bench(args: argparse.Namespace) -> None:
    from lmlab.core.config_toml import load_config
    from lmlab.core.machine import Machine
    from lmlab.experiments.bench import bench_batch, eval_cost
    from lmlab.train.preflight import say_hardware

    cfg = load_config(Path(args.config), args.set)
    machine = Machine.of(args.device, cfg.train.dtype, cfg.train.threads)
    say_hardware(machine, console)  # as training says it
    device, dtype, threads = machine.device, machine.dtype, machine.threads.choice
    if threads.lowered:
        console.print(f"timing on {threads.describe('train.threads')}", style="yellow", highlight=False)
    sizes = args.batch_sizes or [cfg.train.batch_size]
    if args.find_max_batch:
        sizes = sorted(set(sizes) | {search_max_batch(cfg, machine, args.search_seconds)})
    memory_notes = {"cpu": "; peak memory is the process's high-water RSS",
                    "cuda": "; peak memory is what the CUDA caching allocator reserved"}
    memory_note = memory_notes.get(device.type, "")
    table = Table(title=f"{args.config}: {args.steps} training steps per batch size ({device}, "
                        f"{str(dtype).removeprefix('torch.')}, {threads.threads} thread{'s' * (threads.threads > 1)}"
                        f"{memory_note})")
    for column in ("micro-batch", "tokens/s", "ms/step", "MFU", "peak memory"):
        table.add_column(column, justify="right")
    rows = []
    for size in sizes:
        with console.status(f"Timing micro-batch {size}..."):
            rows.append(bench_batch(cfg, size, args.steps, machine))
        r = rows[-1]
        if r.out_of_memory:
            table.add_row(str(size), "out of memory", "-", "-", "-")
        else:
            assert r.peak_memory is not None, "a row that fits is measured"
            table.add_row(str(size), f"{r.tokens_per_sec:,.0f}", f"{r.ms_per_step:.1f}",
                          "-" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{r.peak_memory / 2**20:,.0f} MiB")
    console.print(table)
    for note in dict.fromkeys(note for r in rows for note in (r.note, r.peak_note) if note):
        console.print(note, style="yellow", highlight=False)
    warn_busy([(f"micro-batch {r.batch_size}", r.load) for r in rows], "its tokens/s and MFU read low")
    if not (args.eval or args.checkpoint):
        return
    at_config = next((r for r in rows if r.batch_size == cfg.train.batch_size and not r.out_of_memory), None)
    ms_per_step = (at_config or bench_batch(cfg, cfg.train.batch_size, args.steps, machine)).ms_per_step
    if ms_per_step is None:
        raise UserError(f"micro-batch {cfg.train.batch_size} (train.batch_size) does not fit in memory on this device, "
                        "so the cost of evaluating and checkpointing its training is not known; lower it.")
    if args.eval:
        cost = eval_cost(cfg, ms_per_step, machine)
        console.print(f"one evaluation ({cfg.train.eval_iters} batches per split) takes {cost['eval_seconds']:.2f} s, "
                      f"{100 * cost['share']:.1f}% of the time at eval_interval {cfg.train.eval_interval}; "
                      f"eval_iters <= {cost['max_eval_iters_under_5pct']} keeps evaluation under 5%.")
    if args.checkpoint:
        say_checkpoint(cfg, machine, ms_per_step)


def say_checkpoint(cfg: Any, machine: Any, ms_per_step: float) -> None:
    """Time a checkpoint of the config's run written where runs go (runs/, else here) and loaded back; say it with
    its share of the training time at train.checkpoint_interval."""
    from lmlab.core.fileio import human_bytes
    from lmlab.experiments.bench import checkpoint_cost

    folder = Path("runs") if Path("runs").is_dir() else Path(".")
    with console.status(f"Writing a checkpoint of this model and its optimizer state in {folder}/ and loading it..."):
        cost = checkpoint_cost(cfg, machine, folder, repeats=2)
    every = cfg.train.checkpoint_interval * ms_per_step / 1000
    console.print(f"a checkpoint (the model and its optimizer state, {human_bytes(cost.bytes)}) is written in "
                  f"{cost.write_seconds:.2f} s (atomic, fsynced) and loaded in {cost.load_seconds:.2f} s (checksums "
                  f"verified) in {folder}/; every {cfg.train.checkpoint_interval} steps (train.checkpoint_interval) "
                  f"that is {_share(cost.write_seconds / (cost.write_seconds + every))} of the training time",
                  highlight=False)
    warn_busy([("the checkpoint", cost.load)], "its times read long")


def _share(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.001 else "under 0.1%"


def warn_busy(windows: list[tuple[str, Any]], effect: str) -> None:
    """A warning line for each timed window (what, its `Load`) during which the machine was busy."""
    from lmlab.core.busy import busy_warning

    for what, load in windows:
        warning = busy_warning(what, load, effect)
        if warning:
            console.print(warning, style="yellow", markup=False)


def search_max_batch(cfg: Any, machine: Any, seconds: float) -> int:
    """The largest micro-batch that fits, each try printed as it is found, within `seconds`."""
    import time

    from lmlab.core.fileio import human_bytes
    from lmlab.experiments.bench import find_max_batch

    console.print(f"Finding the largest micro-batch that fits (for at most {seconds:g} s; each try builds the model "
                  "and times 2 steps of one micro-batch, eager: what fits eagerly fits compiled and accumulated):")

    def say(row: Any, fits: bool, budget: int | None) -> None:
        if row.out_of_memory:
            found = "out of memory"
        else:
            found = f"peak memory {human_bytes(row.peak_memory)}" + (f" of {human_bytes(budget)} allowed" if budget
                                                                     else "")
        console.print(f"  micro-batch {row.batch_size}: {'fits' if fits else 'too large'}, {found}", highlight=False)

    began = time.perf_counter()
    biggest, finished = find_max_batch(cfg, machine, seconds=seconds, say=say)
    took = time.perf_counter() - began
    console.print(f"largest micro-batch that fits: {biggest}" + (
        f" (the search took {took:.1f} s)" if finished else
        f" (the search stopped after {took:.1f} s: a larger try could have ended past {seconds:g} s; --search-seconds "
        "gives it longer)"))
    return biggest


def cmd_plan(args: argparse.Namespace) -> None:
    if args.budget or args.size:
        return plan_budget(args)
    from lmlab.analysis.runs import find_runs, summarize
    from lmlab.analysis.scaling import repeat_warning
    from lmlab.core.config_toml import load_config
    from lmlab.core.humanize import format_duration
    from lmlab.core.machine import Machine
    from lmlab.experiments.bench import with_vocab
    from lmlab.experiments.plan import (
        compute_note,
        estimate,
        gpu_hardware,
        local_hardware,
        make_plan,
        measure_tokens_per_sec,
        shape_of,
    )
    from lmlab.run.rundir import RunDir

    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu} must be a fraction in (0, 1], e.g. 0.4 for 40%.")
    if args.mfu is not None and (args.measure or args.tokens_per_sec):
        raise UserError("--mfu goes with the estimate (alone or with --gpu), not with --measure or --tokens-per-sec.")
    target = Path(args.target)
    run = summarize(target) if target.is_dir() else None
    cfg = RunDir(target).config(args.set) if run else load_config(target, args.set)
    guess, load = None, None
    if args.tokens_per_sec:
        rate = args.tokens_per_sec, "given"
    elif args.measure:
        micro = f"{cfg.train.batch_size} x {cfg.train.grad_accum_steps}" if cfg.train.grad_accum_steps > 1 else \
            f"{cfg.train.batch_size}"
        console.print(f"Timing training steps of micro-batch {micro}, as training runs them...")
        rate, load = measure_tokens_per_sec(cfg, Machine.of(args.device, cfg.train.dtype, cfg.train.threads))
    elif run and run.tokens_per_sec and not (args.gpu or args.mfu):  # a run's own pace, not a guess from a peak
        rate = run.tokens_per_sec, "the median its steps logged; --measure times it here now"
    else:
        hardware = gpu_hardware(args.gpu, cfg.train.dtype) if args.gpu else local_hardware(args.device,
                                                                                          cfg.train.dtype)
        searched = find_runs(Path(args.runs)) if Path(args.runs).is_dir() else []
        model = shape_of(cfg)
        guess = estimate(hardware, args.mfu, with_vocab(cfg), [target] * bool(run) + searched)
        rate = guess.tokens_per_sec(model), ("estimate: a step's parts on this GPU (above)" if guess.step else
                                             "estimate: peak × MFU ÷ FLOPs per token") + "; --measure times it here"
    tokens, source, budget = args.tokens, "--tokens", None
    if run and run.budget_seconds and run.planned_steps and cfg.train.budget_seconds and not (
            tokens or args.chinchilla):  # a budgeted run's length is its budget's plan, not the max_iters it ignored
        tokens, budget = run.planned_steps * cfg.tokens_per_step, run.budget_seconds
        source = f"its {format_duration(budget)} budget's plan: {run.planned_steps:,} steps x tokens per step"
    plan = make_plan(cfg, rate, tokens, args.chinchilla, run.split_tokens if run else None,
                     guess.step if guess else None, source)
    console.print(plan_table(target, plan, guess, run, budget))
    console.print(f"6·N·D and lmlab's compute: {compute_note(plan)}")
    warn_busy([("the steps", load)], "the throughput reads low")
    if guess and not guess.hardware.peak.quiet:
        console.print(f"[yellow]warning: this machine's peak ({guess.hardware.peak.describe()}) reads low, "
                      "so the estimate reads slow; run plan again on a quiet machine, or pass --measure.[/yellow]")
    warning = repeat_warning(plan.passes, plan.split_tokens, "this plan")
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")


def plan_budget(args: argparse.Namespace) -> None:
    """`plan PRESET --budget 5m [--size auto|DEPTH]`: the sizes weighed for the budget (timed here now, as `train
    --budget` times them), the one chosen and its predicted val, and the plan of that run; without --size, the
    preset's own shape timed and planned as `train --budget` plans it, or refused as train would refuse it."""
    import time

    from lmlab.core.busy import LoadMeter, process_age

    window, started = LoadMeter().start(), time.perf_counter() - process_age()  # as train counts its budget
    import torch

    from lmlab.api.training import check_size, parse_duration
    from lmlab.core.config_toml import load_config
    from lmlab.core.machine import Machine
    from lmlab.core.threads import ThreadChooser
    from lmlab.experiments.plan import gpu_hardware
    from lmlab.experiments.sizing import choose_size, with_vocab

    if not args.budget:
        raise UserError("--size is planned for a time budget: give --budget (e.g. --budget 5m --size auto).")
    if args.measure or args.tokens_per_sec or args.mfu:
        raise UserError("--budget times the steps here, as training does (or foretells them for --gpu NAME with "
                        "--size): pass no --measure, --tokens-per-sec or --mfu with it.")
    if args.gpu and not args.size:
        raise UserError(f"--budget with --gpu {args.gpu} previews the sizes of a preset's family on that GPU: give "
                        "--size auto (or a depth, e.g. --size 4), or drop --gpu to time the preset's own shape here.")
    target = Path(args.target)
    if target.is_dir():
        raise UserError(f"--budget plans a new run of a preset; {target} is a run (a run keeps the plan it made).")
    size = check_size(args.size, target, None, None, args.set)  # as train refuses it
    cfg = with_vocab(load_config(target, [*args.set, f"train.budget_seconds={parse_duration(args.budget)}"]))
    gpu = gpu_hardware(args.gpu, cfg.train.dtype) if args.gpu else None
    # A preview of a datasheet GPU measures nothing here: its dtype and peak are the datasheet's.
    machine = Machine(torch.device("cuda"), getattr(torch, gpu.peak.dtype), ThreadChooser(0, "train.threads")) \
        if gpu else Machine.of(args.device, cfg.train.dtype, cfg.train.threads, window)
    if size is None:
        return _plan_shape(target, cfg, started, machine, args.budget)
    where = f"on {args.gpu} by its datasheet" if args.gpu else "on this machine now"
    with console.status(f"Weighing the sizes {where}..." if size == "auto" else "Timing its steps..."):
        sizing = choose_size(target, cfg, started, machine, None if isinstance(size, str) else [size], gpu)
    print_table(f"Sizes weighed for {args.budget} of {target} {where} (* chosen)", _size_columns(),
                [{**c.record(), "chosen": c is sizing.chosen} for c in sizing.candidates])
    for c in sizing.candidates:
        if c.note:
            console.print(f"{c.shape}: {c.note}", highlight=False)
    for note in sizing.notes:  # as train prints them
        console.print(f"note: {note}", style="yellow", highlight=False)
    console.print(sizing.line() if size == "auto" else f"{sizing.chosen.shape}: {sizing.outlook()}", highlight=False)
    c = sizing.chosen
    _budget_table(target, sizing.config, (c.tokens_per_sec, sizing.speed), c.tokens,
                  c.steps * c.step_seconds, args.budget)
    console.print(f"The budget as planned: {sizing.spending()}.", highlight=False)


def _plan_shape(target: Path, cfg: Any, started: float, machine: Any, budget: str) -> None:
    """`plan CONFIG --budget`: the config timed here now and planned by the budget's planner, as `train --budget`
    times and plans it before its first step (or its refusal, the same sentence)."""
    import time

    from lmlab.core.peak import step_ceiling
    from lmlab.data.shards import read_meta, windows_in
    from lmlab.experiments.plan import shape_of
    from lmlab.experiments.size_search import SET_UP
    from lmlab.train.budget import Budget, plan
    from lmlab.train.timing import refuse_untimed, time_config

    meta = read_meta(Path(cfg.data.dataset))
    # its FLOPs alone may refuse it, as train's: before it is timed
    refuse_untimed(cfg, meta, time.perf_counter() - started + SET_UP, shape_of(cfg),
                   step_ceiling(machine.device, machine.dtype))
    with console.status("Timing its steps..."):
        timing = time_config(cfg, machine, deadline=started + cfg.train.budget_seconds - SET_UP)
    intervals = cfg.intervals(meta["train"]["tokens"])
    made = plan(cfg.train.budget_seconds, time.perf_counter() - started + SET_UP, timing.costs(), cfg.train, intervals,
                windows_in(meta, "val", cfg.model.block_size))
    threads = f"{timing.threads} thread{'s' * (timing.threads > 1)}"
    rate = (cfg.tokens_per_step / timing.step, f"measured here, {threads}, as training runs")
    _budget_table(target, cfg, rate, made.max_iters * cfg.tokens_per_step, made.max_iters * made.step_seconds,
                  budget)
    console.print(Budget(made, intervals).describe(cfg.train), highlight=False)


def _budget_table(target: Path, cfg: Any, rate: tuple[float, str], tokens: int, training: float, budget: str) -> None:
    """plan's table of a budgeted run: its tokens at the rate measured, the rest of the budget besides training."""
    from lmlab.api.training import parse_duration
    from lmlab.experiments.plan import make_plan

    plan = make_plan(cfg, rate, tokens, source=f"the steps that fit {budget}")
    plan.eval_seconds, plan.besides = parse_duration(budget) - training, "start-up, timing, evaluating, ..."
    console.print(plan_table(target, plan, None, None))


def _size_columns() -> list:
    """`plan --budget`'s sizes: lmlab.experiments.sizing.Candidate.record's figures."""
    from lmlab.analysis.columns import Column
    from lmlab.core.humanize import fmt

    return [Column("depth", 0, lambda r: f"{r['depth']}{' *' if r['chosen'] else ''}"),
            Column("width", 1, lambda r: str(r["width"])),
            Column("params", 2, lambda r: f"{r['params']:,}"),
            Column("tokens/s", 0, lambda r: fmt(r["tokens_per_sec"], ",.0f")),
            Column("threads", 5, lambda r: fmt(r["threads"], "")),
            Column("steps", 3, lambda r: f"{r['steps']:,}" if r["steps"] else "-"),
            Column("tokens", 1, lambda r: f"{r['tokens']:,}" if r["tokens"] else "-"),
            Column("tok/param", 4, lambda r: f"{r['tokens'] / r['params']:.2f}" if r["tokens"] else "-"),
            Column("passes", 4, lambda r: f"{r['passes']:.2f}" if r["tokens"] else "-"),
            Column("predicted val", 0, lambda r: fmt(r["predicted_val"]))]


def plan_table(target: Path, plan: Any, guess: Any, run: Any, budget: float | None = None) -> Table:
    """`plan`'s table: size, tokens and passes over the data, Chinchilla on unique tokens, compute beside 6·N·D,
    the throughput and its source, the wall time (a budgeted run's: its `budget`); where a run stands."""
    from lmlab.analysis.scaling import chinchilla_percent, unique_tokens
    from lmlab.core.humanize import format_duration

    table = Table(title=f"Plan for {target}", show_header=False)
    padding = f"; {plan.padding_params:,} more in vocabulary padding rows" if plan.padding_params else ""
    table.add_row("parameters", f"{plan.params:,} ({plan.params_non_embedding:,} without embeddings{padding})")
    table.add_row("tokens per step", f"{plan.tokens_per_step:,}")
    table.add_row("training tokens", f"{plan.tokens:,} ({plan.tokens_source}; {plan.tokens / plan.params:.1f} "
                  "per parameter)")
    table.add_row("passes over the data", "unknown (the dataset is not prepared here)" if plan.passes is None else
                  f"{plan.passes:.2f} over the {plan.split_tokens:,}-token train split")
    seen = f"tokens seen {chinchilla_percent(plan.tokens, plan.params):.1f}%"
    if plan.split_tokens is None:  # the unique tokens are at most the train split's, which is not known here
        unique = "unique tokens unknown (at most the train split's)"
    else:
        tokens = unique_tokens(plan.tokens, plan.split_tokens)
        unique = f"unique tokens {tokens:,} are {chinchilla_percent(tokens, plan.params):.1f}% of it"
    table.add_row("Chinchilla-optimal tokens", f"{plan.chinchilla_tokens:,} (20 per parameter): {unique}, {seen}")
    table.add_row("training compute", f"{plan.flops:.3g} FLOPs ({plan.flops_per_token:.3g} per token)")
    change = plan.six_nd / plan.flops - 1
    table.add_row("6·N·D", f"{plan.six_nd:.3g} FLOPs, {100 * abs(change):.1f}% {'above' if change >= 0 else 'below'} "
                  "lmlab's (below)")
    if guess:
        hw, peak = guess.hardware, guess.hardware.peak
        table.add_row("hardware", f"{hw.name}: {peak.flops / 1e12:,.4g} TFLOP/s {peak.dtype} "
                                  f"({peak.brief()})")
        table.add_row("MFU", f"{100 * guess.mfu:.1f}% ({guess.mfu_source})")
        if guess.step:
            table.add_row("a step", f"{1000 * guess.step.seconds:,.1f} ms: {guess.step.describe()}")
    table.add_row("throughput", f"{plan.tokens_per_sec:,.0f} tokens/s ({plan.rate_source})")
    evaluating = f" ({format_duration(plan.eval_seconds)} of it {plan.besides})" if plan.eval_seconds else ""
    table.add_row("wall time", format_duration(plan.seconds) + evaluating if budget is None else
                  f"{format_duration(budget)}: its budget ({format_duration(plan.seconds)} of steps at this "
                  "throughput, the rest its start-up, evaluations and end)")
    if run:
        passes = "" if run.epochs is None else f"{run.epochs:.2f} passes; "
        percent = chinchilla_percent(unique_tokens(run.tokens, run.split_tokens), plan.params)
        table.add_row("tokens seen so far", f"{run.tokens:,} ({passes}{percent:.1f}% of "
                      f"Chinchilla-optimal in unique tokens; {run.status})")
        done = run.status in ("finished", "stopped early")  # its end reached, whatever tokens it planned
        table.add_row("time to finish", f"none: {run.status}" if done else
                      format_duration(max(0, plan.tokens - run.tokens) / plan.tokens_per_sec))
    return table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="tokens/s, ms/step, MFU and peak memory per micro-batch size")
    p.add_argument("config", metavar="CONFIG.toml", help="TOML preset to time (random tokens; the dataset gives "
                   "only the vocab size)")
    add_set(p)
    p.add_argument("--batch-sizes", type=counts, help="comma-separated micro-batch sizes (default: the config's)")
    p.add_argument("--steps", type=count(), default=5, help="timed steps per batch size (after 2 warmup steps)")
    add_device(p)
    p.add_argument("--find-max-batch", action="store_true", help="find the largest micro-batch that fits, printing "
                   "each batch size tried (each eager, over one micro-batch)")
    p.add_argument("--search-seconds", type=positive, default=120.0, help="--find-max-batch begins no try that "
                   "could end past this (foreseen from the tries before it, as growing up to the square of the batch) "
                   "and keeps the largest batch found so far; the table's timings come after")
    p.add_argument("--eval", action="store_true", help="time one evaluation and size eval_iters to under 5%%")
    p.add_argument("--checkpoint", action="store_true", help="time writing a checkpoint (model and optimizer state) "
                   "where runs go, and loading it back, with its share of the time at train.checkpoint_interval")

    p = sub.add_parser("plan", help="parameters, tokens, FLOPs and wall time of a config, or where a run stands")
    p.add_argument("target", help="a TOML config or a run dir")
    add_set(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokens", type=count(), help="training tokens to plan for")
    group.add_argument("--chinchilla", action="store_true", help="plan for 20 tokens per parameter")
    group.add_argument("--budget", metavar="30s|5m|2h", help="plan a run of this long, start-up and evaluations "
                       "included, as `lmlab train --budget` would: its steps timed here now, the steps and tokens "
                       "that fit, the val the preset's fit predicts")
    add_size(p)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--gpu", metavar="NAME", help="estimate for this GPU from its datasheet peak (bf16 where it "
                      "has it), e.g. 4090, A100, H100; unknown names list the known ones (default: this machine); "
                      "with --budget and --size, each size's step foretold by the datasheet step model, nothing timed")
    rate.add_argument("--measure", action="store_true", help="time training steps here instead of estimating "
                      "(a minute or more for large models on a CPU)")
    # Below a token a second the plan's times run past any machine's life (1e-300 gave a 170-digit number of days).
    rate.add_argument("--tokens-per-sec", type=within(1, math.inf), help="throughput to assume instead of "
                      "estimating it (at least 1)")
    p.add_argument("--mfu", type=positive, help="model FLOPs utilisation to assume, e.g. 0.4 (default: the median MFU "
                   "of the run planned, else of a run of the same config on that hardware under --runs, else 0.3)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="where to look for runs that measured the MFU")
    add_device(p)
