"""Where a training step's time goes on the CPU: lmlab's own step (lmlab.train.step.TrainStep over the model lmlab
builds, as the demo trains it) profiled by torch.profiler over steps after a warm-up, each op's time put to a kind by
where it runs (a module of the model, the attention's core, the optimizer's step, the data) and what it is.

    python benchmarks/step_profile.py [--config configs/shakespeare-char-modern-cpu.toml] [--size 3]
        [--dtype auto|float32|bfloat16] [--threads N] [--slow-host] [--steps 8] [--warmup 3] [--random]
        [--torch-norm] [--dry-run]

`--size 3` is the depth of the preset's family `make demo` trains on 2 cores (3 layers of 192; 0: the config's own
shape); the dtype and attention path are the machine's rules' (train.dtype "auto" unless `--dtype`), the threads
lmlab's rule's unless `--threads`; `--slow-host` is float32 on one thread, the slow AVX2 host's stand-in;
`--torch-norm` puts torch's RMSNorm in place of lmlab's own CPU one (lmlab/model/rmsnorm.py), to weigh the two. Batches
are the dataset's where it is prepared, else (and with --random) random tokens of its vocabulary. The kinds:

- matmuls: the weights' matmuls (attention's projections, the MLP, the head), forward and backward;
- attention: its core (torch's fused kernel, or the math path's scores, softmax and weighted sum), both ways;
- norms: the RMSNorm or LayerNorm modules, the q/k norms among them;
- casts: dtype conversions (autocast's of weights and activations, the model's own .float() and .type_as());
- elementwise, other: rotary, SwiGLU's gate, residual adds, embeddings, the loss, layout copies;
- optimizer: the step after its last backward op (clipping, the update, zeroing the gradients), its Python included;
- data: making the batches;
- Python, dispatch: the rest of the step: Python between ops, the autograd engine's own work, the profiler's cost.

FLOPs: the matmuls' from their shapes; attention's by lmlab's count (the attention term of `flops_per_token`,
12·L·H·Q·T a token, as MFU counts it); none for the rest. A kind's MFU is its FLOPs over its time over the peak lmlab
measures (lmlab.core.peak). The step's own tokens/s and MFU are timed without the profiler, as `train` computes them.
A second table splits the model's forward and backward by the module they run in. Prints a warning when the machine
was busy while it ran. The tables fit 80 columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.table import Table
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule

from lmlab.commands.common import console
from lmlab.core.busy import Load, LoadMeter, busy_warning, cores
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import load_config
from lmlab.core.device import configure, processor
from lmlab.core.machine import Machine
from lmlab.core.peak import Peak
from lmlab.data.loader import BatchLoader, open_tokens
from lmlab.data.shards import read_meta
from lmlab.experiments.bench import with_vocab
from lmlab.experiments.family import Family, read_fit
from lmlab.model import base, build_model, gpt
from lmlab.model.rmsnorm import RMSNorm, wide
from lmlab.train.step import TrainStep

CPU = torch.device("cpu")
DEMO = "configs/shakespeare-char-modern-cpu.toml"
CHARACTERS = 76  # the Shakespeare dataset's vocabulary: random tokens of it where the demo's data is not prepared
SCOPE = "lmlab::"  # this benchmark's record_function scopes
STEP, DATA = SCOPE + "step", SCOPE + "data"
# Where an op runs: the innermost of these modules, or of the functions below, that it runs in.
MODULES: list[tuple[type[nn.Module], str]] = [
    (nn.Embedding, "embedding"), (gpt.Rotary, "embedding"), (gpt.CausalSelfAttention, "attention"),
    (nn.RMSNorm, "norms"), (nn.LayerNorm, "norms"), (gpt.MLP, "MLP")]
FUNCTIONS: list[tuple[Any, str, str]] = [(gpt, "attend", "attention core"), (gpt, "apply_rotary", "rotary"),
                                         (base, "head_loss", "head & loss")]
WHERE = ("embedding", "attention", "attention core", "rotary", "norms", "MLP", "head & loss", "residual, other")
KINDS = ("matmuls", "attention", "norms", "casts", "elementwise, other", "optimizer", "data", "Python, dispatch")
OVERHEAD = KINDS[-1]
# The ops that multiply matrices (their FLOPs from their shapes: 2·M·K·N), and the wrappers that reach them.
KERNELS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::baddbmm": 1}  # where the two operands start
MATMULS = {*KERNELS, "aten::matmul", "aten::linear"}
CASTS = {"aten::to", "aten::_to_copy"}  # .to(dtype), .float(), .type_as() and autocast's casts
BACKWARD = "autograd::engine::evaluate_function"


class Batches(Protocol):
    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class RandomTokens:
    """Random windows of a vocabulary, as a loader hands them: inputs and their next tokens."""

    vocab: int
    batch: int
    block: int
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=self.generator)
        return rows[:, :-1], rows[:, 1:]


@dataclass
class Setup:
    """What is profiled: the config, lmlab's step of its model on the job's machine, and its batches."""

    cfg: RunConfig
    machine: Machine
    step: TrainStep
    batches: Batches
    said: str  # where the batches come from

    @property
    def tokens(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum_steps * self.cfg.model.block_size

    def run(self, count: int = 1) -> None:
        """`count` training steps, as the loop takes them: its micro-batches made while the step runs."""
        accumulate, lr = self.cfg.train.grad_accum_steps, self.cfg.train.learning_rate
        for _ in range(count):
            self.step(fed(self.batches, accumulate), accumulate, lr)


def fed(batches: Batches, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`count` micro-batches, each made inside the data's scope (closed before the step takes it)."""
    for _ in range(count):
        with record_function(DATA):
            batch = batches.next()
        yield batch


