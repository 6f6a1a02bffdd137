"""Tokenizers, each kind an entry of TOKENIZER_KINDS, all built on the `tokenizers` library so that one file format
(tokenizer.json) loads them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmlab.core.config import as_text
from lmlab.core.errors import UserError
from lmlab.core.fileio import a_file, atomic_write_text, read_text
from lmlab.core.jsontext import json_sha256, parse_json
from lmlab.data.tiktoken_bpe import tiktoken_backend

EOT = "<|endoftext|>"
UNK = "<unk>"
GPT2_DIR_ENV = "LMLAB_GPT2_DIR"  # where `gpt2` looks for its files when no folder is passed
NAME = re.compile(r"[A-Za-z0-9._-]+")  # a tiktoken encoding's or a pretrained tokenizer's name
NAME_PART = re.compile(r"[^A-Za-z0-9._-]+")  # what a folder's name loses to become a NAME

CHUNK_CHARS = 1 << 16  # a longer text is tokenized in chunks of at most this many characters

_SURROGATE = re.compile("[\ud800-\udfff]")  # never in text decoded strictly: a broken escape or a non-UTF-8 byte
# Where every pre-tokenizer lmlab uses (GPT-2's, cl100k's, o200k's) starts a pre-token whatever surrounds it, so
# text cut there encodes to the same ids in chunks as whole.
# The greedy prefix makes a match end at the last such place in the span it is given.
_LAST_SAFE_CUT = re.compile(r"[\s\S]*((?<=\S)[ \t]|(?<=[^\W_])[\r\n])")


# (spec's argument, train split's texts, every text, GPT-2's folder) -> the `tokenizers` tokenizer.
Build = Callable[[str, Iterable[str], list[str], Path | None], tokenizers.Tokenizer]


@dataclass(frozen=True, kw_only=True)
class TokenizerKind:
    """A kind of tokenizer, written `name`, `name:N` (a size from `minimum` to `maximum`, for the reason `sizes`
    gives) or `name:NAME`. What decides a format has no default, so every entry states it (`build`, `model`,
    `gguf`)."""

    name: str
    build: Build | None  # how `prepare` makes it; None: only how lmlab records a tokenizer read from a folder
    model: str | None  # the tokenizers library's model its tokenizer.json holds; None: any (another model's)
    gguf: str | None  # the tokenizer model GGUF holds it as; None: none can (export-gguf refuses it)
    argument: str = ""
    minimum: int = 0
    maximum: int = 0
    sizes: str = ""  # why N is held between `minimum` and `maximum`, in the refusal of a size outside them
    trained: bool = False  # built from the corpus by `prepare`; else read as it is, from files
    # one token per character: no end-of-text token, text cut anywhere, an unseen character refused
    per_character: bool = False
    unknown: str | None = None  # the token that stands for text it has no tokens for (an export names it)

    @property
    def named(self) -> bool:
        return self.build is not None

    @property
    def written(self) -> str:
        return f"{self.name}:{self.argument}" if self.argument else self.name

    def __str__(self) -> str:  # the kind's name, as messages and the tests' parameter ids print it
        return self.name


def _char(argument: str, train_texts: Iterable[str], all_texts: list[str], gpt2_dir: Path | None
          ) -> tokenizers.Tokenizer:
    chars = sorted(set().union(*map(set, all_texts)))  # every character of the corpus, the val split's too
    backend = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def _byte_level(backend: tokenizers.Tokenizer, trainer: trainers.Trainer | None = None, texts: Iterable[str] = ()
                ) -> tokenizers.Tokenizer:
    """GPT-2's byte-level split and decoder, trained on `texts` by `trainer` where one is given."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if trainer is not None:
        backend.train_from_iterator(texts, trainer)
    return backend


def _word(argument: str, train_texts: Iterable[str], all_texts: list[str], gpt2_dir: Path | None
          ) -> tokenizers.Tokenizer:
    trainer = trainers.WordLevelTrainer(vocab_size=int(argument) + 2, special_tokens=[UNK, EOT], show_progress=False)
    return _byte_level(tokenizers.Tokenizer(models.WordLevel(unk_token=UNK)), trainer, train_texts)


def _bpe(argument: str, train_texts: Iterable[str], all_texts: list[str], gpt2_dir: Path | None
         ) -> tokenizers.Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=int(argument), special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return _byte_level(tokenizers.Tokenizer(models.BPE()), trainer, train_texts)


