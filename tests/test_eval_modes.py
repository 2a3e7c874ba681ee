"""eval.py on every kind of checkpoint the trainer writes (stream, sentence, bidirectional): the trainer's scores."""

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO
from rnnlm.batches import make_loader, split_dataset
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import DATA_DEFAULTS, evaluate, evaluation_layout, recorded_data
from rnnlm.datamodule import TextDataModule
from rnnlm.loss import IGNORE_INDEX
from rnnlm.prepare import encode_split

KINDS = {
    "stream": (),
    "sentence": ("data.mode=sentence", "data.seq_len=48"),  # training reads whole lines too (44 characters at most)
    "bilm": ("task=bilm", "model.bidirectional=true"),  # trains on stream windows, carries no state
}
# Enough learning that the model reads its context: a split cut otherwise than in training would score differently.
LEARN = ("trainer.max_steps=30", "optimizer.lr=0.03", "model.dropout=0")
UNIGRAM_ENTROPY = 3.16  # nats per character of the tiny corpus: a model that ignores context scores no better


def _eval_config(*overrides: str, data_dir: Path, cache_dir: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", "device=cpu",
                                          *overrides])


def _logged(run: Path) -> dict:
    """What the trainer logged: val/* of its last validation (last.ckpt's weights), test/* of best.ckpt."""
    return json.loads((run / "run_summary.json").read_text())["metrics"]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_gives_the_trainers_own_test_and_validation_loss(kind, train_tiny, shared_data, cache_dir):
    run = train_tiny(*KINDS[kind], *LEARN)
    logged = _logged(run)
    assert logged["val/loss"] < UNIGRAM_ENTROPY - 0.5
    for split, ckpt, stage in (("test", "best", "test"), ("valid", "last", "val")):
        result = evaluate(_eval_config(f"ckpt_path={run / 'checkpoints' / f'{ckpt}.ckpt'}", f"split={split}",
                                       data_dir=shared_data, cache_dir=cache_dir))
        assert result["tokens"] == logged[f"{stage}/tokens"], split  # the same tokens scored ...
        assert result["loss"] == pytest.approx(logged[f"{stage}/loss"], rel=1e-5), split  # ... from the same context


