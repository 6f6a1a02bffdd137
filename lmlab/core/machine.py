"""How this machine runs a job: the one `Machine` a command builds at its start and passes down to what computes (the
trainer and its step, a budget's timing, the sizing, the decoder, the server). Its choices are rules over what the
benchmarks measured (docs/reference/performance.md, "The machine's rules"), each fixed by its setting where set:
- threads: the cores other processes leave free when the work starts, then as the load changes (lmlab.core.threads);
- attention: on a CPU in bfloat16 up to a context of MATH_CONTEXT, the math path, where its scores fit in memory;
  else torch's fused kernel;
- compile: on CUDA where Triton works, not on a CPU;
- CUDA graphs: a compiled step on CUDA, in one process, one micro-batch a step, of a model whose kind allows them,
  whose FLOPs at the peak take under GRAPHS_STEP (its kernels' launches, not their work, set its pace);
- the decode step: lmlab.inference.steps.choose_step.
Measured only what no rule can know: the matmul peak per dtype, once per machine, which settles the dtype
(lmlab.core.peak), and the step time a budget plans by (lmlab.train.timing), both kept in the machine cache
(lmlab.core.cache). `line` says each choice and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from lmlab.core import cache
from lmlab.core.busy import LoadMeter
from lmlab.core.device import compile_choice, resolve_device, triton_available
from lmlab.core.peak import Peak, choose_dtype, peak_flops
from lmlab.core.threads import Choice, ThreadChooser

MEASURED, READ_BACK = "measured", "read back"
# On a CPU in bfloat16 the math path (the scores written out in the run's dtype) trained a layer of the demo's shape
# faster than the fused kernel, whose bf16 backward is slow up to there; fused won at 1,024 and everywhere in float32.
MATH_CONTEXT = 256
# A step this short at the peak is bound by the host's launches: CUDA graphs replay a block's kernels as one launch.
GRAPHS_STEP = 5e-3


@dataclass
class Machine:
    """The device, dtype (and why) and peak of one job, its threads, and the choices made for it (`made`: a row's
    name to what was chosen and why), which the start says in a line."""

    device: torch.device
    dtype: torch.dtype
    threads: ThreadChooser
    peak: Peak | None = None
    dtype_reason: str = ""
    made: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def measured(cls, device: torch.device, setting: str, threads: ThreadChooser, born: str | None = None) -> Machine:
        """The machine of a job in the dtype `setting` asks for (train.dtype: "auto" by the peaks measured here;
        `born`, the dtype its weights were trained in), with the peak MFU divides by."""
        dtype, why = choose_dtype(device, setting, born)
        return cls(device, dtype, threads, peak_flops(device, dtype), why)

    @classmethod
    def of(cls, device: str, setting: str = "auto", threads: int = 0, window: LoadMeter | None = None) -> Machine:
        """A job's machine at its start, its threads started: on `device` ("auto", "cpu", "cuda", ...) in the dtype
        train.dtype's `setting` asks for, on train.threads's `threads` (0: by the rule, from the load over `window`,
        default from now)."""
        machine = cls.measured(resolve_device(device), setting, ThreadChooser(threads, "train.threads", window=window))
        machine.start()
        return machine

    def start(self) -> Choice:
        """The threads the job's work starts on (lmlab.core.threads), said in the line."""
        choice = self.threads.start(self.device)
        self.said("threads", f"{choice.threads} thread{'s' * (choice.threads > 1)}", choice.reason or "every core")
        return choice

    def attention(self, setting: str, name: str, block_size: int, math_fits: bool) -> str:
        """The path attention trains by: as `setting` (given as `name`) says, or by the rule with `auto`
        (`math_fits`: whether a step with the math path's scores fits in memory)."""
        if setting != "auto":
            path, why = setting, name
        elif self.device.type != "cpu" or self.dtype != torch.bfloat16 or block_size > MATH_CONTEXT:
            path, why = "fused", (f"rule: torch's fused kernel in {_name(self.dtype)} on {self.device.type} at a "
                                  f"context of {block_size}")
        elif not math_fits:
            path, why = "fused", "rule: the math path's scores would not fit in memory"
        else:
            path, why = "math", f"rule: a CPU in bfloat16 at a context of {block_size} <= {MATH_CONTEXT}"
        self.said("attention", f"attention {path}", why)
        return path

    def compiles(self, setting: bool | str) -> tuple[bool, str | None]:
        """Whether a training step is compiled (train.compile's `setting`), and a line to print first, or None."""
        compiled, note = compile_choice(setting, self.device.type, self.device.type == "cuda" and triton_available())
        why = "train.compile" if setting != "auto" else f"rule: {'CUDA with Triton' if compiled else 'eager here'}"
        self.said("compile", "compiled" if compiled else "eager", why)
        return compiled, note

    def graphs(self, compiled: bool, alone: bool, accumulation: int, step_flops: float, allowed: bool) -> bool:
        """Whether a compiled step's blocks replay as CUDA graphs: in a process `alone` (not under torchrun), over
        `accumulation` micro-batches, of `step_flops`; `allowed`, its model's kind lets them be recorded."""
        at_peak = step_flops / self.peak.flops if self.peak else 0.0
        why = no_graphs(self.device.type, compiled, alone, accumulation, at_peak, allowed)
        self.said("graphs", "no CUDA graphs" if why else "CUDA graphs",
                  why or f"rule: a step of {1000 * at_peak:.1f} ms at the peak, bound by its launches")
        return why is None

    def said(self, row: str, chosen: str, why: str) -> None:
        """Keep what `row` chose and why for the start's line."""
        self.made[row] = (chosen, why)

    def line(self) -> str | None:
        """E.g. `machine: 2 threads (quiet), eager (rule: eager here), attention math (rule: ...)`; None when
        nothing was chosen."""
        if not self.made:
            return None
        return "machine: " + ", ".join(f"{chosen} ({why})" for chosen, why in self.made.values())

    def record(self, step: int = 0) -> dict[str, Any]:
        """The `machine` event of metrics.jsonl: each choice made and why."""
        return {"event": "machine", "step": step,
                "choices": {row: {"chosen": chosen, "why": why} for row, (chosen, why) in self.made.items()}}

    def say(self, console: Console) -> None:
        """What was found wrong with the machine cache, then the start's line."""
        for note in cache.take_notes():
            console.print(f"note: {note}", style="yellow", highlight=False)
        if line := self.line():
            console.print(line, highlight=False)


def no_graphs(device: str, compiled: bool, alone: bool, accumulation: int, at_peak: float,
              allowed: bool) -> str | None:
    """Why a training step on `device` does not replay as CUDA graphs (`Machine.graphs`'s arguments; `at_peak`, its
    seconds at the peak), or None where it does."""
    return next((reason for reason, holds in (
        ("not on this device", device != "cuda"), ("train.compile", not compiled),
        ("rule: under torchrun (FSDP and DDP gather and reduce outside a graph)", not alone),
        ("rule: gradient accumulation (each micro-batch would record graphs of its own)", accumulation > 1),
        ("rule: the model's kind", not allowed),
        (f"rule: a step of {1000 * at_peak:.1f} ms at the peak (from {1000 * GRAPHS_STEP:g} its work, not its "
         "launches, sets its pace)", at_peak >= GRAPHS_STEP)) if holds), None)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
