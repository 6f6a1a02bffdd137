"""What a training run will cost before it starts (`lmlab plan`): parameters, tokens, FLOPs and wall time. The
throughput is estimated without timing the model (a peak × an MFU ÷ FLOPs per token; a datasheet GPU's step part by
part, `gputime`), measured here with `--measure`, or given with `--tokens-per-sec`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.analysis.runs import summarize
from lmlab.analysis.scaling import CHINCHILLA_TOKENS_PER_PARAM
from lmlab.core.busy import Load
from lmlab.core.config import RunConfig
from lmlab.core.device import PEAK_TFLOPS, datasheet_peak, machine, resolve_device
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.core.machine import Machine
from lmlab.core.peak import Peak, autocast_dtype, peak_flops
from lmlab.data.shards import read_meta
from lmlab.experiments.bench import bench_batch, with_vocab
from lmlab.experiments.gputime import StepTime, gpu_step_time, matmul_share, peak_of, run_seconds
from lmlab.model import LanguageModel, build_model
from lmlab.run.rundir import RunDir

# The MFU assumed without a measurement on hardware the datasheet table does not list (docs/reference/performance.md).
DEFAULT_MFU = 0.3


@dataclass
class Plan:
    params: int
    params_non_embedding: int
    flops_per_token: float
    tokens_per_step: int
    tokens: int
    tokens_source: str
    tokens_per_sec: float
    rate_source: str
    split_tokens: int | None = None  # the train split's tokens (its unique tokens); None where it is not known
    lookup_params: int = 0  # 6·N·D counts them, lmlab's compute does not
    padding_params: int = 0  # not parameters: lmlab's compute counts what the head multiplies
    attention_flops: float = 0.0  # per token, beyond the weights' 6 per multiplying weight
    eval_seconds: float = 0.0  # the wall time besides the steps, where estimated (gputime: evaluations, compiling)
    besides: str = "evaluating"

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def six_nd(self) -> float:
        """The 6·N·D people check by hand: every parameter, no attention term."""
        return 6.0 * self.params * self.tokens

    @property
    def passes(self) -> float | None:
        return self.tokens / self.split_tokens if self.split_tokens else None

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_sec + self.eval_seconds

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAM * self.params


@dataclass
class Hardware:
    """What a quick estimate assumes: the hardware and its peak FLOP/s in the dtype the run would use (the peak's
    `dtype`)."""

    name: str  # e.g. "H100" or "cpu: Intel(R) Xeon(R) Processor"
    peak: Peak
    local: dict[str, Any] | None  # this machine, or None for a datasheet GPU

    def ran(self, start: dict[str, Any]) -> bool:
        """Whether a run (its start event) trained on this hardware in this dtype, so its MFU carries over."""
        facts = start.get("machine") or {}
        if start.get("dtype") != self.peak.dtype:
            return False
        if self.local:
            return facts.get("gpu") == self.local["gpu"] and facts.get("cpu") == self.local["cpu"]
        found = datasheet_peak(facts["gpu"], getattr(torch, self.peak.dtype)) if facts.get("gpu") else None
        return found is not None and found[1] == self.peak.source


MEASURE_SECONDS = 3.0  # `plan --measure` times steps for at least this long (one at least), after one warm-up step


def measure_tokens_per_sec(cfg: RunConfig, machine: Machine) -> tuple[tuple[float, str], Load | None]:
    """Training tokens/s of `cfg` on `machine` as training runs it and how it was measured (a plan's rate), and the
    machine's load meanwhile."""
    device, dtype, threads = machine.device, machine.dtype, machine.threads.choice.threads
    row = bench_batch(cfg, cfg.train.batch_size, 1, machine, warmup=1, seconds=MEASURE_SECONDS)
    if row.tokens_per_sec is None:  # out of memory
        raise UserError(f"train.batch_size {cfg.train.batch_size} does not fit on this device; lower it or pass "
                        "--tokens-per-sec.")
    accumulation = f" x {cfg.train.grad_accum_steps} accumulated" if cfg.train.grad_accum_steps > 1 else ""
    source = (f"measured here on {device} in {str(dtype).removeprefix('torch.')}, micro-batch "
              f"{cfg.train.batch_size}{accumulation}, {threads} thread{'s' * (threads > 1)}, as training runs")
    return (row.tokens_per_sec, source), row.load


def gpu_row(name: str) -> str:
    """The name to look a GPU up by in the datasheet table: as CUDA reports it, as the table lists it, or the one row
    whose words include the given ones ("4090" is RTX 4090; "h100" is H100, not H100 PCIe)."""
    if any(datasheet_peak(name, getattr(torch, dtype)) for dtype in ("bfloat16", "float16", "float32")):
        return name
    words = name.lower().split()
    exact = [key for key in PEAK_TFLOPS if key.lower().split() == words]
    matches = exact or [key for key in PEAK_TFLOPS if set(words) <= set(key.lower().split())]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"--gpu {name} could be {', '.join(matches)}; name one of them.")
    raise UserError(f"--gpu {name} is not in the datasheet table; use one of {', '.join(PEAK_TFLOPS)}, or pass "
                    "--tokens-per-sec.")


