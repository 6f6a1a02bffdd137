"""The sizes of a preset's family weighed for a time budget (`search`), for `--size auto` (lmlab.experiments.sizing):
each depth the fit predicts (its sizes, and up to EXTRAPOLATION times its largest) whose memory and FLOPs let the
budget hold it (`Search.trainable`), its steps planned as a budget plans them (lmlab.train.budget) and its val loss
predicted by the fit kept beside the preset, L(N, D), at the new tokens its passes over the train split are worth.

Each size's speed by one rule, not a search: the smallest and the largest of those depths are timed (`Search.time`: read
back where this machine timed them before), each between is priced on the line through their steps' times against
their FLOPs (a step is a fixed cost, the host's, and its FLOPs at a rate), and the depth of the lowest predicted val
is chosen; where it lies between them it is timed too (and where its own timing makes another better, that one), so
the plan and prediction of the size chosen are its own timing's, as its run's will be. On a datasheet GPU (`plan
--gpu`) every size is foretold by the step model, nothing timed."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core.config import RunConfig
from lmlab.core.machine import Machine
from lmlab.core.peak import STEP_CEILING, Peak, step_ceiling
from lmlab.data.shards import windows_in
from lmlab.experiments.family import EXTRAPOLATION, MAX_DEPTH, Family, SizeFit
from lmlab.experiments.gputime import gpu_step_time
from lmlab.experiments.plan import Hardware, shape_of
from lmlab.model import LanguageModel
from lmlab.model.memory import MemoryRefused, check_training
from lmlab.train.budget import MIN_STEPS, BudgetRefused, Plan, plan
from lmlab.train.optim import optimizer_of
from lmlab.train.timing import (
    Timing,
    checkpoint_bytes,
    recall_config,
    refuse_untimed,
    time_config,
    time_plot,
    timing_seconds,
)

SET_UP = 1.0  # seconds the trainer takes after the choice before its first step: the data checked, the model built
TIMING_SHARE = 0.1  # of the budget, the timing of the sizes may take at most (read back too: what it took then)
PRICED = "priced"  # a size's `how` where its speed is the line through the timed sizes'


@dataclass
class Candidate:
    """A depth of the family as the sizing weighed it: timed or priced, its steps and tokens in the budget, its
    predicted val; or why it was not."""

    depth: int
    shape: str
    params: int
    multiplied: int  # the weights that multiply every token: the fit's N
    config: RunConfig  # the family's at this depth (`Family.config`), made once
    model: LanguageModel  # its model on the meta device, no memory: its sizes, and the path its attention would take
    intervals: tuple[int, int]  # the steps between its evaluations, its checkpoints
    timing: Timing | None = None
    steps: int = 0
    eval_iters: int = 0
    passes: float = 0.0  # over the train split: past one, its tokens repeat, and the fit counts what they are worth
    predicted: float | None = None
    note: str = ""  # why it was not weighed or not predicted
    plan: Plan | None = None  # as a budget would plan it
    refused: str = ""  # why it cannot train: the budget's refusal (no plan holds its minimum), or the memory's

    @property
    def step_seconds(self) -> float:
        return self.timing.step if self.timing else 0.0

    @property
    def step_flops(self) -> float:
        return self.model.flops_per_token() * self.config.tokens_per_step

    @property
    def threads(self) -> int:
        return self.timing.threads if self.timing else 0

    @property
    def tokens(self) -> int:
        return self.steps * self.config.tokens_per_step

    @property
    def tokens_per_sec(self) -> float:
        return self.config.tokens_per_step / self.step_seconds if self.step_seconds else 0.0

    def record(self) -> dict[str, Any]:
        return {"depth": self.depth, "shape": self.shape, "width": self.config.model.n_embd, "params": self.params,
                "tokens_per_sec": round(self.tokens_per_sec, 1) or None, "threads": self.threads or None,
                "how": self.timing.how if self.timing else None, "steps": self.steps, "tokens": self.tokens,
                "passes": round(self.passes, 2),
                "predicted_val": None if self.predicted is None else round(self.predicted, 4), "note": self.note}


class Search:
    """The depths weighed for a budget, each planned from the seconds left now. A size's speed is read back where
    `machine` timed it before (`recall_config`), else timed on it now (`time_config`), or foretold for the datasheet
    GPU `gpu` (lmlab.experiments.plan.gpu_hardware) by the step model (lmlab.experiments.gputime, an eager step as a
    timing's), no step measured: a preview from another machine. `foretold` sums what the foretold timings would take
    on that GPU, which the run would spend and this process does not."""

    def __init__(self, family: Family, fit: SizeFit | None, budget: float, started: float, machine: Machine,
                 meta: dict[str, Any], gpu: Hardware | None = None):
        self.family, self.fit, self.budget, self.started = family, fit, budget, started
        self.machine, self.gpu, self.meta = machine, gpu, meta  # meta: the dataset's meta.json
        self.foretold = 0.0
        self.unique: int = meta["train"]["tokens"]  # what a pass over the train split sees: past one, repeats
        # the most FLOP/s a step computes there (lmlab.core.peak.step_ceiling)
        self.ceiling: tuple[float, Peak] = (STEP_CEILING * gpu.peak.flops, gpu.peak) if gpu else \
            step_ceiling(machine.device, machine.dtype)
        self.candidates: list[Candidate] = []

    def spent(self) -> float:
        """Seconds of the budget gone: this process's, the trainer's set-up, and the timings foretold."""
        return time.perf_counter() - self.started + SET_UP + self.foretold

    def says(self, threads: int) -> str:
        """How the speed was had, for the sizing's line."""
        if gpu := self.gpu:
            return f"foretold for {gpu.name} by its datasheet: an eager {gpu.peak.dtype} step, nothing timed"
        if self.machine.device.type == "cuda":
            return f"measured on {torch.cuda.get_device_name(self.machine.device)}"
        return f"measured on {threads} thread{'s' * (threads > 1)}"

    def candidate(self, depth: int) -> Candidate:
        cfg = self.family.config(depth, self.fit)
        model = shape_of(cfg)
        return Candidate(depth, self.family.describe(depth), model.num_params(), model.multiplied_params(), cfg,
                         model, cfg.intervals(self.unique))

    def weighable(self, c: Candidate) -> bool:
        """Whether `c` can be weighed: predicted by the fit, fitting memory, and its FLOPs leaving the budget room
        (`trainable`); else `note` (and `refused`) say why."""
        if self.fit is not None and self.fit.predict(c.multiplied, 1) is None:
            c.note = (f"beyond the fit's sizes (at most {self.fit.largest * EXTRAPOLATION / 1e6:.2f}M parameters that "
                      "multiply)")
            return False
        try:
            check_training(c.config.model, c.config.train.batch_size, optimizer_of(c.config.train).state_bytes,
                           self.machine.device)
        except MemoryRefused as refused:
            c.note, c.refused = f"does not fit the memory of {self.machine.device.type}", str(refused)
            return False
        return self.trainable(c)

    def trainable(self, c: Candidate) -> bool:
        """Whether `c` could train MIN_STEPS steps after its timing, its steps no faster than their FLOPs at the most a
        step computes here (`refuse_untimed`); else `refused` names the budget it needs."""
        try:
            refuse_untimed(c.config, self.meta, self.spent(), c.model, self.ceiling)
        except BudgetRefused as refused:
            c.note = f"not timed: at least {refused.least.step_seconds:.3g} s a step, {MIN_STEPS} do not fit the budget"
            c.refused = str(refused)
            return False
        return True

    def time(self, c: Candidate) -> None:
        """Time `c` (or foretell it, or read it back), a step that shows the budget ending cutting it short."""
        if self.gpu is not None:
            step = gpu_step_time(c.config, self.gpu.name, self.gpu.peak.dtype, compiled=False)
            batch = step.evaluation / max(1, c.config.train.eval_iters)  # one batch of each split
            cost = time_plot() + timing_seconds(step.seconds, batch / 2)  # what `time_step` would spend there
            self.foretold += cost
            bytes_written = checkpoint_bytes(c.params, c.config.train)
            c.timing = Timing(0, step.seconds, batch, time_plot(), bytes_written, cost)
            return
        try:
            c.timing = recall_config(c.config, c.model, self.machine) or \
                time_config(c.config, self.machine, self.started + self.budget - SET_UP)
        except torch.OutOfMemoryError:  # a GPU's allocator is the check there
            c.note = f"does not fit the memory of {self.machine.device.type}"

    def high_end(self, larger: list[Candidate], low: Candidate) -> Candidate | None:
        """The largest of `larger` whose FLOPs still let the budget hold it and whose timing, at `low`'s pace a FLOP
        (a larger step uses the cores no worse), fits what `low`'s timing left of TIMING_SHARE of the budget; those
        beyond it say why they are not weighed."""
        assert low.timing is not None, "the low end is timed"
        left = TIMING_SHARE * self.budget - low.timing.cost
        for c in reversed(larger):
            step = low.step_seconds * c.step_flops / low.step_flops
            if timing_seconds(step, step / 3) > left:  # an evaluation's batch a forward of a step
                c.note = (f"not timed: about {step:.2f} s a step, too long to time in this budget (the timing of sizes "
                          f"may take {TIMING_SHARE:.0%} of it)")
            elif self.trainable(c):
                return c
        return None

    def price(self, c: Candidate, low: Candidate, high: Candidate) -> None:
        """`c`'s timing on the line through `low`'s and `high`'s against their steps' FLOPs."""
        assert low.timing and high.timing, "the line's ends are timed"
        share = (c.step_flops - low.step_flops) / (high.step_flops - low.step_flops)
        between = {name: (1 - share) * getattr(low.timing, name) + share * getattr(high.timing, name)
                   for name in ("step", "eval_batch", "plot")}
        c.timing = dataclasses.replace(low.timing, **between, cost=0.0, how=PRICED,
                                       checkpoint_bytes=checkpoint_bytes(c.params, c.config.train))

    def best(self) -> Candidate | None:
        """The planned size of the lowest predicted val."""
        return min((c for c in self.candidates if c.steps), key=lambda c: (c.predicted is None, c.predicted or 0.0),
                   default=None)

    def plan(self, c: Candidate) -> None:
        """Its steps and evaluations in the seconds left, as the budget would plan them now, and its predicted val; or
        the budget's refusal."""
        assert c.timing is not None, "a candidate is planned once timed"
        try:
            c.plan = plan(self.budget, self.spent(), c.timing.costs(), c.config.train, c.intervals,
                          windows_in(self.meta, "val", c.config.model.block_size))
        except BudgetRefused as refused:
            c.plan, c.refused = None, str(refused)
        c.steps, c.eval_iters = (c.plan.max_iters, c.plan.eval_iters) if c.plan else (0, 0)
        c.passes = c.tokens / self.unique
        c.predicted = self.fit.predict(c.multiplied, c.tokens, self.unique) if self.fit and c.plan else None
        c.note = c.note if c.steps else c.note or "no step fits what is left of the budget"


def search(family: Family, fit: SizeFit | None, budget: float, started: float, machine: Machine,
           meta: dict[str, Any], depths: list[int] | None = None, gpu: Hardware | None = None) -> Search:
    """Weigh the family's depths for `budget` seconds counted from `started` (a time.perf_counter() reading): all of
    `depths` where given, each timed, else from the smallest up to the first that the fit, memory or FLOPs rule out,
    by the rule above."""
    found = Search(family, fit, budget, started, machine, meta, gpu)
    weighed = []
    for depth in depths or range(1, MAX_DEPTH + 1):
        c = found.candidate(depth)
        found.candidates.append(c)
        if found.weighable(c):
            weighed.append(c)
        elif not depths:
            break
    if depths or gpu or len(weighed) < 2:
        for c in weighed:
            found.time(c)
    else:
        found.time(weighed[0])
        high = found.high_end(weighed[1:], weighed[0]) if weighed[0].timing else None
        if high is not None:
            found.time(high)
        for c in weighed[1:]:
            if high is not None and high.timing and c.depth < high.depth:
                found.price(c, weighed[0], high)
    for c in weighed:
        if c.timing:
            found.plan(c)
    while (best := found.best()) is not None and best.timing and best.timing.how == PRICED:
        found.time(best)  # its run plans from its own step: timed, it may lose to another
        found.plan(best)
    return found
