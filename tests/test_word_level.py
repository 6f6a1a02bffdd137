"""The word-level workflow through the command line's `main` (in this process: tests/test_cli.py runs the real
command): word:1000 tokens, contexts of 64, perplexity and accuracy."""

import json
import math

import pytest

from tests.helpers import run_cli, write_config, write_corpus


@pytest.mark.slow
def test_word_level_prepare_train_eval_sample(tmp_path, capsys, monkeypatch):
    def run(*args: str) -> str:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, out + err
        return out

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus", n_docs=8, speeches=120)
    run("prepare", corpus, "--tokenizer", "word:1000", "--name", "plays")
    dataset = tmp_path / "data" / "plays-word1000"
    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=30)
    run("train", config, "--run", "runs/word", "--device", "cpu", "--set", "model.block_size=64")
    result = json.loads(run("eval", "runs/word", "--json"))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["loss"] < math.log(json.loads((dataset / "meta.json").read_text())["vocab_size"])
    assert 0 < result["accuracy"] < 1
    table = run("eval", "runs/word")
    assert "perplexity" in table and "accuracy" in table
    text = run("sample", "runs/word", "--prompt", "ROMEO:", "--max-new-tokens", "100", "--temperature", "0")
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 100  # 100 tokens: past the 64-token context
