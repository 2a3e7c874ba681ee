"""Where inference runs: generate, eval and score put the network and everything it reads on the device asked
for (``device=auto|cpu|cuda|cuda:N``; auto is a GPU when there is one), 16-bit checkpoints load and run,
and a device that cannot be used costs one line. On the CPU; tests/test_gpu.py runs the same on a GPU."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO
from rnnlm.checkpoint import load_checkpoint
from rnnlm.checks import ConfigError, check_train_config, cpu_runs_in_bf16
from rnnlm.commands import eval as eval_command
from rnnlm.commands import generate as generate_command
from rnnlm.commands import score as score_command
from rnnlm.commands.cli import CONF_DIR, pick_device
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import sentence_logprobs

TINY_RUN = ("test=false", "logger=csv")


@pytest.fixture(scope="module")
def ckpt(train_tiny):
    return train_tiny(*TINY_RUN) / "checkpoints" / "last.ckpt"


def _config(name: str, *overrides: str, shared_data=None, cache_dir=None):
    paths = [f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}"] if shared_data else []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*paths, *overrides])


def _placement(net: torch.nn.Module) -> set[tuple[str, torch.dtype]]:
    return {(t.device.type, t.dtype) for t in [*net.parameters(), *net.buffers()]}


def test_a_loaded_network_is_on_the_device_asked_for(ckpt):
    for device in ("cpu", torch.device("cpu")):
        loaded = load_checkpoint(ckpt, map_location=device)
        assert _placement(loaded.net) == {("cpu", torch.float32)} and not loaded.net.training
    # The network moves as it would to a GPU (before the fix it stayed where it was built, on the CPU) ...
    loaded = load_checkpoint(ckpt, map_location="meta")
    assert _placement(loaded.net) == {("meta", torch.float32)}
    # ... and generation runs there: the prompt, the stepper's weights and the carried state all on it
    new = generate_tokens(loaded.net, torch.zeros(3, 2, dtype=torch.long, device="meta"), 5, greedy=True)
    assert new.shape == (3, 5) and new.device.type == "meta"
    assert {w.device.type for w in loaded.net.parameters()} == {"meta"}
    # the rest of the training checkpoint (the optimizer's state, the module's weights) stays off the device
    assert {v.device.type for v in loaded.state_dict.values()} == {"cpu"}


def test_auto_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolved only: nothing is moved
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")  # the CPU on a GPU machine, when asked for
    with pytest.raises(ConfigError, match="device=meta is not supported: use auto, cpu, cuda or cuda:N"):
        pick_device("meta")


@pytest.mark.parametrize("device,expected", [("auto", "cuda"), ("cuda:1", "cuda:1"), ("cpu", "cpu")])
def test_each_command_puts_the_model_on_the_device_asked_for(device, expected, ckpt, monkeypatch, capsys,
                                                             shared_data, cache_dir):
    """On a (pretended) two-GPU machine: the device reaches the model; the work itself is done on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = []

    def load_on_cpu(path, map_location="cpu"):
        asked.append(torch.device(map_location))
        return load_checkpoint(path, "cpu")

    monkeypatch.setattr(generate_command, "load_checkpoint", load_on_cpu)
    monkeypatch.setattr(score_command, "load_checkpoint", load_on_cpu)
    monkeypatch.setattr(eval_command, "load_checkpoint", load_on_cpu)
    [text] = generate_texts(_config("generate", f"ckpt_path={ckpt}", "prompt=the", "max_new_tokens=4",
                                    f"device={device}"))
    assert len(text) == 3 + 4
    score_command._hydra_main(_config("score", f"ckpt_path={ckpt}", "text=the quick ___", "candidates=[fox,dog]",
                                     f"device={device}"))
    assert "fox" in capsys.readouterr().out
    # eval reads the split where the network is (cuda:1 is GPU 1, not "one GPU", the first)
    result = evaluate(_config("eval", f"ckpt_path={ckpt}", "split=valid", f"device={device}",
                              shared_data=shared_data, cache_dir=cache_dir))
    assert result["tokens"] > 0
    assert asked == [torch.device(expected)] * 3


