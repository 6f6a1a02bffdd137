"""The steps five write-ups did by hand, each replayed through the CLI (issue 37): a char Shakespeare lower-cased and
filtered to 28 characters, and prompts normalised the same way later; evaluation and patience by epoch, with the
time per epoch; the table of every evaluation (80 columns, JSON, CSV, and in the report); a base model and an
imported instruct model in one chat-aware grid, and the report's summary of them; the book's GPT-2 layout (biases
everywhere but q/k/v) and GPT-2 small counted exactly; and `lmlab train ... | head` stopping as SIGTERM does."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.commands.common import console
from lmlab.core.config import ModelConfig, build_config
from lmlab.core.errors import UserError
from lmlab.data.normalize import Normalization, parse_chars
from lmlab.hf import export_hf
from lmlab.inference.generate import document_start
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from lmlab.serving.requests import Served, parse_request, read_request
from tests.helpers import LMLAB, run_cli, write_config, write_corpus

GPT2_SMALL = Path(__file__).resolve().parent.parent / "configs" / "gpt2-small.toml"


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e.get("event") == kind]


PLAY = """ROMEO:
The quick brown fox jumps over the lazy dog; JULIET, 1597!
Où est-il? “Wherefore art thou,” QUINCE asks.

JULIET:
Sphinx of black quartz, judge my vow — 24 times.
"""


def test_a_char_shakespeare_lower_cased_to_28_characters_in_one_command_and_prompts_normalised_alike(tmp_path,
                                                                                                    capsys):
    """The char write-up's 28 characters (a-z, space, line break) from text with capitals, digits, accents and
    typographic punctuation: `lmlab prepare shakespeare ...` makes the same 28 of the plays."""
    for act in range(3):
        (tmp_path / "plays").mkdir(exist_ok=True)
        (tmp_path / "plays" / f"act{act}.txt").write_text(PLAY * 20, encoding="utf-8")
    code, out, err = run_cli(capsys, "prepare", tmp_path / "plays", "--tokenizer", "char", "--normalize", "lower",
                             "--keep-chars", "a-z \\n", "--out-dir", tmp_path / "data")
    assert code == 0, err
    dataset = tmp_path / "data" / "plays-lower-keep28-char"
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["vocab_size"] == 28 and meta["normalize"] == {"steps": ["lower"], "keep_chars":
                                                              "\n abcdefghijklmnopqrstuvwxyz", "drop_chars": None}
    assert "vocab size 28" in out and "normalised (lower, 28 characters kept)" in out
    assert json.loads((dataset / "tokenizer.json").read_text())["normalizer"]["type"] == "Sequence"

    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=4)
    assert run_cli(capsys, "train", config, "--run", tmp_path / "run", "--device", "cpu")[0] == 0
    run = tmp_path / "run"
    # Capitals, an accent and punctuation the corpus lost are normalised away, not refused as unseen characters.
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "ROMEO: Où?", "--max-new-tokens", "5",
                             "--device", "cpu")
    assert code == 0 and out.startswith("ROMEO: Où?"), err
    tokenizer = RunDir(run).tokenizer()
    assert tokenizer.encode("ROMEO: Où?") == tokenizer.encode("romeo o") and tokenizer.unseen("JULIET!") == ""
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "ROMEO:", "choices": ["Good night!", "GOOD MORROW."], "answer": 0}) + "\n")
    code, out, err = run_cli(capsys, "eval", run, "--task", task, "--json", "--device", "cpu")
    assert code == 0 and json.loads(out)["tasks"][0]["items"] == 1, err  # no item skipped for unseen characters
    # A served completion: 39 characters, 21 once normalised, fits a context of 32 characters (and tokens).
    loaded = RunDir(run).load("best", "cpu")
    served = Served(loaded, None, max_tokens_cap=8, max_batch=1, max_body_bytes=10_000, created=0,
                    max_prompt_chars=32, empty_prompt=document_start(loaded.tokenizer))
    prompt = "ROMEO!!! WHERE??? 1,2,3... Où, JULIET?!"
    request = parse_request(served, read_request(["run"], json.dumps({"model": "run", "prompt": prompt}).encode(),
                                                 chat=False))
    assert request.prompts == [tokenizer.encode("romeo where  o juliet")]  # lower-cased, `ù` not kept


def test_normalisation_steps_apply_in_one_order_and_bad_values_are_one_sentence(tmp_path, corpus_dir, capsys):
    both = Normalization.parse(["lower", "nfkc,ascii"], None, "0-9")
    assert both.steps == ("nfkc", "ascii", "lower") and both.drop == "0123456789"
    assert both.function()("ℌÉté ﬁ “42” Straße") == 'hete fi "" strasse'  # NFKC's capital H lower-cased too
    assert parse_chars("a-c\\-\\s\\\\-", "--keep-chars") == " -\\abc"  # a range, escapes, a last `-` itself
    bad = [(["--normalize", "upper"], "--normalize 'upper' is no normalisation"),
           (["--keep-chars", "z-a"], "the range 'z'-'a' runs backwards"),
           (["--keep-chars", "a\\q"], "is no escape it knows"),
           (["--keep-chars", ""], "--keep-chars is empty"),
           (["--keep-chars", "a-z"], "the char tokenizer separates documents with a line break"),
           (["--drop-chars", "\\n"], "the char tokenizer separates documents with a line break"),
           (["--keep-chars", "a", "--drop-chars", "b"], "not allowed with argument"),
           # before: all of Unicode kept, a 26 MB meta.json (the characters listed) and not a word
           (["--keep-chars", "\\n -\U0010ffff"], "nearly every one text can hold: it removes next to nothing"),
           (["--drop-chars", "\x01-\U0010ffff"], "--drop-chars names 1,114,111 characters; name at most 200,000")]
    for extra, message in bad:
        code, _, err = run_cli(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not any(tmp_path.iterdir())  # nothing written


def test_evaluation_and_patience_by_epoch_with_the_time_per_epoch_and_the_table_of_every_evaluation(tmp_path, capsys,
                                                                                                     monkeypatch):
    """The WikiText-2 notes: an evaluation per epoch, stopped after 2 epochs without a new best; then the log as the
    write-ups print it, in 80 columns, as CSV and JSON, and in the report."""
    code, _, err = run_cli(capsys, "prepare", write_corpus(tmp_path / "corpus", n_docs=3, speeches=12),
                           "--tokenizer", "char", "--out-dir", tmp_path / "data")
    dataset = next((tmp_path / "data").iterdir())
    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=10_000)
    # A learning rate too small to move the weights: no evaluation after the first is a new best.
    code, out, err = run_cli(capsys, "train", config, "--run", tmp_path / "run", "--device", "cpu",
                             "--set", "train.eval_every=epoch", "--set", "train.patience=2", "--set",
                             "train.learning_rate=1e-30", "--set", "train.min_lr=0", "--set", "train.batch_size=4")
    assert code == 0, err
    run = tmp_path / "run"
    evals, end = _events(run, "eval"), _events(run, "end")[-1]
    assert RunDir(run).config().train.eval_interval == "epoch"  # the spacing as given
    steps_per_epoch = RunDir(run).config().train.eval_steps(json.loads((dataset / "meta.json").read_text())["train"][
        "tokens"], 4 * 32)
    split = json.loads((dataset / "meta.json").read_text())["train"]["tokens"]
    assert steps_per_epoch == round(split / (4 * 32))  # the steps nearest one pass of batch 4 x 32 tokens
    # Each at the first step past a pass: never drifting from it, whatever the rounding of the steps per epoch.
    assert [e["step"] for e in evals] == [math.ceil(k * split / (4 * 32)) for k in (1, 2, 3)]
    assert all(k <= e["epoch"] < k + 4 * 32 / split + 1e-4 for e, k in zip(evals, (1, 2, 3)))
    assert end["stopped_early"] and "no new best val loss in 2 epochs" in out
    assert "epoch 1.0" in out and "/epoch" in out  # an evaluation named by its epoch; the train line's time per epoch
    code, out, _ = run_cli(capsys, "compare", run, run, "--json")
    row = json.loads(out)["runs"][0]
    assert row["epoch_seconds"] == pytest.approx(row["elapsed"] / row["epochs"])

    monkeypatch.setattr(console, "width", 80)  # a terminal of 80 columns
    code, table, _ = run_cli(capsys, "log", run)
    lines = table.splitlines()
    assert code == 0 and max(map(len, lines)) <= 80, table
    assert [line.split()[0] for line in lines if line.split() and line.split()[0].replace(",", "").isdigit()] == \
        [f"{e['step']:,}" for e in evals]
    assert "* " + f"{evals[0]['val_loss']:.4f}" in table  # the first evaluation, the only best
    code, out, _ = run_cli(capsys, "log", run, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["val_loss"]) for r in rows] == [e["val_loss"] for e in evals]
    assert [r["train_eval_loss"] for r in rows] == [str(e["train_eval_loss"]) for e in evals]
    code, out, _ = run_cli(capsys, "log", run, "--json")
    assert [e["best_val_loss"] for e in json.loads(out)["evaluations"]] == [e["best_val_loss"] for e in evals]
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "report", "--no-eval", "--max-new-tokens", "4",
                           "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "every evaluation of run (3)" in report, err
    assert "stopped early at step" in report and "no new best in 2 epochs" in report


@pytest.fixture(scope="module")
def base_and_instruct(tmp_path_factory, corpus_dir, char_dataset):
    """A trained lmlab run (char) and an imported instruct model (Qwen2.5-style template), both tiny."""
    from lmlab.hf import import_hf
    from lmlab.train.loop import Trainer
    from lmlab.core.config import load_config

    pytest.importorskip("transformers")
    from tests.hf_reference import hf_chat_model

    root = tmp_path_factory.mktemp("grid")
    base = Trainer(load_config(write_config(root / "tiny.toml", char_dataset, max_iters=10)), root / "base",
                   "cpu").run().run_dir
    import_hf(hf_chat_model(root / "Qwen2.5-tiny-Instruct", "qwen2.5", corpus_dir), root / "instruct")
    return base, root / "instruct"


def test_a_chat_aware_grid_asks_an_instruct_model_in_its_template_and_continues_a_base_model(base_and_instruct,
                                                                                           tmp_path, capsys):
    base, instruct = base_and_instruct
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: thou art fair\n")  # the base run's char tokenizer has their characters
    code, out, err = run_cli(capsys, "sample", base, instruct, "--prompts", prompts, "--chat", "--temperature", "0",
                             "--max-new-tokens", "8", "--json", "--out", tmp_path / "grid.json", "--device", "cpu")
    assert code == 0, err
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert grid["chat"] is True and len(grid["cells"]) == 4
    asked = {(c["run"], c["prompt"]): c for c in grid["cells"]}
    assert {c["asked"] for (run, _), c in asked.items() if run == "base"} == {"continued"}
    assert {c["asked"] for (run, _), c in asked.items() if run == "instruct"} == {"asked through its chat template"}
    for prompt in ("ROMEO:", "JULIET: thou art fair"):  # each cell is what one run alone answers or continues
        code, alone, _ = run_cli(capsys, "sample", instruct, "--chat", prompt, "--temperature", "0",
                                 "--max-new-tokens", "8", "--device", "cpu")
        assert alone == asked[("instruct", prompt)]["text"] + "\n"
        code, alone, _ = run_cli(capsys, "sample", base, "--prompt", prompt, "--temperature", "0",
                                 "--max-new-tokens", "8", "--device", "cpu")
        assert alone == prompt + asked[("base", prompt)]["text"] + "\n"
    code, _, err = run_cli(capsys, "sample", base, "--chat")
    assert code == 2 and "--chat alone asks a grid's prompts" in err

    code, _, err = run_cli(capsys, "report", base, instruct, "--prompts", prompts, "--chat", "--temperature", "0",
                           "--max-new-tokens", "8", "--no-eval", "--out", tmp_path / "report", "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "`instruct`, asked through its chat template, temperature 0" in report, err
    assert "`base`, continued, temperature 0" in report
    summary = report.split("## Machine")[0]
    assert "`instruct` imported: its [data] and [train] left out" in summary and "`train." not in summary


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


@pytest.mark.slow
def test_train_piped_into_head_stops_as_sigterm_does_and_resumes(tmp_path, char_dataset, capsys):
    """`lmlab train ... | head`: the reader goes, the next line written raises SIGPIPE, and the run ends after its
    step with a checkpoint, `stopped_by` SIGPIPE, status 0, and resumes."""
    config = write_config(tmp_path / "long.toml", char_dataset, max_iters=1_000_000)
    run = tmp_path / "run"
    child = subprocess.Popen([LMLAB, "train", str(config), "--run", str(run), "--device", "cpu", "--set",
                              "train.log_interval=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in child.stdout:  # the loop's first line: the stop handler is in place
        if line.startswith("step "):
            break
    child.stdout.close()  # as `head` does once it has its lines
    assert child.wait(timeout=120) == 0, child.stderr.read()
    end = _events(run, "end")[-1]
    assert end["stopped_by"] == "SIGPIPE" and RunDir(run).checkpoint("latest").name == f"step_{end['step']:06d}"
    code, _, err = run_cli(capsys, "train", "--resume", run, "--device", "cpu", "--set",
                           f"train.max_iters={end['step'] + 2}")
    assert code == 0, err
    assert _events(run, "resume")[-1]["step"] == end["step"] and _events(run, "end")[-1]["step"] == end["step"] + 2
