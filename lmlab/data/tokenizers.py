"""Tokenizers, all built on the `tokenizers` library so that one file format (tokenizer.json) loads them.

- `char`: one token per character seen in the corpus.
- `word:N`: the N most frequent words of the training split, GPT-2-style pre-tokenized (a word keeps its
  leading space, so decoding restores spacing), plus `<unk>` for the rest.
- `bpe:N`: byte-level BPE with N tokens trained on the training split; never needs `<unk>`.
- `gpt2`: OpenAI's GPT-2 byte-level BPE, read from local files (see `load_gpt2`), never downloaded.
The non-char tokenizers put `<|endoftext|>` between documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmlab.errors import UserError

EOT = "<|endoftext|>"
UNK = "<unk>"
GPT2_DIR_ENV = "LMLAB_GPT2_DIR"  # where `gpt2` looks for its files when no folder is passed


def parse_spec(spec: str) -> tuple[str, int]:
    """`char` -> ("char", 0); `word:1000` -> ("word", 1000); `bpe:4096` -> ("bpe", 4096); `gpt2` -> ("gpt2", 0)."""
    kind, _, size = spec.partition(":")
    if kind in ("char", "gpt2") and not size:
        return kind, 0
    if kind in ("word", "bpe") and size.isdigit():
        n = int(size)
        minimum = 257 if kind == "bpe" else 1  # byte-level BPE starts from 256 bytes + EOT
        if n >= minimum:
            return kind, n
        raise UserError(f"tokenizer {spec}: {kind} needs N >= {minimum}.")
    raise UserError(f"unknown tokenizer {spec!r}; use char, word:N, bpe:N (e.g. bpe:4096) or gpt2.")


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


def load_gpt2(folder: Path | None = None) -> Tokenizer:
    """GPT-2's tokenizer from `folder`, else from $LMLAB_GPT2_DIR: a Hugging Face tokenizer dir with
    tokenizer.json, or OpenAI's vocab.json + merges.txt (built here into the same byte-level BPE)."""
    folder = folder or (Path(os.environ[GPT2_DIR_ENV]) if os.environ.get(GPT2_DIR_ENV) else None)
    where = f"--gpt2-dir DIR or ${GPT2_DIR_ENV}"
    if folder is None:
        raise UserError(f"tokenizer gpt2 reads GPT-2's tokenizer files from disk: pass {where} naming a folder "
                        "with tokenizer.json, or vocab.json and merges.txt (e.g. a downloaded Hugging Face gpt2).")
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([EOT])  # already in GPT-2's vocab (id 50256); this keeps it whole in text
    else:
        raise UserError(f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt; point {where} at "
                        "a folder with GPT-2's tokenizer files.")
    if EOT not in backend.get_vocab():
        raise UserError(f"the tokenizer in {folder} has no {EOT} token, so it is not GPT-2's; check the folder.")
    return Tokenizer("gpt2", backend)


def tokenizer_identity(path: Path) -> str:
    """A digest of what a tokenizer.json maps (vocabulary, merges, special tokens) but not how the file is
    laid out, so the same tokenizer saved from tokenizer.json or from vocab.json + merges.txt is equal."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    model = raw.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = sorted(t["content"] for t in raw.get("added_tokens", []))
    facts = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "special": specials}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def train_tokenizer(spec: str, train_texts: list[str], all_texts: list[str],
                    gpt2_dir: Path | None = None) -> Tokenizer:
    """Build the tokenizer for `spec`; char uses every character of the corpus, the others the train split,
    and gpt2 is read from `gpt2_dir` (see `load_gpt2`)."""
    kind, size = parse_spec(spec)
    if kind == "gpt2":
        return load_gpt2(gpt2_dir)
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
