"""Streaming prepare: parquet / jsonl(.gz) sources, shards, resume after a kill, bounded memory,
dataset statistics and tiktoken tokenizers; a document of any length reaching the tokenizer in chunks."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import tokenizers
from tokenizers import Regex, pre_tokenizers

from lmlab.commands import main
from lmlab.core.errors import UserError
from lmlab.data.loader import BatchLoader, open_tokens
from lmlab.data.prepare import SEPARATOR, PrepareOptions, prepare
from lmlab.data.stats import dataset_stats, landing
from lmlab.data.tiktoken_bpe import GPT2_PATTERN
from lmlab.data.tokenizers import EOT, Tokenizer, chunk_spans
from tests.helpers import LMLAB, documents, split_tokens, tiny_tiktoken, write_jsonl


def write_parquet(path: Path, texts: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path, row_group_size=50)
    return path


def decoded_documents(dataset: Path) -> list[str]:
    meta = json.loads((dataset / "meta.json").read_text())
    tok = Tokenizer.load(dataset / "tokenizer.json", meta["tokenizer"])
    docs = []
    for split in ("train", "val"):
        ids = split_tokens(dataset, split)
        ends = np.flatnonzero(ids == tok.eot_id)
        docs += [tok.decode(piece) for piece in np.split(ids, ends + 1)[:-1]]
    return [d.removesuffix(EOT) for d in docs]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".jsonl.gz"])
@pytest.mark.slow
def test_parquet_and_jsonl_sources_hold_every_document(tmp_path, suffix):
    texts = documents(120)
    path = tmp_path / f"docs{suffix}"
    (write_parquet if suffix == ".parquet" else write_jsonl)(path, texts, field="body")
    target, meta, _ = prepare([str(path)], "bpe:300", out_dir=tmp_path / "data",
                              options=PrepareOptions(text_field="body", workers=2))
    assert target.name == "docs-bpe300"
    assert meta["train"]["documents"] + meta["val"]["documents"] == 120
    assert sorted(decoded_documents(target)) == sorted(texts)
    with pytest.raises(UserError, match="--text-field"):
        prepare([str(path)], "bpe:300", out_dir=tmp_path / "other")


def test_sharded_output_reads_back_as_the_single_file_output(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(300))
    single, one, _ = prepare([str(source)], "word:100", name="one", out_dir=tmp_path)
    sharded, many, _ = prepare([str(source)], "word:100", name="many", out_dir=tmp_path,
                               options=PrepareOptions(shard_tokens=700, workers=2))
    assert [s["file"] for s in one["shards"]["train"]] == ["train.bin"]
    files = [s["file"] for s in many["shards"]["train"]]
    assert len(files) > 3 and files[:2] == ["train_00000.bin", "train_00001.bin"]
    assert all(s["tokens"] == 700 for s in many["shards"]["train"][:-1])
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(single, split), split_tokens(sharded, split))
        assert one[split]["sha256"] == many[split]["sha256"]
    # The loader draws the same windows whether or not they cross shard boundaries.
    a = BatchLoader(open_tokens(single, "train", "uint16"), 64, 16, seed=3)
    b = BatchLoader(open_tokens(sharded, "train", "uint16"), 64, 16, seed=3)
    for _ in range(3):
        assert all(np.array_equal(x, y) for x, y in zip(a.next(), b.next()))


def test_a_dataset_without_a_shard_index_still_loads(tmp_path, char_dataset):
    meta = json.loads((char_dataset / "meta.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        (old / name).write_bytes((char_dataset / name).read_bytes())
    del meta["shards"], meta["options"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert np.array_equal(split_tokens(old, "train"), split_tokens(char_dataset, "train"))


def test_max_tokens_stops_at_a_document_boundary_and_takes_val_from_the_cut(tmp_path):
    texts = documents(200)
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    cut, meta, _ = prepare([str(source)], "word:100", name="cut", out_dir=tmp_path,
                           options=PrepareOptions(max_tokens=2000))
    train = split_tokens(cut, "train")
    assert 2000 <= len(train) < 2000 + 130 and train[-1] == meta["eot_id"]
    # val is --val-fraction of the cut (train being the rest), in whole documents: not a tenth of the whole corpus
    asked = meta["split"]["val_tokens"]
    assert asked == 223 == meta["val"]["tokens"]  # ceil(2000 x 0.1 / 0.9)
    # train is the corpus's documents in order, the val ones left out, until the cut
    tokenizer, val = Tokenizer.load(cut / "tokenizer.json", "word:100"), set(meta["split"]["val_documents"])
    stream = [i for n, text in enumerate(texts) if f"{source}:{n + 1}" not in val
              for i in [*tokenizer.encode(text), meta["eot_id"]]]
    assert np.array_equal(train, stream[:len(train)])


@pytest.mark.parametrize("spec", ["word:100", "char"])
def test_a_cut_of_long_documents_holds_out_its_share_cutting_the_document_that_passes_it(tmp_path, spec):
    """A --max-tokens cut's val split is --val-fraction of the cut, however long its documents: the one that would
    pass it is cut there (its end-of-text kept), its characters and bytes those of the text kept, and the rest of it
    in neither split."""
    texts = documents(40, words=(800, 1200))  # each passes the val split's ask several times over
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    cut, meta, _ = prepare([str(source)], spec, name="cut", out_dir=tmp_path, options=PrepareOptions(max_tokens=2000))
    tokenizer, eot = Tokenizer.load(cut / "tokenizer.json", meta["tokenizer"]), meta["eot_id"]
    asked, name = meta["split"]["val_tokens"], meta["split"]["cut_document"]
    assert asked == 223 == meta["val"]["tokens"] and meta["val"]["documents"] == 1
    assert meta["split"]["val_documents"] == [name]
    text = texts[int(name.rsplit(":", 1)[1]) - 1]
    kept = asked - (eot is not None)
    encoding = tokenizer.backend.encode(text)
    assert split_tokens(cut, "val").tolist() == encoding.ids[:kept] + ([eot] if eot is not None else [])
    end = encoding.offsets[kept - 1][1]
    assert (meta["val"]["characters"], meta["val"]["bytes"]) == (end, len(text[:end].encode()))
    ends = [[eot]] if eot is not None else []
    stream = [i for n, doc in enumerate(texts) if f"{source}:{n + 1}" != name
              for piece in [tokenizer.encode(doc if ends else doc + SEPARATOR), *ends] for i in piece]
    train = split_tokens(cut, "train")
    assert 2000 <= len(train) and train.tolist() == stream[:len(train)]


@pytest.mark.slow
def test_prepare_says_how_far_from_each_ask_its_split_landed(tmp_path, capsys):
    """Whole documents pass an ask by part of one, and a cut larger than the corpus stops short: each said in a line
    with the tokens, the ask and the gap, by prepare and by data stats."""
    source = write_jsonl(tmp_path / "docs.jsonl", documents(200))
    for name, cut in (("cut", 2000), ("all", 10**9)):
        assert main(["prepare", str(source), "--tokenizer", "word:100", "--out-dir", str(tmp_path), "--name", name,
                     "--max-tokens", str(cut)]) == 0
        said = " ".join(capsys.readouterr().out.split())
        meta = json.loads((tmp_path / f"{name}-word100" / "meta.json").read_text())
        train, val, asked = meta["train"], meta["val"], meta["split"]["val_tokens"]
        if cut == 2000:
            assert (f"train: {train['tokens']:,} tokens, {100 * (train['tokens'] / 2000 - 1):.1f}% over the 2,000 "
                    f"asked (--max-tokens): whole documents, of {train['tokens'] / train['documents']:,.0f} tokens "
                    "on average") in said
            # the split's keys hash the file's path, so whether its last document fits exactly varies by folder
            cut_document = meta["split"].get("cut_document")
            why = (f"its last document, {cut_document}, cut there" if cut_document else
                   f"whole documents, of {asked / val['documents']:,.0f} tokens on average")
            assert (f"val: {asked:,} tokens, the {asked:,} asked (--val-fraction 0.1 of the --max-tokens cut): "
                    f"{why}") in said and val["tokens"] == asked
        else:
            assert (f"train: {train['tokens']:,} tokens, {100 * (1 - train['tokens'] / cut):.1f}% short of the "
                    f"{cut:,} asked (--max-tokens): the corpus ended first") in said
        assert main(["data", "stats", str(tmp_path / f"{name}-word100")]) == 0
        landing = said[said.index("train: "):]  # the last lines: data stats says them too
        assert landing in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("got, cut, said", [
    (223, "docs.jsonl:9", "val: 223 tokens, the 223 asked (--val-tokens): its last document, docs.jsonl:9, cut there"),
    (223, None, "val: 223 tokens, the 223 asked (--val-tokens): whole documents, of 74 tokens on average"),
    (230, None, "val: 230 tokens, 3.1% over the 223 asked (--val-tokens): whole documents, of 77 tokens on average"),
    (200, None, "val: 200 tokens, 10.3% short of the 223 asked (--val-tokens): the corpus ended first"),
])
def test_a_val_split_sized_in_tokens_says_where_it_landed_for_every_outcome(got, cut, said):
    """Cut at its ask, filled exactly by whole documents, passed by part of one, or short: one sentence each."""
    meta = {"options": {"val_tokens": 223}, "split": {"val_fraction": 0.1, "val_tokens": 223,
                                                     **({"cut_document": cut} if cut else {})},
            "train": {"tokens": 2000, "documents": 30}, "val": {"tokens": got, "documents": 3}}
    assert landing(meta) == [said]


@pytest.mark.parametrize("val, rule, said", [
    (1000, "whole documents by sha256 of name", None),  # the ask
    (1090, "whole documents by sha256 of name", None),  # within a tenth of it
    (1220, "whole documents by sha256 of name", "val: 12.2% of the characters, not the 10% asked"),
    (2200, "whole documents by sha256 of name", "val: 22.0% of the characters, not the 10% asked"),  # round 8's
    (800, "whole documents by sha256 of name", "val: 8.0% of the characters, not the 10% asked"),  # n - 1 at most
    (2200, "tail of the only document", None),  # cut at a line, not whole documents
])
def test_a_val_split_of_whole_documents_far_from_its_fraction_says_what_it_held_out(val, rule, said):
    """Over the range of shares whole documents can take of --val-fraction 0.1's ask: within a tenth of it nothing is
    said; farther, above or below, one sentence with the share, the ask and why."""
    meta = {"options": {}, "split": {"rule": rule, "val_fraction": 0.1},
            "train": {"characters": 10_000 - val, "documents": 30}, "val": {"characters": val, "documents": 4}}
    lines = landing(meta)
    assert lines == ([] if said is None else [f"{said} (--val-fraction 0.1): documents are split whole, 4 of 34 to "
                                              f"val, of {val / 4:,.0f} characters on average"])


def test_val_tokens_sizes_the_val_split(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(300))
    _, meta, _ = prepare([str(source)], "word:100", out_dir=tmp_path, val_fraction=0.5,
                         options=PrepareOptions(val_tokens=1500))
    assert 1500 <= meta["val"]["tokens"] < 1500 + 130
    assert meta["split"]["val_tokens"] == 1500


@pytest.mark.slow
def test_data_stats_prints_document_lengths_and_draws_a_histogram(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(100, words=(5, 60)) + documents(10, 1, (300, 400)))
    target, _, _ = prepare([str(source)], "word:100", out_dir=tmp_path)
    stats = dataset_stats(target, block_size=128)
    assert stats["documents"] == 110 and len(stats["lengths"]) == 110
    assert stats["share_documents_beyond"] == pytest.approx(10 / 110)
    assert stats["p99"] > 128 > stats["median"]
    out = subprocess.run([sys.executable, "-m", "lmlab", "data", "stats", str(target), "--block-size", "128"],
                         capture_output=True, text=True, check=True).stdout
    assert "tokens per document" in out and "9.1% of documents" in out
    assert (target / "doc_lengths.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_equals_an_uninterrupted_one(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(6000, words=(20, 200)))
    command = [sys.executable, "-m", "lmlab", "prepare", str(source), "--tokenizer", "word:100", "--workers", "1",
               "--shard-tokens", "2000", "--out-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = tmp_path / "data" / ".docs-word100.partial" / "progress.json"
    while not record.exists() and proc.poll() is None:  # the first finished shard writes the progress record
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record.exists() and not (tmp_path / "data" / "docs-word100").exists()
    done = json.loads(record.read_text())["docs_done"]
    assert 0 < done < 6000
    first_shard = (record.parent / "train_00000.bin").stat().st_mtime_ns
    subprocess.run(command, check=True, capture_output=True)
    prepare([str(source)], "word:100", name="whole", out_dir=tmp_path / "data")
    resumed = tmp_path / "data" / "docs-word100"
    assert not record.parent.exists()
    assert (resumed / "train_00000.bin").stat().st_mtime_ns == first_shard  # kept, not written again
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(resumed, split), split_tokens(tmp_path / "data" / "whole-word100", split))


def _peak_rss_kib(source: Path, out: Path) -> int:
    """Peak RSS of the largest process of a `lmlab prepare` run (the parent or one worker)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", probe, sys.executable, "-m", "lmlab", "prepare", str(source), "--tokenizer",
               "word:1000", "--workers", "1", "--shard-tokens", "100000", "--out-dir", str(out)]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
