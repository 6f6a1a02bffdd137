"""The sizes of a preset's family weighed for a time budget (`search`), for `--size auto` (lmlab.experiments.sizing):
each depth the fit predicts (its sizes, and up to EXTRAPOLATION times its largest) whose memory and FLOPs let the
budget hold it (`Search.trainable`), its steps planned as a budget plans them (lmlab.train.budget) and its val loss
predicted by the fit kept beside the preset, L(N, D), at the new tokens its passes over the train split are worth.

Each size is timed on the machine (`Search.time`: read back where this machine timed it before), climbing from the
smallest: the val a budget trains a family to falls with the size and then rises, as a larger size's steps get fewer,
so the climb stops at the first size that predicts a higher val than one below it, and the lowest timed is chosen,
planned from its own timing as its run will be. A size whose timing, at the pace a FLOP of the largest timed, would
not fit what the timings before it left of TIMING_SHARE of the budget ends the climb untimed. On a datasheet GPU
(`plan --gpu`) each size the climb reaches is foretold by the step model, nothing timed."""

from __future__ import annotations

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
    plot_seconds,
    recall_config,
    refuse_untimed,
    time_config,
    timing_seconds,
)

SET_UP = 1.0  # seconds the trainer takes after the choice before its first step: the data checked, the model built
# Of the budget, what the timing of the sizes may take at most (read back too: what it took then), with the runs that
# measured the data's floor and scale (`measured`, lmlab.experiments.calibration) before it.
TIMING_SHARE = 0.1


@dataclass
class Candidate:
    """A depth of the family as the sizing weighed it: timed, its steps and tokens in the budget, its
    predicted val; or why it was not."""

    depth: int
    shape: str
    width: int  # the family's at this depth (`Family.width`): what its LR rule reads
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
        return {"depth": self.depth, "shape": self.shape, "width": self.width, "params": self.params,
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
                 meta: dict[str, Any], gpu: Hardware | None = None, measured: float = 0.0):
        self.family, self.fit, self.budget, self.started, self.measured = family, fit, budget, started, measured
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
        return Candidate(depth, self.family.describe(depth), self.family.width(depth), model.num_params(),
                         model.multiplied_params(), cfg, model, cfg.intervals(self.unique))

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
            cost = timing_seconds(step.seconds, batch / 2)  # what `time_step` would spend there
            self.foretold += cost
            bytes_written = checkpoint_bytes(c.params, c.config.train)
            c.timing = Timing(0, step.seconds, batch, bytes_written, cost, plot_seconds())
            return
        try:
            c.timing = recall_config(c.config, c.model, self.machine) or \
                time_config(c.config, self.machine, self.started + self.budget - SET_UP)
        except torch.OutOfMemoryError:  # a GPU's allocator is the check there
            c.note = f"does not fit the memory of {self.machine.device.type}"

    def timeable(self, c: Candidate) -> bool:
        """Whether `c`'s timing, at the pace a FLOP of the largest size timed (a larger step uses the cores no worse),
        fits what the timings before it left of TIMING_SHARE of the budget; else `note` says why it is not timed."""
        timed = [t for t in self.candidates if t.timing]
        if not timed:
            return True
        step = timed[-1].step_seconds * c.step_flops / timed[-1].step_flops
        left = TIMING_SHARE * self.budget - self.measured - sum(t.timing.cost for t in timed if t.timing)
        if timing_seconds(step, step / 3) <= left:  # an evaluation's batch a forward of a step
            return True
        c.note = (f"not timed: about {step:.2f} s a step, too long to time in this budget (the timing of sizes may "
                  f"take {TIMING_SHARE:.0%} of it)")
        return False

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
           meta: dict[str, Any], depths: list[int] | None = None, gpu: Hardware | None = None,
           measured: float = 0.0) -> Search:
    """Weigh the family's depths for `budget` seconds counted from `started` (a time.perf_counter() reading): all of
    `depths` where given, each timed, else the climb above, from the smallest up to the first that predicts a higher
    val than one below it or that the fit, memory, FLOPs or the timing's share rule out. Every size timed is planned
    again from the seconds left after each timing, so all compare alike."""
    found = Search(family, fit, budget, started, machine, meta, gpu, measured)
    for depth in depths or range(1, MAX_DEPTH + 1):
        c = found.candidate(depth)
        found.candidates.append(c)
        if not found.weighable(c) or not (depths or found.timeable(c)):
            if depths:
                continue
            break
        found.time(c)
        for timed in found.candidates:
            if timed.timing:
                found.plan(timed)
        if not depths and found.best() is not c:
            break
    return found
