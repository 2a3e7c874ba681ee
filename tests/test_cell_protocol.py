"""The cell protocol: one table of built-in cells, nothing else that knows a cell by name, and a user's cell
(``examples/indrnn.py``, and one written here in a scratch folder) that trains, resumes, generates, scores and
evaluates like a built-in one, with its own settings checked up front and stored in the checkpoint."""

import ast
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY
from rnnlm.cells import BUILT_IN, RecurrentCell, cell_class
from rnnlm.checkpoint import load_checkpoint
from rnnlm.errors import ConfigError
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import rank_candidates

INDRNN = "examples.indrnn:IndRNN"


def _names_a_cell(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in BUILT_IN


def test_nothing_outside_the_cells_branches_on_a_cell_name():
    """No comparison, table key or lookup by a built-in cell's name outside ``rnnlm/cells/`` (a default value, or
    the LSTM that budgets are measured against, is not a branch)."""
    found = []
    for path in (REPO / "src" / "rnnlm").rglob("*.py"):
        if path.parent.name == "cells":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            branches = (
                (isinstance(node, ast.Compare) and any(map(_names_a_cell, [node.left, *node.comparators])))
                or (isinstance(node, ast.Dict) and any(_names_a_cell(k) for k in node.keys if k is not None))
                or (isinstance(node, ast.Subscript) and _names_a_cell(node.slice))
                or (isinstance(node, ast.Tuple | ast.List | ast.Set) and sum(map(_names_a_cell, node.elts)) > 1)
            )
            if branches:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


def test_an_unknown_name_is_refused_listing_the_cells_and_the_class_path_form():
    with pytest.raises(ConfigError, match=r"model.cell=lstn is not a cell: use one of rnn\|lstm\|gru\|mingru\|minlstm, "
                                          r"or a class path module:Class"):
        NetworkConfig(10, "lstn")


class StepOnly(RecurrentCell):
    """``h_t = tanh(W [x_t; h_{t-1}])``: only ``step``; the sequence call is the protocol's loop over it."""

    def __init__(self, input_size, hidden_size):
        super().__init__(input_size, hidden_size)
        self.W = torch.nn.Linear(input_size + hidden_size, hidden_size)

    def step(self, x, state):
        h = torch.tanh(self.W(torch.cat([x, state[0]], -1)))
        return h, (h,)


class ForwardOnly(StepOnly):
    """The same equations as one ``forward``: one step is the protocol's sequence call over one step."""

    step = RecurrentCell.step

    def forward(self, x, state):
        outputs, (h,) = [], state
        for x_t in x.unbind(1):
            h = torch.tanh(self.W(torch.cat([x_t, h], -1)))
            outputs.append(h)
        return torch.stack(outputs, 1), (h,)


def test_a_cell_needs_only_forward_or_only_step():
    torch.manual_seed(0)
    stepper, looper = StepOnly(3, 5), ForwardOnly(3, 5)
    looper.load_state_dict(stepper.state_dict())
    x = torch.randn(2, 7, 3)
    state = stepper.zero_state(2, x)
    assert len(state) == 1 and state[0].shape == (2, 5) and not state[0].any()
    for a, b in zip(stepper(x, state), looper(x, state), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(stepper.step(x[:, 0], state), looper.step(x[:, 0], state), strict=True):
        torch.testing.assert_close(a, b)


def test_classes_that_are_not_cells_are_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "notcells.py").write_text(textwrap.dedent("""
        from rnnlm.cells import RecurrentCell
        from rnnlm.schema import number

        class Neither(RecurrentCell):
            pass

        class NoDefault(RecurrentCell):
            settings = {"alpha": number(0, 1)}

            def __init__(self, input_size, hidden_size, alpha):
                super().__init__(input_size, hidden_size)

            def step(self, x, state):
                return state[0], state
    """))
    (tmp_path / "brokencell.py").write_text("raise RuntimeError('an error at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, message in [("notcells:Neither", "defines neither forward(x, state) nor step(x, state)"),
                          ("notcells:NoDefault", "declares 'alpha', which must be a keyword argument of __init__ "
                                                 "with a default"),
                          ("notcells:Missing", "module notcells has no 'Missing'"),
                          ("brokencell.Cell", "cannot be imported (RuntimeError: an error at import): fix the "
                                              "module brokencell")]:
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            cell_class(name)
        assert "\n" not in str(caught.value) and f"model.cell={name}" in str(caught.value)


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # examples/ is importable from the repository's folder


def test_a_users_cell_builds_steps_and_counts_its_own_parameters(on_path):
    torch.manual_seed(0)
    config = NetworkConfig.from_settings({"cell": INDRNN, "recurrent_max": 0.5, "embedding_dim": 6,
                                          "hidden_size": [8, 6], "num_layers": 2, "tie_weights": True,
                                          "weight_drop": 0.3, "dropout": 0.0}, vocab_size=11)
    assert config.cell_settings == {"recurrent_max": 0.5} and config.settings()["recurrent_max"] == 0.5
    net = LanguageModel(config).eval()
    # W (H, I) + b + u per layer, the embedding (tied decoder) and the decoder's bias
    assert net.num_parameters() == (8 * 6 + 8 + 8) + (6 * 8 + 6 + 6) + 11 * 6 + 11
    tokens = torch.randint(0, 11, (3, 9))
    logits, state = net(tokens)
    assert [tuple(h.shape) for h, in state] == [(3, 8), (3, 6)]
    steps, carried = [], None
    for token in tokens.unbind(1):
        step_logits, carried = net.step(token, carried)
        steps.append(step_logits)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-5, atol=1e-6)
    net.train()
    torch.manual_seed(1)
    first = net(tokens)[0]
    assert not torch.equal(first, net(tokens)[0])  # weight drop draws a new mask each call
    ranked = rank_candidates(net.eval(), _vocab(11), "t1 t2 ___ t4", ["t3", "t5"])
    assert sorted(c for c, _, _ in ranked) == ["t3", "t5"]
    assert generate_tokens(net, tokens[:, :2], 5, greedy=True).shape == (3, 5)


