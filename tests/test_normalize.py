"""Text normalisation (lmlab/data/normalize.py) through the CLI: a char corpus lower-cased and filtered to 28 characters
in one command, prompts normalised the same way later, and the steps applied in one order with bad values refused in
one sentence."""

from __future__ import annotations

import json

import pytest

from lmlab.data.normalize import Normalization, parse_chars
from lmlab.inference.generate import document_start
from lmlab.run.rundir import RunDir
from lmlab.serving.edge import ServeOptions
from lmlab.serving.requests import Served, parse_request, read_request
from tests.helpers import run_cli, write_config

PLAY = """ROMEO:
The quick brown fox jumps over the lazy dog; JULIET, 1597!
Où est-il? “Wherefore art thou,” QUINCE asks.

JULIET:
Sphinx of black quartz, judge my vow — 24 times.
"""


@pytest.mark.slow
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
    options = ServeOptions(run, max_tokens_cap=8, max_batch=1, max_body_bytes=10_000)
    served = Served(loaded, None, options, created=0,
                    max_prompt_chars=32, empty_prompt=document_start(loaded.tokenizer))
    prompt = "ROMEO!!! WHERE??? 1,2,3... Où, JULIET?!"
    request = parse_request(served, read_request(["run"], json.dumps({"model": "run", "prompt": prompt}).encode(),
                                                 "completions"))
    assert request.prompts == [tokenizer.encode("romeo where  o juliet")]  # lower-cased, `ù` not kept


@pytest.mark.slow
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
           # never all of Unicode kept silently (a 26 MB meta.json listing the characters)
           (["--keep-chars", "\\n -\U0010ffff"], "nearly every one text can hold: it removes next to nothing"),
           (["--drop-chars", "\x01-\U0010ffff"], "--drop-chars names 1,114,111 characters; name at most 200,000")]
    for extra, message in bad:
        code, _, err = run_cli(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not any(tmp_path.iterdir())  # nothing written
