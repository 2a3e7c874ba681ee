"""experiment=tiny_words: three lines learned by heart, each continued from its first word into the whole line
by greedy generation; data.holdout=false validates on the training text, and its default keeps refusing a corpus
too small to split."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from rnnlm.checkpoint import load_checkpoint
from rnnlm.checks import check_train_config
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.datamodule import TextDataModule
from rnnlm.errors import ConfigError, DataError

# Distinct first words; "sat", "on the" and "the" come back in other lines, followed by other words, so a
# line's continuation depends on how it started, not on the last word alone.
LINES = ["the cat sat on the mat", "my dog sat by the door", "a bird sang on the roof"]


def _write_lines(folder: Path) -> Path:
    path = folder / "lines.txt"
    path.write_text("".join(f"{line}\n" for line in LINES), encoding="utf-8")
    return path


@pytest.mark.parametrize("cell,sizes", [("rnn", []), ("lstm", ["model=lstm", "model.hidden_size=128"])])
def test_tiny_words_learns_each_line_and_greedy_generation_repeats_it(make_cfg, tmp_path, shared_data, cache_dir,
                                                                        cell, sizes):
    log_dir = tmp_path / "outputs"
    cfg = make_cfg("experiment=tiny_words", f"data.path={_write_lines(tmp_path)}", "trainer.accelerator=cpu", *sizes,
                   tiny=False, run_dir=log_dir / "train" / "runs" / cell)
    metrics = train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    net = load_checkpoint(ckpt).net.config
    assert (net.cell, net.embedding_dim, net.hidden_size) == (cell, 10, 32 if cell == "rnn" else 128)
    # Every word but a line's first follows from what came before: what is left is ln 3 on each first word,
    # over the 3 x 7 targets (6 words and the line end).
    assert metrics["val/loss"] < 1.05 * 3 * np.log(3) / 21
    for line in LINES:  # python src/generate.py ckpt_path=last prompt=<first word> greedy=true stop_at_eos=true
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            gen = compose("generate", overrides=["ckpt_path=last", f"paths.log_dir={log_dir}", "device=cpu",
                                                 f"prompt={line.split()[0]}", "greedy=true", "stop_at_eos=true"])
        assert generate_texts(gen) == [line]
    # eval reads the checkpoint's data settings: its test split is the training text too
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        evaluated = evaluate(compose("eval", overrides=[f"ckpt_path={ckpt}", f"paths.data_dir={shared_data}",
                                                        f"paths.cache_dir={cache_dir}", "device=cpu"]))
    assert evaluated["tokens"] == 21 and evaluated["loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)


def test_holdout_false_reads_the_training_text_in_every_split(tmp_path):
    corpus = _write_lines(tmp_path)
    data = TextDataModule(path=str(corpus), level="word", mode="sentence", split=(1.0, 0.0, 0.0), holdout=False,
                          cache_dir=str(tmp_path / "cache"))
    splits = data.load().splits
    assert len(splits["train"]) == 21  # every line trains; data.split is ignored
    assert np.array_equal(splits["valid"], splits["train"]) and np.array_equal(splits["test"], splits["train"])
    folder = tmp_path / "folder"  # a folder's train.txt stands in for its valid.txt and test.txt
    folder.mkdir()
    (folder / "train.txt").write_text(corpus.read_text())
    (folder / "valid.txt").write_text("held out words\n")
    data = TextDataModule(path=str(folder), level="word", holdout=False, cache_dir=str(tmp_path / "cache"))
    splits = data.load().splits
    assert np.array_equal(splits["valid"], splits["train"]) and np.array_equal(splits["test"], splits["train"])


@pytest.mark.parametrize("overrides", [["data=word", "data.mode=sentence"],
                                       ["experiment=tiny_words", "data.holdout=true"]])
def test_holdout_by_default_still_refuses_too_few_lines(make_cfg, tmp_path, overrides):
    cfg = make_cfg(*overrides, f"data.path={_write_lines(tmp_path)}")
    assert make_cfg().data.holdout is True
    with pytest.raises(DataError, match=r"has only 3 line\(s\), too few for data.split=\[0.9,0.05,0.05\]"):
        train(cfg)


def test_tiny_words_needs_a_corpus_and_holdout_a_boolean(make_cfg):
    with pytest.raises(ConfigError, match=r"data.corpus is not set: use one of .* or data.path=FILE"):
        check_train_config(make_cfg("experiment=tiny_words"))
    with pytest.raises(ConfigError, match="data.holdout=maybe must be true .* or false"):
        check_train_config(make_cfg("data.holdout=maybe"))
