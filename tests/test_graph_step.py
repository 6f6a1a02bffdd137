"""The bucketed decode step a CUDA graph replays, tested on the CPU through its twin (`graphs.recorded`: replays into
the same static buffers) and torch.compile's eager backend: the step holds no op that waits on the device, the state's
tensors never move, each bucket compiles once, continuous batching through it decodes as eager does, and a step whose
first tokens are not eager's is not used."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.inference.decode import Decoder, Sequence, live_length, row_bucket
from lmlab.inference.graphs import GraphStep, compiled, recorded
from lmlab.inference.steps import build_step, choose_step
from lmlab.model import build_model

BASE = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50)
MODELS = {
    "gpt2-style": {},
    "bigram": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, bigram_buckets=64,
                   n_kv_head=2),
    "gru": dict(kind="recurrent"),
}


def model(name: str, block_size: int):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**BASE, block_size=block_size, **MODELS[name]))
    if getattr(m, "bigram", None) is not None:  # zeros at init, which would hide every pair
        torch.nn.init.normal_(m.bigram.weight)
    return m.eval()


def run(decoder: Decoder, lengths: list[int], each_step=lambda: None, seed: int = 0) -> list[list[int]]:
    """Sequences of `lengths` new tokens decoded through `decoder`, joining as rows free up (more than fit at once),
    every third one sampled; each one's tokens."""
    seqs = [Sequence([1 + i, 2, 3][:1 + i % 3], SamplingParams(max_new_tokens=n, temperature=0.8 * (i % 3 == 2),
                                                                seed=seed + i)) for i, n in enumerate(lengths)]
    waiting = list(seqs)
    while waiting or decoder.active:
        while waiting and decoder.free:
            decoder.join(waiting.pop(0))
        decoder.step()
        each_step()
        for seq in [s for s in decoder.active if s.exhausted]:
            decoder.leave(seq)
    return [seq.ids for seq in seqs]


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] * (name != "gpt2-style"))
                                  for name in MODELS])
def test_continuous_batching_through_the_bucketed_step_decodes_as_eager_does(name):
    m = model(name, 128)
    lengths = [140, 20, 70, 45]  # past the context; 3, 2 and 1 rows live, padded to 4, 2 and 1
    eager = run(Decoder(m, 4), lengths)
    step = GraphStep(m, torch.float32, lambda: recorded)
    assert run(Decoder(m, 4, step=step), lengths) == eager
    assert 4 <= len(step.buckets) <= 3 * 2  # one capture per (rows 1, 2, 4; length 64, 128) bucket at most


