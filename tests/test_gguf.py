"""`lmlab export-gguf` against llama.cpp itself (llama-cpp-python, tests/gguf_reference.py): for a char run, a bpe
run and imported Llama and Qwen2 models, llama.cpp tokenizes as lmlab does, continues a prompt greedily as
`lmlab sample --temperature 0` does, and computes lmlab's logits to 1e-3 in f32 (f16 and q8_0 within their
rounding); the model card and Modelfile; what is refused, in one sentence, with nothing written."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmlab.data.prepare import prepare
from lmlab.data.tokenizers import train_tokenizer
from lmlab.gguf import export_gguf
from lmlab.hf import import_hf
from lmlab.inference.generate import chat_prompt
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, lmlab, run_cli, write_config

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
from tests.gguf_reference import PROMPT, llama, llama_tokens, parity  # noqa: E402
from tests.hf_reference import chat_folder, tiny_hf, train_run  # noqa: E402

QWEN3 = ['model.pos_emb="rope"', 'model.norm="rmsnorm"', 'model.mlp="swiglu"', "model.bias=false", "model.n_head=4",
         "model.qk_norm=true", "model.n_kv_head=2"]
CONTEXT = ["model.block_size=80", "train.max_iters=60", "train.eval_interval=60", "train.checkpoint_interval=60",
           "train.learning_rate=1e-2"]
# The largest difference of a logit allowed at each weight type, llama.cpp caching keys and values in float32 (f32:
# 1e-3, where rotary models give ~1e-6; f16 and q8_0: their rounding of these tiny models' weights, measured by
# benchmarks/gguf_parity.py up to 2.5e-3 and 7.6e-2). llama.cpp's gpt2 computes its GELU on the CPU from a table of
# 16-bit inputs (GGML_GELU_FP16), which alone moves logits of magnitude 7 by ~1e-3 (the exact GELU of lmlab's
# default and OpenAI's tanh one alike): its f32 bound is 2e-3.
BOUND = {"f32": 1e-3, "f16": 1e-2, "q8_0": 0.15}
GPT2_F32_BOUND = 2e-3


@pytest.fixture(scope="session")
def runs(tmp_path_factory, writing_char_run, corpus_dir) -> dict[str, Path]:
    """A char run (GPT-2's shape), a bpe run (Qwen3's shape), and two imported random models with a bpe
    tokenizer: a Llama with grouped-query attention, biases and an untied head (llama.cpp's `llama`, its rotary
    pairs interleaved) and a Qwen2 with q, k and v biases."""
    root = tmp_path_factory.mktemp("gguf")
    bpe_data, _, _ = prepare([str(corpus_dir)], "bpe:300", name="tiny", out_dir=root / "data")
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    bpe = train_tokenizer("bpe:300", texts, texts)
    found = {"char": writing_char_run,
             "bpe": train_run(root / "bpe", write_config(root / "bpe.toml", bpe_data), [*CONTEXT, *QWEN3])}
    for case in ("llama gqa untied bias", "qwen2"):
        name = case.split()[0]
        found[name] = Path(import_hf(tiny_hf(root / f"{name}-hf", case, bpe), root / name)["run"])
    return found


@pytest.mark.parametrize("case", ["char", "bpe", "llama", "qwen2"])
@pytest.mark.slow
def test_llama_cpp_tokenizes_continues_and_scores_as_lmlab_does(case, runs, tmp_path):
    run = RunDir(runs[case]).load("best", "cpu")
    for kind in ("f32", "f16", "q8_0"):
        out = export_gguf(runs[case], tmp_path / f"{case}-{kind}.gguf", kind=kind)
        found = parity(Path(out["out"]), run)
        assert found.tokens_equal, (case, kind)
        bound = GPT2_F32_BOUND if (case, kind) == ("char", "f32") else BOUND[kind]
        assert found.max_logit_diff < bound, (case, kind, found)
        if kind == "f32":  # (a random imported model repeats one token; a trained one writes a few)
            assert found.greedy_equal and found.greedy_tokens >= 40, (case, found)
            assert found.distinct > 1 or case in ("llama", "qwen2"), (case, found)
    assert out["arch"] == {"char": "gpt2", "bpe": "qwen3", "llama": "llama", "qwen2": "qwen2"}[case]


@pytest.mark.slow
def test_the_cli_export_continues_in_llama_cpp_as_lmlab_sample_does(runs, tmp_path):
    out = tmp_path / "char.gguf"
    done = lmlab("export-gguf", runs["char"], out, cwd=tmp_path)
    assert "wrote" in done.stdout and out.exists()
    sampled = lmlab("sample", runs["char"], "--prompt", PROMPT, "--max-new-tokens", 30, "--temperature", 0,
                    "--device", "cpu", "--no-compile", cwd=tmp_path).stdout
    with llama(out, 80) as model:
        text = model(PROMPT, max_tokens=30, temperature=0.0)["choices"][0]["text"]
    assert sampled == PROMPT + text + "\n"
    # A char model has no end-of-text: llama.cpp generates to the length asked, as lmlab does.
    with llama(out, 80) as model:
        assert len(llama_tokens(model, PROMPT + text)) == len(llama_tokens(model, PROMPT)) + 30


@pytest.mark.slow
def test_every_byte_level_tokenizer_and_a_head_dim_qwen2_goes_to_llama_cpp(runs, tmp_path, corpus_dir):
    """Characters outside ASCII, and a Qwen2 whose heads are not n_embd / n_head wide (llama.cpp's `llama`)."""
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "a.txt").write_text("Zürich, naïve café — ½ 東京 ROMEO:\n" * 40 + (corpus_dir / "play0.txt").read_text())
    dataset, _, _ = prepare([str(odd)], "char", out_dir=tmp_path / "data")
    run = train_run(tmp_path / "odd-run", write_config(tmp_path / "odd.toml", dataset), ["train.max_iters=2"])
    export_gguf(run, tmp_path / "odd.gguf")
    loaded = RunDir(run).load("best", "cpu")
    with llama(tmp_path / "odd.gguf", 32) as model:
        for text in ("Zürich, naïve café", "東京 — ½", "ROMEO:\n\n"):
            assert llama_tokens(model, text) == loaded.tokenizer.encode(text)
            assert model.detokenize(loaded.tokenizer.encode(text)).decode() == text
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    source = tiny_hf(tmp_path / "q-hf", "qwen2 untied", train_tokenizer("bpe:300", texts, texts))
    imported = import_hf(source, tmp_path / "q")["run"]
    assert export_gguf(imported, tmp_path / "q.gguf")["arch"] == "llama"
    found = parity(tmp_path / "q.gguf", RunDir(imported).load("best", "cpu"))
    assert found.tokens_equal and found.greedy_equal and found.max_logit_diff < 1e-3, found