TOKENIZER_KINDS = {kind.name: kind for kind in (
    TokenizerKind(name="char", build=_char, model="WordLevel", gguf="rwkv", trained=True, per_character=True),
    # <unk> stands for a whole word, of any length, and GGUF has no tokenizer that maps unknown words to it
    TokenizerKind(name="word", build=_word, model="WordLevel", gguf=None, argument="N", minimum=1,
                  maximum=2**32 - 2, sizes="its ids, <unk> and <|endoftext|> included, fit in 32 bits, as the "
                  "tokenizers library and the dataset's shards hold them", trained=True, unknown=UNK),
    # The trainer sets aside about 70 bytes a token of N before it reads a text (bpe:1000000000 asks for 70 GB and
    # aborts the process); 2**22 is under 400 MB of it, and 16 times Gemma's vocabulary (262,144), a large one.
    TokenizerKind(name="bpe", build=_bpe, model="BPE", gguf="gpt2", argument="N", minimum=257, maximum=2**22,
                  sizes="256 bytes and <|endoftext|> at least; at most what its trainer sets memory aside for before "
                  "it starts", trained=True),
    TokenizerKind(name="gpt2", build=lambda _, __, ___, gpt2_dir: load_gpt2(gpt2_dir).backend, model="BPE",
                  gguf="gpt2"),
    TokenizerKind(name="tiktoken", build=lambda argument, _, __, ___: tiktoken_backend(argument, EOT), model="BPE",
                  gguf="gpt2", argument="NAME"),
    # another model's tokenizer, as it came: GGUF takes it where it is a byte-level BPE with GPT-2's split
    TokenizerKind(name="pretrained", build=None, model=None, gguf="gpt2", argument="NAME"),
)}


def named_kinds() -> str:
    """The kinds --tokenizer takes: `char, word:N, bpe:N, ...`."""
    return ", ".join(kind.written for kind in TOKENIZER_KINDS.values() if kind.named)


def parse_spec(spec: str) -> tuple[str, int]:
    """`bpe:4096` -> ("bpe", 4096); `gpt2`, `tiktoken:gpt2` -> (name, 0)."""
    name, _, argument = spec.partition(":")
    kind = TOKENIZER_KINDS.get(name)
    if kind is not None and kind.argument == "N":
        return name, _size(spec, kind, argument)
    if kind is not None and (NAME.fullmatch(argument) if kind.argument == "NAME" else not argument):
        return name, 0
    raise UserError(f"unknown tokenizer {spec!r}; use {named_kinds()} (e.g. bpe:4096), or the path of a folder with a "
                    "tokenizer.json (a Hugging Face model, an lmlab run or dataset).")


def _size(spec: str, kind: TokenizerKind, argument: str) -> int:
    """The N of `kind:N`, a whole number within the kind's bounds."""
    # more digits than the maximum has cannot be in range, and int() refuses thousands of them
    if argument.isascii() and argument.isdigit() and len(argument.lstrip("0")) <= len(str(kind.maximum)):
        if kind.minimum <= int(argument) <= kind.maximum:
            return int(argument)
    raise UserError(f"tokenizer {spec[:40]!r}: {kind.name}:N takes a whole number N from {kind.minimum:,} to "
                    f"{kind.maximum:,} ({kind.sizes}), e.g. {kind.name}:4096.")


def is_path(spec: str) -> bool:
    """Whether a --tokenizer value names files (`runs/x`, `./model`, `tokenizer.json`) rather than a kind."""
    return "/" in spec or os.sep in spec or spec.endswith(".json")


