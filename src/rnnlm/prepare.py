"""Tokenize a corpus once: a vocabulary file plus one memory-mapped id array per split, cached.

Cache layout (one folder per corpus, level and vocabulary settings)::

    <cache_dir>/<name>-<level>-<key>/
        meta.json        what was built from what, token counts per split
        vocab.json       the vocabulary (plain data; for bpe with the trained tokenizer as JSON text)
        train.npy valid.npy test.npy   uint16/uint32 ids, read with mmap_mode="r"

The folder is built under a temporary name and renamed into place, so an interrupted run or two
runs racing never leave a half-written cache; the arrays' blocks are allocated before they are filled,
so a full disk stops it with one line (:class:`rnnlm.errors.DiskFullError`). Re-running with the same
input is instant: a bpe tokenizer is trained once, when its folder is built. A named corpus is checked
against its published digests before it is tokenized; the folder's key holds each file's size and
modification time, so a folder that exists was built from checked files. A folder damaged later (a file
cut short, a broken vocab.json) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rnnlm.corpora import SPLITS, CorpusSource, DataError, split_lines, text_lines, verify_checksums
from rnnlm.files import moved_into_place, new_array, temporary_folder, write_atomically
from rnnlm.vocab import BOS, EOS, UNK, Vocab, build_vocab, split_line

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

# 2: Gutenberg header and footer stripped; named corpora checked by SHA-256. 3: meta.json counts the characters of
# the words read as <unk> (bits per character); bpe
CACHE_FORMAT = 3
_ENCODE_BLOCK = 4096  # lines encoded together (a bpe tokenizer encodes a batch on all its threads)
DEFAULT_BPE_VOCAB_SIZE = 4096
_WRITE_BLOCK = 1 << 20  # ids buffered before each write to the memory map
MIN_VOCAB = 3  # tokens a model must choose between (<bos> aside) for its scores to mean anything
CACHE_ELSEWHERE = "RNNLM_CACHE_DIR=DIR or paths.cache_dir=DIR"  # how to put the cache on another disk


@dataclass
class PreparedCorpus:
    vocab: Vocab
    splits: dict[str, np.ndarray]  # split -> 1-D memory-mapped ids
    path: Path
    # split -> the mean characters of the words read as <unk> (word level; None: no <unk> in that split)
    unknown_chars: dict[str, float | None]


def specials_for(level: str, mode: str) -> list[str]:
    """Specials every vocabulary of this kind holds: words need ``<unk>`` and ``<eos>``; sentence
    mode starts each line with ``<bos>``. A char vocabulary gets ``<unk>`` only when needed; a bpe one never (bytes
    represent every text), and its line end is the newline byte's token."""
    specials = [UNK, EOS] if level == "word" else []
    if mode == "sentence":
        specials.append(BOS)
    return specials


