"""GPT-2 import and export against transformers' own model, the gpt2 tokenizer from local files, and
evaluating an imported run on a prepared dataset."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.data.prepare import prepare
from lmlab.errors import UserError
from lmlab.evaluate import evaluate_run
from lmlab.hf import export_hf, export_problems, import_hf
from lmlab.rundir import RunDir
from tests.conftest import lmlab, write_config, write_tiny_gpt2

transformers = pytest.importorskip("transformers")
def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def lmlab_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    model = RunDir(run).load("best", "cpu", need_tokenizer=False).model
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.slow
def test_import_export_round_trip_matches_transformers(tmp_path, hf_gpt2):
    vocab = json.loads((hf_gpt2 / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = hf_logits(hf_gpt2, ids)

    lmlab("import-hf", hf_gpt2, "--out", tmp_path / "runs/imported", cwd=tmp_path)
    run = tmp_path / "runs/imported"
    torch.testing.assert_close(lmlab_logits(run, ids), reference, atol=1e-4, rtol=0)
    events = RunDir(run).events()
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[0]["kind"] == "imported" and events[0]["origin"]["source"] == str(hf_gpt2.resolve())

    lmlab("export-hf", run, tmp_path / "exported", cwd=tmp_path)
    torch.testing.assert_close(hf_logits(tmp_path / "exported", ids), reference, atol=1e-4, rtol=0)
    text = "ROMEO: sweet night, fair moon<|endoftext|>"  # the exported tokenizer splits text as lmlab does
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert hf_tokenizer(text)["input_ids"] == RunDir(run).tokenizer().encode(text)
    with pytest.raises(UserError, match="already exists"):  # never overwrites
        export_hf(run, tmp_path / "exported")


def test_a_padded_vocabulary_is_restored_on_import_and_cut_on_export(tmp_path):
    source = write_tiny_gpt2(tmp_path / "hf", None, vocab_size=1090, n_positions=64)  # lmlab pads it to 1152
    ids = torch.randint(0, 1090, (2, 40), generator=torch.Generator().manual_seed(0))
    import_hf(source, tmp_path / "run")
    model = RunDir(tmp_path / "run").load("best", "cpu", need_tokenizer=False).model
    assert model.transformer.wte.weight.shape[0] == 1152
    torch.testing.assert_close(lmlab_logits(tmp_path / "run", ids), hf_logits(source, ids), atol=1e-4, rtol=0)
    skipped = export_hf(tmp_path / "run", tmp_path / "out")["tokenizer_skipped"]
    assert skipped == "tokenizer (none) is not byte-level BPE"
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(source, ids), atol=1e-4, rtol=0)


def test_export_refuses_what_gpt2_cannot_express(tmp_path, char_dataset):
    run = tmp_path / "nobias"
    run.mkdir()
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    (run / "config.toml").write_text(config.read_text().replace("n_layer = 2", "n_layer = 2\nbias = false"))
    err = lmlab("export-hf", run, tmp_path / "out", cwd=tmp_path, ok=False).stderr
    assert "model.bias = False cannot be exported: GPT-2 has a bias in every linear layer" in err
    assert not (tmp_path / "out").exists()
    assert export_problems(ModelConfig()) == []
    # A field the export table does not know is refused too, so later options stay unexportable until taught.
    later = dataclasses.make_dataclass("Later", [("sliding_window", int, 0)], bases=(ModelConfig,))
    assert export_problems(later()) == ["model.sliding_window = 0 is an option export-hf does not know, so it "
                                        "cannot tell whether GPT-2 can express it."]


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
    # The dataset's tokenizer came from vocab.json + merges.txt, the run's from the same files via import-hf.
    result = json.loads(lmlab("eval", imported_gpt2, "--dataset", "data/plays-gpt2", "--json", cwd=tmp_path).stdout)
    assert {"loss", "perplexity", "accuracy", "bits_per_byte"} <= result.keys()
    vocab = json.loads((hf_gpt2 / "config.json").read_text())["vocab_size"]
    assert result["loss"] == pytest.approx(math.log(vocab), rel=0.05)  # a random model is near uniform

    imported = RunDir(imported_gpt2).load("best", "cpu")
    with pytest.raises(UserError, match="pass --dataset DIR"):
        evaluate_run(imported)
    with pytest.raises(UserError, match="different tokenizer .*the dataset's char, .*vocabularies differ"):
        evaluate_run(imported, char_dataset)
