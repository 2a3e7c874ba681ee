"""Every file rnnlm writes goes through here: into a temporary file beside the target, synced, then renamed
over it, so a killed process or a full disk never leaves a half-written file or destroys the old one.

A full disk (``ENOSPC``, ``EDQUOT``, or torch.save's ``RuntimeError`` when the disk has filled up) becomes one
:class:`~rnnlm.errors.DiskFullError` that names the folder, the bytes needed and the bytes free. A temporary
file is named ``.NAME.<pid>@<host>.<random>.tmp``: a later start removes those whose writer is no longer alive
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from rnnlm.errors import DiskFullError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
# A temporary whose writer cannot be checked (named the old way, without a pid, or written on another host
# of a shared file system) is taken for stale once nothing has written to it for this long.
STALE_AFTER_S = 15 * 60
# torch.save reports a failed write without its errno: a disk left with less than this free was full.
ALMOST_FULL_BYTES = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40]
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]*))?\.[^.]+\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.tmp$")  # rnnlm 0.1: .last.ckpt.<random>.tmp, .run_summary.json.tmp
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: changing it later would race with other threads creating files


def write_atomically(path: str | Path, data: str | bytes | Callable[[BinaryIO], None], encoding: str = "utf-8",
                     *, size: int | None = None, elsewhere: str | None = None) -> Path:
    """Write ``data`` (text, bytes, or a function that writes into a binary file) to ``path`` atomically:
    readers see the old file or the whole new one, never a part. A file replaced keeps its permissions.

    Args:
        size: about how many bytes the function will write, for the message of a full disk.
        elsewhere: the setting that writes this file on another disk (``paths.log_dir=DIR``), for that message.

    Returns:
        the path written.

    Raises:
        DiskFullError: no space left (the old file is as it was, and no temporary file is left).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode(encoding)
    if isinstance(data, bytes):
        size = len(data)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~_UMASK)
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_full(err, path.parent)  # before the temporary file is removed: it holds the space taken
        written = _remove(tmp)
        if full:
            raise _disk_full_error(full, path, size, written, elsewhere) from err
        raise
    return path


