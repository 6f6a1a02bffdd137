"""`lmlab prepare` on plain corpora: the plays' markup, tokens, tokenizer and meta.json written, the split by
document, a dataset reused or refused, bad corpora named, and what a killed prepare left cleaned up. Large and
streamed sources are tests/test_prepare_streaming.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab.commands import main
from lmlab.core.errors import UserError
from lmlab.data.corpora import play_to_text, shakespeare
from lmlab.data.prepare import prepare
from lmlab.data.tokenizers import Tokenizer

# A line ending in two spaces is a Markdown hard break (written `\x20\x20` so that the spaces show).
PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ROMEO and a very long
procession of people_

**ROMEO**\x20\x20
But soft! what light\x20\x20
_\\[Aside]_ through yonder window breaks?

**FIRST SERVANT**\x20\x20
Here, sir\\-here.

_Exeunt_
"""


def test_play_markdown_becomes_speaker_lines_and_verse():
    assert play_to_text(PLAY) == ("ROMEO:\nBut soft! what light\nthrough yonder window breaks?\n\n"
                                  "FIRST SERVANT:\nHere, sir-here.\n")


@pytest.mark.slow
def test_shakespeare_is_every_play_without_markup():
    plays = shakespeare()
    assert len(plays) == 38
    assert len({p.name for p in plays}) == 38
    text = "".join(p.text for p in plays)
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    for marker in ("**", "_", "#", "\\", "[", "]"):
        assert marker not in text


def test_prepare_writes_tokens_tokenizer_and_meta(tmp_path, corpus_dir):
    target, meta, built = prepare([str(corpus_dir)], "bpe:300", name="tiny", out_dir=tmp_path)
    assert built and target == tmp_path / "tiny-bpe300"
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((target / "meta.json").read_text()) == meta
    tok = Tokenizer.load(target / "tokenizer.json", meta["tokenizer"])
    train = np.fromfile(target / "train.bin", dtype=np.uint16)
    assert len(train) == meta["train"]["tokens"] and meta["dtype"] == "uint16"
    assert (train == tok.eot_id).sum() == meta["train"]["documents"]  # one end-of-text per document
    assert meta["train"]["documents"] + meta["val"]["documents"] == 6
    val_docs = meta["split"]["val_documents"]
    assert len(val_docs) >= 1
    first_val_doc = (corpus_dir / val_docs[0].split("/")[-1]).read_text()
    val = np.fromfile(target / "val.bin", dtype=np.uint16)
    assert tok.decode(val).startswith(first_val_doc)
    assert len(meta["input_sha256"]) == len(meta["train"]["sha256"]) == 64


def test_split_is_by_document_and_deterministic(tmp_path, corpus_dir):
    _, first, _ = prepare([str(corpus_dir)], "char", name="a", out_dir=tmp_path)
    _, second, _ = prepare([str(corpus_dir)], "char", name="b", out_dir=tmp_path)
    assert first["split"] == second["split"]
    assert first["train"]["sha256"] == second["train"]["sha256"]
    assert 0.05 < first["val"]["characters"] / (first["train"]["characters"] + first["val"]["characters"]) < 0.5


