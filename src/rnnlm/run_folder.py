"""Run folders: a new run never writes into another run's folder (Hydra callback, ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write


class OwnRunFolder(Callback):
    """Before Hydra creates the run's folder (and writes its ``.hydra/`` config into it):

    - a folder named by the clock (the default) that already exists — two runs started in the same
      second — gets a suffix (``_1``, ``_2``, ...), claimed atomically, so each run has its own;
    - a training run's folder given with ``hydra.run.dir`` / ``hydra.sweep.dir`` that holds another run's
      checkpoints is refused, unless the run resumes from a checkpoint in it.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _own_folder(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _own_folder(config, "sweep")


def _own_folder(config: DictConfig, kind: str) -> None:
    key = f"hydra.{kind}.dir"
    folder = Path(OmegaConf.select(config, key))  # resolves the clock once
    if any(o.split("=", 1)[0].lstrip("+") == key for o in config.hydra.overrides.hydra):
        if config.get("task_name") == "train":
            _refuse_another_runs_folder(folder, key, config.get("ckpt_path"))
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
    # A one-line error and exit status 2, as for every mistake: this runs before the command's own
    # error handling, inside Hydra.
    print(f"error: {key}={folder} holds another run's checkpoints ({found[0]}): choose a new folder, leave {key} "
          f"out for a fresh one, or resume that run with ckpt_path={found[-1]}", file=sys.stderr)
    sys.exit(2)