def _vocab(size: int):
    from rnnlm.vocab import Vocab

    return Vocab("word", ["<unk>", "<eos>", *(f"t{i}" for i in range(size - 2))])


def test_a_settings_feature_the_cell_lacks_is_refused(on_path):
    with pytest.raises(ConfigError, match="model.weight_drop=0.5: model.cell=mingru does not support weight drop"):
        NetworkConfig(10, "mingru", weight_drop=0.5)
    with pytest.raises(ConfigError, match=r"model.recurrent_max=0 must be a positive number"):
        NetworkConfig.from_settings({"cell": INDRNN, "recurrent_max": 0}, vocab_size=10)


def _cli(script: str, *args: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


# The minimal gated unit (Zhou et al. 2016, arXiv 1603.09420), in a file of its own outside the repository,
# with one step only: what a user writes following docs/cells.md.
MGU = '''
import torch
from rnnlm.cells import RecurrentCell, uniform_parameter
from rnnlm.schema import flag


class MGU(RecurrentCell):
    """f = σ(W_f [x, h] + b_f);  h̃ = tanh(W_h [x, f∘h] + b_h);  h' = (1 - f)∘h + f∘h̃"""

    settings = {"bias_open": flag()}
    gate_names = ("forget",)

    def __init__(self, input_size, hidden_size, bias_open=False):
        super().__init__(input_size, hidden_size)
        self.W_f = uniform_parameter(hidden_size, input_size + hidden_size, hidden_size=hidden_size)
        self.W_h = uniform_parameter(hidden_size, input_size + hidden_size, hidden_size=hidden_size)
        self.b_f = torch.nn.Parameter(torch.full((hidden_size,), 1.0 if bias_open else 0.0))
        self.b_h = torch.nn.Parameter(torch.zeros(hidden_size))

    def gates(self, x, state):
        return {"forget": torch.sigmoid(torch.cat([x, state[0]], -1) @ self.W_f.t() + self.b_f)}

    def step(self, x, state):
        h = state[0]
        f = self.gates(x, state)["forget"]
        candidate = torch.tanh(torch.cat([x, f * h], -1) @ self.W_h.t() + self.b_h)
        h = (1 - f) * h + f * candidate
        return h, (h,)
'''


def test_a_cell_from_a_scratch_folder_trains_resumes_generates_and_evaluates(tmp_path, tiny_corpus, shared_data,
                                                                               cache_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mgu.py").write_text(MGU)
    run = tmp_path / "run"
    common = (*TINY, f"data.path={tiny_corpus}", f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}",
              "test=false", "~callbacks.progress_bar", "logger=csv")
    first = _cli("train.py", "model.cell=mgu:MGU", "model.bias_open=true", "model.num_layers=2",
                 "callbacks=diagnostics", "callbacks.gradient_flow.every_n_steps=2", *common,
                 "trainer.max_steps=4", f"hydra.run.dir={run}", cwd=folder)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain data and tensors only
    assert saved["rnnlm"]["network"]["cell"] == "mgu:MGU" and saved["rnnlm"]["network"]["bias_open"] is True
    assert (run / "gradient_flow.csv").is_file()
    resumed = _cli("train.py", f"ckpt_path={ckpt}", "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'run2'}",
                   cwd=folder)  # the checkpoint alone (and where to write)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = tmp_path / "run2" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6
    generated = _cli("generate.py", f"ckpt_path={ckpt}", "prompt=the", "max_new_tokens=8", "device=cpu", cwd=folder)
    assert generated.returncode == 0 and generated.stdout.startswith("the"), generated.stderr[-3000:]
    evaluated = _cli("eval.py", f"ckpt_path={ckpt}", "split=valid", "device=cpu", f"paths.data_dir={shared_data}",
                     f"paths.cache_dir={cache_dir}", cwd=folder)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = _cli("score.py", f"ckpt_path={ckpt}", "text=the quick", "device=cpu", cwd=folder)
    assert scored.returncode == 0, scored.stderr[-3000:]
    # elsewhere, without the module on the path: one line that names the class and what to do
    lost = _cli("eval.py", f"ckpt_path={ckpt}", "device=cpu", cwd=tmp_path)
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1, lost.stderr
    assert "model.cell=mgu:MGU cannot be imported" in lost.stderr and "PYTHONPATH" in lost.stderr
    # the class changed since: its weights no longer fit, said in one line
    (folder / "mgu.py").write_text(MGU.replace("input_size + hidden_size, hidden_size=hidden_size)\n        self.b_f",
                                               "input_size, hidden_size=hidden_size)\n        self.b_f"))
    changed = _cli("generate.py", f"ckpt_path={ckpt}", "prompt=the", cwd=folder)
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert "do not fit" in changed.stderr and "the class model.cell=mgu:MGU changed since training" in changed.stderr
    (folder / "mgu.py").write_text(MGU.replace("super().__init__(input_size, hidden_size)",
                                               "super().__init__(input_size, hidden_size)\n        1 / 0"))
    broken = _cli("eval.py", f"ckpt_path={ckpt}", cwd=folder)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1, broken.stderr
    assert "model.cell=mgu:MGU fails to build with the settings saved in the checkpoint (ZeroDivisionError" \
        in broken.stderr


def test_the_example_cell_trains_and_resumes_through_the_real_config(make_cfg, tiny_corpus, tmp_path, on_path):
    from rnnlm.commands.train import train
    from rnnlm.resume import resume_config

    run = tmp_path / "a"
    settings = (f"data.path={tiny_corpus}", f"model.cell={INDRNN}", "++model.recurrent_max=0.9", "test=false",
                "model.weight_drop=0.2")
    metrics = train(make_cfg(*settings, "trainer.max_steps=3", run_dir=run))
    assert math.isfinite(metrics["val/loss"])
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert loaded.net.config.cell_settings == {"recurrent_max": 0.9}
    assert type(loaded.net.backbone.cells[0]).__name__ == "IndRNN"
    resumed = resume_config(make_cfg(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=5",
                                     run_dir=tmp_path / "b"), ["trainer.max_steps=5"])
    assert resumed.model.cell == INDRNN and resumed.model.recurrent_max == 0.9
    train(resumed)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt").info["global_step"] == 5


@pytest.mark.slow
def test_the_example_cell_trains_on_two_ddp_processes(tmp_path, tiny_corpus, cache_dir):
    run = tmp_path / "run"
    result = _cli("train.py", f"model.cell={INDRNN}", "model.recurrent_max=0.7", "trainer=ddp",
                  "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", f"data.path={tiny_corpus}",
                  f"paths.cache_dir={cache_dir}", "model.hidden_size=16", "model.embedding_dim=8", "data.seq_len=8",
                  "data.batch_size=4", "trainer.max_steps=4", "test=false", f"hydra.run.dir={run}",
                  "~callbacks.progress_bar", cwd=tmp_path, pythonpath=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    by_rank = saved["rnnlm_resume"]["train_state_by_rank"]  # each process's carried state, per cell
    assert saved["rnnlm"]["network"]["cell"] == INDRNN and [h.shape[0] for h, in by_rank] == [2, 2]  # 2 layers
