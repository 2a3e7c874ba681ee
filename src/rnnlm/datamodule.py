"""``TextDataModule``: a corpus tokenized once and cached, its splits served to Lightning as stream chunks for truncated
BPTT or one line per example (the datasets themselves, Lightning-free, are in :mod:`rnnlm.batches`)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from rnnlm.batches import EvenShards, Sentences, StreamChunks, data_source, make_loader, split_dataset
from rnnlm.corpora import CorpusSource
from rnnlm.prepare import DEFAULT_BPE_VOCAB_SIZE, PreparedCorpus, prepare
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    """Word-, char- or bpe-level corpus as stream chunks (truncated BPTT) or padded sentences.

    Args:
        corpus: a named corpus (see :data:`rnnlm.corpora.CORPORA`), or None when ``path`` is given.
        path: a text file or folder; wins over ``corpus``.
        level: ``char``, ``word`` or ``bpe`` (byte-level BPE subwords, :mod:`rnnlm.bpe`).
        mode: ``stream`` (contiguous columns, state carried) or ``sentence`` (one line per example).
        seq_len: time steps per chunk (stream) or the longest training example (sentence; validation and
            test lines are read whole, so every token is scored).
        batch_size / eval_batch_size: rows per batch on each process for training / evaluation.
        test_batch_size: rows per batch on each process for the test split; ``None``: ``eval_batch_size``. In stream
            mode the columns the split is cut into, and so the context each prediction has (AWD-LSTM scores its
            test split as one column: ``test_batch_size=1``).
        split: train/valid/test fractions of the lines of a corpus that comes as one file (a test fraction of 0: the
            valid text is the test text too).
        split_by: ``lines``, or ``characters``: ``split`` cuts the one file at fractions of its characters, as
            nanoGPT does (:func:`rnnlm.corpora.split_lines`).
        holdout: validate and test on text held out from training (``split``, or valid.txt/test.txt); False
            validates and tests on the training text itself, for a few lines learned by heart
            (:func:`training_text_everywhere`).
        data_dir: where named corpora live (downloaded when missing).
        cache_dir: where token ids are cached; may differ from a read-only ``data_dir``.
        scored: the targets in the loss and metrics: ``all``, or the ``last`` word of each line (sentence mode).
        variable_seq_len: stream training chunks of varying length around ``seq_len`` (AWD-LSTM's variable-length
            BPTT; the model scales each step's learning rate by the chunk's length).
        recall: the settings of the synthetic recall task (:mod:`rnnlm.recall`), which then is the corpus.
        bpe_vocab_size: ``level=bpe``: the most tokens the tokenizer trained on the training split may have (the
            256 bytes, the specials and the merges).
    """

    def __init__(
        self,
        corpus: str | None = "tinyshakespeare",
        path: str | None = None,
        level: str = "char",
        mode: str = "stream",
        seq_len: int = 128,
        batch_size: int = 64,
        eval_batch_size: int = 10,
        test_batch_size: int | None = None,
        min_freq: int = 1,
        max_size: int | None = None,
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        split_by: str = "lines",
        holdout: bool = True,
        data_dir: str = "data",
        cache_dir: str = ".cache",
        download: bool = True,
        num_workers: int = 0,
        scored: str = "all",
        recall: dict | None = None,
        variable_seq_len: bool = False,
        bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._prepared: PreparedCorpus | None = None
        self.datasets: dict[str, Dataset] = {}

    def source(self) -> CorpusSource:
        hp = self.hparams
        return data_source(hp.corpus, hp.path, hp.data_dir, hp.cache_dir, hp.split, hp.holdout, hp.download, hp.recall,
                           hp.split_by)

    def load(self) -> PreparedCorpus:
        """Token ids and vocabulary, tokenized on first use and cached."""
        if self._prepared is None:
            hp = self.hparams
            source = self.source()
            for note in source.notes:
                log.warning(note)
            if not hp.holdout:
                log.info("data.holdout=false: validating and testing on the training text (%s)", source.name)
            self._prepared = prepare(source, hp.level, Path(hp.cache_dir).expanduser(), hp.mode,
                                     hp.min_freq, hp.max_size, hp.bpe_vocab_size)
        return self._prepared

    def unknown_chars(self, split: str) -> float | None:
        """The mean characters of the words of ``split`` read as ``<unk>`` (word level), which bits per character
        count for each (:class:`rnnlm.loss.CharacterCount`); None when there are none."""
        return self.load().unknown_chars[split]

    @property
    def vocab(self) -> Vocab:
        return self.load().vocab

    @property
    def carries_state(self) -> bool:
        """Stream batches continue each other, so the model carries its hidden state across them."""
        return self.hparams.mode == "stream"

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str | None = None) -> None:
        prepared = self.load()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        hp = self.hparams
        for split in ("train", "valid", "test"):
            self.datasets[split] = split_dataset(prepared.splits[split], prepared.vocab, hp.mode, hp.seq_len,
                                                 self.rows(split),
                                                 train=split == "train", rank=rank, world_size=world, name=split,
                                                 scored=hp.scored, variable_seq_len=hp.variable_seq_len)

    def state_dict(self) -> dict:
        """Where the training stream stands: the pass and its chunks already trained on."""
        stream = self.datasets.get("train")
        if self.trainer is None or not isinstance(stream, StreamChunks):
            return {}
        # An epoch reads the pass's first num_training_batches chunks: all of them, or fewer with
        # trainer.limit_train_batches. Once it has read them, the run goes on with the next pass from its first
        # chunk, as Lightning goes on with the next epoch; the chunks left unread in this pass are never read.
        processed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = processed if processed < self.trainer.num_training_batches else 0
        # a pass under way (done > 0) has been counted in `passes`: the resumed run repeats its cuts
        return {"train_chunks_done": done, "train_pass": stream.passes - 1 if done else stream.passes}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream where the checkpoint left it (called after setup, before the loaders)."""
        stream = self.datasets.get("train")
        if isinstance(stream, StreamChunks):
            stream.resume_at = state.get("train_chunks_done", 0)
            stream.passes = state.get("train_pass", 0)

    def rows(self, split: str) -> int:
        """Rows per batch on each process for ``split`` (``train``, ``valid`` or ``test``): stream columns, or lines."""
        hp = self.hparams
        if split == "train":
            return hp.batch_size
        if split == "test" and hp.test_batch_size is not None:
            return hp.test_batch_size
        return hp.eval_batch_size

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset, sampler = self.datasets[split], None
        if split != "train" and isinstance(dataset, Sentences):  # each line scored once, on one process
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = EvenShards(dataset, world, rank)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return make_loader(dataset, self.rows(split), shuffle, self.hparams.num_workers, sampler, pin_memory=on_gpu)

    def transfer_batch_to_device(self, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                                 dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The batch is always (inputs, targets): Lightning's walk through any nested collection costs
        # more than a small model's step. non_blocking: a pinned batch is copied while the GPU works.
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        if self.carries_state:  # the columns decide how much context each prediction has, and so the score
            key = "eval_batch_size" if self.hparams.test_batch_size is None else "test_batch_size"
            log.info("Testing on %d stream column(s) per process (data.%s)", self.rows("test"), key)
        return self._loader("test")
