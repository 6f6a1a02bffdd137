"""Decoding from int8 weights (`--quantize int8`): on trained models, the greedy tokens of float32 and each step's
logits within the tolerance the line naming the format states, eagerly and through the compiled step; through
`sample`, `answer`, `serve` and `lmlab.Run`; refused where it cannot run."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
import torch

from lmlab.api.run import Run
from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError
from lmlab.inference.compiled import step_key
from lmlab.inference.decode import Decoder
from lmlab.inference.int8 import Int8Linear
from lmlab.inference.int8_matmul import DENSE_ROWS, dense_dtype, dense_matmul, int8_matmul
from lmlab.inference.quantize import LOGIT_TOLERANCE, quantize, tolerance
from lmlab.inference.steps import build_step, choose_step
from lmlab.model import build_model
from tests.cpu_kind.sitecustomize import CPU_KINDS, VECTORS
from tests.helpers import ALPACA_TINY, CYCLE, ROOT, Server, copy_run, fake_cpu, greedy, int8_holds, run_cli

MODELS = {"gpt2-style": {}, "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False),
          "gru": dict(kind="recurrent")}


@pytest.fixture(scope="module")
def trained() -> Iterator[dict[str, torch.nn.Module]]:
    """Each of MODELS, small, trained once for the module until it continues a cycle of 23 tokens confidently: logits
    as a trained model's are, peaked, which random weights' are not. The module's tiny ops run on one thread: on a
    shared, loaded host two threads waiting on each other made the same training 10-100 times slower (a second on
    one thread against up to a minute or more); every core comes back to the next module's tests."""
    threads, models = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    for name, kind in MODELS.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=128, vocab_size=50, **kind))
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
        data, rng = torch.tensor(CYCLE * 10), torch.Generator().manual_seed(2)
        for _ in range(40):
            starts = torch.randint(0, len(data) - 33, (4,), generator=rng).tolist()
            x, y = (torch.stack([data[s + shift:s + shift + 32] for s in starts]) for shift in (0, 1))
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        models[name] = model.eval()
    yield models
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODELS)
def test_int8_decodes_float32s_greedy_tokens_with_logits_within_the_stated_tolerance(name, trained):
    int8_holds(trained[name])  # on this host's CPU kind; each kind's twin below
    assert f"within {LOGIT_TOLERANCE:.0%}" in tolerance("int8")


