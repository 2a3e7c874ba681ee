"""A corpus's splits as batches, in plain PyTorch: where the text comes from, a contiguous token stream cut for
truncated BPTT or one line per example, and their loaders. :class:`rnnlm.datamodule.TextDataModule` serves them to
Lightning's training loop; ``rnnlm-eval`` reads them without Lightning."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from rnnlm.corpora import SPLITS, CorpusSource, DataError, named_source, path_source
from rnnlm.loss import IGNORE_INDEX, pad_batch
from rnnlm.recall import write_recall_corpus
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)

MODES = ("stream", "sentence")


class StreamChunks(IterableDataset):
    """``(inputs, targets)`` chunks of shape ``(batch_size, <= seq_len)`` cut from one token stream.

    The stream is cut into ``batch_size * world_size`` equal, contiguous columns; rank ``r`` reads
    rows ``r*B .. r*B+B-1``, so ranks together read every token once (the last
    ``len % columns`` tokens are dropped). Chunk k holds steps ``k*T .. k*T+T-1`` of every row, so
    row b of chunk k+1 continues row b of chunk k and the hidden state can be carried::

        stream   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11      (B=2 columns, T=2)
        rows     [t0 t1 t2 t3 t4 t5]                        row 0
                 [t6 t7 t8 t9 t10 t11]                      row 1
        chunk 0  inputs [[t0 t1],[t6 t7]]   targets [[t1 t2],[t7 t8]]
        chunk 1  inputs [[t2 t3],[t8 t9]]   targets [[t3 t4],[t9 t10]]
        chunk 2  inputs [[t4],[t10]]        targets [[t5],[t11]]

    The target is the input shifted by one step within its row. Training reads a stream so; validation, test and
    ``rnnlm-eval`` score every target (:class:`EvaluationStream`).

    ``variable``: AWD-LSTM's variable-length BPTT. Each pass cuts the rows at new places: chunk lengths are drawn
    as AWD-LSTM draws them (``seq_len``, or half of it one time in 20, plus normal noise of 5 steps, at least 5)
    and scaled together so that the pass has as many chunks as a fixed ``seq_len`` gives and reads every step
    once. Keeping the count keeps progress, validation intervals and resume points where they are; the draws
    depend only on ``seed`` and the pass, so a resumed pass is cut as the original was.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 split: str = "train", variable: bool = False, seed: int = 0):
        columns = batch_size * world_size
        self.steps = len(ids) // columns  # tokens per row
        if self.steps < 2:
            raise DataError(
                f"the {split} split has {len(ids)} tokens, too few for {columns} columns of 2+ tokens "
                f"(batch size {batch_size} x {world_size} process(es)): lower the batch size or use more text"
            )
        block = ids[: columns * self.steps].reshape(columns, self.steps)
        self.rows = block[rank * batch_size : (rank + 1) * batch_size]  # (B, steps), still memory-mapped
        self.seq_len = seq_len
        self.variable, self.seed = variable, seed
        self.resume_at = 0  # chunk the next pass starts from (set when a run resumes mid-epoch)
        self.passes = 0  # passes started (the next one's index)

    def __len__(self) -> int:
        return math.ceil((self.steps - 1) / self.seq_len)

    def lengths(self, pass_index: int) -> np.ndarray:
        """The chunk lengths of a pass; they sum to the ``steps - 1`` targets of a row."""
        targets, count = self.steps - 1, len(self)
        if not self.variable:
            return np.array([self.seq_len] * (count - 1) + [targets - self.seq_len * (count - 1)])
        rng = np.random.default_rng([self.seed, pass_index])
        around = np.where(rng.random(count) < 0.95, self.seq_len, self.seq_len / 2)
        drawn = np.maximum(5, rng.normal(around, 5))
        ends = np.round(np.cumsum(drawn) * targets / drawn.sum()).astype(np.int64)  # the last end is `targets`
        return np.diff(ends, prepend=0)  # each >= 4: the config asks for seq_len >= 10

    def __iter__(self):
        first, self.resume_at = self.resume_at, 0  # only the pass that resumes skips ahead
        lengths = self.lengths(self.passes)
        self.passes += 1
        starts = np.cumsum(lengths) - lengths
        for start, length in zip(starts[first:], lengths[first:], strict=True):
            window = torch.from_numpy(self.rows[:, start : start + length + 1].astype(np.int64))  # (B, T+1)
            yield window[:, :-1], window[:, 1:]


