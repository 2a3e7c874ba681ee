"""Data that would give a wrong number is refused or repaired: degenerate splits and vocabularies, changed
corpus files, Gutenberg licence text, cut or repeated evaluation lines, damaged caches, non-text files."""

import bz2
import csv
import gzip
import hashlib
import logging
import lzma
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from helpers import PANGRAMS, REPO
from rnnlm import corpora
from rnnlm.batches import EvenShards
from rnnlm.commands.train import train
from rnnlm.corpora import CORPORA, DataError, RemoteFile, named_source, path_source, read_lines, text_lines
from rnnlm.datamodule import TextDataModule
from rnnlm.loss import IGNORE_INDEX
from rnnlm.prepare import prepare


def _write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ degenerate data
def test_a_corpus_of_empty_lines_is_refused(tmp_path):
    corpus = _write(tmp_path / "empty.txt", [""] * 100)
    for level in ("char", "word"):
        with pytest.raises(DataError, match="the train split of corpus 'empty' has only empty lines"):
            prepare(path_source(corpus), level, tmp_path / "cache")


def test_an_empty_valid_file_is_refused(tmp_path):
    _write(tmp_path / "train.txt", PANGRAMS)
    _write(tmp_path / "valid.txt", ["", ""])
    with pytest.raises(DataError, match=r"the valid split of corpus .* has only empty lines \(.*valid.txt\)"):
        prepare(path_source(tmp_path), "word", tmp_path / "cache")


@pytest.mark.parametrize("limits,shown", [({"min_freq": 100_000_000}, "data.min_freq=100000000 and data.max_size=null"),
                                          ({"max_size": 2}, "data.min_freq=1 and data.max_size=2")])
def test_a_vocabulary_of_two_tokens_is_refused(tmp_path, tiny_corpus, limits, shown):
    with pytest.raises(DataError, match=f"has only 2 tokens \\(<unk> <eos>\\) with {shown}: .*lower data.min_freq"):
        prepare(path_source(tiny_corpus), "word", tmp_path / "cache", **limits)
    one_char = _write(tmp_path / "a.txt", ["aaaa"] * 100)
    with pytest.raises(DataError, match=r"has only 2 distinct tokens \('\\n' a\)"):
        prepare(path_source(one_char), "char", tmp_path / "cache")


def test_training_refuses_a_split_without_valid_text(make_cfg, tiny_corpus):
    with pytest.raises(DataError, match=r"data.split=\[1,0,0\] gives the valid split no lines"):
        train(make_cfg(f"data.path={tiny_corpus}", "data.split=[1,0,0]"))


# ------------------------------------------------------------------ named corpora are checked
def _fake_named(monkeypatch, data_dir, payload: bytes, published: bytes):
    """A named corpus 'fake' whose file already sits in data_dir (so nothing is downloaded)."""
    (data_dir / "fake").mkdir(parents=True)
    (data_dir / "fake" / "input.txt").write_bytes(payload)
    remote = RemoteFile("input.txt", "http://127.0.0.1:9/never", hashlib.sha256(published).hexdigest())
    monkeypatch.setitem(corpora.CORPORA, "fake", corpora.NamedCorpus("fake", {"all": remote}, "char"))
    monkeypatch.setattr(corpora, "download", lambda *a: pytest.fail("must not download"))


def test_a_truncated_named_corpus_is_refused(tmp_path, monkeypatch):
    published = "\n".join(PANGRAMS * 30).encode()
    _fake_named(monkeypatch, tmp_path / "data", published[:500], published)
    path = tmp_path / "data" / "fake" / "input.txt"
    got, expected = hashlib.sha256(published[:500]).hexdigest(), hashlib.sha256(published).hexdigest()
    with pytest.raises(DataError, match=f"{path} has SHA-256 {got}, expected {expected}: the file is truncated or "
                                        "changed; delete it so the next run downloads it again"):
        prepare(named_source("fake", tmp_path / "data"), "char", tmp_path / "cache")


def test_a_checked_corpus_is_not_hashed_again(tmp_path, monkeypatch):
    published = "\n".join(PANGRAMS * 30).encode()
    _fake_named(monkeypatch, tmp_path / "data", published, published)
    first = prepare(named_source("fake", tmp_path / "data"), "char", tmp_path / "cache")
    monkeypatch.setattr(corpora, "file_digest", lambda path, *a: pytest.fail(f"hashed {path} again"))
    assert prepare(named_source("fake", tmp_path / "data"), "char", tmp_path / "cache").path == first.path