# A CPU kind's twin: the models decoded from int8 in a process whose kernels and width rule are that kind's. Where the
# kind's vectors are wider than the host's, its rule is faked and the host's kernels run (they read any multiple of
# their own, narrower, width); AVX2's are real on any host (ATEN_CPU_CAPABILITY, read at torch's first kernel).
TWIN = """
import json, sys, torch
if torch.backends.cpu.get_cpu_capability() != sys.argv[1]:
    torch.backends.cpu.get_cpu_capability = lambda: sys.argv[1]
from tests.helpers import int8_holds
torch.set_num_threads(1)
left = {name: int8_holds(model) for name, model in torch.load(sys.argv[2], weights_only=False).items()}
print(json.dumps({"vectors": torch.backends.cpu.get_cpu_capability(), "left float32": left}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", CPU_KINDS)
def test_int8_holds_on_a_faked_twin_of_each_cpu_kind(monkeypatch, trained, tmp_path, kind):
    """The kernel reads 8 inputs at a time on AVX2 and 16 on AVX-512 (and AMX's CPUs): there every matmul of the
    three models reads int8, here the modern one's SwiGLU projection (88 inputs) keeps float32."""
    fake_cpu(monkeypatch, kind)
    if VECTORS[kind] == "AVX2":
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    torch.save(trained, tmp_path / "models.pt")
    job = subprocess.run([sys.executable, "-c", TWIN, VECTORS[kind], str(tmp_path / "models.pt")], cwd=ROOT,
                         capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-3000:]
    narrow = VECTORS[kind] == "AVX2"
    assert json.loads(job.stdout.splitlines()[-1]) == {
        "vectors": VECTORS[kind], "left float32": {"gpt2-style": [], "modern": [] if narrow else [88], "gru": []}}


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_a_prompts_many_rows_multiply_densely_and_a_decode_steps_few_through_the_kernel(monkeypatch, kind):
    """Either way, the products of the int8 weights and their scales within bfloat16's rounding, the dense ones as
    near them as the kernel's (each weight scaled and rounded once); densely in bfloat16 where the CPU kind multiplies
    it natively, else in float32."""
    fake_cpu(monkeypatch, kind)
    torch.manual_seed(0)
    layer, x = Int8Linear(torch.nn.Linear(64, 48)), torch.randn(DENSE_ROWS, 64)
    exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T
    dense = torch.bfloat16 if CPU_KINDS[kind][0] else torch.float32
    assert dense_dtype() == dense
    rows = torch.cat([int8_matmul(x[i:i + 1], layer.weight, layer.scales) for i in range(DENSE_ROWS)])
    errors = []
    for got, dtype in ((int8_matmul(x, layer.weight, layer.scales), dense), (rows, torch.bfloat16)):
        assert got.dtype == dtype
        errors.append(((got.double() - exact).abs().max() / exact.std()).item())
    assert errors[1] < 0.02 and errors[0] <= 1.5 * errors[1], errors
    for dtype in (torch.bfloat16, torch.float32):  # each weight's exact product with its scale, rounded once
        scaled = (layer.weight.double() * layer.scales.double()[:, None]).to(dtype)
        want = torch.nn.functional.linear(x.to(dtype), scaled)
        assert torch.equal(dense_matmul(x, layer.weight, layer.scales, dtype), want)


def test_int8_decoding_caches_keys_and_values_as_bfloat16_and_float_decoding_as_its_own_dtype(trained):
    model = trained["gpt2-style"]
    assert {t.dtype for t in Decoder(model, 2).state.tensors()[2:]} == {torch.float32}
    int8 = quantize(copy.deepcopy(model), "int8")
    assert {t.dtype for t in Decoder(int8, 2).state.tensors()[2:]} == {torch.bfloat16}
    assert "keys and values cached as bfloat16" in tolerance("int8")


@pytest.mark.slow
def test_the_compiled_int8_step_decodes_as_the_eager_one(trained):
    model = quantize(copy.deepcopy(trained["gpt2-style"]), "int8")
    choice = choose_step(model, torch.device("cpu"), True, "int8")
    assert choice.kind == "compiled from int8 weights" and tolerance("int8") in choice.why
    step, used = build_step(choice, model, torch.float32, 2)
    assert used == choice and step is not None
    assert Decoder(model, 2, step=step).state.tensors()[2].dtype == torch.bfloat16  # the cache the step was built for
    prompts = [CYCLE[:5], CYCLE[7:9]]
    (want, exact), (got, approx) = greedy(model, prompts), greedy(model, prompts, step)
    assert got == want
    assert ((approx - exact).abs() / exact.std(-1, keepdim=True)).max() <= 0.01  # the same kernels' arithmetic


def test_a_matmul_too_narrow_for_the_kernel_keeps_its_float32_weights():
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=20, block_size=8, vocab_size=10)).eval()
    quantized = quantize(copy.deepcopy(model), "int8")
    widths = {m.in_features: type(m).__name__ for m in quantized.modules() if hasattr(m, "in_features")}
    assert widths == {20: "Linear", 80: "Int8Linear"}  # the MLP's projection reads 80 inputs, a multiple of 16
    idx = torch.tensor([[1, 2, 3]])
    assert (quantized(idx)[0] - model(idx)[0]).abs().max() < 0.01


@pytest.mark.parametrize("capability, quantized_24", [("AVX512", False), ("AVX2", True), ("DEFAULT", True)])
def test_the_width_the_kernel_reads_follows_the_cpus_vector_length(monkeypatch, capability, quantized_24):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=24, block_size=8, vocab_size=10)).eval()
    kinds = {m.in_features: type(m).__name__ for m in quantize(model, "int8").modules() if hasattr(m, "in_features")}
    assert kinds == {24: "Int8Linear" if quantized_24 else "Linear", 96: "Int8Linear"}


