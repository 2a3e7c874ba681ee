"""The long-range recall task (``data=recall``): its lines, answer-only scoring, answer accuracy, equal budgets."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from rnnlm.batches import Sentences
from rnnlm.checks import ConfigError, check_train_config, equal_budget
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.train import train
from rnnlm.loss import IGNORE_INDEX
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.recall import QUERY, recall_lines, write_recall_corpus

SMALL = ("data=recall", "data.recall.distance=4", "data.recall.keys=4", "data.recall.noise=6",
         "data.recall.examples=[200,40,40]", "data.seq_len=16")


def test_each_line_asks_for_the_key_read_distance_steps_before():
    lines = recall_lines(distance=7, keys=5, noise=9, examples=50, seed=3)
    assert lines == recall_lines(distance=7, keys=5, noise=9, examples=50, seed=3)  # reproducible
    assert lines != recall_lines(distance=7, keys=5, noise=9, examples=50, seed=4)
    for line in lines:
        words = line.split()
        assert len(words) == 7 + 2 and words[-2] == QUERY and words[-1] == words[0]
        assert words.index(QUERY) - words.index(words[0]) == 7  # the query comes 7 steps after the key
        assert all(w.startswith("n") for w in words[1:-2]) and words[0] in {f"k{i}" for i in range(5)}


def test_the_corpus_is_written_once_per_settings(tmp_path):
    folder = write_recall_corpus(tmp_path, distance=3, examples=(10, 4, 4))
    assert sorted(p.name for p in folder.iterdir()) == ["settings.json", "test.txt", "train.txt", "valid.txt"]
    assert len((folder / "valid.txt").read_text().splitlines()) == 4
    stamp = (folder / "train.txt").stat().st_mtime_ns
    assert write_recall_corpus(tmp_path, distance=3, examples=(10, 4, 4)) == folder
    assert (folder / "train.txt").stat().st_mtime_ns == stamp
    assert write_recall_corpus(tmp_path, distance=4, examples=(10, 4, 4)) != folder
    assert json.loads((folder / "settings.json").read_text())["distance"] == 3


def test_only_the_last_word_of_a_line_is_scored():
    ids = np.array([5, 6, 7, 8, 1, 9, 10, 11, 1])  # two lines, line end id 1
    inputs, targets = Sentences(ids, line_end_id=1, bos_id=2, max_len=None, last_only=True)[0]
    assert inputs.tolist() == [2, 5, 6, 7, 8]
    assert targets.tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX]


def test_training_and_eval_report_the_answer_accuracy(make_cfg, tmp_path, shared_data, cache_dir):
    run = tmp_path / "run"
    metrics = train(make_cfg(*SMALL, "model=gru", "model.dropout=0", "data.batch_size=32", "optimizer=adam",
                             "optimizer.lr=0.01", "scheduler=none", "trainer.max_steps=300", "trainer.max_epochs=-1",
                             run_dir=run))
    assert metrics["val/answer_acc"] > 0.9  # distance 4 is learned quickly; chance is 1/4
    assert metrics["test/tokens"] == 40  # one answer per line
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        result = evaluate(compose("eval", overrides=[f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}",
                                                     "device=cpu", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"]))
    assert result["tokens"] == 40
    assert result["loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert result["answer_acc"] == pytest.approx(metrics["test/answer_acc"])


@pytest.mark.parametrize(("overrides", "message"), [
    (("data.recall.distance=30",), "lines of 33 tokens, longer than data.seq_len=16: set data.seq_len=33"),
    (("data.mode=stream",), "data.scored=last scores each line's last word: use data.mode=sentence"),
    ((f"data.path={__file__}",), "are two corpora: drop one"),
    (("data.recall.keys=0",), "data.recall.keys=0 must be an integer >= 2"),
])
def test_bad_recall_settings_are_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(make_cfg(*SMALL, *overrides))


def test_equal_budgets_give_the_cells_the_same_recurrent_parameters():
    def recurrent(cell: str, hidden: int) -> int:
        net = LanguageModel(NetworkConfig(vocab_size=30, cell=cell, embedding_dim=16, hidden_size=hidden, num_layers=1))
        return sum(p.numel() for p in net.backbone.parameters())

    lstm = recurrent("lstm", 64)
    assert equal_budget("lstm", 16, 64) == 64
    for cell in ("rnn", "gru"):
        assert abs(recurrent(cell, equal_budget(cell, 16, 64)) / lstm - 1) < 0.03, cell


def test_the_long_range_experiment_sweeps_seeds_cells_and_distances_each_cell_with_its_own_settings():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=long_range"], return_hydra_config=True)
        rnn = compose("train", overrides=["experiment=long_range", "model=rnn"])
        mingru = compose("train", overrides=["experiment=long_range", "model=mingru"])
        given = compose("train", overrides=["experiment=long_range", "model=mingru", "optimizer.lr=0.004"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"seed": "1,2,3", "model": "rnn,lstm,gru",
                                              "data.recall.distance": "5,10,20,50,100,200"}
    assert cfg.model.hidden_size == equal_budget(cfg.model.cell, 16, 64) == 64  # the default model is the LSTM
    assert cfg.data.seq_len >= 200 + 3  # the longest lines fit
    # what each cell's search chose (docs/results.md)
    assert (rnn.optimizer.lr, rnn.trainer.gradient_clip_val, rnn.model.init_range) == (0.0019, 1.0, 1.0)
    assert (cfg.optimizer.lr, cfg.trainer.gradient_clip_val, cfg.model.init_range) == (0.0082, 0.25, 1.0)
    with pytest.raises(Exception, match="for model=rnn, lstm, gru only, not for model.cell=mingru: give one"):
        mingru.optimizer.lr  # noqa: B018  a cell without a search: the error says to give the value
    assert given.optimizer.lr == 0.004