def config_of(args: argparse.Namespace) -> tuple[RunConfig, bool]:
    """The config profiled (the family's depth `--size`, its LR by the fit beside the preset) and whether its
    dataset is prepared."""
    settings = [*args.set, *([f"train.dtype={args.dtype}"] if args.dtype else []),
                *([f"train.threads={args.threads}"] if args.threads is not None else [])]
    cfg = load_config(Path(args.config), settings)
    prepared = (Path(cfg.data.dataset) / "meta.json").exists()
    if prepared:
        cfg = with_vocab(cfg)
    elif not cfg.model.vocab_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=args.vocab))
    if args.size:
        cfg = Family.of(cfg, args.config).config(args.size, read_fit(Path(args.config)))
    return cfg, prepared


def set_up(args: argparse.Namespace) -> Setup:
    """lmlab's step of the config's model on this CPU, as a run builds it (the machine's rules: threads, dtype,
    attention path, eager or compiled)."""
    cfg, prepared = config_of(args)
    tc, mc = cfg.train, cfg.model
    machine = Machine.of("cpu", tc.dtype, tc.threads)
    configure(CPU)
    torch.manual_seed(tc.seed)
    model = build_model(mc)
    if args.torch_norm:  # as lmlab ran it before its own CPU norm: torch's, in float32, back in the input's dtype
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
            norm.forward = functools.partial(lambda norm, x: nn.RMSNorm.forward(norm, wide(x)).type_as(x), norm)
    step = TrainStep(model, tc, machine)
    batches: Batches
    if prepared and not args.random:
        meta = read_meta(Path(cfg.data.dataset))
        split = open_tokens(Path(cfg.data.dataset), "train", meta["dtype"], meta=meta)
        batches, said = BatchLoader(split, mc.block_size, tc.batch_size, tc.seed, "train", CPU), cfg.data.dataset
    else:
        batches = RandomTokens(mc.vocab_size, tc.batch_size, mc.block_size)
        said = f"random tokens of a vocabulary of {mc.vocab_size}"
    return Setup(cfg, machine, step, batches, said)


