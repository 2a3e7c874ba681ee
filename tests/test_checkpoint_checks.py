"""A damaged or hand-edited checkpoint is refused before any work, by every command, in one line that names the
file, what is wrong and what to do; a sound one of any network kind passes the same checks."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnlm.checkpoint import (
    CHECKPOINT_FORMAT,
    ITERATE_KEY,
    LEGACY_BEST_KEY,
    WORD_CHAR_FORMAT,
    check_checkpoint,
    load_checkpoint,
    read_checkpoint,
    write_model_section,
)
from rnnlm.commands.cli import exit_on_user_error
from rnnlm.errors import CheckpointError
from rnnlm.lightning_module import RecurrentLM
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.vocab import Vocab

TINY_RUN = ("test=false", "logger=csv")  # the same run as tests/test_placement.py: trained once per session
DELETE = object()  # a damage that removes the entry
# How every message ends: what to do
FIXES = ("the file is damaged or was edited; use another checkpoint (best.ckpt, or an earlier last.ckpt)",
         "upgrade rnnlm", "the file is damaged or the run diverged; use an earlier checkpoint")

# (what is damaged: keys from the checkpoint's top down; the new value, DELETE, or a function of the old one;
#  what the error line says)
DAMAGES = {
    "wrong-shape": (("state_dict", "net.decoder.weight"), lambda w: w[:, :-1],
                    "net.decoder.weight is (28, 31), expected (28, 32)"),
    "missing-weight": (("state_dict", "net.decoder.bias"), DELETE, "lack net.decoder.bias"),
    "unknown-weight": (("state_dict", "net.extra.weight"), torch.zeros(3), "include net.extra.weight, which"),
    "not-a-tensor": (("state_dict", "net.decoder.bias"), [0.0] * 28, "net.decoder.bias is a list, not a tensor"),
    "no-network": (("rnnlm", "network"), DELETE, "has no 'rnnlm.network' entry (the network's settings)"),
    "vocab-one-short": (("rnnlm", "vocab", "tokens"), lambda t: t[:-1],
                        "has 27 tokens, and its network was built for 28"),
    "vocab-repeats": (("rnnlm", "vocab", "tokens"), lambda t: t[:-1] + t[:1], "tokens must be unique"),
    "no-state-dict": (("state_dict",), DELETE, "has no weights (no 'state_dict' section)"),
    "no-format": (("rnnlm", "format"), DELETE, "has no 'rnnlm.format' entry"),
    "format-99": (("rnnlm", "format"), 99,
                  f"was written by a newer rnnlm (format 99, this one reads up to {CHECKPOINT_FORMAT}): upgrade rnnlm"),
    "nan-weight": (("state_dict", "net.decoder.bias"), lambda w: torch.full_like(w, math.nan),
                   "hold NaN or infinite values (net.decoder.bias): the file is damaged or the run diverged; "
                   "use an earlier checkpoint"),
    "inf-weight": (("state_dict", "net.embedding.weight"), lambda w: w.index_fill(0, torch.tensor(3), -math.inf),
                   "hold NaN or infinite values (net.embedding.weight)"),
    "hidden-size-abc": (("rnnlm", "network", "hidden_size"), "abc",
                        "are invalid (model.hidden_size=abc must be a positive integer (at most 16,777,216), or a "
                        "list"),
    "init-range-text": (("rnnlm", "network", "init_range"), "x", "model.init_range=x must be a positive number"),
    "carry-state-text": (("rnnlm", "carry_state"), "yes", "is 'yes', not true or false"),
    "iterate-shape": ((ITERATE_KEY,), {"net.decoder.bias": torch.zeros(5)},
                      "net.decoder.bias is (5,), the weights' (28,)"),
    "iterate-unknown": ((ITERATE_KEY,), {"net.extra": torch.zeros(5)}, "net.extra, which the weights lack"),
}


@pytest.fixture(scope="module")
def checkpoint(train_tiny) -> Path:
    return train_tiny(*TINY_RUN) / "checkpoints" / "last.ckpt"


def damage(checkpoint: Path, folder: Path, kind: str) -> Path:
    """A copy of ``checkpoint`` in ``folder`` with the damage ``DAMAGES[kind]``."""
    keys, change, _ = DAMAGES[kind]
    data = torch.load(checkpoint, weights_only=True)
    *parents, last = keys
    section = data
    for key in parents:
        section = section[key]
    if change is DELETE:
        del section[last]
    else:
        section[last] = change(section[last]) if callable(change) else change
    path = folder / f"{kind}.ckpt"
    torch.save(data, path)  # torch.save itself: write_checkpoint refuses non-finite weights
    return path


@pytest.mark.parametrize("kind", DAMAGES)
def test_every_damage_is_one_error_line_naming_the_file(kind, checkpoint, tmp_path, capsys):
    path = damage(checkpoint, tmp_path, kind)
    message = DAMAGES[kind][2]
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path, mmap=True)  # what resuming a run reads
    assert message in str(raised.value) and str(path) in str(raised.value) and str(raised.value).endswith(FIXES)
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(load_checkpoint)(path)  # what eval, generate and score read, and how they exit
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and str(path) in err


# Each command as a user runs it, on a checkpoint with one of the damages
COMMANDS = [
    ("generate", ["max_new_tokens=5"], "wrong-shape"),
    ("eval", [], "nan-weight"),
    ("score", ["text=the cat"], "vocab-one-short"),
]


def test_each_command_exits_2_with_one_error_line(checkpoint, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HYDRA_FULL_ERROR": ""}  # =1 would show tracebacks
    runs = {}
    for command, args, kind in COMMANDS:  # at once: each spends seconds importing torch
        path = damage(checkpoint, tmp_path, kind)
        runs[command, kind, path] = subprocess.Popen(
            [sys.executable, "-m", f"rnnlm.commands.{command}", f"ckpt_path={path}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for (command, kind, path), run in runs.items():
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, f"{command}: {stderr[-3000:]}"
        assert stderr.count("\n") == 1 and stderr.startswith("error: "), f"{command}: {stderr[-3000:]}"
        assert DAMAGES[kind][2] in stderr and str(path) in stderr


def test_resuming_a_damaged_checkpoint_is_refused_before_training(checkpoint, tmp_path, make_cfg):
    from rnnlm.resume import resume_config

    path = damage(checkpoint, tmp_path, "nan-weight")
    with pytest.raises(CheckpointError, match="hold NaN or infinite values"):
        resume_config(make_cfg(f"ckpt_path={path}"))


def test_what_training_writes_besides_the_network_passes(checkpoint, tmp_path):
    data = torch.load(checkpoint, weights_only=True)
    weights = data["state_dict"]
    data[ITERATE_KEY] = {name: weights[name] + 1 for name in list(weights)[:2]}  # NT-ASGD, once averaging
    weights[LEGACY_BEST_KEY] = torch.tensor(math.inf, dtype=torch.float64)  # rnnlm 0.1, before any validation
    for name in weights:
        weights[name] = weights[name].to(torch.bfloat16)  # trainer.precision=bf16-true
    data["rnnlm"]["world_size"] = 2
    check_checkpoint(data, tmp_path / "sound.ckpt")
    torch.save(data, tmp_path / "sound.ckpt")
    assert RecurrentLM.from_loaded(load_checkpoint(tmp_path / "sound.ckpt")).net.config.hidden_size == 32


@pytest.mark.parametrize("network", [
    dict(cell="gru", impl="scratch", reset_after=False),
    dict(cell="rnn", nonlinearity="relu", weight_drop=0.3, impl="scratch"),
    dict(cell="lstm", num_layers=3, hidden_size=[8, 12, 4], embedding_dim=4, tie_weights=True),
    dict(cell="examples.indrnn:IndRNN", num_layers=2, recurrent_max=0.5),
    dict(cell="mingru"),
    dict(cell="minlstm", impl="scratch", num_layers=2),
    dict(cell="lstm", bidirectional=True, embedding_dim=16, tie_weights=True),
    dict(cell="lstm", softmax="adaptive", adaptive_cutoffs=[5, 20], adaptive_div_value=2.0),
    dict(cell="gru", embedding_dim=None, projection_size=6),
])
def test_a_sound_checkpoint_of_every_network_kind_passes(network, tmp_path):
    vocab = Vocab("char", [f"t{i}" for i in range(40)])
    net = LanguageModel(NetworkConfig.from_settings({"hidden_size": 8, "embedding_dim": 4, **network}, len(vocab)))
    data = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    write_model_section(data, net.config, vocab, carry_state=True, world_size=1)
    assert data["rnnlm"]["format"] == WORD_CHAR_FORMAT  # older rnnlm reads it (a bpe vocabulary is written as 3)
    check_checkpoint(data, tmp_path / "kind.ckpt")
    data["state_dict"].popitem()
    with pytest.raises(CheckpointError, match="lack net."):
        check_checkpoint(data, tmp_path / "kind.ckpt")