def test_memory_stays_bounded_as_the_corpus_grows(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", documents(1_000, words=(50, 500)))
    large = write_jsonl(tmp_path / "large.jsonl", documents(16_000, 1, words=(50, 500)))
    assert large.stat().st_size > 10 * 2**20  # > 16× the small corpus, ~5× the in-flight batches of text
    grown = _peak_rss_kib(large, tmp_path / "b") - _peak_rss_kib(small, tmp_path / "a")
    # Holding the extra ~9 MB of text and its ~2.6M token ids in Python lists, as a whole-corpus prepare
    # does, costs well over 50 MB; streaming holds a few batches and one 100k-token shard buffer.
    assert grown < 16 * 2**10, f"peak RSS grew by {grown / 2**10:.1f} MiB"


def test_tiktoken_encodes_end_of_text_in_a_document_as_text(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    ranks = tiny_tiktoken(tmp_path / "tiktoken")
    enc = tiktoken.Encoding("tiny", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    texts = documents(30) + [f"the end {EOT} and then the rest — ünïcödé 🙂"]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    target, meta, _ = prepare([str(source)], "tiktoken:tiny", out_dir=tmp_path / "data")
    assert meta["eot_id"] == len(ranks) and meta["vocab_size"] == len(ranks) + 1
    tokens = np.concatenate([split_tokens(target, "train"), split_tokens(target, "val")])
    assert (tokens == meta["eot_id"]).sum() == len(texts)  # only the separators, not the literal one
    assert sorted(decoded_documents(target)) == sorted(texts)
    tok = Tokenizer.load(target / "tokenizer.json", meta["tokenizer"])  # what sample and eval load
    for text in texts[-2:]:
        assert tok.encode(text) == enc.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(UserError, match="not available here"):
        prepare([str(source)], "tiktoken:nosuchencoding", out_dir=tmp_path / "data")


def test_val_tokens_gives_at_least_what_is_asked_or_refuses_with_what_it_can(tmp_path, capsys):
    """Asked 1,500 val tokens, prepare gives at least that many even where the documents in the lowest
    --val-fraction of the key range hold fewer (its candidates sized at the tokenizer's measured characters per
    token), or refuses saying what it can give: never fewer, silently."""
    source = write_jsonl(tmp_path / "docs.jsonl", documents(200))
    out = tmp_path / "data"
    for asked in (1500, 6000):  # 6,000: more than the lowest tenth of the keys holds
        assert main(["prepare", str(source), "--tokenizer", "word:100", "--out-dir", str(out), "--name",
                     f"v{asked}", "--val-tokens", str(asked)]) == 0
        meta = json.loads((out / f"v{asked}-word100" / "meta.json").read_text())
        assert asked <= meta["val"]["tokens"] < asked + 130 and meta["split"]["val_tokens"] == asked
    capsys.readouterr()
    assert main(["prepare", str(source), "--tokenizer", "word:100", "--out-dir", str(out), "--name", "all",
                 "--val-tokens", "1000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: --val-tokens 1000000 asks for a val split of 1,000,000 tokens, but this corpus's "
                        r"documents, less one for train, hold about [\d,]+ \(at [\d.]+ characters a token\); ask for "
                        r"at most that, or give a larger corpus\.", err), err
    assert not (out / "all-word100").exists() and not list(out.glob(".all*"))  # nothing left behind


def messy_text(n_pieces: int, seed: int = 0) -> str:
    """Words, numbers, punctuation, contractions, runs of spaces, tabs and line breaks, accents, CJK, emoji."""
    rng = random.Random(seed)
    words = ["the", "Thou", "it's", "WE'LL", "café", "naïve", "12", "3.14", "1999,", "(see", "this)", "—", "...",
             "中文", "句子。", "🙂", "a/b", "x_y", "HTTPServer", "don't"]
    gaps = [" ", " ", " ", "  ", "\t", "\n", "\n\n", " \n", ".\n", "!\n\n", "\r\n", "   \n "]
    return "".join(rng.choice(words) + rng.choice(gaps) for _ in range(n_pieces))


CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
          r"""\s+(?!\S)|\s+""")


O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K, O200K], ids=["gpt2", "cl100k", "o200k"])
@pytest.mark.slow
def test_chunks_are_cut_where_every_pre_tokenizer_cuts_anyway(pattern):
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    text = messy_text(20_000)
    whole = [piece for piece, _ in split.pre_tokenize_str(text)]
    spans = list(chunk_spans(text, 0, len(text), "bpe", size=500))
    assert len(spans) > 100 and all(b - a <= 500 for a, b in spans)
    assert [piece for a, b in spans for piece, _ in split.pre_tokenize_str(text[a:b])] == whole


@pytest.mark.parametrize("spec", ["char", "word:300", "bpe:400"])
@pytest.mark.slow
def test_a_long_document_gets_the_ids_it_would_get_whole(tmp_path, spec):
    source = tmp_path / "one.txt"
    source.write_text(messy_text(60_000, seed=1), encoding="utf-8")  # ~350k characters: chunks of 65,536
    text = source.read_text(encoding="utf-8")  # as prepare reads it (\r\n as \n)
    target, meta, _ = prepare([str(source)], spec, out_dir=tmp_path / "data")
    tok = tokenizers.Tokenizer.from_file(str(target / "tokenizer.json"))
    ids = np.concatenate([np.fromfile(target / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val")])
    cut = meta["split"]["cut_at_char"]
    parts = [text[:cut], text[cut:]]
    if spec == "char":
        expected = [i for part in parts for i in tok.encode(part.rstrip("\n") + "\n\n").ids]
    else:
        expected = [i for part in parts for i in [*tok.encode(part).ids, meta["eot_id"]]]
    assert ids.tolist() == expected


def _peak_rss_mib(*args: str) -> float:
    """The high-water RSS of the largest process of `lmlab ARGS` (the command or one of its workers)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, LMLAB, *args], capture_output=True, text=True, check=True)
    return int(done.stdout) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_prepare_of_a_one_line_document_grows_its_memory_by_a_few_times_the_text(tmp_path, spec):
    """A document with no line break to split it at is read in chunks: from a 2 MB to a 10 MB one, the peak RSS grows
    by at most 10× the text added (its shards, and the tokenizer's work on a chunk), where before chunking it was
    hundreds of times the document. Two sizes, so the interpreter's and torch's own memory is no part of the
    figure."""
    words = "love night day sweet death fair heaven soul heart light dark moon sun star".split()
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(2_000_000))  # no line break at all
    peaks = {}
    for megabytes in (2, 10):
        source = tmp_path / f"one-line-{megabytes}.txt"
        source.write_text(line[:megabytes * 1_000_000], encoding="utf-8")
        peaks[megabytes] = _peak_rss_mib("prepare", str(source), "--tokenizer", spec, "--out-dir", str(tmp_path))
        meta = json.loads((tmp_path / f"{source.stem}-{spec.replace(':', '')}" / "meta.json").read_text())
        assert meta["train"]["characters"] + meta["val"]["characters"] >= megabytes * 1_000_000
    added = 8 * 1_000_000 / 2**20  # MiB of text
    assert peaks[10] - peaks[2] < 10 * added, f"peak RSS {peaks}"