def test_an_identical_dataset_is_reused_and_a_different_one_needs_force(tmp_path, corpus_dir):
    target, _, built = prepare([str(corpus_dir)], "char", name="x", out_dir=tmp_path)
    assert built
    mtime = (target / "train.bin").stat().st_mtime_ns
    _, _, built = prepare([str(corpus_dir)], "char", name="x", out_dir=tmp_path)
    assert not built and (target / "train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="--force"):
        prepare([str(corpus_dir)], "char", name="x", out_dir=tmp_path, val_fraction=0.3)
    assert (target / "train.bin").stat().st_mtime_ns == mtime  # nothing touched
    _, meta, built = prepare([str(corpus_dir)], "char", name="x", out_dir=tmp_path, val_fraction=0.3, force=True)
    assert built and meta["split"]["val_fraction"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["x-char"]  # no temporary dirs left behind


def test_one_document_is_split_at_a_line_near_the_tail(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    _, meta, _ = prepare([str(path)], "char", out_dir=tmp_path / "data")
    assert meta["split"]["rule"] == "tail of the only document"
    assert meta["split"]["cut_at_char"] == len("".join(f"line {i}\n" for i in range(90)))
    assert meta["val"]["documents"] == meta["train"]["documents"] == 1


def test_jsonl_documents_are_read_from_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(10)))
    _, meta, _ = prepare([str(path)], "word:50", out_dir=tmp_path / "data")
    assert meta["train"]["documents"] + meta["val"]["documents"] == 10
    assert meta["vocab_size"] <= 52


def test_a_short_first_document_of_many_is_split_like_the_others(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["a "] + [f"document number {i} " * 20 for i in range(10)]
    path.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    _, meta, _ = prepare([str(path)], "char", out_dir=tmp_path / "data")
    assert meta["train"]["documents"] + meta["val"]["documents"] == 11


@pytest.mark.parametrize("sizes, held", [((1,) * 4, "25.0%"), ((3, 1, 1, 1, 1), ""), ((1,) * 20, None)],
                         ids=["four alike: a quarter", "a large one among small", "twenty alike: the ask"])
def test_prepare_says_what_it_held_out_where_whole_documents_miss_the_val_fraction(tmp_path, capsys, sizes, held):
    """Documents go to val whole, so --val-fraction 0.1 of four documents held out 25% of the characters (of five, a
    large one among them, 14% or 43%, by their names' order): prepare and data stats say so, with why; a share near
    the ask says nothing."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, size in enumerate(sizes):
        (corpus / f"part{i:02d}.txt").write_text(f"line of part {i:02d}\n" * 50 * size)
    assert main(["prepare", str(corpus), "--tokenizer", "char", "--out-dir", str(tmp_path), "--val-fraction",
                 "0.1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    meta = json.loads(next(tmp_path.glob("corpus-char/meta.json")).read_text())
    val, documents = meta["val"], len(sizes)
    share = 100 * val["characters"] / (val["characters"] + meta["train"]["characters"])
    sentence = (f"val: {share:.1f}% of the characters, not the 10% asked (--val-fraction 0.1): documents are split "
                f"whole, {val['documents']} of {documents} to val, of {val['characters'] / val['documents']:,.0f} "
                "characters on average")
    assert (sentence in said) == (held is not None) and (held is None or f"val: {held}" in sentence)
    assert main(["data", "stats", str(tmp_path / "corpus-char")]) == 0
    assert (sentence in " ".join(capsys.readouterr().out.split())) == (held is not None)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"a\n", "bad.txt is too short to split"),
])
def test_bad_corpora_are_refused_in_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare([str(path)], "char", out_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_bad_jsonl_and_missing_paths_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        prepare([str(path)], "char", out_dir=tmp_path / "data")
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], "char", out_dir=tmp_path / "data")


def test_a_prepare_cleans_up_what_a_killed_one_left(tmp_path, corpus_dir):
    data = tmp_path / "data"
    leftover = data / f".{corpus_dir.name}-char.old-99999999"
    (leftover / "train.bin").parent.mkdir(parents=True)
    (leftover / "train.bin").write_bytes(b"\0" * 1000)  # what a prepare --force killed in its clean-up leaves
    assert main(["prepare", str(corpus_dir), "--tokenizer", "char", "--out-dir", str(data)]) == 0
    assert not leftover.exists() and (data / f"{corpus_dir.name}-char" / "meta.json").exists()


def test_a_char_corpus_without_a_line_break_prepares(tmp_path):
    (tmp_path / "one.txt").write_text("to be or not to be, that is the question " * 200)
    target, meta, _ = prepare([str(tmp_path / "one.txt")], "char", out_dir=tmp_path / "data")
    assert "\n" in json.loads((target / "tokenizer.json").read_text())["model"]["vocab"]
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == 200 * 41 + 4  # and a "\n\n" after each part
