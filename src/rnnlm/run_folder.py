"""Run folders: a new run never writes into another run's folder (Hydra callback, ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
from pathlib import Path
from typing import NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

LOCK_FILE = ".rnnlm.lock"
_held: dict[Path, int] = {}  # the lock files this process holds -> their open descriptors, kept until it exits


class OwnRunFolder(Callback):
    """Before Hydra creates the run's folder (and writes its ``.hydra/`` config into it):

    - a folder named by the clock (the default) that already exists — two runs started in the same
      second — gets a suffix (``_1``, ``_2``, ...), claimed atomically, so each run has its own;
    - a training run's folder given with ``hydra.run.dir`` / ``hydra.sweep.dir`` that holds another run's
      checkpoints is refused, unless the run resumes from a checkpoint in it; so is one that another
      running training process holds (an OS lock on its ``.rnnlm.lock``, which ends with that process).

    The processes of one distributed job share their folder: those started by Lightning for DDP, or
    together by ``srun`` / ``torchrun`` (which need ``hydra.run.dir`` set, as the clock differs between
    them), are left alone.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _own_folder(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _own_folder(config, "sweep")


def _one_of_many_processes() -> bool:
    return "LOCAL_RANK" in os.environ or any(int(os.environ.get(k) or 1) > 1 for k in ("WORLD_SIZE", "SLURM_NTASKS"))


def _own_folder(config: DictConfig, kind: str) -> None:
    if _one_of_many_processes():
        return
    key = f"hydra.{kind}.dir"
    folder = Path(OmegaConf.select(config, key))  # resolves the clock once
    if any(o.split("=", 1)[0].lstrip("+") == key for o in config.hydra.overrides.hydra):
        if config.get("task_name") == "train":
            # The lock first: a folder in use is refused as such, even when a resume of its checkpoints is asked.
            taken = _hold(folder, key)
            if problem := _another_runs_checkpoints(folder, key, config.get("ckpt_path")):
                if taken:
                    _release(_lock_path(folder))
                _refuse(problem)
        return
    claimed, n = folder, 0
    while True:
        try:
            claimed.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            claimed = folder.with_name(f"{folder.name}_{n}")
    with read_write(config.hydra):
        config.hydra[kind].dir = str(claimed)


def _another_runs_checkpoints(folder: Path, key: str, ckpt_path: str | None) -> str:
    """Why ``folder`` is not this run's to write in, if it holds another run's checkpoints; else ''."""
    found = sorted(folder.glob("**/checkpoints/*.ckpt"))
    if not found:
        return ""
    if ckpt_path and folder.resolve() in Path(ckpt_path).expanduser().resolve().parents:
        return ""  # resuming the run that lives there
    return (f"{key}={folder} holds another run's checkpoints ({found[0]}): choose a new folder, leave {key} out "
            f"for a fresh one, or resume that run with ckpt_path={found[-1]}")


def _lock_path(folder: Path) -> Path:
    return folder.resolve() / LOCK_FILE


def _hold(folder: Path, key: str) -> bool:
    """Hold ``folder`` for this process until it exits; refuse it if another live process holds it already.

    The hold is an OS lock (``flock``) on ``folder/.rnnlm.lock``, which also names the holder's pid for the
    message. The kernel drops it when its process ends, however it ends (SIGKILL included): a lock file left
    behind by a dead process, or one naming a pid the system has since given to another process, holds
    nothing. A second hold of the same folder by this process is no conflict.

    Returns:
        whether this call took the lock (False: this process held it already).
    """
    lock = _lock_path(folder)
    if lock in _held:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock)
    except OSError as err:
        _refuse(f"cannot create {lock} ({err.strerror}): give {key} a folder you can write to")
    if fd is None:
        holder = _read_pid(lock)
        _refuse(f"{key}={folder} is in use by another running training process (it holds {lock}"
                f"{f', pid {holder}' if holder else ''}): wait for it to end, or give another folder (leave {key} "
                f"out for a fresh one)")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[lock] = fd
    atexit.register(_release, lock, os.getpid())
    return True


def _lock(lock: Path) -> int | None:
    """Open ``lock`` and take its ``flock`` without waiting: the open file's descriptor, or None if another
    process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        # Its holder removed the file as it ended, after we opened it: the lock we took is on a file no one
        # else will open. Take it again on the file now at that path.
        os.close(fd)


def _read_pid(lock: Path) -> str:
    try:
        holder = lock.read_text().strip()
    except OSError:
        return ""
    return holder if holder.isdigit() else ""  # empty while its holder is between taking the lock and writing


def _release(lock: Path, holder: int | None = None) -> None:
    # A forked child (a data loader's worker) shares the lock and inherits this exit handler: only the process
    # that took the lock removes the file.
    if holder not in (None, os.getpid()):
        return
    # Removed while still locked, then closed: one that opened the file meanwhile sees it is gone (``_lock``).
    fd = _held.pop(lock, None)
    if fd is not None:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _refuse(message: str) -> NoReturn:
    # One line and exit status 2, as for every mistake: this runs inside Hydra, before the command's own
    # error handling.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
