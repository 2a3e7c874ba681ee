"""Vocabularies: the map between text and token ids, stored as plain data in every checkpoint."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from rnnlm.errors import VocabularyError

log = logging.getLogger(__name__)

UNK = "<unk>"
EOS = "<eos>"
BOS = "<bos>"
LEVELS = ("char", "word")


def split_line(line: str, level: str) -> list[str]:
    """Tokens of one line of text, line end included.

    Word level: whitespace tokens plus ``<eos>``. Char level: every character plus ``\\n``.
    """
    if level == "word":
        return line.split() + [EOS]
    return list(line) + ["\n"]


@dataclass
class Vocab:
    """An ordered token list; ids are positions. Specials (``<unk>``, ``<eos>``, ``<bos>``) come first."""

    level: str
    tokens: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"vocabulary level must be one of {LEVELS}, got {self.level!r}")
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    @property
    def unk_id(self) -> int | None:
        return self.index.get(UNK)

    @property
    def bos_id(self) -> int | None:
        return self.index.get(BOS)

    @property
    def line_end_id(self) -> int:
        """The id that closes a line: ``<eos>`` for words, the newline character for chars."""
        return self.index[EOS if self.level == "word" else "\n"]

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Ids of tokens; tokens outside the vocabulary map to ``<unk>`` (KeyError if there is none)."""
        index, unk = self.index, self.unk_id
        if unk is None:
            return [index[t] for t in tokens]
        return [index.get(t, unk) for t in tokens]

    @property
    def start_id(self) -> int:
        """What a fresh text starts from: ``<bos>`` if the model was trained with it, else a line end."""
        return self.bos_id if self.bos_id is not None else self.line_end_id

    def encode_text(self, text: str) -> list[int]:
        """Ids of a user's text (a prompt, a sentence to score), preceded by :attr:`start_id`.

        Words outside the vocabulary read as ``<unk>`` with a warning. Characters outside a char
        vocabulary are an error unless it has ``<unk>``.

        Raises:
            VocabularyError: unknown characters and no ``<unk>``.
        """
        tokens = text.split() if self.level == "word" else list(text)
        unknown = sorted({t for t in tokens if t not in self.index})
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:20])
            if self.unk_id is None:
                raise VocabularyError(f"the model's vocabulary has no <unk> and lacks these characters: {shown}; "
                                      "remove or replace them")
            log.warning("read as <unk> (not in the model's vocabulary): %s", shown)
        return [self.start_id, *self.encode_tokens(tokens)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: chars are joined (``<unk>`` shows as U+FFFD), words are joined by spaces with
        ``<eos>`` as a line break."""
        tokens = [self.tokens[i] for i in ids]
        if self.level == "char":
            return "".join("\ufffd" if t == UNK else t for t in tokens if t != BOS)
        lines, words = [], []
        for t in tokens:
            if t == EOS:
                lines.append(" ".join(words) + "\n")
                words = []
            elif t != BOS:
                words.append(t)
        return "".join(lines) + " ".join(words)

    def to_dict(self) -> dict:
        return {"level": self.level, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        return cls(level=data["level"], tokens=list(data["tokens"]))


def build_vocab(
    counts: Counter,
    level: str,
    specials: Iterable[str] = (),
    min_freq: int = 1,
    max_size: int | None = None,
) -> Vocab:
    """Specials first, then tokens seen at least ``min_freq`` times.

    Words are ordered by falling frequency (ties by the token, so the order is reproducible) and
    cut at ``max_size`` entries in all; chars are sorted, as char-rnn and nanoGPT do.
    """
    specials = list(dict.fromkeys(specials))
    kept = [t for t, c in counts.items() if c >= min_freq and t not in specials]
    if level == "word":
        kept.sort(key=lambda t: (-counts[t], t))
    else:
        kept.sort()
    tokens = specials + kept
    if max_size is not None:
        tokens = tokens[:max_size]
    return Vocab(level=level, tokens=tokens)
