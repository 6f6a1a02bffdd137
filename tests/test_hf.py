"""import-hf and export-hf against transformers' own models (tests/hf_reference.py): every family lmlab reads and
writes, logits to 1e-4 and greedy continuations token for token, both ways; what is refused, and why."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import tokenizers
import torch

from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError
from lmlab.data.prepare import prepare
from lmlab.data.tokenizers import Tokenizer, train_tokenizer
from lmlab.evals.evaluate import evaluate_run
from lmlab.hf import FAMILIES, choose_family, export_hf, import_hf
from lmlab.model.gpt import GPT
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, lmlab, run_cli, serve_process, write_config

transformers = pytest.importorskip("transformers")
from tests.hf_reference import (  # noqa: E402  (needs transformers)
    EXPORTS,
    IMPORTS,
    hf_greedy,
    hf_logits,
    lmlab_greedy,
    lmlab_logits,
    max_diff,
    random_ids,
    tiny_hf,
    train_run,
)

# The exports `make test-fast` runs; `make test` runs them all.
FAST = ("gpt2", "llama gqa untied bias", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def bpe(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    return train_tokenizer("bpe:300", texts, texts)


@pytest.mark.parametrize("case", IMPORTS)
@pytest.mark.slow
def test_an_imported_model_computes_what_transformers_does(tmp_path, case, bpe):
    # Some models have more embedding rows than the tokenizer has tokens, as Qwen3's do.
    source = tiny_hf(tmp_path / "hf", case, bpe, vocab_size=bpe.vocab_size + (7 if "untied" in case else 0))
    result = import_hf(source, tmp_path / "run")
    assert result["family"] == case.split()[0]
    ids = random_ids(bpe.vocab_size)
    assert max_diff(lmlab_logits(tmp_path / "run", ids), hf_logits(source, ids)) < 1e-4
    prompt = bpe.encode("ROMEO:\nSweet")
    assert lmlab_greedy(tmp_path / "run", prompt) == hf_greedy(source, prompt)
    run = RunDir(tmp_path / "run")
    start = run.events()[0]
    assert start["kind"] == "imported" and start["origin"]["format"] == f"huggingface {case.split()[0]}"
    assert run.tokenizer().encode("JULIET: fair moon") == bpe.encode("JULIET: fair moon")
    assert run.tokenizer().eot_id == bpe.eot_id


@pytest.mark.parametrize("case", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in EXPORTS])
@pytest.mark.slow
def test_an_exported_run_computes_in_transformers_what_it_does_in_lmlab(tmp_path, case, char_dataset):
    family, options = EXPORTS[case]
    run = train_run(tmp_path / "run", write_config(tmp_path / "tiny.toml", char_dataset), options)
    assert export_hf(run, tmp_path / "out")["family"] == family  # what --arch auto picks
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    if family == "gpt2":  # OpenAI's configs carry the context as n_ctx too, which llama.cpp's converter reads
        assert config["n_ctx"] == config["n_positions"] == RunDir(run).config().model.block_size
    ids = random_ids(RunDir(run).config().model.vocab_size)
    theirs, ours = hf_logits(tmp_path / "out", ids), lmlab_logits(run, ids)
    # The exported vocabulary is the model's rows, no more: the same distribution over every token.
    assert max_diff(theirs.log_softmax(-1), ours.log_softmax(-1)) < 1e-4
    prompt = RunDir(run).tokenizer().encode("ROMEO:\n")
    assert hf_greedy(tmp_path / "out", prompt) == lmlab_greedy(run, prompt)
    # And back in: the same options (norm epsilon, widths, heads, theta) and the same numbers.
    import_hf(tmp_path / "out", tmp_path / "back")
    assert RunDir(tmp_path / "back").config().model == RunDir(run).config().model
    assert max_diff(lmlab_logits(tmp_path / "back", ids), lmlab_logits(run, ids)) == 0


def reserved(tokenizer: Tokenizer, total: int) -> Tokenizer:
    """`tokenizer` with special tokens reserved up to `total` ids (as Llama 3's <|reserved_special_token_N|>)."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([f"<|reserved_{i}|>" for i in range(total - tokenizer.vocab_size)])
    return Tokenizer(tokenizer.spec, backend, tokenizer.eot_id)


def test_a_padded_vocabulary_is_restored_on_import_and_cut_on_export(tmp_path, bpe):
    source = tiny_hf(tmp_path / "hf", "llama gqa untied bias", reserved(bpe, 1090), vocab_size=1090)  # lmlab: 1152
    import_hf(source, tmp_path / "run")
    model = RunDir(tmp_path / "run").load("best", "cpu").model
    assert model.transformer.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 1152
    ids = random_ids(1090)
    torch.testing.assert_close(lmlab_logits(tmp_path / "run", ids), hf_logits(source, ids), atol=1e-4, rtol=0)
    export_hf(tmp_path / "run", tmp_path / "out")
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(source, ids), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="already exists"):  # never overwrites
        export_hf(tmp_path / "run", tmp_path / "out")


