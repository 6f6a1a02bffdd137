"""`lmlab scaling PRESET --refit`: the miniseries a preset's fit (lmlab.experiments.family) is measured on. Each depth
of its family trains at its shortest length for a few LRs, the LR rule is fitted through each depth's best, each depth
trains at the other lengths at the rule's LR, and L(N, D) is fitted through every run. Each run is an ordinary run under
runs/<preset>-miniseries/; a re-fit skips the finished ones and resumes an interrupted one. A series the fit could not
be made of is refused before any run, by the fit's own rule; what a refit given a time budget leaves open is planned to
it (lmlab.experiments.series), each depth's steps timed first as a budgeted run's are."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
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
from lmlab.experiments.family import Family, LrRule, SizeFit, fit_path, preset_sha256, refit_command
from lmlab.experiments.plan import estimate, local_hardware, shape_of
from lmlab.experiments.series import MIN_STEPS, Planner, Series, tokens_text
from lmlab.experiments.size_search import SET_UP
from lmlab.experiments.sizing import with_vocab
from lmlab.experiments.sweep import keep_record
from lmlab.run.rundir import RunDir
from lmlab.train.budget import WARMUP_SHARE, Costs, Plan, final_windows_by_steps
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.timing import time_config


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
        self.meta = read_meta(Path(self.family.preset.data.dataset))
        self.done, self.points = 0, dict[Path, dict[str, Any]]()  # the runs by folder, each trained once
        self.weights: dict[int, int] = {}  # each depth's, as `params` counts them
        self.total = len(self.left(series, every=True)) if series.given else 0
        refused = self.refusal(series) if series.depths and series.tokens else None
        if refused:
            raise UserError(refused)

    def params(self, depth: int) -> int:
        """The depth's weights that multiply every token: the fit's N."""
        if depth not in self.weights:
            self.weights[depth] = shape_of(self.family.config(depth)).multiplied_params()
        return self.weights[depth]

    def steps(self, tokens: int) -> int:
        """The steps a run of `tokens` trains: whole steps, at least MIN_STEPS."""
        return max(MIN_STEPS, round(tokens / self.tokens_per_step))

    def refusal(self, series: Series) -> str | None:
        """Why no fit could be made of the runs `series` would train, said before any trains (None: one could): two
        lengths that train the same steps, or the points the fit would take (each depth at each length within the
        series) refused by the fit's own rule."""
        lengths = sorted(series.tokens)
        for a, b in zip(lengths, lengths[1:]):
            if self.steps(a) == self.steps(b):
                return (f"--tokens {a} and {b} both train {self.steps(a)} steps of {self.tokens_per_step:,} tokens (a "
                        f"run trains {MIN_STEPS} at least), one length to the fit; give lengths that round to "
                        "different steps.")
        points = [(self.params(d), self.steps(t) * self.tokens_per_step) for d in series.depths
                  for t in series.tokens if series.within(d, self.params(d), t)]
        flops = f" within --max-flops {series.max_flops:g}" if series.max_flops else ""
        refused = surface_refusal([n for n, _ in points], [d for _, d in points],
                                  f"--depths {','.join(map(str, series.depths))} at --tokens "
                                  f"{','.join(map(str, series.tokens))}{flops} are")
        more = ", or raise --max-flops" if series.max_flops else ""
        return refused and f"{refused}; add depths (--depths) or lengths (--tokens){more}."

    def config(self, depth: int, tokens: int, factor: float) -> RunConfig:
        """Depth `depth` trained for `tokens` (`steps`) at `factor` × the preset's LR, with one evaluation and one
        checkpoint, at its end."""
        cfg = self.family.config(depth)
        tc, tokens_per_step, steps = cfg.train, self.tokens_per_step, self.steps(tokens)
        warmup = tc.warmup_steps(self.meta["train"]["tokens"], tokens_per_step)
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
        """The depth's points at the rule's LR (`factor` of the preset's): each length within the series."""
        depth, series = search["depth"], self.series
        nearest = min(search["factors"], key=lambda f: abs(math.log(f / factor)))  # the searched length's run
        return [self.run(depth, t, nearest if t == series.searched else factor) for t in series.tokens
                if series.within(depth, self.params(depth), t)]

    def left(self, series: Series, every: bool = False) -> list[RunConfig]:
        """The runs of `series` still to train, or `every` one, as far as they are known before the LR search ends."""
        todo = []
        for depth in series.depths:
            for factor in series.lr_factors:
                cfg = self.config(depth, series.searched, factor)
                if every or summarize(self.folder / self.name(depth, series.searched, cfg)).status != "finished":
                    todo.append(cfg)
            for tokens in series.tokens:
                if tokens == series.searched or not series.within(depth, self.params(depth), tokens):
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
        todo = self.left(self.series)
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
        return time_config(self.family.config(depth), machine, deadline).costs()

    def seconds(self, series: Series, costs: dict[int, Costs]) -> float:
        """What the runs of `series` still to train take at their depths' `costs`, each counted as a budget's plan
        counts a run (lmlab.train.budget): the trainer's set-up, the steps, the one evaluation and checkpoint, the
        final score of a run by steps and the end."""
        windows = windows_in(self.meta, "val", self.family.preset.model.block_size)
        total = 0.0
        for run in self.left(series):
            tc, c, steps = run.train, costs[self.family.growth.setting(run.model, "depth")], run.train.max_iters
            final = final_windows_by_steps(windows, tc.batch_size, run.model.block_size, steps * self.tokens_per_step)
            made = Plan(0.0, step_seconds=c.step, eval_seconds=c.evaluation(tc.eval_iters),
                        checkpoint_seconds=c.checkpoint, finish_seconds=c.finish,
                        final_seconds=-(-final // tc.batch_size) * c.eval_batch / 2)
            total += SET_UP + made.needed(steps, (steps, steps))
        return total

    def budgeted(self, budget: float, started: float, timed: Callable[[int, float], Costs] | None = None) -> Series:
        """The series planned to `budget` seconds counted from `started` (a time.perf_counter() reading) by
        lmlab.experiments.series.Planner, each depth's costs timed here now (`timed`) as the plan reaches it, the
        timing counted in the budget; the plan said in a line. Refused (UserError) where the cheapest plan a fit can
        be made of does not fit, with the budget it needs."""
        if timed is None:  # timed on one machine, built here
            tc = self.family.preset.train
            machine = Machine.of(self.device, tc.dtype, tc.threads)
            try:
                return self.budgeted(budget, started, functools.partial(self.timed, machine))
            finally:
                machine.threads.restore()  # each run chooses its own
        planner = Planner(self.series, budget, started, self.tokens_per_step, self.params,
                          lambda depth: timed(depth, started + budget - SET_UP), self.seconds, self.refusal)
        (series, needed), fits = planner.plan()
        what = self.what(series, planner.spent(), needed, planner.costs)
        if not fits:
            given = [hint for hint, named in (("a shorter --for", self.series.meant), ("shorter --tokens",
                     self.series.tokens), ("fewer --lr-factors", self.series.lr_factors)) if named]
            raise UserError(f"budget {budget:g} s: the fewest runs the fit takes, {what}, do not fit it; give a budget "
                            f"of at least {math.ceil(needed)} s{''.join(f', or {h}' for h in given)}.")
        out = planner.left_out
        deeper = "" if self.series.depths else " and deeper"
        out_said = (f"; depth{'s' * (len(out) > 1)} {','.join(map(str, out))}{deeper} left out, which would take it "
                    "past the budget" if out else "")
        self.console.print(f"miniseries in budget {format_duration(budget)}{self.meant(series)}: {what}{out_said}; "
                           f"runs under {self.folder}, a stopped refit goes on where it stopped", highlight=False)
        return series

    def meant(self, series: Series) -> str:
        """The run budgets a planned series is for, as its line says them ("" for a grid given whole)."""
        if not series.meant:
            return ""
        budgets = " to ".join(format_duration(b) for b in sorted({min(series.meant), max(series.meant)}))
        why = " (--for)" if self.series.meant else " (the longest whose plan fits it; --for names others)"
        return f", a fit for runs of {budgets}{why}"

    def what(self, series: Series, spent: float, needed: float, costs: dict[int, Costs]) -> str:
        """The runs of `series` planned to a budget in a clause: depths, lengths, steps, and what their time is made
        of (`needed` seconds in all, `spent` of them gone on start-up and timing; costs as timed)."""
        todo, every = len(self.left(series)), len(self.left(series, every=True))
        again = f" ({every - todo} trained already)" if todo < every else ""
        steps = ", ".join(f"{1000 * costs[d].step:,.3g}" if costs[d].step < 1 else f"{1000 * costs[d].step:,.0f}"
                          for d in series.depths)
        reach = ", ".join(f"{d} to {tokens_text(series.reach[d])}" for d in series.depths) if series.reach else ""
        longest = f"; each depth up to the first length past what it trains in those runs: {reach}" if reach else ""
        return (f"depths {','.join(map(str, series.depths))} at {', '.join(map(tokens_text, series.tokens))} tokens "
                f"({self.steps(series.tokens[0]):,} to {self.steps(series.tokens[-1]):,} steps{longest}), {todo} runs "
                f"to train with the LR searched over {','.join(f'{f:g}' for f in series.lr_factors)} x the "
                f"preset's at {tokens_text(series.searched)}{again}, about {format_duration(needed)} here (steps of "
                f"{steps} ms timed now, each run's set-up, evaluation, checkpoint and final score, and {spent:.0f} s "
                "of start-up and timing)")

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
        self.points[path] = {"depth": depth, "params": self.params(depth), "tokens": summary.tokens,
                             "learning_rate": cfg.train.learning_rate, "val": summary.reached, "run": str(path),
                             "seconds": round(summary.elapsed, 1)}
        return self.points[path]


def refit(preset: Path, series: Series, root: Path, device: str, console: Console, budget: float = 0.0,
          started: float | None = None) -> SizeFit:
    """Train (or continue) the preset's miniseries under root/<preset>-miniseries/, fit it, and keep the fit beside
    the preset; the fit. With a `budget` (seconds counted from `started`, a time.perf_counter() reading; default:
    now), what `series` leaves open is planned to it (`Miniseries.budgeted`); without one, the series is trained as
    given, whole."""
    cfg = load_config(preset)
    folder = root / f"{preset.stem}-miniseries"
    if series.meant and series.depths and series.tokens:
        raise UserError("--for plans a refit's depths or lengths for the runs it names, and --depths and --tokens "
                        "name both; drop --for, or one of them.")
    # A preset without a family, or a series the fit could not take, refused first.
    runs = Miniseries(preset, series, folder, device, console)
    given = series
    if budget:
        series = runs.budgeted(budget, time.perf_counter() if started is None else started)
        runs = Miniseries(preset, series, folder, device, console)
    elif series.meant or not series.given:  # a grid of every size at every length takes hours
        raise UserError(f"a refit without --budget trains the grid it is given, all of --depths, --tokens and "
                        f"--lr-factors, and a wide one takes hours: give it a time instead "
                        f"(`{refit_command(preset)}` plans its sizes, lengths and LR search to fit 10 minutes, and "
                        "says the plan and the runs the fit is for before any trains; --for 5m plans it for 5-minute "
                        "runs).")
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
                "command": _command(preset, given, series, budget)}
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


def _command(preset: Path, given: Series, series: Series, budget: float) -> str:
    """The command that measures the fit again: the grid trained, or where its lengths were planned to the runs it is
    for, the options given with the budget and those runs."""
    shown = given if series.reach else series
    named = [("--depths", ",".join(map(str, shown.depths))), ("--tokens", ",".join(map(str, shown.tokens))),
             ("--lr-factors", ",".join(f"{f:g}" for f in shown.lr_factors)),
             ("--max-flops", f"{shown.max_flops:g}" if shown.max_flops else "")]
    if series.reach:
        named += [("--budget", f"{math.ceil(budget)}s"), ("--for", ",".join(f"{b:g}s" for b in series.meant))]
    return " ".join([f"lmlab scaling {preset} --refit", *(f"{option} {value}" for option, value in named if value)])
