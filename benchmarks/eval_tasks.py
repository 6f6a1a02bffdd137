"""Multiple-choice task scoring speed: lmlab's batched scoring against one choice at a time, and `lmlab eval
--task` against lm-evaluation-harness's `hf` backend on the run's export, on the same items with the same scores.

    python benchmarks/eval_tasks.py [--shapes demo,gpt2] [--items demo=200,gpt2=40] [--lm-eval-batch 1,16]

Two shapes with random weights: the demo model (configs/shakespeare-char-modern-cpu.toml: 4 layers, 256 wide,
rope, rmsnorm, swiglu, qk-norm, context 128, a char tokenizer; trained 2 steps) and GPT-2 small (12 layers, 768
wide, context 1024, 50,257 rows; imported from a random transformers GPT-2 with a 4,096-token byte-level BPE).
The items are HellaSwag-shaped (a ~40-word context, four ~16-word endings), written in HellaSwag's layout from a
play-like vocabulary, so both tools prepare them with HellaSwag's rules: a char model's are longer than its
context and cut from the left, a GPT-2's fit and share their context.

Rows: items/s of the scoring alone (the model loaded, in this process): batched (lmlab's default: many choices a
forward, contexts shared), batched without sharing, and one choice per forward; then wall time of the whole
command, process start to end, of `lmlab eval RUN --task FILE` and of lm-eval (`simple_evaluate`, the task local,
`--model hf` on `lmlab export-hf`'s folder, fp32) at each `--lm-eval-batch`, with acc, acc_norm and the largest
per-choice log-likelihood difference to lmlab's. Needs the test extras (lm_eval); run it under the heavy lock.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.evals.tasks import encode_task, load_task
from lmlab.inference.generate import document_start
from lmlab.inference.scoring import loglikelihoods
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests import lm_eval_reference
from tests.helpers import SPEAKERS, WORDS, write_corpus

LMLAB = str(Path(sys.executable).with_name("lmlab"))
DEMO = Path(__file__).parent.parent / "configs" / "shakespeare-char-modern-cpu.toml"


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_items(path: Path, n: int, seed: int = 0) -> Path:
    """n HellaSwag-shaped items in HellaSwag's layout: ~40 words of context, four endings of ~16 words (in the
    characters of the generated corpus, which a char tokenizer knows)."""
    rng = random.Random(seed)
    rows = [{"activity_label": rng.choice(SPEAKERS), "ctx_a": words(rng, rng.randint(25, 35)) + ",",
             "ctx_b": words(rng, rng.randint(5, 10)), "label": rng.randrange(4),
             "endings": [words(rng, rng.randint(12, 20)) + "," for _ in range(4)]} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_run(root: Path) -> Path:
    """The demo preset's model with random weights (2 steps), on a char dataset of a generated play corpus; without
    its table of token pairs, which export-hf, lm-eval's side, cannot write."""
    dataset, _, _ = prepare([str(write_corpus(root / "corpus"))], "char", name="plays", out_dir=root / "data")
    cfg = load_config(DEMO, [f'data.dataset="{dataset}"', "train.max_iters=2", "train.eval_interval=2",
                             "train.eval_iters=1", 'train.dtype="float32"', "model.bigram_buckets=0"])
    return Trainer(train_job(cfg, root / "runs" / "demo", "cpu", console=Console(quiet=True))).run().run_dir


