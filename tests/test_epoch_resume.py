"""Resuming from a checkpoint written at an epoch's end, when ``trainer.limit_train_batches`` cuts the epoch short of
the training stream: the resumed run starts the next pass at its first chunk, as the run that never stopped does."""

from pathlib import Path

import pytest
import torch

from rnnlm.commands.train import train
from rnnlm.resume import resume_config

# 10 chunks an epoch out of the ~110 of a pass over the tiny corpus; a checkpoint after each epoch's validation
EPOCHS_OF_10 = ["trainer.limit_train_batches=10", "trainer.max_steps=-1", "trainer.check_val_every_n_epoch=1",
                "trainer.val_check_interval=null", "trainer.limit_val_batches=3", "seed=3", "test=false", "logger=csv",
                "~callbacks.text_samples", "~callbacks.progress_bar"]


def _weights(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    data = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return data["global_step"], data["state_dict"]


def test_a_run_resumed_at_an_epoch_end_repeats_the_run_that_never_stopped(make_cfg, tiny_corpus, tmp_path):
    common = [*EPOCHS_OF_10, f"data.path={tiny_corpus}"]
    straight = train(make_cfg(*common, "trainer.max_epochs=2", run_dir=tmp_path / "straight"))
    train(make_cfg(*common, "trainer.max_epochs=1", run_dir=tmp_path / "first"))
    first = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 10  # written by the epoch-end validation
    assert first["TextDataModule"] == {"train_chunks_done": 0, "train_pass": 1}  # the next pass, from its start
    typed = [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2"]
    resumed = train(resume_config(make_cfg(*typed, run_dir=tmp_path / "rest"), typed), overrides=typed)
    (step, expected), (resumed_step, got) = _weights(tmp_path / "straight"), _weights(tmp_path / "rest")
    assert resumed_step == step == 20
    assert expected.keys() == got.keys()
    off = max(float((got[name] - expected[name]).abs().max()) for name in expected)
    assert off <= 1e-6, f"the resumed weights are up to {off:.2e} off"
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-6)
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], abs=1e-6)
