"""Each run writes to a folder of its own; a run never writes into another run's folder."""

import os
import subprocess

import pytest
from omegaconf import OmegaConf

from rnnlm.run_folder import _own_folder


def _hydra_config(folder, typed=(), ckpt_path=None):
    return OmegaConf.create({"task_name": "train", "ckpt_path": ckpt_path,
                             "hydra": {"run": {"dir": str(folder)}, "overrides": {"hydra": list(typed)}}})


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    clock_named = tmp_path / "runs" / "2026-11-27_12-00-00"
    claimed = []
    for _ in range(3):
        config = _hydra_config(clock_named)
        _own_folder(config, "run")
        claimed.append(config.hydra.run.dir)
    assert claimed == [str(clock_named), f"{clock_named}_1", f"{clock_named}_2"]
    assert all((tmp_path / "runs" / p).is_dir() for p in claimed)


def test_a_named_folder_with_another_runs_checkpoints_is_refused(tmp_path, capsys):
    run = tmp_path / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    with pytest.raises(SystemExit) as stop:
        _own_folder(_hydra_config(run, [f"hydra.run.dir={run}"]), "run")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: hydra.run.dir={run} holds another run's checkpoints")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    # resuming that very run in its folder is allowed; an empty named folder too
    _own_folder(_hydra_config(run, [f"hydra.run.dir={run}"], ckpt_path=str(run / "checkpoints" / "last.ckpt")), "run")
    _own_folder(_hydra_config(tmp_path / "empty", [f"hydra.run.dir={tmp_path / 'empty'}"]), "run")


def test_a_named_folder_in_use_by_a_running_process_is_refused(tmp_path, capsys):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / ".rnnlm.lock").write_text(str(os.getppid()))  # a process that is running
    with pytest.raises(SystemExit):
        _own_folder(_hydra_config(folder, [f"hydra.run.dir={folder}"]), "run")
    assert f"is in use by another run (process {os.getppid()})" in capsys.readouterr().err
    ended = subprocess.Popen(["true"])
    ended.wait()
    (folder / ".rnnlm.lock").write_text(str(ended.pid))  # left by a run that has ended
    _own_folder(_hydra_config(folder, [f"hydra.run.dir={folder}"]), "run")
    assert (folder / ".rnnlm.lock").read_text() == str(os.getpid())


def test_the_processes_of_one_distributed_job_share_its_folder(tmp_path, monkeypatch):
    clock_named = tmp_path / "2026-11-27_12-00-00"
    clock_named.mkdir()  # made by the job's first process
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = _hydra_config(clock_named)
    _own_folder(config, "run")
    assert config.hydra.run.dir == str(clock_named)
