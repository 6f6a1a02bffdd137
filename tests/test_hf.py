"""GPT-2 import and export against transformers' own model, the gpt2 tokenizer from local files, and
evaluating an imported run on a prepared dataset."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.hf import export_problems
from lmlab.runs import load_run_model, load_run_tokenizer
from tests.conftest import write_config, write_tiny_gpt2

transformers = pytest.importorskip("transformers")
LMLAB = str(Path(sys.executable).with_name("lmlab"))


def lmlab(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([LMLAB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def lmlab_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_run_model(run, "best", torch.device("cpu"))
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("padded", [False, True], ids=["bpe-tokenizer", "vocab-1090-padded"])
def test_import_export_round_trip_matches_transformers(tmp_path, hf_gpt2, padded):
    source = write_tiny_gpt2(tmp_path / "hf", None, vocab_size=1090, n_positions=64) if padded else hf_gpt2
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = hf_logits(source, ids)

    lmlab("import-hf", source, "--out", tmp_path / "runs/imported", cwd=tmp_path)
    run = tmp_path / "runs/imported"
    torch.testing.assert_close(lmlab_logits(run, ids), reference, atol=1e-4, rtol=0)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "import", "end"]

    out = lmlab("export-hf", run, tmp_path / "exported", cwd=tmp_path).stdout
    assert ("no tokenizer files written" in out) == padded
    torch.testing.assert_close(hf_logits(tmp_path / "exported", ids), reference, atol=1e-4, rtol=0)
    if not padded:  # the exported tokenizer loads in transformers and splits text as lmlab does
        text = "ROMEO: sweet night, fair moon<|endoftext|>"
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
        assert hf_tokenizer(text)["input_ids"] == load_run_tokenizer(run).encode(text)
    lmlab("export-hf", run, tmp_path / "exported", cwd=tmp_path, ok=False)  # never overwrites


def test_export_refuses_what_gpt2_cannot_express(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=2)
    lmlab("train", config, "--run", tmp_path / "nobias", "--set", "model.bias=false", "--device", "cpu", cwd=tmp_path)
    err = lmlab("export-hf", tmp_path / "nobias", tmp_path / "out", cwd=tmp_path, ok=False).stderr
    assert "model.bias = False cannot be exported: GPT-2 has a bias in every linear layer" in err
    assert not (tmp_path / "out").exists()
    assert export_problems(ModelConfig()) == []
    # A field the export table does not know is refused too, so later options stay unexportable until taught.
    later = dataclasses.make_dataclass("Later", [("sliding_window", int, 0)], bases=(ModelConfig,))
    assert export_problems(later()) == ["model.sliding_window = 0 is an option export-hf does not know, so it "
                                        "cannot tell whether GPT-2 can express it."]


def test_gpt2_tokenizer_from_local_files_and_eval_on_a_dataset(tmp_path, hf_gpt2, corpus_dir, char_dataset):
    err = lmlab("prepare", corpus_dir, "--tokenizer", "gpt2", cwd=tmp_path, ok=False).stderr
    assert "--gpt2-dir DIR or $LMLAB_GPT2_DIR" in err and err.count("\n") == 1
    tokenizer_only = tmp_path / "gpt2-files"
    tokenizer_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_gpt2 / name, tokenizer_only)
    lmlab("prepare", corpus_dir, "--tokenizer", "gpt2", "--gpt2-dir", tokenizer_only, "--name", "plays",
          cwd=tmp_path)
    lmlab("import-hf", hf_gpt2, "--out", "runs/tiny", cwd=tmp_path)

    err = lmlab("eval", "runs/tiny", cwd=tmp_path, ok=False).stderr
    assert "pass --dataset DIR" in err
    result = json.loads(lmlab("eval", "runs/tiny", "--dataset", "data/plays-gpt2", "--json", cwd=tmp_path).stdout)
    assert {"loss", "perplexity", "accuracy", "bits_per_byte"} <= result.keys()
    vocab = json.loads((hf_gpt2 / "config.json").read_text())["vocab_size"]
    assert result["loss"] == pytest.approx(math.log(vocab), rel=0.05)  # a random model is near uniform
    err = lmlab("eval", "runs/tiny", "--dataset", char_dataset, cwd=tmp_path, ok=False).stderr
    assert "tokenized with char" in err and "vocabularies differ" in err
