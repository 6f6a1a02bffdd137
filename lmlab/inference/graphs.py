"""The decode step replayed as a CUDA graph: one graph per (rows, live length) bucket of the decoder (rows padded up to
a power of two, `decode.row_bucket`; lengths by `decode.live_length`), captured from the eager step in milliseconds
over the decoder's own state, whose tensors never move. A replay is one launch where the eager step launches a few
hundred small kernels and waits on the host between them, which is what bounds decoding a small model on a GPU.

How a bucket is captured is a `Capture`: `cuda_graph` on a GPU; `recorded`, its twin on the CPU, which replays the
eager step into the same static buffers (so the buffer discipline is tested where no GPU is); `compiled`, torch.compile
per bucket (mode="reduce-overhead" on a GPU, every state tensor marked static). Each is warmed up on a copy of the
bucket's state, at its shape, before it captures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from lmlab.inference.decode import step_logits
from lmlab.model import LanguageModel
from lmlab.model.base import DecodeState

# One step over plain tensors: (idx, *state tensors) -> logits (rows, vocab), the state updated in place.
Body = Callable[..., torch.Tensor]
Run = Callable[[], torch.Tensor]
# Makes a bucket's replay: given the body, its static arguments and a warm-up run on copies of them; the replay runs
# one step over the static arguments and returns the static output.
Capture = Callable[[Body, tuple[torch.Tensor, ...], Run], Run]


def cuda_graph() -> Capture:
    """Capture on CUDA, every bucket's graph in one memory pool (buckets never run at once). A capture that fails is
    ended and its hold on the pool let go before the error goes on (`abandon`), so the thread, its stream and the
    allocator are as they were and eager decoding can go on."""
    shared = torch.cuda.graph_pool_handle()

    def capture(body: Body, args: tuple[torch.Tensor, ...], warm: Run) -> Run:
        side = torch.cuda.Stream()  # warmed and captured on a side stream, as capture needs
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):  # whose exit gives the thread its stream back, however the capture ends
            warm()  # cuBLAS's handles and workspaces, lazy inits: at the bucket's own shape, before capture
            torch.cuda.synchronize()
            try:
                # thread_local: the server's other threads may touch CUDA while this one captures
                graph.capture_begin(shared, capture_error_mode="thread_local")
                out = body(*args)
                graph.capture_end()
            except BaseException:
                abandon(graph, shared)
                raise
        torch.cuda.current_stream().wait_stream(side)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


def abandon(graph: torch.cuda.CUDAGraph, pool: tuple[int, int]) -> None:
    """End a capture into `pool` that failed: the stream's capture ended (where `capture_end` completes it, the graph
    holds the pool as any graph does, until it is let go); else the allocator's recording to the pool ended (which
    `capture_end` skips when the capture was invalidated) and the capture's hold on it released."""
    try:
        graph.capture_end()
        return
    except RuntimeError:
        pass
    device = torch.cuda.current_device()
    with contextlib.suppress(RuntimeError):  # ended already, where capture_end failed after it
        torch._C._cuda_endAllocateToPool(device, pool)
    torch._C._cuda_releasePool(device, pool)


def recorded(body: Body, args: tuple[torch.Tensor, ...], warm: Run) -> Run:
    """The CPU's twin of `cuda_graph`: capturing runs nothing on the real state (as recording a graph runs nothing),
    and a replay runs the step over the same static arguments into the same output buffer."""
    warm()
    out: list[torch.Tensor] = []

    def replay() -> torch.Tensor:
        logits = body(*args)
        if not out:
            out.append(logits)
        return out[0].copy_(logits)

    return replay


def compiled(**options: object) -> Capture:
    """torch.compile per bucket (fullgraph, static shapes: each bucket compiles once and never again) with every state
    tensor's address marked static, so that mode="reduce-overhead" records a CUDA graph rather than skip one."""

    def capture(body: Body, args: tuple[torch.Tensor, ...], warm: Run) -> Run:
        for tensor in args[1:]:
            torch._dynamo.mark_static_address(tensor)
        step = torch.compile(body, fullgraph=True, dynamic=False, **options)  # type: ignore[call-overload]
        # A bucket is a shape of the same code: one compile each, however many buckets there are.
        first = [torch._dynamo.config.patch(recompile_limit=1 << 16)]

        def replay() -> torch.Tensor:
            with first.pop() if first else contextlib.nullcontext():
                return step(*args)

        return replay

    return capture


class GraphStep:
    """The decode step of `model` replayed per bucket (`bucketed`: lmlab.inference.decode.Decoder); a bucket is captured
    the first time the decoder steps in it, over that bucket's view of the decoder's state, by a capture `captures`
    makes (a new one, with a pool of its own, for each decoder's state). The logits returned are the bucket's static
    output: read them before the next step."""

    bucketed = True

    def __init__(self, model: LanguageModel, dtype: torch.dtype, captures: Callable[[], Capture]):
        self.model, self.dtype, self.captures = model, dtype, captures
        # by id of the state view the decoder keeps per bucket (the view held, so the id is never reused)
        self.buckets: dict[int, tuple[DecodeState, torch.Tensor, Run]] = {}

    def __call__(self, idx: torch.Tensor, state: DecodeState) -> torch.Tensor:
        if id(state) not in self.buckets:
            if not self.buckets or _storage(next(iter(self.buckets.values()))[0]) != _storage(state):
                # The first decoder's state, or another's: the old one's graphs and their pool go. A pool all of whose
                # graphs went is freed, and a capture must not name it again: each state's graphs get a pool of their
                # own.
                self.buckets.clear()
                self.capture = self.captures()
            self.buckets[id(state)] = self._capture(idx, state)
        _, static, replay = self.buckets[id(state)]
        static.copy_(idx)
        return replay()

    def _capture(self, idx: torch.Tensor, state: DecodeState) -> tuple[DecodeState, torch.Tensor, Run]:
        kind, static = type(state), idx.clone()

        def body(ids: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            # autocast's cache of cast weights off: a graph must not read a cast made outside it
            return step_logits(self.model, self.dtype, ids, kind.over(tensors), cache_enabled=False)

        # The warm-up runs on a copy of the bucket: the real state moves only when a replay runs.
        return state, static, self.capture(body, (static, *state.tensors()),
                                           lambda: body(static.clone(), *(t.clone() for t in state.tensors())))


def _storage(state: DecodeState) -> int:
    return state.pos.untyped_storage().data_ptr()