class EvaluationStream(IterableDataset):
    """``(inputs, targets)`` chunks of shape ``(batch_size, <= seq_len)`` that score every target of a token stream
    once: validation, test and ``rnnlm-eval`` read a split in stream mode this way.

    The ``len - 1`` targets (every token but the first) are cut into ``batch_size * world_size`` columns of
    ``L = (len - 1) // columns`` targets. Column c reads tokens ``c*L .. c*L+L``: its first input is the previous
    column's last target, so no token is left unscored where a column starts (training's :class:`StreamChunks`
    drops those). Rank r reads columns ``r*B .. r*B+B-1``, chunk k holding steps ``k*T .. k*T+T-1`` of each, the
    state carried from chunk to chunk. The last ``(len - 1) % columns`` targets, fewer than the columns, are read
    by the last rank after its columns, as one more column of one row (from a fresh state, as each column
    starts)::

        stream   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10          (11 tokens: 10 targets; B=3 columns of 3, T=2)
        rows     [t0 t1 t2 t3]                               column 0: targets t1 t2 t3
                 [t3 t4 t5 t6]                               column 1: targets t4 t5 t6
                 [t6 t7 t8 t9]                               column 2: targets t7 t8 t9
        chunk 0  inputs [[t0 t1],[t3 t4],[t6 t7]]   targets [[t1 t2],[t4 t5],[t7 t8]]
        chunk 1  inputs [[t2],[t5],[t8]]            targets [[t3],[t6],[t9]]
        chunk 2  inputs [[t9]]                      targets [[t10]]        the remainder: one row

    With one column (``batch_size=1`` on one process) the chunks are one forward pass over the whole stream.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 split: str = "evaluation"):
        columns, targets = batch_size * world_size, len(ids) - 1
        self.steps = max(targets, 0) // columns  # targets per column
        if self.steps < 1:
            most = f" to at most {targets // world_size}" if targets >= world_size else ""
            raise DataError(
                f"the {split} split has {len(ids)} tokens, too few for {columns} columns (batch size {batch_size} x "
                f"{world_size} process(es)) of one scored token or more: lower the batch size{most}, or use more text"
            )
        # (columns, L+1), neighbours sharing one token; a view of ids, still memory-mapped
        block = np.lib.stride_tricks.sliding_window_view(ids[: columns * self.steps + 1], self.steps + 1)[:: self.steps]
        self.rows = block[rank * batch_size : (rank + 1) * batch_size]  # (B, L+1)
        last = rank == world_size - 1
        self.rest = ids[columns * self.steps :] if last and targets % columns else None  # the remainder's tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        rest = 0 if self.rest is None else math.ceil((len(self.rest) - 1) / self.seq_len)
        return math.ceil(self.steps / self.seq_len) + rest

    def __iter__(self):
        rest = [] if self.rest is None else [self.rest[None]]  # (1, r+1)
        for rows in [self.rows, *rest]:
            for start in range(0, rows.shape[1] - 1, self.seq_len):
                window = torch.from_numpy(rows[:, start : start + self.seq_len + 1].astype(np.int64))  # (B, T+1)
                yield window[:, :-1], window[:, 1:]


class Sentences(Dataset):
    """One example per line: inputs ``<bos> t1 .. tn``, targets ``t1 .. tn <eos>`` (at most ``max_len``;
    None keeps whole lines, as evaluation must to score every token). ``last_only``: only ``tn`` is scored.

    Lines are found in the stream by their line-end id; empty lines are skipped.
    """

    def __init__(self, ids: np.ndarray, line_end_id: int, bos_id: int, max_len: int | None, last_only: bool = False):
        ends = np.flatnonzero(np.asarray(ids) == line_end_id)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        keep = ends > starts  # a line holding only its line end is empty
        self.starts, self.ends = starts[keep], ends[keep]
        self.ids, self.bos_id, self.max_len, self.last_only = ids, bos_id, max_len, last_only
        self.truncated = 0 if max_len is None else int(((self.ends + 1 - self.starts) > max_len).sum())

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        line = torch.from_numpy(self.ids[self.starts[i] : self.ends[i] + 1][: self.max_len].astype(np.int64))
        inputs = torch.cat([torch.tensor([self.bos_id]), line[:-1]])
        if self.last_only:  # only the line's last word (before its end) is scored: the answer of data=recall
            targets = torch.full_like(line, IGNORE_INDEX)
            targets[-2] = line[-2]
            return inputs, targets
        return inputs, line


class EvenShards(DistributedSampler):
    """Rank ``r`` of ``R`` reads examples ``r, r+R, r+2R ..``: together the ranks read each example once.

    Lightning's :class:`DistributedSampler` pads the dataset with repeated examples so that every rank
    gets as many, which counts those examples twice in a validation score. Ranks here may get one
    example fewer; evaluation only sums losses at the end, so uneven ranks are fine. Being a
    DistributedSampler, Lightning keeps it instead of putting its own in.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def make_loader(dataset: Dataset, rows: int, shuffle: bool = False, num_workers: int = 0,
                sampler: DistributedSampler | None = None, pin_memory: bool = False) -> DataLoader:
    """Stream chunks come batched and in order; sentences are shuffled (if asked, or drawn by ``sampler``)
    and padded ``rows`` at a time.

    ``pin_memory`` (for a GPU): a batch in page-locked memory is copied while the GPU is busy; from
    ordinary memory the copy would make the host wait until the GPU has finished the step before.

    Each loader draws on a generator of its own (seeded from the run's seed): starting an iterator
    would otherwise take a number from the global random stream, so where validations fall would
    change the dropout masks, and a resumed run would not repeat the original.
    """
    generator = torch.Generator().manual_seed(torch.initial_seed())
    if isinstance(dataset, StreamChunks | EvaluationStream):  # batched already
        return DataLoader(dataset, batch_size=None, generator=generator, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=rows, shuffle=shuffle, sampler=sampler, collate_fn=pad_batch,
                      num_workers=num_workers, generator=generator, pin_memory=pin_memory)


