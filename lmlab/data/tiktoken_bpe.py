"""tiktoken's encodings (or a local `NAME.tiktoken` file) as a `tokenizers` byte-level BPE that gives the same ids,
so a `tiktoken:NAME` dataset's tokenizer.json loads like every other kind's."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from lmlab.core.errors import UserError
from lmlab.core.extras import require
from lmlab.core.fileio import read_bytes

# GPT-2's pre-tokenization regex: the split a `NAME.tiktoken` file (ranks only, no pattern) is assumed to use.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def _tiktoken_ranks(name: str, eot: str) -> tuple[dict[bytes, int], str, int]:
    """(mergeable ranks, pre-tokenization pattern, end-of-text id) of a tiktoken encoding available locally."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR")
    local = Path(folder, f"{name}.tiktoken") if folder else None
    if local and local.exists():  # one `base64(token bytes) rank` pair per line
        pairs = (line.split() for line in read_bytes(local).decode("ascii").splitlines() if line.strip())
        ranks = {base64.b64decode(token): int(rank) for token, rank in pairs}
        return ranks, GPT2_PATTERN, len(ranks)
    require("tiktoken", user=f"tokenizer tiktoken:{name}",
            otherwise=f", or put its file {name}.tiktoken in a folder named by TIKTOKEN_CACHE_DIR")
    import tiktoken

    try:
        enc = tiktoken.get_encoding(name)
    except (ValueError, OSError) as err:  # an unknown name, or tiktoken's download failing offline
        raise UserError(f"tiktoken encoding {name!r} is not available here ({type(err).__name__}); put its file in "
                        f"TIKTOKEN_CACHE_DIR (tiktoken's cache, or {name}.tiktoken) and try again.")
    if eot not in enc.special_tokens_set:
        raise UserError(f"tiktoken encoding {name!r} has no {eot} token to separate documents; use gpt2 or r50k_base.")
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in enc._special_tokens.values()}
    return ranks, enc._pat_str, enc.encode_single_token(eot)


def tiktoken_backend(name: str, eot: str) -> tokenizers.Tokenizer:
    """The tiktoken encoding as a `tokenizers` byte-level BPE that yields the same ids.

    Every token of two or more bytes becomes the merges of its two-part splits, ranked by the token's own
    rank, which makes the BPE merge order tiktoken's. `<|endoftext|>` goes into the vocabulary only, not as an
    added special token: text that contains it is encoded as ordinary text (tiktoken's encode_ordinary), and
    only lmlab's separator carries the end-of-text id.
    """
    ranks, pattern, eot_id = _tiktoken_ranks(name, eot)
    to_text = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])))
    vocab = {text(token): rank for token, rank in ranks.items()} | {eot: eot_id}
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    backend = tokenizers.Tokenizer(models.BPE(vocab, [(text(a), text(b)) for a, b in merges], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend
