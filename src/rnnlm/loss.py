"""The loss and how it is quoted: summed cross-entropy over the scored targets (padding never counts), in nats,
and as bits per character or perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100  # the target id of padding: never scored (cross-entropy's own default)


def sequence_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (nats) of logits (B, T, V) against targets (B, T), and how many targets were scored
    (those not :data:`IGNORE_INDEX`)."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def bits_per_character(total: float, characters: float) -> float:
    """Bits per character of a split: its summed cross-entropy (nats) over the scored targets, in bits, divided by
    the characters of text those targets stand for (:class:`CharacterCount`). One number for every tokenization:
    a word, char or bpe model of the same text divides by the same characters."""
    return total / max(characters, 1.0) / math.log(2)


class CharacterCount:
    """The characters of text that the scored targets of a batch stand for: the denominator of bits per character.

    Every level counts the characters of the text its tokens stand for, each line ended by one newline
    (:meth:`rnnlm.vocab.Vocab.characters`): a char token is one character (the newline and ``<unk>`` too), so a char
    model's bits per character are its mean loss in bits, as before; a bpe token counts the characters whose first
    byte it holds; a word counts its letters plus the space before it when it follows a word, and ``<eos>`` the
    newline, i.e. the text ``" ".join(line.split()) + "\\n"`` of each line. A word read as ``<unk>`` counts the
    characters of the original words: ``unknown_chars``, the mean length of the split's words read as ``<unk>``
    (exact when every one of them is scored, as validation, test and eval score whole splits); without it, the 5
    characters of ``<unk>`` as written (PTB and WikiText have it so in their text).

    The count is taken where the targets are, without waiting for the device; padding (:data:`IGNORE_INDEX`) counts
    nothing.
    """

    def __init__(self, vocab, unknown_chars: float | None = None):
        lengths, words = vocab.characters()
        self.lengths = torch.tensor(lengths, dtype=torch.float64)
        if unknown_chars is not None and vocab.level == "word" and vocab.unk_id is not None:
            self.lengths[vocab.unk_id] = unknown_chars
        self.words = torch.tensor(words) if any(words) else None  # word level: which ids are words
        self._on: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def __call__(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Characters (a float64 scalar) of the scored targets (B, T); inputs (B, T) are the tokens before them."""
        if targets.device not in self._on:
            words = None if self.words is None else self.words.to(targets.device)
            self._on[targets.device] = self.lengths.to(targets.device), words
        lengths, words = self._on[targets.device]
        scored = targets != IGNORE_INDEX
        safe = targets.clamp_min(0)  # padding's index, masked out
        chars = (lengths[safe] * scored).sum()
        if words is not None:  # the space between two words
            chars = chars + (words[safe] & words[inputs] & scored).sum()
        return chars


def loss_in_units(loss: float, level: str) -> tuple[str, float]:
    """A mean cross-entropy in nats as people quote it per token: bits per character for char models,
    perplexity for word and bpe models (per token; :func:`bits_per_character` compares across levels).
    Returns ``(name, value)``, e.g. ``("bpc", 2.55)``."""
    if level == "char":
        return "bpc", loss / math.log(2)
    return "ppl", math.exp(min(loss, 700.0))  # exp overflows a float beyond ~709


def quoted_units(level: str) -> list[str]:
    """The metrics a split's loss is quoted in besides ``loss``: ``bpc`` for every level, and per-token ``ppl`` for
    word and bpe models."""
    return ["bpc"] if level == "char" else ["ppl", "bpc"]


def pad_batch(examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Right-pad (inputs, targets) lines to the longest: inputs with id 0 (never scored), targets with
    :data:`IGNORE_INDEX`, so that padding adds nothing to the loss."""
    inputs = pad_sequence([x for x, _ in examples], batch_first=True, padding_value=0)
    targets = pad_sequence([y for _, y in examples], batch_first=True, padding_value=IGNORE_INDEX)
    return inputs, targets
