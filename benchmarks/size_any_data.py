"""`--size auto` on data no fit was made on: the demo's recipe on other corpora, against a sweep of fixed depths.

    python benchmarks/size_any_data.py [--budget 5m] [--seeds 1,2] [--corpora prose,code,words] [--no-sweep]
                                       [--dir runs/size-any-data]

Each corpus is prepared here from what this machine has (nothing is downloaded):
- prose: the English prose the Python standard library ships (pydoc_data's topics and the documentation strings of
  its modules), BPE with a vocabulary of 2,048;
- code: the Python standard library's own source files, one parquet row each, characters;
- words: the embedded Shakespeare, lower-cased, in words (a vocabulary of 4,096), its first 1.2M tokens.
Each is trained under a renamed copy of the demo preset (`configs/shakespeare-char-modern-cpu.toml`, whose fit was
made on Shakespeare's characters): `--size auto` with the budget (the fit of its recipe carried over, the data's floor
and scale measured), then each of the depth chosen and its neighbours at `--size D` (the sweep: every seed), all at the
same budget. The table: the choice, its prediction and what it reached (the final score on the val split), the best
mean of the sweep's depths, the seconds the sizing spent before the run's first step (start-up, calibration and the
timing of sizes) and how far the run ended from its budget. Runs are kept under --dir; a run finished there is read,
not trained again.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console
from lmlab.core.config_toml import load_config
from lmlab.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shakespeare-char-modern-cpu.toml"
LMLAB = [sys.executable, "-m", "lmlab"]


def prose(folder: Path) -> list[str]:
    """The prose the Python standard library ships: pydoc's topics and its modules' documentation strings."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    texts = dict(topics)
    warnings.filterwarnings("ignore")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = __import__(name)
        except Exception:  # a module this build lacks (a platform's own)
            continue
        docs = {inspect.getdoc(getattr(module, attr, None)) or "" for attr in dir(module)}
        texts[name] = "\n\n".join(sorted(d for d in docs | {inspect.getdoc(module) or ""} if len(d) > 200))
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return [str(folder)]


def code(folder: Path) -> list[str]:
    """The Python standard library's source files, a parquet row each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(inspect.getfile(json)).parents[1].glob("*.py"))
    rows = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    pq.write_table(pa.table({"text": rows}), folder / "stdlib.parquet")
    return [str(folder / "stdlib.parquet")]


CORPORA = {  # name: (how its sources are made, prepare's arguments)
    "prose": (prose, ["--tokenizer", "bpe:2048"]),
    "code": (code, ["--tokenizer", "char"]),
    "words": (lambda folder: ["shakespeare"], ["--tokenizer", "word:4096", "--normalize", "lower",
                                               "--max-tokens", "1200000"]),
}


def prepared(name: str, root: Path) -> Path:
    make, arguments = CORPORA[name]
    data = root / "data"
    found = sorted(data.glob(f"{name}-*"))
    if found:
        return found[0]
    subprocess.run([*LMLAB, "prepare", *make(root / "sources" / name), *arguments, "--name", name, "--out-dir",
                    str(data)], check=True)
    return sorted(data.glob(f"{name}-*"))[0]


def trained(preset: Path, run: Path, budget: str, size: str, seed: int) -> dict:
    """A run's figures: trained here unless it finished before."""
    if not (run / "metrics.jsonl").exists() or not any(e["event"] == "final" for e in RunDir(run).events()):
        subprocess.run([*LMLAB, "train", str(preset), "--run", str(run), "--budget", budget, "--size", size,
                        "--set", f"train.seed={seed}"], check=True, stdout=subprocess.DEVNULL)
    events = RunDir(run).events()
    final = next(e for e in events if e["event"] == "final")
    end = next(e for e in reversed(events) if e["event"] == "end")
    sizing = next((e for e in events if e["event"] == "sizing"), {})
    return {"depth": load_config(run / "config.toml").model.n_layer, "final": final["val_loss"],
            "predicted": sizing.get("predicted_val"), "spent": sizing.get("spent"),
            "calibration": (sizing.get("calibration") or {}).get("seconds"),
            "late": (end["budget_spent"] - end["budget_seconds"]) / end["budget_seconds"]}


def corpus_row(name: str, args: argparse.Namespace) -> list[str]:
    root = Path(args.dir)
    dataset = prepared(name, root)
    preset = root / f"{name}.toml"  # the demo's recipe, renamed, on this data
    preset.write_text(DEMO.read_text(encoding="utf-8").replace('"data/shakespeare-char"', json.dumps(str(dataset))))
    sized = trained(preset, root / "runs" / f"{name}-auto", args.budget, "auto", args.seeds[0])
    sweep: dict[int, list[float]] = {}
    if args.sweep:
        for depth in (d for d in (sized["depth"] - 1, sized["depth"], sized["depth"] + 1) if d >= 1):
            sweep[depth] = [trained(preset, root / "runs" / f"{name}-d{depth}-s{seed}", args.budget, str(depth),
                                    seed)["final"] for seed in args.seeds]
    best = min(sweep.items(), key=lambda item: statistics.mean(item[1]), default=None)
    meta = json.loads((dataset / "meta.json").read_text())
    predicted = sized["predicted"]
    return [name, meta["tokenizer"], args.budget, str(sized["depth"]),
            "-" if predicted is None else f"{predicted:.4f} ({predicted / sized['final'] - 1:+.1%})",
            f"{sized['final']:.4f}",
            "-" if best is None else f"{statistics.mean(best[1]):.4f} (depth {best[0]}, {len(best[1])} seeds)",
            f"{sized['spent']:.1f} s ({sized['calibration'] or 0:.1f} s calibrating)", f"{sized['late']:+.1%}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--seeds", default="1,2", type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--corpora", default=",".join(CORPORA), type=lambda text: text.split(","))
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--dir", default="runs/size-any-data")
    args = parser.parse_args()
    table = Table(title=f"--size auto of the demo's recipe on other data, {args.budget} (the sweep: its mean final "
                        "val over the seeds, best depth)")
    for column in ("corpus", "tokenizer", "budget", "chosen", "predicted (vs reached)", "reached", "sweep's best",
                   "sizing spent", "ended"):
        table.add_column(column, justify="left" if column in ("corpus", "tokenizer") else "right")
    for name in args.corpora:
        table.add_row(*corpus_row(name, args))
    console.print(table)


if __name__ == "__main__":
    main()