class Tokenizer:
    """A trained tokenizer plus the lmlab facts about it; `eot_id` where it is not `<|endoftext|>`'s."""

    def __init__(self, spec: str, backend: tokenizers.Tokenizer, eot_id: int | None = None):
        self.spec = spec
        self.kind = TOKENIZER_KINDS[parse_spec(spec)[0]]
        self.backend: tokenizers.Tokenizer = backend
        self.vocab = backend.get_vocab()
        self.eot_id = self.vocab.get(EOT) if eot_id is None else eot_id
        self.vocab_size = max(self.vocab.values(), default=-1) + 1
        self.longest = max(map(len, self.vocab), default=1)  # characters of its longest token (`most_chars`)

    @property
    def eot_token(self) -> str | None:
        return None if self.eot_id is None else self.backend.id_to_token(self.eot_id)

    def most_chars(self, tokens: int) -> int | None:
        """The most characters `tokens` tokens can stand for; None when <unk> stands for a word of any length."""
        return None if self.kind.unknown else tokens * self.longest

    def normalize(self, text: str) -> str:
        """`text` through the normalisation its dataset was prepared with, if any."""
        normalizer = self.backend.normalizer
        return text if normalizer is None else normalizer.normalize_str(text)

    def unseen(self, text: str) -> str:
        """The characters of `text` a char tokenizer cannot encode (it has no `<unk>`), sorted; '' for the others."""
        return "".join(sorted(set(self.normalize(text)) - self.vocab.keys())) if self.kind.per_character else ""

    def check(self, text: str, where: str) -> None:
        """Refuse text that is not Unicode (a lone surrogate) or that the char tokenizer cannot encode."""
        bad = _SURROGATE.search(text)
        if bad:
            code = ord(bad.group())
            what = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF else
                    f"a lone surrogate (\\u{code:04x})")
            raise UserError(f"{where} is not valid text: it holds {what} at character {bad.start():,}; send UTF-8 "
                            "text (JSON's \\uXXXX escapes must pair surrogates).")
        unseen = self.unseen(text)
        if unseen:
            raise UserError(f"{where} contains characters the char tokenizer never saw ({unseen!r}); remove them or "
                            "prepare the dataset from a corpus that has them.")

    def encode(self, text: str, special: bool = True) -> list[int]:
        """The ids of `text`; without `special`, none of the tokens the tokenizer adds (a BOS). A batch of one, since
        `tokenizers` releases the GIL for a batch, not a single text."""
        self.check(text, "the text")
        return self.backend.encode_batch([text], add_special_tokens=special)[0].ids

    def encode_batch(self, texts: list[str]) -> list[tokenizers.Encoding]:
        for text in texts:
            self.check(text, "the corpus")
        return self.backend.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        """tokenizer.json, atomically (a failed write is a WriteError naming the file)."""
        atomic_write_text(Path(path), self.backend.to_str(pretty=True))

    def identity(self) -> str:
        return _identity(json.loads(self.backend.to_str()))

    @classmethod
    def load(cls, path: Path, spec: str, eot_id: int | None = None) -> Tokenizer:
        return cls(spec, read_backend(path), eot_id)


def read_backend(path: Path, fix: str = "restore it from a copy") -> tokenizers.Tokenizer:
    """The tokenizer in a tokenizer.json, read by lmlab's reader (lmlab.core.fileio.read_text: a pipe or a device in
    its place is refused, not read without end); one the tokenizers library cannot parse is one sentence with `fix`."""
    try:
        return tokenizers.Tokenizer.from_str(read_text(path))
    except (UserError, FileNotFoundError):  # a ReadError; a missing file, which its reader words
        raise
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise UserError(f"{path} is not a tokenizer the tokenizers library reads ({as_text(err)}); {fix}.")


def _read_backend(folder: Path) -> tokenizers.Tokenizer | None:
    """A Hugging Face folder's tokenizer.json, or vocab.json + merges.txt as a byte-level BPE; None if neither."""
    if (folder / "tokenizer.json").exists():
        return read_backend(folder / "tokenizer.json", "download the model's files again")
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        backend = _byte_level(tokenizers.Tokenizer(models.BPE.from_file(a_file(folder / "vocab.json"),
                                                                        a_file(folder / "merges.txt"))))
        backend.add_special_tokens([EOT])  # already in GPT-2's vocab (id 50256); this keeps it whole in text
        return backend
    return None


def chunk_spans(text: str, start: int, stop: int, kind: str, size: int = CHUNK_CHARS) -> Iterator[tuple[int, int]]:
    """(start, stop) spans of at most `size` characters covering text[start:stop], cut where a tokenizer of `kind`
    gives the same ids in pieces as whole (else at the span's end), so the tokenizer never holds a whole long
    document."""
    while stop - start > size:
        cut = start + size
        safe = None if TOKENIZER_KINDS[kind].per_character else _LAST_SAFE_CUT.match(text, start + 1, cut + 1)
        cut = safe.start(1) if safe else cut
        yield start, cut
        start = cut
    yield start, stop


