import base64
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

import lmlab
from lmlab.commands import main
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import (
    EOT,
    TOKENIZER_KINDS,
    UNK,
    Tokenizer,
    TokenizerKind,
    load_pretrained,
    parse_spec,
    train_tokenizer,
)
from lmlab.gguf.vocab import UNUSED, Vocab, gguf_vocab
from lmlab.hf import check_label
from lmlab.hf.folder import write_tokenizer
from tests.helpers import write_corpus

TRAIN = ["The cat sat on the mat.\nThe dog sat on the log!\n", "A cat, a dog; the end.\n\n  Spaces   stay.\n"]
ARBITRARY = "Ünïcödé — “quotes”, emoji 🙂, tabs\tand\r\nCRLF, 12345 numbers & symbols {}[]<>\n"


def test_parse_spec_accepts_the_three_kinds_and_rejects_others():
    assert parse_spec("char") == ("char", 0)
    assert parse_spec("word:1000") == ("word", 1000)
    assert parse_spec("bpe:4096") == ("bpe", 4096)
    for bad in ("bpe", "bpe:100", "word:x", "sentencepiece:10", "char:5"):
        with pytest.raises(UserError):
            parse_spec(bad)



SIZED = [kind for kind in TOKENIZER_KINDS.values() if kind.argument == "N"]


def _bad_sizes(kind: TokenizerKind) -> list[str]:
    """Sizes out of the kind's range, past what the tokenizers library takes, or not a whole number as written."""
    return [str(kind.minimum - 1), str(kind.maximum + 1), str(2**32), str(10**20), "9" * 5000, "-5", "", " 300",
            "3e5", "300.0", "²", "٣٠٠"]


@pytest.mark.parametrize("kind", SIZED, ids=str)
def test_every_sized_kind_takes_its_range_and_refuses_the_rest_in_one_sentence(kind):
    for size in (kind.minimum, kind.maximum):
        assert parse_spec(f"{kind.name}:{size}") == (kind.name, size)
    # the largest size trains (the trainer reserves room for it before it reads a text)
    assert train_tokenizer(f"{kind.name}:{kind.maximum}", TRAIN, TRAIN).vocab_size <= kind.maximum + 2
    for size in _bad_sizes(kind):
        with pytest.raises(UserError) as refused:
            parse_spec(f"{kind.name}:{size}")
        said = str(refused.value)
        assert f"{kind.name}:N takes a whole number N from {kind.minimum:,} to {kind.maximum:,} ({kind.sizes})" in said
        assert len(said) < 300 and "\n" not in said, said


