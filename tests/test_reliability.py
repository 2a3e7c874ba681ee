"""A crash, a kill, a bad checkpoint or a bad input costs a clear message or a resume, never the run."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, Payload, scalars
from rnnlm.callbacks import AtomicCheckpointIO
from rnnlm.checkpoint import CheckpointError, NonFiniteError
from rnnlm.commands.train import train
from rnnlm.corpora import DataError
from rnnlm.errors import ConfigError
from rnnlm.lightning_module import RecurrentLM


def test_same_seed_same_loss_curve(make_cfg, tiny_corpus, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg("model.dropout=0.3", f"data.path={tiny_corpus}", "trainer.max_steps=20", "seed=3",
                       "test=false", run_dir=tmp_path / name)
        train(cfg)
        runs.append(scalars(tmp_path / name)["train/loss"])
    assert len(runs[0]) == 20 and runs[0] == runs[1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_cfg, tiny_corpus, monkeypatch):
    step = RecurrentLM._step

    def diverging_step(self, batch, stage):  # the loss turns NaN from the 6th training step on
        total, count = step(self, batch, stage)
        return (total * float("nan"), count) if stage == "train" and self.trainer.global_step >= 5 else (total, count)

    monkeypatch.setattr(RecurrentLM, "_step", diverging_step)
    cfg = make_cfg(f"data.path={tiny_corpus}", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
                   "trainer.max_steps=20")
    with pytest.raises(NonFiniteError, match=r"loss became NaN or infinite at step 6: training stopped"):
        train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the checkpoint before the loss went bad
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # dies half-way through writing the next one
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    with pytest.raises(NonFiniteError, match="was not overwritten"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_resume_refuses_a_checkpoint_with_pickled_code(make_cfg, tiny_corpus, tmp_path):
    cfg = make_cfg(f"data.path={tiny_corpus}", "test=false", run_dir=tmp_path / "a")
    train(cfg)
    data = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "payload-ran"
    data["evil"] = Payload(marker)
    torch.save(data, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        train(make_cfg(f"data.path={tiny_corpus}", f"ckpt_path={tmp_path / 'evil.ckpt'}", run_dir=tmp_path / "b"))
    assert not marker.exists()


def test_resume_with_other_model_or_data_is_refused(make_cfg, tiny_corpus, tmp_path):
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", run_dir=tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"model.hidden_size=48 \(trained with 32\)"):
        train(make_cfg(f"data.path={tiny_corpus}", "model.hidden_size=48", f"ckpt_path={last}", run_dir=tmp_path / "b"))
    with pytest.raises(CheckpointError, match=r"data.batch_size=8 \(trained with 4\), data.seq_len=9 \(trained"):
        train(make_cfg(f"data.path={tiny_corpus}", "data.batch_size=8", "data.seq_len=9", f"ckpt_path={last}",
                       run_dir=tmp_path / "b"))
    with pytest.raises(CheckpointError, match=r"optimizer._target_=torch.optim.SGD \(trained with torch.optim.AdamW"):
        train(make_cfg(f"data.path={tiny_corpus}", "optimizer=sgd", f"ckpt_path={last}", run_dir=tmp_path / "b"))
    with pytest.raises(CheckpointError, match="data.corpus=alice"):
        train(make_cfg("data.corpus=alice", "data.path=null", f"ckpt_path={last}", run_dir=tmp_path / "c"))
    with pytest.raises(CheckpointError, match="is at step 4, so trainer.max_steps=4 is reached already"):
        train(make_cfg(f"data.path={tiny_corpus}", f"ckpt_path={last}", run_dir=tmp_path / "c"))
    tiny_corpus.write_text("an other text entirely\n" * 200)  # the same file, changed since
    with pytest.raises(CheckpointError, match="different vocabulary"):
        train(make_cfg(f"data.path={tiny_corpus}", f"ckpt_path={last}", "trainer.max_steps=8", run_dir=tmp_path / "c"))
    (tmp_path / "cut.ckpt").write_bytes(last.read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(make_cfg(f"data.path={tiny_corpus}", f"ckpt_path={tmp_path / 'cut.ckpt'}", run_dir=tmp_path / "d"))
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before any work


def test_ckpt_path_last_picks_the_newest_run(make_cfg, tiny_corpus, tmp_path):
    runs = tmp_path / "train" / "runs"  # <paths.log_dir>/<task_name>/runs
    logs = f"paths.log_dir={tmp_path}"
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", logs, "trainer.max_steps=4", run_dir=runs / "old"))
    time.sleep(0.05)
    train(make_cfg(f"data.path={tiny_corpus}", "test=false", logs, "trainer.max_steps=3", run_dir=runs / "new"))
    os.utime(runs / "old" / "checkpoints" / "best.ckpt")  # only last.ckpt's age counts
    train(make_cfg(f"data.path={tiny_corpus}", "ckpt_path=last", "trainer.max_steps=6", "trainer.max_epochs=5",
                   "test=false", logs, run_dir=runs / "resumed"))
    events = scalars(runs / "resumed")["train/loss"]
    assert len(events) == 3  # steps 4-6: it went on from the newest run (3 steps), not the older one (4)
    with pytest.raises(CheckpointError, match="ckpt_path=last found no run"):
        train(make_cfg(f"data.path={tiny_corpus}", "ckpt_path=last", f"paths.log_dir={tmp_path / 'empty'}",
                       run_dir=tmp_path / "elsewhere" / "x"))


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda p: p.write_text(""), "has no training text"),
        (lambda p: p.write_bytes(b"caf\xe9\n" * 10), "not UTF-8 text: invalid byte 0xe9 at byte offset 3"),
        (lambda p: p.write_text("too short\n" * 3), "too few for"),
    ],
)
def test_bad_corpora_are_one_clear_error(make_cfg, tmp_path, write, message):
    corpus = tmp_path / "corpus.txt"
    write(corpus)
    with pytest.raises(DataError, match=message):
        train(make_cfg(f"data.path={corpus}", "data.batch_size=64"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_path_is_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*nope.txt must be an existing file or folder"):
        train(make_cfg(f"data.path={tmp_path / 'nope.txt'}"))


def test_eval_refuses_text_the_vocabulary_does_not_cover(tmp_path, shared_data, cache_dir, make_cfg, tiny_corpus):
    from hydra import compose, initialize_config_dir

    from rnnlm.commands.cli import CONF_DIR
    from rnnlm.commands.eval import evaluate

    cfg = make_cfg("data=word", f"data.path={tiny_corpus}", "test=false")
    train(cfg)
    korean = tmp_path / "ko.txt"
    korean.write_text("운동을 열심히 하는 것은 근육을 늘리는데 효과적이다\n" * 20, encoding="utf-8")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
                                              f"data.path={korean}", "device=cpu"])
    with pytest.raises(DataError, match="outside the checkpoint's vocabulary"):
        evaluate(eval_cfg)


def test_make_tensorboard_listens_on_localhost_only():
    recipe = (REPO / "Makefile").read_text().split("tensorboard:")[1].split("\n\n")[0]
    assert "--host 127.0.0.1" in recipe


@pytest.mark.slow
def test_tokenizing_a_50mb_corpus_streams(tmp_path):
    corpus = tmp_path / "big.txt"
    line = " ".join(f"w{i % 5000}" for i in range(1000)) + "\n"  # 1000 words, ~5.9 kB
    with open(corpus, "w") as fh:
        for _ in range(50_000_000 // len(line)):
            fh.write(line)
    tokens = (50_000_000 // len(line)) * 1001
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from rnnlm.corpora import path_source; from rnnlm.prepare import prepare\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"p = prepare(path_source(Path({str(corpus)!r})), 'word', Path({str(tmp_path / 'cache')!r}))\n"
        "n = sum(len(a) for a in p.splits.values())\n"
        "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    count, grown = map(int, out.stdout.split())
    assert count == tokens
    list_of_tokens = tokens * 8  # a Python list of them: 8 bytes a pointer, before the strings themselves
    assert grown < list_of_tokens / 4, f"peak memory grew by {grown / 1e6:.0f} MB for {tokens:,} tokens"