def test_eval_cli_on_a_bidirectional_checkpoint(train_tiny, tmp_path, shared_data, cache_dir):
    run = train_tiny(*KINDS["bilm"], *LEARN)
    output = tmp_path / "metrics.json"
    args = [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "split=test", f"paths.data_dir={shared_data}",
            f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path / 'outputs'}", "device=cpu", f"output={output}"]
    done = subprocess.run([sys.executable, str(REPO / "src" / "eval.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    result, logged = json.loads(output.read_text()), _logged(run)
    assert result["tokens"] == logged["test/tokens"]
    assert result["loss"] == pytest.approx(logged["test/loss"], rel=1e-5)
    assert f"loss {result['loss']:.4f} nats" in done.stdout


def _lines(batches) -> list[tuple[list[int], list[int]]]:
    """The unpadded (inputs, targets) of every line in padded sentence batches, in order."""
    lines = []
    for inputs, targets in batches:
        for x, y in zip(inputs, targets, strict=True):
            n = int((y != IGNORE_INDEX).sum())
            lines.append((x[:n].tolist(), y[:n].tolist()))
    return lines


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("mode", ["stream", "sentence"])
def test_eval_reads_the_batches_training_validates_on(mode, world, tiny_corpus, tmp_path):
    settings = dict(path=str(tiny_corpus), mode=mode, seq_len=16, batch_size=4, eval_batch_size=2,
                    cache_dir=str(tmp_path / "cache"))
    per_rank = []
    for rank in range(world):  # each process of a training run on `world` processes
        data = TextDataModule(**settings)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world,
                                       strategy=SimpleNamespace(root_device=torch.device("cpu")))
        data.setup()
        per_rank.append(list(data.val_dataloader()))
    # eval.py: the settings the checkpoint records (the datamodule's hparams), the split encoded anew
    vocab = data.vocab
    ids = encode_split(data.source(), vocab, "valid")
    assert np.array_equal(ids, data.load().splits["valid"])
    trained = recorded_data(SimpleNamespace(data=dict(data.hparams), info={"carry_state": True}))
    mode_read, batch_size, seq_len = evaluation_layout(trained, world)
    assert (mode_read, seq_len) == (mode, 16)
    batches = list(make_loader(split_dataset(ids, vocab, mode_read, seq_len, batch_size, name="valid"), batch_size))
    if mode == "stream":  # eval's chunk k holds every process's chunk k, rank after rank
        common = len(per_rank[0])  # the last process reads the remainder's chunks after its columns
        assert all(len(chunks) == common for chunks in per_rank[:-1])
        expected = [tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))
                    for chunks in zip(*(chunks[:common] for chunks in per_rank), strict=True)] + per_rank[-1][common:]
        assert len(batches) == len(expected) > 1
        for (x, y), (ex, ey) in zip(batches, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    else:  # eval's line i was line i // world of process i % world
        shards = [_lines(batches) for batches in per_rank]
        expected = [shards[i % world][i // world] for i in range(sum(len(s) for s in shards))]
        assert _lines(batches) == expected
        assert all(x[0] == vocab.bos_id for x, _ in expected)  # every line starts from <bos>, as in training
        if world == 1:
            assert all(torch.equal(a, b) for got, want in zip(batches, per_rank[0], strict=True)
                       for a, b in zip(got, want, strict=True))


def test_evaluation_reads_whole_lines_where_training_cuts_them(tiny_corpus, tmp_path):
    data = TextDataModule(path=str(tiny_corpus), mode="sentence", seq_len=8, cache_dir=str(tmp_path / "cache"))
    ids, vocab = data.load().splits["train"], data.vocab
    cut = split_dataset(ids, vocab, "sentence", 8, 4, train=True, name="train")
    whole = split_dataset(ids, vocab, "sentence", 8, 4, name="train")
    assert max(len(x) for x, _ in cut) == 8 and max(len(x) for x, _ in whole) > 8
    assert sum(len(y) for _, y in whole) == len(ids)  # every token of the split scored once


def test_eval_falls_back_on_the_datamodules_own_defaults():
    """eval lists TextDataModule's arguments and defaults itself, so as not to import it (and with it Lightning)."""
    assert DATA_DEFAULTS == {name: p.default for name, p in inspect.signature(TextDataModule).parameters.items()}


def test_a_checkpoint_without_data_settings_falls_back_to_what_training_did(caplog):
    def loaded(data: dict, carry_state: bool, bidirectional: bool = False):
        return SimpleNamespace(data=data, info={"carry_state": carry_state},
                               net=SimpleNamespace(bidirectional=bidirectional))

    # the mode follows from the model: training carries state only in stream mode, and bilm reads stream windows
    assert recorded_data(loaded({"corpus": "ptb"}, carry_state=True))["mode"] == "stream"
    assert recorded_data(loaded({"corpus": "ptb"}, carry_state=False, bidirectional=True))["mode"] == "stream"
    assert recorded_data(loaded({"corpus": "ptb"}, carry_state=False))["mode"] == "sentence"
    # a recorded mode wins over what the model carries
    assert recorded_data(loaded({"mode": "stream"}, carry_state=False))["mode"] == "stream"
    # stream windows from TextDataModule's defaults, said aloud; a recorded value is used as it is
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trained = recorded_data(loaded({"corpus": "ptb", "seq_len": 35}, carry_state=True))
    assert (trained["seq_len"], trained["eval_batch_size"]) == (35, TextDataModule().hparams.eval_batch_size)
    assert "does not record data.eval_batch_size" in caplog.text and "data.seq_len" not in caplog.text
    assert evaluation_layout(trained, world_size=2) == ("stream", 2 * trained["eval_batch_size"], 35)
    assert evaluation_layout(trained, world_size=2, batch_size=3, seq_len=7) == ("stream", 3, 7)
