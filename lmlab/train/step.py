"""The one training step: the training loop, fine-tuning and `lmlab bench` all run this code."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core.config import TrainConfig
from lmlab.core.device import autocast, compile_choice, triton_available
from lmlab.model import LanguageModel
from lmlab.model.plugins import backward_named, check_loss
from lmlab.train.attention import AttentionChoice, choose_attention
from lmlab.train.compiled import CompiledBlocks
from lmlab.train.machine import MEASURED, READ_BACK, Machine
from lmlab.train.optim import optimizer_of
from lmlab.train.state import RngState

Batch = tuple[torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# On a CPU a compiled step may be no faster than an eager one (docs/reference/performance.md): after the step that
# compiles and an eager one that warms up, TRIAL_STEPS of each are timed in turns, and compiled stays only when its
# best is at most COMPILE_GAIN of eager's best.
TRIAL_STEPS = 3
COMPILE_GAIN = 0.95


@dataclass(frozen=True)
class CompileVerdict:
    """What the timed steps of a compiled model on a CPU found, and what the run goes on with."""

    compiled_ms: float  # the best compiled step
    eager_ms: float  # the best eager step
    compiled: bool  # whether training goes on compiled
    how: str = MEASURED  # or READ_BACK: timed by an earlier run of this shape on this machine (lmlab.train.machine)

    def line(self, step: int) -> str:
        timed = (f"step {step}: a compiled step took {self.compiled_ms:,.1f} ms, an eager one {self.eager_ms:,.1f} ms "
                 f"(the best of {TRIAL_STEPS} each, {self.how})")
        if self.compiled:
            return f"{timed}: training goes on compiled"
        return (f"{timed}: training goes on eager, as compiling does not pay on this CPU (it must be "
                f"{100 * (1 - COMPILE_GAIN):.0f}% faster; train.compile = false skips the compile)")

    def record(self, step: int) -> dict[str, Any]:
        """The `compile` event of metrics.jsonl."""
        return {"event": "compile", "step": step, "compiled_ms": round(self.compiled_ms, 3),
                "eager_ms": round(self.eager_ms, 3), "compiled": self.compiled, "how": self.how}


class CompileTrial:
    """Compiled and eager steps of one model on a CPU, timed in turns (a load weighs on both alike). `agree` makes the
    verdict every rank's (rank 0's)."""

    def __init__(self, agree: Callable[[int], int]):
        self.agree, self.calls = agree, 0
        self.seconds: dict[bool, list[float]] = {True: [], False: []}

    def compiled_next(self) -> bool:
        return self.calls % 2 == 0

    def timed(self, compiled: bool, seconds: float) -> CompileVerdict | None:
        """A step of the trial done in `seconds`; the verdict after the last one."""
        self.calls += 1
        if self.calls > 2:
            self.seconds[compiled].append(seconds)
        if self.calls < 2 + 2 * TRIAL_STEPS:
            return None
        best, eager = min(self.seconds[True]), min(self.seconds[False])
        keep = bool(self.agree(int(best <= COMPILE_GAIN * eager)))
        return CompileVerdict(1000 * best, 1000 * eager, keep)


class TrainStep:
    """The optimizer, the fp16 grad scaler and the (maybe compiled, maybe wrapped) forward of one model, and the step
    that uses them: forward and backward over the micro-batches, unscale, clip, skip the update if the loss or the
    gradient is not finite, update, zero the gradients.

    `wrapped` is what runs forward when it is not the model itself (DDP, FSDP); `reduce` makes the loss and gradient
    norm global under torchrun, so every rank skips alike. `note` is a line for the user when `compile = "auto"` could
    not compile here. With `trial` (rank 0's verdict to every rank), a compiled model on a CPU is timed against eager
    over its first steps and left for eager unless faster (`CompileTrial`), a verdict `machine` keeps for this shape
    (read back, the trial is skipped). The attention path is chosen before the first step (lmlab.train.attention),
    `processes` sharing the host's memory, `cfg.attention` set by `attention_setting`."""

    def __init__(self, model: LanguageModel, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 wrapped: torch.nn.Module | None = None, reduce: Reduce | None = None,
                 trial: Callable[[int], int] | None = None, processes: int = 1,
                 attention_setting: str = "train.attention", machine: Machine | None = None):
        self.model, self.device, self.dtype, self.grad_clip, self.reduce = model, device, dtype, cfg.grad_clip, reduce
        self.machine = machine = machine or Machine(device, dtype)
        compiled, self.note = compile_choice(cfg.compile, device.type, device.type == "cuda" and triton_available())
        self.compile_shape = {"model": dataclasses.asdict(model.config), "batch": cfg.batch_size, "dtype": str(dtype),
                              "accum": cfg.grad_accum_steps, "threads": torch.get_num_threads()}
        self.verdict: CompileVerdict | None = None
        kept = None
        if trial and compiled and device.type == "cpu":  # rank 0's cache speaks for every rank
            kept = machine.recall("compile", self.compile_shape) or {"compiled": -1}
            if (agreed := trial(int(kept["compiled"]))) >= 0:
                kept = {"compiled_ms": math.nan, "eager_ms": math.nan, **kept, "compiled": bool(agreed)}
                self.verdict = CompileVerdict(kept["compiled_ms"], kept["eager_ms"], kept["compiled"], READ_BACK)
                compiled = self.verdict.compiled
            else:
                kept = None
        if compiled:
            # One compiled model at a time per process: sweeps, bench and the GPU report build many, and past
            # Dynamo's recompile limit (8 per function) it would silently run the next ones eager.
            torch.compiler.reset()
        # What runs forward in training and in evaluations: the model (its blocks compiled in place) or its wrapper.
        self.forward = self.scoring = wrapped or model
        self.blocks = CompiledBlocks(model, device) if compiled else None
        self.trial = CompileTrial(trial) if trial and compiled and device.type == "cpu" and kept is None else None
        machine.said("compile", "compiled" if compiled else "eager", READ_BACK if kept else
                     MEASURED if self.trial else "train.compile")
        chosen = optimizer_of(cfg)
        self.optimizer = chosen.build(model, cfg, device)
        self.attention = choose_attention(model, cfg, machine, chosen.state_bytes, processes, agree=trial,
                                          setting=attention_setting)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, batches: Iterable[Batch], n_batches: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at `lr` over `n_batches` micro-batches; returns (mean loss, gradient norm) as device
        tensors, without a host sync, so the caller decides when to read them."""
        if self.trial is None:
            return self._step(batches, n_batches, lr)
        compiled = self.trial.compiled_next()
        began = time.perf_counter()  # a CPU's step is done when it returns
        with nullcontext() if compiled else self._eager():
            result = self._step(batches, n_batches, lr)
        self.verdict = self.trial.timed(compiled, time.perf_counter() - began)
        if self.verdict is not None:
            self.trial = None
            if self.blocks is not None and not self.verdict.compiled:
                self.blocks.mode = None
            self.machine.store("compile", self.compile_shape, {k: v for k, v in dataclasses.asdict(self.verdict).items()
                                                               if k != "how"})
        return result

    def eager_step(self, batches: Iterable[Batch], n_batches: int, lr: float) -> None:
        """A step of the eager model, outside the compile trial: what a budget's timing takes (in `untouched`)."""
        with self._eager():
            self._step(batches, n_batches, lr)

    def _eager(self) -> AbstractContextManager[None]:
        return nullcontext() if self.blocks is None else self.blocks.eager()

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Steps inside leave no trace: the weights, the optimizer's state, the grad scaler and the generators are
        restored after them, so a run timed on its own step computes the bits it would have untimed."""
        weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        optimizer, scaler = copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scaler.state_dict())
        rng = RngState(self.device)
        generators = rng.state_dict()
        try:
            yield
        finally:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(scaler)
            rng.load_state_dict(generators)

    @property
    def attention_path(self) -> str | None:
        """The attention path this step trains by, what a checkpoint records; None for a model without one."""
        return None if self.attention is None else self.attention.path

    def restore_attention(self, path: str | None) -> None:
        """A resumed run goes on by the attention path it trained by, whatever is chosen now; a checkpoint without one
        (older than the choice) by the one chosen now."""
        if path is not None and self.attention is not None:
            self.model.use_attention(path)
            self.attention = AttentionChoice(path, "as this run trained, its checkpoint says")

    @property
    def compiled(self) -> bool:
        return self.blocks is not None and self.blocks.mode is not None

    def decided(self) -> CompileVerdict | None:
        """The compile trial's verdict, once, after the step that reached it."""
        verdict, self.verdict = self.verdict, None
        return verdict

    def _step(self, batches: Iterable[Batch], n_batches: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            check_loss(self.model, loss, x.shape)
            loss = loss / n_batches
            with backward_named(self.model):
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        if self.reduce is not None:
            total, norm = self.reduce(total, norm)
        if self.scaler.is_enabled():  # fp16: the scaler skips a step whose gradients are not finite itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # A non-finite loss or gradient never reaches the weights, state and step count included: every entry of
            # OPTIMIZERS honours found_inf on the device, so the step never waits on the host.
            self.optimizer.found_inf = (~(torch.isfinite(total) & torch.isfinite(norm))).float()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm
