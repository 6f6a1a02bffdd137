"""`lmlab.prepare`: a corpus tokenized into a dataset dir, as `lmlab prepare` makes it (the command calls it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lmlab.api.checks import checked
from lmlab.api.paths import check_destination
from lmlab.core.notebook import console_here
from lmlab.data.normalize import Normalization
from lmlab.data.output import PrepareOptions
from lmlab.data.prepare import prepare as prepare_dataset
from lmlab.data.stats import dataset_stats


@dataclass
class Dataset:
    """A dataset dir (train and val token shards, tokenizer.json, meta.json). `os.fspath(dataset)` is its path,
    so it goes wherever a path does: `lmlab.train(config, dataset=dataset)`."""

    path: Path  # the dataset dir: out_dir/NAME-TOKENIZER
    meta: dict[str, Any]  # meta.json: tokenizer, vocab_size, the splits' documents, characters, tokens, sha256, ...
    built: bool  # False: an identical dataset was there already and is reused
    normalized: str | None = None  # the normalisation its text went through, described; None: none

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, tokenizer {self.meta['tokenizer']}, {self.tokens:,} tokens)"

    @property
    def tokens(self) -> int:
        """Tokens in both splits."""
        return self.meta["train"]["tokens"] + self.meta["val"]["tokens"]

    @checked(block_size="count?")
    def stats(self, block_size: int | None = None) -> dict[str, Any]:
        """What `lmlab data stats` reports: documents, tokens, characters per token, document lengths against the
        context length `block_size` (default: the dataset's, or 1024)."""
        return dataset_stats(self.path, block_size)


@checked(source="paths", tokenizer="spec", name="text?", out_dir="path", val_fraction="number",
         val_tokens="integer?", max_tokens="integer?", pack="name", block_size="integer", shard_tokens="integer",
         text_field="name", workers="integer?", gpt2_dir="path?", normalize="words?", keep_chars="text?",
         drop_chars="text?", force="flag", console="console?")
def prepare(source: str | Path | Sequence[str | Path], tokenizer: str, *, name: str | None = None,
            out_dir: str | Path = "data", val_fraction: float = 0.1, val_tokens: int | None = None,
            max_tokens: int | None = None, pack: str = "concat", block_size: int = 1024,
            shard_tokens: int = 100_000_000, text_field: str = "text", workers: int | None = None,
            gpt2_dir: str | Path | None = None, normalize: str | Sequence[str] | None = None,
            keep_chars: str | None = None, drop_chars: str | None = None, force: bool = False,
            console: Console | None = None) -> Dataset:
    """Tokenize `source` ("shakespeare", "hf:OWNER/NAME[:CONFIG]", or .txt/.jsonl/.jsonl.gz/.parquet files or
    folders of them) with `tokenizer` (a kind of lmlab.data.tokenizers.TOKENIZER_KINDS, as `lmlab prepare --help` lists
    them, or the folder of a tokenizer to use as it is) into out_dir/NAME-TOKENIZER, as `lmlab prepare` does
    (docs/reference/commands.md says what each option does). A finished dataset of the same inputs is reused; an
    interrupted one resumes."""
    sources = [os.fspath(s) for s in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    steps = [normalize] if isinstance(normalize, str) else normalize
    normalization = Normalization.parse(list(steps) if steps else None, keep_chars, drop_chars)
    options = PrepareOptions(val_tokens=val_tokens, max_tokens=max_tokens, pack=pack, block_size=block_size,
                             shard_tokens=shard_tokens, text_field=text_field,
                             gpt2_dir=Path(gpt2_dir) if gpt2_dir else None, normalization=normalization,
                             **({"workers": workers} if workers is not None else {}))
    target, meta, built = prepare_dataset(sources, tokenizer, name, check_destination(out_dir, "--out-dir"),
                                          val_fraction, force, options, console or console_here())
    return Dataset(target, meta, built, normalization.describe() if normalization else None)