def test_the_offline_copies_pass_the_check(shared_data):
    for name in CORPORA.keys() - {"wikitext103"}:  # a 190 MB zip: no offline copy
        corpora.verify_checksums(named_source(name, shared_data, allow_download=False))


# ------------------------------------------------------------------ Gutenberg header and footer
def test_alice_splits_hold_the_book_not_the_gutenberg_licence(shared_data, cache_dir):
    prepared = prepare(named_source("alice", shared_data), "char", cache_dir)
    text = {split: prepared.vocab.decode(ids.tolist()) for split, ids in prepared.splits.items()}
    assert text["train"].lstrip().startswith("[Illustration]\n\n\n\n\nAlice’s Adventures in Wonderland")
    for split in ("train", "valid", "test"):
        assert "gutenberg" not in text[split].lower(), split
    assert text["test"].rstrip().endswith("THE END")


def test_gutenberg_markers_in_any_file_old_form_and_any_case(tmp_path):
    book = _write(tmp_path / "book.txt", ["The Project Gutenberg EBook of X", "licence",
                                          "*** start of this project gutenberg ebook x ***", "It was", "the end",
                                          "***END OF THIS PROJECT GUTENBERG EBOOK X***", "more licence"])
    assert list(text_lines(book)) == ["It was", "the end"]
    plain = _write(tmp_path / "plain.txt", ["*** a line that only looks like a marker", "text"])
    assert list(text_lines(plain)) == list(read_lines(plain))


# ------------------------------------------------------------------ sentence mode scores every token once
def _long_lines(tmp_path):
    words = "the quick brown fox jumps over the lazy dog and runs far away".split()
    return _write(tmp_path / "long.txt", [" ".join(words[: 3 + i % 10]) for i in range(200)])


def _scored(loader) -> int:
    return sum(int((targets != IGNORE_INDEX).sum()) for _, targets in loader)


