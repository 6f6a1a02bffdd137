"""Batched decoding equals decoding each sequence alone (per-step logits, greedy tokens, seeded draws), with
sequences of different lengths joining and leaving mid-way and running past the context; the compiled step
equals the eager one. What decoding costs: no head over a prompt nobody scores, attention over the live part of
the cache, weights cast to the decode dtype once."""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.inference import decode as decoding
from lmlab.inference.compiled import build_package, compile_step, load_step, step_key
from lmlab.inference.decode import Decoder, Sequence, hold_weights
from lmlab.inference.generate import decoding_only
from lmlab.inference.sampling import filter_logits
from lmlab.model import build_model
from lmlab.model.attention import attend_written_out
from lmlab.model.base import new_state
from lmlab.run.rundir import RunDir

BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50)
MODELS = {
    "gpt2-style": {},
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2),
    # Qwen3's options: heads wider than n_embd / n_head, its rotary base and norm epsilon, its MLP width
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2,
                  head_dim=16, rope_theta=1e6, norm_eps=1e-6, mlp_hidden=48),
    # the demo preset's: a table of token pairs, whose previous token the cache keeps
    "bigram": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, bigram_buckets=64),
    "gru": dict(kind="recurrent"),
    "lstm": dict(kind="recurrent", rnn_cell="lstm"),
}
GREEDY = SamplingParams(max_new_tokens=30, temperature=0)


def model(name: str, **sizes):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**{**BASE, **sizes}, **MODELS[name]))
    if getattr(m, "bigram", None) is not None:  # zeros at init, which would hide every pair
        torch.nn.init.normal_(m.bigram.weight)
    return m.eval()


def decode(m, prompts, params, capacity, starts=None, step=None):
    """Decode every prompt, `capacity` at once, prompt i joining no earlier than step starts[i]; each sequence's
    generated tokens and the logits each step gave it."""
    decoder = Decoder(m, capacity, step=step)
    seqs = [Sequence(list(p), q) for p, q in zip(prompts, params)]
    logits = {seq: [] for seq in seqs}
    inner = decoder.step_fn

    def recording(idx, state):
        out = inner(idx, state)
        for seq, row in zip(decoder.active, out):
            logits[seq].append(row.clone())
        return out

    decoder.step_fn = recording
    waiting, steps = list(zip(seqs, starts or [0] * len(seqs))), 0
    while waiting or decoder.active:
        while waiting and decoder.free and waiting[0][1] <= steps:
            decoder.join(waiting.pop(0)[0])
        decoder.step()
        steps += 1
        for seq in list(decoder.active):
            if seq.exhausted:
                decoder.leave(seq)
    return [(seq.ids[len(p):], torch.stack(logits[seq])) for seq, p in zip(seqs, prompts)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_a_batch_decodes_each_sequence_as_it_decodes_alone(name):
    m = model(name)
    prompts = [[1, 2, 3], [4] * 9, [7], list(range(20, 36))]  # the last fills the context at once
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (40, 12, 25, 30)]
    alone = [decode(m, [p], [q], 1)[0] for p, q in zip(prompts, params)]
    # Three rows for four sequences: the fourth joins when the second leaves, rows move as others end, and
    # every sequence runs past the 16-token context, restarting its window.
    batched = decode(m, prompts, params, 3, starts=[0, 0, 5, 0])
    for (tokens, logits), (alone_tokens, alone_logits) in zip(batched, alone):
        assert tokens == alone_tokens
        assert (logits - alone_logits).abs().max() < 1e-5


def test_a_sampled_sequence_draws_the_same_whatever_its_neighbours():
    m = model("modern")
    mine = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=5)
    alone = decode(m, [[3, 4]], [mine], 1)[0][0]
    neighbours = [SamplingParams(max_new_tokens=20, temperature=1.5, top_k=5, seed=9), GREEDY,
                  SamplingParams(max_new_tokens=35, temperature=0.7, seed=5)]
    for others in (neighbours, neighbours[::-1]):
        batched = decode(m, [[8], [3, 4], [1, 1, 1], [2]], [others[0], mine, others[1], others[2]], 4)
        assert batched[1][0] == alone
    assert decode(m, [[3, 4]], [mine.__class__(**{**mine.__dict__, "seed": 6})], 1)[0][0] != alone


