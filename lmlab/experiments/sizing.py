"""`--size auto`: the depth of a preset's family that a time budget trains to the lowest val loss on this machine, as it
runs now. Each candidate is timed briefly, its steps planned as a budget plans them (lmlab.train.budget), and its val
loss predicted by the fit kept beside the preset, L(N, D). Going up from the smallest depth, the next is timed only
while OPTIMISM times the speed its FLOPs foretell could beat the best: a small model is overhead-bound, so only timing
tells whether a smaller shape is faster. The best is timed twice with the sizes that could beat it (`Search.contest`),
within the timing's share of the budget. No size is timed that its memory or its FLOPs (at the most a step computes
here) already say the budget cannot hold (`Search.trainable`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.core.busy import LoadMeter
from lmlab.core.config import RunConfig
from lmlab.core.device import resolve_device
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.core.peak import Peak, choose_dtype, step_ceiling
from lmlab.core.threads import ThreadChooser
from lmlab.data.shards import read_meta, windows_in
from lmlab.experiments.family import EXTRAPOLATION, MAX_DEPTH, Family, SizeFit, fit_path, preset_sha256, read_fit
from lmlab.model import build_model
from lmlab.model.memory import MemoryRefused, check_training
from lmlab.train.budget import MIN_STEPS, BudgetRefused, Costs, Plan, plan
from lmlab.train.optim import optimizer_of
from lmlab.train.timing import MAX_STEPS, TIMED_SECONDS, Timing, checkpoint_bytes, refuse_untimed, time_config

OPTIMISM = 2.0  # a depth is timed while this many times the speed its FLOPs foretell could beat the best so far
TIMING_SHARE = 0.1  # and while the timing of all of them would take at most this share of the budget
SET_UP = 1.0  # seconds the trainer takes after the choice before its first step: the data checked, the model built


@dataclass
class Candidate:
    """A depth of the family as the sizing weighed it: timed, its steps and tokens in the budget, its predicted val; or
    why it was not."""

    depth: int
    shape: str
    width: int
    params: int
    multiplied: int  # the weights that multiply every token: the fit's N
    flops_per_token: float
    tokens_per_step: int
    timing: Timing | None = None
    timings: int = 0  # how often it was timed: twice where it contended with the best (`Search.contest`)
    steps: int = 0
    eval_iters: int = 0
    predicted: float | None = None
    note: str = ""  # why it was not timed or not predicted
    plan: Plan | None = None  # as a budget would plan it, and the steps between its evaluations, checkpoints
    intervals: tuple[int, int] = (1, 1)
    refused: str = ""  # why it cannot train: the budget's refusal (no plan holds its minimum), or the memory's

    @property
    def step_seconds(self) -> float:
        return self.timing.step if self.timing else 0.0

    @property
    def threads(self) -> int:
        return self.timing.threads if self.timing else 0

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.step_seconds if self.step_seconds else 0.0

    def record(self) -> dict[str, Any]:
        return {"depth": self.depth, "shape": self.shape, "width": self.width, "params": self.params,
                "tokens_per_sec": round(self.tokens_per_sec, 1) or None, "threads": self.threads or None,
                "timings": self.timings, "steps": self.steps, "tokens": self.tokens,
                "predicted_val": None if self.predicted is None else round(self.predicted, 4), "note": self.note}


@dataclass
class Sizing:
    """What `--size auto` chose and why: every depth it weighed, the one with the lowest predicted val, and the config
    that trains it."""

    budget: float
    spent: float  # seconds of the budget gone when it chose, its own timing included
    candidates: list[Candidate]
    chosen: Candidate
    config: RunConfig
    fit: str
    beyond: str = ""  # where the chosen size's tokens lie outside the fit's runs (`SizeFit.beyond`)
    notes: tuple[str, ...] = ()  # what to know of the fit before trusting its predictions (`fit_notes`)

    def line(self) -> str:
        c, timed = self.chosen, [c for c in self.candidates if c.timing]
        again = [str(t.depth) for t in timed if t.timings > 1]
        why = "the best two" if len(again) == 2 else "the best and those a faster timing could make better"
        return (f"size auto: {c.shape} ({c.params / 1e6:.2f}M parameters, LR {self.config.train.learning_rate:g}), "
                f"the lowest predicted val of {len(timed)} depth{'s' * (len(timed) > 1)} timed "
                f"({', '.join(str(t.depth) for t in timed)} layers" +
                (f"; {', '.join(again[:-1])} and {again[-1]} twice, {why}" if len(again) > 1 else "") +
                f"): {self.outlook()}")

    def outlook(self) -> str:
        """What the chosen size would do with the budget: its speed, its steps and tokens, its predicted val."""
        c = self.chosen
        return (f"{c.tokens_per_sec:,.0f} tokens/s measured on {c.threads} thread{'s' * (c.threads > 1)}, "
                f"{c.steps:,} steps of {c.tokens:,} tokens in what is left of {format_duration(self.budget)} "
                f"({c.tokens / c.params:.2f} per parameter), " +
                (f"predicted val {c.predicted:.4f} ({self.fit}{'; ' * bool(self.beyond)}{self.beyond})"
                 if c.predicted is not None else
                 f"no val predicted (no fit beside the preset: {self.fit})"))

    def spending(self) -> str:
        """Where the budget goes, as planned."""
        c, made = self.chosen, self.chosen.plan
        assert made is not None, "a chosen size has its plan"
        steps, every = c.steps * made.step_seconds, c.intervals[0]
        evals = c.steps // every + (c.steps % every != 0)
        rest = made.needed(c.steps, c.intervals) - steps - evals * made.eval_seconds
        return (f"the {format_duration(self.budget)}: {made.spent:.1f} s of start-up, timing and the trainer's "
                f"set-up, {steps:.1f} s for {c.steps:,} steps, {evals * made.eval_seconds:.1f} s for {evals} "
                f"evaluation{'s' * (evals > 1)} of {c.eval_iters} batch{'es' * (c.eval_iters > 1)} a split, "
                f"{rest:.1f} s for checkpoints, the final score and the end")

    def record(self) -> dict[str, Any]:
        return {"event": "sizing", "budget": self.budget, "spent": round(self.spent, 3), "fit": self.fit,
                "depth": self.chosen.depth, "shape": self.chosen.shape, "params": self.chosen.params,
                "multiplied_params": self.chosen.multiplied,
                "tokens_per_sec": round(self.chosen.tokens_per_sec, 1), "threads": self.chosen.threads,
                "steps": self.chosen.steps, "tokens": self.chosen.tokens,
                "tokens_per_param": round(self.chosen.tokens / self.chosen.params, 4),
                "predicted_val": None if self.chosen.predicted is None else round(self.chosen.predicted, 4),
                "extrapolated": bool(self.beyond), "learning_rate": self.config.train.learning_rate,
                "warmup_iters": self.config.train.warmup_iters,
                "candidates": [c.record() for c in self.candidates]}


class Search:
    """The depths weighed for a budget, from the smallest up (`weigh`), each planned from the seconds left now."""

    def __init__(self, family: Family, fit: SizeFit | None, budget: float, started: float, device: torch.device,
                 dtype: torch.dtype, counts: list[int], meta: dict[str, Any]):
        self.family, self.fit, self.budget, self.started = family, fit, budget, started
        self.device, self.dtype, self.counts, self.meta = device, dtype, counts, meta  # the dataset's meta.json
        self.ceiling: tuple[float, Peak] = step_ceiling(device, dtype)  # the most FLOP/s a step computes here
        self.candidates: list[Candidate] = []
        self.timed = 0.0

    def spent(self) -> float:
        return time.perf_counter() - self.started + SET_UP

    def candidate(self, depth: int) -> Candidate:
        cfg = self.family.config(depth, self.fit)
        with torch.device("meta"):
            model = build_model(cfg.model)
        tokens = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.model.block_size
        return Candidate(depth, self.family.describe(depth), self.family.width(depth), model.num_params(),
                         model.multiplied_params(), model.flops_per_token(), tokens)

    def plan(self, c: Candidate) -> None:
        """Its steps and evaluations in the seconds left, as the budget would plan them now, and its predicted val; or
        the budget's refusal."""
        assert c.timing is not None, "a candidate is planned once timed"
        c.plan, c.predicted, c.intervals, c.refused = self.planned(c, c.timing.costs())
        c.steps, c.eval_iters = (c.plan.max_iters, c.plan.eval_iters) if c.plan else (0, 0)

    def planned(self, c: Candidate, costs: Costs) -> tuple[Plan | None, float | None, tuple[int, int], str]:
        """The budget's plan of `c` at these costs (None, with the refusal, where its minimum does not fit), its
        predicted val and the steps between its evaluations and checkpoints."""
        cfg = self.family.config(c.depth, self.fit)
        train = cfg.train
        intervals = (train.eval_steps(self.meta["train"]["tokens"], c.tokens_per_step), train.checkpoint_interval)
        try:
            made = plan(self.budget, self.spent(), costs, train, intervals,
                        windows_in(self.meta, "val", cfg.model.block_size))
        except BudgetRefused as refused:
            return None, None, intervals, str(refused)
        predicted = self.fit.predict(c.multiplied, made.max_iters * c.tokens_per_step) if self.fit else None
        return made, predicted, intervals, ""

    def trainable(self, c: Candidate) -> bool:
        """Whether `c` could train MIN_STEPS steps after its timing, its steps no faster than their FLOPs at the most a
        step computes here (`refuse_untimed`); else it is not timed, and `refused` names the budget it needs."""
        try:
            refuse_untimed(self.family.config(c.depth, self.fit), self.meta, self.spent(), c.flops_per_token, c.params,
                           self.ceiling)
        except BudgetRefused as refused:
            c.note = f"not timed: at least {refused.least.step_seconds:.3g} s a step, {MIN_STEPS} do not fit the budget"
            c.refused = str(refused)
            return False
        return True

    def fastest(self) -> Candidate:
        """The timed size whose steps took the least time a FLOP: a larger size's, as a wider step uses the cores
        better, unless a burst of load slowed its timing (load only ever slows a step): the pace guesses start from."""
        return min((c for c in self.candidates if c.timing),
                   key=lambda c: c.step_seconds / (c.flops_per_token * c.tokens_per_step))

    def guessed(self, c: Candidate, optimism: float = OPTIMISM) -> Costs:
        """Costs of `c` at `optimism` times the pace its FLOPs foretell from the fastest timing."""
        near = self.fastest()
        assert near.timing is not None, "a timed candidate"
        ratio = c.flops_per_token * c.tokens_per_step / (near.flops_per_token * near.tokens_per_step)
        return dataclasses.replace(near.timing, step=near.timing.step * ratio / optimism,
                                   eval_batch=near.timing.eval_batch * ratio / optimism,
                                   checkpoint_bytes=checkpoint_bytes(c.params, self.family.preset.train)).costs()

    def worth_timing(self, c: Candidate, best: Candidate | None) -> bool:
        """Whether to time `c`: not beyond the fit, nor when its timing would take too long or it cannot win even at
        OPTIMISM times its FLOPs' pace; else `note` says why, and the search stops."""
        assert self.fit is not None, "only a fit's search stops"
        if self.fit.predict(c.multiplied, 1) is None:
            c.note = (f"beyond the fit's sizes (at most {self.fit.largest * EXTRAPOLATION / 1e6:.2f}M parameters that "
                      "multiply)")
            return False
        if best is None:  # nothing timed yet
            return True
        guess = self.guessed(c, 1.0).step
        steps = 1 + max(1, min(MAX_STEPS, math.ceil(TIMED_SECONDS / guess)))  # a warm-up step and the timed ones
        if self.timed + steps * guess > TIMING_SHARE * self.budget:
            c.note = (f"not timed: about {guess:.2f} s a step, too long to time in this budget (the timing of "
                      f"sizes may take {TIMING_SHARE:.0%} of it)")
            return False
        hopeful = self.planned(c, self.guessed(c))[1]
        if hopeful is None or hopeful >= (best.predicted or 0.0):
            c.note = (f"not timed: even at {OPTIMISM:g}x the speed its FLOPs foretell it would lose" +
                      ("" if hopeful is None else f" ({hopeful:.4f})"))
            return False
        return True

    def weigh(self, c: Candidate) -> bool:
        """Time and plan `c` where its memory and FLOPs say it could train in the budget; whether the search goes on
        (it stops at a size that does not fit memory or the budget)."""
        cfg = self.family.config(c.depth, self.fit)
        try:
            check_training(cfg.model, cfg.train.batch_size, optimizer_of(cfg.train).state_bytes, self.device)
            if not self.trainable(c):
                return False
            self.time(c)
        except (MemoryRefused, torch.OutOfMemoryError) as refused:  # a GPU's allocator is the check there
            c.note = f"does not fit the memory of {self.device.type}"
            c.refused = str(refused) if isinstance(refused, MemoryRefused) else ""
            return False
        self.plan(c)
        c.note = c.note if c.steps else "no step fits what is left of the budget"
        return bool(c.steps)

    def time(self, c: Candidate) -> None:
        """Time `c` (again): a slowdown its timing caught (a neighbour's burst of work) only ever slows a step, so of
        two timings it keeps the faster."""
        cfg = self.family.config(c.depth, self.fit)
        timing = time_config(cfg, self.device, self.dtype, self.counts, deadline=self.started + self.budget - SET_UP)
        self.timed += timing.cost
        c.timing = timing if c.timing is None or timing.step < c.timing.step else c.timing
        c.timings += 1

    def contest(self) -> None:
        """Time the best size once more with the size likeliest to beat it, and then each other that could, while the
        timing's share of the budget allows (the first two together or not at all). A burst of load elsewhere slows a
        timing, by any factor (never speeds it), so a size is judged by its own timing or, where faster, by the pace a
        FLOP of the fastest timing: neither the choice between the two best nor a size's place behind them is left to
        one timing of each."""
        ranked = sorted((c for c in self.candidates if c.timing and c.predicted is not None),
                        key=lambda c: c.predicted or 0.0)
        if len(ranked) < 2:
            return
        best = ranked[0]

        hopes = {}
        for c in ranked[1:]:
            fair = self.planned(c, self.guessed(c, 1.0))[1]
            hopes[c.depth] = min(c.predicted or math.inf, math.inf if fair is None else fair)
        others = sorted(ranked[1:], key=lambda c: hopes[c.depth])
        rivals = [c for c in others[1:] if hopes[c.depth] < (best.predicted or 0.0)]
        for group in (sorted([best, others[0]], key=lambda c: c.depth), *([c] for c in rivals)):
            if self.timed + sum(c.timing.cost for c in group if c.timing) > TIMING_SHARE * self.budget:
                return
            for c in group:
                self.time(c)


