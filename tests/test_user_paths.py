"""Paths users take at the edges: resuming a run whose budget is spent or whose optimizer is not today's default,
an Optuna search with a failing trial or a misspelled metric, and evaluation in any column layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import REPO, compose_train
from rnnlm.batches import EvaluationStream
from rnnlm.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.train import check_optimized_metric, returned_metrics, train
from rnnlm.corpora import DataError, path_source
from rnnlm.datamodule import TextDataModule
from rnnlm.errors import ConfigError
from rnnlm.prepare import encode_split
from rnnlm.resume import check_resumable, epochs_trained, resume_command_line, resume_config

# One epoch of 3 chunks: a run that ends on trainer.max_epochs, as the default budget does (10 epochs).
ONE_EPOCH = ["trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "test=false"]


@pytest.fixture(scope="module")
def ntasgd_epoch(tmp_path_factory, session_corpus, shared_data, cache_dir) -> Path:
    """last.ckpt of an NT-ASGD run (nonmono 5) that has trained its one epoch."""
    run = tmp_path_factory.mktemp("ntasgd") / "run"
    train(compose_train(["optimizer=ntasgd", "scheduler=none", f"data.path={session_corpus}", *ONE_EPOCH], run,
                        shared_data, cache_dir))
    return run / "checkpoints" / "last.ckpt"


def _train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_checkpoint_that_has_trained_its_epochs_is_refused(ntasgd_epoch, make_cfg, tmp_path):
    typed = [f"ckpt_path={ntasgd_epoch}"]  # the run's own budget: trainer.max_epochs=1
    with pytest.raises(CheckpointError, match=r"has trained 1 epoch \(step 3\), so trainer.max_epochs=1 is reached "
                                              r"already: raise trainer.max_epochs to train on, e.g. "
                                              r"trainer.max_epochs=2 \(rnnlm-eval"):
        resume_config(make_cfg(*typed, tiny=False, run_dir=tmp_path / "a"), typed)
    typed = [f"ckpt_path={ntasgd_epoch}", "trainer.max_epochs=2"]
    assert resume_config(make_cfg(*typed, tiny=False, run_dir=tmp_path / "b"), typed).trainer.max_epochs == 2
    checkpoint = read_checkpoint(ntasgd_epoch, mmap=True)
    assert (checkpoint["global_step"], epochs_trained(checkpoint)) == (3, 1)  # written by the epoch's validation

    def budget(max_steps=-1, max_epochs=None, max_time=None):
        return OmegaConf.create({"trainer": {"max_steps": max_steps, "max_epochs": max_epochs, "max_time": max_time}})

    check_resumable(budget(max_epochs=-1), checkpoint, ntasgd_epoch)  # no limit
    check_resumable(budget(max_steps=10), checkpoint, ntasgd_epoch)  # max_epochs=null with steps: no epoch limit
    with pytest.raises(CheckpointError, match="trainer.max_steps=3 is reached"):
        check_resumable(budget(max_steps=3, max_epochs=5), checkpoint, ntasgd_epoch)
    # stopped in the middle of its first epoch (Ctrl-C): one to go
    mid_epoch = {"global_step": 2, "loops": {"fit_loop": {
        "epoch_progress": {"current": {"ready": 1, "started": 1, "processed": 0, "completed": 0}},
        "epoch_loop.batch_progress": {"is_last_batch": False}}}}
    assert epochs_trained(mid_epoch) == 0
    check_resumable(budget(max_epochs=1), mid_epoch, ntasgd_epoch)


def test_a_spent_epoch_budget_is_refused_before_the_run_folder_is_made(ntasgd_epoch, tmp_path, cache_dir,
                                                                        shared_data):
    folder = tmp_path / "resumed"
    done = _train_py(f"ckpt_path={ntasgd_epoch}", f"hydra.run.dir={folder}", f"paths.cache_dir={cache_dir}",
                     f"paths.data_dir={shared_data}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "so trainer.max_epochs=1 is reached already" in done.stderr
    assert not folder.exists()


def test_settings_of_the_checkpoints_own_optimizer_are_judged_against_it(ntasgd_epoch, make_cfg, tmp_path):
    ckpt = f"ckpt_path={ntasgd_epoch}"
    # Today's default optimizer (AdamW) has no `nonmono`: typed as is, Hydra refuses it before the checkpoint is read.
    argv = [ckpt, "optimizer.nonmono=3", "optimizer.lr=7.5", "model=gru", "+trainer.x=1", "hydra.run.dir=x", "-m"]
    assert resume_command_line(argv) == [ckpt, "++optimizer.nonmono=3", *argv[2:]]  # AdamW has a learning rate
    for unchanged in ([ckpt, "optimizer.nonmon=3"], ["ckpt_path=last", "optimizer.nonmono=3"], ["optimizer.nonmono=3"],
                      [f"ckpt_path={tmp_path / 'none.ckpt'}", "optimizer.nonmono=3"], [ckpt, "optimizer=ntasgd"]):
        assert resume_command_line(unchanged) == unchanged

    typed = resume_command_line([ckpt, "optimizer.nonmono=3", "trainer.max_epochs=2"])
    with pytest.raises(CheckpointError, match=r"these would change it: optimizer.nonmono=3 \(trained with 5\); drop "
                                              "them to resume"):
        resume_config(make_cfg(*typed, tiny=False, run_dir=tmp_path / "a"), typed)
    typed = resume_command_line([ckpt, "optimizer.lr=7.5", "trainer.max_epochs=2"])
    cfg = resume_config(make_cfg(*typed, tiny=False, run_dir=tmp_path / "b"), typed)
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.nonmono) == ("rnnlm.ntasgd.NTASGD", 7.5, 5)


def test_resuming_ntasgd_with_another_nonmono_says_what_it_was_trained_with(ntasgd_epoch, tmp_path, cache_dir,
                                                                            shared_data):
    """The command line goes through rnnlm.resume.resume_command_line before Hydra composes it."""
    done = _train_py(f"ckpt_path={ntasgd_epoch}", "optimizer.nonmono=3", "trainer.max_epochs=2",
                     f"hydra.run.dir={tmp_path / 'resumed'}", f"paths.cache_dir={cache_dir}",
                     f"paths.data_dir={shared_data}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert "these would change it: optimizer.nonmono=3 (trained with 5)" in done.stderr


def test_optimized_metric_must_be_a_metric_the_run_returns(make_cfg):
    check_optimized_metric(make_cfg())  # val/loss_best
    with pytest.raises(ConfigError, match=r"optimized_metric=val/los_best is not a metric this run returns \(did you "
                                          r"mean val/loss_best\?\): use one of train/loss, .*val/bpc, .*val/loss_best"):
        check_optimized_metric(make_cfg("optimized_metric=val/los_best"))
    for refused in (["optimized_metric=val/ppl"],  # characters: bits per character
                    ["optimized_metric=test/loss", "test=false"],
                    ["optimized_metric=val/loss_best", "trainer.limit_val_batches=0"],
                    ["optimized_metric=val/answer_acc"]):
        with pytest.raises(ConfigError, match="is not a metric this run returns"):
            check_optimized_metric(make_cfg(*refused))
    for accepted in (["data=word", "optimized_metric=val/ppl"], ["optimized_metric=test/bpc"],
                     ["data=recall", "optimized_metric=val/answer_acc"],
                     ["optimizer=ntasgd", "optimized_metric=train/averaging"]):
        check_optimized_metric(make_cfg(*accepted))


def test_a_run_returns_only_metrics_that_optimized_metric_may_name(train_tiny, make_cfg, session_corpus):
    run = train_tiny()
    returned = json.loads((run / "run_summary.json").read_text())["metrics"]
    assert {"val/loss_best", "val/bpc", "test/loss"} <= set(returned) <= set(
        returned_metrics(make_cfg(f"data.path={session_corpus}")))


@pytest.mark.slow  # 15-20 s on 2 cores: three trials of an Optuna study, one process
def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, tiny_corpus, cache_dir):
    sweep = tmp_path / "sweep"
    # an absurd learning rate makes its trial's loss NaN at the second step
    done = _train_py("hparams_search=optuna", "hydra.sweeper.n_trials=3", "optimizer.lr=choice(1e30,0.001)",
                     "model.hidden_size=16", "model.num_layers=1", "model.embedding_dim=8", "data.seq_len=8",
                     "data.batch_size=4", "data.eval_batch_size=2", "trainer.max_steps=3", "test=false",
                     "trainer.accelerator=cpu", "~callbacks.progress_bar", "~callbacks.model_summary",
                     f"data.path={tiny_corpus}", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summaries = [json.loads((sweep / str(job) / "run_summary.json").read_text()) for job in range(3)]
    assert sorted(s["status"] for s in summaries) == ["failed", "ok", "ok"]
    failed = next(s for s in summaries if s["status"] == "failed")
    assert failed["error"].startswith("NonFiniteError: the training loss became NaN")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.001 and 0 < results["best_value"] < 10


def test_evaluation_columns_score_every_target_once_on_any_number_of_processes():
    ids = np.arange(1000, dtype=np.uint32)  # 999 targets
    for world in (1, 2, 3):
        for batch_size in (1, 2, 7, 999 // world):
            ranks = [EvaluationStream(ids, batch_size, 16, rank, world) for rank in range(world)]
            scored = sorted(t for data in ranks for _, y in data for t in y.flatten().tolist())
            assert scored == list(range(1, 1000)), (world, batch_size)
            assert [len(data) for data in ranks] == [len(list(data)) for data in ranks]
            for data in ranks:
                for x, y in data:  # each target follows its input in the stream
                    assert torch.equal(y, x + 1)
    # one process reading both processes' columns reads what they read, chunk by chunk; the remainder last
    per_rank = [list(EvaluationStream(ids, 4, 16, rank, 2)) for rank in range(2)]
    one = list(EvaluationStream(ids, 8, 16))
    common = len(per_rank[0])
    assert len(one) == len(per_rank[1]) == common + 1  # 999 = 8 x 124 + 7: a remainder of 7 targets
    for (x, y), parts in zip(one, zip(*per_rank, strict=False), strict=False):
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert all(torch.equal(a, b) for a, b in zip(one[-1], per_rank[1][-1], strict=True))
    assert one[-1][1].tolist() == [list(range(993, 1000))]
    with pytest.raises(DataError, match=r"too few for 1000 columns .*lower the batch size to at most 999"):
        EvaluationStream(ids, 1000, 16, split="valid")


def _eval_config(*overrides: str, data_dir: Path, cache_dir: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", "device=cpu",
                                          *overrides])


def _text_of(tokens: int, folder: Path, vocab) -> tuple[Path, np.ndarray]:
    """A text file of the tiny corpus's characters that encodes to exactly ``tokens`` tokens."""
    line = "the quick brown fox jumps over the lazy dog"
    path = folder / f"text{tokens}.txt"
    lines = [line] * (tokens // (len(line) + 1) + 1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    extra = len(encode_split(path_source(path), vocab, None)) - tokens  # one token a character, and each line end
    lines[-1] = line[: len(line) - extra]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = encode_split(path_source(path), vocab, None)
    assert len(ids) == tokens
    return path, ids


def test_eval_scores_every_token_in_any_layout(train_tiny, tmp_path, shared_data, cache_dir):
    best = train_tiny() / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint(best)
    path, ids = _text_of(2001, tmp_path, loaded.vocab)
    where = {"data_dir": shared_data, "cache_dir": cache_dir}
    results = {}
    for batch_size in (1, 3, 64, 2000):  # 2000 columns of one token each
        results[batch_size] = evaluate(_eval_config(f"ckpt_path={best}", f"data.path={path}",
                                                    f"data.batch_size={batch_size}", **where))
        assert results[batch_size]["tokens"] == 2000, batch_size
    # one column: one forward pass over the whole text from a zero state
    tokens = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        logits, _ = loaded.net(tokens[None, :-1])
    assert results[1]["loss"] == pytest.approx(float(F.cross_entropy(logits[0], tokens[1:])), rel=1e-5)
    with pytest.raises(DataError, match="too few for 2001 columns .*lower the batch size to at most 2000"):
        evaluate(_eval_config(f"ckpt_path={best}", f"data.path={path}", "data.batch_size=2001", **where))
    # 200,001 tokens in 100,000 columns of two targets each
    path, _ = _text_of(200_001, tmp_path, loaded.vocab)
    assert evaluate(_eval_config(f"ckpt_path={best}", f"data.path={path}", "data.batch_size=100000",
                                 **where))["tokens"] == 200_000


def test_validation_scores_every_target_of_the_split(train_tiny, session_corpus, tmp_path):
    run = train_tiny()
    logged = json.loads((run / "run_summary.json").read_text())["metrics"]
    splits = TextDataModule(path=str(session_corpus), cache_dir=str(tmp_path / "cache")).load().splits
    assert (logged["val/tokens"], logged["test/tokens"]) == (len(splits["valid"]) - 1, len(splits["test"]) - 1)