def test_sharded_weights_and_a_shorter_context(tmp_path, bpe):
    source = tiny_hf(tmp_path / "hf", "qwen3", bpe)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    import_hf(tmp_path / "sharded", tmp_path / "run", block_size=16)
    assert RunDir(tmp_path / "run").config().model.block_size == 16
    ids = random_ids(bpe.vocab_size, length=16)
    assert max_diff(lmlab_logits(tmp_path / "run", ids), hf_logits(source, ids)) < 1e-4
    with pytest.raises(UserError, match="--block-size 65 must be between 1 and the model's context, 64"):
        import_hf(source, tmp_path / "long", block_size=65)
    gpt2 = tiny_hf(tmp_path / "gpt2", "gpt2", bpe)  # learned positions: the first rows of the table are kept
    import_hf(gpt2, tmp_path / "short-gpt2", block_size=16)
    assert max_diff(lmlab_logits(tmp_path / "short-gpt2", ids), hf_logits(gpt2, ids)) < 1e-4


# config.json keys that change a model's logits (dropout and initialisation do not).
LOGIT_KEYS = {"model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
              "activation_function", "layer_norm_epsilon", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"}


@pytest.mark.parametrize("name", ["gpt2", "SmolLM2-135M", "Qwen2.5-0.5B-Instruct", "Qwen3-0.6B"])
@pytest.mark.slow
def test_the_published_configs_map_onto_the_same_tensors(name):
    """The config.json of GPT-2 small, SmolLM2-135M, Qwen2.5-0.5B-Instruct and Qwen3-0.6B, read by lmlab and by
    transformers, give the same tensors under import's mapping, and the same parameter count (sized on the meta
    device: no memory)."""
    path = Path(__file__).parent / "data" / "hf_configs" / f"{name}.json"
    raw = json.loads(path.read_text())
    family = FAMILIES[raw["model_type"]]
    cfg = ModelConfig(**family.model_options(raw, path))
    with torch.device("meta"):
        ours = GPT(cfg)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    state = theirs.state_dict()
    used = {n for lmlab_name in ours.state_dict() for n in family.hf_names(lmlab_name)}
    family.load(state.get, ours)  # every shape as lmlab's, or UserError
    assert set(state) - used <= {"lm_head.weight"}  # nothing of theirs left behind (but a tied head)
    assert ours.num_params() == theirs.num_parameters()  # the real vocabulary: the padding rows said apart
    assert ours.padding_params() == (50304 - 50257) * 768 * (name == "gpt2")
    expected = {"gpt2": 124_439_808, "SmolLM2-135M": 134_515_008, "Qwen2.5-0.5B-Instruct": 494_032_768,
                "Qwen3-0.6B": 596_049_920}[name]
    assert theirs.num_parameters() == expected
    # Exported again, the model is the same family with every number that shapes its logits as it was.
    assert choose_family(cfg) is family
    written = family.write_config(cfg, raw["eos_token_id"])
    assert {k: written[k] for k in raw if k in LOGIT_KEYS} == {k: v for k, v in raw.items() if k in LOGIT_KEYS}


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("case, changes, message", [
    ("llama", {"model_type": "mistral"}, "describes a 'mistral' model; import-hf reads gpt2, llama, qwen2, qwen3 "
                                         "models"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "rope_type = 'llama3' scales the rotary frequencies"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_type = 'linear' scales the rotary frequencies"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu' gates the MLP with another activation"),
    ("llama", {"attention_bias": True}, "attention_bias = True with mlp_bias = False puts biases in one half"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16,
               "layer_types": ["full_attention", "sliding_attention"]},
     r"use_sliding_window = True with sliding_window = 16 attends to the last 16 tokens alone in some layers, fewer "
     r"than the context imported \(64\), .*import it with --block-size 16 or less"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0, "layer_types": None},
     "sliding_window = 32 attends to the last 32 tokens alone"),
    ("qwen2", {"use_sliding_window": True, "layer_types": ["full_attention", "chunked_attention"]},
     "layer_types = .* names attention other than full_attention and sliding_attention"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "rope_type = 'yarn' scales the rotary frequencies"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act = 'gelu' gates the MLP with another activation"),
    ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor = 0.5 rotates only part of each head"),
    ("qwen3", {"attention_bias": True}, "attention_bias = True puts biases in attention but not in the MLP"),
    ("gpt2", {"activation_function": "relu"}, "activation_function = 'relu' is a GPT-2 variant"),
    ("gpt2", {"n_head": 3}, "describes a model lmlab cannot build: model.n_embd .32. must be divisible by"),
    ("gpt2", {"n_layer": "2"}, "n_layer is '2', not a positive int"),
    ("llama", {"hidden_size": None}, "has no hidden_size"),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes"}}, "describes a quantized checkpoint"),
])
def test_variants_lmlab_does_not_compute_are_refused_by_name(tmp_path, bpe, case, changes, message):
    source = edit_config(tiny_hf(tmp_path / "hf", case, bpe), **changes)
    with pytest.raises(UserError) as caught:
        import_hf(source, tmp_path / "run")
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_import_hf_refuses_in_one_sentence_and_writes_nothing(tmp_path, bpe, capsys):
    source = edit_config(tiny_hf(tmp_path / "hf", "llama", bpe), rope_parameters={"rope_type": "yarn"})
    code, _, err = run_cli(capsys, "import-hf", source, "--out", tmp_path / "run")
    assert code == 2
    assert err == f"error: {source / 'config.json'}: rope_type = 'yarn' scales the rotary frequencies, which " \
                  "lmlab's model does not compute; import-hf takes the standard variant of the family.\n"
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.tmp-*"))
    code, _, err = run_cli(capsys, "import-hf", source, "--out", tmp_path / "run", "--block-size", "0")
    assert code == 2 and "argument --block-size: '0' is not a whole number from 1 to 2**53" in err