def search(family: Family, fit: SizeFit | None, budget: float, started: float, device: torch.device, dtype: torch.dtype,
           chooser: ThreadChooser, meta: dict[str, Any], depths: list[int] | None = None) -> Search:
    """Weigh the family's depths for `budget` seconds counted from `started` (a time.perf_counter() reading): all of
    `depths` where given, else from the smallest up while a larger one could win."""
    found = Search(family, fit, budget, started, device, dtype, chooser.counts(device), meta)
    best = None
    for depth in depths or range(1, MAX_DEPTH + 1):
        c = found.candidate(depth)
        found.candidates.append(c)
        if not depths and not found.worth_timing(c, best):
            break
        if not found.weigh(c) and not depths:
            break
        if c.predicted is not None and (best is None or c.predicted < (best.predicted or math.inf)):
            best = c
    found.contest()
    for c in found.candidates:  # every timed one planned from the time its own timing left, the others' included
        if c.timing:
            found.plan(c)
    return found


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


def with_vocab(cfg: RunConfig, meta: dict[str, Any] | None = None) -> RunConfig:
    vocab = cfg.model.vocab_size or (meta or read_meta(Path(cfg.data.dataset)))["vocab_size"]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def family_of(preset: Path, cfg: RunConfig) -> tuple[Family, SizeFit | None, dict[str, Any]]:
    """The preset's family, its dataset's vocabulary filled in, its fit (None without one; one fitted on a dataset of
    another tokenizer is refused), and the dataset's meta.json, read once."""
    meta = read_meta(Path(cfg.data.dataset))
    cfg = with_vocab(cfg, meta)
    fit = read_fit(preset)
    if fit and fit.dataset.get("tokenizer") != meta["tokenizer"]:
        raise UserError(f"{fit_path(preset)} was fitted on a {fit.dataset.get('tokenizer')} dataset and "
                        f"{cfg.data.dataset} is {meta['tokenizer']}: its losses are in other units; fit the preset on "
                        f"this dataset with `lmlab scaling {preset} --refit`.")
    return Family.of(cfg, str(preset)), fit, meta