@pytest.mark.slow
def test_the_model_card_and_modelfile_say_how_to_run_it(runs, tmp_path):
    out = tmp_path / "bpe.gguf"
    export_gguf(runs["bpe"], out, kind="q8_0")
    card = (tmp_path / "bpe.md").read_text()
    for needed in ("llama-cli -m bpe.gguf", "ollama create bpe -f bpe.Modelfile", "lms import bpe.gguf", "q8_0",
                   "`qwen3`", "pre-tokenizer `gpt-2`"):
        assert needed in card, needed
    from markdown_it import MarkdownIt

    # The end-of-text token whole in its cell of the table, as a code host renders the card (a pipe ends a cell).
    assert "<td><code>&lt;|endoftext|&gt;</code> (id " in MarkdownIt("commonmark").enable("table").render(card)
    modelfile = (tmp_path / "bpe.Modelfile").read_text().splitlines()
    assert modelfile[0] == "FROM ./bpe.gguf"
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "PARAMETER num_ctx 80" in modelfile
    # The TEMPLATE, with Ollama's message in it, is the prompt lmlab serve builds for that message.
    template = "\n".join(modelfile).split('TEMPLATE """')[1].split('"""')[0]
    run = RunDir(runs["bpe"]).load("best", "cpu")
    assert template.replace("{{ .Prompt }}", "Hello") == chat_prompt(run, [("user", "Hello")]).text
    with llama(out, 80) as model:  # the chat template and the tokens, as llama.cpp reads them back
        assert model.metadata["tokenizer.ggml.pre"] == "gpt-2"
        assert int(model.metadata["tokenizer.ggml.eos_token_id"]) == run.tokenizer.eot_id


def refused(capsys, args: list, *words: str) -> str:
    """`lmlab ARGS` (in this process) refused: status 2 and one line holding each of `words`."""
    code, out, err = run_cli(capsys, *args)
    assert code == 2, out + err
    message = err.strip()
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message
    return message


def nothing_under(out: Path) -> bool:
    """No GGUF file, model card, Modelfile or temporary file of `out`."""
    written = [out, out.with_suffix(".md"), out.with_suffix(".Modelfile"), *out.parent.glob(f".{out.name}.tmp-*")]
    return not any(path.exists() for path in written)


