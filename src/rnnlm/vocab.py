"""Vocabularies: the map between text and token ids, stored as plain data in every checkpoint.

Three levels: ``word`` (whitespace tokens, ``<eos>`` at each line end, ``<unk>`` for the rest), ``char`` (every
character, the newline too) and ``bpe`` (byte-level BPE subwords, :mod:`rnnlm.bpe`: every text is representable,
so there is no ``<unk>``; the line end is the newline byte's token).
"""

from __future__ import annotations

import codecs
import functools
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from rnnlm.errors import VocabularyError

log = logging.getLogger(__name__)

UNK = "<unk>"
EOS = "<eos>"
BOS = "<bos>"
LEVELS = ("char", "word", "bpe")


def split_line(line: str, level: str) -> list[str]:
    """Tokens of one line of text, line end included.

    Word level: whitespace tokens plus ``<eos>``. Char level: every character plus ``\\n``.
    """
    if level == "word":
        return line.split() + [EOS]
    if level == "bpe":
        raise ValueError("bpe tokens come from the trained tokenizer: use Vocab.encode_line")
    return list(line) + ["\n"]


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's ``bytes_to_unicode``, which Hugging Face
    ``tokenizers``' ByteLevel uses): printable Latin-1 bytes stand for themselves, the others for ``chr(256 + k)``."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in kept else chr(next(extra)) for b in range(256)}


@functools.cache
def _byte_of() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for (empty for a special token such as ``<bos>``)."""
    if token in (BOS, EOS, UNK):
        return b""
    byte_of = _byte_of()
    return bytes(byte_of[c] for c in token)


NEWLINE_TOKEN = byte_alphabet()[10]  # "\u010a", the token of the newline byte: a bpe vocabulary's line end


@dataclass
class Vocab:
    """An ordered token list; ids are positions. Specials (``<unk>``, ``<eos>``, ``<bos>``) come first."""

    level: str
    tokens: list[str]
    tokenizer: str | None = None  # bpe: the trained tokenizer as Hugging Face tokenizers' JSON text
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"vocabulary level must be one of {LEVELS}, got {self.level!r}")
        if (self.level == "bpe") != isinstance(self.tokenizer, str):
            raise ValueError("a bpe vocabulary has its tokenizer (JSON text), and only a bpe vocabulary has one")
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
        """The id that closes a line: ``<eos>`` for words, the newline character for chars, the newline byte's token
        for bpe."""
        return self.index[{"word": EOS, "char": "\n", "bpe": NEWLINE_TOKEN}[self.level]]

    def encode_line(self, line: str) -> list[int]:
        """Ids of one line of a corpus (without its newline), line end included. Out-of-vocabulary tokens are
        ``<unk>`` (KeyError if there is none)."""
        if self.level == "bpe":
            return [*self._bpe().encode(line, add_special_tokens=False).ids, self.line_end_id]
        return self.encode_tokens(split_line(line, self.level))

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        """:meth:`encode_line` of each line; bpe encodes them as one batch (the tokenizer's threads)."""
        if self.level != "bpe":
            return [self.encode_line(line) for line in lines]
        end = self.line_end_id
        return [[*e.ids, end] for e in self._bpe().encode_batch(lines, add_special_tokens=False)]

    def _bpe(self):
        """The tokenizer, rebuilt from its JSON text on first use (needs the ``tokenizers`` package)."""
        if getattr(self, "_tokenizer", None) is None:
            from rnnlm.bpe import tokenizer_from_json

            self._tokenizer = tokenizer_from_json(self.tokenizer)
        return self._tokenizer

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
        if self.level == "bpe":  # bytes: every text is representable
            return [self.start_id, *self._bpe().encode(text, add_special_tokens=False).ids]
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
        ``<eos>`` as a line break; bpe tokens' bytes are joined and read as UTF-8, specials (``<bos>``) left out.

        Byte-level tokens may split a character: bytes that are not UTF-8 show as U+FFFD, and a character left
        incomplete at the end (generation stopped inside it) is left out.
        """
        tokens = [self.tokens[i] for i in ids]
        if self.level == "bpe":
            return codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(map(token_bytes, tokens)))
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

    def characters(self) -> tuple[list[int], list[bool]]:
        """How many characters of text each id stands for, and which ids are words: what
        :class:`rnnlm.loss.CharacterCount` sums over scored targets for bits per character.

        - char: one per token (the newline and ``<unk>`` too);
        - bpe: the characters whose first byte the token holds (its UTF-8 bytes that are not continuation bytes),
          so a character split between tokens counts once;
        - word: the word's letters (``<unk>``: 5, as written; training and eval count the split's own unknown words
          instead, see :class:`rnnlm.loss.CharacterCount`), plus the space before it when it follows a word;
          ``<eos>`` is the newline, one character. That is the text ``" ".join(line.split()) + "\\n"`` per line.

        ``<bos>`` is read, never predicted: 0.
        """
        if self.level == "char":
            return [0 if t == BOS else 1 for t in self.tokens], [False] * len(self.tokens)
        if self.level == "bpe":
            return [sum((b & 0xC0) != 0x80 for b in token_bytes(t)) for t in self.tokens], [False] * len(self.tokens)
        words = [t not in (EOS, BOS) for t in self.tokens]
        return [1 if t == EOS else 0 if t == BOS else len(t) for t in self.tokens], words

    def text_characters(self, text: str) -> int:
        """The characters a line of ``text`` stands for when scored with its line end (:meth:`characters`)."""
        return len(" ".join(text.split()) if self.level == "word" else text) + 1

    def to_dict(self) -> dict:
        data = {"level": self.level, "tokens": list(self.tokens)}
        if self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        return cls(level=data["level"], tokens=list(data["tokens"]), tokenizer=data.get("tokenizer"))


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
