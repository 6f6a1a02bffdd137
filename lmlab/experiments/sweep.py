"""Grid sweeps: every combination of a few settings, each trial a normal run under runs/<sweep>/<trial>/,
all under one token or wall-clock budget, each of a size of the preset's family where one is asked for (`auto`: the
size the trial's settings train best in the budget here, so a setting is judged at the size it would be trained at);
a re-run skips finished trials and resumes an interrupted one. The trials compare on their final scores (the
whole val split, or an even sample of it with its standard error) where they all have one."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lmlab.analysis.columns import final_cell
from lmlab.analysis.compare import told_apart
from lmlab.analysis.runs import RunSummary, summarize
from lmlab.core.busy import LoadMeter
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import load_config, parse_override
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text, plain_name, read_text
from lmlab.core.humanize import count
from lmlab.core.jsontext import parse_json
from lmlab.experiments.sizing import check_shape_kept, parse_size, sized_run
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.tracking import require_tracker

DONE = ("finished", "stopped early")  # statuses of a trial that a re-run skips


@dataclass
class Trial:
    name: str  # readable, from the swept values, e.g. "learning_rate=3e-3,n_layer=4"
    overrides: list[str]  # `section.key=value` strings on top of the config (swept, fixed and budget ones)
    run_dir: Path
    config: RunConfig


@dataclass
class SweepResult:
    summaries: list[RunSummary]  # each trial's, in order, as the sweep ended
    stopped_by: str | None = None  # a signal that ended the sweep early (the current trial was checkpointed)

    @property
    def best(self) -> RunSummary | None:
        """The finished trial of the lowest final score, where every finished trial has one; else of the lowest val
        its evaluations read."""
        done = [(best, s) for s in self.summaries if (best := s.best_val_loss) is not None and s.status in DONE]
        finals = [(final, s) for _, s in done if (final := s.final_val_loss) is not None]
        scored = finals if len(finals) == len(done) else done
        return min(scored, key=lambda pair: pair[0])[1] if scored else None

    def verdict(self) -> list[str]:
        """The best setting, with the spread it is chosen within: the settings it is not told apart from (within
        twice the standard error of their final scores' difference), else its margin over the next; and the trials'
        tokens where they differ (a time budget buys a faster setting more)."""
        best = self.best
        done = [s for s in self.summaries if s.best_val_loss is not None and s.status in DONE]
        scores = [(s, s.final_val_loss, s.final_stderr or 0.0) for s in done if s.final_val_loss is not None]
        if best is None or len(scores) < len(done):
            return [] if best is None else [f"best setting: {best.name} (best val loss {best.best_val_loss:.4f}, run "
                                            f"{best.path}): the least of each trial's evaluations, estimates whose "
                                            "spread is not measured"]
        first, *others = sorted(scores, key=lambda score: score[1])
        lines = [f"best setting: {first[0].name} (final val {final_cell(*first[1:])}, run {first[0].path})"]
        ties = [o for o in others if not told_apart(*first[1:], *o[1:])]
        lines += [_margin(first, o) for o in ties or others[:1]]
        lo, hi = min(done, key=lambda s: s.tokens), max(done, key=lambda s: s.tokens)
        if hi.tokens > UNEQUAL * lo.tokens:
            lines.append(f"unequal tokens: the trials trained {count(lo.tokens)} ({lo.name}) to {count(hi.tokens)} "
                         f"({hi.name}, {hi.tokens / lo.tokens:.2f}x): their scores differ by what they trained as "
                         "well as by their settings")
        return lines


UNEQUAL = 1.01  # trials' tokens further apart than this are said to differ
Score = tuple[RunSummary, float, float]  # a trial, its final score and the score's standard error


def _margin(best: Score, other: Score) -> str:
    """How far the best final score is below another's, against the noise of their difference."""
    gap, noise, score = other[1] - best[1], math.hypot(best[2], other[2]), f"{other[0].name} ({final_cell(*other[1:])})"
    if not noise:
        return (f"{gap:.4f} below {score}, both on the whole val split: no sampling error, and how far a seed moves "
                "a score is not measured (--set train.seed=1,2 measures it)")
    if told_apart(*best[1:], *other[1:]):
        return f"{gap:.4f} below the next, {score}: past twice the standard error of the difference (2 × {noise:.4f})"
    return (f"within the noise of {score}: {gap:.4f} apart, under twice the standard error of the difference "
            f"(2 × {noise:.4f}); more val windows or seeds would tell them apart")


def parse_grid(sets: list[str]) -> list[tuple[str, list[str]]]:
    """`section.key=v1,v2,...` items as (key, values); a single value is a setting shared by every trial."""
    grid = []
    for item in sets:
        section, name, text = parse_override(item)
        values = [v.strip() for v in text.split(",")]
        if not all(values):
            raise UserError(f"--set {item!r} must look like section.key=v1,v2,..., e.g. train.learning_rate=1e-3,3e-3.")
        grid.append((f"{section}.{name}", values))
    return grid


def plan_trials(config: Path, sets: list[str], sweep_dir: Path, budget_tokens: int = 0,
                budget_seconds: float = 0.0) -> list[Trial]:
    """The Cartesian product of the swept values, every trial's config loaded (so a bad value stops the sweep
    before anything trains) and given the same budget."""
    grid = parse_grid(sets)
    fixed = [f"{key}={values[0]}" for key, values in grid if len(values) == 1]
    swept = [(key, values) for key, values in grid if len(values) > 1]
    trials = []
    for combo in itertools.product(*(values for _, values in swept)):
        chosen = [(key, value) for (key, _), value in zip(swept, combo)]
        overrides = fixed + [f"{key}={value}" for key, value in chosen]
        if budget_seconds:
            overrides.append(f"train.budget_seconds={budget_seconds}")
        cfg = load_config(config, overrides)
        if budget_tokens:
            # Equal tokens for every trial, whatever its batch shape: the step count follows from them.
            overrides.append(f"train.max_iters={max(1, round(budget_tokens / cfg.tokens_per_step))}")
            cfg = load_config(config, overrides)
        # `learning_rate=3e-3,n_layer=4`: the field names and the values as typed, safe as a folder name
        text = ",".join(f"{key.partition('.')[2]}={value}" for key, value in chosen) or "base"
        name = re.sub(r"[^A-Za-z0-9_.,=+-]", "-", text)
        trials.append(Trial(name, overrides, sweep_dir / name, cfg))
    return trials


def keep_record(path: Path, record: dict, refusal: str) -> None:
    """Write `record`, what a folder of runs is (a sweep, a miniseries), as `path`; refused in `refusal` where the
    folder holds another: runs of another record would not belong with them."""
    try:
        other = parse_json(read_text(path)) != record
    except FileNotFoundError:
        other = False
    except ValueError:  # damaged: not a record of these runs either
        other = True
    if other:
        raise UserError(refusal)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))


