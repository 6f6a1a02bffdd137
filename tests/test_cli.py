"""The `lmlab` command as users run it: bad input in-process (fast), the whole pipeline in real processes (slow)."""

import json
import math

import pytest

from lmlab.commands import main
from tests.helpers import lmlab, write_config, write_corpus


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_sentence_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_config_key_and_type(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "c.toml", char_dataset)
    code, _, err = run_cli(capsys, "train", config, "--set", "train.lr=1", "--run", tmp_path / "r")
    assert_one_sentence_error(code, err, "train.lr", "learning_rate")
    code, _, err = run_cli(capsys, "train", config, "--set", "model.n_layer=two", "--run", tmp_path / "r")
    assert_one_sentence_error(code, err, "model.n_layer", "int")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_training_names_the_model_and_the_fields_its_kind_does_not_use(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "c.toml", char_dataset, max_iters=2)
    code, out, _ = run_cli(capsys, "train", config, "--set", "model.kind=recurrent", "--set", "train.eval_interval=2",
                           "--run", tmp_path / "gru", "--device", "cpu")
    assert code == 0 and "model: recurrent gru 2L/32," in out
    assert "note: a recurrent model does not use model.n_head, set in its config" in out
    # Its first line comes before PyTorch loads (the seconds of set-up after it), and says what it trains
    assert " ".join(out.split()).startswith(f"training {tmp_path / 'gru'} from {config}, 2 steps; setting up "
                                            "(PyTorch, the data, the model)... ")
    code, out, _ = run_cli(capsys, "train", "--resume", tmp_path / "gru", "--set", "train.max_iters=3")
    assert code == 0 and out.startswith(f"resuming {tmp_path / 'gru'}; setting up (PyTorch, the data, the model)...")


def test_missing_dataset_and_resume_without_checkpoint(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "c.toml", tmp_path / "no-such-dataset")
    code, _, err = run_cli(capsys, "train", config, "--run", tmp_path / "r")
    assert_one_sentence_error(code, err, "no-such-dataset", "lmlab prepare")
    (tmp_path / "r2").mkdir()
    write_config(tmp_path / "r2" / "config.toml", char_dataset)
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r2")
    assert_one_sentence_error(code, err, "r2", "no latest checkpoint")


def test_bad_corpora(capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run_cli(capsys, "prepare", tmp_path / "latin1.txt", "--tokenizer", "char",
                           "--out-dir", tmp_path / "d")
    assert_one_sentence_error(code, err, "latin1.txt", "UTF-8")
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_cli(capsys, "prepare", tmp_path / "empty.txt", "--tokenizer", "char",
                           "--out-dir", tmp_path / "d")
    assert_one_sentence_error(code, err, "empty")
    code, _, err = run_cli(capsys, "prepare", tmp_path / "empty.txt", "--tokenizer", "bpe:10",
                           "--out-dir", tmp_path / "d")
    assert_one_sentence_error(code, err, "bpe")
    assert not (tmp_path / "d").exists()

@pytest.mark.parametrize("args, shown", [
    (["prepare", "caf\udce9.txt", "--tokenizer", "char", "--name", "cafe"],
     r"the argument is not valid text ('caf\xe9.txt'): it holds the byte 0xe9, which is not UTF-8, at character 3"),
    (["prepare", "corpus", "--tokenizer", "char", "--keep-chars", "a-z \n\udcff"],
     r"--keep-chars is not valid text ('a-z \n\xff'): it holds the byte 0xff"),
])
def test_command_line_bytes_that_are_not_utf8_are_one_sentence(capsys, tmp_path, monkeypatch, args, shown):
    """A byte that is not UTF-8 is one sentence, never a traceback (a UnicodeEncodeError where the dataset's lock
    names its holder). It reaches Python as a lone surrogate (os.fsdecode's escape), which is what these arguments
    hold."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "play0.txt").rename(tmp_path / "caf\udce9.txt")  # a file that is there: refused anyway
    code, _, err = run_cli(capsys, *args)
    assert_one_sentence_error(code, err, shown)
    assert not (tmp_path / "data").exists()



@pytest.mark.slow
def test_run_refuses_a_dataset_with_another_vocab_and_unseen_prompt_characters(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "c.toml", char_dataset, max_iters=10)
    assert run_cli(capsys, "train", config, "--run", tmp_path / "r", "--device", "cpu")[0] == 0
    code, _, err = run_cli(capsys, "sample", tmp_path / "r", "--prompt", "ROMEO: Zzyzx §")
    assert_one_sentence_error(code, err, "--prompt", "never saw")
    write_corpus(tmp_path / "other", n_docs=3, seed=1)
    (tmp_path / "other" / "extra.txt").write_text("Q§\n" * 100)
    assert run_cli(capsys, "prepare", tmp_path / "other", "--tokenizer", "char", "--out-dir", tmp_path / "d")[0] == 0
    code, _, err = run_cli(capsys, "eval", tmp_path / "r", "--dataset", tmp_path / "d" / "other-char")
    assert_one_sentence_error(code, err, "different tokenizer")
    code, _, err = run_cli(capsys, "train", config, "--set", f"data.dataset={tmp_path / 'd' / 'other-char'}",
                           "--set", "model.vocab_size=5", "--run", tmp_path / "r3")
    assert_one_sentence_error(code, err, "vocab_size")


@pytest.mark.slow
def test_prepare_train_resume_eval_sample_through_the_real_command(tmp_path):
    def run(*args: str) -> str:
        return lmlab(*args, cwd=tmp_path).stdout

    corpus = write_corpus(tmp_path / "corpus", n_docs=8, speeches=120)
    out = run("prepare", corpus, "--tokenizer", "char", "--name", "plays")
    assert "train" in out and "val" in out and "chars/token" in out
    dataset = tmp_path / "data" / "plays-char"
    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=30)

    out = run("train", config, "--run", "runs/e2e", "--device", "cpu")
    assert "best val loss" in out and "runs/e2e" in out and "loss.png" in out
    assert "| best!" in out
    out = run("train", "--resume", "runs/e2e", "--set", "train.max_iters=50")
    assert "Resumed runs/e2e from step_000030" in out
    events = [json.loads(line) for line in (tmp_path / "runs/e2e/metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [10, 20, 30, 40, 50]

    result = json.loads(run("eval", "runs/e2e", "--json", "--checkpoint", "latest"))
    assert result["step"] == 50
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))  # ASCII: one byte per char
    assert 0 < result["accuracy"] < 1
    assert result["loss"] < math.log(json.loads((dataset / "meta.json").read_text())["vocab_size"])

    first = run("sample", "runs/e2e", "--prompt", "ROMEO:", "--max-new-tokens", "80", "--seed", "5")
    again = run("sample", "runs/e2e", "--prompt", "ROMEO:", "--max-new-tokens", "80", "--seed", "5")
    assert first == again and first.startswith("ROMEO:") and len(first.rstrip("\n")) == len("ROMEO:") + 80
    assert (tmp_path / "runs/e2e/samples.txt").read_text().count("--- checkpoint best") == 2
