"""Several TBPTT chunks per call of Lightning's training step (``trainer.chunks_per_call``): the numbers and the
meanings of one chunk per call. Every count a user gives in steps (max_steps, val_check_interval,
log_every_n_steps, checkpoints every N steps, epochs, schedulers) counts optimizer steps, and a run stopped
anywhere, inside a group too, resumes to the weights of one that never stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import SHARED_DATA, compose_train, scalars
from rnnlm.callbacks import TrainingInterrupted
from rnnlm.commands.train import train
from test_pinned_training import CASES, COMMON, PINNED_DDP, run_ddp


class Record(L.Callback):
    """Each step's loss, the calls of the training step, and the steps after which it validated and saved."""

    def __init__(self):
        self.losses: list[float] = []
        self.calls = 0
        self.validated: list[int] = []
        self.saved: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses += outputs["losses"].tolist()
        self.calls += 1

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.saved.append(trainer.global_step)


def fit(run: Path, corpus: Path, cache_dir: Path, *overrides: str, callbacks=()) -> Record:
    record = Record()
    train(compose_train([f"data.path={corpus}", *overrides], run, SHARED_DATA, cache_dir), [record, *callbacks])
    return record


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_several_chunks_per_call_train_to_the_same_numbers(case, tmp_path, session_corpus, cache_dir):
    """Each pinned case (stream, variable-length BPTT with AR and TAR, NT-ASGD with weight drop, accumulation,
    epochs with a scheduler, sentences) with 1, 4 and 16 chunks per call: the same loss at every step, the same
    validations and checkpoints, the same final weights."""
    settings = [*COMMON, *CASES[case], "trainer.log_every_n_steps=50"]  # logging would end every group
    runs = {k: fit(tmp_path / f"k{k}", session_corpus, cache_dir, *settings, f"trainer.chunks_per_call={k}")
            for k in (1, 4, 16)}
    one = runs[1]
    for k in (4, 16):
        assert runs[k].calls < one.calls, f"chunks_per_call={k} did not group chunks"
        assert runs[k].losses == pytest.approx(one.losses, rel=1e-6, abs=1e-6), f"chunks_per_call={k}"
        assert (runs[k].validated, runs[k].saved) == (one.validated, one.saved), f"chunks_per_call={k}"
        assert_same_weights(weights(tmp_path / f"k{k}"), weights(tmp_path / "k1"))


def test_every_setting_counted_in_steps_keeps_its_meaning(tmp_path, session_corpus, cache_dir):
    """max_steps not a multiple of the group, validations every 4 steps of 9-step epochs, metrics every 5 steps,
    last.ckpt every 6 steps, a scheduler per epoch: the same steps for every logged value, validation and
    checkpoint with 16 chunks per call as with one, and no step past max_steps."""
    settings = ["model.dropout=0.2", "trainer.max_steps=23", "trainer.max_epochs=5", "trainer.limit_train_batches=9",
                "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5",
                "callbacks.model_checkpoint.every_n_train_steps=6", "scheduler=step", "test=false"]
    one = fit(tmp_path / "k1", session_corpus, cache_dir, *settings, "trainer.chunks_per_call=1")
    many = fit(tmp_path / "k16", session_corpus, cache_dir, *settings, "trainer.chunks_per_call=16")
    assert many.calls < one.calls
    assert len(one.losses) == len(many.losses) == 23
    assert many.validated == one.validated == [4, 8, 13, 17, 22, 23]  # 2 per 9-step epoch, and the last step
    assert many.saved == one.saved and {6, 12, 18, 23} <= set(one.saved)
    logged_one, logged_many = scalars(tmp_path / "k1"), scalars(tmp_path / "k16")
    assert logged_many.keys() == logged_one.keys()
    for tag, values in logged_one.items():
        assert logged_many[tag] == pytest.approx(values, rel=1e-6), tag
    steps = {tag: [e.step for e in events] for tag, events in _events(tmp_path / "k16").items()}
    assert steps == {tag: [e.step for e in events] for tag, events in _events(tmp_path / "k1").items()}
    assert steps["train/loss"] == [4, 9, 14, 19, 22]  # every 5 steps (Lightning counts from 0), and the last
    assert len(set(logged_one["train/lr"])) == 3  # the scheduler halved the rate after each of the 2 full epochs
    assert torch.load(tmp_path / "k16" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 23


def _events(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


class StopInside(L.Callback):
    """Asks the run to stop (as Ctrl-C does) during the optimizer step ``step``: inside a group of chunks."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step + 1 == self.step:
            trainer.checkpoint_callback.stop_signal = signal.SIGINT


@pytest.mark.parametrize("stop", ["max_steps", "signal"])
def test_a_run_stopped_inside_a_group_resumes_to_the_weights_of_one_that_never_stopped(stop, tmp_path,
                                                                                       session_corpus, cache_dir):
    settings = ["model.dropout=0.3", "trainer.max_epochs=3", "trainer.limit_train_batches=13",
                "trainer.val_check_interval=8", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=50",
                "trainer.chunks_per_call=4", "test=false"]
    fit(tmp_path / "straight", session_corpus, cache_dir, *settings, "trainer.max_steps=30")
    if stop == "max_steps":  # step 10 is inside the group of chunks 8..11
        fit(tmp_path / "first", session_corpus, cache_dir, *settings, "trainer.max_steps=10")
    else:
        with pytest.raises(TrainingInterrupted, match="stopped at step 10"):
            fit(tmp_path / "first", session_corpus, cache_dir, *settings, "trainer.max_steps=30",
                callbacks=[StopInside(10)])
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 10
    fit(tmp_path / "resumed", session_corpus, cache_dir, *settings, "trainer.max_steps=30", f"ckpt_path={last}")
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))


def test_a_ddp_run_groups_chunks_to_the_same_numbers(tmp_path, session_corpus, cache_dir):
    """Two processes, 4 chunks per call: DDP averages the gradients of every step, and both processes end their
    groups at the same steps."""
    got = run_ddp(tmp_path / "run", session_corpus, cache_dir, "trainer.chunks_per_call=4",
                  "trainer.log_every_n_steps=50")
    assert got["global_step"] == PINNED_DDP["global_step"]
    assert got["val_loss"] == pytest.approx(PINNED_DDP["val_loss"], rel=1e-5)
    for name, sums in PINNED_DDP["weights"].items():
        assert got["weights"][name] == pytest.approx(sums, rel=1e-5, abs=1e-6), name


def test_the_progress_bar_counts_chunks(tmp_path, session_corpus, cache_dir):
    """The bar a user watches says how many chunks of the epoch are trained, however many one call trains."""
    seen = {}

    class ReadBar(L.Callback):
        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback
            seen["completed"] = bar.progress.tasks[bar.train_progress_bar_id].completed

    cfg = compose_train([f"data.path={session_corpus}", "trainer.max_steps=30", "trainer.chunks_per_call=16",
                         "trainer.log_every_n_steps=50", "test=false", "callbacks.progress_bar.refresh_s=100"],
                        tmp_path / "run", SHARED_DATA, cache_dir)
    train(cfg, extra_callbacks=[ReadBar()])
    assert seen["completed"] == 30
