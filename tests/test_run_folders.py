"""Each run writes to a folder of its own; a run never writes into another run's folder."""

import os
import subprocess
import sys

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


# Takes hydra.run.dir=argv[1] as a training run does, says so, then waits (to be killed) or exits.
CLAIM = """
import sys, time
from omegaconf import OmegaConf
from rnnlm.run_folder import _own_folder
folder = sys.argv[1]
_own_folder(OmegaConf.create({"task_name": "train", "ckpt_path": None,
                              "hydra": {"run": {"dir": folder}, "overrides": {"hydra": ["hydra.run.dir=" + folder]}}}),
            "run")
print("holding", flush=True)
if sys.argv[2:] == ["wait"]:
    time.sleep(120)
"""


def _claim(folder, *wait):
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(folder), *wait], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_named_folder_held_by_a_running_process_is_refused_until_it_dies(tmp_path):
    folder = tmp_path / "shared"
    holder = _claim(folder, "wait")
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        lock = folder.resolve() / ".rnnlm.lock"
        assert lock.read_text() == str(holder.pid)
        refused = _claim(folder)
        out, err = refused.communicate(timeout=60)
        assert refused.returncode == 2 and out == ""
        assert err == (f"error: hydra.run.dir={folder} is in use by another running training process (it holds "
                       f"{lock}, pid {holder.pid}): wait for it to end, or give another folder (leave "
                       f"hydra.run.dir out for a fresh one)\n")
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the lock file stays behind
        holder.wait()
    assert lock.read_text() == str(holder.pid)  # left by a process that is dead: it holds nothing
    accepted = _claim(folder)
    assert accepted.communicate(timeout=60) == ("holding\n", "") and accepted.returncode == 0
    assert not lock.exists()  # removed by the process that held it, as it ended


@pytest.mark.parametrize("named", ["own pid", "another live process"])
def test_a_lock_file_no_process_holds_is_no_conflict(tmp_path, named):
    """Only the OS lock counts, not the pid written in the file: ours (a run in this process that ended), or one
    the system has given to an unrelated process since (pid reuse)."""
    folder = tmp_path / "run"
    folder.mkdir()
    pid = os.getpid() if named == "own pid" else 1
    (folder / ".rnnlm.lock").write_text(str(pid))
    _own_folder(_hydra_config(folder, [f"hydra.run.dir={folder}"]), "run")
    assert (folder / ".rnnlm.lock").read_text() == str(os.getpid())


def test_a_folder_this_process_holds_already_is_no_conflict(tmp_path):
    folder = tmp_path / "run"
    for _ in range(2):  # e.g. a second training run in one Python process
        _own_folder(_hydra_config(folder, [f"hydra.run.dir={folder}"]), "run")
    assert (folder / ".rnnlm.lock").read_text() == str(os.getpid())


def test_the_processes_of_one_distributed_job_share_its_folder(tmp_path, monkeypatch):
    clock_named = tmp_path / "2026-11-27_12-00-00"
    clock_named.mkdir()  # made by the job's first process
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = _hydra_config(clock_named)
    _own_folder(config, "run")
    assert config.hydra.run.dir == str(clock_named)