class Syncs(TorchDispatchMode):
    """Records each op that makes the host wait for the device or gives a shape only the data decides."""

    SYNCING = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
               "_unique2", "unique_consecutive", "unique_dim", "is_nonzero", "equal", "allclose", "repeat_interleave",
               "bincount", "histc", "_assert_async"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        indices = [i for a in args if isinstance(a, (list, tuple)) for i in a if isinstance(i, torch.Tensor)]
        if name in self.SYNCING or (name.startswith("index") and any(i.dtype == torch.bool for i in indices)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", MODELS)
def test_the_step_holds_no_op_that_waits_on_the_device(name):
    m = model(name, 128)
    decoder = Decoder(m, 4, step=GraphStep(m, torch.float32, lambda: recorded))
    for prompt in ([1, 2, 3], [4] * 70, [5]):  # the second past the first length bucket
        decoder.join(Sequence(prompt, SamplingParams(max_new_tokens=5, temperature=0)))
    inner = decoder.step_fn
    with Syncs() as syncs:
        decoder.step_fn = lambda idx, state: inner(idx, state)  # the step alone, not the token's one read after it
        for _ in range(2):  # captured, then replayed
            decoder.step()
    assert syncs.ops > 0 and syncs.seen == []


def test_a_sync_in_the_step_is_seen():
    with Syncs() as syncs:
        torch.ones(3).sum().item()
        torch.arange(4)[torch.arange(4) > 1]
    assert syncs.seen[0] == "_local_scalar_dense" and len(syncs.seen) >= 2


@pytest.mark.slow
def test_the_states_tensors_never_move_over_300_tokens_across_every_length_bucket():
    m = model("bigram", 256)
    decoder = Decoder(m, 3, step=GraphStep(m, torch.float32, lambda: recorded))
    layout = [(t.data_ptr(), t.stride(), t.shape) for t in decoder.state.tensors()]
    lengths, moved = set(), []

    def check():
        longest = max((s.pos for s in decoder.active), default=0)
        lengths.add(live_length(longest, 256))
        now = [(t.data_ptr(), t.stride(), t.shape) for t in decoder.state.tensors()]
        moved.extend(i for i, (a, b) in enumerate(zip(layout, now)) if a != b)

    run(decoder, [300, 40, 120, 60], check)
    assert lengths == {64, 128, 256} and moved == []
    # every bucket's view reads the decoder's own tensors
    bases = {t.data_ptr() for t in decoder.state.tensors()}
    for view, _, _ in decoder.step_fn.buckets.values():
        assert {t.data_ptr() for t in view.tensors()} == bases


@pytest.mark.slow
def test_each_bucket_compiles_once_and_never_again_over_500_tokens():
    m = model("bigram", 128)
    compiles = []

    def counting(gm, inputs):
        compiles.append(tuple(tuple(i.shape) for i in inputs if isinstance(i, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    step = GraphStep(m, torch.float32, lambda: compiled(backend=counting))
    decoder = Decoder(m, 4, step=step)
    tokens = run(decoder, [500, 60, 200, 130, 90])
    assert len(compiles) == len(set(compiles)) == len(step.buckets) >= 5  # no shape compiled twice
    assert tokens == run(Decoder(m, 4), [500, 60, 200, 130, 90])


def test_rows_are_padded_to_a_power_of_two_up_to_the_capacity():
    assert [row_bucket(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [row_bucket(n, 64) for n in (1, 3, 5, 9, 33, 64)] == [1, 4, 8, 16, 64, 64]


def test_every_device_chooses_its_step_in_one_place():
    gpt, gru = model("gpt2-style", 64), model("gru", 64)
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert choose_step(gpt, cuda, False).kind == choose_step(gpt, cuda, True).kind == "cuda graphs"
    # cuDNN's RNN, and a plugin that does not say its step may be recorded, decode eagerly by rule
    assert choose_step(gru, cuda, False).kind == "eager" and "cuDNN's RNN" in choose_step(gru, cuda, False).why
    assert (choose_step(gpt, cpu, True).kind, choose_step(gpt, cpu, False).kind) == ("compiled", "eager")
    assert choose_step(gpt, mps, True).kind == "eager"


def test_each_decoders_state_gets_a_capture_of_its_own_warmed_at_its_buckets_shape():
    """A pool all of whose graphs went (a new decoder's state clears them) is not named again: a new capture each
    state. And a bucket is warmed up on a copy of its own rows and length, the shape it then captures at."""
    m = model("gpt2-style", 128)
    made, warmed = [], []

    def captures():
        made.append(1)

        def capture(body, args, warm):
            warmed.append((tuple(warm().shape), tuple(args[0].shape)))
            return recorded(body, args, lambda: None)
        return capture

    step = GraphStep(m, torch.float32, captures)
    run(Decoder(m, 4, step=step), [20, 30, 10])
    first = len(made)
    run(Decoder(m, 2, step=step), [10, 5])  # another decoder's state: its buckets, and a capture, anew
    assert (first, len(made)) == (1, 2)
    assert warmed and all(out[0] == ids[0] for out, ids in warmed)  # as many rows as the bucket captures


def test_a_step_that_fails_its_check_is_not_used_and_says_why():
    m = model("gpt2-style", 64)
    cuda = choose_step(m, torch.device("cuda"), False)
    step, used = build_step(cuda, m, torch.float32, 4, capture=lambda: recorded)
    assert isinstance(step, GraphStep) and used == cuda

    def wrong(body, args, warm):  # replays logits that are not the step's
        return lambda: -body(*args)

    def refused(body, args, warm):
        raise RuntimeError("operation not permitted when stream is capturing")

    step, used = build_step(cuda, m, torch.float32, 4, capture=lambda: wrong)
    assert step is None and used.kind == "eager" and "first tokens" in used.why
    step, used = build_step(cuda, m, torch.float32, 4, capture=lambda: refused)
    assert step is None and "RuntimeError: operation not permitted" in used.why
