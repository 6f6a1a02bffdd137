import pytest

from lmlab.core.errors import UserError
from lmlab.data.tokenizers import EOT, KINDS, UNK, parse_spec, train_tokenizer

TRAIN = ["The cat sat on the mat.\nThe dog sat on the log!\n", "A cat, a dog; the end.\n\n  Spaces   stay.\n"]
ARBITRARY = "Ünïcödé — “quotes”, emoji 🙂, tabs\tand\r\nCRLF, 12345 numbers & symbols {}[]<>\n"


def test_parse_spec_accepts_the_three_kinds_and_rejects_others():
    assert parse_spec("char") == ("char", 0)
    assert parse_spec("word:1000") == ("word", 1000)
    assert parse_spec("bpe:4096") == ("bpe", 4096)
    for bad in ("bpe", "bpe:100", "word:x", "sentencepiece:10", "char:5"):
        with pytest.raises(UserError):
            parse_spec(bad)


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
    assert (char.eot_id, char.kind.end_of_text) == (None, False)  # documents apart by a blank line
    assert word.kind.end_of_text and bpe.kind.end_of_text and word.eot_id is not None
    assert (word.kind.unknown, bpe.kind.unknown) == (UNK, None)
    # the longest prompt that may fit 8 tokens, and the longest that surely does
    assert word.most_chars(8) is None and char.most_chars(8) == 8
    assert bpe.most_chars(8) == 8 * max(map(len, bpe.vocab))
    assert (char.fewest_chars(10), word.fewest_chars(10), bpe.fewest_chars(10)) == (10, 10, 2)
    assert [k.gguf for k in (char.kind, word.kind, bpe.kind)] == ["rwkv", None, "gpt2"]
    assert [k.name for k in KINDS.values() if k.trained] == ["char", "word", "bpe"]
    for kind in KINDS.values():  # every kind's spec as written reads back as that kind
        spec = kind.written.replace(":N", f":{max(kind.minimum, 1)}").replace(":NAME", ":gpt2")
        assert parse_spec(spec)[0] == kind.name