def temporary_folder(target: str | Path, elsewhere: str | None = None) -> Path:
    """A new empty folder beside ``target``, named as this module names its temporaries, to build ``target`` in
    (then :func:`moved_into_place`).

    Raises:
        DiskFullError: no space left for it.
        OSError: the folder cannot be made (no permission, a read-only file system, ...).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent))
        tmp.chmod(0o777 & ~_UMASK)
    except OSError as err:
        if full := _disk_full(err, target.parent):
            raise _disk_full_error(full, target, None, None, elsewhere) from err
        raise
    return tmp


@contextmanager
def moved_into_place(tmp: Path, target: str | Path, *, size: int | None = None,
                     elsewhere: str | None = None) -> Iterator[Path]:
    """Fill the folder ``tmp`` (from :func:`temporary_folder`) in the ``with`` block; at its end rename it to
    ``target``, whole. If ``target`` appeared meanwhile (another process built the same folder first), that one
    is kept. On any error ``tmp`` is removed; a full disk raises :class:`DiskFullError` (``size``: about how
    many bytes the folder needs)."""
    target = Path(target)
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    except BaseException as err:
        full = _disk_full(err, target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full_error(full, target, size, None, elsewhere) from err
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # still there if another process's folder was kept


def new_array(path: str | Path, dtype, length: int):
    """A new ``.npy`` file of ``length`` zeros, memory-mapped for writing, its blocks allocated on disk first:
    writing through a memory map into a full disk kills the process with SIGBUS, where allocating raises
    ``ENOSPC``. For a file in a :func:`temporary_folder`, which makes it whole."""
    import numpy as np  # only the token cache needs it

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))
    _allocate(path)
    return array


def _allocate(path: str | Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write anyway
            raise
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files and folders that processes killed while writing left in ``folder``.

    A temporary named with its writer's pid on this host goes once that process has ended; one whose writer
    cannot be checked (named without a pid, as rnnlm 0.1 did, or written on another host) goes once nothing has
    written to it for :data:`STALE_AFTER_S`. Errors (a missing folder, no permission) are ignored.

    Args:
        names: glob patterns of the target names whose temporaries to remove (``["*.ckpt"]``); None: all.

    Returns:
        the paths removed.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    patterns = None if names is None else [p for n in names for p in (f".{n}.*{TEMP_SUFFIX}", f".{n}{TEMP_SUFFIX}")]
    removed = []
    for entry in entries:
        if not _OLD_TEMP_NAME.match(entry.name):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            continue
        match = _TEMP_NAME.match(entry.name)
        alive = _writer_alive(int(match["pid"]), match["host"]) if match else None
        if alive or (alive is None and time.time() - _last_written(entry) < STALE_AFTER_S):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        log.info("Removed %s, left by a process that stopped while writing it", path)
        removed.append(path)
    return removed


def keep_logging_on_full_disk(logger: logging.Logger | None = None) -> None:
    """A log file (``train.log``) on a full disk drops its lines with one warning on stderr, instead of a
    traceback for every line; the run goes on, and the lines come back once there is space."""
    for handler in (logger or logging.getLogger()).handlers:
        if isinstance(handler, logging.FileHandler) and not isinstance(handler.handleError, functools.partial):
            handler.handleError = functools.partial(_handle_log_error, handler, handler.handleError, [])


def human_size(n: float) -> str:
    """``15.2 MB``: bytes in decimal units, as ``df -H`` shows them."""
    units = ["B", "KB", "MB", "GB", "TB"]
    while n >= 999.95 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{int(n)} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def _temporary_prefix(name: str) -> str:
    # The writer's pid and host let a later start tell a temporary left by a process that was killed.
    return f".{name[:120]}.{os.getpid()}@{_HOST}."


def _writer_alive(pid: int, host: str | None) -> bool | None:
    """Whether process ``pid`` is alive; None when it cannot be told (it ran on another host)."""
    if host is not None and host != _HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        return True
    except (OverflowError, OSError):
        return False
    return True


def _last_written(entry: os.DirEntry) -> float:
    """The newest modification time of a temporary file, or of a temporary folder and what it holds."""
    try:
        newest = entry.stat(follow_symlinks=False).st_mtime
        if entry.is_dir(follow_symlinks=False):
            newest = max([newest, *(e.stat(follow_symlinks=False).st_mtime for e in os.scandir(entry.path))])
    except OSError:
        return time.time()
    return newest


def _disk_full(err: BaseException, folder: Path) -> int | None:
    """``ENOSPC`` or ``EDQUOT`` if ``err`` (or an error it came from) says the disk is full, else None."""
    cause, seen = err, 0
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS:
            return cause.errno
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    # torch.save's writer reports ENOSPC as RuntimeError('[enforce fail at inline_container.cc:672] . unexpected
    # pos ...'), without the errno: the free space tells.
    if isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno is None):
        free = _free_bytes(folder)
        if free is not None and free < ALMOST_FULL_BYTES:
            return errno.ENOSPC
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _remove(tmp: str | None) -> int | None:
    """Remove the temporary file ``tmp``; the bytes it held."""
    if tmp is None:
        return None
    try:
        written = os.path.getsize(tmp)
        os.unlink(tmp)
    except OSError:
        return None
    return written


def _disk_full_error(full: int, path: Path, size: int | None, written: int | None,
                     elsewhere: str | None) -> DiskFullError:
    folder = os.path.abspath(path.parent)
    if size is not None:
        what = f"writing {path.name} needs about {human_size(size)}"
    elif written:
        what = f"writing {path.name} needs more than {human_size(written)}"
    else:
        what = f"cannot write {path.name}"
    if full == errno.ENOSPC:
        free = _free_bytes(Path(folder))
        where = f"no space left in {folder}: {what}" + ("" if free is None else f", {human_size(free)} free")
    else:
        where = f"the disk quota is used up in {folder}: {what}"
    return DiskFullError(f"{where}: free some space, or write elsewhere{f' ({elsewhere})' if elsewhere else ''}")


def _handle_log_error(handler: logging.FileHandler, handle_error: Callable, warned: list,
                      record: logging.LogRecord) -> None:
    err = sys.exc_info()[1]
    if not (isinstance(err, OSError) and err.errno in _FULL_ERRNOS):
        handle_error(record)
    elif not warned:
        warned.append(True)
        print(f"warning: no space left for {handler.baseFilename}: its lines are dropped until there is space",
              file=sys.stderr)