def run_sweep(config: Path, sets: list[str], name: str | None = None, root: Path = Path("runs"),
              budget_tokens: int = 0, budget_seconds: float = 0.0, device: str = "auto",
              console: Console | None = None, size: str | int | None = None,
              window: LoadMeter | None = None) -> SweepResult:
    """Run (or continue) every trial in turn, each of `size` (a depth of the preset's family, or "auto": the depth its
    settings train best in `budget_seconds`, the timing counted in the budget) where given; a stop signal ends the
    sweep after checkpointing the current one. `window`: a load meter started before PyTorch loaded."""
    if budget_tokens and budget_seconds:
        raise UserError("pass --budget-tokens or --budget-seconds, not both: a sweep compares under one budget.")
    size = None if size is None else parse_size(size)
    if size == "auto" and not budget_seconds:
        raise UserError("--size auto sizes each trial to a time budget; give one with --budget-seconds (e.g. 300), "
                        "or a size by its depth (--size 4).")
    if size is not None and budget_tokens:
        raise UserError("--size sets each trial's shape, and --budget-tokens its steps from that shape: pass "
                        "--budget-seconds with --size, or drop --size.")
    console = console or Console()
    # One meter for every trial's thread choice: the first reads the sweep's set-up, each next one the trial before
    # (a window long enough to tell a quiet machine; a fresh one would be too short, and the threads timed on noise).
    window = window or LoadMeter().start()
    sweep_dir = Path(root) / plain_name(f"{Path(config).stem}-sweep" if name is None else name, "--name", "--dir")
    trials = plan_trials(Path(config), sets, sweep_dir, budget_tokens, budget_seconds)
    if size is not None:
        check_shape_kept(size, [o for t in trials for o in t.overrides])
    for tracker in {trial.config.train.tracker for trial in trials}:
        require_tracker(tracker)
    # sweep.json says what the sweep is; a re-run must be the same sweep, or its trials would not compare
    record = {"config": str(Path(config)), "set": list(sets), "budget_tokens": budget_tokens,
              "budget_seconds": budget_seconds, **({"size": size} if size is not None else {})}
    path = sweep_dir / "sweep.json"
    keep_record(path, record, f"{sweep_dir} holds a sweep with other settings ({path}); pass another --name, "
                "or repeat that sweep's command to continue it.")
    stopped_by: str | None = None
    for i, trial in enumerate(trials, 1):
        status = summarize(trial.run_dir).status
        if status in DONE:
            console.print(f"trial {i}/{len(trials)} {trial.name}: already {status}, skipped")
            continue
        started = time.perf_counter()  # a trial's budget counts from here: sizing it is part of it
        resume = bool(RunDir(trial.run_dir).step_folders())
        console.print(f"trial {i}/{len(trials)} {trial.name}: {'resuming' if resume else 'training'} "
                      f"({' '.join(trial.overrides)})")
        # a resumed trial goes on by its config.toml: the shape it was sized to, say
        cfg = RunDir(trial.run_dir).config() if resume else trial.config
        sizing = sized_run(Path(config), size, started, console) if size is not None and not resume else None
        stopped_by = Trainer(train_job(cfg, trial.run_dir, device, resume, console, started=started, window=window,
                                       sizing=sizing)).run().stopped_by
        if stopped_by:
            break
    return SweepResult([summarize(t.run_dir) for t in trials], stopped_by)
