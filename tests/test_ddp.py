"""Data-parallel training on two CPU processes (gloo): the stream is split by columns across ranks and
validation is token-weighted across them, so the logged val/loss equals a one-process evaluation of the
same weights over the same 2 x eval_batch_size columns."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from rnnlm.batches import EvaluationStream
from rnnlm.checkpoint import load_checkpoint
from rnnlm.datamodule import TextDataModule
from rnnlm.loss import sequence_loss


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_single_process_evaluation(tmp_path, tiny_corpus, cache_dir):
    run = tmp_path / "run"
    args = [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", f"data.path={tiny_corpus}",
        f"paths.cache_dir={cache_dir}", "model.hidden_size=32", "model.embedding_dim=16", "data.seq_len=16",
        "data.batch_size=4", "data.eval_batch_size=3", "trainer.max_steps=6", "test=false",
        f"hydra.run.dir={run}", "~callbacks.progress_bar",
    ]
    result = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path,
                            env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/loss")]
    logged = float(rows[-1]["val/loss"])

    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    data = TextDataModule(path=str(tiny_corpus), cache_dir=str(cache_dir))
    valid = EvaluationStream(data.load().splits["valid"], batch_size=2 * 3, seq_len=16)  # both ranks' columns
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for inputs, targets in valid:
            # the remainder, read last as one more column, starts from a fresh state
            state = state if state is not None and state[0][0].size(0) == inputs.size(0) else None
            logits, state = loaded.net(inputs, state)
            batch_total, batch_count = sequence_loss(logits, targets)
            total, count = total + batch_total.item(), count + batch_count.item()
    assert logged == pytest.approx(total / count, rel=1e-5)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_ddp_run_resumed_ends_with_the_weights_of_one_that_never_stopped(tmp_path, tiny_corpus, cache_dir):
    """Each process carries the hidden state of its own columns: the checkpoint holds every process's."""
    common = [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", f"data.path={tiny_corpus}",
        f"paths.cache_dir={cache_dir}", "model.hidden_size=32", "model.embedding_dim=16", "data.seq_len=8",
        "data.batch_size=4", "data.eval_batch_size=3", "model.dropout=0.3", "test=false", "trainer.max_epochs=5",
        "~callbacks.progress_bar",
    ]

    def run(folder: str, *extra: str) -> Path:
        args = [*common, f"hydra.run.dir={tmp_path / folder}", *extra]
        result = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path,
                                env=os.environ.copy(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / folder / "checkpoints" / "last.ckpt"

    straight = run("straight", "trainer.max_steps=12")
    half = run("half", "trainer.max_steps=6")
    resumed = run("resumed", f"ckpt_path={half}", "trainer.max_steps=12")
    first, second = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert second["global_step"] == 12
    for name, weight in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][name], weight, rtol=0, atol=1e-6, msg=name)