def test_16_bit_checkpoints_load_in_float32_and_run(train_tiny, tmp_path, shared_data, cache_dir):
    # bf16-mixed training where this CPU can run the LSTM in bfloat16; the 16-bit weights below are loaded either way
    precision = "bf16-mixed" if cpu_runs_in_bf16("lstm", "fused", "bf16-mixed") else "32-true"
    mixed = train_tiny(*TINY_RUN, f"trainer.precision={precision}") / "checkpoints" / "last.ckpt"
    raw = torch.load(mixed, weights_only=True)
    assert {v.dtype for v in raw["state_dict"].values()} == {torch.float32}  # mixed precision keeps float32 weights
    half = tmp_path / "bf16-weights.ckpt"  # as trainer.precision=bf16-true saves them
    raw["state_dict"] = {k: v.to(torch.bfloat16) for k, v in raw["state_dict"].items()}
    torch.save(raw, half)
    for path in (mixed, half):
        loaded = load_checkpoint(path, "cpu")
        assert _placement(loaded.net) == {("cpu", torch.float32)}
        [text] = generate_texts(_config("generate", f"ckpt_path={path}", "prompt=the", "max_new_tokens=8",
                                        "greedy=true", "device=cpu"))
        assert text.startswith("the") and len(text) == 3 + 8
        [(logprob, tokens)] = sentence_logprobs(loaded.net, loaded.vocab, ["the quick brown fox"])
        assert tokens == 20 and -100 < logprob < 0
    result = evaluate(_config("eval", f"ckpt_path={half}", "split=valid", "device=cpu", shared_data=shared_data,
                              cache_dir=cache_dir))  # eval reads them too
    assert 0 < result["loss"] < 10


def test_a_device_that_cannot_be_used_is_one_error_line(ckpt, tmp_path, capsys, monkeypatch):
    result = subprocess.run([sys.executable, str(REPO / "src" / "generate.py"), f"ckpt_path={ckpt}", "device=gpu"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["error: device=gpu must be auto, cpu, cuda, cuda:N or mps"]
    # the other commands, in this process, through the same one-line exit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command, name, args in [(score_command, "score", ["text=the fox"]),
                                (eval_command, "eval", [f"output={tmp_path / 'metrics.json'}"])]:
        with pytest.raises(SystemExit) as exit_:
            command._hydra_main(_config(name, f"ckpt_path={ckpt}", "device=cuda", *args))
        assert exit_.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line == "error: device=cuda but no GPU is available: use device=cpu or device=auto"
    with pytest.raises(ConfigError, match="device=meta"):
        evaluate(_config("eval", f"ckpt_path={ckpt}", "device=meta"))


def test_bf16_on_a_cpu_that_cannot_run_the_lstm_in_it_is_refused_up_front(make_cfg, monkeypatch):
    monkeypatch.setattr("rnnlm.checks.cpu_runs_in_bf16", lambda cell, impl, precision: cell != "lstm")
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed: this CPU cannot run model.cell=lstm "
                                          r"\(model.impl=fused\) in bfloat16 .*use trainer.precision=32-true, or "
                                          "another model.impl"):
        check_train_config(make_cfg("trainer.precision=bf16-mixed"))
    check_train_config(make_cfg("trainer.precision=bf16-mixed", "model=gru"))


@pytest.mark.parametrize("cell,impl", [("lstm", "scratch"), ("gru", "fused"), ("mingru", "fused")])
def test_the_bf16_probe_runs_the_cell_itself(cell, impl):
    assert cpu_runs_in_bf16(cell, impl, "bf16-mixed") and cpu_runs_in_bf16(cell, impl, "bf16-true")