def test_weights_lmlab_cannot_read_are_refused_with_the_reason(tmp_path, bpe):
    source = tiny_hf(tmp_path / "hf", "llama", bpe)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only in PyTorch's own format \(pytorch_model.bin\), which can run code"):
        import_hf(source, tmp_path / "run")
    (source / "model.safetensors").write_bytes(b"\x08" + bytes(20))  # not safetensors
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        import_hf(source, tmp_path / "run")
    other = tiny_hf(tmp_path / "other", "qwen3", bpe)  # a Qwen3's tensors under a Llama config
    shutil.copy(other / "model.safetensors", source / "model.safetensors")
    with pytest.raises(UserError, match="the weights' .* has shape .* but config.json implies"):
        import_hf(source, tmp_path / "run")
    edit_config(source, model_type="qwen3", head_dim=8)
    shutil.copy(tiny_hf(tmp_path / "plain", "llama", bpe) / "model.safetensors", source / "model.safetensors")
    with pytest.raises(UserError, match="no tensor model.layers.0.self_attn.q_norm.weight; the checkpoint is "
                                        "incomplete or not qwen3"):
        import_hf(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("label, holds", [("bpe:300", "a WordLevel vocabulary of"), ("gpt2", "a WordLevel"),
                                          ("word:1000", "each one character (a char tokenizer)"), ("char", None)])
def test_an_exported_folder_whose_tokenizer_is_not_the_one_its_label_names_is_refused(tmp_path, label, holds):
    """A char vocabulary under a bpe:N label is refused at import, never imported to a run whose `sample` prints no
    continuation (the ids the file lacks decode to nothing)."""
    source = tmp_path / "hf"
    export_hf(Path(__file__).parent / "data" / "legacy" / "trained", source)  # a char run
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "lmlab_tokenizer": label}))
    if holds is None:
        assert import_hf(source, tmp_path / "run")["tokenizer"] == "char"
        return
    with pytest.raises(UserError) as caught:
        import_hf(source, tmp_path / "run")
    assert str(caught.value).startswith(f"the tokenizer in {source} is labelled {label} (lmlab_tokenizer in "
                                        "tokenizer_config.json") and holds in str(caught.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rows, eos, says", [
    (None, 0, r"it has 43 tokens for the model's \d+ embedding rows \(vocab_size in config.json\), \d+ rows no id of "
              "it reaches, more than padding leaves"),
    (48, 0, r"the model's eos_token_id 0 \(config.json\) is its '\\n', one character of text, not a special token")])
