"""rnnlm-export: the ONNX one-step function gives, run by onnxruntime, the tokens and log-probabilities of rnnlm's own
greedy generation for every built-in cell; the safetensors weights load back into the same network; what cannot be
exported is refused in one line, leaving no file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime  # the export extra (make install installs it): pip install -e '.[export]'
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from helpers import REPO
from rnnlm.cells import BUILT_IN, RecurrentCell, uniform_parameter
from rnnlm.checkpoint import CheckpointError, load_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.export import export_model
from rnnlm.commands.generate import generate_texts
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens
from rnnlm.vocab import Vocab

# what a user runs: onnxruntime and numpy alone, neither torch nor rnnlm
_spec = importlib.util.spec_from_file_location("onnx_generate", REPO / "examples" / "onnx_generate.py")
onnx_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(onnx_generate)

CELLS = tuple(BUILT_IN)  # rnn, lstm, gru, mingru, minlstm
TRAINED = ("model.num_layers=2", "trainer.max_steps=10")  # a char model of two layers, a few steps into training
PROMPT, NEW_TOKENS = "the quick", 40
ATOL = 1e-4


def _config(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _export(ckpt: Path, *overrides: str) -> tuple[Path, dict]:
    return export_model(_config("export", f"ckpt_path={ckpt}", *overrides))


def _torch_log_probs(net: LanguageModel, ids: list[int]) -> list[torch.Tensor]:
    """The log-probabilities (V,) the network gives after each id of ``ids``, one step at a time."""
    state, out = None, []
    for token in ids:
        scores, state = net.step(torch.tensor([token]), state)
        out.append(scores[0] if net.adaptive else F.log_softmax(scores[0], -1))
    return out


# every built-in cell, in its default (fused) form, on characters; and a word model with the adaptive softmax
RUNS = {**{cell: (f"model={cell}",) for cell in CELLS},
        "lstm-word-adaptive": ("model=lstm", "data=word", "model.softmax=adaptive", "model.adaptive_cutoffs=[8,16]")}


@pytest.mark.parametrize("run", RUNS)
def test_onnx_greedy_generation_gives_the_tokens_of_rnnlm_generate(run, train_tiny, tmp_path):
    ckpt = train_tiny(*RUNS[run], *TRAINED) / "checkpoints" / "last.ckpt"
    path, description = _export(ckpt, f"output={tmp_path / 'model.onnx'}")
    session, meta = onnx_generate.load(str(path))
    assert meta == json.loads(json.dumps(description))  # the file describes itself: names, shapes, vocabulary
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in meta["inputs"]]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in meta["outputs"]]
    assert len(meta["inputs"]) == 1 + 2 * (2 if "model=lstm" in RUNS[run] else 1)  # tokens, h (and c) of 2 layers

    # the text rnnlm-generate greedy=true prints, from the exported file with onnxruntime and numpy alone
    generate = _config("generate", f"ckpt_path={ckpt}", "greedy=true", f"max_new_tokens={NEW_TOKENS}", "device=cpu")
    generate.prompt = PROMPT
    assert onnx_generate.continue_text(session, meta, PROMPT, NEW_TOKENS) == generate_texts(generate)[0]

    # token for token, and the log-probabilities each was picked from
    loaded = load_checkpoint(ckpt)
    ids = loaded.vocab.encode_text(PROMPT)
    expected = generate_tokens(loaded.net, torch.tensor([ids]), NEW_TOKENS, greedy=True)[0].tolist()
    got, log_probs = onnx_generate.greedy(session, meta, ids, NEW_TOKENS)
    assert got == expected
    reference = _torch_log_probs(loaded.net, ids + expected[:-1])[len(ids) - 1:]
    for step, (value, want) in enumerate(zip(log_probs, reference, strict=True)):
        assert torch.allclose(torch.from_numpy(value), want, atol=ATOL, rtol=ATOL), (run, step)


WORDS = Vocab("word", ["<unk>", "<eos>", *(f"w{i}" for i in range(58))])  # 60 ids, frequency order assumed
FORMS = {
    **{f"{cell}-scratch": NetworkConfig(len(WORDS), cell, 16, 24, 2, 0.0, impl="scratch") for cell in CELLS},
    "lstm-one-hot": NetworkConfig(len(WORDS), "lstm", None, 24, 2, 0.0),
    "lstm-projection-tied": NetworkConfig(len(WORDS), "lstm", 16, 32, 2, 0.0, projection_size=16, tie_weights=True),
    "gru-widths-adaptive": NetworkConfig(len(WORDS), "gru", 16, [24, 16], 2, 0.0, softmax="adaptive",
                                         adaptive_cutoffs=[10, 30]),
    "rnn-relu-tied": NetworkConfig(len(WORDS), "rnn", 24, 24, 3, 0.0, tie_weights=True,
                                   cell_settings={"nonlinearity": "relu"}),
    "gru-reset-before": NetworkConfig(len(WORDS), "gru", 16, 24, 2, 0.0, impl="scratch",
                                      cell_settings={"reset_after": False}),
}


@pytest.mark.slow  # an export each, 2-7 s: the cells' default forms are checked in the default suite above
@pytest.mark.parametrize("form", FORMS)
def test_every_form_and_option_steps_in_onnx_as_in_torch(form):
    """The scratch forms and the options that change the step (one-hot input, projection, tied and adaptive decoders,
    layers of different widths, relu, the reset-before GRU), untrained, several rows at once."""
    from rnnlm.exporting import describe, onnx_bytes, state_names

    torch.manual_seed(0)
    net = LanguageModel(FORMS[form]).eval()
    session = onnxruntime.InferenceSession(onnx_bytes(net, describe(net, WORDS, None, "onnx")))
    names = state_names(net)
    tokens = torch.tensor([0, 5, 17, 59, 2])
    state = net.backbone.zero_state(len(tokens), torch.zeros(1))
    for step in range(12):
        log_probs, *states = session.run(None, {"tokens": tokens.numpy(),
                                                **{n: t.numpy() for n, t in zip(names, _flat(state), strict=True)}})
        scores, state = net.step(tokens, state)
        expected = scores if net.adaptive else F.log_softmax(scores, -1)
        assert torch.allclose(torch.from_numpy(log_probs), expected, atol=ATOL, rtol=ATOL), (form, step)
        for got, want in zip(states, _flat(state), strict=True):
            assert torch.allclose(torch.from_numpy(got), want, atol=ATOL, rtol=ATOL), (form, step)
        tokens = torch.from_numpy(log_probs).argmax(-1)
        assert torch.equal(tokens, expected.argmax(-1)), (form, step)


def _flat(state) -> list[torch.Tensor]:
    return [tensor for cell in state for tensor in cell]


def test_safetensors_loads_back_into_the_same_network(train_tiny, tmp_path):
    from safetensors import safe_open

    from rnnlm.exporting import load_safetensors

    ckpt = train_tiny("model=lstm", *TRAINED) / "checkpoints" / "last.ckpt"
    path, description = _export(ckpt, "format=safetensors", f"output={tmp_path / 'model.safetensors'}")
    loaded, exported = load_checkpoint(ckpt), load_safetensors(path)
    assert exported.description == json.loads(json.dumps(description))
    assert exported.description["network"] == loaded.net.config.settings()
    assert exported.vocab == loaded.vocab and exported.net.config == loaded.net.config
    with safe_open(path, framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(loaded.net.state_dict())
    tokens = torch.randint(len(loaded.vocab), (3, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported.net(tokens)[0], loaded.net(tokens)[0])
    # given to generate, score or inspect, it is named for what it is, with the file to give instead
    with pytest.raises(CheckpointError, match=r"model.safetensors is an rnnlm-export file, not a checkpoint: give the "
                                              r"\.ckpt it was exported from"):
        load_checkpoint(path)


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    from rnnlm.exporting import describe, load_safetensors, safetensors_bytes

    net = LanguageModel(NetworkConfig(len(WORDS), "lstm", 24, 24, 2, 0.0, tie_weights=True)).eval()
    path = tmp_path / "tied.safetensors"
    path.write_bytes(safetensors_bytes(net, describe(net, WORDS, None, "safetensors")))
    exported = load_safetensors(path)
    assert exported.description["tied"] == {"decoder.weight": "embedding.weight"}
    assert exported.net.decoder.weight is exported.net.embedding.weight  # one parameter, as trained
    tokens = torch.randint(len(WORDS), (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported.net(tokens)[0], net(tokens)[0])


def test_a_bidirectional_model_exports_its_weights_but_no_onnx(train_tiny, tmp_path):
    from rnnlm.errors import ExportError
    from rnnlm.exporting import load_safetensors

    ckpt = train_tiny("task=bilm", "model.bidirectional=true") / "checkpoints" / "last.ckpt"
    with pytest.raises(ExportError, match="is a bidirectional model: .* no one-step function"):
        _export(ckpt, f"output={tmp_path / 'bilm.onnx'}")
    assert list(tmp_path.iterdir()) == []
    path, _ = _export(ckpt, "format=safetensors", f"output={tmp_path / 'bilm.safetensors'}")
    tokens = torch.randint(10, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_safetensors(path).net(tokens)[0], load_checkpoint(ckpt).net(tokens)[0])


class Branchy(RecurrentCell):
    """A user's cell whose step branches on a value: no graph holds that branch."""

    def __init__(self, input_size, hidden_size):
        super().__init__(input_size, hidden_size)
        self.W = uniform_parameter(hidden_size, input_size + hidden_size, hidden_size=hidden_size)

    def step(self, x, state):
        h = torch.tanh(torch.cat([x, state[0]], -1) @ self.W.t())
        h = -h if h.sum() > 0 else h
        return h, (h,)