@pytest.mark.slow
def test_bad_input_is_one_sentence_and_writes_nothing(runs, tmp_path, char_dataset, capsys):
    out = tmp_path / "out" / "model.gguf"
    refused(capsys, ["export-gguf", runs["char"], tmp_path / "model.bin"], "does not end in .gguf")
    refused(capsys, ["export-gguf", runs["char"], out, "--type", "q4_k"], "--type", "q4_k")
    refused(capsys, ["export-gguf", runs["char"], out, "--checkpoint", "7"], "no checkpoint at step 7")
    (tmp_path / "file").write_text("")
    refused(capsys, ["export-gguf", runs["char"], tmp_path / "file" / "model.gguf"], "is a file, not a folder")
    out.parent.mkdir()
    (out.parent / "model.md").write_text("mine")
    refused(capsys, ["export-gguf", runs["char"], out], "model.md already exists")
    assert (out.parent / "model.md").read_text() == "mine"
    # (a word-level run's refusal: tests/test_hf_tokenizers.py, on the word run it trains anyway)
    rnn = train_run(tmp_path / "rnn", write_config(tmp_path / "rnn.toml", char_dataset),
                    ['model.kind="recurrent"', "train.max_iters=2"])
    refused(capsys, ["export-gguf", rnn, tmp_path / "r.gguf"], "is a recurrent model", "kind gpt")
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(runs["char"]), str(edited)], check=True)
    (edited / "tokenizer.json").write_text((edited / "tokenizer.json").read_text().replace('"a"', '"@"'))
    refused(capsys, ["export-gguf", edited, tmp_path / "e.gguf"], "does not match the checksum")
    for name in ("r", "e", "model"):
        assert nothing_under(tmp_path / f"{name}.gguf")
    assert not out.exists() and not (out.parent / "model.Modelfile").exists()


def limited(bytes_: int) -> Callable[[], None]:
    """A child's file size limit: a write past it is cut short."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (bytes_, bytes_))


# The CLI as a child whose write past its file size limit kills it (SIGXFSZ; Python itself ignores that signal).
KILLABLE = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from lmlab.commands import main; "
            "sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_a_write_killed_or_failed_half_way_leaves_nothing_under_the_name(runs, tmp_path):
    out = tmp_path / "model.gguf"
    args = ["export-gguf", str(runs["char"]), str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLABLE, *args], capture_output=True, text=True,
                            preexec_fn=limited(60_000), timeout=300)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    leftovers = list(tmp_path.glob(".model.gguf.tmp-*"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size <= 60_000 and not out.exists()
    failed = subprocess.run([LMLAB, *args], capture_output=True, text=True, preexec_fn=limited(60_000), timeout=300)
    assert failed.returncode == 2 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert f"could not write {out}" in failed.stderr
    assert not out.exists() and not (tmp_path / "model.md").exists()
    assert list(tmp_path.glob(".model.gguf.tmp-*")) == []  # the failed one removed its own, and the killed one's
    lmlab(*args, cwd=tmp_path)
    assert out.stat().st_size > 60_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf", "model.md"]
    with llama(out, 80) as model:
        assert model.n_vocab() == RunDir(runs["char"]).config().model.vocab_size


@pytest.mark.parametrize("style", ["qwen2.5", "llama3"])
def test_an_imported_instruct_models_chat_goes_to_llama_cpp_and_ollama(style, tmp_path, corpus_dir):
    """Its chat template in the file, a chat's prompt tokenized by llama.cpp as by lmlab (Llama 3's tokenizer puts
    its BOS before every text: add_bos_token), and the Modelfile's TEMPLATE and stops those of lmlab serve."""
    folder = chat_folder(tmp_path / style, style, corpus_dir)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    tiny_hf(folder, "llama", None, vocab_size=vocab_size)
    run = RunDir(import_hf(folder, tmp_path / "run")["run"]).load("best", "cpu")
    out = tmp_path / f"{style}.gguf"
    export_gguf(run.run.path, out)
    prompt = chat_prompt(run, [("system", "Answer in verse."), ("user", "Who is Juliet?")])
    with llama(out, 64) as model:
        assert model.metadata["tokenizer.chat_template"] == run.chat_template.template
        assert (model.metadata["tokenizer.ggml.add_bos_token"] == "true") == (style == "llama3")
        ids = model.tokenize(prompt.text.encode(), add_bos=False, special=True)
        assert ids == prompt.ids(run.tokenizer)
    modelfile = (tmp_path / f"{style}.Modelfile").read_text()
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template.replace("{{ .Prompt }}", "Hi") == chat_prompt(run, [("user", "Hi")]).text
    assert f'PARAMETER stop "{run.chat_template.end_of_turn[0]}"' in modelfile
