"""Tokenizers, all built on the `tokenizers` library so that one file format (tokenizer.json) loads them.

- `char`: one token per character seen in the corpus.
- `word:N`: the N most frequent words of the training split, GPT-2-style pre-tokenized (a word keeps its
  leading space, so decoding restores spacing), plus `<unk>` for the rest.
- `bpe:N`: byte-level BPE with N tokens trained on the training split; never needs `<unk>`.
The non-char tokenizers put `<|endoftext|>` between documents.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmlab.errors import UserError

EOT = "<|endoftext|>"
UNK = "<unk>"


def parse_spec(spec: str) -> tuple[str, int]:
    """`char` -> ("char", 0); `word:1000` -> ("word", 1000); `bpe:4096` -> ("bpe", 4096)."""
    kind, _, size = spec.partition(":")
    if kind == "char" and not size:
        return kind, 0
    if kind in ("word", "bpe") and size.isdigit():
        n = int(size)
        minimum = 257 if kind == "bpe" else 1  # byte-level BPE starts from 256 bytes + EOT
        if n >= minimum:
            return kind, n
        raise UserError(f"tokenizer {spec}: {kind} needs N >= {minimum}.")
    raise UserError(f"unknown tokenizer {spec!r}; use char, word:N or bpe:N (e.g. bpe:4096).")


class Tokenizer:
    """A trained tokenizer plus the lmlab facts about it (spec, end-of-text id)."""

    def __init__(self, spec: str, backend: tokenizers.Tokenizer):
        self.spec = spec
        self.kind, _ = parse_spec(spec)
        self.backend = backend
        self.vocab = backend.get_vocab()
        self.eot_id = self.vocab.get(EOT)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def check(self, text: str, where: str) -> None:
        """Char tokenizers have no `<unk>`: refuse text with characters the corpus never had."""
        if self.kind == "char":
            unseen = sorted(set(text) - self.vocab.keys())
            if unseen:
                raise UserError(
                    f"{where} contains characters the char tokenizer never saw ({''.join(unseen)!r}); "
                    "remove them or prepare the dataset from a corpus that has them."
                )

    def encode(self, text: str) -> list[int]:
        self.check(text, "the text")
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            self.check(text, "the corpus")
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: Path, spec: str) -> Tokenizer:
        return cls(spec, tokenizers.Tokenizer.from_file(str(path)))


def train_tokenizer(spec: str, train_texts: list[str], all_texts: list[str]) -> Tokenizer:
    """Build the tokenizer for `spec`; char uses every character of the corpus, the others the train split."""
    kind, size = parse_spec(spec)
    if kind == "char":
        chars = sorted(set().union(*map(set, all_texts)))
        backend = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return Tokenizer(spec, backend)
    if kind == "word":
        backend = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(vocab_size=size + 2, special_tokens=[UNK, EOT], show_progress=False)
    else:
        backend = tokenizers.Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(train_texts, trainer)
    return Tokenizer(spec, backend)