def load_gpt2(folder: Path | None = None) -> Tokenizer:
    """GPT-2's tokenizer from `folder`, else from $LMLAB_GPT2_DIR."""
    folder = folder or (Path(os.environ[GPT2_DIR_ENV]) if os.environ.get(GPT2_DIR_ENV) else None)
    where = f"--gpt2-dir DIR or ${GPT2_DIR_ENV}"
    if folder is None:
        raise UserError(f"tokenizer gpt2 reads GPT-2's tokenizer files from disk: pass {where} naming a folder "
                        "with tokenizer.json, or vocab.json and merges.txt (e.g. a downloaded Hugging Face gpt2).")
    backend = _read_backend(Path(folder))
    if backend is None:
        raise UserError(f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt; point {where} at "
                        "a folder with GPT-2's tokenizer files.")
    if EOT not in backend.get_vocab():
        raise UserError(f"the tokenizer in {folder} has no {EOT} token, so it is not GPT-2's; check the folder.")
    return Tokenizer("gpt2", backend)


def json_object(path: Path) -> dict:
    """The JSON object in a file; {} where it is missing or holds no JSON object (one that cannot be read, or is no
    file, is a ReadError: lmlab.core.fileio.read_text)."""
    try:
        raw = parse_json(read_text(path))
    except (FileNotFoundError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


def _eos_id(folder: Path, backend: tokenizers.Tokenizer) -> int | None:
    """A Hugging Face model's end-of-text id: eos_token, else eos_token_id, else `<|endoftext|>`'s."""
    eos = token_text(json_object(folder / "tokenizer_config.json").get("eos_token"))
    if eos is not None and backend.token_to_id(eos) is not None:
        return backend.token_to_id(eos)
    for name in ("generation_config.json", "config.json"):
        ids = json_object(folder / name).get("eos_token_id")
        ids = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(ids, int) and backend.id_to_token(ids) is not None:
            return ids
    return backend.token_to_id(EOT)


def load_pretrained(path: Path) -> Tokenizer:
    """The tokenizer in a folder or a tokenizer.json. An lmlab one keeps its spec; any other becomes
    `pretrained:NAME` (the folder's name), ending documents with the model's eos."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    if not folder.is_dir() or (path.is_file() and path.name != "tokenizer.json"):
        raise UserError(f"{path} is neither a folder nor a tokenizer.json file; pass the folder of a Hugging Face "
                        "model, an lmlab run or dataset, or its tokenizer.json.")
    for facts in (json_object(folder / "dataset.json"), json_object(folder / "meta.json")):  # an lmlab run, a dataset
        if isinstance(facts.get("tokenizer"), str) and (folder / "tokenizer.json").exists():
            return Tokenizer.load(folder / "tokenizer.json", facts["tokenizer"], facts.get("eot_id"))
    backend = _read_backend(folder)
    if backend is None:
        raise UserError(f"{folder} holds no tokenizer.json (nor vocab.json + merges.txt); pass the folder of a "
                        "Hugging Face model that has one (a sentencepiece-only tokenizer.model is not read).")
    spec = json_object(folder / "tokenizer_config.json").get("lmlab_tokenizer")  # written by `lmlab export-hf`
    if not isinstance(spec, str) or not _is_spec(spec):
        spec = f"pretrained:{NAME_PART.sub('-', folder.resolve().name).strip('-.') or 'tokenizer'}"
    tokenizer = Tokenizer(spec, backend, _eos_id(folder, backend))
    if tokenizer.kind.name == "pretrained" and tokenizer.eot_id is None:
        raise UserError(f"the tokenizer in {folder} names no end-of-text token (eos_token in tokenizer_config.json "
                        "or eos_token_id in config.json), which lmlab puts between documents; add one.")
    return tokenizer


def _is_spec(spec: str) -> bool:
    try:
        parse_spec(spec)
    except UserError:
        return False
    return True


def _identity(raw: dict) -> str:
    model = raw.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = sorted(t["content"] for t in raw.get("added_tokens", []))
    facts = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "special": specials}
    return json_sha256(facts)


def tokenizer_identity(path: Path) -> str:
    """A digest of what a tokenizer.json maps, not how the file is laid out."""
    return _identity(parse_json(read_text(path)))


def train_tokenizer(spec: str, train_texts: Iterable[str], all_texts: list[str],
                    gpt2_dir: Path | None = None) -> Tokenizer:
    """Build the tokenizer for `spec` as its kind's entry says; char sees every text, the others the train split."""
    kind = TOKENIZER_KINDS[parse_spec(spec)[0]]
    if kind.build is None:
        raise UserError(f"{spec} is how lmlab records a tokenizer read from a folder; pass the folder itself, e.g. "
                        "--tokenizer ./models/SmolLM2-135M or --tokenizer runs/NAME.")
    return Tokenizer(spec, kind.build(spec.partition(":")[2], train_texts, all_texts, gpt2_dir))