def split_dataset(ids: np.ndarray, vocab: Vocab, mode: str, seq_len: int, batch_size: int, *, train: bool = False,
                  rank: int = 0, world_size: int = 1, name: str = "evaluation", scored: str = "all",
                  variable_seq_len: bool = False) -> Dataset:
    """The dataset of one split, as training reads it: :class:`TextDataModule` and ``eval.py`` both build theirs here.

    Args:
        ids: the split's token ids (a memory map is fine).
        vocab: the vocabulary the ids are in; sentence mode starts each line with its ``<bos>``.
        mode: ``stream`` or ``sentence``, the data mode the model was trained in. Not what the model
            carries: a bidirectional model carries no state, yet trains on stream windows.
        seq_len: time steps per stream chunk; in sentence mode the longest training line.
        batch_size: stream columns on this process (the loader batches sentences itself).
        train: the training pass. Only its sentences are cut to ``seq_len``: evaluation reads whole lines, and
            streams as :class:`EvaluationStream` does, so that its score covers every token; training drops a
            stream's ragged tail and each column's first token (:class:`StreamChunks`).
        rank / world_size: this process and how many share the split (stream columns are split between them;
            sentences are dealt out by the loader's :class:`EvenShards`).
        name: the split, for messages.
        scored: ``all`` targets, or only the ``last`` word of each line (sentence mode).
        variable_seq_len: stream training chunks of varying length around ``seq_len`` (:class:`StreamChunks`).

    Raises:
        DataError: too few tokens for the columns (the message says how many are possible), no non-empty line, or
            fewer lines than processes.
    """
    if mode == "stream" and train:
        return StreamChunks(ids, batch_size, seq_len, rank, world_size, name, variable=variable_seq_len,
                            seed=torch.initial_seed())
    if mode == "stream":  # every target scored, whatever the columns
        return EvaluationStream(ids, batch_size, seq_len, rank, world_size, name)
    if mode != "sentence":
        raise DataError(f"data mode {mode!r} is unknown: use one of {'|'.join(MODES)}")
    if vocab.bos_id is None:  # prepare() gives every sentence-mode vocabulary one
        raise DataError("sentence mode starts each line with <bos>, which this vocabulary lacks "
                        "(a stream-mode vocabulary): read this data in stream mode")
    dataset = Sentences(ids, vocab.line_end_id, vocab.bos_id, seq_len if train else None, last_only=scored == "last")
    if len(dataset) == 0:
        raise DataError(f"the {name} split has no non-empty line: sentence mode needs lines of text")
    if not train and len(dataset) < world_size:
        raise DataError(f"the {name} split has {len(dataset)} lines, fewer than the {world_size} "
                        "processes that share it: use more text or fewer devices")
    if dataset.truncated:
        log.warning("%s: %d lines longer than data.seq_len=%d tokens are cut to it", name, dataset.truncated, seq_len)
    return dataset


def training_text_everywhere(source: CorpusSource) -> CorpusSource:
    """``data.holdout=false``: the source with its training text as the valid and test splits too.

    The whole of a lone file (or of the ``*.txt`` files read as one corpus) trains, with ``data.split``
    ignored; a folder's train.txt trains and stands in for valid.txt and test.txt. Scores then say how well
    the text was memorized, not how well the model generalizes: meant for a few lines learned by heart, which
    a held-out split could not be cut from.
    """
    train = source.files["all"] if "all" in source.files else source.files["train"]
    # the source's notes say how its splits were found, which no longer applies
    return dataclasses.replace(source, files={split: list(train) for split in SPLITS}, notes=[])


def data_source(corpus: str | None, path: str | None, data_dir: str, cache_dir: str,
                split: tuple[float, float, float], holdout: bool = True, download: bool = True,
                recall: dict | None = None, split_by: str = "lines") -> CorpusSource:
    """Where the text of :class:`~rnnlm.datamodule.TextDataModule`'s arguments comes from (see there): the synthetic
    recall task's files, ``path``, or the named ``corpus``; with ``holdout=False`` the training text stands in for
    every split (:func:`training_text_everywhere`)."""
    if recall:
        settings = dict(recall)
        if "examples" in settings:  # a list from the config
            settings["examples"] = tuple(settings["examples"])
        src = path_source(write_recall_corpus(Path(cache_dir), **settings))
    elif path:
        src = path_source(Path(path).expanduser())
    else:
        src = named_source(corpus, Path(data_dir).expanduser(), allow_download=download)
    src = dataclasses.replace(src, split=tuple(split), split_by=split_by)
    if "all" in src.files and split[2] <= 0 and holdout:  # else test/ metrics would silently repeat val/'s
        shown = "[" + ",".join(f"{f:g}" for f in split) + "]"
        note = f"data.split={shown} leaves no test text: the test split is the validation text"
        src = dataclasses.replace(src, notes=[*src.notes, note])
    return src if holdout else training_text_everywhere(src)