def test_int8_is_refused_off_the_cpu_and_an_unknown_format_is_named():
    with torch.device("meta"):
        model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10))
    with pytest.raises(UserError, match="--quantize int8 decodes on a CPU .*not on meta"):
        quantize(model, "int8")
    with pytest.raises(UserError, match="--quantize is 'int4'; it must be one of none, int8"):
        quantize(model, "int4")


def test_a_kept_step_of_int8_weights_is_keyed_apart_from_the_float_ones():
    config, cpu = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10), torch.device("cpu")
    plain = step_key(config, "ab" * 32, 2, torch.float32, cpu)
    assert plain == step_key(config, "ab" * 32, 2, torch.float32, cpu, "none")  # the float keys kept before hold
    assert step_key(config, "ab" * 32, 2, torch.float32, cpu, "int8") != plain


@pytest.mark.slow
def test_sample_and_answer_decode_from_int8_and_say_so(capsys, tiny_run, sft_run, tmp_path):
    code, out, err = run_cli(capsys, "sample", copy_run(tiny_run, tmp_path), "--prompt", "ROMEO:", "--quantize",
                             "int8", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu")
    assert code == 0 and out.startswith("ROMEO:") and "decoding with eager from int8 weights (" in err, err
    assert f"within {LOGIT_TOLERANCE:.0%}" in err and "keys and values cached as bfloat16" in err
    code, out, err = run_cli(capsys, "answer", sft_run, "--data", ALPACA_TINY, "--out", tmp_path / "a.jsonl",
                             "--max-new-tokens", "4", "--quantize", "int8", "--compile", "--device", "cpu")
    assert code == 0 and "decoding with compiled from int8 weights (" in err, err
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == len(json.loads(ALPACA_TINY.read_text()))
    code, _, err = run_cli(capsys, "sample", tiny_run, tiny_run, "--quantize", "int8", "--device", "cpu")
    assert code == 2 and "ask --quantize of one run at a time" in err


def test_the_memory_check_counts_an_int8_runs_rows_at_its_bfloat16_cache(capsys, tiny_run):
    def per_row(*quantize: str) -> float:
        code, _, err = run_cli(capsys, "sample", tiny_run, "--num-samples", "1000000000000", "--max-new-tokens", "9",
                               "--device", "cpu", *quantize)
        assert code == 2, err
        return float(re.search(r"([\d.]+) KiB per decoding row", err)[1])

    state = 2 * 2 * 32 * 32 * 2 / 1024  # KiB: two layers' keys and values, 32 wide over 32 positions, 2 bytes each
    assert per_row() - per_row("--quantize", "int8") == pytest.approx(state, rel=0.1)  # half of float32's cache


def test_the_api_keeps_int8_weights_apart_from_the_float_ones(tiny_run, tmp_path):
    run = Run(copy_run(tiny_run, tmp_path))
    how = dict(max_new_tokens=10, temperature=0, device="cpu", keep=False)
    exact = run.sample("ROMEO", **how)
    run.sample("ROMEO", quantize="int8", **how)
    assert run.sample("ROMEO", **how) == exact  # the float model loaded before was not quantized in place
    with pytest.raises(UserError, match="quantize is 'int4'; it must be 'none' or 'int8'"):
        run.sample("ROMEO", quantize="int4", **how)


@pytest.mark.slow
def test_serve_keeps_the_step_compiled_from_int8_weights_for_its_next_start(tiny_run):
    first = Server(tiny_run, "--quantize", "int8", "--compile")
    try:  # ready at once, decoding eagerly from the int8 weights while the step compiles in the background
        first.logged(lambda line: "compiled the decode step (kept in" in line, timeout=600)
        assert first.health()["decode_step"] == "compiled from int8 weights"
    finally:
        first.stop()
    again = Server(tiny_run, "--quantize", "int8", "--compile")
    try:
        again.logged(lambda line: "lmlab serve: ready" in line)
        assert any("loaded the kept compiled step" in line for line in again.log), again.log
        assert any("decoding compiled from int8 weights (" in line for line in again.log)
        body = json.dumps({"prompt": "ROMEO", "max_tokens": 5, "temperature": 0}).encode()
        request = urllib.request.Request(f"{again.url}/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(request, timeout=60).read())["usage"]["completion_tokens"] == 5
    finally:
        again.stop()
