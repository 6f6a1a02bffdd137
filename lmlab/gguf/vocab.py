"""A run's tokenizer as GGUF's vocabulary keys, so that llama.cpp tokenizes a text into lmlab's ids. Byte-level BPE
goes as GGUF's `gpt2` tokenizer with its pre-tokenizer named (llama.cpp would otherwise refuse a new vocabulary's
unknown hash). A char vocabulary goes as `rwkv` (greedy longest match over each character's bytes), not as a BPE,
whose default end-of-text id 11 would end every reply at the twelfth character. Word-level vocabularies (`<unk>` for
a whole word) and pre-tokenizers llama.cpp cannot be told (`SPLITS`) are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tokenizers

from lmlab.core.errors import UserError
from lmlab.data.tiktoken_bpe import GPT2_PATTERN
from lmlab.data.tokenizers import TOKENIZER_KINDS, Tokenizer
from lmlab.hf.folder import pad_id

# GGUF token types (gguf.TokenType): what llama.cpp shows as text and what it treats as a control token.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# The `rwkv` tokenizer's escaping of a token's text (a backslash starts \n, \t, \r, \xHH or a literal).
RWKV_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"})
# The pre-tokenizer splits llama.cpp can be told by name: GPT-2's regex, as the tokenizers library's ByteLevel
# writes it and as lmlab's tiktoken conversion does.
HF_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLITS = {GPT2_PATTERN: "gpt-2", HF_GPT2_SPLIT: "gpt-2"}
# The kinds whose entry names a GGUF tokenizer (TokenizerKind.gguf), as refusals list them.
TAKES = (", ".join(kind.written for kind in TOKENIZER_KINDS.values() if kind.gguf) +
         " (a byte-level BPE with GPT-2's split: trained, GPT-2's, tiktoken's or an imported model's)")


@dataclass
class Vocab:
    """GGUF's tokenizer keys: `model` (`gpt2` or `rwkv`), `pre` (the pre-tokenizer's name), one token and type per
    model row, the merges, and the special ids (None where the run has none)."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    add_bos: bool = False


def gguf_vocab(tokenizer: Tokenizer, rows: int, what: str) -> Vocab:
    """The tokenizer's GGUF keys for a model of `rows` embedding rows (rows past the tokenizer's tokens become
    unused tokens); `what` names the run in a refusal."""
    raw = json.loads(tokenizer.backend.to_str())
    if tokenizer.kind.gguf is None:
        why = (f", which turns an unknown word into {tokenizer.kind.unknown}, and no GGUF tokenizer does that"
               if tokenizer.kind.unknown else ", which no GGUF tokenizer holds")
        raise UserError(f"{what} has a {tokenizer.kind.name}-level tokenizer ({tokenizer.spec}){why}; export-gguf "
                        f"takes {TAKES}.")
    vocab = WRITERS[tokenizer.kind.gguf](raw, tokenizer, rows, what)
    # bos and eos: the end-of-text token lmlab puts between documents (a char run has none), unless the tokenizer
    # starts every text with a token of its own; pad: the vocabulary's padding token, else the end-of-text token.
    vocab.eos, vocab.pad = tokenizer.eot_id, pad_id(tokenizer)
    vocab.bos = vocab.bos if vocab.add_bos else tokenizer.eot_id
    if vocab.eos is not None:
        vocab.types[vocab.eos] = CONTROL
    return vocab


def _in_id_order(tokenizer: Tokenizer, rows: int, what: str) -> list[str]:
    """The tokenizer's tokens in id order, every id from 0 up, as a GGUF vocabulary lists them."""
    ids = {i: token for token, i in tokenizer.vocab.items()}
    if tokenizer.vocab_size > rows:
        raise UserError(f"{what}'s tokenizer has {tokenizer.vocab_size:,} tokens but its model {rows:,} rows; the "
                        "run's tokenizer.json is not its model's.")
    missing = [i for i in range(tokenizer.vocab_size) if i not in ids]
    if missing:
        raise UserError(f"{what}'s tokenizer has no token with id {missing[0]}, and a GGUF vocabulary lists every id "
                        "in order; export-gguf cannot write it.")
    return [ids[i] for i in range(tokenizer.vocab_size)]


