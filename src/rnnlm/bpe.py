"""Byte-level BPE (``data.level=bpe``): a Hugging Face ``tokenizers`` tokenizer trained on a corpus's training split,
kept as its JSON text in the token cache and in every checkpoint.

Byte-level means the 256 bytes are the base alphabet, so every text is representable and no ``<unk>`` is needed;
merges of frequent byte pairs make the rest of the vocabulary. Lines are encoded one at a time and each is followed
by the newline byte's token, so a line end is always one token of its own (sentence mode and ``stop_at_eos`` rely
on it). The ``tokenizers`` package is needed only to train a tokenizer and to encode text; decoding ids to text
and counting characters read the tokens' bytes alone (:mod:`rnnlm.vocab`).
"""

from __future__ import annotations

from collections.abc import Iterable

from rnnlm.errors import ConfigError
from rnnlm.vocab import Vocab

INSTALL = "pip install 'rnnlm[bpe]'"  # or pip install tokenizers


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"data.level=bpe needs the tokenizers package: {INSTALL}") from None
    return tokenizers


def train_tokenizer(lines: Iterable[str], vocab_size: int, specials: list[str]) -> Vocab:
    """A byte-level BPE vocabulary of at most ``vocab_size`` tokens trained on ``lines`` (without their newlines).

    Ids are the tokenizer's: ``specials`` first (``<bos>`` in sentence mode), then the 256 bytes, then the merges in
    the order they were learned, most frequent pairs first (so the adaptive softmax's head holds the frequent
    tokens). A text with fewer distinct pairs than asked for gives a smaller vocabulary; the bytes are always all
    there, so ``vocab_size`` below 256 + specials gives exactly those.
    """
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    return vocab_of(tokenizer.to_str())


def vocab_of(tokenizer_json: str) -> Vocab:
    """The :class:`Vocab` of a tokenizer's JSON text: its tokens in id order."""
    tokenizer = tokenizer_from_json(tokenizer_json)
    by_id = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(by_id, key=by_id.get)
    if [by_id[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not 0..n-1")
    return Vocab(level="bpe", tokens=tokens, tokenizer=tokenizer_json)


def tokenizer_from_json(text: str):
    """The tokenizer of its JSON text (a checkpoint's or the cache's)."""
    return _tokenizers().Tokenizer.from_str(text)