def gpu_hardware(name: str, dtype_setting: str) -> Hardware:
    """A datasheet GPU running the config's dtype (auto: bf16 where the GPU has it, else fp16)."""
    row = gpu_row(name)
    for dtype in ("bfloat16", "float16") if dtype_setting == "auto" else (dtype_setting,):
        found = datasheet_peak(row, getattr(torch, dtype))
        if found:
            return Hardware(found[1].removeprefix("datasheet "), Peak(found[0], dtype, found[1]), local=None)
    flops = peak_of(row, dtype_setting)
    return Hardware(row, Peak(flops, dtype_setting, f"datasheet {row} float32: {dtype_setting} emulated",
                              native=False), local=None)


def local_hardware(device_name: str, dtype_setting: str) -> Hardware:
    """This machine's device: a datasheet GPU, or anything else by a half-second matmul measurement."""
    device = resolve_device(device_name)
    dtype = autocast_dtype(device, dtype_setting)
    facts = machine(device)
    return Hardware(f"{device.type}: {facts['gpu'] or facts['cpu']}", peak_flops(device, dtype), local=facts)


# The settings besides the model's that make a step faster or slower: a run that shares them ran what a plan plans.
SPEED_SETTINGS = ("batch_size", "grad_accum_steps", "dtype", "compile", "optimizer", "threads", "parallel")


def mfu_from_runs(paths: list[Path], hardware: Hardware, cfg: RunConfig) -> tuple[float, float, str] | None:
    """The median MFU logged by a run of `paths` of the same config (`_same_config`) that trained on `hardware`, and the
    peak per device it is a share of: the first path before the others, then a finished run before one that stopped, the
    one of more steps before the newest; None without one. A run whose peak was measured without a load check is passed
    over: its MFU may be many times too high."""
    found = []
    datasheet = hardware.peak.source.startswith("datasheet")
    for order, path in enumerate(paths):
        try:
            start = RunDir(path).events(limit=1)
            trusted = start and start[0].get("event") == "start" and (datasheet or start[0].get("peak_quiet") is True)
            summary = trusted and hardware.ran(start[0]) and _same_config(path, cfg) and summarize(path)
        except UserError:  # a folder that cannot be read is no evidence (`lmlab runs` says what is wrong with it)
            continue
        if summary and summary.mfu:
            recorded, world = start[0].get("peak_flops"), start[0].get("world_size") or 1  # the job's: every rank's
            peak = recorded / world if recorded else hardware.peak.flops
            found.append((order == 0, summary.status == "finished", summary.steps,
                          (path / "metrics.jsonl").stat().st_mtime, summary.mfu, peak, path))
    if not found:
        return None
    *_, mfu, peak, path = max(found)
    return mfu, peak, f"the median of {path}, of this config, of the {peak / 1e12:.3g} TFLOP/s it recorded"


def _same_config(path: Path, cfg: RunConfig) -> bool:
    """Whether the run at `path` trained `cfg`'s model with its SPEED_SETTINGS."""
    try:
        ran = RunDir(path).config()
    except UserError:  # a folder whose config.toml cannot be read: not the same
        return False
    return ran.model == cfg.model and all(getattr(ran.train, k) == getattr(cfg.train, k) for k in SPEED_SETTINGS)


@dataclass
class Estimate:
    """Tokens/s without a measurement: a peak × an MFU ÷ the model's FLOPs per token."""

    hardware: Hardware
    mfu: float
    peak: float  # what the MFU is a share of: the hardware's, or that of the run the MFU came from
    mfu_source: str
    step: StepTime | None = None  # a datasheet GPU's step, part by part (gputime)

    def tokens_per_sec(self, model: LanguageModel) -> float:
        return self.mfu * self.peak / model.flops_per_token()