def _char_vocab(raw: dict[str, Any], tokenizer: Tokenizer, rows: int, what: str) -> Vocab:
    """Each character's bytes in the `rwkv` escaping (a backslash starts \\n, \\t, \\r, \\xHH or a literal); rows
    beyond the characters start with the byte 0xFF, which no UTF-8 text holds, so nothing tokenizes to them."""
    plain = _in_id_order(tokenizer, rows, what)
    special = {t["content"] for t in raw.get("added_tokens", [])}
    tokens = [token.translate(RWKV_ESCAPES) for token in plain]
    types = [CONTROL if token in special else NORMAL for token in plain]
    extra = [f"\\xffunused{i}" for i in range(tokenizer.vocab_size, rows)]  # a Hugging Face model's spare rows
    return Vocab("rwkv", None, tokens + extra, types + [UNUSED] * len(extra))


def _bpe_vocab(raw: dict[str, Any], tokenizer: Tokenizer, rows: int, what: str) -> Vocab:
    model = raw.get("model") or {}
    pre = _pre_tokenizer(raw, what)
    if model.get("type") != "BPE" or raw.get("normalizer") or (raw.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{what}'s tokenizer ({tokenizer.spec}) is not a byte-level BPE without a normalizer, which "
                        f"is what export-gguf can declare to llama.cpp; it takes {TAKES}.")
    tokens = _in_id_order(tokenizer, rows, what)
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
             for i in range(tokenizer.vocab_size)]
    extra = [f"[PAD{i}]" for i in range(tokenizer.vocab_size, rows)]  # a Hugging Face model's spare rows
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp's gpt2 tokenizer refuses a file without them: "cannot find tokenizer merges"
        raise UserError(f"{what}'s tokenizer ({tokenizer.spec}) is a BPE without merges, which llama.cpp cannot "
                        f"load as a GGUF vocabulary; export-gguf takes {TAKES}.")
    if model.get("ignore_merges"):
        _check_merges_reach(raw, tokenizer, what)
    vocab = Vocab("gpt2", pre, tokens + extra, types + [UNUSED] * len(extra), merges)
    # A pretrained tokenizer's post-processor may put a first token before every text: llama.cpp's add_bos.
    plain, marked = (tokenizer.backend.encode("a", add_special_tokens=flag).ids for flag in (False, True))
    if len(marked) > len(plain) and marked[len(marked) - len(plain):] == plain:
        vocab.bos, vocab.add_bos = marked[0], True
    return vocab


def _check_merges_reach(raw: dict[str, Any], tokenizer: Tokenizer, what: str) -> None:
    """A vocabulary converted from tiktoken takes a text that is one of its tokens whole (`ignore_merges`, as tiktoken
    does); llama.cpp's BPE with GPT-2's split always merges. The two agree when every token's text merges into that
    token, as in a vocabulary trained by BPE (OpenAI's GPT-2); else the export is refused, naming such a token."""
    merging = tokenizers.Tokenizer.from_str(json.dumps({**raw, "model": {**raw["model"], "ignore_merges": False}}))
    texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    for text, whole, merged in zip(texts, tokenizer.backend.encode_batch(texts), merging.encode_batch(texts)):
        if whole.ids != merged.ids:
            raise UserError(f"{what}'s tokenizer ({tokenizer.spec}) has tokens its merges never make, such as "
                            f"{text!r}, which tiktoken takes whole and llama.cpp's BPE cannot; export-gguf takes a "
                            "tiktoken vocabulary whose every token its merges make (OpenAI's gpt2 or r50k_base).")


def _pre_tokenizer(raw: dict[str, Any], what: str) -> str:
    """llama.cpp's name for the tokenizer's split: GPT-2's regex, either as ByteLevel's own or as a Split before
    a ByteLevel that does not split again."""
    pre = raw.get("pre_tokenizer") or {}
    steps: list[dict[str, Any]] = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    split = None
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        split = HF_GPT2_SPLIT
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
          and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
          and not steps[1].get("use_regex", True)):
        split = (steps[0].get("pattern") or {}).get("Regex")
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), {})
    if split not in SPLITS or byte_level.get("add_prefix_space"):
        raise UserError(f"{what}'s tokenizer splits text in a way export-gguf cannot name to llama.cpp (it names "
                        f"GPT-2's split); it takes {TAKES}.")
    return SPLITS[split]


# The GGUF tokenizer models export-gguf writes (TokenizerKind.gguf names one), each from the tokenizer.json's JSON,
# the tokenizer, the model's rows and the run's name for a refusal.
WRITERS: dict[str, Callable[[dict[str, Any], Tokenizer, int, str], Vocab]] = {"rwkv": _char_vocab, "gpt2": _bpe_vocab}