def fit_notes(preset: Path, fit: SizeFit, dataset: str, meta: dict[str, Any]) -> list[str]:
    """What to know of a fit before trusting its predictions: the preset edited since, another text (`meta`: the
    dataset's meta.json)."""
    notes = []
    if fit.preset_sha256 != preset_sha256(preset):
        notes.append(f"{preset} changed since {fit_path(preset)} was fitted: its predictions may not hold; fit it "
                     f"again with `lmlab scaling {preset} --refit`")
    train, fitted = meta["train"]["sha256"], fit.dataset.get("path")
    if fit.dataset.get("train_sha256") == train:
        return notes
    if fitted and os.path.realpath(fitted) == os.path.realpath(dataset):
        notes.append(f"the train split of {dataset} changed since {fit_path(preset)} was fitted on it (its checksum "
                     "differs): its predictions hold as far as the texts are alike; refit with "
                     f"`lmlab scaling {preset} --refit`, or restore the data the fit was made on")
    else:
        notes.append(f"{fit_path(preset)} was fitted on {fitted or 'another dataset'}, not {dataset}: its predictions "
                     "hold as far as the texts are alike")
    return notes


def choose_size(preset: Path, cfg: RunConfig, started: float, device_name: str, chooser: ThreadChooser,
                depths: list[int] | None = None) -> Sizing:
    """The depth of the preset's family that trains to the lowest predicted val in cfg.train.budget_seconds counted from
    `started` (a time.perf_counter() reading); or `depths` alone, weighed (for `plan --budget` of a fixed shape)."""
    budget = cfg.train.budget_seconds
    if not budget:
        raise UserError("--size auto chooses the size a time budget trains best; give one with --budget (e.g. "
                        "--budget 5m), or a size by its depth (--size 4).")
    family, fit, meta = family_of(preset, cfg)
    if fit is None and depths is None:
        raise UserError(f"--size auto predicts each size's val loss from the fit kept beside the preset, and "
                        f"{preset} has none ({fit_path(preset)}); make it with `lmlab scaling {preset} --refit` (a "
                        "miniseries of short runs), or give a size by its depth (--size 4).")
    device = resolve_device(device_name)
    fitted_on = fit and (fit.measured.get("machine") or {}).get("gpu")
    if fit and device.type == "cuda" and fitted_on != torch.cuda.get_device_name(device):
        raise UserError(f"--size auto on {torch.cuda.get_device_name(device)} needs a fit measured on it: "
                        f"{fit_path(preset)} was measured on {fitted_on or 'a CPU'}, whose speed by size is not this "
                        f"GPU's; make one here with `lmlab scaling {preset} --refit`, or give a size (--size 4).")
    dtype, _ = choose_dtype(device, cfg.train.dtype)
    found = search(family, fit, budget, started, device, dtype, chooser, meta, depths)
    planned = [c for c in found.candidates if c.steps]
    if not planned:
        raise UserError(_refusal(found, preset))
    best = min(planned, key=lambda c: (c.predicted is None, c.predicted or 0.0))
    chosen = family.config(best.depth, fit)
    assert best.timing is not None, "a planned size was timed"
    chooser.decide(best.timing.forward, "a forward pass")  # the threads the run goes on with
    return Sizing(budget, time.perf_counter() - started, found.candidates, best, chosen, str(fit_path(preset)),
                  fit.beyond(best.tokens) if fit and best.predicted is not None else "",
                  tuple(fit_notes(preset, fit, cfg.data.dataset, meta)) if fit else ())


