"""Batched decoding equals decoding each sequence alone (per-step logits, greedy tokens, seeded draws), with
sequences of different lengths joining and leaving mid-way and running past the context; the compiled step
equals the eager one."""

from __future__ import annotations

import pytest
import torch

from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.inference.compiled import compile_step
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.sampling import filter_logits
from lmlab.model import build_model

BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50)
MODELS = {
    "gpt2-style": {},
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2),
    # Qwen3's options (issue 14): heads wider than n_embd / n_head, its rotary base and norm epsilon, its MLP width
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2,
                  head_dim=16, rope_theta=1e6, norm_eps=1e-6, mlp_hidden=48),
    "gru": dict(kind="recurrent"),
    "lstm": dict(kind="recurrent", rnn_cell="lstm"),
}
GREEDY = SamplingParams(max_new_tokens=30, temperature=0)


def model(name: str):
    torch.manual_seed(0)
    return build_model(ModelConfig(**BASE, **MODELS[name])).eval()


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["modern", "gru"])  # a KV cache and a hidden state; qwen3 is modern's code, resized
def test_the_compiled_step_gives_the_eager_logits_and_greedy_tokens(name):
    m = model(name)
    step = compile_step(m, 3, torch.float32)
    prompts = [[1, 2, 3], [4] * 9, [7]]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (30, 12, 25)]
    eager = decode(m, prompts, params, 3, starts=[0, 0, 4])
    compiled = decode(m, prompts, params, 3, starts=[0, 0, 4], step=step)
    for (tokens, logits), (eager_tokens, eager_logits) in zip(compiled, eager):
        assert tokens == eager_tokens
        assert (logits - eager_logits).abs().max() < 1e-4