def test_top_k_and_top_p_filter_each_row_by_its_own_settings():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    settings = [(0.7, 3, 1.0), (1.3, None, 0.8), (1.0, 25, 0.5)]
    together = filter_logits(logits, *([s[i] for s in settings] for i in range(3)))
    for row, (temperature, top_k, top_p) in zip(range(3), settings):
        assert torch.equal(together[row], filter_logits(logits[row], temperature, top_k, top_p))


class StateShapes:
    """A step that records the shapes of the state tensors it is given, then runs `step`."""

    def __init__(self, step):
        self.step, self.shapes = step, set()

    def __call__(self, idx, state):
        self.shapes.add(tuple(tuple(t.shape) for t in state.tensors()))
        return self.step(idx, state)


@pytest.mark.slow
# A KV cache (with the previous token a bigram table reads) and a hidden state; modern and qwen3 are its code less
# the table.
@pytest.mark.parametrize("name", ["bigram", "gru"])
def test_the_compiled_step_gives_the_eager_logits_reading_the_live_part_of_the_cache(name):
    m = model(name, block_size=256)
    compiled = StateShapes(compile_step(m, 3, torch.float32))
    prompts = [[1, 2, 3], [4] * 60, [7]]  # the second runs past 64 tokens
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (30, 12, 25)]
    eager = decode(m, prompts, params, 3, starts=[0, 0, 4])
    ran = decode(m, prompts, params, 3, starts=[0, 0, 4], step=compiled)
    for (tokens, logits), (eager_tokens, eager_logits) in zip(ran, eager):
        assert tokens == eager_tokens
        assert (logits - eager_logits).abs().max() < 1e-4
    # One compiled step for every length: the keys and values of the rows' live part (64 positions, then 128 once
    # a row holds more than 64 tokens), never the 256 of the context.
    lengths = {shape[2] for shapes in compiled.shapes for shape in shapes[1:] if len(shape) == 4}
    assert lengths == ({64, 128} if name == "bigram" else set())


class HeadRows:
    """Records how many positions each call of a model's head computes logits for."""

    def __init__(self, model):
        self.rows: list[int] = []
        model.lm_head.register_forward_hook(lambda module, args, out: self.rows.append(args[0][..., 0].numel()))


@pytest.mark.parametrize("name", ["gpt2-style", "gru"])
def test_a_prompt_is_prefilled_without_the_head_unless_its_tokens_are_scored(name):
    m = model(name)
    head = HeadRows(m)
    decoder = Decoder(m, 2)
    decoder.join(Sequence(list(range(1, 15)), GREEDY))  # 13 tokens prefilled, the 14th fed by the first step
    assert head.rows == [0]
    decoder.join(Sequence(list(range(1, 15)), GREEDY, logprobs=2, echo=True))  # its prompt's tokens are scored
    assert head.rows == [0, 13]
    decoder.step()
    assert head.rows == [0, 13, 2]  # a step: one position per row


class Softmaxes(TorchFunctionMode):
    """Records the length of each softmax: the cache positions a decoding step attends over."""

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.softmax:
            self.lengths.append(args[0].shape[-1])
        return func(*args, **(kwargs or {}))


def test_each_step_attends_over_the_live_part_of_the_cache_with_the_logits_of_the_whole(monkeypatch):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**{**BASE, "block_size": 512}, **MODELS["modern"])).eval()
    prompts = [[1, 2, 3], [4] * 60]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (90, 20)]
    with Softmaxes() as attention:
        shortened = decode(m, prompts, params, 2)
    assert set(attention.lengths) == {64, 128}  # the rows hold at most 64 tokens, then 128; never 512
    monkeypatch.setattr(decoding, "live_length", lambda longest, block_size: block_size)
    whole = decode(m, prompts, params, 2)  # every step over the whole cache
    for (tokens, logits), (whole_tokens, whole_logits) in zip(shortened, whole):
        assert tokens == whole_tokens and (logits - whole_logits).abs().max() < 1e-5


