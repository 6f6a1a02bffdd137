"""The model (lmlab/model): shapes, causality, the KV cache against a full recompute, every variant and built-in
kind, parameter and FLOP counts (the book's GPT-2 layout and GPT-2 small counted exactly)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lmlab.core.config import KIND_FIELDS, ModelConfig, SamplingParams
from lmlab.core.config_toml import build_config
from lmlab.core.errors import UserError
from lmlab.core.plugin_kinds import BUILT_IN_KINDS
from lmlab.hf import export_hf
from lmlab.inference.generate import stream_ids
from lmlab.model import build_model
from lmlab.model.gpt import GPT, rms_norm
from lmlab.model.kinds import KINDS
from lmlab.model.rotary import apply_rotary
from lmlab.run.rundir import RunDir
from lmlab.train.optim import muon_groups
from tests.helpers import run_cli, write_config

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def generate(m, prompt: list[int], **params) -> list[int]:
    return list(stream_ids(m, prompt, SamplingParams(**params)))


def test_shapes_loss_and_parameter_counts():
    m = model()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init
    assert m(idx)[1] is None
    assert m.lm_head.weight is m.transformer.wte.weight  # tied: counted once
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.num_params() - m.num_params(embeddings=False) == 50 * 32 + 16 * 32


def test_changing_token_t_changes_no_logits_before_t():
    m = model()
    idx = torch.randint(0, 50, (1, 16))
    base, _ = m(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 50
        logits, _ = m(changed)
        assert torch.equal(logits[0, :t], base[0, :t])
        assert not torch.allclose(logits[0, t:], base[0, t:])


def test_kv_cache_greedy_sampling_equals_full_recompute():
    m = model()
    prompt = [1, 2, 3]
    cached = generate(m, prompt, max_new_tokens=12, temperature=0)
    ids = list(prompt)
    for _ in range(12):
        logits, _ = m(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[3:]


def test_generation_runs_past_the_context_length_and_is_seeded():
    m = model()
    a = generate(m, [7], max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    b = generate(m, [7], max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    assert len(a) == 40 and a == b
    assert all(0 <= t < 50 for t in a)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10, dropout=0.5))
    idx = torch.randint(0, 10, (2, 8))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


def test_a_large_vocab_is_padded_for_speed_without_changing_the_outputs():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=1500)).eval()
    assert m.lm_head.weight.shape[0] == 1536  # the next multiple of 64
    idx = torch.randint(0, 1500, (2, 8))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 8, 1500)  # padded rows never reach the logits or the loss
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 1500), idx.reshape(-1)))


# Each post-GPT-2 option alone, all of them together, and the recurrent model in both cells.
VARIANTS = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "qk_norm": dict(qk_norm=True),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "gqa": dict(n_head=4, n_kv_head=2),
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False,
                   tie_embeddings=False, n_head=4, n_kv_head=1),
    "head_dim": dict(pos_emb="rope", n_head=4, head_dim=16),  # q is 64 wide in a 32-wide model
    "mlp_hidden": dict(mlp_hidden=40),
    "rope_theta": dict(pos_emb="rope", rope_theta=500000.0),
    "bigram": dict(pos_emb="rope", bigram_buckets=64),  # 2,500 pairs of 50 tokens: rows shared, as a hash shares them
    "norm_eps": dict(norm="rmsnorm", qk_norm=True, norm_eps=1e-5),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_head=4, n_kv_head=2,
                  head_dim=16, mlp_hidden=48, rope_theta=1e6, norm_eps=1e-6),
    "gru": dict(kind="recurrent"),
    "lstm": dict(kind="recurrent", rnn_cell="lstm"),
}


def variant(name: str):
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(CONFIG, **VARIANTS[name]))
    if getattr(m, "bigram", None) is not None:  # zeros at init, which would hide every pair
        torch.nn.init.normal_(m.bigram.weight)
    return m.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_is_causal(name):
    m = variant(name)
    idx = torch.randint(0, 50, (1, 16))
    base, _ = m(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 50
        logits, _ = m(changed)
        assert torch.allclose(logits[0, :t], base[0, :t], atol=1e-6)
        assert not torch.allclose(logits[0, t:], base[0, t:])


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.slow
def test_every_variant_steps_incrementally_as_it_runs_whole(name):
    """Feeding tokens through the cache (a prompt, then one at a time) gives the logits of one full pass,
    and greedy sampling through the cache equals recomputing the whole sequence every token."""
    m = variant(name)
    idx = torch.randint(0, 50, (2, 16))
    full, _ = m(idx)
    cache = m.new_cache(2, torch.device("cpu"), torch.float32)
    steps = [m(idx[:, :5], cache=cache)[0]] + [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    prompt = [1, 2, 3]
    cached = generate(m, prompt, max_new_tokens=12, temperature=0)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == ids[3:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [False, True])
def test_the_cpus_rotary_turn_is_the_formula_both_ways(dtype, rows):
    """lmlab's rotary on the CPU (written into its output, its backward the turn back) against the formula autograd
    differentiates, at the angles of shared positions (T, hs/2) and of each row's own (B, 1, T, hs/2): within one
    rounding of the dtype, each way, with a gradient and without."""
    torch.manual_seed(0)
    angles = torch.rand(2, 1, 5, 4) * 6 if rows else torch.rand(5, 4) * 6
    rope = (angles.cos(), angles.sin())
    x = torch.randn(2, 5, 3, 8, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, h, T, hs), strided as q is
    grad = torch.randn(x.shape, dtype=dtype)
    ours = apply_rotary(x, rope)
    ours.backward(grad)
    ours_dx, x.grad = x.grad, None
    cos, sin = (t.to(dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    want.backward(grad)
    close = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, want, **close)
    torch.testing.assert_close(ours_dx, x.grad, **close)
    with torch.no_grad():
        torch.testing.assert_close(apply_rotary(x, rope), want, **close)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: apply_rotary(x, rope), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype,eps,strided", [(torch.float32, None, False), (torch.float32, 1e-5, False),
                                               (torch.bfloat16, None, True), (torch.float64, 1e-6, True)])
def test_rmsnorm_is_torchs_both_ways_in_at_least_float32(dtype, eps, strided):
    """lmlab's RMSNorm (its own forward and backward on the CPU) equals torch's over the input in float32 at least,
    returned in the input's dtype: the residual stream's float32, the q/k heads' strided bf16 under autocast."""
    torch.manual_seed(0)
    wide = torch.promote_types(dtype, torch.float32)
    ours, torchs = rms_norm(dataclasses.replace(CONFIG, norm_eps=eps or 0.0), 8).to(wide), torch.nn.RMSNorm(8, eps)
    torch.nn.init.uniform_(ours.weight, 0.5, 1.5)
    torchs.load_state_dict(ours.state_dict())
    torchs.to(wide)
    x = torch.randn(2, 5, 3, 8, dtype=dtype)
    x = (x.transpose(1, 2) if strided else x).requires_grad_()
    grad = torch.randn(x.shape, dtype=dtype)
    ours(x).backward(grad)
    ours_dx = x.grad
    x.grad = None
    want = torchs(x.to(wide)).to(dtype)
    want.backward(grad)
    assert ours(x).dtype == dtype and ours(x).shape == x.shape
    close = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), want, **close)
    torch.testing.assert_close(ours_dx, x.grad, **close)
    torch.testing.assert_close(ours.weight.grad, torchs.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # decoding and evaluating: torch's own forward, the faster without a backward
        assert ours(x).dtype == dtype
        torch.testing.assert_close(ours(x), want, **close)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(ours, {"weight": w}, (x,)),
                                        (x.detach().requires_grad_(), ours.weight.detach().requires_grad_()))
    with torch.device("meta"):  # memory estimates build on meta, where torch's own runs
        assert ours.to("meta")(x.to("meta")).dtype == dtype