def test_a_cell_that_cannot_be_traced_is_refused_in_one_line():
    from rnnlm.errors import ExportError
    from rnnlm.exporting import describe, onnx_bytes

    net = LanguageModel(NetworkConfig(len(WORDS), f"{__name__}:Branchy", 8, 12, 1, 0.0)).eval()
    with pytest.raises(ExportError) as refused:
        onnx_bytes(net, describe(net, WORDS, None, "onnx"))
    assert f"model.cell={__name__}:Branchy cannot be exported as ONNX (" in str(refused.value)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("format=safetensors exports its weights")


class OnesStart(Branchy):
    """A user's cell that starts a text from ones, which a program given the ONNX file would not know."""

    def zero_state(self, batch, like):
        return (like.new_ones(batch, self.hidden_size),)


def test_a_cell_that_starts_from_another_state_than_zeros_is_refused():
    from rnnlm.exporting import export_problem

    net = LanguageModel(NetworkConfig(len(WORDS), f"{__name__}:OnesStart", 8, 12, 1, 0.0))
    assert "starts a text from a state other than zeros" in export_problem(net, "onnx", "x.ckpt")
    assert export_problem(net, "safetensors", "x.ckpt") is None


def test_mistakes_are_refused_in_one_line_before_any_file_is_written(train_tiny, tmp_path, monkeypatch):
    from rnnlm.commands.cli import check_command_line
    from rnnlm.errors import UserError

    ckpt = train_tiny("model=lstm", *TRAINED) / "checkpoints" / "last.ckpt"
    beside = sorted(ckpt.parent.iterdir())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.onnx").write_text("mine")
    cases = {  # arguments: what the one line says
        (f"ckpt_path={tmp_path / 'missing.ckpt'}",): "does not exist",
        (f"ckpt_path={ckpt}", "format=tflite"): "format=tflite must be one of onnx|safetensors",
        (f"ckpt_path={ckpt}", "output=/proc/rnnlm.onnx"): "output=/proc/rnnlm.onnx",  # root may write anywhere else
        (f"ckpt_path={ckpt}", "output=taken.onnx"): "output=taken.onnx already exists",
        (f"ckpt_path={ckpt}", "output=model.ckpt"): "is a checkpoint's name or file",
        (f"ckpt_path={ckpt}", "output=x.safetensors"): "is named as a safetensors file, and format=onnx",
        (f"ckpt_path={ckpt}", "output=no/such/folder/m.onnx"): "the folder no/such/folder does not exist",
        (f"ckpt_path={ckpt}", "+opset=17"): "opset is not a setting of rnnlm-export",
    }
    for args, message in cases.items():
        with pytest.raises(UserError) as refused:
            check_command_line("export", list(args))  # what the command checks first, then what it does
            export_model(_config("export", *args))
        assert message in str(refused.value) and "\n" not in str(refused.value), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"] and (tmp_path / "taken.onnx").read_text() \
        == "mine"
    assert sorted(ckpt.parent.iterdir()) == beside