def test_sentence_mode_evaluates_every_token_of_long_lines(tmp_path, caplog):
    data = TextDataModule(path=str(_long_lines(tmp_path)), level="word", mode="sentence", seq_len=5,
                          eval_batch_size=3, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        data.setup()
    splits = data.load().splits
    assert _scored(data.val_dataloader()) == len(splits["valid"])
    assert _scored(data.test_dataloader()) == len(splits["test"])
    assert "train: 144 lines longer than data.seq_len=5 tokens are cut to it" in caplog.text  # training keeps its cut


def test_sentence_mode_logs_every_validation_token(make_cfg, tmp_path):
    corpus = _long_lines(tmp_path)
    metrics = train(make_cfg("data=word", "data.mode=sentence", f"data.path={corpus}", "data.seq_len=5",
                             "trainer.max_steps=2"))
    prepared = TextDataModule(path=str(corpus), level="word", mode="sentence", cache_dir=str(tmp_path / "c")).load()
    assert metrics["val/tokens"] == len(prepared.splits["valid"])
    assert metrics["test/tokens"] == len(prepared.splits["test"])


@pytest.mark.parametrize("lines,world", [(7, 3), (6, 2), (5, 1), (3, 4)])
def test_even_shards_give_each_line_to_exactly_one_rank(lines, world):
    dataset = list(range(lines))
    shards = [list(EvenShards(dataset, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == dataset  # no line twice, none left out
    assert [len(EvenShards(dataset, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    assert isinstance(EvenShards(dataset, world, 0), DistributedSampler)  # so Lightning does not replace it


def test_sentence_evaluation_on_two_ranks_scores_each_token_once(tmp_path):
    counted = 0
    for rank in range(2):
        data = TextDataModule(path=str(_long_lines(tmp_path)), level="word", mode="sentence", seq_len=5,
                              eval_batch_size=4, cache_dir=str(tmp_path / "cache"))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2,
                                       strategy=SimpleNamespace(root_device=torch.device("cpu")))
        data.setup()
        assert isinstance(data.val_dataloader().sampler, EvenShards)
        counted += _scored(data.val_dataloader())
    assert counted == len(data.load().splits["valid"])


@pytest.mark.slow  # two processes start and train (about a minute on two CPU cores)
def test_ddp_sentence_validation_counts_each_token_once(tmp_path):
    corpus = _write(tmp_path / "odd.txt", [" ".join(PANGRAMS[i % 4].split()[: 2 + i % 7]) for i in range(180)])
    run = tmp_path / "run"
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", f"data.path={corpus}",
            "data=word", "data.mode=sentence", f"paths.cache_dir={tmp_path / 'cache'}", "model.hidden_size=16",
            "model.embedding_dim=8", "data.seq_len=4", "data.batch_size=4", "data.eval_batch_size=2",
            "trainer.max_steps=3", "test=false", f"hydra.run.dir={run}", "~callbacks.progress_bar"]
    result = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path,
                            env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/tokens")]
    valid = TextDataModule(path=str(corpus), level="word", mode="sentence", cache_dir=str(tmp_path / "cache"))
    assert float(rows[-1]["val/tokens"]) == len(valid.load().splits["valid"])  # 9 lines on 2 ranks: none repeated


# ------------------------------------------------------------------ caches and files that are not text
def test_an_unwritable_cache_dir_is_one_clear_error(tmp_path, tiny_corpus):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(DataError, match=f"cannot write the token cache in {blocked / 'cache'} .*: set "
                                        "RNNLM_CACHE_DIR or paths.cache_dir to a writable folder"):
        prepare(path_source(tiny_corpus), "char", blocked / "cache")


def test_a_read_only_cache_dir_is_one_clear_error(tiny_corpus):
    # /proc refuses new folders even to root, as a read-only mount does
    with pytest.raises(DataError, match="cannot write the token cache in /proc.*RNNLM_CACHE_DIR or paths.cache_dir"):
        prepare(path_source(tiny_corpus), "char", Path("/proc/rnnlm-cache"))


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / "train.npy").write_bytes((folder / "train.npy").read_bytes()[:300]),
    lambda folder: (folder / "vocab.json").write_text('{"level": "char", "tok'),
    lambda folder: (folder / "meta.json").unlink(),
])
def test_a_damaged_cache_is_rebuilt(tmp_path, tiny_corpus, caplog, damage):
    first = prepare(path_source(tiny_corpus), "char", tmp_path / "cache")
    train_ids = np.array(first.splits["train"])
    damage(first.path)
    with caplog.at_level(logging.WARNING):
        again = prepare(path_source(tiny_corpus), "char", tmp_path / "cache")
    assert again.path == first.path and np.array_equal(again.splits["train"], train_ids)
    assert again.vocab.tokens == first.vocab.tokens


def test_the_damaged_cache_warning_names_the_folder(tmp_path, tiny_corpus, caplog):
    first = prepare(path_source(tiny_corpus), "char", tmp_path / "cache")
    (first.path / "valid.npy").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        prepare(path_source(tiny_corpus), "char", tmp_path / "cache")
    assert f"the token cache {first.path} is damaged" in caplog.text and "rebuilding it" in caplog.text


TEXT = "hello world\n" * 100


@pytest.mark.parametrize("name,payload,fix", [
    ("u16.txt", TEXT.encode("utf-16"), "is UTF-16 text, not UTF-8: convert it, e.g. `iconv -f utf-16 -t utf-8 {p} > "),
    ("u16le.txt", TEXT.encode("utf-16-le"), "is UTF-16LE text, not UTF-8: convert it, e.g. `iconv -f utf-16le"),
    ("u32.txt", TEXT.encode("utf-32"), "is UTF-32 text, not UTF-8: convert it, e.g. `iconv -f utf-32 -t utf-8"),
    ("t.txt.gz", gzip.compress(TEXT.encode()), "is gzip-compressed, not text: unpack it, e.g. `gzip -dc {p} > {s}`"),
    ("t.txt.bz2", bz2.compress(TEXT.encode()), "is bzip2-compressed, not text: unpack it, e.g. `bzip2 -dc {p} > {s}`"),
    ("t.txt.xz", lzma.compress(TEXT.encode()), "is xz-compressed, not text: unpack it, e.g. `xz -dc {p} > {s}`"),
    ("t.zip", None, "is a zip archive, not text: unpack it (`unzip {p}`)"),
    ("t.bin", b"\x00\x01\x02abc\n" + bytes(range(256)) * 4, "holds NUL bytes, so it is not text"),
], ids=["utf-16", "utf-16le", "utf-32", "gzip", "bzip2", "xz", "zip", "binary"])
def test_non_text_files_get_the_right_fix(tmp_path, name, payload, fix):
    path = tmp_path / name
    if payload is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("t.txt", TEXT)
    else:
        path.write_bytes(payload)
    with pytest.raises(DataError) as err:
        prepare(path_source(path), "char", tmp_path / "cache")
    message = str(err.value)
    assert fix.format(p=path, s=path.with_suffix("")) in message and "latin1" not in message
    assert "\n" not in message