def test_option_parameter_counts():
    base = variant("rope").num_params()
    assert base == model().num_params() - 16 * 32  # rotary positions replace the learned table
    assert variant("untied").num_params() == model().num_params() + 50 * 32  # a head of its own
    gqa = variant("gqa").transformer.h[0].attn.c_attn.weight
    assert gqa.shape == ((4 + 2 * 2) * 8, 32)  # q for 4 heads, k and v for 2
    mlp = variant("swiglu").transformer.h[0].mlp
    assert mlp.c_fc.weight.numel() + mlp.c_proj.weight.numel() == 3 * 88 * 32  # ~ GPT-2's 2 * 4 * 32 * 32
    assert variant("relu2").num_params() == model().num_params()  # GPT-2's MLP, squared ReLU for GELU
    gru = variant("gru")
    assert gru.num_params() - gru.num_params(embeddings=False) == 50 * 32
    assert gru.num_params() == 50 * 32 + 2 * 3 * (32 * 32 * 2 + 2 * 32)  # tied table + 2 GRU layers


def test_flops_per_token_counts_matmul_weights_once_per_token():
    gru = variant("gru")
    assert gru.flops_per_token() == 6 * gru.num_params()  # the tied table is also the head: a matmul
    untied = variant("untied")
    attention = 12 * 2 * 32 * 16
    assert untied.flops_per_token() == 6 * (untied.num_params() - 50 * 32 - 16 * 32) + attention
    bigram, rope = variant("bigram"), variant("rope")
    assert bigram.num_params() == rope.num_params() + 64 * 32
    assert bigram.flops_per_token() == rope.flops_per_token()  # the pairs' table is looked up, never multiplied


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_names_its_hidden_matrices_and_shard_units(name):
    """Muon's group is exactly the block (or recurrent cell) matrices: every parameter lands in one group, and
    tables, head, norms and biases stay with AdamW."""
    m = variant(name)
    hidden, rest = muon_groups(m)
    assert {id(p) for p in hidden} | {id(p) for p in rest} == {id(p) for p in m.parameters()}
    assert len(hidden) + len(rest) == len(list(m.parameters()))
    assert all(p.dim() == 2 for p in hidden) and hidden
    embeddings = {id(p) for p in m.embedding_params()} | {id(m.lm_head.weight)}
    assert not embeddings & {id(p) for p in hidden}
    units = m.shard_units()
    assert len(units) == (0 if name in ("gru", "lstm") else CONFIG.n_layer)
    assert m.describe().startswith(f"recurrent {name} 2L/32" if name in ("gru", "lstm") else "gpt 2L/32")