def _refusal(found: Search, preset: Path) -> str:
    """Why no size can train: the budget's refusal of the smallest depth weighed."""
    smallest = found.candidates[0]
    if not smallest.refused:
        return f"budget {found.budget:g} s: no size of {preset} could be weighed ({smallest.note})."
    return f"even the smallest size of {preset} ({smallest.shape}): {smallest.refused}"


def sized_config(preset: Path, cfg: RunConfig, depth: int) -> tuple[RunConfig, str]:
    """Depth `depth` of the preset's family, its LR by the fit's rule where it has one; and the line that says so."""
    family, fit, _ = family_of(preset, cfg)
    chosen = family.config(depth, fit)
    rule = f"by {fit_path(preset)}'s rule" if fit else f"the preset's (no fit beside it, {fit_path(preset)})"
    with torch.device("meta"):
        params = build_model(chosen.model).num_params()
    return chosen, (f"size {depth}: {family.describe(depth)} ({params / 1e6:.2f}M parameters), LR "
                    f"{chosen.train.learning_rate:g} {rule}")


def sized_run(preset: Path, cfg: RunConfig, size: str | int, started: float, device: str, out: Console,
              window: LoadMeter | None = None, interruptible: AbstractContextManager[Any] | None = None
              ) -> tuple[RunConfig, Sizing | None, ThreadChooser | None]:
    """The config of the size asked for, said in a line: a depth of the preset's family, or the one `auto` chose in
    cfg.train.budget_seconds from `started` (with its `Sizing` and the thread chooser the run goes on with; `window`:
    the load meter running while PyTorch loaded). The timing runs inside `interruptible` (a stop signal ends it)."""
    if size != "auto":
        cfg, line = sized_config(preset, cfg, int(size))
        out.print(line, highlight=False)
        return cfg, None, None
    chooser = ThreadChooser(cfg.train.threads, "train.threads", window=window)
    try:
        with out.status("Timing sizes of the preset's family on this machine..."), interruptible or nullcontext():
            sizing = choose_size(preset, cfg, started, device, chooser)
    except BaseException:
        torch.set_num_threads(chooser.before)  # as they were: a notebook goes on in this process
        raise
    for note in sizing.notes:
        out.print(f"note: {note}", style="yellow", highlight=False)
    out.print(sizing.line(), highlight=False)
    return sizing.config, sizing, chooser
