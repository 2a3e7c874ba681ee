"""``data.test_batch_size``: the test split read in columns of its own (AWD-LSTM scores its test split as one stream),
by training's test and by ``rnnlm-eval`` of its checkpoint alike."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from rnnlm.checkpoint import load_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.train import train
from rnnlm.datamodule import TextDataModule

# Enough learning that the model reads its context: the columns then change the score.
LEARN = ("trainer.max_steps=30", "optimizer.lr=0.03", "model.dropout=0")


def _eval(*overrides: str, data_dir, cache_dir) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", "device=cpu",
                                         *overrides])
    return evaluate(cfg)


def test_one_test_column_reads_the_split_as_one_stream_and_eval_repeats_it(make_cfg, tiny_corpus, tmp_path, caplog,
                                                                           shared_data, cache_dir):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="rnnlm.datamodule"):
        logged = train(make_cfg(f"data.path={tiny_corpus}", "data.test_batch_size=1", *LEARN, run_dir=run))
    assert "Testing on 1 stream column(s) per process (data.test_batch_size)" in caplog.text
    best = run / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint(best)
    assert (loaded.data["test_batch_size"], loaded.data["eval_batch_size"]) == (1, 2)
    # the split as one stream, one forward pass from a zero state: every prediction has all the text before it
    ids = torch.from_numpy(np.asarray(TextDataModule(**loaded.data).load().splits["test"], dtype=np.int64))
    with torch.no_grad():
        logits, _ = loaded.net(ids[None, :-1])
    one_stream = float(F.cross_entropy(logits[0], ids[1:]))
    assert logged["test/tokens"] == len(ids) - 1
    assert logged["test/loss"] == pytest.approx(one_stream, rel=1e-5)

    where = {"data_dir": shared_data, "cache_dir": cache_dir}
    result = _eval(f"ckpt_path={best}", "split=test", **where)
    assert (result["batch_size"], result["tokens"]) == (1, logged["test/tokens"])
    assert result["loss"] == pytest.approx(logged["test/loss"], rel=1e-6)
    # validation, and the test split read as validation is (eval_batch_size=2 columns), score otherwise
    assert _eval(f"ckpt_path={best}", "split=valid", **where)["batch_size"] == 2
    two_columns = _eval(f"ckpt_path={best}", "split=test", "data.batch_size=2", **where)["loss"]
    assert abs(two_columns - one_stream) > 1e-4