def gpt2_run(root: Path) -> Path:
    """GPT-2 small with transformers' random init, imported with a byte-level BPE of 4,096 tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.hf import import_hf
    from tests.helpers import write_tiny_gpt2

    folder = write_tiny_gpt2(root / "hf", write_corpus(root / "corpus", n_docs=20), vocab_size=4096)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    return Path(import_hf(folder, root / "runs" / "gpt2")["run"])


def items_per_second(run_dir: Path, task_file: Path) -> dict[str, float]:
    """The scoring alone, in this process: batched, batched without sharing contexts, one choice per forward."""
    run = RunDir(run_dir).load("best", "cpu")
    encoded = encode_task(load_task(str(task_file)), run.tokenizer, run.config.model.block_size)
    rates = {}
    for name, options in (("batched", {}), ("batched, no shared contexts", {"share": False}),
                          ("one choice at a time", {"share": False, "max_rows": 1})):
        started = time.perf_counter()
        loglikelihoods(run.model, encoded.choices, **options)
        rates[name] = len(encoded.items) / (time.perf_counter() - started)
    rates["truncated"] = encoded.truncated
    assert len(encoded.items) == len(load_task(str(task_file)).items), "items were skipped"
    return rates


def lmlab_command(run_dir: Path, task_file: Path, out: Path) -> tuple[float, dict, list[list[float]]]:
    """`lmlab eval RUN --task FILE` as a user runs it: wall time, its summary, its per-choice log-likelihoods."""
    started = time.perf_counter()
    done = subprocess.run([LMLAB, "eval", str(run_dir), "--task", str(task_file), "--samples", str(out), "--json",
                           "--device", "cpu"], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    return (seconds, json.loads(done.stdout)["tasks"][0],
            [json.loads(line)["loglikelihoods"] for line in out.read_text().splitlines()])


def lm_eval_command(run_dir: Path, export: Path, task_file: Path, root: Path, batch: int) -> tuple[float, dict]:
    """lm-eval's hf backend on the export, timed from its process's start. A char run's export has no end-of-text
    token, which lm-eval takes as the start of a document: it is told lmlab's (a newline)."""
    include = root / f"lm_eval_tasks_{batch}"
    name = lm_eval_reference.write_task(include, "bench_hellaswag", task_file, "hellaswag")
    prefix = document_start(RunDir(run_dir).tokenizer())[0]
    started = time.perf_counter()
    found = lm_eval_reference.run("hf", f"pretrained={export},dtype=float32,prefix_token_id={prefix}", [name],
                                  include, root, batch)
    return time.perf_counter() - started, found["tasks"][name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="demo,gpt2", help="demo, gpt2 or both")
    parser.add_argument("--items", default="demo=200,gpt2=40", help="items per shape, e.g. demo=200,gpt2=40")
    parser.add_argument("--lm-eval-batch", default="1,16", help="lm-eval --batch_size values to time (1: its default)")
    args = parser.parse_args()
    counts = {k: int(v) for k, v in (part.split("=") for part in args.items.split(","))}
    speed = Table(title="Task scoring, items/s (HellaSwag-shaped items, 4 choices, fp32, this process)")
    for column in ("shape", "items", "cut from the left", "batched (default)", "batched, no shared contexts",
                   "one choice at a time", "batched / one at a time"):
        speed.add_column(column, justify="left" if column == "shape" else "right")
    walls = Table(title="Wall time of the whole command on the same items (process start to end)")
    for column in ("shape", "items", "command", "seconds", "lm-eval / lmlab", "acc", "acc_norm", "max |Δ ll|"):
        walls.add_column(column, justify="left" if column in ("shape", "command") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            root = Path(tmp) / shape
            root.mkdir()
            run = {"demo": demo_run, "gpt2": gpt2_run}[shape](root)
            task = write_items(root / "hellaswag.jsonl", counts[shape])
            rates = items_per_second(run, task)
            speed.add_row(shape, str(counts[shape]), str(rates["truncated"]), f"{rates['batched']:.2f}",
                          f"{rates['batched, no shared contexts']:.2f}", f"{rates['one choice at a time']:.2f}",
                          f"{rates['batched'] / rates['one choice at a time']:.1f}×")
            seconds, ours, lls = lmlab_command(run, task, root / "samples.jsonl")
            walls.add_row(shape, str(ours["items"]), "lmlab eval --task", f"{seconds:.1f}", "1.0×",
                          f"{ours['acc']:.4f}", f"{ours['acc_norm']:.4f}", "")
            export = root / "export"
            subprocess.run([LMLAB, "export-hf", str(run), str(export)], capture_output=True, check=True)
            for batch in map(int, args.lm_eval_batch.split(",")):
                theirs_seconds, theirs = lm_eval_command(run, export, task, root, batch)
                gap = max(abs(a - b) for mine, other in zip(lls, theirs["loglikelihoods"]) for a, b in zip(mine, other))
                walls.add_row(shape, str(len(theirs["loglikelihoods"])), f"lm-eval --model hf, batch {batch}",
                              f"{theirs_seconds:.1f}", f"{theirs_seconds / seconds:.1f}×", f"{theirs['acc']:.4f}",
                              f"{theirs['acc_norm']:.4f}", f"{gap:.1e}")
            console.print(speed)
            console.print(walls)


if __name__ == "__main__":
    main()
