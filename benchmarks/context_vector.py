"""examples/context-vector (a model plugin) against a GPT of the same size, on the WikiText-2 stand-in the tests
generate (tests/helpers.py's write_wikitext: Wikipedia-style articles, word-level, the most frequent words and
<unk>): the same data, tokens, batches, schedule and dtype; early stopping as the WikiText-2 study had it.

    python -m benchmarks.context_vector [--articles 6000] [--steps 1500] [--dir runs/bench-context-vector]

(from the repository root, with examples/context-vector installed: `make .venv/.installed-test` does it). Prints
parameters, tokens, wall time, median training tokens/s, and the best checkpoint's val loss, perplexity and
next-word accuracy on the whole val split (`lmlab eval`). Finished runs are kept under --dir and not trained again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from lmlab.analysis.runs import summarize
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.evals.evaluate import evaluate_run
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import write_wikitext

CONFIG = """
[data]
dataset = "{dataset}"

[model]
kind = "{kind}"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.1
pos_emb = "rope"  # the GPT's: no position table, so the two have the same parameters (the plugin ignores it)

[train]
batch_size = 32
max_iters = {steps}
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
eval_interval = 100
eval_iters = 20
log_interval = 10
checkpoint_interval = 500
patience = 5
"""
KINDS = {"GPT (rope, 4L/128)": "gpt", "context vector (4L/128, context 171)": "context-vector"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=6000, help="articles in the stand-in corpus")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run (at most: early stopping)")
    parser.add_argument("--dir", default="runs/bench-context-vector", help="where the corpus, data and runs go")
    args = parser.parse_args()

    root = Path(args.dir)
    corpus = write_wikitext(root / "corpus", args.articles)
    dataset, _, _ = prepare([str(corpus)], "word:2000", name="wikitext-standin", out_dir=root / "data")
    rows = {}
    for label, kind in KINDS.items():
        run = root / kind
        if summarize(run).status not in ("finished", "stopped early"):
            config = root / f"{kind}.toml"
            config.write_text(CONFIG.format(dataset=dataset, kind=kind, steps=args.steps))
            console.rule(label)
            began = time.perf_counter()
            Trainer(train_job(load_config(config), run, "cpu", console=console)).run()
            console.print(f"{label}: {time.perf_counter() - began:.0f} s")
        loaded = RunDir(run).load("best", "cpu")
        rows[label] = (summarize(run), evaluate_run(loaded, fresh=False))

    table = Table(title=f"WikiText-2 stand-in ({args.articles} articles, word:2000), the same {args.steps} steps at "
                        "most of 32 x 64 tokens")
    for column in ("model", "params", "steps", "tokens", "wall", "train tokens/s", "val loss", "perplexity",
                   "accuracy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, (summary, scores) in rows.items():
        table.add_row(label, f"{summary.params:,}", f"{summary.steps:,}", f"{summary.tokens:,}",
                      f"{summary.elapsed:.0f} s", f"{summary.tokens_per_sec:,.0f}", f"{scores['loss']:.4f}",
                      f"{scores['perplexity']:.2f}", f"{100 * scores['accuracy']:.1f}%")
    console.print(table)
    meta = RunDir(root / "gpt").dataset()
    console.print(f"val split: {meta['val']['tokens']:,} tokens; train: {meta['train']['tokens']:,} tokens; "
                  f"dtype {RunDir(root / 'gpt').events()[0]['dtype']}")


if __name__ == "__main__":
    main()