class WeightCasts(TorchDispatchMode):
    """Records each copy of a tensor into another dtype whose shape is one of the model's weights'."""

    def __init__(self, model):
        super().__init__()
        self.weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.weights:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_weights_held_in_the_decode_dtype_are_cast_once_not_at_every_token():
    torch.manual_seed(0)
    config = ModelConfig(**BASE, **MODELS["modern"], tie_embeddings=False)
    m, held = build_model(config).eval(), build_model(config).eval()
    held.load_state_dict(m.state_dict())
    hold_weights(held, torch.bfloat16)
    assert {p.dtype for n, p in held.named_parameters() if "ln" in n or "norm" in n} == {torch.float32}
    results = []
    for each in (m, held):
        decoder = Decoder(each, 1, torch.bfloat16)
        decoder.join(Sequence([1, 2, 3], GREEDY))
        with WeightCasts(m) as casts:
            logits = [decoder.step_fn(torch.tensor([[5]]), decoder.rows(1)) for _ in range(3)]
        results.append((casts.casts, torch.stack(logits)))
    (casts_each_step, logits), (held_casts, held_logits) = results
    assert casts_each_step >= 3 * len([p for p in m.parameters() if p.dim() == 2]) - 3 and held_casts == 0
    assert torch.equal(logits, held_logits)  # the same bf16 values, cast once rather than at each step
    with torch.autocast("cpu", torch.bfloat16):
        assert held.hidden(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream stays fp32


class CacheCopies(TorchDispatchMode):
    """Records the size of every tensor a clone or copy makes that holds at least `size` elements."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.copies = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if ("clone" in name or "copy" in name) and isinstance(out, torch.Tensor) and out.numel() >= self.size:
            self.copies.append((name, tuple(out.shape)))
        return out


def test_grouped_query_decoding_reads_the_cache_without_copying_it_per_group():
    # Qwen2.5-0.5B's grouping: 7 query heads share each key/value head
    torch.manual_seed(0)
    m = build_model(ModelConfig(**{**BASE, **MODELS["modern"], "n_head": 14, "n_embd": 56, "block_size": 64})).eval()
    decoder = Decoder(m, 2)
    for prompt in ([1, 2, 3], [4] * 9):
        decoder.join(Sequence(prompt, GREEDY))
    # the cache as the group dimension's broadcast would make it: (B, nkv, g, block_size, hs)
    with CacheCopies(2 * 14 * 64 * m.config.head_size) as recorded:
        decoder.step_fn(torch.tensor([[5], [6]]), decoder.rows(2))
    assert recorded.copies == []


def broadcast_attention(q, k, v, mask):
    """attend_written_out as it was: each group of query heads over its key/value head by broadcasting."""
    B, nh, T, hs = q.shape
    groups = q.view(B, k.size(1), nh // k.size(1), T, hs)  # (B, nkv, nh/nkv, T, hs)
    scores = groups @ k.unsqueeze(2).transpose(-2, -1) * hs ** -0.5  # (B, nkv, nh/nkv, T, block_size)
    scores = scores.float().masked_fill(~mask.unsqueeze(1), float("-inf"))
    y = torch.softmax(scores, dim=-1).type_as(v) @ v.unsqueeze(2)  # (B, nkv, nh/nkv, T, hs)
    return y.view(B, nh, T, hs)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("nkv", [1, 2, 14])
def test_cached_attention_of_grouped_heads_equals_the_broadcast_and_sdpa(T, nkv):
    torch.manual_seed(0)
    B, nh, L, hs = 3, 14, 16, 8
    q = torch.randn(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs), laid out as the attention makes it
    k, v = torch.randn(B, nkv, L, hs), torch.randn(B, nkv, L, hs)
    where = torch.tensor([[0], [5], [11]]) + torch.arange(T)  # (B, T): each row at its own position
    mask = (torch.arange(L) <= where[..., None]).unsqueeze(1)  # (B, 1, T, L): each query its row's keys up to it
    y = attend_written_out(q, k, v, mask)
    assert (y - broadcast_attention(q, k, v, mask)).abs().max() < 1e-5
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
    assert (y - sdpa).abs().max() < 1e-5


@pytest.mark.slow
def test_a_run_loaded_to_decode_eagerly_on_a_gpu_holds_its_weights_in_its_dtype(writing_char_run):
    run = RunDir(writing_char_run).load("latest", "cpu")
    assert decoding_only(run, compiled=False) == torch.float32  # eager on a CPU decodes in fp32
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    on_gpu = dataclasses.replace(run, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert decoding_only(on_gpu, compiled=True) == torch.bfloat16  # the compiled step freezes its own copies
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert decoding_only(on_gpu, compiled=False) == torch.bfloat16
    assert {p.dtype for p in run.model.lm_head.parameters()} == {torch.bfloat16}


def test_a_kept_compiled_step_is_keyed_by_the_gpu_it_was_built_for(fake_gpu):
    config, cuda = ModelConfig(**BASE), torch.device("cuda")
    keys = set()
    for name, capability, version in [("NVIDIA A100-SXM4-80GB", (8, 0), "12.8"), ("NVIDIA L4", (8, 9), "12.8"),
                                      ("NVIDIA A100-SXM4-80GB", (8, 0), "13.0")]:
        fake_gpu(name=name, capability=capability, cuda=version)
        keys.add(step_key(config, "ab" * 32, 4, torch.bfloat16, cuda))
        assert step_key(config, "ab" * 32, 4, torch.bfloat16, cuda) in keys  # the same GPU: the same key
    assert len(keys) == 3  # another GPU, or another CUDA, compiles its own


@pytest.mark.slow
def test_a_compiled_step_runs_on_the_threads_set_after_it_loaded(tmp_path):
    """A compiled step built for more threads than torch had then (as a server started under load builds it) splits
    its work for them, and its kernels take the count OpenMP has when called (no `num_threads(N)` baked into a parallel
    region), so the thread rule's changes mid-decode reach it; on one thread and on two it gives the same logits."""
    m = model("modern", block_size=32).eval()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        package = build_package(m, 2, torch.float32, tmp_path / "step.pt2", threads=(os.cpu_count() or 1) + 1)
        with zipfile.ZipFile(package) as files:
            kernels = "".join(files.read(name).decode() for name in files.namelist() if name.endswith(".cpp"))
        assert "#pragma omp parallel" in kernels and not re.search(r"num_threads\(\d+\)", kernels)
        step, logits = load_step(package), []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = new_state(m, 2, torch.device("cpu"), torch.float32).shortened(1)
            logits.append(step(torch.tensor([[1], [2]]), state))
    finally:
        torch.set_num_threads(before)
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_a_kept_compiled_step_is_keyed_by_the_threads_it_is_built_for_not_those_the_load_left():
    config, cpu = ModelConfig(**BASE), torch.device("cpu")
    before = torch.get_num_threads()
    try:
        keys = set()
        for now in (1, 2):  # a start on quiet cores and one under load find the same package
            torch.set_num_threads(now)
            keys.add(step_key(config, "ab" * 32, 4, torch.float32, cpu, threads=2))
    finally:
        torch.set_num_threads(before)
    assert len(keys) == 1 and step_key(config, "ab" * 32, 4, torch.float32, cpu, threads=3) not in keys


@pytest.mark.slow
def test_sample_compile_keeps_its_step_for_the_next_call_of_the_same_weights(tmp_path, tiny_run, capsys,
                                                                              monkeypatch):
    """`sample --compile` compiled its step on every call (a minute each): the first call now says it compiles and
    keeps the package under the weights' key, the next calls load it and compile nothing; a package that is not the
    one built there is deleted, said, and compiled again. The text is the same every time."""
    from lmlab.inference.compiled import kept_steps
    from tests.helpers import copy_run, run_cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = copy_run(tiny_run, tmp_path)
    greedy = ["sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0", "--compile",
              "--device", "cpu"]
    texts, said = [], []
    for damage in (False, False, True):
        if damage:
            package = next(kept_steps().glob("*.pt2"))
            data = package.read_bytes()
            package.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # a byte changed
        code, out, err = run_cli(capsys, *greedy)
        assert code == 0 and "note: decoding with compiled (AOTInductor" in err, err
        texts.append(out)
        said.append(err)
        assert len(list(kept_steps().glob("*.pt2"))) == 1 and len(list(kept_steps().glob("*.sha256"))) == 1
    compiling = f"note: compiling the decode step (a minute or more; kept in {kept_steps()} for the next calls)"
    assert compiling in said[0] and "compiling" not in said[1]
    assert "is not the one built there" in said[2] and "deleted; compiling it again" in said[2] and compiling in said[2]
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("ROMEO:")