def scoped(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def inside(*args: Any, **kwargs: Any) -> Any:
        with record_function(SCOPE + name):
            return function(*args, **kwargs)

    return inside


def scope_module(module: nn.Module, name: str) -> list[Any]:
    """Hooks that run `module`'s forward inside a scope named `name`; their handles."""
    opened: list[record_function] = []

    def enter(*_: Any) -> None:
        opened.append(record_function(SCOPE + name))
        opened[-1].__enter__()

    def leave(*_: Any) -> None:
        opened.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


@contextmanager
def instrumented(model: nn.Module) -> Iterator[None]:
    """Inside, the model's modules (MODULES) and functions (FUNCTIONS) run in scopes of their names, the whole forward
    in one of its own; nothing of it after. The scopes mark where forward ops run; a backward op is where its forward
    op was (`Tally.visit`)."""
    handles = scope_module(model, "model")
    for module in model.modules():
        name = next((name for kind, name in MODULES if isinstance(module, kind)), None)
        handles += scope_module(module, name) if name else []
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in FUNCTIONS]
    for owner, attribute, name in FUNCTIONS:
        setattr(owner, attribute, scoped(name, getattr(owner, attribute)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)


@dataclass(frozen=True)
class Context:
    """What an op runs inside: the innermost scope of WHERE's, whether in attention's core, a cast, a matmul."""

    where: str = "residual, other"
    core: bool = False
    cast: bool = False
    matmul: bool = False

    def inside(self, name: str) -> Context:
        scope = name.removeprefix(SCOPE) if name.startswith(SCOPE) else None
        if scope in WHERE:
            return dataclasses.replace(self, where=scope, core=self.core or scope == "attention core")
        return dataclasses.replace(self, cast=self.cast or name in CASTS, matmul=self.matmul or name in MATMULS)

    def kind(self) -> str:
        if self.core:
            return "attention"
        if self.cast:
            return "casts"
        if self.where == "norms":
            return "norms"
        return "matmuls" if self.matmul else "elementwise, other"


def kernel_flops(event: Any) -> float:
    """2·M·K·N of a matmul kernel (KERNELS) from its recorded shapes: (M, K) by (K, N), batched or not."""
    first = KERNELS[event.name]
    a, b = event.input_shapes[first], event.input_shapes[first + 1]
    return 2.0 * torch.Size(a).numel() * b[-1]


@dataclass
class Tally:
    """The profiled steps' time (µs, the profiler's clock) by kind and by (where, kind), their FLOPs by kind, and
    each forward op's context by its sequence number (what its backward ops are attributed by)."""

    steps: int = 0
    time: float = 0.0
    kinds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    places: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    forward: dict[int, Context] = field(default_factory=dict)

    def add(self, kind: str, time: float, where: str | None = None) -> None:
        self.kinds[kind] += time
        if where is not None:
            self.places[where, kind] += time

    def step(self, event: Any) -> None:
        """One step's scope: its data, its model's ops, its optimizer (everything after the last backward op), and
        its own time between them (Python)."""
        start, end = event.time_range.start, event.time_range.end
        children = sorted(event.cpu_children, key=lambda e: e.time_range.start)
        tail = max((e.time_range.end for e in children if e.name.startswith(BACKWARD)), default=end)
        before = [e for e in children if e.time_range.start < tail]
        for child in before:
            if child.name == DATA:
                self.add("data", child.cpu_time_total)
            else:
                self.visit(child, Context(), child.name.startswith(BACKWARD))
        for child in children[len(before):]:
            self.flops["optimizer"] += self.counted(child)
        self.add("optimizer", end - tail)
        self.add(OVERHEAD, tail - start - sum(e.cpu_time_total for e in before))
        self.steps, self.time = self.steps + 1, self.time + event.cpu_time_total

    def visit(self, event: Any, context: Context, backward: bool, counting: bool = True) -> None:
        """An op and those it calls, forward or backward: its own time to its kind and place, a matmul kernel's
        FLOPs (not again for a kernel inside it)."""
        if backward and event.name.startswith(BACKWARD):  # where its forward op ran
            context = self.forward.get(event.sequence_nr, context)
        context = context.inside(event.name)
        if not backward and event.sequence_nr >= 0:
            self.forward[event.sequence_nr] = Context(context.where, context.core)
        kind = context.kind() if event.name.startswith("aten::") else OVERHEAD
        self.add(kind, event.self_cpu_time_total, context.where)
        if counting and event.name in KERNELS:
            counting = False
            if not context.core:  # attention's FLOPs are lmlab's count of them, the causal kernel's or not
                self.flops["matmuls"] += kernel_flops(event)
        for child in event.cpu_children:
            self.visit(child, context, backward, counting)

    def counted(self, event: Any) -> float:
        """The FLOPs of the matmul kernels an op runs."""
        if event.name in KERNELS:
            return kernel_flops(event)
        return sum(self.counted(child) for child in event.cpu_children)


def profiled(setup: Setup, rounds: int) -> tuple[Tally, list[float]]:
    """`rounds` rounds of three training steps: one unprofiled (its seconds kept), one the profiler warms up on and
    discards, one profiled with the model instrumented; so a load that comes or goes weighs on both alike. The
    profiled steps tallied, and the unprofiled steps' seconds (the CPU computes in this thread: a step is done when
    it returns)."""
    plan = schedule(wait=1, warmup=1, active=1, repeat=rounds)
    plain = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, schedule=plan, acc_events=True) as profiler:
        for turn in range(3 * rounds):
            if turn % 3 == 0:
                began = time.perf_counter()
                setup.run()
                plain.append(time.perf_counter() - began)
            else:
                with instrumented(setup.step.model), record_function(STEP):
                    setup.run()
            profiler.step()
    tally = Tally()
    for event in profiler.events():
        if event.name == STEP:
            tally.step(event)
    tally.flops["attention"] = tally.steps * setup.step.model.attention_flops() * setup.tokens
    return tally, plain


