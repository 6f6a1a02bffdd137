"""How long a training step takes on a datasheet GPU, before one is at hand (`lmlab plan --gpu`). FLOPs at a peak × an
MFU say it for a large model; a small one is bound by what FLOPs leave out, so a step is its parts (`StepTime`: matmuls,
memory traffic, a recurrence's serial steps, the optimizer, the batch's copy, and the host's time, its kernel launches
and Python, which the GPU waits for when its own work is shorter), counted from the model itself on the meta device
(`trace`) and from the optimizer's update on the CPU (`tail`).
docs/reference/performance.md (the time model) says where each constant comes from and the runs it is held to."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmlab.core.config import ModelConfig, RunConfig, TrainConfig
from lmlab.core.device import PEAK_TFLOPS, datasheet_peak
from lmlab.core.errors import UserError
from lmlab.core.machine import no_graphs
from lmlab.model import build_model
from lmlab.train.optim import optimizer_of

# The share of the datasheet peak a training step's matmuls reach, by datasheet row or family.
MATMUL_SHARE = {"default": 0.5, "RTX": 0.4, "T4": 0.4, "L4": 0.4}
BANDWIDTH_SHARE = 0.7  # of the datasheet bandwidth, that streaming kernels of a few MB reach
LAUNCH_SECONDS = 7e-6  # host time per kernel an eager step launches: Python, PyTorch's dispatch, the launch itself
VIEW_SECONDS = 1.5e-6  # host time per op that launches nothing (a view, a transpose)
# Host time per kernel of a compiled step, all of the step's Python spread over them (Dynamo's guards, AOTAutograd's
# and Inductor's wrappers, the autograd engine, the eager optimizer around the graph): fitted on the H100/H200 rows of
# docs/reference/performance.md, where the Shakespeare recipe's host, not its GPU, sets the step (tests/test_gputime.py
# fits it again from those rows and holds this figure to the fit).
COMPILED_LAUNCH_SECONDS = 77e-6
# Host time of a block's call replayed as a CUDA graph (cudagraph trees' Python and one graph launch): a prior, not yet
# measured on a GPU.
REPLAY_SECONDS = 30e-6
RECURRENCE_SECONDS = 4e-6  # one time step of one cuDNN RNN layer: a kernel's latency, its GEMM being tiny
COMPILE_FUSION = 0.3  # under torch.compile, the kernels and bytes left of the elementwise ones (matmuls stay)
MIXED_BYTES = 0.75  # bytes under bf16/fp16 autocast per fp32 byte: matmul outputs halve, norms and loss stay fp32
OPTIMIZER_BYTES = 28  # per weight, fused AdamW: weight, gradient and two moments read, three written (fp32)
PCIE_BYTES_PER_SECOND = 12e9  # a pinned batch's copy to the device
# torch.compile's time: a graph's fixed part and a part per node, paid by the first call of each graph.
COMPILE_GRAPH_SECONDS = 11.0
COMPILE_NODE_SECONDS = 0.015
# A GPU's link to its peers, GB/s each way (NVLink on SXM parts, else PCIe); NCCL's ring reaches LINK_SHARE of it.
LINK_GBS = {"H100": 450, "H200": 450, "GH200": 450, "A100": 300, "V100": 150, "H100 PCIe": 64}
PCIE_GBS = 32
LINK_SHARE = 0.8
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket: the last one's all-reduce starts when the backward ends
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "convolution_backward"}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach"}
COUNTED = ("launches", "matmuls", "views", "bytes")  # a `Trace`'s figures of the forward, and of the step


@dataclass(frozen=True)
class Trace:
    """What one sequence of block_size tokens costs a step besides its FLOPs, forward and backward (`step_`) or forward
    only (`forward_`)."""

    step_launches: float
    step_matmuls: float
    step_views: float
    step_bytes: float
    forward_launches: float
    forward_matmuls: float
    forward_views: float
    forward_bytes: float
    serial: float  # time steps an RNN layer takes one after another, forward and backward, summed over its layers


class _Count(TorchDispatchMode):
    """Counts the ops PyTorch dispatches: kernels (matmuls apart), ops that launch none, and the bytes the kernels
    that are not matmuls read and write."""

    def __init__(self):
        super().__init__()
        self.launches = self.matmuls = self.views = self.bytes = self.serial = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE:
            return out
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            self.views += 1  # a view: metadata, no kernel
        elif name in MATMULS:
            self.launches, self.matmuls = self.launches + 1, self.matmuls + 1
        else:
            self.launches += 1
            self.bytes += _bytes(tree_leaves((args, kwargs, out)))
        return out


def _bytes(values: list) -> int:
    """The bytes of the tensors among `values`."""
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


class _Fused(torch.autograd.Function):
    """A fused kernel (attention, a cuDNN RNN) as the GPU runs it: one launch forward, two backward, moving its
    inputs and outputs; `shapes` are its outputs'. The meta device would run its reference ops instead. The empty
    tensors it makes stand for its outputs and gradients are not counted: new_empty is one of FREE."""

    @staticmethod
    def forward(ctx, count: _Count, serial: float, shapes: tuple, *inputs: torch.Tensor):  # noqa: ANN001, ANN205
        ctx.count, ctx.serial, ctx.shapes = count, serial, [t.shape for t in inputs]
        outs = tuple(inputs[0].new_empty(shape) for shape in shapes)
        ctx.moved = _bytes([*inputs, *outs])
        count.launches, count.bytes, count.serial = count.launches + 1, count.bytes + ctx.moved, count.serial + serial
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # noqa: ANN001, ANN205
        count = ctx.count
        count.launches, count.bytes, count.serial = count.launches + 2, count.bytes + 2 * ctx.moved, \
            count.serial + 2 * ctx.serial
        return (None, None, None, *(grads[0].new_empty(shape) for shape in ctx.shapes))


class _AsOnGpu(TorchFunctionMode):
    """Runs attention and cuDNN's RNNs as the GPU's fused kernels (`_Fused`), for `_Count`."""

    def __init__(self, count: _Count):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _Fused.apply(self.count, 0.0, (q.shape[:-1] + v.shape[-1:],), q, k, v)[0]
        if getattr(func, "__name__", "") in ("gru", "lstm") and len(args) == 9:  # (input, hx, weights, ...)
            x, hx, weights, _, layers, _, _, bidirectional, batch_first = args
            states = [h.shape for h in (hx if isinstance(hx, (list, tuple)) else [hx])]  # h, or h and c
            steps = x.shape[1 if batch_first else 0] * layers * (1 + bidirectional)
            out = x.shape[:-1] + (states[0][-1] * (1 + bidirectional),)
            return _Fused.apply(self.count, float(steps), (out, *states), x, *weights)  # (output, h) or (output, h, c)
        return func(*args, **(kwargs or {}))


def _counted(config: ModelConfig) -> dict[str, float]:
    """The `Trace` of one sequence through a model of `config`, its layers as they are."""
    with torch.device("meta"):
        model = build_model(config)
        x = torch.zeros(1, config.block_size, dtype=torch.long)
        count = _Count()
        with _AsOnGpu(count), count:
            _, loss = model(x, x)
            forward = {f"forward_{k}": getattr(count, k) for k in COUNTED}
            loss.backward()
    return {**forward, **{f"step_{k}": getattr(count, k) for k in COUNTED}, "serial": count.serial}


def trace(config: ModelConfig) -> Trace:
    """The model's `Trace`, from models of one and two layers (every layer alike) run on the meta device."""
    return _trace(json.dumps(dataclasses.asdict(config), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _trace(key: str) -> Trace:
    config = ModelConfig(**json.loads(key))
    one, two = (_counted(dataclasses.replace(config, n_layer=n)) for n in (1, 2))
    return Trace(**{k: one[k] + (config.n_layer - 1) * (two[k] - one[k]) for k in one})


def tail(model: ModelConfig, train: TrainConfig) -> float:
    """The kernels a training step launches after its backward, as `train.step` runs them on a GPU (the gradients'
    norm and clipping, the non-finite check, the optimizer's update and zeroing the gradients), for `train`'s
    optimizer over the parameters of `model`, counted on the CPU over parameters of a few elements each (what an
    update dispatches depends on their number and shapes' rank, not their size)."""
    return _tail(json.dumps([dataclasses.asdict(model), train.optimizer, train.grad_clip], sort_keys=True))


@functools.lru_cache(maxsize=16)
def _tail(key: str) -> float:
    model_fields, optimizer, clip = json.loads(key)
    with torch.device("meta"):
        model = build_model(ModelConfig(**model_fields))
    tiny: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():  # a tied weight stays one parameter
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = tiny.setdefault(id(p), torch.nn.Parameter(torch.ones((2,) * p.dim())))
    params = list(tiny.values())
    cfg = TrainConfig(optimizer=optimizer, grad_clip=clip)
    update = optimizer_of(cfg).build(model, cfg, torch.device("cpu"))
    for _ in range(2):  # the first update makes the optimizer's state: the second is every later step's
        grads = [torch.zeros_like(p) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        with _Count() as count:  # clip_grad_norm_'s path on CUDA: one norm over all the gradients, one scaling
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, ((clip or math.inf) / (norm + 1e-6)).clamp(max=1.0))
            # the non-finite check of the micro-batches' summed loss and of the norm
            update.found_inf = (~(torch.isfinite(torch.zeros(())) & torch.isfinite(norm))).float()
            update.step()
            update.zero_grad(set_to_none=True)
    return count.launches


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step's parts on one GPU (of several, where they train together), of one evaluation,
    and of compiling, once a run."""

    matmuls: float
    memory: float
    recurrence: float
    optimizer: float
    copy: float
    launches: float  # the host's
    kernels: int  # launched per step
    evaluation: float  # one evaluation: eval_iters batches of each split, forward only, shared by the GPUs
    allreduce: float = 0.0  # the gradients' all-reduce past the backward's end, on several GPUs
    compile: float = 0.0  # torch.compile's first calls: a block's training graph and its evaluation's
    graphs: bool = False  # its blocks replayed as CUDA graphs (lmlab.core.machine's rule)
    why_not: str = ""  # why they are not

    @property
    def device(self) -> float:
        return self.matmuls + self.memory + self.recurrence + self.optimizer + self.copy + self.allreduce

    @property
    def seconds(self) -> float:
        """The host launches while the GPU computes (no step reads the device: tests/test_host_sync.py): the longer
        of the two."""
        return max(self.device, self.launches)

    def dominant(self) -> str:
        if self.launches >= self.device:
            return "the host"
        parts = {"matmuls": self.matmuls, "memory traffic": self.memory, "the recurrence": self.recurrence,
                 "the optimizer": self.optimizer, "the all-reduce": self.allreduce}
        return max(parts, key=parts.__getitem__)

    def describe(self) -> str:
        """E.g. `bound by the host: 2,506 launches in 19.0 ms (Python and launching), the GPU's work takes 16.2 ms
        (...)`."""
        parts = {"matmuls": self.matmuls, "memory traffic": self.memory, "recurrence": self.recurrence,
                 "optimizer": self.optimizer, "batch copy": self.copy, "all-reduce": self.allreduce}
        work = ", ".join(f"{name} {1000 * value:,.1f}" for name, value in parts.items() if value >= 5e-5)
        launched = (f"its blocks replayed as CUDA graphs, {1000 * self.launches:,.1f} ms of the host's" if self.graphs
                    else f"{self.kernels:,} launches in {1000 * self.launches:,.1f} ms (Python and launching" +
                    (f"; no CUDA graphs: {self.why_not.removeprefix('rule: ')}" if self.why_not else "") + ")")
        return f"bound by {self.dominant()}: {launched}, the GPU's work takes {1000 * self.device:,.1f} ms ({work})"


def matmul_share(row: str) -> float:
    """`MATMUL_SHARE` of a datasheet row: its own, else its family's (GeForce `RTX` cards), else the default."""
    return MATMUL_SHARE.get(row) or MATMUL_SHARE.get(row.split()[0] if row.startswith("RTX ") and
                                                     "A6000" not in row and "Ada" not in row else "",
                                                     MATMUL_SHARE["default"])


def peak_of(row: str, dtype: str) -> float:
    """The datasheet peak of `row` in `dtype`: bf16 on a GPU without it runs at the fp32 rate (emulated)."""
    found = datasheet_peak(row, getattr(torch, dtype)) or datasheet_peak(row, torch.float32)
    assert found is not None, f"the datasheet row {row} has an fp32 peak"
    return found[0]


def compile_seconds(found: Trace, blocks: int, graphs: bool) -> float:
    """torch.compile's time for a model of this trace compiled block by block (lmlab.train.compiled: the `blocks`
    replay one block's graph): a block's training graph, its evaluation's (which Dynamo compiles again) and, with CUDA
    graphs, its training graph again as CUDA graphs."""
    nodes = (found.step_launches + found.step_views + found.forward_launches + found.forward_views) / max(1, blocks)
    return (2 + graphs) * COMPILE_GRAPH_SECONDS + COMPILE_NODE_SECONDS * nodes


def allreduce_seconds(row: str, params: int, gpus: int, backward: float) -> float:
    """The seconds a step waits for DDP's all-reduce of the fp32 gradients of `params` weights over `gpus` GPUs: all but
    the last bucket hides behind the `backward` seconds."""
    if gpus < 2:
        return 0.0
    ring = 2 * (gpus - 1) / gpus / (LINK_GBS.get(row, PCIE_GBS) * 1e9 * LINK_SHARE)
    gradients = 4 * params
    return max(gradients * ring - backward, min(gradients, DDP_BUCKET_BYTES) * ring)


def gpu_step_time(cfg: RunConfig, row: str, dtype: str, compiled: bool, gpus: int = 1) -> StepTime:
    """One optimizer step of `cfg` on the datasheet GPU `row` (a key of PEAK_TFLOPS), one of `gpus` under DDP, in
    autocast `dtype`, compiled or eager, its blocks replayed as CUDA graphs where the machine's rule says; one
    evaluation; and compiling."""
    assert row in PEAK_TFLOPS, row
    tc, mc = cfg.train, cfg.model
    with torch.device("meta"):
        model = build_model(mc)
    found = trace(mc)
    flops = peak_of(row, dtype) * matmul_share(row)
    bandwidth = PEAK_TFLOPS[row]["GB/s"] * 1e9 * BANDWIDTH_SHARE
    scale = (MIXED_BYTES if dtype != "float32" else 1.0) * (COMPILE_FUSION if compiled else 1.0)

    def kernels(launches: float, matmuls: float) -> float:
        return matmuls + (launches - matmuls) * (COMPILE_FUSION if compiled else 1.0)

    per_kernel = COMPILED_LAUNCH_SECONDS if compiled else LAUNCH_SECONDS

    def host(launches: float, matmuls: float, views: float) -> float:
        return kernels(launches, matmuls) * per_kernel + (0 if compiled else views * VIEW_SECONDS)

    tokens, steps, blocks = tc.batch_size * mc.block_size, tc.grad_accum_steps, len(model.shard_units())
    at_peak = steps * model.flops_per_token() * tokens / peak_of(row, dtype)
    why = no_graphs("cuda", compiled, gpus == 1, steps, at_peak, model.graphs)
    replays = None if why else 2 * max(1, blocks) * REPLAY_SECONDS  # a block's forward and backward, each a graph
    micro = (model.flops_per_token() * tokens / flops, found.step_bytes * tc.batch_size * scale / bandwidth,
             found.serial * RECURRENCE_SECONDS,
             replays or host(found.step_launches, found.step_matmuls, found.step_views))
    params = sum(p.numel() for p in model.parameters())
    after = tail(mc, tc)
    forward = max(micro[0] / 3 + found.forward_bytes * tc.batch_size * scale / bandwidth + micro[2] / 3,
                  host(found.forward_launches, found.forward_matmuls, found.forward_views))
    copy = 2 * tokens * 8 / PCIE_BYTES_PER_SECOND
    # the all-reduce overlaps the last micro-batch's backward
    return StepTime(steps * micro[0], steps * micro[1], steps * micro[2], params * OPTIMIZER_BYTES / bandwidth,
                    steps * copy, steps * micro[3] + after * per_kernel,
                    round(steps * kernels(found.step_launches, found.step_matmuls) + after),
                    2 * math.ceil(tc.eval_iters / gpus) * (forward + copy / 2),
                    allreduce_seconds(row, params, gpus, 2 / 3 * (micro[0] + micro[1] + micro[2])),
                    compile_seconds(found, blocks, replays is not None) if compiled else 0.0,
                    replays is not None, why or "")


def run_seconds(cfg: RunConfig, step: StepTime, steps: float, split_tokens: int | None) -> tuple[float, float, float]:
    """Seconds of `steps` optimizer steps, of the evaluations among them and of compiling; `split_tokens`, the train
    split's, place the evaluations of an eval_interval in passes."""
    tc = cfg.train
    if tc.passes_per_eval is not None and not split_tokens:
        raise UserError(f"train.eval_interval {tc.eval_interval!r} counts passes over the train split, which is not "
                        f"prepared here ({cfg.data.dataset}); prepare it, or give the interval in steps.")
    interval = cfg.intervals(split_tokens or 0)[0]
    return steps * step.seconds, math.ceil(steps / interval) * step.evaluation, step.compile