def test_describe_names_the_options_away_from_gpt2():
    assert model().describe() == "gpt 2L/32"
    modern = build_model(dataclasses.replace(CONFIG, pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                                             bias=False, n_kv_head=1, tie_embeddings=False))
    assert modern.describe() == "gpt 2L/32 rope rmsnorm swiglu qk-norm no-bias untied gqa1"


def test_a_kind_that_ignores_a_field_says_so():
    assert dataclasses.replace(CONFIG, kind="recurrent", n_head=4, pos_emb="rope").ignored_fields() == \
        ["n_head", "pos_emb"]
    assert dataclasses.replace(CONFIG, rnn_cell="lstm").ignored_fields() == ["rnn_cell"]
    assert ModelConfig().ignored_fields() == []


def test_the_options_transformers_families_need_reach_the_layers():
    head = variant("head_dim")
    attn = head.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (3 * 4 * 16, 32) and attn.c_proj.weight.shape == (32, 4 * 16)
    assert head.flops_per_token() == 6 * head.num_params() + 12 * 2 * 4 * 16 * 16  # 12·L·H·Q·T
    assert head.new_cache(1, torch.device("cpu"), torch.float32).k[0].shape[-1] == 16
    assert variant("mlp_hidden").transformer.h[0].mlp.c_fc.weight.shape == (40, 32)
    assert variant("qwen3").transformer.h[0].mlp.c_fc.weight.shape == (2 * 48, 32)  # gate and value
    # Rotary angles of channel pair i turn by theta^(-2i/Q) per position, as transformers computes them.
    rope = variant("rope_theta").rotary
    assert torch.allclose(rope.cos[1], torch.cos(500000.0 ** (-torch.arange(0, 16, 2) / 16)))
    eps = variant("norm_eps")
    assert {m.eps for m in eps.modules() if isinstance(m, torch.nn.RMSNorm)} == {1e-5}
    # The defaults are torch's own, so runs trained before these options compute exactly as they did.
    assert {m.eps for m in variant("rmsnorm").modules() if isinstance(m, torch.nn.RMSNorm)} == {None}
    assert {m.eps for m in model().modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    assert torch.allclose(variant("rope").rotary.cos[1], torch.cos(10000.0 ** (-torch.arange(0, 16, 2) / 16)))


def test_every_built_in_kind_the_config_takes_is_one_build_model_builds():
    assert set(KINDS) == set(BUILT_IN_KINDS) == set(KIND_FIELDS)
    for name, cls in KINDS.items():
        assert type(build_model(ModelConfig(kind=name, n_layer=1, n_head=2, n_embd=16, block_size=8,
                                            vocab_size=11))) is cls


GPT2_SMALL = Path(__file__).resolve().parent.parent / "configs" / "gpt2-small.toml"


def test_the_books_gpt2_layout_and_gpt2_small_are_counted_exactly(tmp_path, capsys):
    """Raschka's GPT-124M: biases everywhere but q/k/v, an untied head, 163,009,536 parameters; GPT-2 small itself
    124,439,808, its 36,096 vocabulary padding weights said apart."""
    code, out, err = run_cli(capsys, "plan", GPT2_SMALL, "--gpu", "H100")
    assert code == 0 and "124,439,808 (" in out and "36,096 more in vocabulary padding rows" in out, err
    book = ["--set", "model.bias=proj,mlp,norm", "--set", "model.tie_embeddings=false", "--set",
            "model.gelu_approx=tanh"]
    code, out, err = run_cli(capsys, "plan", GPT2_SMALL, *book, "--gpu", "H100")
    assert code == 0 and "163,009,536 (" in out and "72,192 more in vocabulary padding rows" in out, err
    with torch.device("meta"):
        model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, bias="norm,proj,mlp"))
    names = {name for name, _ in model.named_parameters()}
    assert "transformer.h.0.attn.c_attn.bias" not in names
    assert {"transformer.h.0.attn.c_proj.bias", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.ln_1.bias"} <= names
    assert model.config.bias == "proj,mlp,norm" and "bias(proj,mlp,norm)" in model.describe()
    # One spelling per layout: every place is true, q/k/v alone is Qwen2's "qkv" (once bias = false, qkv_bias = true).
    assert ModelConfig(bias="qkv,proj,mlp,norm").bias is True
    assert (ModelConfig(bias="qkv").bias, build_config({"model": {"bias": False, "qkv_bias": True}}, "old").model.bias
            ) == ("qkv", "qkv")
    for bad, message in (("attn", "model.bias is 'attn'"), ("", "model.bias is ''")):
        with pytest.raises(UserError, match=message):
            ModelConfig(bias=bad)


@pytest.mark.slow
def test_the_books_layout_trains_counted_without_its_padding_and_gpt2_export_refuses_it(tmp_path, char_dataset,
                                                                                       capsys):
    """A run of 1,100 embedding rows (padded to 1,152 for the head's matmul): train, compare, the report and its
    Chinchilla share count the 1,100, and say the 52 rows' weights apart."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=2)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", config, "--run", run, "--device", "cpu", "--set",
                             'model.bias="proj,mlp,norm"', "--set", "model.vocab_size=1100")
    padding = (1152 - 1100) * 32
    assert code == 0 and "bias(proj,mlp,norm)" in out and f"{padding:,} more in vocabulary padding" in out, err
    start = RunDir(run).events()[0]
    model = build_model(RunDir(run).config().model)
    assert start["params"] == sum(p.numel() for p in model.parameters()) - padding == model.num_params()
    assert start["params_padding"] == padding
    code, out, _ = run_cli(capsys, "compare", run, run, "--json")
    row = json.loads(out)["runs"][0]
    assert (row["params"], row["params_padding"]) == (start["params"], padding)
    assert row["tokens_per_param"] == pytest.approx(row["tokens"] / start["params"])  # Chinchilla's share too
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "report", "--no-eval", "--max-new-tokens", "2",
                           "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and f"{start['params']:,} (and {padding:,} in vocabulary padding rows)" in report, err
    with pytest.raises(UserError, match="GPT-2 has a bias in every linear layer and LayerNorm"):
        export_hf(run, tmp_path / "out", arch="gpt2")
