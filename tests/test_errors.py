"""A user's mistake costs one line and exit status 2, before any work; outputs never replace a checkpoint
or a file the command did not create."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO, compose_train
from rnnlm.checks import ConfigError, check_model_memory, check_train_config, count_parameters
from rnnlm.commands.cli import CONF_DIR, check_command_line, check_output, pick_device
from rnnlm.commands.generate import read_prompt
from rnnlm.commands.train import train
from rnnlm.network import LanguageModel, NetworkConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data, cache_dir) -> Path:
    """A few steps of a tiny char model: a real checkpoint to point commands at."""
    root = tmp_path_factory.mktemp("errors")
    corpus = root / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    run = root / "run"
    train(compose_train([f"data.path={corpus}", "test=false", "logger=csv"], run, shared_data, cache_dir))
    return run / "checkpoints" / "last.ckpt"


def _cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "config,argv,message",
    [
        ("train", ["model.hidden_sise=10"],
         "model.hidden_sise is not a setting of rnnlm-train: did you mean model.hidden_size"),
        ("train", ["model=foo"], "model=foo is not a choice: use one of gru, lstm, mingru, minlstm, rnn"),
        ("train", ["trainer=tpu"], "trainer=tpu is not a choice: use one of cpu, ddp, default, gpu"),
        ("train", ["model=rnn,lstm"], "model=rnn,lstm is a sweep: add -m"),
        ("train", ["-m", "model=rnn,foo"], "model=foo is not a choice"),  # every value of a sweep is checked
        ("train", ["-m", "model.hidden_sise=16,32"], "model.hidden_sise is not a setting"),
        ("train", ["--cfg", "job", "data=bytes"], "data=bytes is not a choice: use one of bpe, char, recall, word"),
        ("train", ["model.hidden_size=[1"], "cannot read the override 'model.hidden_size=[1'"),
        ("train", ["hydra.run.dir=/proc/rnnlm-run"], "cannot create the run folder /proc/rnnlm-run in /proc"),
        ("eval", ["ckpt=x.ckpt"], "ckpt is not a setting"),
        ("eval", ["paths.log_dir=/proc/rnnlm-outputs", "ckpt_path=x"], "cannot create the run folder"),
        ("generate", ["temprature=2"], "temprature is not a setting"),
        ("score", ["canditates=[a,b]"], "canditates is not a setting"),
    ],
)
def test_command_line_mistakes_are_one_line(config, argv, message):
    with pytest.raises(ConfigError) as caught:
        check_command_line(config, argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "config,argv",
    [("train", ["-m", "model=rnn,gru", "model.hidden_size=16,0"]), ("train", ["hparams_search=optuna"]),
     ("train", ["--help"]), ("train", ["--cfg", "job", "model=gru"]), ("train", ["+trainer.max_time=00:00:01:00"]),
     ("generate", ["ckpt_path=x", "prompt='a, b'"]), ("generate", ["hydra.run.dir=/proc"])],
)
def test_good_command_lines_pass(config, argv):
    # a bad value (hidden_size=0) is the sweep job's to report; generate writes no run folder
    check_command_line(config, argv)


def test_hydra_errors_end_in_one_line_from_the_commands(checkpoint, tmp_path):
    line = _one_error_line(_cli("train.py", "model.hidden_sise=10", cwd=tmp_path))
    assert line.startswith("error: model.hidden_sise is not a setting of rnnlm-train: did you mean model.hidden_size")
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder
    _one_error_line(_cli("generate.py", f"ckpt_path={checkpoint}", "seed=abc"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=_recurrent", "model.cell is not set (model=_recurrent is the base the model files share): "
                             "use model=rnn|lstm|gru"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be a positive number"),
        ("optimizer.lr=nan", "optimizer.lr=nan must be a positive number"),
        ("seed=abc", "seed=abc must be an integer"),
        ("model.hidden_size=1000000", "the recurrent layers alone (model.embedding_dim=16, model.hidden_size=1000000, "
                                     "model.num_layers=1) would need about"),
        ("trainer.enable_progress_bar=false", "also remove the callback with ~callbacks.progress_bar"),
    ],
)
def test_train_settings_are_checked_up_front(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        check_train_config(make_cfg(override))


def test_a_gpu_trainer_without_a_gpu_is_refused(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cfg in (make_cfg("trainer=gpu", tiny=False), make_cfg("trainer.accelerator=cuda")):
        with pytest.raises(ConfigError, match="no GPU is available: use trainer=cpu, or trainer=default"):
            check_train_config(cfg)
    with pytest.raises(ConfigError, match="device=cuda but no GPU is available: use device=cpu or device=auto"):
        pick_device("cuda")


@pytest.mark.parametrize(
    "overrides",
    [["model=rnn"], ["model=lstm", "model.num_layers=3"], ["model=gru", "model.embedding_dim=null"],
     ["model.embedding_dim=32", "model.tie_weights=true"], ["task=bilm", "model.bidirectional=true"],
     ["model=gru", "model.impl=scratch", "model.reset_after=false"],
     ["model.softmax=adaptive", "model.adaptive_cutoffs=[10,30]", "model.adaptive_div_value=2"],
     ["model=mingru"], ["model=minlstm", "model.impl=scratch", "model.num_layers=2"],
     ["model.hidden_size=48", "model.embedding_dim=16", "model.projection_size=16", "model.tie_weights=true"]],
)
def test_parameter_count_matches_the_built_model(make_cfg, overrides):
    model = make_cfg(*overrides).model
    built = LanguageModel(NetworkConfig.from_settings(model, vocab_size=57)).num_parameters()
    assert count_parameters(model, 57) == built  # counted on the same network, built on the meta device


def test_a_model_too_large_for_the_memory_is_refused(make_cfg):
    cfg = make_cfg("data=word", "model.hidden_size=1000", "model.embedding_dim=1000", "trainer.accelerator=cpu")
    check_model_memory(cfg, 10_000)
    with pytest.raises(ConfigError, match=r"10,000,000,000 tokens\) would need about .* GiB .* but this machine has"):
        check_model_memory(cfg, 10**10)


def test_an_output_never_replaces_a_checkpoint_or_a_file_it_did_not_make(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="is a checkpoint's name or file, which is never written over"):
        check_output(checkpoint, overwrite=True)
    renamed = tmp_path / "weights.pt"  # a checkpoint by its content, whatever its name
    renamed.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ConfigError, match="never written over"):
        check_output(renamed, overwrite=True)
    with pytest.raises(ConfigError, match="never written over"):
        check_output(tmp_path / "new.ckpt", overwrite=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(ConfigError, match="already exists: give another file name, or add overwrite=true"):
        check_output(notes, overwrite=False)
    assert check_output(notes, overwrite=True) == notes
    assert check_output(tmp_path / "new.txt", overwrite=False) == tmp_path / "new.txt"
    with pytest.raises(ConfigError, match="is a folder: give a file name in it"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="the folder .*missing does not exist: create it"):
        check_output(tmp_path / "missing" / "out.txt", overwrite=False)


def test_generate_and_eval_refuse_to_write_over_a_checkpoint(checkpoint, tmp_path):
    before = checkpoint.read_bytes()
    line = _one_error_line(_cli("generate.py", f"ckpt_path={checkpoint}", f"output={checkpoint}",
                                "max_new_tokens=5"))
    assert "never written over" in line
    other = tmp_path / "other.ckpt"
    other.write_bytes(before)
    line = _one_error_line(_cli("eval.py", f"ckpt_path={checkpoint}", f"output={other}",
                                f"hydra.run.dir={tmp_path / 'eval'}"))
    assert "never written over" in line
    assert checkpoint.read_bytes() == before and other.read_bytes() == before


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path):
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["ckpt_path=x.ckpt", f"prompt_file={latin1}"])
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\): convert it, e.g. iconv"):
        read_prompt(cfg)

