"""`prepare --pack crop`: one padded row per document, padding ignored by the loss, the loader and evaluation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.commands import main
from lmlab.core.config import ModelConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.data.loader import BatchLoader, open_tokens
from lmlab.data.prepare import PrepareOptions, prepare
from lmlab.data.shards import windows_in
from lmlab.data.stats import dataset_stats
from lmlab.data.tokenizers import Tokenizer
from lmlab.evals.evaluate import evaluate_run, evaluate_split, split_windows
from lmlab.model import GPT
from lmlab.model.loss import IGNORE
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import documents, split_tokens, write_config, write_jsonl

BLOCK = 32  # TINY_CONFIG's model.block_size
ROW = BLOCK + 1


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return documents(120, words=(3, 60))


@pytest.fixture(scope="session")
def crop_dataset(tmp_path_factory, texts):
    """Prepared from the relative path docs.jsonl: a document's name (which decides the split, and so the words
    word:100 learns) is its source path as given, so an absolute temporary path would change the dataset from
    one test session to the next."""
    folder = tmp_path_factory.mktemp("crop")
    write_jsonl(folder / "docs.jsonl", texts)
    here = os.getcwd()
    os.chdir(folder)
    try:
        target, _, _ = prepare(["docs.jsonl"], "word:100", out_dir=Path("."),
                               options=PrepareOptions(pack="crop", block_size=BLOCK, workers=1))
    finally:
        os.chdir(here)
    return folder / target


def test_each_document_is_one_row_cut_to_block_size_plus_one_and_padded_with_end_of_text(crop_dataset, texts):
    meta = json.loads((crop_dataset / "meta.json").read_text())
    eot = meta["eot_id"]
    assert meta["rows"] == {"length": ROW, "pad_id": eot}
    tok = Tokenizer.load(crop_dataset / "tokenizer.json", meta["tokenizer"])
    encoded = [tok.encode(t) for t in texts]
    expected = sorted(tuple((ids + [eot] * ROW)[:ROW]) for ids in encoded)
    stored = np.concatenate([split_tokens(crop_dataset, "train"), split_tokens(crop_dataset, "val")])
    assert sorted(map(tuple, stored.reshape(-1, ROW).tolist())) == expected
    assert meta["lost_tokens"] == sum(max(0, len(ids) - ROW) for ids in encoded) > 0
    # Token counts are the real ones: each document's kept tokens and its end-of-text where it fits.
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == sum(min(len(ids) + 1, ROW) for ids in encoded)
    kept = sum(len(t) if len(ids) < ROW else len(tok.decode(ids[:ROW])) for t, ids in zip(texts, encoded))
    assert meta["train"]["characters"] + meta["val"]["characters"] == kept  # the cropped text (no <unk> here)
    stats = dataset_stats(crop_dataset)
    assert stats["block_size"] == BLOCK and stats["max"] == ROW
    assert sorted(stats["lengths"].tolist()) == sorted(min(len(ids), ROW) for ids in encoded)
    assert stats["share_tokens_lost"] == pytest.approx(meta["lost_tokens"] / sum(map(len, encoded)))
    assert stats["share_padding"] == pytest.approx(1 - stats["tokens"] / len(stored))


def test_the_loader_draws_whole_rows_and_ignores_exactly_the_padding(crop_dataset):
    tokens = open_tokens(crop_dataset, "train", "uint16")
    eot = tokens.rows.pad_id
    rows = {tuple(r) for r in np.asarray(tokens[:]).reshape(-1, ROW).tolist()}
    loader = BatchLoader(tokens, BLOCK, 16, seed=0)
    for _ in range(3):
        x, y = loader.next()
        for xr, yr in zip(x.tolist(), y.tolist()):
            row = xr + [yr[-1] if yr[-1] != IGNORE else eot]
            assert tuple(row) in rows
            end = xr.index(eot) if eot in xr else BLOCK  # the document's end-of-text, a real target
            assert yr[:end] == row[1:end + 1]
            assert all(t == IGNORE for t in yr[end:]) and (end == 0 or yr[end - 1] != IGNORE)
    state = loader.state_dict()
    after = loader.next()
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, loader.next()))


def test_evaluation_scores_only_real_targets(crop_dataset):
    meta = json.loads((crop_dataset / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=meta["vocab_size"])).eval()
    tokens = open_tokens(crop_dataset, "val", meta["dtype"])
    scores = evaluate_split(model, tokens, 4.0, 3, torch.device("cpu"), torch.float32)
    total, count, correct = 0.0, 0, 0
    for row in np.asarray(tokens[:]).astype(np.int64).reshape(-1, ROW):  # by hand, one row at a time
        inputs = row[:-1].tolist()  # the targets up to the document's end-of-text count, the padding after it not
        real = inputs.index(meta["eot_id"]) if meta["eot_id"] in inputs else BLOCK
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(row[None, :-1]))
        log_probs = torch.log_softmax(logits[0, :real].double(), -1)
        targets = torch.from_numpy(row[1:real + 1])
        total -= log_probs[torch.arange(real), targets].sum().item()
        correct += (logits[0, :real].argmax(-1) == targets).sum().item()
        count += real
    assert scores["tokens"] == count == meta["val"]["tokens"] - meta["val"]["documents"]
    # what training's final score and the plan count from meta.json alone: every row, not the real tokens' worth
    assert windows_in(meta, "val", BLOCK) == split_windows(tokens, BLOCK) == len(tokens) // ROW
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["accuracy"] == correct / count
    assert scores["bits_per_byte"] == pytest.approx(total / count / math.log(2) / 4.0, rel=1e-5)


@pytest.mark.slow
def test_a_model_trains_and_evaluates_on_a_crop_dataset(tmp_path, crop_dataset):
    vocab = json.loads((crop_dataset / "meta.json").read_text())["vocab_size"]
    result = Trainer(train_job(load_config(write_config(tmp_path / "tiny.toml", crop_dataset, max_iters=10)),
                               tmp_path / "run", "cpu")).run()
    assert math.isfinite(result.best_val_loss) and result.best_val_loss < math.log(vocab)  # learned something
    scores = evaluate_run(RunDir(tmp_path / "run").load("best", "cpu"))
    assert math.isfinite(scores["loss"]) and scores["tokens"] > 0
    out = subprocess.run([sys.executable, "-m", "lmlab", "data", "stats", str(crop_dataset)],
                         capture_output=True, text=True, check=True).stdout
    assert "padding in the rows" in out and f"cut to a row of {ROW} tokens" in out and "tokens lost" not in out


@pytest.mark.slow
def test_a_block_size_other_than_the_rows_is_refused_in_train_and_eval(tmp_path, crop_dataset, monkeypatch):
    config = write_config(tmp_path / "tiny.toml", crop_dataset)
    monkeypatch.chdir(crop_dataset.parent)  # the same document names, so the same vocabulary (see crop_dataset)
    message = (f"holds documents cropped to {BLOCK} tokens \\(--pack crop\\) but model.block_size is 16; set "
               f"model.block_size = {BLOCK} or prepare the dataset again with --pack crop --block-size 16")
    with pytest.raises(UserError, match=message):
        Trainer(train_job(load_config(config, ["model.block_size=16"]), tmp_path / "bad", "cpu"))
    other = prepare(["docs.jsonl"], "word:100", name="wide", out_dir=tmp_path,
                    options=PrepareOptions(pack="crop", block_size=16, workers=1))[0]
    Trainer(train_job(load_config(config, ["train.max_iters=1"]), tmp_path / "run", "cpu")).run()
    with pytest.raises(UserError, match=f"dataset {other} holds documents cropped to 16 tokens .* model.block_size "
                                        f"is {BLOCK}; set model.block_size = 16"):
        evaluate_run(RunDir(tmp_path / "run").load("best", "cpu"), dataset=other)
    with pytest.raises(UserError, match=r"the char tokenizer does not have; use --pack concat or a tokenizer that has "
                                        r"one \(word:N, bpe:N, gpt2, tiktoken:NAME\)"):
        prepare(["docs.jsonl"], "char", out_dir=tmp_path,
                options=PrepareOptions(pack="crop"))


def test_crop_and_concat_of_one_corpus_hold_out_the_same_documents(tmp_path, texts, capsys):
    """The --max-tokens cut and a val split sized in tokens are counted in the documents' tokens before a crop cuts
    them: packed either way, a corpus holds out the same documents (crop read on past the cut for more, and held out
    740 documents where concat held out 102), and a crop no corpus can give is refused before the tokenize pass,
    in the sentence concat gets."""
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    common = ["prepare", str(source), "--tokenizer", "word:100", "--out-dir", str(tmp_path), "--max-tokens", "1500"]
    metas = {}
    for pack in ("concat", "crop"):
        assert main([*common, "--name", pack, "--pack", pack, "--block-size", str(BLOCK)]) == 0
        metas[pack] = json.loads((tmp_path / f"{pack}-word100" / "meta.json").read_text())
    said = " ".join(capsys.readouterr().out.split())
    assert metas["crop"]["split"]["val_documents"] == metas["concat"]["split"]["val_documents"]
    for split in ("train", "val"):
        assert metas["crop"][split]["documents"] == metas["concat"][split]["documents"]
        assert metas["crop"][split]["uncropped_tokens"] == metas["concat"][split]["tokens"]
    # A row is at most the context by design: crop's stats say how many documents were cut, not "beyond" it.
    cut = dataset_stats(tmp_path / "crop-word100")["share_documents_cropped"]
    assert f"cut to a row of {ROW} tokens │ {100 * cut:.1f}% of documents, losing" in said and cut > 0
    assert said.count("beyond the context length") == 1  # concat's
    assert f"train: {metas['concat']['train']['tokens']:,} tokens before cropping," in said
    refusals = []
    for pack in ("concat", "crop"):
        assert main([*common[:-2], "--name", f"all-{pack}", "--pack", pack, "--block-size", str(BLOCK),
                     "--val-tokens", "100000"]) == 2
        refusals.append(capsys.readouterr().err)
    assert refusals[0] == refusals[1] and "but this corpus's documents, less one for train, hold about" in refusals[0]
    assert not list(tmp_path.glob(".all-*")) and not list(tmp_path.glob("all-*"))
