"""The one training step: the training loop, fine-tuning and `lmlab bench` all run this code."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from lmlab.core.config import TrainConfig
from lmlab.core.device import autocast, compile_choice, synchronize, triton_available
from lmlab.model import LanguageModel
from lmlab.model.plugins import backward_named, check_loss
from lmlab.train.attention import AttentionChoice, choose_attention
from lmlab.train.compiled import GRAPHS, CompiledBlocks, CompileTrial, CompileVerdict, graphs_untried
from lmlab.train.machine import MEASURED, READ_BACK, Machine
from lmlab.train.optim import optimizer_of
from lmlab.train.state import RngState

Batch = tuple[torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainStep:
    """The optimizer, the fp16 grad scaler and the (maybe compiled, maybe wrapped) forward of one model, and the step
    that uses them: forward and backward over the micro-batches, unscale, clip, skip the update if the loss or the
    gradient is not finite, update, zero the gradients.

    `wrapped` is what runs forward when it is not the model itself (DDP, FSDP); `reduce` makes the loss and gradient
    norm global under torchrun, so every rank skips alike. `note` is a line for the user when `compile = "auto"` could
    not compile here. A compiled model is compiled block by block (lmlab.train.compiled). With `trial` (rank 0's
    verdict to every rank), its first steps are timed: on a CPU compiled against eager, left for eager unless faster;
    on a GPU, in one process, replayed as CUDA graphs against without (`CompileTrial`); a verdict `machine` keeps for
    this shape (read back, the trial is skipped). The attention path is chosen before the first step
    (lmlab.train.attention), `processes` sharing the host's memory, `cfg.attention` set by `attention_setting`."""

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
        self.graphs_untried = graphs_untried(device, compiled, wrapped is None)
        row = "compile" if device.type == "cpu" else "graphs"
        # The tried way's mode and the other's: compiled or eager on a CPU, with CUDA graphs or without on a GPU.
        self.ways: tuple[str | None, str | None] = ("default", None) if row == "compile" else (GRAPHS, "default")
        tried = trial is not None and compiled and (row == "compile" or self.graphs_untried is None)
        if tried and trial is not None:  # rank 0's cache speaks for every rank
            kept = machine.recall(row, self.compile_shape) or {"compiled": -1}
            if (agreed := trial(int(kept["compiled"]))) >= 0:
                kept = {"compiled_ms": math.nan, "eager_ms": math.nan, **kept, "compiled": bool(agreed)}
                self.verdict = CompileVerdict(kept["compiled_ms"], kept["eager_ms"], kept["compiled"], READ_BACK, row)
                compiled = compiled and (row == "graphs" or self.verdict.compiled)
        if compiled:
            # One compiled model at a time per process: sweeps, bench and the GPU report build many, and past
            # Dynamo's recompile limit (8 per function) it would silently run the next ones eager.
            torch.compiler.reset()
        # What runs forward in training and in evaluations: the model (its blocks compiled in place) or its wrapper.
        self.forward = self.scoring = wrapped or model
        modes = tuple(m for m in self.ways if m) if tried and row == "graphs" else ("default",)
        self.blocks = CompiledBlocks(model, device, modes) if compiled else None
        if self.blocks is not None and self.verdict is not None:
            self.blocks.mode = self.ways[not self.verdict.compiled]
        self.trial = CompileTrial(trial, row) if tried and trial is not None and self.verdict is None else None
        how = READ_BACK if self.verdict else MEASURED if self.trial else None
        machine.said("compile", "compiled" if compiled else "eager", (row == "compile" and how) or "train.compile")
        graphs = self.blocks is not None and self.blocks.mode == GRAPHS
        machine.said("graphs", "CUDA graphs" if graphs else "no CUDA graphs", self.graphs_untried or how or "no trial")
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
        assert self.blocks is not None, "a trial times compiled blocks"
        tried = self.trial.compiled_next()
        self.blocks.mode = self.ways[not tried]
        synchronize(self.device)  # a GPU's step is done when its kernels are: the trial's steps alone wait for them
        began = time.perf_counter()
        result = self._step(batches, n_batches, lr)
        synchronize(self.device)
        self.verdict = self.trial.timed(tried, time.perf_counter() - began)
        if self.verdict is not None:
            self.trial, self.blocks.mode = None, self.ways[not self.verdict.compiled]
            self.machine.store(self.verdict.row, self.compile_shape, self.verdict.kept())
        return result

    def eager_step(self, batches: Iterable[Batch], n_batches: int, lr: float) -> None:
        """A step of the eager model, outside the compile trial: what a budget's timing takes (in `untouched`)."""
        with nullcontext() if self.blocks is None else self.blocks.eager():
            self._step(batches, n_batches, lr)

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
        if self.blocks is not None and self.blocks.mode == GRAPHS:
            # CUDA graphs' outputs of the step before may be overwritten from here (cudagraph trees' rule; the loop
            # keeps only the loss and gradient norm, which are computed outside the blocks).
            torch.compiler.cudagraph_mark_step_begin()
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
