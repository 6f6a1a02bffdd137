"""The sizes of a preset's family weighed for a time budget (`search`), for `--size auto` (lmlab.experiments.sizing):
each candidate's speed had from `Speed` (timed briefly here, or foretold for a datasheet GPU), its steps planned as a
budget plans them (lmlab.train.budget), and its val loss predicted by the fit kept beside the preset, L(N, D), at the
new tokens its passes over the train split are worth. A size this machine timed before is read back (no model built,
nothing timed: `recall_config`) and not timed again. Going up from the smallest depth, the next is timed only while
OPTIMISM times the speed its FLOPs foretell could beat the best: a small model is overhead-bound, so only timing tells
whether a smaller shape is faster. The best is timed twice with the sizes that could beat it (`Search.contest`),
within the timing's share of the budget. No size is timed that its memory or its FLOPs (at the most a step computes
there) already say the budget cannot hold (`Search.trainable`)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core.config import RunConfig
from lmlab.core.peak import STEP_CEILING, Peak, step_ceiling
from lmlab.data.shards import windows_in
from lmlab.experiments.family import EXTRAPOLATION, MAX_DEPTH, Family, SizeFit
from lmlab.experiments.gputime import gpu_step_time
from lmlab.experiments.plan import Hardware
from lmlab.model import LanguageModel, build_model
from lmlab.model.memory import MemoryRefused, check_training
from lmlab.train.budget import MIN_STEPS, BudgetRefused, Costs, Plan, plan
from lmlab.train.machine import MEASURED
from lmlab.train.optim import optimizer_of
from lmlab.train.timing import (
    MAX_STEPS,
    TIMED_SECONDS,
    Timing,
    checkpoint_bytes,
    recall_config,
    refuse_untimed,
    time_config,
    time_plot,
)

OPTIMISM = 2.0  # a depth is timed while this many times the speed its FLOPs foretell could beat the best so far
TIMING_SHARE = 0.1  # and while the timing of all of them would take at most this share of the budget (read back too)
SET_UP = 1.0  # seconds the trainer takes after the choice before its first step: the data checked, the model built




class Speed:
    """How fast each size trains: read back where this machine timed it before (`recall_config`), else timed on `device`
    now (`time_config`, its forward on each thread count of `counts`), or foretold for the datasheet GPU `gpu`
    (lmlab.experiments.plan.gpu_hardware) by the step model (lmlab.experiments.gputime, an eager step as a timing's), no
    step measured: a preview from another machine. `foretold` sums what the foretold timings would take on that GPU,
    which the run would spend and this process does not."""

    def __init__(self, device: torch.device, dtype: torch.dtype, counts: list[int], gpu: Hardware | None = None):
        self.device, self.dtype, self.counts, self.gpu = device, dtype, counts, gpu
        self.foretold = 0.0
        self.plot: float | None = None  # a redraw of loss.png: the host's work, which one timing here tells

    def ceiling(self) -> tuple[float, Peak]:
        """The most FLOP/s a step computes there (lmlab.core.peak.step_ceiling)."""
        return (STEP_CEILING * self.gpu.peak, self.gpu.peak_figure) if self.gpu else step_ceiling(self.device,
                                                                                                   self.dtype)

    def time(self, cfg: RunConfig, model: LanguageModel, deadline: float, again: Timing | None = None) -> Timing:
        """`cfg`'s timing (`model`: its model on the meta device), a step that shows the budget ending by `deadline`
        (a time.perf_counter() reading) cutting it short; timed `again` beside its timing before, the faster of the
        two is the one this machine keeps."""
        if self.gpu is None:
            kept = recall_config(cfg, model, self.device, self.dtype, self.counts) if again is None else None
            if kept is not None:
                return kept
            return time_config(cfg, self.device, self.dtype, self.counts, deadline, again)
        step = gpu_step_time(cfg, self.gpu.name, self.gpu.dtype, compiled=False)
        self.plot = time_plot() if self.plot is None else self.plot
        batch = step.evaluation / max(1, cfg.train.eval_iters)  # one batch of each split
        # what `time_step` would spend there: a plot, a warm-up step, an evaluation's batch, the timed steps
        cost = self.plot + step.seconds + batch + max(step.seconds, min(TIMED_SECONDS, MAX_STEPS * step.seconds))
        self.foretold += cost
        return Timing({}, 0, step.seconds, batch, self.plot, checkpoint_bytes(model.num_params(), cfg.train),
                      cost)  # 0: no threads

    def says(self, threads: int) -> str:
        """How the speed was had, for the sizing's line."""
        if self.gpu:
            return f"foretold for {self.gpu.name} by its datasheet: an eager {self.gpu.dtype} step, nothing timed"
        if self.device.type == "cuda":
            return f"measured on {torch.cuda.get_device_name(self.device)}"
        return f"measured on {threads} thread{'s' * (threads > 1)}"


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
    config: RunConfig  # the family's at this depth (`Family.config`), made once
    model: LanguageModel  # its model on the meta device, no memory: its sizes, and the path its attention would take
    intervals: tuple[int, int]  # the steps between its evaluations, its checkpoints
    timing: Timing | None = None
    timings: int = 0  # how often it was timed: twice where it contended with the best (`Search.contest`)
    steps: int = 0
    eval_iters: int = 0
    passes: float = 0.0  # over the train split: past one, its tokens repeat, and the fit counts what they are worth
    predicted: float | None = None
    note: str = ""  # why it was not timed or not predicted
    plan: Plan | None = None  # as a budget would plan it
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
                "timings": self.timings, "how": self.timing.how if self.timing else None, "steps": self.steps,
                "tokens": self.tokens, "passes": round(self.passes, 2),
                "predicted_val": None if self.predicted is None else round(self.predicted, 4), "note": self.note}


class Search:
    """The depths weighed for a budget, from the smallest up (`weigh`), each planned from the seconds left now."""

    def __init__(self, family: Family, fit: SizeFit | None, budget: float, started: float, speed: Speed,
                 meta: dict[str, Any]):
        self.family, self.fit, self.budget, self.started = family, fit, budget, started
        self.speed, self.meta = speed, meta  # the dataset's meta.json
        self.unique: int = meta["train"]["tokens"]  # what a pass over the train split sees: past one, repeats
        self.ceiling: tuple[float, Peak] = speed.ceiling()
        self.candidates: list[Candidate] = []
        self.timed = 0.0

    def spent(self) -> float:
        """Seconds of the budget gone: this process's, the trainer's set-up, and the timings foretold (`Speed`)."""
        return time.perf_counter() - self.started + SET_UP + self.speed.foretold

    def candidate(self, depth: int) -> Candidate:
        cfg = self.family.config(depth, self.fit)
        with torch.device("meta"):
            model = build_model(cfg.model)
        train = cfg.train
        tokens = train.batch_size * train.grad_accum_steps * cfg.model.block_size
        intervals = (train.eval_steps(self.meta["train"]["tokens"], tokens), train.checkpoint_interval)
        return Candidate(depth, self.family.describe(depth), self.family.width(depth), model.num_params(),
                         model.multiplied_params(), model.flops_per_token(), tokens, cfg, model, intervals)

    def plan(self, c: Candidate) -> None:
        """Its steps and evaluations in the seconds left, as the budget would plan them now, and its predicted val; or
        the budget's refusal."""
        assert c.timing is not None, "a candidate is planned once timed"
        c.plan, c.predicted, c.refused = self.planned(c, c.timing.costs())
        c.steps, c.eval_iters = (c.plan.max_iters, c.plan.eval_iters) if c.plan else (0, 0)
        c.passes = c.tokens / self.unique

    def planned(self, c: Candidate, costs: Costs) -> tuple[Plan | None, float | None, str]:
        """The budget's plan of `c` at these costs (None, with the refusal, where its minimum does not fit) and its
        predicted val."""
        try:
            made = plan(self.budget, self.spent(), costs, c.config.train, c.intervals,
                        windows_in(self.meta, "val", c.config.model.block_size))
        except BudgetRefused as refused:
            return None, None, str(refused)
        predicted = self.fit.predict(c.multiplied, made.max_iters * c.tokens_per_step, self.unique) if self.fit \
            else None
        return made, predicted, ""

    def trainable(self, c: Candidate) -> bool:
        """Whether `c` could train MIN_STEPS steps after its timing, its steps no faster than their FLOPs at the most a
        step computes here (`refuse_untimed`); else it is not timed, and `refused` names the budget it needs."""
        try:
            refuse_untimed(c.config, self.meta, self.spent(), c.flops_per_token, c.params, self.ceiling)
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
        cfg = c.config
        try:
            check_training(cfg.model, cfg.train.batch_size, optimizer_of(cfg.train).state_bytes, self.speed.device)
            if not self.trainable(c):
                return False
            self.time(c)
        except (MemoryRefused, torch.OutOfMemoryError) as refused:  # a GPU's allocator is the check there
            c.note = f"does not fit the memory of {self.speed.device.type}"
            c.refused = str(refused) if isinstance(refused, MemoryRefused) else ""
            return False
        self.plan(c)
        c.note = c.note if c.steps else "no step fits what is left of the budget"
        return bool(c.steps)

    def time(self, c: Candidate) -> None:
        """Time `c` (again): a slowdown its timing caught (a neighbour's burst of work) only ever slows a step, so of
        two timings it keeps the faster."""
        timing = self.speed.time(c.config, c.model, self.started + self.budget - SET_UP, c.timing)
        self.timed += timing.cost
        c.timing = timing if c.timing is None or timing.step < c.timing.step else c.timing
        c.timings += 1

    def contest(self) -> None:
        """Time the best size once more with the size likeliest to beat it, and then each other that could, while the
        timing's share of the budget allows (the first two together or not at all). A burst of load elsewhere slows a
        timing, by any factor (never speeds it), so a size is judged by its own timing or, where faster, by the pace a
        FLOP of the fastest timing: neither the choice between the two best nor a size's place behind them is left to
        one timing of each. A size read back is not timed again: its timing is the one this machine kept, the faster
        of its timings there."""
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
        for sizes in (sorted([best, others[0]], key=lambda c: c.depth), *([c] for c in rivals)):
            group = [c for c in sizes if c.timing and c.timing.how == MEASURED]
            if self.timed + sum(c.timing.cost for c in group if c.timing) > TIMING_SHARE * self.budget:
                return
            for c in group:
                self.time(c)


def search(family: Family, fit: SizeFit | None, budget: float, started: float, speed: Speed,
           meta: dict[str, Any], depths: list[int] | None = None) -> Search:
    """Weigh the family's depths for `budget` seconds counted from `started` (a time.perf_counter() reading): all of
    `depths` where given, else from the smallest up while a larger one could win."""
    found = Search(family, fit, budget, started, speed, meta)
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


