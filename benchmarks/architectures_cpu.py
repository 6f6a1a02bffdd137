"""Architectures and recipes at one token budget on the CPU: the GPT-2-style preset, the modern preset, a
recurrent model of about the same size, and the preset at twice the depth with its LR unchanged and re-tuned.

    python benchmarks/architectures_cpu.py [--budget-tokens 2000000] [--threads 0] [--dir runs/bench-arch]

Prepares data/shakespeare-char if needed. Every row trains through `lmlab.experiments.sweep.run_sweep` under the same
token budget, so re-running the script skips the rows already finished and resumes an interrupted one.
The 2x-depth row with the unchanged LR is the sweep trial at the preset's own LR; the re-tuned row is the
sweep's best. Best val loss and bits per byte at a fixed token budget do not depend on the machine's load;
wall time and tokens/s do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from lmlab.analysis.runs import RunSummary
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.experiments.sweep import run_sweep

BASE = Path("configs/shakespeare-char-cpu.toml")
MODERN = Path("configs/shakespeare-char-modern-cpu.toml")
# A 2-layer GRU 512 wide has ~3.2M parameters, like the 4-layer 256-wide transformer; each weight is used
# once per token in both, so their training FLOPs per token are close too (the transformer adds attention).
RECURRENT = ["model.kind=recurrent", "model.rnn_cell=gru", "model.n_layer=2", "model.n_embd=512"]
DEEP_LRS = ("1e-3", "2e-3", "4e-3")  # around the preset's 2e-3, in factors of 2


def tokens_per_sec(run: RunSummary) -> float:
    return sum(e["tokens_per_sec"] for e in run.trains) / max(1, len(run.trains))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=int, default=2_000_000, help="training tokens per run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: one per core; 1 is faster when other jobs load the cores)")
    parser.add_argument("--dir", default="runs/bench-arch", help="where the runs go")
    args = parser.parse_args()

    prepare(["shakespeare"], "char", out_dir=Path(load_config(BASE).data.dataset).parent)
    base_lr = load_config(BASE).train.learning_rate
    assert f"{base_lr:g}" in {f"{float(lr):g}" for lr in DEEP_LRS}, "the sweep must include the preset's LR"
    common = [f"train.threads={args.threads}"]
    rows: dict[str, RunSummary] = {}

    def train(label: str, config: Path, sets: list[str]) -> list[RunSummary]:
        console.rule(label)
        result = run_sweep(config, common + sets, label, Path(args.dir),
                           budget_tokens=args.budget_tokens, device="cpu", console=console)
        if result.stopped_by:
            raise SystemExit(f"stopped by {result.stopped_by}; run the script again to continue")
        return result.summaries

    with LoadMeter() as meter:  # the trainings print their own progress
        rows["GPT-2-style preset (4L/256)"] = train("baseline", BASE, [])[0]
        rows["modern preset (rope, rmsnorm, swiglu, qk-norm, no bias)"] = train("modern", MODERN, [])[0]
        rows["recurrent (GRU 2L/512)"] = train("recurrent", BASE, RECURRENT)[0]
        deep = train("deep-lr-sweep", BASE, ["model.n_layer=8", f"train.learning_rate={','.join(DEEP_LRS)}"])
    unchanged = next(s for s, lr in zip(deep, DEEP_LRS) if float(lr) == base_lr)
    best = min(deep, key=lambda s: s.best_val_loss)
    rows[f"2x depth (8L/256), LR unchanged ({base_lr:g})"] = unchanged
    rows[f"2x depth, LR re-tuned by sweep ({best.name})"] = best

    table = Table(title=f"Shakespeare char, {args.budget_tokens:,} training tokens per run, CPU "
                        f"({args.threads or 'all'} threads; wall time and tokens/s depend on the machine's load)")
    for column in ("model", "params", "tokens", "wall time", "tokens/s", "best val loss", "bits/byte"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, s in rows.items():
        table.add_row(label, f"{s.params / 1e6:.2f}M", f"{s.tokens:,}", f"{s.elapsed:,.0f} s",
                      f"{tokens_per_sec(s):,.0f}", f"{s.best_val_loss:.4f}", f"{s.best_bpb:.4f}")
    console.print(table)
    sweep = Table(title="2x-depth LR sweep")
    for column in ("trial", "best val loss", "bits/byte"):
        sweep.add_column(column, justify="right")
    for s in deep:
        sweep.add_row(s.name, f"{s.best_val_loss:.4f}", f"{s.best_bpb:.4f}")
    console.print(sweep)
    warning = busy_warning("the runs", meter.load, "their wall times and tokens/s read slow")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