def estimate(hardware: Hardware, mfu: float | None, cfg: RunConfig, runs: list[Path]) -> Estimate:
    """At `mfu` of the hardware's peak, else at the MFU one of `runs` reached on it with `cfg`, else, for a datasheet
    GPU, at the MFU its step's parts give (`gputime`), else at DEFAULT_MFU."""
    if mfu:
        return Estimate(hardware, mfu, hardware.peak.flops, "--mfu")
    found = mfu_from_runs(runs, hardware, cfg)
    if found:
        return Estimate(hardware, *found)
    peak = hardware.peak
    row = hardware.name if hardware.local is None else peak.source.removeprefix("datasheet ")
    if row in PEAK_TFLOPS:  # a datasheet GPU, --gpu or this machine's
        compiled = cfg.train.compile is not False  # "auto" compiles on CUDA
        step = gpu_step_time(cfg, row, peak.dtype, compiled)
        implied = cfg.tokens_per_step / step.seconds * shape_of(cfg).flops_per_token() / peak.flops
        return Estimate(hardware, implied, peak.flops, assumed(row, peak.dtype, compiled), step)
    return Estimate(hardware, DEFAULT_MFU, peak.flops, "assumed; --mfu sets it")


def assumed(row: str, dtype: str, compiled: bool) -> str:
    """What the GPU time model's MFU assumes, for the plan's line."""
    how = "compiled (torch.compile; its compiling is in the wall time)" if compiled else "eager"
    return (f"the GPU time model's: a {how} {dtype} step, its matmuls at {100 * matmul_share(row):.0f}% of the "
            "datasheet peak; --mfu sets it")


def make_plan(cfg: RunConfig, rate: tuple[float, str], tokens: int | None = None, chinchilla: bool = False,
              split_tokens: int | None = None, step: StepTime | None = None, source: str = "--tokens") -> Plan:
    """The plan for `tokens` training tokens (`source` says whence; or Chinchilla's 20 per parameter, or the config's
    max_iters steps) at `rate`: tokens/s and where the figure came from; `split_tokens`, the train split's tokens, say
    how often it repeats its data; `step`, a GPU time model's step, adds its evaluations to the wall time."""
    model = shape_of(cfg)
    params = model.num_params()
    tokens_per_step = cfg.tokens_per_step
    if chinchilla:
        tokens, source = CHINCHILLA_TOKENS_PER_PARAM * params, "20 tokens per parameter (Chinchilla)"
    elif not tokens:
        tokens, source = cfg.train.max_iters * tokens_per_step, "train.max_iters x tokens per step"
    split_tokens = split_tokens or train_split_tokens(cfg)
    _, evaluations, compiling = (run_seconds(cfg, step, tokens / tokens_per_step, split_tokens) if step else
                                 (0.0, 0.0, 0.0))
    besides = (f"compiling ({format_duration(compiling)}) and evaluating ({format_duration(evaluations)})"
               if compiling else "evaluating")
    return Plan(params, model.num_params(embeddings=False), model.flops_per_token(), tokens_per_step, tokens, source,
                *rate, split_tokens, model.lookup_params(), model.padding_params(),
                model.attention_flops(), evaluations + compiling, besides)


def train_split_tokens(cfg: RunConfig) -> int | None:
    try:
        return read_meta(Path(cfg.data.dataset))["train"]["tokens"]
    except (UserError, KeyError, TypeError):
        return None


def shape_of(cfg: RunConfig) -> LanguageModel:
    """The config's model on the meta device: its parameters counted and FLOPs known, nothing allocated."""
    with torch.device("meta"):
        return build_model(with_vocab(cfg).model)


def compute_note(plan: Plan) -> str:
    """6·N·D beside lmlab's compute, with what makes them differ, in a sentence."""
    change = plan.six_nd / plan.flops - 1
    lookup = f" (the {plan.lookup_params:,} of lookup-only tables among them)" if plan.lookup_params else ""
    padding = f" (with the {plan.padding_params:,} of vocabulary padding rows)" if plan.padding_params else ""
    return (f"6·N·D counts all {plan.params:,} parameters{lookup} and no attention; lmlab counts 6 × the "
            f"{plan.params + plan.padding_params - plan.lookup_params:,} weights that multiply each token{padding} "
            f"plus attention's {plan.attention_flops:,.0f} FLOPs per token (PaLM's formula): 6·N·D is "
            f"{100 * abs(change):.1f}% {'above' if change >= 0 else 'below'} it.")