def _run(*code_or_args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HYDRA_FULL_ERROR": "", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, *code_or_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=env)


WITHOUT = "import sys; sys.modules.update(dict.fromkeys(['onnx', 'onnxscript', 'onnxruntime', 'safetensors']));"


def test_the_command_line_exits_2_with_one_line_and_leaves_no_file(train_tiny, tmp_path):
    """As a user runs it: a bidirectional model, a bad value, and the export extra not installed (rnnlm still
    imports, and the command names what to install)."""
    ckpt = train_tiny("model=lstm", *TRAINED) / "checkpoints" / "last.ckpt"
    bilm = train_tiny("task=bilm", "model.bidirectional=true") / "checkpoints" / "last.ckpt"
    beside = {folder: sorted(folder.iterdir()) for folder in (ckpt.parent, bilm.parent)}
    script = str(REPO / "src" / "export.py")
    runs = {  # at once: each spends seconds importing torch
        "is a bidirectional model: it predicts each token from both sides": _run(script, f"ckpt_path={bilm}",
                                                                                 cwd=tmp_path),
        "format=tflite must be one of onnx|safetensors": _run(script, f"ckpt_path={ckpt}", "format=tflite",
                                                               cwd=tmp_path),
        "format=onnx needs onnx, onnxscript, onnxruntime, which are not installed: pip install 'rnnlm[export]'": _run(
            "-c", f"{WITHOUT} sys.argv = ['rnnlm-export', 'ckpt_path={ckpt}', 'output=m.onnx']; "
            "import rnnlm.commands.export, rnnlm.exporting; rnnlm.commands.export.main()", cwd=tmp_path),
    }
    for message, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 2, (message, stderr[-3000:])
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
        assert stdout == "", message
    assert list(tmp_path.iterdir()) == []
    assert {folder: sorted(folder.iterdir()) for folder in beside} == beside


def test_the_command_line_writes_beside_the_checkpoint(train_tiny, tmp_path):
    run = train_tiny("model=gru", *TRAINED)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    result = _run(str(REPO / "src" / "export.py"), f"ckpt_path={ckpt}", cwd=tmp_path)
    path, _ = _export(ckpt, "format=safetensors")  # meanwhile
    stdout, stderr = result.communicate(timeout=300)
    assert result.returncode == 0 and stderr == "", stderr[-3000:]
    assert stdout.startswith(f"{tmp_path / 'last.onnx'} (onnx, ")
    # the ONNX signature, for the program that will run it
    assert stdout.splitlines()[1].startswith(
        "tokens (batch,), state_l0_h (batch, 32), state_l1_h (batch, 32) -> log_probs (batch, ")
    assert path == tmp_path / "last.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.onnx", "last.safetensors"]


def test_the_command_imports_neither_lightning_nor_the_extra_before_it_writes():
    heavy = ("lightning", "onnx", "onnxscript", "onnxruntime", "safetensors")
    code = f"import sys, rnnlm.commands.export; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
