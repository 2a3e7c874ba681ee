import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rnnlm import corpora
from rnnlm.corpora import (
    CorpusSource,
    DataError,
    RemoteFile,
    ZipMember,
    named_source,
    path_source,
    read_lines,
    split_lines,
)
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


def test_lone_file_is_split_by_character_fractions_as_nanogpt_splits_it(tmp_path):
    """data.split_by=characters: train is the text's first 90% of characters and valid the rest, exactly (the line a
    cut falls in is cut there); with a test fraction of 0 the test split is the valid text."""
    path = tmp_path / "t.txt"
    text = "".join(f"Line number {i} of the play.\n" * (i % 3) + "\n" for i in range(200))
    path.write_text(text)
    for split in ((0.9, 0.1, 0.0), (0.8, 0.15, 0.05)):
        pairs = list(split_lines(CorpusSource("t", {"all": [path]}, split=split, split_by="characters")))
        texts = {name: "".join(line + "\n" for s, line in pairs if s == name) for name in ("train", "valid", "test")}
        cut = int(len(text) * split[0])
        end = cut + int(len(text) * split[1]) if split[2] else len(text)
        assert texts["train"] in (text[:cut], text[:cut] + "\n")  # a line cut in two ends the train split
        assert texts["valid"] in (text[cut:end], text[cut:end] + "\n")
        assert texts["test"] == (text[end:] if split[2] else texts["valid"])
    lines = [s for s, _ in split_lines(CorpusSource("t", {"all": [path]}, split=(0.8, 0.2, 0.0)))]
    assert lines.count("test") == lines.count("valid") > 0  # by lines too, a test fraction of 0 tests on valid



@pytest.mark.parametrize("split, holdout, noted", [((0.9, 0.1, 0.0), True, True), ((0.9, 0.05, 0.05), True, False),
                                                   ((0.9, 0.1, 0.0), False, False)])
def test_a_split_without_test_text_says_that_testing_repeats_validation(tmp_path, split, holdout, noted):
    from rnnlm.batches import data_source

    path = tmp_path / "t.txt"
    path.write_text("a line of text\n" * 50)
    source = data_source(None, str(path), str(tmp_path), str(tmp_path), split, holdout=holdout)
    said = [note for note in source.notes if "leaves no test text" in note]
    assert said == (["data.split=[0.9,0.1,0] leaves no test text: the test split is the validation text"]
                    if noted else [])

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


ZIP_TEXT = {"train": "the cat sat on the mat\n" * 30, "valid": "the dog sat\n" * 3, "test": "a cat ran\n" * 4}


def _fake_zip_corpus(monkeypatch, tmp_path, zip_digest: str | None = None, member_digest: str | None = None) -> bytes:
    """A named corpus 'fakezip' whose three splits come out of one zip at a file:// URL, laid out as WikiText's is."""
    upstream = tmp_path / "upstream.zip"
    with zipfile.ZipFile(upstream, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, text in ZIP_TEXT.items():
            zf.writestr(f"fakezip/wiki.{split}.tokens", text)
    payload = upstream.read_bytes()
    archive = RemoteFile("fakezip-v1.zip", upstream.as_uri(), zip_digest or hashlib.sha256(payload).hexdigest())
    files = {split: ZipMember(f"wiki.{split}.tokens", archive, f"fakezip/wiki.{split}.tokens",
                              member_digest or hashlib.sha1(text.encode()).hexdigest())
             for split, text in ZIP_TEXT.items()}
    monkeypatch.setitem(corpora.CORPORA, "fakezip", corpora.NamedCorpus("fakezip", files, "word"))
    return payload


def test_zip_corpus_is_unpacked_into_its_splits_and_downloaded_once(tmp_path, monkeypatch):
    payload = _fake_zip_corpus(monkeypatch, tmp_path)
    data_dir = tmp_path / "data"
    source = named_source("fakezip", data_dir)
    folder = data_dir / "fakezip"
    assert source.files == {s: [folder / f"wiki.{s}.tokens"] for s in ("train", "valid", "test")}
    assert {s: p[0].read_text() for s, p in source.files.items()} == ZIP_TEXT
    assert (folder / "fakezip-v1.zip").read_bytes() == payload  # kept: a lost file is unpacked again, not downloaded
    prepared = prepare(source, "word", tmp_path / "cache")
    assert {s: len(a) for s, a in prepared.splits.items()} == {"train": 7 * 30, "valid": 4 * 3, "test": 4 * 4}

    (tmp_path / "upstream.zip").unlink()
    monkeypatch.setattr(corpora, "download", lambda *a: pytest.fail("must not download again"))
    assert named_source("fakezip", data_dir).files == source.files
    (folder / "wiki.valid.tokens").unlink()
    assert named_source("fakezip", data_dir).files["valid"][0].read_text() == ZIP_TEXT["valid"]
    assert sorted(p.name for p in folder.iterdir()) == ["fakezip-v1.zip"] + [f"wiki.{s}.tokens" for s in
                                                                              ("test", "train", "valid")]


def test_zip_with_wrong_checksum_is_refused_in_one_line(tmp_path, monkeypatch):
    _fake_zip_corpus(monkeypatch, tmp_path, zip_digest="0" * 64)
    with pytest.raises(DataError, match=r"upstream.zip has SHA-256 [0-9a-f]{64}, expected 0{64}: the upstream file "
                                        r"changed or the download was corrupted") as err:
        named_source("fakezip", tmp_path / "data")
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "data" / "fakezip").iterdir())  # no archive, no unpacked file


def test_unpacked_file_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    _fake_zip_corpus(monkeypatch, tmp_path, member_digest="0" * 40)
    with pytest.raises(DataError, match=r"fakezip/wiki.train.tokens in .*fakezip-v1.zip has SHA-1 [0-9a-f]{40}, "
                                        r"expected 0{40}") as err:
        named_source("fakezip", tmp_path / "data")
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "data" / "fakezip").iterdir()] == ["fakezip-v1.zip"]


def test_unpacked_files_are_checked_before_tokenizing(tmp_path, monkeypatch):
    _fake_zip_corpus(monkeypatch, tmp_path)
    source = named_source("fakezip", tmp_path / "data")
    train = source.files["train"][0]
    train.write_text(ZIP_TEXT["train"][:50])
    with pytest.raises(DataError, match=f"{train} has SHA-1 .*, expected .*: the file is truncated or changed"):
        prepare(source, "word", tmp_path / "cache")


def test_zip_corpus_offline_says_where_to_put_the_archive(tmp_path, monkeypatch):
    _fake_zip_corpus(monkeypatch, tmp_path)
    with pytest.raises(DataError, match=r"wiki.train.tokens is missing: download .*upstream.zip to "
                                        r".*fakezip/fakezip-v1.zip \(SHA-256 [0-9a-f]{64}\)"):
        named_source("fakezip", tmp_path / "data", allow_download=False)


def test_wikitext103_files_sit_where_unzip_puts_them():
    corpus = corpora.CORPORA["wikitext103"]
    assert corpus.level == "word" and set(corpus.files) == {"train", "valid", "test"}
    for item in corpus.files.values():
        assert isinstance(item, ZipMember) and item.member == f"{corpus.folder}/{item.name}"
        assert item.archive.url.startswith("https://") and len(item.archive.sha256) == 64 and len(item.sha1) == 40


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