def test_an_unlabelled_tokenizer_the_model_contradicts_is_refused(tmp_path, bpe, capsys, rows, eos, says):
    """A char tokenizer.json (43 tokens) in a folder lmlab did not export (no lmlab label) over a bpe:300 model is
    refused, never imported to a run that samples the prompt alone. The model's evidence is its embedding rows (more
    than padding past the tokenizer's ids) and its bos/eos ids (one character of text there)."""
    source = tiny_hf(tmp_path / "hf", "gpt2", bpe, vocab_size=rows or 0)
    char = export_hf(Path(__file__).parent / "data" / "legacy" / "trained", tmp_path / "char")["out"]
    shutil.copy(Path(char) / "tokenizer.json", source / "tokenizer.json")
    (source / "tokenizer_config.json").unlink()
    (source / "generation_config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "bos_token_id": eos, "eos_token_id": eos}))
    code, out, err = run_cli(capsys, "import-hf", source, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(says, err), err
    assert err.startswith(f"error: the tokenizer in {source} is not this model's: ") and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_export_picks_the_family_or_names_what_none_can_express(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    qwen = ModelConfig(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2)
    assert FAMILIES["qwen3"].problems(qwen) == []
    assert FAMILIES["llama"].problems(qwen) == ["model.qk_norm = True cannot be exported: Llama does not normalise "
                                                "queries and keys; Qwen3 does (--arch qwen3)."]
    assert FAMILIES["gpt2"].problems(ModelConfig()) == []
    relu2 = dataclasses.replace(qwen, mlp="relu2")
    assert FAMILIES["qwen3"].problems(relu2) == ["model.mlp = 'relu2' cannot be exported: the MLP of Llama, Qwen2 "
                                                 "and Qwen3 is SwiGLU (SiLU-gated)."]
    with pytest.raises(UserError, match=r"closest: qwen3\): model.mlp = 'relu2' cannot be exported: the MLP"):
        choose_family(relu2)  # export-gguf's check too: it writes the family export-hf would
    pairs = dataclasses.replace(qwen, bigram_buckets=4096)  # the demo preset's table of token pairs
    assert FAMILIES["qwen3"].problems(pairs) == ["model.bigram_buckets = 4096 cannot be exported: Llama, Qwen2 and "
                                                 "Qwen3 embed each token alone, with no table of token pairs."]
    assert FAMILIES["gpt2"].problems(dataclasses.replace(pairs, pos_emb="learned", norm="layernorm", mlp="gelu",
                                                         qk_norm=False, bias=True, n_kv_head=0)) == [
        "model.bigram_buckets = 4096 cannot be exported: GPT-2 embeds each token alone, with no table of token pairs."]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(config.read_text().replace("n_layer = 2", "n_layer = 2\nnorm = \"rmsnorm\""))
    err = lmlab("export-hf", run, tmp_path / "out", cwd=tmp_path, ok=False).stderr
    assert (f"{run} cannot be exported as any of gpt2, llama, qwen2, qwen3 (closest: gpt2): model.norm = 'rmsnorm' "
            "cannot be exported: GPT-2 normalises with LayerNorm, not RMSNorm.") in err
    with pytest.raises(UserError, match="cannot be exported as llama: model.pos_emb = 'learned' cannot be exported: "
                                        "Llama, Qwen2 and Qwen3 rotate .* model.mlp = 'gelu' cannot be exported: "
                                        "the MLP"):
        export_hf(run, tmp_path / "out", arch="llama")
    assert not (tmp_path / "out").exists()
    # A field no family's rules know is refused, so later options stay unexportable until a family is taught them.
    later = dataclasses.make_dataclass("Later", [("sliding_window", int, 0)], bases=(ModelConfig,))
    assert FAMILIES["gpt2"].problems(later()) == ["model.sliding_window = 0 is an option export-hf does not know, "
                                                  "so it cannot tell whether gpt2 can express it."]


def serve_once(run: Path, path: str, body: dict) -> str:
    """Start `lmlab serve RUN` on the port the system gives it (eager: no compile at start), POST one request once it
    has loaded, stop it; the response body."""
    server, port, _ = serve_process([LMLAB, "serve", run, "--device", "cpu", "--no-compile"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.read().decode()
            except OSError:  # 503 while loading, or too busy loading to answer
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_an_imported_llama_continues_pretraining_and_serves_through_the_cli(tmp_path, bpe, corpus_dir, capsys,
                                                                          monkeypatch):
    """The README's worked example, on a tiny Llama: import, prepare a corpus with its tokenizer, train from its
    weights, evaluate, sample, fine-tune, serve, export again. The commands run in this process (the server in one of
    its own): each is the command line's `main`, as a process would run it."""
    def cli(*args) -> str:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, out + err
        return out

    monkeypatch.chdir(tmp_path)
    # More embedding rows than the tokenizer has tokens, as Qwen3's models have: training takes it.
    source = tiny_hf(tmp_path / "SmolLM", "llama gqa", bpe, vocab_size=bpe.vocab_size + 7, max_position_embeddings=256)
    settings = json.loads((source / "tokenizer_config.json").read_text())  # an instruct model's chat template
    template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (source / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": template}))
    cli("import-hf", tmp_path / "SmolLM", "--out", "runs/smol")
    assert RunDir(tmp_path / "runs/smol").chat_template().end_of_turn == ("<|endoftext|>",)
    assert "tokenizer pretrained:SmolLM" in cli("prepare", corpus_dir, "--tokenizer", "runs/smol", "--name", "plays")
    settings = ["--set", "data.dataset=data/plays-pretrainedSmolLM", "--set", "train.max_iters=10", "--set",
                "train.eval_interval=5", "--set", "train.eval_iters=2", "--set", "train.batch_size=4", "--set",
                "train.learning_rate=1e-3", "--set", "train.warmup_iters=2"]
    cli("train", "runs/smol/config.toml", "--init-from", "runs/smol", "--run", "runs/more", *settings)
    before = json.loads(cli("eval", "runs/smol", "--dataset", "data/plays-pretrainedSmolLM", "--json"))
    after = json.loads(cli("eval", "runs/more", "--json"))
    assert after["loss"] < before["loss"] and math.isfinite(after["bits_per_byte"])
    assert "ROMEO:" in cli("sample", "runs/more", "--prompt", "ROMEO:", "--max-new-tokens", "12")
    cli("finetune", "runs/more", "--data", Path(__file__).parent / "data" / "alpaca_tiny.json", "--set",
          "finetune.epochs=1", "--out", "runs/sft")
    # Trained on, then fine-tuned: the runs ask in the format they learned (Alpaca), not the import's template.
    assert RunDir(tmp_path / "runs/more").chat_template() is None and RunDir(tmp_path / "runs/sft").chat_template() \
        is None and RunDir(tmp_path / "runs/sft").prompt_format().name == "alpaca"
    cli("sample", "runs/sft", "--instruction", "Name a colour.", "--max-new-tokens", "8")
    reply = json.loads(serve_once(tmp_path / "runs/sft", "/v1/chat/completions", {
        "model": "sft", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}))
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    cli("export-hf", "runs/sft", "exported")
    ids = random_ids(bpe.vocab_size)
    assert max_diff(hf_logits(tmp_path / "exported", ids), lmlab_logits(tmp_path / "runs/sft", ids)) < 1e-4


@pytest.mark.slow
def test_gpt2_tokenizer_from_local_files_and_eval_on_a_dataset(tmp_path, hf_gpt2, imported_gpt2, corpus_dir,
                                                               char_dataset, monkeypatch):
    monkeypatch.delenv("LMLAB_GPT2_DIR", raising=False)
    with pytest.raises(UserError, match=r"--gpt2-dir DIR or \$LMLAB_GPT2_DIR") as caught:
        prepare([str(corpus_dir)], "gpt2", out_dir=tmp_path / "data")
    assert "\n" not in str(caught.value)
    tokenizer_only = tmp_path / "gpt2-files"
    tokenizer_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_gpt2 / name, tokenizer_only)
    lmlab("prepare", corpus_dir, "--tokenizer", "gpt2", "--gpt2-dir", tokenizer_only, "--name", "plays",
          cwd=tmp_path)
    # The dataset's tokenizer came from vocab.json + merges.txt, the run's from the same files via import-hf. An eval
    # is recorded in the run, so it scores a copy: the session's import stays unscored for the tests that rank runs.
    run = shutil.copytree(imported_gpt2, tmp_path / "tiny-gpt2")
    result = json.loads(lmlab("eval", run, "--dataset", "data/plays-gpt2", "--json", cwd=tmp_path).stdout)
    assert {"loss", "perplexity", "accuracy", "bits_per_byte"} <= result.keys()
    vocab = json.loads((hf_gpt2 / "config.json").read_text())["vocab_size"]
    assert result["loss"] == pytest.approx(math.log(vocab), rel=0.05)  # a random model is near uniform

    imported = RunDir(imported_gpt2).load("best", "cpu")
    with pytest.raises(UserError, match="pass --dataset DIR"):
        evaluate_run(imported)
    with pytest.raises(UserError, match="different tokenizer .*the dataset's char, .*vocabularies differ"):
        evaluate_run(imported, char_dataset)
