import hashlib
from pathlib import Path

import numpy as np
import pytest

from rnnlm import corpora
from rnnlm.corpora import CorpusSource, DataError, RemoteFile, named_source, path_source, read_lines, split_lines
from rnnlm.prepare import prepare


def test_read_lines_drops_bom_and_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\r\ntwo\nthree".encode())
    assert list(read_lines(path)) == ["one", "two", "three"]


def test_read_lines_reads_one_tsv_column(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("id\tdocument\tlabel\n1\t좋은 영화\t1\n2\t별로\t0\n", encoding="utf-8")
    assert list(read_lines(path, "document")) == ["좋은 영화", "별로"]


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("hello\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8.*byte offset 9 \(line 2\)"):
        list(read_lines(path))


def test_lone_file_is_split_by_line_fractions(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    pairs = list(split_lines(CorpusSource("t", {"all": [path]}, split=(0.8, 0.1, 0.1))))
    splits = [s for s, _ in pairs]
    assert splits == ["train"] * 80 + ["valid"] * 10 + ["test"] * 10
    assert pairs[80] == ("valid", "line 80")


def test_too_small_corpus_is_refused_not_scored_on_its_training_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("just one line\n" * 10)
    with pytest.raises(DataError, match=r"only 10 line\(s\), too few for data.split=\[0.9,0.05,0.05\] to give the "
                                        r"valid split one: use a longer file"):
        list(split_lines(CorpusSource("t", {"all": [path]})))
    assert len(list(split_lines(CorpusSource("t", {"all": [path]}, split=(0.8, 0.1, 0.1))))) == 10
    with pytest.raises(DataError, match=r"data.split=\[1,0,0\] gives the valid split no lines"):
        list(split_lines(CorpusSource("t", {"all": [path]}, split=(1.0, 0.0, 0.0))))


def test_folder_layouts(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("b\n")
    (tmp_path / "books" / "a.txt").write_text("a\n")
    books = tmp_path / "books"
    assert path_source(books).files == {"all": [books / "a.txt", books / "b.txt"]}  # sorted, one corpus
    (tmp_path / "ds").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "ds" / f"{split}.txt").write_text(f"{split}\n")
    source = path_source(tmp_path / "ds")
    assert source.files["test"] == [tmp_path / "ds" / "valid.txt"] and "no test.txt" in source.notes[0]
    with pytest.raises(DataError, match="does not exist"):
        path_source(tmp_path / "nope")


def test_named_corpus_is_found_in_the_data_dir_without_download(shared_data, monkeypatch):
    monkeypatch.setattr(corpora, "download", lambda *a: pytest.fail("must not download"))
    source = named_source("ptb", shared_data)
    assert source.files["valid"] == [shared_data / "ptb" / "ptb.valid.txt"]


def _fake_corpus(monkeypatch, tmp_path, payload: bytes, digest: str):
    upstream = tmp_path / "upstream.txt"
    upstream.write_bytes(payload)
    remote = RemoteFile("input.txt", upstream.as_uri(), digest)
    monkeypatch.setitem(corpora.CORPORA, "fake", corpora.NamedCorpus("fake", {"all": remote}, "char"))


def test_download_verifies_checksum_and_caches(tmp_path, monkeypatch):
    payload = b"hello world\n" * 10
    _fake_corpus(monkeypatch, tmp_path, payload, hashlib.sha256(payload).hexdigest())
    data_dir = tmp_path / "data"
    source = named_source("fake", data_dir)
    assert source.files["all"][0].read_bytes() == payload
    (tmp_path / "upstream.txt").unlink()  # a second lookup must not download again
    assert named_source("fake", data_dir).files == source.files


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    _fake_corpus(monkeypatch, tmp_path, b"tampered\n", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        named_source("fake", tmp_path / "data")
    assert not any((tmp_path / "data" / "fake").iterdir())


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    remote = RemoteFile("input.txt", "http://127.0.0.1:9/none.txt", "0" * 64)
    monkeypatch.setitem(corpora.CORPORA, "fake", corpora.NamedCorpus("fake", {"all": remote}, "char"))
    with pytest.raises(DataError, match=r"Put the file at .*fake/input.txt"):
        named_source("fake", tmp_path / "data")


def test_ptb_tokens_match_the_published_counts(shared_data, cache_dir):
    prepared = prepare(named_source("ptb", shared_data), "word", cache_dir)
    assert len(prepared.vocab) == 10000  # the closed PTB vocabulary, <unk> and <eos> included
    assert {s: len(a) for s, a in prepared.splits.items()} == {"train": 929589, "valid": 73760, "test": 82430}
    assert isinstance(prepared.splits["train"], np.memmap)
    first_line = (shared_data / "ptb" / "ptb.train.txt").open().readline().strip()
    n = len(first_line.split()) + 1
    assert prepared.vocab.decode(prepared.splits["train"][:n].tolist()) == first_line + "\n"


def test_token_cache_is_reused(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("abc\n" * 100)
    first = prepare(path_source(text), "char", tmp_path / "cache")
    monkeypatch.setattr("rnnlm.prepare._build", lambda *a: pytest.fail("rebuilt a cached corpus"))
    second = prepare(path_source(text), "char", tmp_path / "cache")
    assert second.path == first.path and second.vocab.tokens == first.vocab.tokens
    assert list(Path(tmp_path / "cache").iterdir()) == [first.path]  # no temporary folder left


def test_char_vocab_gets_unk_only_for_unseen_characters(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("ab\n" * 18 + "xy\n" * 2)  # x and y appear only in valid/test
    prepared = prepare(CorpusSource("t", {"all": [text]}), "char", tmp_path / "cache")
    assert prepared.vocab.unk_id == 0 and "x" not in prepared.vocab
    assert (np.asarray(prepared.splits["valid"]) == 0).sum() == 2


def test_wikitext2_tokens_match_the_published_counts(shared_data, cache_dir):
    prepared = prepare(named_source("wikitext2", shared_data), "word", cache_dir)
    assert len(prepared.vocab) == 33278
    assert {s: len(a) for s, a in prepared.splits.items()} == {"train": 2088628, "valid": 217646, "test": 245569}
    assert prepared.splits["train"].dtype == np.uint16
