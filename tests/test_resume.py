"""Interrupting and resuming: a stopped run keeps its work, `ckpt_path` alone resumes it as it was, and the
resumed run tests on its true best checkpoint."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import REPO, TINY
from rnnlm.checkpoint import CheckpointError, NonFiniteError, load_checkpoint
from rnnlm.commands.train import train
from rnnlm.lightning_module import RecurrentLM
from rnnlm.resume import resume_config


def _step_of(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except Exception:  # not written yet
        return -1


def _start(args: list[str], run: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "src" / "train.py"), *args, f"hydra.run.dir={run}",
                             "~callbacks.progress_bar"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _stop_when(process: subprocess.Popen, ckpt: Path, step: int, signum: int) -> str:
    deadline = time.monotonic() + 300
    while _step_of(ckpt) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return stderr


# Validation only at the end; last.ckpt every 5 steps; slow enough steps that a signal lands mid-run.
LONG_RUN = ["model.hidden_size=192", "model.embedding_dim=64", "model.dropout=0.3", "data.seq_len=48",
            "data.batch_size=8", "trainer.max_steps=80", "trainer.max_epochs=10", "trainer.val_check_interval=40",
            "trainer.check_val_every_n_epoch=null", "callbacks.model_checkpoint.every_n_train_steps=5", "seed=7",
            "test=false", "logger=csv"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_finishes_the_step_saves_last_and_exits(signum, tiny_corpus, tmp_path, cache_dir, shared_data):
    run = tmp_path / "run"
    args = [*TINY, *LONG_RUN, f"data.path={tiny_corpus}", f"paths.cache_dir={cache_dir}",
            f"paths.data_dir={shared_data}"]
    process = _start(args, run, tmp_path)
    stderr = _stop_when(process, run / "checkpoints" / "last.ckpt", 5, signum)
    saved = _step_of(run / "checkpoints" / "last.ckpt")
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert 5 <= saved < 80
    last_line = stderr.strip().splitlines()[-1]
    last = run / "checkpoints" / "last.ckpt"
    assert last_line == (f"stopped: {signal.Signals(signum).name}: training stopped at step {saved} and saved "
                         f"{last}; resume with ckpt_path={last}")
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "interrupted"


@pytest.mark.slow  # about two minutes: a model big enough to be stopped mid-run, trained three times per signal
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_run_resumes_to_the_same_result(signum, make_cfg, tiny_corpus, tmp_path, cache_dir, shared_data):
    reference = train(make_cfg(*LONG_RUN, f"data.path={tiny_corpus}", run_dir=tmp_path / "straight"))
    stopped = tmp_path / "stopped"
    args = [*TINY, *LONG_RUN, f"data.path={tiny_corpus}", f"paths.cache_dir={cache_dir}",
            f"paths.data_dir={shared_data}"]
    last = stopped / "checkpoints" / "last.ckpt"
    _stop_when(_start(args, stopped, tmp_path), last, 12, signum)
    stopped_at = _step_of(last)
    assert 12 <= stopped_at < 40, f"stopped at step {stopped_at}: before the first validation, mid-epoch"
    resumed = train(make_cfg(*LONG_RUN, f"data.path={tiny_corpus}", f"ckpt_path={last}", run_dir=tmp_path / "rest"))
    # Same weights, optimizer, learning rate, stream position, carried state and dropout masks:
    assert resumed["val/loss"] == pytest.approx(reference["val/loss"], abs=1e-6)


def test_last_checkpoint_is_written_by_the_clock_before_any_validation(make_cfg, tiny_corpus):
    seen = []

    class RecordLastStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(_step_of(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"))

    cfg = make_cfg(f"data.path={tiny_corpus}", "trainer.max_steps=5", "test=false",
                   "callbacks.model_checkpoint.every_n_train_steps=null",
                   "callbacks.model_checkpoint.every_n_minutes=1e-9")
    train(cfg, extra_callbacks=[RecordLastStep()])
    assert seen == [-1, 1, 2, 3, 4]  # before each step, the one before it is on disk


def test_ckpt_path_alone_resumes_with_the_runs_own_settings(make_cfg, tiny_corpus, tmp_path):
    first = make_cfg("model=gru", "model.hidden_size=24", "data.seq_len=12", f"data.path={tiny_corpus}",
                     "trainer.max_steps=4", "test=false", run_dir=tmp_path / "a")
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    # What a user types: the checkpoint and a longer budget; the defaults composed around them say lstm, 32, 16.
    typed = [f"ckpt_path={last}", "trainer.max_steps=7"]
    cfg = resume_config(make_cfg(*typed, run_dir=tmp_path / "b"), typed)
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.data.seq_len, cfg.data.path) == ("gru", 24, 12, str(tiny_corpus))
    assert cfg.trainer.max_steps == 7 and cfg.paths.output_dir == str(tmp_path / "b")
    assert cfg.callbacks.model_checkpoint.dirpath == str(tmp_path / "b" / "checkpoints")
    train(cfg, overrides=typed)
    assert _step_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 7

    for refused, message in [("data.batch_size=3", r"data.batch_size=3 \(trained with 4\)"),
                             ("optimizer=sgd", r"optimizer._target_=torch.optim.SGD \(trained with torch.optim.AdamW"),
                             ("model.hidden_size=48", r"model.hidden_size=48 \(trained with 24\)")]:
        with pytest.raises(CheckpointError, match=message + ".*drop them to resume"):
            typed = [f"ckpt_path={last}", refused]
            resume_config(make_cfg(*typed, run_dir=tmp_path / "c"), typed)
    with pytest.raises(CheckpointError, match=r"is at step 7, so trainer.max_steps=7 is reached already: raise "
                                              "trainer.max_steps"):
        typed = [f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"]  # its max_steps: 7, done
        resume_config(make_cfg(*typed, run_dir=tmp_path / "e"), typed)
    # the learning rate may change (e.g. after a divergence), and it does apply
    lowered = [f"ckpt_path={last}", "optimizer.lr=0.0005", "trainer.max_steps=6"]
    metrics = train(resume_config(make_cfg(*lowered, run_dir=tmp_path / "d"), lowered), overrides=lowered)
    assert metrics["train/lr"] == pytest.approx(0.0005)


def test_resume_from_the_command_line(tiny_corpus, tmp_path, cache_dir, shared_data):
    common = [f"paths.cache_dir={cache_dir}", f"paths.data_dir={shared_data}"]
    first = _start([*TINY, "model=gru", "trainer.max_steps=3", "test=false", f"data.path={tiny_corpus}", *common],
                   tmp_path / "a", tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    again = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), f"ckpt_path={last}", "trainer.max_steps=5",
                            f"hydra.run.dir={tmp_path / 'b'}", *common], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _step_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 5
    log = (tmp_path / "b" / "train.log").read_text()
    assert f"Resuming {last} (step 3, saved " in log
    assert re.search(r"\| gru \d+ params", log)  # the GRU it was, not the default LSTM
    refused = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), f"ckpt_path={last}", "data.seq_len=7",
                              f"hydra.run.dir={tmp_path / 'c'}", *common], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: ") and "data.seq_len=7 (trained with 16)" in refused.stderr


def test_ckpt_path_last_takes_the_newest_run_of_the_settings_asked_for(make_cfg, tiny_corpus, tmp_path):
    runs = tmp_path / "train" / "runs"
    logs = f"paths.log_dir={tmp_path}"
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", logs, "model=gru", run_dir=runs / "gru"))
    time.sleep(0.05)
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", logs, run_dir=runs / "lstm"))
    typed = ["ckpt_path=last", "model=gru", "trainer.max_steps=8"]  # on from step 4
    cfg = resume_config(make_cfg(*typed, f"data.path={tiny_corpus}", logs, run_dir=runs / "new"), typed)
    assert cfg.ckpt_path == str(runs / "gru" / "checkpoints" / "last.ckpt") and cfg.model.cell == "gru"
    typed = ["ckpt_path=last", "trainer.max_steps=8"]
    cfg = resume_config(make_cfg(*typed, f"data.path={tiny_corpus}", logs, run_dir=runs / "new"), typed)
    assert cfg.ckpt_path == str(runs / "lstm" / "checkpoints" / "last.ckpt")
    typed = ["ckpt_path=last", "model=rnn"]
    with pytest.raises(CheckpointError, match="found no run .* trained with these settings.*lstm/checkpoints/last"):
        resume_config(make_cfg(*typed, f"data.path={tiny_corpus}", logs, run_dir=runs / "new"), typed)


def test_a_resumed_run_keeps_its_best_checkpoint(make_cfg, tiny_corpus, tmp_path):
    common = [f"data.path={tiny_corpus}", "trainer.val_check_interval=4", "trainer.check_val_every_n_epoch=null",
              "model.dropout=0", "optimizer.lr=0.01"]
    first = train(make_cfg(*common, "trainer.max_steps=8", run_dir=tmp_path / "a"))
    best_step = _step_of(tmp_path / "a" / "checkpoints" / "best.ckpt")
    # A learning rate far too high makes the next validation worse than the best so far.
    typed = [f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=12", "optimizer.lr=3"]
    resumed = train(resume_config(make_cfg(*typed, run_dir=tmp_path / "b"), typed), overrides=typed)
    assert resumed["val/loss"] > first["val/loss_best"]
    assert _step_of(tmp_path / "b" / "checkpoints" / "best.ckpt") == best_step
    assert resumed["val/loss_best"] == pytest.approx(first["val/loss_best"])
    assert resumed["test/loss"] == pytest.approx(first["test/loss"])  # tested on the same, best, weights


def test_no_validation_is_no_false_alarm(make_cfg, tiny_corpus):
    metrics = train(make_cfg(f"data.path={tiny_corpus}", "++trainer.limit_val_batches=0", "trainer.max_steps=3",
                             "test=false"))
    assert "val/loss" not in metrics


def test_weights_that_diverge_stop_with_the_nan_message(make_cfg, tiny_corpus):
    with pytest.raises(NonFiniteError, match="lower optimizer.lr"):
        train(make_cfg(f"data.path={tiny_corpus}", "optimizer.lr=1e30", "trainer.gradient_clip_val=null",
                       "trainer.max_steps=6", "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null"))


def test_a_checkpoint_of_the_previous_format_still_evaluates_and_resumes(make_cfg, tiny_corpus, tmp_path):
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", "trainer.max_steps=3", run_dir=tmp_path / "a"))
    data = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    # rnnlm 0.1 wrote the best loss as a buffer, one process's carried state, and no config
    resume = data["rnnlm_resume"]
    data["state_dict"]["best_val_loss"] = torch.tensor(resume.pop("best_val_loss"), dtype=torch.float64)
    by_cell = resume.pop("train_state_by_rank")  # per cell (h, c), each (world, B, H): 0.1 kept (layers, B, H) h, c
    resume["train_state"] = tuple(torch.stack([cell[n][0] for cell in by_cell]) for n in range(2))
    resume.update(data.pop("rnnlm_random"))  # the random streams were kept in the resume section
    del data["rnnlm_config"], resume["configured_lr"]
    data["rnnlm"]["format"] = 1  # and one torch.nn.LSTM per stack
    data["state_dict"] = {re.sub(r"backbone\.cells\.(\d+)\.(\w+)$", r"backbone.rnn.\2_l\1", k): v
                          for k, v in data["state_dict"].items()}
    assert "net.backbone.rnn.weight_hh_l0" in data["state_dict"]
    old = tmp_path / "old" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(data, old)
    module = RecurrentLM.from_loaded(load_checkpoint(old))  # the module around a checkpoint's network
    assert module.best_val_loss == math.inf and module.net.config.hidden_size == 32
    metrics = train(make_cfg(f"data.path={tiny_corpus}", "test=false", "trainer.max_steps=5", f"ckpt_path={old}",
                             run_dir=tmp_path / "b"))
    assert _step_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 5 and math.isfinite(metrics["val/loss_best"])


def test_divergence_between_logged_steps_is_still_caught(make_cfg, tiny_corpus, monkeypatch):
    step = RecurrentLM._step

    def diverging_step(self, batch, stage):  # the loss turns NaN at the 3rd training step, and stays NaN
        total, count = step(self, batch, stage)
        return (total * float("nan"), count) if stage == "train" and self.trainer.global_step >= 2 else (total, count)

    monkeypatch.setattr(RecurrentLM, "_step", diverging_step)
    cfg = make_cfg(f"data.path={tiny_corpus}", "trainer.log_every_n_steps=5", "trainer.max_steps=20",
                   "callbacks.model_checkpoint.every_n_train_steps=2")
    with pytest.raises(NonFiniteError, match="became NaN or infinite at step 3: training stopped and the last good"):
        train(cfg)
    assert _step_of(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt") == 2  # the NaN weights never saved


@pytest.mark.parametrize("mode", ["stream", "sentence"])
def test_tokens_seen_counts_every_step_though_read_back_rarely(make_cfg, tiny_corpus, mode):
    from rnnlm.callbacks import TokensPerSecond
    from rnnlm.loss import IGNORE_INDEX

    counted = []

    class CountTokens(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # every chunk the call trained on (trainer.chunks_per_call); padding is not a token
            counted.extend(int((targets != IGNORE_INDEX).sum()) for _, targets in outputs["chunks"])

    cfg = make_cfg(f"data.path={tiny_corpus}", "trainer.log_every_n_steps=3", "trainer.max_steps=7",
                   f"data.mode={mode}", "~callbacks.tokens_per_second", "test=false")
    speed = TokensPerSecond(window=4)
    train(cfg, extra_callbacks=[CountTokens(), speed])
    assert speed.seen == sum(counted) and len(counted) == 7


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(make_cfg, tiny_corpus, tmp_path):
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", "trainer.max_steps=3", run_dir=tmp_path / "a"))
    data = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    del data["rnnlm_config"]["model"]["cuda_graph"]  # the setting came after the run
    old = tmp_path / "old" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(data, old)
    typed = [f"ckpt_path={old}", "trainer.max_steps=5"]
    cfg = resume_config(make_cfg(*typed, run_dir=tmp_path / "b"), typed)
    assert cfg.model.cuda_graph is False
    train(cfg, overrides=typed)
    assert _step_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 5


def test_a_run_resumed_mid_epoch_measures_its_speed(make_cfg, tiny_corpus, tmp_path):
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", "trainer.max_steps=5", run_dir=tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    typed = [f"ckpt_path={last}", "trainer.max_steps=12", "callbacks.tokens_per_second.window=3"]
    cfg = resume_config(make_cfg(*typed, f"data.path={tiny_corpus}", run_dir=tmp_path / "b"), typed)
    metrics = train(cfg, overrides=typed)  # Lightning skips on_train_epoch_start when it resumes mid-epoch
    assert metrics["train/tokens_per_s"] > 0
