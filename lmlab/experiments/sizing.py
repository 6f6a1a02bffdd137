"""`--size auto`: the depth of a preset's family that a time budget trains to the lowest val loss on this machine, as it
runs now (or, for `plan --gpu`, on a datasheet GPU), weighed by lmlab.experiments.size_search; and `--size DEPTH`, a
depth of the family by hand. A fit predicts a size's val from its parameters and the tokens it trains, which its
recipe makes the same on any device: one fit serves a CPU and a GPU alike, only each size's speed is had where it
trains. The fit is the preset's own, or its recipe's (lmlab.experiments.calibration), carried over to its data."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lmlab.analysis.scaling import effective_tokens
from lmlab.core.config import RunConfig
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.core.machine import MEASURED, READ_BACK, Machine
from lmlab.data.shards import read_meta
from lmlab.experiments.bench import with_vocab
from lmlab.experiments.calibration import CALIBRATION_SHARE, Calibration, Prior, calibrate, prior
from lmlab.experiments.family import MAX_DEPTH, Family, SizeFit, fit_path, preset_sha256, refit_command
from lmlab.experiments.plan import Hardware, shape_of
from lmlab.experiments.size_search import Candidate, search
from lmlab.train.preflight import Sized, Sizer


@dataclass
class Sizing:
    """What `--size auto` chose and why: every depth it weighed, the one with the lowest predicted val, and the config
    that trains it."""

    budget: float
    spent: float  # seconds of the budget gone when it chose, its own timing included
    candidates: list[Candidate]
    chosen: Candidate
    config: RunConfig
    fit: str  # the fit file
    speed: str  # how each size's speed was had (`Search.says`)
    split_tokens: int  # the train split's: a pass over it
    fitted_on: str = ""  # the machine the fit's runs were measured on (`fitted_on`)
    beyond: str = ""  # where the chosen size's tokens lie outside the fit's runs (`SizeFit.beyond`)
    notes: tuple[str, ...] = ()  # what to know of the fit before trusting its predictions (`fit_notes`)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # the dataset's meta.json
    carried: str = ""  # how the fit came to this preset and data: its recipe's, measured here (`carried`)
    spread: float = 0.0  # how sure the prediction is (`Calibration.spread`)
    calibration: dict[str, Any] | None = None  # the data's floor and scale, as the `sizing` event keeps them

    def line(self) -> str:
        c, weighed = self.chosen, [c for c in self.candidates if c.timing]
        depths = {how: [str(w.depth) for w in weighed if w.timing and w.timing.how == how]
                  for how in (MEASURED, READ_BACK)}
        verb = "foretold" if self.speed.startswith("foretold") else "timed"
        hows = [f"{', '.join(d)} {verb if how == MEASURED else how}" for how, d in depths.items() if d]
        return (f"size auto: {c.shape} ({c.params / 1e6:.2f}M parameters, LR {self.config.train.learning_rate:g}), "
                f"the lowest predicted val of {len(weighed)} depth{'s' * (len(weighed) > 1)} ({'; '.join(hows)}): "
                f"{self.outlook()}")

    def outlook(self) -> str:
        """What the chosen size would do with the budget: its speed, its steps and tokens, the passes over the train
        split they make and what they are worth, its predicted val and the fit that predicts it."""
        c = self.chosen
        passes, worth = f"{c.passes:.2f}", f"{effective_tokens(c.tokens, self.split_tokens) / self.split_tokens:.2f}"
        return (f"{c.tokens_per_sec:,.0f} tokens/s {self.speed}, {c.steps:,} steps of {c.tokens:,} tokens in what is "
                f"left of {format_duration(self.budget)} ({c.tokens / c.params:.2f} per parameter; {passes} "
                f"passes over the {self.split_tokens:,}-token train split" +
                (f", worth {worth} of new text" if worth != passes else "") + "), " +
                (f"predicted val {c.predicted:.4f} ± {self.spread:.3f} (by {self.fit}, fitted on {self.fitted_on}"
                 + "".join(f"; {said}" for said in (self.carried, self.beyond) if said) + ")"
                 if c.predicted is not None else f"no val predicted (no fit beside the preset: {self.fit})"))

    def spending(self) -> str:
        """Where the budget goes, as planned."""
        c, made = self.chosen, self.chosen.plan
        assert made is not None, "a chosen size has its plan"
        steps, evals = c.steps * made.step_seconds, -(-c.steps // c.intervals[0])  # the last step's included
        rest = made.needed(c.steps, c.intervals) - steps - evals * made.eval_seconds
        return (f"the {format_duration(self.budget)}: {made.spent:.1f} s of start-up, timing and the trainer's "
                f"set-up, {steps:.1f} s for {c.steps:,} steps, {evals * made.eval_seconds:.1f} s for {evals} "
                f"evaluation{'s' * (evals > 1)} of {c.eval_iters} batch{'es' * (c.eval_iters > 1)} a split, "
                f"{rest:.1f} s for checkpoints, the final score and the end")

    def record(self) -> dict[str, Any]:
        """The `sizing` event: the choice, the chosen size's figures as a candidate's, and every candidate."""
        c = self.chosen
        return {"event": "sizing", "budget": self.budget, "spent": round(self.spent, 3), "fit": self.fit,
                "fitted_on": self.fitted_on or None, "speed": self.speed, **c.record(),
                "multiplied_params": c.multiplied, "tokens_per_param": round(c.tokens / c.params, 4),
                "extrapolated": bool(self.beyond), "spread": round(self.spread, 4), "carried": self.carried or None,
                "calibration": self.calibration, "learning_rate": self.config.train.learning_rate,
                "warmup_iters": self.config.train.warmup_iters,
                "candidates": [candidate.record() for candidate in self.candidates]}


SIZES = "auto, or a depth of the preset's family from 1 to 48 (4: 4 layers of the preset's width per layer)"
SHAPE_SETTINGS = ("model.n_layer", "model.n_embd", "model.n_head", "model.n_kv_head")  # what a size sets


def check_shape_kept(size: str | int, settings: Sequence[str]) -> None:
    """Refuse `--set` of the shape beside `--size`, which sets it from the preset's family: one or the other would be
    overridden without a word."""
    shaped = [item.partition("=")[0].strip() for item in settings
              if item.partition("=")[0].replace(" ", "") in SHAPE_SETTINGS]
    if shaped:
        raise UserError(f"--size {size} sets {', '.join(SHAPE_SETTINGS)} from the preset's family, so "
                        f"{shaped[0]} would be overridden; drop it to train a size of the family, or drop --size to "
                        "train the shape you set (a family's width per layer is its preset's: change it there).")


def parse_size(text: str | int) -> str | int:
    """`--size`'s value: "auto", or a depth (its layers) of the preset's family."""
    value = str(text).strip().lower()
    if value == "auto":
        return value
    if value.isdigit() and 1 <= int(value) <= MAX_DEPTH:
        return int(value)
    raise UserError(f"--size {str(text)[:40]!r} is not a size; use {SIZES}.")


def family_of(preset: Path, cfg: RunConfig) -> tuple[Family, Prior | None, dict[str, Any]]:
    """The preset's family, its dataset's vocabulary filled in, the fit it is sized by (`prior`: its own, else its
    recipe's; None where lmlab has none) and the dataset's meta.json, read once."""
    meta = read_meta(Path(cfg.data.dataset))
    cfg = with_vocab(cfg, meta)
    return Family.of(cfg, str(preset)), prior(preset, cfg), meta


def fit_notes(preset: Path, found: Prior) -> list[str]:
    """What to know of a fit before trusting its predictions: the preset edited since its own fit, or a fit of
    another recipe, and the refit that would measure the preset's own."""
    refit = f"`{refit_command(preset)}` measures one of its own in 10 minutes"
    if found.own and found.fit.preset_sha256 != preset_sha256(preset):
        return [f"{preset} changed since {found.path} was fitted: its predictions may not hold; {refit}"]
    if found.differs:
        more = len(found.differs) - 3
        shown = "; ".join(found.differs[:3]) + (f"; and {more} more" if more > 0 else "")
        return [f"{preset} has no fit of its own nor of its recipe: sized by the nearest, {found.path}, whose recipe "
                f"differs ({shown}), so its exponents and LR rule may not hold; {refit}"]
    return []


def carried(found: Prior, calibration: Calibration | None, dataset: str) -> str:
    """How the fit came to this preset and data, in a clause of the sizing's line ("" for the preset's own fit of its
    own data)."""
    n = len(found.differs)
    whose = "" if found.own else ("the fit of this recipe" if not n else
                                  f"the nearest recipe's fit ({n} setting{'s differ' if n > 1 else ' differs'})")
    measured = calibration.says(dataset) if calibration else ""
    return ", ".join(said for said in (whose, measured) if said)


def choose_size(preset: Path, cfg: RunConfig, started: float, machine: Machine, depths: list[int] | None = None,
                gpu: Hardware | None = None) -> Sizing:
    """The depth of the preset's family that trains to the lowest predicted val in cfg.train.budget_seconds counted from
    `started` (a time.perf_counter() reading); or `depths` alone, weighed (for `plan --budget` of a fixed shape). Each
    size's speed is had on `machine`, or foretold for the datasheet GPU `gpu` (`plan --gpu`); the fit is the preset's
    or its recipe's wherever it was measured, as the loss a recipe reaches by size and tokens is no device's, carried
    over to this data where it was fitted on another (its floor and scale measured here, in a preview where kept)."""
    budget = cfg.train.budget_seconds
    if not budget:
        raise UserError("--size auto chooses the size a time budget trains best; give one with --budget (e.g. "
                        "--budget 5m), or a size by its depth (--size 4).")
    family, found, meta = family_of(preset, cfg)
    if found is None and depths is None:
        raise UserError(f"--size auto predicts each size's val loss from a fit of the preset's recipe, and lmlab has "
                        f"none ({fit_path(preset)}, nor one beside the presets of {preset.parent}); make it with "
                        f"`{refit_command(preset)}`, or give a size by its depth (--size 4).")
    fit, calibration = found.fit if found else None, None
    if found and (found.differs or found.fit.dataset.get("train_sha256") != meta["train"]["sha256"]):
        calibration = calibrate(family, found.fit, machine, meta, CALIBRATION_SHARE * budget, measure=gpu is None)
        fit = calibration.applied(found.fit)
    found_sizes = search(family, fit, budget, started, machine, meta, depths, gpu,
                         calibration.seconds if calibration and calibration.how == MEASURED else 0.0)
    best = found_sizes.best()
    if best is None:  # the budget's refusal of the smallest depth weighed
        smallest = found_sizes.candidates[0]
        raise UserError(f"even the smallest size of {preset} ({smallest.shape}): {smallest.refused}"
                        if smallest.refused else
                        f"budget {budget:g} s: no size of {preset} could be weighed ({smallest.note}).")
    notes = fit_notes(preset, found) if found else []
    if calibration and not calibration.points:
        why = ("a preview on a datasheet GPU measures nothing" if gpu else
               f"{CALIBRATION_SHARE:.0%} of the budget holds too few steps for two runs of its smallest size")
        notes.append(f"{found.path if found else ''} was fitted on other data or another recipe, and its floor and "
                     f"scale on {cfg.data.dataset} were not measured ({why}): its predicted vals are in the fit's "
                     "units, its choice by the data's bytes per token")
    return Sizing(budget, time.perf_counter() - started + found_sizes.foretold, found_sizes.candidates, best,
                  best.config, str(found.path if found else fit_path(preset)), found_sizes.says(best.threads),
                  found_sizes.unique, fitted_on(fit) if fit else "",
                  fit.beyond(best.tokens) if fit and best.predicted is not None else "", tuple(notes), meta,
                  carried(found, calibration, cfg.data.dataset) if found else "",
                  (calibration or Calibration()).spread(found.fit) if found else 0.0,
                  calibration.record() if calibration else None)


def fitted_on(fit: SizeFit) -> str:
    """The machine a fit was measured on, as its line names it."""
    machine = fit.measured.get("machine") or {}
    return machine.get("gpu") or (f"{machine['cpu']} (a CPU)" if machine.get("cpu") else "a machine it does not name")


def sized_run(preset: Path, size: str | int, started: float, out: Console,
              interruptible: AbstractContextManager[Any] | None = None) -> Sizer:
    """The sizing of a run of `preset` (lmlab.train.preflight.train_job's `sizing`): the config of the size asked for,
    said in a line: a depth of the preset's family (its LR by the fit's rule where it has one), or the one `auto` chose
    on the job's machine in cfg.train.budget_seconds from `started`, with what it settled for the run. The timing runs
    inside `interruptible` (a stop signal ends it)."""

    def sized(cfg: RunConfig, machine: Machine) -> tuple[RunConfig, Sized | None]:
        if size != "auto":  # the LR by the rule of a fit of this recipe; another recipe's is no rule of this one
            family, found, _ = family_of(preset, cfg)
            found = found if found and not found.differs else None
            chosen = family.config(int(size), found.fit if found else None)
            rule = f"by {found.path}'s rule" if found else f"the preset's (no fit of its recipe, {fit_path(preset)})"
            out.print(f"size {size}: {family.describe(int(size))} ({shape_of(chosen).num_params() / 1e6:.2f}M "
                      f"parameters), LR {chosen.train.learning_rate:g} {rule}", highlight=False)
            return chosen, None
        with out.status("Timing sizes of the preset's family on this machine..."), interruptible or nullcontext():
            sizing = choose_size(preset, cfg, started, machine)
        for note in sizing.notes:
            out.print(f"note: {note}", style="yellow", highlight=False)
        out.print(sizing.line(), highlight=False)
        assert sizing.chosen.timing is not None, "a chosen size was timed"
        return sizing.config, Sized(sizing.record(), sizing.chosen.timing, sizing.meta)

    return sized