def cache_key(source: CorpusSource, level: str, specials: list[str], min_freq: int, max_size: int | None,
              bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> str:
    spec = {
        "format": CACHE_FORMAT,
        "source": source.identity(),
        "level": level,
        "specials": specials,
        "min_freq": min_freq,
        "max_size": max_size,
    }
    if level == "bpe":
        spec["bpe_vocab_size"] = bpe_vocab_size
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(
    source: CorpusSource,
    level: str,
    cache_dir: Path,
    mode: str = "stream",
    min_freq: int = 1,
    max_size: int | None = None,
    bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
) -> PreparedCorpus:
    """Load the cached token ids of ``source``, building them first if needed (for ``level="bpe"``, training a
    tokenizer of at most ``bpe_vocab_size`` tokens on the training split)."""
    specials = specials_for(level, mode)
    key = cache_key(source, level, specials, min_freq, max_size, bpe_vocab_size)
    folder = cache_dir / f"{source.name}-{level}-{key}"
    if (folder / "meta.json").is_file():
        try:
            prepared = _load(folder)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:  # a file cut short or overwritten
            log.warning("the token cache %s is damaged (%s): rebuilding it", folder, err)
            _remove(folder)
        else:
            log.info("Using cached tokens in %s", folder)
            return prepared
    elif folder.exists():  # not ours to trust: no meta.json means it was never completed
        _remove(folder)
    _build(source, level, specials, min_freq, max_size, folder, bpe_vocab_size)
    return _load(folder)


def _load(folder: Path) -> PreparedCorpus:
    """The vocabulary and memory-mapped ids of a cache folder, checked against its meta.json.

    Raises:
        OSError, EOFError, ValueError, KeyError: a file is missing, cut short or not what meta.json describes.
    """
    meta = json.loads((folder / "meta.json").read_text())
    vocab = Vocab.from_dict(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    splits = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    if len(vocab) != meta["vocab_size"]:
        raise ValueError(f"vocab.json has {len(vocab)} tokens, meta.json says {meta['vocab_size']}")
    for s, ids in splits.items():
        if ids.ndim != 1 or len(ids) != meta["tokens"][s]:
            raise ValueError(f"{s}.npy has shape {ids.shape}, meta.json says {meta['tokens'][s]} tokens")
    for note in meta["notes"]:
        log.warning(note)
    unknown = {s: meta["unk_chars"][s] / meta["unk"][s] if vocab.level == "word" and meta["unk"][s] else None
               for s in SPLITS}
    return PreparedCorpus(vocab=vocab, splits=splits, path=folder, unknown_chars=unknown)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # another run may be removing it too
    if folder.exists():
        raise DataError(f"the token cache {folder} is damaged and cannot be removed: delete that folder, or set "
                        "RNNLM_CACHE_DIR / paths.cache_dir to a writable folder")


def _build(
    source: CorpusSource, level: str, specials: list[str], min_freq: int, max_size: int | None, folder: Path,
    bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
) -> None:
    verify_checksums(source)
    log.info("Tokenizing %s (%s level) into %s", source.name, level, folder)
    lengths = dict.fromkeys(SPLITS, 0)
    lines_with_text = dict.fromkeys(SPLITS, 0)
    if level == "bpe":
        # The tokenizer learns from the training split; pass 1 then counts each split's tokens.
        from rnnlm.bpe import train_tokenizer

        log.info("Training a byte-level BPE tokenizer of up to %d tokens on the training split", bpe_vocab_size)
        vocab = train_tokenizer((line for s, line in split_lines(source) if s == "train"), bpe_vocab_size, specials)
        for split, ids in encoded_lines(split_lines(source), vocab):
            lengths[split] += len(ids)
            lines_with_text[split] += len(ids) > 1
    else:
        # Pass 1: token counts per split and the training-split frequencies.
        counts = Counter()
        unseen: set[str] = set()  # char level: characters of valid/test that train lacks
        for split, line in split_lines(source):
            tokens = split_line(line, level)
            lengths[split] += len(tokens)
            lines_with_text[split] += len(tokens) > 1  # more than the line end
            if split == "train":
                counts.update(tokens)
            elif level == "char":
                unseen.update(tokens)
    if lengths["train"] == 0:
        raise DataError(f"corpus {source.name!r} has no training text: the file(s) {_paths(source)} are empty")
    _check_has_text(source, lines_with_text)
    if level == "char":
        unseen -= counts.keys()
        if unseen or min_freq > 1 or max_size is not None:
            specials = [UNK, *specials]
    if level != "bpe":
        vocab = build_vocab(counts, level, specials, min_freq=min_freq, max_size=max_size)
    _check_vocab_size(source, vocab, min_freq, max_size)
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max else np.uint32

    cache_root = folder.parent
    try:
        tmp = temporary_folder(folder, elsewhere=CACHE_ELSEWHERE)
    except OSError as err:
        raise DataError(f"cannot write the token cache in {cache_root} ({err.strerror}): set RNNLM_CACHE_DIR or "
                        "paths.cache_dir to a writable folder") from None
    needed = sum(lengths.values()) * np.dtype(dtype).itemsize
    with moved_into_place(tmp, folder, size=needed, elsewhere=CACHE_ELSEWHERE):
        # Pass 2: encode straight into the memory maps, a block at a time.
        arrays = {s: new_array(tmp / f"{s}.npy", dtype, lengths[s]) for s in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        pending: dict[str, list[int]] = {s: [] for s in SPLITS}

        def flush(split: str) -> None:
            ids = pending[split]
            arrays[split][filled[split] : filled[split] + len(ids)] = ids
            filled[split] += len(ids)
            ids.clear()

        unk_chars = dict.fromkeys(SPLITS, 0)  # the characters of the words read as <unk>, for bits per character
        for split, line, ids in encoded_lines(split_lines(source), vocab, with_lines=True):
            pending[split].extend(ids)
            if level == "word" and vocab.unk_id in ids:
                unk_chars[split] += unknown_characters(line, vocab)
            if len(pending[split]) >= _WRITE_BLOCK:
                flush(split)
        for split in SPLITS:
            flush(split)
            arrays[split].flush()
        arrays.clear()  # close the memory maps before reading them back
        unk_count = {s: 0 for s in SPLITS}
        if vocab.unk_id is not None:
            for s in SPLITS:
                unk_count[s] = int((np.load(tmp / f"{s}.npy", mmap_mode="r") == vocab.unk_id).sum())
        meta = {
            "format": CACHE_FORMAT,
            "corpus": source.name,
            "level": level,
            "source": source.identity(),
            "vocab_size": len(vocab),
            "tokens": lengths,
            "unk": unk_count,
            "unk_chars": unk_chars,
            "notes": list(dict.fromkeys(source.notes)),  # both passes may add the same note
        }
        write_atomically(tmp / "vocab.json", json.dumps(vocab.to_dict(), ensure_ascii=False))
        write_atomically(tmp / "meta.json", json.dumps(meta, indent=1))


def _check_has_text(source: CorpusSource, lines_with_text: dict[str, int]) -> None:
    """Empty lines alone are learned at once (the next token is always a line end): such a split
    would report a perfect score."""
    for split, n in lines_with_text.items():
        if n == 0:
            where = "" if "all" in source.files else f" ({_paths(source, split)})"
            raise DataError(f"the {split} split of corpus {source.name!r} has only empty lines{where}: a model scored "
                            f"on it looks perfect; give the {split} split text")


def _check_vocab_size(source: CorpusSource, vocab: Vocab, min_freq: int, max_size: int | None) -> None:
    kept = [t for t in vocab.tokens if t != BOS]  # <bos> is read, never predicted
    if len(kept) >= MIN_VOCAB:
        return
    shown = " ".join(repr(t) if t == "\n" else t for t in kept)
    if min_freq > 1 or max_size is not None:
        limit = "null" if max_size is None else max_size
        raise DataError(f"the vocabulary of corpus {source.name!r} has only {len(kept)} tokens ({shown}) with "
                        f"data.min_freq={min_freq} and data.max_size={limit}: every score would be near-perfect; lower "
                        "data.min_freq or raise data.max_size")
    raise DataError(f"the training text of corpus {source.name!r} has only {len(kept)} distinct tokens ({shown}): "
                    "too few for a model's scores to mean anything; give it more varied text")


def _paths(source: CorpusSource, split: str | None = None) -> str:
    return ", ".join(str(p) for s, paths in source.files.items() if split in (None, s) for p in paths)


def encoded_lines(lines: Iterable[tuple[str, str]], vocab: Vocab, with_lines: bool = False) -> Iterator[tuple]:
    """``(split, ids)`` of each ``(split, line)`` (``(split, line, ids)`` with ``with_lines``), the line end included,
    encoded :data:`_ENCODE_BLOCK` lines at a time."""
    block: list[tuple[str, str]] = []

    def encoded():
        for (split, line), ids in zip(block, vocab.encode_lines([line for _, line in block]), strict=True):
            yield (split, line, ids) if with_lines else (split, ids)

    for item in lines:
        block.append(item)
        if len(block) >= _ENCODE_BLOCK:
            yield from encoded()
            block = []
    yield from encoded()


def unknown_characters(line: str, vocab: Vocab) -> int:
    """The characters of the words of ``line`` that a word vocabulary reads as ``<unk>``: those it lacks, and
    ``<unk>`` itself where the text has it (PTB and WikiText do), 5 characters."""
    return sum(len(word) for word in line.split() if word == UNK or word not in vocab)


def encode_split(source: CorpusSource, vocab: Vocab, split: str | None) -> np.ndarray:
    """Ids of one split of ``source`` (all of its text when ``split`` is None) in a fixed vocabulary.

    Raises:
        DataError: the text has characters a char vocabulary without ``<unk>`` cannot encode.
    """
    return encode_split_counted(source, vocab, split)[0]


def encode_split_counted(source: CorpusSource, vocab: Vocab, split: str | None) -> tuple[np.ndarray, float | None]:
    """:func:`encode_split`, and the mean characters of the words read as ``<unk>`` (word level; None when there are
    none), which bits per character count for each (:class:`rnnlm.loss.CharacterCount`).

    Raises:
        DataError: the text has characters a char vocabulary without ``<unk>`` cannot encode.
    """
    verify_checksums(source)
    if split is None:
        lines = (line for paths in source.files.values() for p in paths for line in text_lines(p, source.tsv_column))
    else:
        lines = (line for s, line in split_lines(source) if s == split)
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max else np.uint32
    blocks, pending, unknown = [], [], set()
    unknown_words, unknown_chars = 0, 0
    closed = vocab.level == "char" and vocab.unk_id is None  # an unknown character cannot be encoded
    for _, line, ids in encoded_lines(((split, line) for line in lines if not closed or _known(line, vocab, unknown)),
                                      vocab, with_lines=True):
        if unknown:
            continue
        if vocab.level == "word" and vocab.unk_id in ids:
            unknown_words += ids.count(vocab.unk_id)
            unknown_chars += unknown_characters(line, vocab)
        pending.extend(ids)
        if len(pending) >= _WRITE_BLOCK:
            blocks.append(np.asarray(pending, dtype=dtype))
            pending = []
    if unknown:
        shown = ", ".join(repr(t) for t in sorted(unknown)[:20])
        raise DataError(
            f"the text has {len(unknown)} character(s) the model's vocabulary lacks and it has no <unk>: {shown}. "
            "Evaluate on text of the same alphabet, or train with that text in the training split"
        )
    blocks.append(np.asarray(pending, dtype=dtype))
    return np.concatenate(blocks), unknown_chars / unknown_words if unknown_words else None


def _known(line: str, vocab: Vocab, unknown: set[str]) -> bool:
    """Whether every character of ``line`` is in the char ``vocab``; the others are added to ``unknown``."""
    unknown.update(c for c in line if c not in vocab)
    return not unknown