def figure(value: float) -> str:
    """Three significant figures, thousands separated, no exponent: 40.2, 0.0412, 1,234."""
    if value <= 0:
        return "0"
    digits = max(0, 2 - int(f"{value:e}".split("e")[1]))
    return f"{value:,.{digits}f}"


def kinds_table(tally: Tally, peak: Peak) -> Table:
    """A row per kind: ms a step, its share of the step, its FLOPs in lmlab's count (GFLOP a step, share), GFLOP/s
    and MFU; the optimizer's own matmuls, outside that count, are `optimizer_line`'s."""
    per_step = tally.time / tally.steps / 1e6  # seconds
    counted = {kind: tally.flops[kind] / tally.steps for kind in ("matmuls", "attention")}
    flops = sum(counted.values())
    table = Table(title=f"a step's {1000 * per_step:,.1f} ms by kind (profiled; mean of {tally.steps})")
    for column in ("kind", "ms/step", "% step", "GFLOP", "% FLOP", "GFLOP/s", "MFU"):
        table.add_column(column, justify="left" if column == "kind" else "right")

    def row(name: str, seconds: float, computed: float) -> list[str]:
        rate = computed / seconds if seconds else 0.0
        cells = [figure(computed / 1e9), f"{100 * computed / flops:.1f}%", figure(rate / 1e9),
                 f"{100 * rate / peak.flops:.1f}%" if peak.native else "-"] if computed else ["-"] * 4
        return [name, f"{1000 * seconds:,.2f}", f"{100 * seconds / per_step:.1f}%", *cells]

    for kind in KINDS:
        table.add_row(*row(kind, tally.kinds[kind] / tally.steps / 1e6, counted.get(kind, 0.0)))
    table.add_section()
    table.add_row(*row("the step", per_step, flops))
    return table


def places_table(tally: Tally) -> Table:
    """The model's forward and backward by where their ops run: ms a step in matmuls, casts, the rest of the ops and
    Python (and the autograd engine's own work)."""
    per_step = tally.time / tally.steps / 1e3  # ms
    table = Table(title="the model's forward and backward by where they run (ms/step)")
    for column in ("where", "ms/step", "% step", "matmuls", "casts", "rest", "Python"):
        table.add_column(column, justify="left" if column == "where" else "right")
    for where in WHERE:
        spent = {kind: tally.places[where, kind] / tally.steps / 1e3 for kind in KINDS}
        total = sum(spent.values())
        rest = total - spent["matmuls"] - spent["casts"] - spent[OVERHEAD]
        table.add_row(where, f"{total:,.2f}", f"{100 * total / per_step:.1f}%",
                      *(f"{ms:,.2f}" for ms in (spent["matmuls"], spent["casts"], rest, spent[OVERHEAD])))
    return table


def describe(setup: Setup) -> None:
    """What is profiled, on what: the CPU, threads and dtype, the machine's choices, the model and its batches, the
    peak MFU divides by."""
    machine, tc, model = setup.machine, setup.cfg.train, setup.step.model
    dtype = str(machine.dtype).removeprefix("torch.")
    console.print(f"{processor()['name']}: {torch.get_num_threads()} threads on {len(cores())} cores; dtype {dtype} "
                  f"({machine.dtype_reason}); torch {torch.__version__}", highlight=False)
    console.print(machine.line() or "", highlight=False)
    micro = f" x {tc.grad_accum_steps} micro-batches" if tc.grad_accum_steps > 1 else ""
    console.print(f"{model.describe()} ({model.num_params() / 1e6:.2f}M parameters), {tc.batch_size} x "
                  f"{setup.cfg.model.block_size} tokens a step{micro}, {tc.optimizer}; batches: {setup.said}",
                  highlight=False)
    assert machine.peak is not None, "Machine.of measures the peak"
    console.print(machine.peak.standing(), highlight=False)


