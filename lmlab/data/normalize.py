"""Text normalisation a dataset is prepared with (`--normalize`, `--keep-chars`, `--drop-chars`): applied to the
corpus before the scan, and written into the dataset's tokenizer.json as its normalizer, so every later text is
normalised as the corpus was. The steps apply in one order: nfkc, ascii, lower (last, so the result stays lower-case),
then the kept or dropped characters."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

from tokenizers import Regex, normalizers

from lmlab.core.errors import UserError

STEPS = ("nfkc", "ascii", "lower")  # the order they apply in
# What folding to ASCII maps rather than drops: typographic punctuation and letters that do not decompose.
ASCII_MAP = {"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"', "«": '"', "»": '"',
             "‹": "'", "›": "'", "–": "-", "—": "-", "―": "-", "−": "-", "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe",
             "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ı": "i"}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "-": "-", "s": " "}


# a character, or an escape: a backslash and what follows it, if anything (possessive: never the backslash
# alone)
_ITEM = r"\\[\s\S]?+|[^\\]"
_PART = re.compile(f"({_ITEM})-({_ITEM})|({_ITEM})")  # a range low-high (its `-` not escaped), or one item


def _char(item: str, text: str, option: str) -> str:
    """The character an item of the --keep-chars / --drop-chars value `text` stands for."""
    if item[0] != "\\":
        return item
    if item[1:] not in ESCAPES:
        raise UserError(f"{option} {text!r}: {item!r} is no escape it knows; write \\n, \\t, \\r, \\s "
                        "(a space), \\\\ or \\- (or the character itself).")
    return ESCAPES[item[1]]


def parse_chars(text: str, option: str) -> str:
    """The characters a --keep-chars / --drop-chars value names, sorted: itself, where `a-z` is a range and `\\n`,
    `\\t`, `\\r`, `\\s` (a space), `\\\\` and `\\-` stand for those characters (a `-` first or last is itself)."""
    # every escape checked before any range
    parts = [[_char(item, text, option) for item in match.groups() if item] for match in _PART.finditer(text)]
    chars: set[str] = set()
    for part in parts:  # [low, high] or [the character]
        low, high = part[0], part[-1]
        if ord(high) < ord(low):
            raise UserError(f"{option} {text!r}: the range {low!r}-{high!r} runs backwards; write it low to "
                            "high, e.g. a-z.")
        chars |= {chr(c) for c in range(ord(low), ord(high) + 1)}
    if not chars:
        raise UserError(f"{option} is empty; name the characters, e.g. {option} 'a-z \\n'.")
    if len(chars) > MOST_CHARS:  # each is written into meta.json and the tokenizer: all of Unicode made 26 MB
        if option == "--keep-chars" and len(chars) >= 0.99 * TEXT_CHARS:
            raise UserError(f"--keep-chars names {len(chars):,} characters, nearly every one text can hold: it removes "
                            "next to nothing; leave it out.")
        other = "--drop-chars" if option == "--keep-chars" else "--keep-chars"
        raise UserError(f"{option} names {len(chars):,} characters; name at most {MOST_CHARS:,} (the scripts a "
                        f"corpus is written in, e.g. {option} 'a-z \\n'), or give the others to {other}.")
    return "".join(sorted(chars))


MOST_CHARS = 200_000  # more than every script a corpus is written in (CJK's ideographs are ~98,000)
TEXT_CHARS = 0x110000 - 0x800  # Unicode's code points less the surrogates, which no text holds


def _char_class(chars: str) -> str:
    """An Oniguruma character class body matching exactly `chars`, runs of code points written as ranges."""
    # a run of consecutive code points keeps the same difference from its place in the sorted list
    runs = [[p for _, p in run] for _, run in groupby(enumerate(sorted(map(ord, chars))), lambda ip: ip[1] - ip[0])]
    return "".join(f"\\x{{{r[0]:x}}}" + (f"-\\x{{{r[-1]:x}}}" if len(r) > 1 else "") for r in runs)


@dataclass(frozen=True)
class Normalization:
    """What `prepare` does to the text before anything else: STEPS, then keep only `keep` or drop `drop`."""

    steps: tuple[str, ...] = ()
    keep: str | None = None  # the characters kept (sorted); every other one is dropped
    drop: str | None = None  # the characters dropped (sorted)

    @classmethod
    def parse(cls, normalize: list[str] | None, keep: str | None, drop: str | None) -> Normalization:
        """From the command line: --normalize values (each one step or a comma-separated list), --keep-chars and
        --drop-chars (one of the two)."""
        asked = {step.strip() for value in normalize or () for step in value.split(",")}
        unknown = sorted(asked - set(STEPS))
        if unknown:
            raise UserError(f"--normalize {','.join(unknown)!r} is no normalisation lmlab knows; use lower, nfkc or "
                            "ascii, or several of them (--normalize nfkc,lower).")
        if keep is not None and drop is not None:
            raise UserError("--keep-chars names every character kept, --drop-chars the ones removed; give one of "
                            "them.")
        return cls(tuple(s for s in STEPS if s in asked), None if keep is None else parse_chars(keep, "--keep-chars"),
                   None if drop is None else parse_chars(drop, "--drop-chars"))

    def __bool__(self) -> bool:
        return bool(self.steps or self.keep or self.drop)

    def drops(self, char: str) -> bool:
        """Whether the kept or dropped characters remove `char`."""
        return (self.keep is not None and char not in self.keep) or (self.drop is not None and char in self.drop)

    def normalizer(self) -> normalizers.Normalizer | None:
        """The steps as a `tokenizers` normalizer (None when there are none): what the dataset's tokenizer.json
        holds, and what the documents go through."""
        made: dict[str, list[normalizers.Normalizer]] = {
            "nfkc": [normalizers.NFKC()], "lower": [normalizers.Lowercase()],
            # accents off the letters they decompose from, typographic marks mapped, the rest dropped
            "ascii": [normalizers.NFKD(), normalizers.StripAccents(),
                      *(normalizers.Replace(old, new) for old, new in ASCII_MAP.items()),
                      normalizers.Replace(Regex(r"[^\x{0}-\x{7f}]"), "")]}
        parts = [part for step in self.steps for part in made[step]]
        if self.keep:
            parts.append(normalizers.Replace(Regex(f"[^{_char_class(self.keep)}]"), ""))
        elif self.drop:
            parts.append(normalizers.Replace(Regex(f"[{_char_class(self.drop)}]"), ""))
        return normalizers.Sequence(parts) if parts else None

    def function(self) -> Callable[[str], str] | None:
        """The normalisation of one text (None when there is none): what each document of the corpus goes through."""
        normalizer = self.normalizer()
        return None if normalizer is None else normalizer.normalize_str

    def describe(self) -> str:
        """In a few words: `nfkc, lower, 28 characters kept`."""
        chars = [f"{len(chars)} characters {what}" for what, chars in (("kept", self.keep), ("dropped", self.drop))
                 if chars]
        return ", ".join([*self.steps, *chars])

    def record(self) -> dict[str, object] | None:
        """meta.json's `normalize`: the steps in the order they apply, and the kept or dropped characters."""
        return {"steps": list(self.steps), "keep_chars": self.keep, "drop_chars": self.drop} if self else None

    def suffix(self) -> str:
        """What a dataset's default name gains: `-lower`, `-nfkc-lower-keep28` (28 characters kept); '' for none."""
        chars = [f"{what}{len(chars)}" for what, chars in (("keep", self.keep), ("drop", self.drop)) if chars]
        return "".join(f"-{part}" for part in (*self.steps, *chars))


def with_normalizer(backend: object, normalization: Normalization) -> None:
    """Put the normalisation in front of whatever normalizer a tokenizer has (a pretrained one may have its own),
    so encoding a text does to it what prepare did to the corpus."""
    ours = normalization.normalizer()
    if ours is None:
        return
    theirs = backend.normalizer  # type: ignore[attr-defined]
    backend.normalizer = ours if theirs is None else normalizers.Sequence([ours, theirs])  # type: ignore[attr-defined]
