"""`lmlab scaling PRESET --refit`: the miniseries a preset's fit (lmlab.experiments.family) is measured on. Each depth
of its family trains at its shortest length for a few LRs, the LR rule is fitted through each depth's best, each depth
trains at the other lengths at the rule's LR, and L(N, D) is fitted through every run. Each run is an ordinary run under
runs/<preset>-miniseries/; a re-fit skips the finished ones and resumes an interrupted one. A series the fit could not
be made of is refused before any run, by the fit's own rule; one given a time budget keeps its smallest depths whose
runs fit it, each depth's steps timed first as a budgeted run's are."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from lmlab.analysis.runs import summarize
from lmlab.analysis.scaling import LossSurface, effective_tokens, fit_loss_surface, surface_refusal
from lmlab.core.busy import LoadMeter
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import load_config
from lmlab.core.device import machine
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text
from lmlab.core.humanize import format_duration
from lmlab.core.machine import Machine
from lmlab.data.shards import read_meta, windows_in
from lmlab.experiments.calibration import bytes_per_token
from lmlab.experiments.family import MAX_DEPTH, Family, LrRule, SizeFit, fit_path, preset_sha256
from lmlab.experiments.plan import estimate, local_hardware, shape_of
from lmlab.experiments.size_search import SET_UP
from lmlab.experiments.sizing import with_vocab
from lmlab.experiments.sweep import keep_record
from lmlab.run.rundir import RunDir
from lmlab.train.budget import WARMUP_SHARE, Costs, Plan, final_windows_by_steps
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.timing import time_config

DEPTHS = (1, 2, 3, 4, 5, 6)
# 1M to 8M: what a CPU's budgets of one to five minutes train (docs/reference/training.md: why not shorter ones).
TOKENS = (2**20, 2**22, 2**23)
LR_FACTORS = (0.5, 1.0, 2.0)  # the LR search, at the shortest length
MIN_STEPS = 8  # a run of fewer steps is too short to say anything of its size
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_tokens(text: str) -> tuple[int, ...]:
    """`64k,256k,1M`: token counts (k and M are 2**10 and 2**20)."""
    found = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", item[:40])
        value = float(match[1]) * UNITS[match[2].lower()] if match else 0
        if not 1 <= value <= 2**40:
            raise UserError(f"--tokens {text[:60]!r}: each length is a token count such as 64k, 256k or 1M, "
                            "comma-separated.")
        found.append(int(value))
    return tuple(sorted(found))


@dataclass(frozen=True)
class Series:
    """What a miniseries trains: `depths` of the family, each at `tokens` (its LR searched at the shortest length over
    `lr_factors` of the preset's) but those past `max_flops` (6·N·D; 0: none)."""

    depths: tuple[int, ...] = DEPTHS
    tokens: tuple[int, ...] = TOKENS
    lr_factors: tuple[float, ...] = LR_FACTORS
    max_flops: float = 0.0

    def __post_init__(self) -> None:
        for option, values, what in (("--depths", self.depths, "size"), ("--tokens", self.tokens, "length")):
            twice = next((v for v in values if values.count(v) > 1), None)
            if twice is not None:
                raise UserError(f"{option} names {twice} twice, and each is one {what} of the fit; name each once.")
        if any(not 0 < f <= 100 for f in self.lr_factors):
            raise UserError("--lr-factors are multiples of the preset's LR, above 0 and at most 100, e.g. 0.5,1,2.")
        if any(not 1 <= d <= MAX_DEPTH for d in self.depths):
            raise UserError(f"--depths are depths of the preset's family, from 1 to {MAX_DEPTH}, e.g. 1,2,3,4.")

    def within(self, params: int, tokens: int) -> bool:
        return not self.max_flops or 6 * params * tokens <= self.max_flops

    @property
    def searched(self) -> int:
        return self.tokens[0]


def best_factor(factors: list[float], vals: list[float]) -> float:
    """The LR factor of lowest val: a parabola's vertex in log(factor) where three or more factors bracket it, else the
    best one tried."""
    best = factors[int(np.argmin(vals))]
    if len(set(factors)) < 3:
        return best
    a, b, _ = np.polyfit(np.log(factors), vals, 2)
    vertex = -b / (2 * a) if a > 0 else math.nan
    return float(math.exp(vertex)) if math.log(min(factors)) <= vertex <= math.log(max(factors)) else best


def lr_rule(search: list[dict[str, Any]], preset_width: int) -> LrRule:
    """log(best factor) = log(scale) + exponent × log(preset width / width), by least squares over the depths."""
    x = [math.log(preset_width / s["width"]) for s in search]
    y = [math.log(s["best"]) for s in search]
    if len(set(x)) < 2:
        return LrRule(float(math.exp(np.mean(y))), 0.0)
    exponent, log_scale = np.polyfit(x, y, 1)
    return LrRule(round(float(math.exp(log_scale)), 4), round(float(exponent), 4))


class Miniseries:
    """The runs of one preset's miniseries under `folder`, trained in turn (finished ones skipped)."""

    def __init__(self, preset: Path, series: Series, folder: Path, device: str, console: Console):
        self.series, self.folder, self.device, self.console = series, folder, device, console
        self.family = Family.of(with_vocab(load_config(preset)), str(preset))
        # a family's sizes keep the preset's batch and context
        self.tokens_per_step = self.family.preset.tokens_per_step
        self.done, self.points = 0, dict[Path, dict[str, Any]]()  # the runs by folder, each trained once
        # each depth's weights that multiply every token: the fit's N
        self.params = {d: shape_of(self.family.config(d)).multiplied_params() for d in series.depths}
        self.total = len(self.left(every=True))
        refused = self.refusal(series.depths)
        if refused:
            raise UserError(refused)

    def steps(self, tokens: int) -> int:
        """The steps a run of `tokens` trains: whole steps, at least MIN_STEPS."""
        return max(MIN_STEPS, round(tokens / self.tokens_per_step))

    def refusal(self, depths: tuple[int, ...]) -> str | None:
        """Why no fit could be made of the runs `depths` would train at the series' lengths, said before any trains
        (None: one could): two lengths that train the same steps, or the points the fit would take (each depth at
        each length within the compute) refused by the fit's own rule."""
        series, lengths = self.series, sorted(self.series.tokens)
        for a, b in zip(lengths, lengths[1:]):
            if self.steps(a) == self.steps(b):
                return (f"--tokens {a} and {b} both train {self.steps(a)} steps of {self.tokens_per_step:,} tokens (a "
                        f"run trains {MIN_STEPS} at least), one length to the fit; give lengths that round to "
                        "different steps.")
        points = [(self.params[d], self.steps(t) * self.tokens_per_step) for d in depths
                  for t in series.tokens if series.within(self.params[d], t)]
        flops = f" within --max-flops {series.max_flops:g}" if series.max_flops else ""
        refused = surface_refusal([n for n, _ in points], [d for _, d in points],
                                  f"--depths {','.join(map(str, depths))} at --tokens "
                                  f"{','.join(map(str, series.tokens))}{flops} are")
        more = ", or raise --max-flops" if series.max_flops else ""
        return refused and f"{refused}; add depths (--depths) or lengths (--tokens){more}."

    def config(self, depth: int, tokens: int, factor: float) -> RunConfig:
        """Depth `depth` trained for `tokens` (`steps`) at `factor` × the preset's LR, with one evaluation and one
        checkpoint, at its end."""
        cfg = self.family.config(depth)
        tc, tokens_per_step, steps = cfg.train, self.tokens_per_step, self.steps(tokens)
        warmup = tc.warmup_steps(read_meta(Path(cfg.data.dataset))["train"]["tokens"], tokens_per_step)
        train = dataclasses.replace(tc, budget_seconds=0.0, max_iters=steps, eval_interval=steps,
                                    checkpoint_interval=steps, lr_decay_iters=0, patience=0, warmup_epochs=0.0,
                                    warmup_iters=min(warmup, round(WARMUP_SHARE * steps)),
                                    learning_rate=float(f"{tc.learning_rate * factor:.3g}"),
                                    min_lr=float(f"{tc.min_lr * factor:.3g}"))
        return dataclasses.replace(cfg, train=train)

    def search(self, depth: int) -> dict[str, Any]:
        """The depth's LR search at the shortest length: each factor's val, and the best factor."""
        tried = [self.run(depth, self.series.searched, f) for f in self.series.lr_factors]
        factors = [t["learning_rate"] / self.family.config(depth).train.learning_rate for t in tried]
        vals = [t["val"] for t in tried]
        return {"depth": depth, "width": self.family.width(depth), "factors": factors, "vals": vals,
                "best": best_factor(factors, vals)}

    def lengths(self, search: dict[str, Any], factor: float) -> list[dict[str, Any]]:
        """The depth's points at the rule's LR (`factor` of the preset's): each length within the series' compute."""
        depth, series = search["depth"], self.series
        nearest = min(search["factors"], key=lambda f: abs(math.log(f / factor)))  # the searched length's run
        return [self.run(depth, t, nearest if t == series.searched else factor) for t in series.tokens
                if series.within(self.params[depth], t)]

    def left(self, depths: tuple[int, ...] | None = None, every: bool = False) -> list[RunConfig]:
        """The runs of `depths` (default: the series') still to train, or `every` one, as far as they are known before
        the LR search ends."""
        series, todo = self.series, []
        for depth in series.depths if depths is None else depths:
            for factor in series.lr_factors:
                cfg = self.config(depth, series.searched, factor)
                if every or summarize(self.folder / self.name(depth, series.searched, cfg)).status != "finished":
                    todo.append(cfg)
            for tokens in series.tokens:
                if tokens == series.searched or not series.within(self.params[depth], tokens):
                    continue
                done = not every and any(summarize(path).status == "finished"
                                         for path in self.folder.glob(f"d{depth}-t{tokens}-lr*"))
                todo += [] if done else [self.config(depth, tokens, 1.0)]
        return todo

    @staticmethod
    def name(depth: int, tokens: int, cfg: RunConfig) -> str:
        return f"d{depth}-t{tokens}-lr{cfg.train.learning_rate:g}"

    def foretell(self) -> str:
        """What the miniseries will train and about how long that takes here, said before it starts."""
        todo = self.left()
        if not todo:
            return f"miniseries: its {self.total} runs are trained already under {self.folder}; fitting them"
        hardware = local_hardware(self.device, self.family.preset.train.dtype)
        guess = estimate(hardware, None, self.family.preset, [])
        seconds = sum(cfg.train.max_iters * self.tokens_per_step / guess.tokens_per_sec(shape_of(cfg)) for cfg in todo)
        again = f" ({self.total - len(todo)} trained already)" if len(todo) < self.total else ""
        return (f"miniseries: {len(todo)} of {self.total} runs to train{again} under {self.folder}, about "
                f"{format_duration(seconds)} of training on {hardware.name} (at {100 * guess.mfu:.0f}% of its "
                f"{hardware.peak.flops / 1e12:.3g} TFLOP/s, {guess.mfu_source.split(';')[0]}), plus each "
                "run's set-up and evaluation; a stopped refit goes on where it stopped")

    def timed(self, machine: Machine, depth: int, deadline: float) -> Costs:
        """What a step, an evaluation's batch, a checkpoint and the end of depth `depth` cost on `machine` now, timed
        as a budgeted run's are (lmlab.train.timing), cut short where two steps would end past `deadline`."""
        return time_config(self.config(depth, self.series.searched, 1.0), machine, deadline).costs()

    def seconds(self, depths: tuple[int, ...], costs: dict[int, Costs]) -> float:
        """What the runs of `depths` still to train take at their depths' `costs`, each counted as a budget's plan
        counts a run (lmlab.train.budget): the trainer's set-up, the steps, the one evaluation and checkpoint, the
        final score of a run by steps and the end."""
        cfg = self.family.preset
        windows = windows_in(read_meta(Path(cfg.data.dataset)), "val", cfg.model.block_size)
        total = 0.0
        for run in self.left(depths):
            tc, c, steps = run.train, costs[self.family.growth.setting(run.model, "depth")], run.train.max_iters
            final = final_windows_by_steps(windows, tc.batch_size, run.model.block_size, steps * self.tokens_per_step)
            made = Plan(0.0, step_seconds=c.step, eval_seconds=c.evaluation(tc.eval_iters),
                        checkpoint_seconds=c.checkpoint, finish_seconds=c.finish,
                        final_seconds=-(-final // tc.batch_size) * c.eval_batch / 2)
            total += SET_UP + made.needed(steps, (steps, steps))
        return total

    def budgeted(self, budget: float, started: float, timed: Callable[[int, float], Costs] | None = None) -> Series:
        """The series cut to its smallest depths whose runs left fit `budget` seconds counted from `started` (a
        time.perf_counter() reading), from the fewest the fit takes up, each depth's costs timed here now (`timed`),
        the timing counted in the budget; the plan said in a line. Refused (UserError) where the fewest do not
        fit, with the budget they need."""
        if timed is None:  # timed on one machine, built here
            tc = self.family.preset.train
            machine = Machine.of(self.device, tc.dtype, tc.threads)
            try:
                return self.budgeted(budget, started, functools.partial(self.timed, machine))
            finally:
                machine.threads.restore()  # each run chooses its own
        deadline = started + budget - SET_UP
        order = tuple(sorted(self.series.depths))
        least = next(k for k in range(2, len(order) + 1) if self.refusal(order[:k]) is None)
        costs = {d: timed(d, deadline) for d in order[:least]}
        kept = least
        while kept < len(order) and time.perf_counter() - started + self.seconds(order[:kept], costs) <= budget:
            costs[order[kept]] = timed(order[kept], deadline)  # the next depth, timed only where these fit
            kept += 1  # left out below where it does not fit
        spent = time.perf_counter() - started
        while kept > least and spent + self.seconds(order[:kept], costs) > budget:  # the timing took its share
            kept -= 1
        depths, needed = order[:kept], spent + self.seconds(order[:kept], costs)
        what = self.what(depths, spent, needed, costs)
        if needed > budget:
            raise UserError(f"budget {budget:g} s: the fewest runs the fit takes, {what}, do not fit it; "
                            f"give a budget of at least {math.ceil(needed)}s, or shorter --tokens or fewer "
                            "--lr-factors.")
        out = (f"; depth{'s' * (len(order) - kept > 1)} {','.join(map(str, order[kept:]))} left out, "
               "which would take it past the budget" if kept < len(order) else "")
        self.console.print(f"miniseries in budget {format_duration(budget)}: {what}{out}; runs under "
                           f"{self.folder}, a stopped refit goes on where it stopped", highlight=False)
        return dataclasses.replace(self.series, depths=tuple(d for d in self.series.depths if d in depths))

    def what(self, depths: tuple[int, ...], spent: float, needed: float, costs: dict[int, Costs]) -> str:
        """The runs of `depths` planned to a budget in a clause: depths, lengths, steps, and what their time
        is made of (`needed` seconds in all, `spent` of them gone on start-up and timing; costs as timed)."""
        tokens = self.series.tokens
        todo, every = len(self.left(depths)), len(self.left(depths, every=True))
        again = f" ({every - todo} trained already)" if todo < every else ""
        steps = ", ".join(f"{1000 * costs[d].step:.3g}" for d in depths)
        return (f"depths {','.join(map(str, depths))} at {', '.join(f'{t:,}' for t in tokens)} tokens "
                f"({', '.join(f'{self.steps(t):,}' for t in tokens)} steps), {todo} runs to train with "
                f"the LR search{again}, about {format_duration(needed)} here (steps of {steps} ms timed now, "
                f"each run's set-up, evaluation, checkpoint and final score, and {spent:.0f} s of start-up "
                "and timing)")

    def run(self, depth: int, tokens: int, factor: float) -> dict[str, Any]:
        """Train one run (or keep it, finished before); its point: depth, params, tokens, LR, val, run, seconds."""
        cfg = self.config(depth, tokens, factor)
        path = self.folder / self.name(depth, tokens, cfg)
        if path in self.points:
            return self.points[path]
        summary = summarize(path)
        self.done += 1
        if summary.status != "finished":
            resume = bool(RunDir(path).step_folders())
            self.console.print(f"miniseries {self.done}/{self.total}: {self.family.describe(depth)}, {tokens:,} tokens "
                               f"({cfg.train.max_iters} steps), LR {cfg.train.learning_rate:g}", highlight=False)
            result = Trainer(train_job(RunDir(path).config() if resume else cfg, path, self.device, resume,
                                       self.console)).run()  # a resume goes on by its config.toml, as resolved
            if result.stopped_by:
                raise UserError(f"the miniseries was stopped by {result.stopped_by}; run the same command again to "
                                "go on from where it stopped.")
            summary = summarize(path)
        self.points[path] = {"depth": depth, "params": self.params[depth], "tokens": summary.tokens,
                             "learning_rate": cfg.train.learning_rate, "val": summary.reached, "run": str(path),
                             "seconds": round(summary.elapsed, 1)}
        return self.points[path]


def refit(preset: Path, series: Series, root: Path, device: str, console: Console, budget: float = 0.0,
          started: float | None = None) -> SizeFit:
    """Train (or continue) the preset's miniseries under root/<preset>-miniseries/, fit it, and keep the fit beside
    the preset; the fit. With a `budget` (seconds counted from `started`, a time.perf_counter() reading; default:
    now), the series is cut to the smallest depths that fit it (`Miniseries.budgeted`)."""
    cfg = load_config(preset)
    folder = root / f"{preset.stem}-miniseries"
    # A preset without a family, or a series the fit could not take, refused first.
    runs = Miniseries(preset, series, folder, device, console)
    if budget:
        series = runs.budgeted(budget, time.perf_counter() if started is None else started)
        runs = Miniseries(preset, series, folder, device, console)
    # miniseries.json says which preset the runs are of; the runs of a preset edited since would not belong
    record = folder / "miniseries.json"
    keep_record(record, {"preset": str(preset), "preset_sha256": preset_sha256(preset)},
                f"{folder} holds the miniseries of another preset, or of this one before an edit ({record}); "
                "pass another --dir, or delete it to train the series again.")
    if not budget:
        console.print(runs.foretell(), highlight=False)
    began = time.perf_counter()
    with LoadMeter() as meter:
        search = [runs.search(depth) for depth in series.depths]
        rule = lr_rule(search, runs.family.preset_width)
        points = [point for s in search for point in runs.lengths(s, rule.factor(s["width"], runs.family.preset_width))]
    assert meter.load is not None, "a meter measures its window as it closes"
    meta = read_meta(Path(cfg.data.dataset))
    unique = meta["train"]["tokens"]
    surface = _surface(points, unique)
    dataset = {"path": cfg.data.dataset, "tokenizer": meta["tokenizer"], "train_sha256": meta["train"]["sha256"],
               "train_tokens": unique, "bytes_per_token": bytes_per_token(meta)}
    measured = {"when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
                "seconds": round(sum(r["seconds"] for r in runs.points.values()), 1),  # the runs' own training
                "refit_seconds": round(time.perf_counter() - began, 1), "load": meter.load.record(),
                "command": _command(preset, series)}
    fit = SizeFit(str(preset), preset_sha256(preset), dataset, surface, rule, points, search, measured,
                  held_out(points, unique))
    atomic_write_text(fit_path(preset), json.dumps(fit.to_json(), indent=1) + "\n")
    return fit


def _surface(points: list[dict[str, Any]], unique: int) -> LossSurface:
    """L(N, D) through `points`, D the new tokens each run's are worth over a train split of `unique` (as `--size
    auto` predicts: lmlab.experiments.family.SizeFit.predict), so runs that repeat their data are not read as new."""
    return fit_loss_surface([p["params"] for p in points], [effective_tokens(p["tokens"], unique) for p in points],
                            [p["val"] for p in points])


def held_out(points: list[dict[str, Any]], unique: int) -> list[dict[str, Any]]:
    """Each depth's longest run predicted by the surface through the other runs: how far the fit is from a run it has
    not seen. A depth whose longest run the others cannot be fitted without is left out."""
    found = []
    for depth in sorted({p["depth"] for p in points}):
        longest = max((p for p in points if p["depth"] == depth), key=lambda p: p["tokens"])
        try:
            surface = _surface([p for p in points if p is not longest], unique)
        except UserError:
            continue
        found.append({"depth": depth, "params": longest["params"], "tokens": longest["tokens"], "val": longest["val"],
                      "predicted": surface.predict(longest["params"], effective_tokens(longest["tokens"], unique))})
    return found


def _command(preset: Path, series: Series) -> str:
    tokens = ",".join(str(t) for t in series.tokens)
    flops = f" --max-flops {series.max_flops:g}" if series.max_flops else ""
    return (f"lmlab scaling {preset} --refit --depths {','.join(map(str, series.depths))} --tokens {tokens} "
            f"--lr-factors {','.join(f'{f:g}' for f in series.lr_factors)}{flops}")


