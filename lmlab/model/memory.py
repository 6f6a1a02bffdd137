"""What a size costs in memory, estimated on the meta device, and the one check every size-driven allocation passes,
so a size that does not fit is refused with the largest that does before anything is allocated. On CUDA only decoding
rows are checked: a training step's estimate is fp32's, which autocast changes, so it only bounds how far a CUDA
run's micro-batch grows (`fit_micro_batch`).

Estimates are kept between processes (`remembered`): sizing a model on the meta device runs its forward there, which
makes torch import its compiler stack (torch._dynamo, sympy: 2 to 6 s on 2 cores) at every start of `train`, `eval`,
`sample` and `serve`. An estimate depends only on the model's config, the size asked about, torch and lmlab's model
code, so it is kept, keyed by all of them, in the machine cache (lmlab.core.cache) and measured again only when one
changes. A plugin kind is measured every time (its code is not lmlab's)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lmlab.core import cache as machine_cache
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.errors import UserError
from lmlab.core.fileio import host_memory, human_bytes
from lmlab.core.plugin_kinds import BUILT_IN_KINDS
from lmlab.model.base import LanguageModel
from lmlab.model.gpt import padded_vocab
from lmlab.model.kinds import construct
from lmlab.model.loss import chunked

BACKWARD_FACTOR = 1.3  # a training step's peak over the activations its forward keeps (run-folder.md)
DECODE_ROW_OVERHEAD = 2048  # bytes of Python objects per decoding row: its sequence, sampler state, text
BYTES_PER_DECODED_TOKEN = 40  # a token id in a row's Python list and its text, as held while decoding
# The share of a GPU's free memory left to CUDA's workspaces, which grow at first use, and fragmentation.
DECODE_HEADROOM = 0.1
UNCOUNTABLE = 2**63  # what a shape whose size overflows even the meta device's arithmetic is taken to need
# A prefill's peak as a share of `layer_kept_bytes`, by dtype (benchmarks/prefill_memory.py, run-folder.md).
PREFILL_SHARE = {torch.float32: 1.25, torch.bfloat16: 0.5, torch.float16: 0.5}


@cache
def model_code() -> str:
    """A digest of lmlab's model code (and torch's version), which its memory estimates and step timings are of."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def remembered(what: str, config: ModelConfig, measure: Callable[[], list[int]],
               extra: tuple = ()) -> list[int]:
    """`measure()`, the bytes of `what` for `config` and `extra` (a dtype): from the cache when it holds them,
    else measured and kept."""
    if config.kind not in BUILT_IN_KINDS:  # a plugin's code is not lmlab's: measured every time
        return measure()
    key = [what, dataclasses.asdict(config), [str(e) for e in extra], model_code()]
    kept = machine_cache.recall("memory", key, _not_bytes)
    if kept is not None:
        return kept
    value = measure()
    machine_cache.keep("memory", key, value)
    return value


def _not_bytes(kept: Any) -> str | None:
    """What in a kept estimate no count of bytes is (lmlab.core.cache.recall); None where nothing."""
    counts = isinstance(kept, list) and all(type(n) is int and 0 <= n < 2**63 for n in kept)
    return None if counts else "an estimate that is not counts of bytes"