@pytest.mark.parametrize("kind", SIZED, ids=str)
def test_prepare_refuses_a_size_out_of_range_before_it_reads_or_writes_from_the_cli_and_the_api(kind, tmp_path,
                                                                                                  capsys):
    corpus, out = write_corpus(tmp_path / "corpus", n_docs=2, speeches=5), tmp_path / "data"
    for size in _bad_sizes(kind):
        spec = f"{kind.name}:{size}"
        assert main(["prepare", str(corpus), "--tokenizer", spec, "--out-dir", str(out), "--shard-tokens", "1000"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: tokenizer ") and err.count("\n") == 1 and f"{kind.name}:N takes" in err, err
        with pytest.raises(UserError, match=f"{kind.name}:N takes a whole number N from {kind.minimum:,}"):
            lmlab.prepare(corpus, tokenizer=spec, out_dir=out, shard_tokens=1000)
        assert not out.exists()

def test_char_round_trip_and_unseen_characters_are_refused():
    tok = train_tokenizer("char", TRAIN, TRAIN)
    text = "The dog sat; a cat, the end!\n\n  "
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eot_id is None
    assert tok.vocab_size == len(set("".join(TRAIN)))
    with pytest.raises(UserError, match="never saw"):
        tok.encode("zebra")


def test_bpe_round_trips_arbitrary_text_and_has_end_of_text():
    tok = train_tokenizer("bpe:300", TRAIN, TRAIN)
    assert tok.vocab_size <= 300
    assert tok.eot_id == tok.vocab[EOT]
    for text in TRAIN + [ARBITRARY]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The cat sat on the mat.")) < len("The cat sat on the mat.")


def test_word_round_trips_known_words_and_maps_the_rest_to_unk():
    tok = train_tokenizer("word:100", TRAIN, TRAIN)
    assert tok.vocab_size < 100  # the corpus has fewer distinct words than asked for
    known = "The cat sat on the mat."
    assert tok.decode(tok.encode(known)) == known
    ids = tok.encode("The zebra sat")
    assert tok.vocab[UNK] in ids
    assert tok.decode(ids) == f"The{UNK} sat"
    # Arbitrary text never fails: what the vocabulary lacks becomes <unk>.
    assert UNK in tok.decode(tok.encode(ARBITRARY))


def test_word_keeps_only_the_most_frequent_words():
    tok = train_tokenizer("word:3", TRAIN, TRAIN)
    assert tok.vocab_size == 3 + 2
    assert "Ġthe" in tok.vocab  # the most frequent word, with its leading space


def test_each_tokenizer_kind_answers_what_the_commands_ask_of_it():
    texts = ["the cat sat on the mat\n", "a dog ran\n"]
    char, word, bpe = (train_tokenizer(spec, texts, texts) for spec in ("char", "word:10", "bpe:300"))
    assert (char.eot_id, char.kind.per_character) == (None, True)  # documents apart by a blank line
    assert not word.kind.per_character and not bpe.kind.per_character and word.eot_id is not None
    assert (word.kind.unknown, bpe.kind.unknown) == (UNK, None)
    # the longest prompt that may fit 8 tokens
    assert word.most_chars(8) is None and char.most_chars(8) == 8
    assert bpe.most_chars(8) == 8 * max(map(len, bpe.vocab))
    assert [k.gguf for k in (char.kind, word.kind, bpe.kind)] == ["rwkv", None, "gpt2"]


# The contract every entry of TOKENIZER_KINDS meets, so a new kind needs no test of its own: built as `prepare` builds
# it (or, for a kind only read from a folder, read as another model's tokenizer), it round-trips text, saves and loads,
# exports to Hugging Face and reads back as itself, and goes to GGUF as its entry says, or is refused there.
TEXTS = [*TRAIN, ARBITRARY]
UNSEEN = "a never seen text: zebra ✓ 𝄞"


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A folder with a byte-level BPE that has <|endoftext|>, as GPT-2's files would be."""
    folder = tmp_path_factory.mktemp("gpt2")
    train_tokenizer("bpe:300", TEXTS, TEXTS).save(folder / "tokenizer.json")
    return folder


def _tiny_tiktoken(folder: Path) -> None:
    """tiny.tiktoken: every byte, then tokens that their merges make (so GGUF's BPE reads it as tiktoken does)."""
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" t", b" the", b"er", b"<|", b"|>", b"en", b"end"]
    folder.mkdir()
    (folder / "tiny.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def _made(kind: TokenizerKind, folder: Path, gpt2_dir: Path) -> Tokenizer:
    if kind.build is None:  # read from a folder: another model's tokenizer, with its eos named
        train_tokenizer("bpe:300", TEXTS, TEXTS).save(folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
        return load_pretrained(folder)
    argument = {"": "", "N": f":{max(kind.minimum, 300)}", "NAME": ":tiny"}[kind.argument]  # tiktoken's tiny file
    spec = kind.name + argument
    return train_tokenizer(spec, TEXTS, TEXTS, gpt2_dir)


def _rwkv_ids(vocab: Vocab) -> Callable[[str], list[int]]:
    """What llama.cpp's `rwkv` tokenizer does with a vocabulary: the longest token at each place."""
    unescape = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}
    texts = {re.sub(r"\\[ntr\\]", lambda m: unescape[m.group()], t): i for i, t in enumerate(vocab.tokens)
             if vocab.types[i] != UNUSED}

    def ids(text: str) -> list[int]:
        out, at = [], 0
        while at < len(text):
            size = next((n for n in range(len(text) - at, 0, -1) if text[at:at + n] in texts), None)
            assert size is not None, f"no token of the GGUF vocabulary starts {text[at:at + 8]!r}"
            out.append(texts[text[at:at + size]])
            at += size
        return out

    return ids


def _gpt2_ids(vocab: Vocab) -> Callable[[str], list[int]]:
    """What llama.cpp's `gpt2` tokenizer does with a vocabulary: GPT-2's split, then the merges in their order."""
    assert vocab.pre == "gpt-2" and vocab.merges, "llama.cpp loads a gpt2 vocabulary only with its merges"
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(vocab.tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return lambda text: backend.encode(text, add_special_tokens=False).ids


GGUF_READERS = {"rwkv": _rwkv_ids, "gpt2": _gpt2_ids}  # one per GGUF tokenizer model of lmlab.gguf.vocab.WRITERS


def test_every_kind_prepare_builds_has_a_spec_the_export_tests_train():
    """tests/test_hf_tokenizers.py exports a run of each kind of tests/hf_reference.py's KINDS to transformers and
    llama.cpp themselves: a kind missing there is never checked against them."""
    from tests.hf_reference import KINDS

    built = {name for name, kind in TOKENIZER_KINDS.items() if kind.build}
    assert set(KINDS) == built, f"give tests/hf_reference.py's KINDS a spec for {sorted(built - set(KINDS))}"
    assert all(parse_spec(spec)[0] == name for name, spec in KINDS.items())


@pytest.mark.parametrize("name", TOKENIZER_KINDS)
def test_every_kind_builds_round_trips_saves_loads_and_exports_as_its_entry_says(name, tmp_path, gpt2_dir,
                                                                                 monkeypatch):
    kind = TOKENIZER_KINDS[name]
    _tiny_tiktoken(tmp_path / "tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    (tmp_path / "other-model").mkdir()
    tok = _made(kind, tmp_path / "other-model", gpt2_dir)
    assert tok.kind is kind and parse_spec(tok.spec)[0] == name and (tok.eot_id is None) == kind.per_character
    texts = TEXTS + ([] if kind.per_character else [UNSEEN])
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text or (kind.unknown and kind.unknown in tok.decode(ids)), text
        # a character takes at most its UTF-8 bytes' tokens (one, in a vocabulary of characters or words)
        assert all(len(tok.encode(c, special=False)) <= len(c.encode()) for c in set(text)), text
    # saved and loaded, and exported to a Hugging Face folder and read back (import-hf's check of its label too)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json", tok.spec, tok.eot_id)
    (tmp_path / "hf").mkdir()
    write_tokenizer(tmp_path / "hf", tok, 64)
    back = load_pretrained(tmp_path / "hf")
    check_label(back, tmp_path / "hf")
    assert (back.spec, back.kind, back.eot_id) == (tok.spec, kind, tok.eot_id)
    for text in texts:
        assert loaded.encode(text) == back.encode(text) == tok.encode(text)
    # GGUF: the tokenizer its entry names, which reads the text into lmlab's ids as llama.cpp would; or refused
    if kind.gguf is None:
        with pytest.raises(UserError, match="export-gguf takes"):
            gguf_vocab(tok, tok.vocab_size, "the run")
        return
    vocab = gguf_vocab(tok, tok.vocab_size + 3, "the run")
    assert vocab.model == kind.gguf and len(vocab.tokens) == tok.vocab_size + 3
    read = GGUF_READERS[vocab.model](vocab)
    for text in texts:
        assert read(text) == tok.encode(text, special=False), text
