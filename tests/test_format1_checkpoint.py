"""A checkpoint of format 1, as rnnlm wrote it before the refactor of the cells, kept in tests/data: it still loads,
evaluates, generates and resumes to the numbers it gave then.

``data/format1_lstm.ckpt`` is the ``last.ckpt`` of this run, made in a folder holding ``format1_corpus.txt`` (its
``data.path`` is relative, so a resumed run reads the corpus from the folder it runs in)::

    python src/train.py data.path=format1_corpus.txt model=lstm model.hidden_size=16 model.embedding_dim=8 \
        model.num_layers=2 data.seq_len=16 data.batch_size=4 data.eval_batch_size=2 trainer.max_steps=80 \
        trainer.log_every_n_steps=1 trainer.accelerator=cpu callbacks.text_samples.num_tokens=20 test=false \
        optimizer.lr=0.1 hydra.run.dir=run '~callbacks.progress_bar'
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import scalars
from rnnlm.checkpoint import load_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.resume import resume_config

DATA = Path(__file__).resolve().parent / "data"
CKPT, CORPUS = "format1_lstm.ckpt", "format1_corpus.txt"
PROMPT = "The old man"

# Recorded from the code that wrote the checkpoint.
# eval: the whole corpus (data.path), read in the columns and windows training validated with
PINNED_EVAL = {"tokens": 3258, "loss": 2.4765100479125977}
PINNED_TEXT = "The old man the the the the the the the the the the"  # PROMPT and 40 greedy characters
# train/loss of steps 81 and 82 (what a straight run to step 82 logs too)
PINNED_RESUMED_TRAIN_LOSS = [2.716702938079834, 2.711874485015869]
PINNED_RESUMED_VAL_LOSS = 2.45723557472229  # the validation that ends the resumed run (step 82)


@pytest.fixture
def copies(tmp_path, monkeypatch) -> Path:
    """A folder holding copies of the checkpoint and its corpus, made the working directory (the checkpoint's
    data.path is relative to it); the files in tests/data are never touched."""
    folder = tmp_path / "format1"
    folder.mkdir()
    for name in (CKPT, CORPUS):
        shutil.copy(DATA / name, folder / name)
    monkeypatch.chdir(folder)
    return folder


def _compose(config: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def test_it_loads_and_evaluates_to_the_pinned_loss(copies, shared_data, cache_dir):
    assert torch.load(copies / CKPT, weights_only=True)["rnnlm"]["format"] == 1  # as written
    loaded = load_checkpoint(copies / CKPT)
    assert loaded.info["format"] == 2 and loaded.info["global_step"] == 80  # upgraded as read
    config = loaded.net.config
    assert (config.cell, config.impl, config.embedding_dim, config.hidden_size, config.num_layers) == (
        "lstm", "fused", 8, 16, 2)
    assert loaded.vocab.level == "char" and len(loaded.vocab) == config.vocab_size == 41
    result = evaluate(_compose("eval", f"ckpt_path={copies / CKPT}", f"data.path={copies / CORPUS}", "device=cpu",
                               f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}",
                               f"paths.log_dir={copies / 'outputs'}"))
    assert (result["global_step"], result["tokens"], result["batch_size"], result["seq_len"]) == (
        80, PINNED_EVAL["tokens"], 2, 16)
    assert result["loss"] == pytest.approx(PINNED_EVAL["loss"], rel=1e-5, abs=1e-6), result["loss"]


def test_greedy_generation_gives_the_pinned_text(copies):
    [text] = generate_texts(_compose("generate", f"ckpt_path={copies / CKPT}", f"prompt={PROMPT}",
                                     "max_new_tokens=40", "greedy=true", "device=cpu"))
    assert text == PINNED_TEXT


def test_it_resumes_to_the_pinned_losses(copies, make_cfg, tmp_path):
    typed = [f"ckpt_path={copies / CKPT}", "trainer.max_steps=82"]
    run = tmp_path / "resumed"
    metrics = train(resume_config(make_cfg(*typed, run_dir=run), typed), overrides=typed)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").info["global_step"] == 82
    logged = scalars(run)
    assert logged["train/loss"] == pytest.approx(PINNED_RESUMED_TRAIN_LOSS, rel=1e-5, abs=1e-6), logged["train/loss"]
    assert metrics["val/loss"] == pytest.approx(PINNED_RESUMED_VAL_LOSS, rel=1e-5, abs=1e-6), metrics["val/loss"]