def summary(setup: Setup, seconds: list[float], tally: Tally, load: Load | None) -> None:
    """The unprofiled step's tokens/s and MFU (as `train` computes them), the profiler's cost, lmlab's count of a
    step's FLOPs, the optimizer's own matmuls and the load."""
    peak, model, tokens = setup.machine.peak, setup.step.model, setup.tokens
    assert peak is not None
    mean = statistics.fmean(seconds)  # as the train line's: the tokens of its steps over their time
    rate = tokens / mean
    mfu = peak.mfu(rate * model.flops_per_token())
    profiled_ms = tally.time / tally.steps / 1e3
    console.print(f"the step unprofiled (the mean of {len(seconds)}, each beside a profiled one): {1000 * mean:,.1f} "
                  f"ms, {rate:,.0f} tokens/s, MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}; profiled "
                  f"{profiled_ms:,.1f} ms ({profiled_ms / mean / 1000 - 1:+.0%}: the profiler's own cost, mostly in "
                  f"{OVERHEAD!r})", highlight=False)
    console.print(f"lmlab's count: {figure(model.flops_per_token() * tokens / 1e9)} GFLOP a step (flops_per_token x "
                  f"{tokens:,} tokens; the table's GFLOP: matmuls by their shapes, attention by that count)",
                  highlight=False)
    own, spent = tally.flops["optimizer"] / tally.steps, tally.kinds["optimizer"] / tally.steps / 1e6
    if own:
        which = "Muon's Newton-Schulz iterations" if setup.cfg.train.optimizer == "muon" else "its matmuls"
        console.print(f"the optimizer's own matmuls ({which}) compute {figure(own / 1e9)} GFLOP a step beyond "
                      f"lmlab's count, {figure(own / spent / 1e9)} GFLOP/s over its {1000 * spent:,.2f} ms",
                      highlight=False)
    console.print(f"load while it ran: {'unknown' if load is None else load.describe()}", highlight=False)
    warning = busy_warning("the steps", load, "its times read long, its rates and MFU low")
    if warning:
        console.print(warning, style="yellow", markup=False, highlight=False)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO)
    parser.add_argument("--size", type=int, default=3,
                        help="the depth of the preset's family (lmlab train --size); 0: the config's own shape")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                        help="train.dtype (default: the config's; auto for the demo)")
    parser.add_argument("--threads", type=int, help="train.threads (default: the config's; 0: lmlab's rule)")
    parser.add_argument("--slow-host", action="store_true", help="float32 on one thread: the slow host's stand-in")
    parser.add_argument("--steps", type=int, default=8, help="steps profiled, each beside one unprofiled")
    parser.add_argument("--warmup", type=int, default=3, help="steps before any is timed")
    parser.add_argument("--random", action="store_true", help="random tokens, even where the dataset is prepared")
    parser.add_argument("--vocab", type=int, default=CHARACTERS,
                        help="the vocabulary of random tokens where the dataset is not prepared")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of the config, as `lmlab train --set` takes it")
    parser.add_argument("--torch-norm", action="store_true",
                        help="torch's RMSNorm in place of lmlab's own CPU one (lmlab.model.rmsnorm): to weigh the two")
    parser.add_argument("--dry-run", action="store_true", help="2 steps after 1: that it runs, not a figure")
    args = parser.parse_args()
    if args.slow_host:
        args.dtype, args.threads = "float32", 1
    if args.dry_run:
        args.steps, args.warmup = 2, 1
    return args


def main() -> None:
    args = arguments()
    setup = set_up(args)
    describe(setup)
    assert setup.machine.peak is not None
    with LoadMeter() as meter:
        setup.run(args.warmup)  # allocations, the allocator's caches, oneDNN's primitives
        tally, seconds = profiled(setup, args.steps)
    console.print(kinds_table(tally, setup.machine.peak))
    console.print(places_table(tally))
    summary(setup, seconds, tally, meter.load)


if __name__ == "__main__":
    main()