class NoInit(TorchFunctionMode):
    """Skips weight initialisation, which a meta shape does not need and which is the slowest part of building it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        if getattr(func, "__module__", "") == "torch.nn.init":
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **kwargs)


def on_meta(config: ModelConfig) -> LanguageModel:
    """A model of `config` as a shape: on the meta device, which allocates nothing, uninitialised."""
    with torch.device("meta"), NoInit():
        return construct(config)


def _per_layer(config: ModelConfig, measure, whole: bool = True) -> int:  # noqa: ANN001 (config -> int)
    """measure() of the whole model (or, not `whole`, what one layer adds), from models of one and two layers;
    UNCOUNTABLE for a shape too large."""
    try:
        one, two = (measure(dataclasses.replace(config, n_layer=n)) for n in (1, 2))
    except (RuntimeError, OverflowError, ValueError):  # "Storage size calculation overflowed", an int beyond int64
        return UNCOUNTABLE
    return one + (config.n_layer - 1) * (two - one) if whole else two - one


def _weight_bytes(config: ModelConfig) -> int:
    model = on_meta(config)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def model_bytes(config: ModelConfig) -> int:
    """Bytes of the weights and buffers a model of `config` holds."""
    return remembered("weights", config, lambda: [_per_layer(config, _weight_bytes)])[0]


def _kept_at(config: ModelConfig, T: int) -> int:
    """Bytes the forward of one sequence of T tokens keeps for the backward (fp32), weights and scores left out,
    as the fused kernels keep no T x T scores."""
    model = on_meta(config)
    weights = {id(p) for p in model.parameters()}
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        scores = t.dim() >= 2 and t.shape[-1] == t.shape[-2] == T
        if id(t) not in weights and (t._base is None or id(t._base) not in weights) and not scores:
            kept[0] += t.numel() * t.element_size()
        return t

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = torch.zeros(1, T, dtype=torch.long)
        model(x, x)
    return kept[0]


def _kept_bytes(config: ModelConfig) -> int:
    """What one sequence of block_size tokens keeps: linear in its length, so traced at two short lengths other than
    the head width (a score matrix's shape must not be mistaken for it)."""
    T = config.block_size
    short = [t for t in range(7, 16) if t != config.head_size][:2]
    if T <= short[1]:
        return _kept_at(config, T)
    a, b = (_kept_at(config, t) for t in short)
    return a + (T - short[0]) * (b - a) // (short[1] - short[0])


def layer_kept_bytes(config: ModelConfig) -> int:
    """What one layer's forward keeps for the backward over block_size tokens (fp32); UNCOUNTABLE if too large."""
    return _per_layer(config, _kept_bytes, whole=False)


def prefill_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """The most a prompt's prefill holds beyond the weights and the decode state."""
    kept = remembered("prefill", config, lambda: [layer_kept_bytes(config)])[0]
    return min(int(PREFILL_SHARE[dtype] * kept), UNCOUNTABLE)


def _hidden_bytes(config: ModelConfig) -> int:
    return sum(p.numel() * p.element_size() for p in on_meta(config).hidden_matrices())


@dataclass(frozen=True)
class Need:
    """Memory as `fixed` bytes plus `each` bytes per unit of a size (a sequence, a window, a decoding row)."""

    fixed: int
    each: int

    def at(self, size: int) -> int:
        return self.fixed + size * self.each

    def largest(self, have: int) -> int:
        return max(0, (have - self.fixed) // max(1, self.each))


StateBytes = Callable[[int, int], int]  # an optimizer's state for weights of N bytes, M of them hidden matrices


def two_moments(weights: int, hidden: int) -> int:
    return 2 * weights


def training_need(config: ModelConfig, state_bytes: StateBytes = two_moments) -> Need:
    """A training step per sequence of block_size tokens; `state_bytes` sizes the optimizer's state. What is measured
    is kept between processes (`remembered`), as the meta forward imports torch's compiler stack."""
    weights = model_bytes(config)
    hidden, kept = remembered("training", config, lambda: [_per_layer(config, _hidden_bytes),
                                                           _per_layer(config, _kept_bytes)])
    moments = state_bytes(weights, hidden)
    head = padded_vocab(config.vocab_size) * config.n_embd * 4
    logits = config.block_size * padded_vocab(config.vocab_size) * 4
    # lmlab.model.loss.ChunkedHeadLoss keeps the gradient of the head's weight, traced once among a sequence's kept
    # tensors but held once a micro-batch; a chunk's fp32 logits and their bf16 gradient pass while it runs, counted
    # per sequence: exact up to the chunk's bound (CHUNK_BYTES), more than they take beyond it
    held = head if config.kind in BUILT_IN_KINDS and chunked(config.vocab_size) else 0
    each = int(BACKWARD_FACTOR * (kept - held)) + (3 * logits // 2 if held else 2 * logits)
    return Need(weights + weights + moments + held, min(each, UNCOUNTABLE))


def scoring_need(config: ModelConfig) -> Need:
    """A forward without gradients per window of block_size tokens (an evaluation batch)."""
    logits = config.block_size * padded_vocab(config.vocab_size) * 4
    kept = remembered("scoring", config, lambda: [_per_layer(config, _kept_bytes)])[0]
    return Need(model_bytes(config), min(2 * logits + 2 * (kept // max(1, config.n_layer)), UNCOUNTABLE))


def decoding_need(config: ModelConfig, dtype: torch.dtype, tokens_per_row: int,
                  state_dtype: torch.dtype | None = None) -> Need:
    """Decoding rows of up to `tokens_per_row` tokens each (prompt and continuation), beside the weights (in memory
    already): one prompt's prefill and each row; `state_dtype` is the decode state's where it is not `dtype`
    (lmlab.inference.quantize.state_dtype)."""
    held = state_dtype or dtype

    def state_bytes(c: ModelConfig) -> int:
        with torch.device("meta"):
            state = on_meta(c).new_cache(1, torch.device("meta"), held)
        # without a state each step feeds the row's window whole: an upper bound
        return _kept_bytes(c) if state is None else sum(t.numel() * t.element_size() for t in state.tensors())

    vocab = padded_vocab(config.vocab_size)
    state = remembered("decode state", config, lambda: [_per_layer(config, state_bytes)], (held,))[0]
    each = state + 20 * vocab + DECODE_ROW_OVERHEAD + BYTES_PER_DECODED_TOKEN * tokens_per_row
    return Need(prefill_bytes(config, dtype), min(each, UNCOUNTABLE))


class MemoryRefused(UserError):
    """A size refused before anything was allocated; `largest` is the largest that fits."""

    def __init__(self, message: str, largest: int):
        super().__init__(message)
        self.largest = largest


def device_memory(device: torch.device | None) -> tuple[int, str]:
    """The bytes free for new tensors on `device` now (on CUDA, with what the allocator holds unused), and a phrase
    saying so."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        name = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        return free + held, f"the GPU ({name}) has {human_bytes(free + held)} free"
    have = host_memory()
    return have, f"this machine has {human_bytes(have)} of memory available"


def check_fits(need: Need, size: int, setting: str, unit: str, device: torch.device | None = None,
               have: int | None = None, available: str | None = None) -> None:
    """Refuse `size` units (`setting` names it, `unit` says what one is) when `need` at that size is more than
    `have` bytes (default `device_memory(device)`; `available` says it in words)."""
    if have is None:
        have, available = device_memory(device)
    elif available is None:
        available = f"this machine has {human_bytes(have)} of memory available"
    total = need.at(size)
    if total <= have:
        return
    if need.fixed >= UNCOUNTABLE or need.each >= UNCOUNTABLE:
        raise MemoryRefused(f"{setting} {size:,} needs more memory than can be counted (the model or its {unit} "
                            f"is that large), but {available}; use a smaller model.", 0)
    largest = need.largest(have)
    if not largest:
        raise MemoryRefused(f"the model alone needs about {human_bytes(need.fixed + need.each)} with one {unit} "
                            f"({human_bytes(need.fixed)} before it), but {available}; use a smaller model or a "
                            "shorter block_size.", 0)
    parts = f"{human_bytes(need.fixed)} for the model and " if need.fixed else ""
    raise MemoryRefused(f"{setting} {size:,} needs about {human_bytes(total)} ({parts}{human_bytes(need.each)} per "
                        f"{unit}), but {available}; the largest that fits is {largest:,}: set {setting} to "
                        f"{largest:,} or less.", largest)


def check_training(config: ModelConfig, batch_size: int, state_bytes: StateBytes, device: torch.device,
                   processes: int = 1, setting: str = "train.batch_size") -> None:
    """Refuse a micro-batch that would not fit this machine's memory (shared by `processes`); on CUDA the allocator
    checks instead."""
    if device.type == "cuda":
        return
    check_fits(training_need(config, state_bytes), batch_size, setting, f"sequence of {config.block_size:,} tokens",
               device, host_memory() // processes)


def fit_micro_batch(model: ModelConfig, train: TrainConfig, state_bytes: StateBytes, device: torch.device,
                    world_size: int, say: Callable[[str], object]) -> TrainConfig:
    """`train` with `train.micro_batch = "auto"` on CUDA resolved: the largest micro-batch, `train.batch_size` times a
    power of two, that divides the sequences a process computes for an optimizer step and that the GPU's free memory
    holds by this module's estimate, less DECODE_HEADROOM; and as many micro-batches accumulated as keep the
    optimizer step's batch (batch_size x grad_accum_steps, shared by `world_size` processes); set, as "set", so
    config.toml keeps what was chosen; a change is told to `say`. A CPU's and a set micro-batch come back as they
    are: a CPU gains nothing from a larger one, and its memory check refuses one that does not fit."""
    if train.micro_batch != "auto" or device.type != "cuda":
        return train
    have = int(device_memory(device)[0] * (1 - DECODE_HEADROOM))
    sequences = train.batch_size * train.grad_accum_steps // world_size
    need = training_need(model, state_bytes)
    micro = train.batch_size
    while sequences % (2 * micro) == 0 and need.at(2 * micro) <= have:
        micro *= 2
    fitted = dataclasses.replace(train, batch_size=micro, micro_batch="set",
                                 grad_accum_steps=train.grad_accum_steps * train.batch_size // micro)
    if micro != train.batch_size:
        say(f"micro-batch: {micro} x {fitted.grad_accum_steps} accumulated, for {train.batch_size} x "
            f"{train.grad_accum_steps} (train.micro_batch = \"auto\": the largest that {human_bytes(have)} of this "
            "GPU holds by lmlab's estimate)")
    return fitted


def check_decoding(config: ModelConfig, rows: int, tokens_per_row: int, setting: str, device: torch.device,
                   dtype: torch.dtype = torch.float32, state_dtype: torch.dtype | None = None) -> None:
    """Refuse `rows` decoding rows (their state in `state_dtype`, where not `dtype`) that would not fit, the weights in
    memory already: only a prompt's prefill comes on top."""
    have, available = device_memory(device)
    if device.type == "cuda":
        have = int(have * (1 - DECODE_HEADROOM))
        available += f" ({100 * DECODE_HEADROOM:.0f}% of it left for CUDA's workspaces and fragmentation)"
    check_fits(decoding_need(config, dtype, tokens_per_row, state_dtype), rows, setting,
               f"decoding row of up to {tokens_per_row:,} tokens", device, have, available)
