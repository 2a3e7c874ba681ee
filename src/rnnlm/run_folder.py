"""Run folders: a new run never writes into another run's folder (Hydra callback, ``rnnlm/conf/hydra/default.yaml``)."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write


class OwnRunFolder(Callback):
    """Before Hydra creates the run's folder (and writes its ``.hydra/`` config into it):

    - a folder named by the clock (the default) that already exists — two runs started in the same
      second — gets a suffix (``_1``, ``_2``, ...), claimed atomically, so each run has its own;
    - a training run's folder given with ``hydra.run.dir`` / ``hydra.sweep.dir`` that holds another run's
      checkpoints is refused, unless the run resumes from a checkpoint in it; so is one that another
      running training process holds (its ``.rnnlm.lock`` names a live process).

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
            _refuse_another_runs_folder(folder, key, config.get("ckpt_path"))
            _hold(folder, key)
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


def _refuse_another_runs_folder(folder: Path, key: str, ckpt_path: str | None) -> None:
    found = sorted(folder.glob("**/checkpoints/*.ckpt"))
    if not found:
        return
    if ckpt_path and folder.resolve() in Path(ckpt_path).expanduser().resolve().parents:
        return  # resuming the run that lives there
    _refuse(f"{key}={folder} holds another run's checkpoints ({found[0]}): choose a new folder, leave {key} out "
            f"for a fresh one, or resume that run with ckpt_path={found[-1]}")


def _hold(folder: Path, key: str) -> None:
    """Mark ``folder`` as this process's until it exits; refuse it if a live process holds it already."""
    lock = folder / ".rnnlm.lock"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = lock.read_text().strip()
        if holder.isdigit() and _alive(int(holder)):
            _refuse(f"{key}={folder} is in use by another run (process {holder}): choose another folder, or leave "
                    f"{key} out for a fresh one")
        fd = os.open(lock, os.O_TRUNC | os.O_WRONLY)  # left by a run that has ended
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    atexit.register(lambda: lock.unlink(missing_ok=True))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _refuse(message: str) -> None:
    # One line and exit status 2, as for every mistake: this runs inside Hydra, before the command's own
    # error handling.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
