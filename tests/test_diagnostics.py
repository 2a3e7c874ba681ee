"""Gradient flow through time and the gates (``callbacks=diagnostics``, ``experiment=vanishing``)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, scalars
from rnnlm.commands.report import write_report
from rnnlm.commands.train import train
from rnnlm.diagnostics import gradient_flow
from rnnlm.network import LanguageModel, NetworkConfig


def _net(cell: str, impl: str = "fused", num_layers: int = 1, **settings) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(NetworkConfig(vocab_size=20, cell=cell, embedding_dim=8, hidden_size=16,
                                       num_layers=num_layers, impl=impl, dropout=0.0, **settings))


def test_the_norms_are_the_gradients_of_the_last_loss_through_each_hidden_state():
    net = _net("rnn")
    inputs, targets = torch.randint(0, 20, (3, 12)), torch.randint(0, 20, (3, 12))
    norms, gates = gradient_flow(net, inputs, targets)
    # the same chain written out: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    w = net.backbone.fused_state_dict()
    x, h, states = net.embed(inputs), torch.zeros(3, 16), []
    for t in range(12):
        h = torch.tanh(x[:, t] @ w["weight_ih_l0"].t() + w["bias_ih_l0"] + h @ w["weight_hh_l0"].t() + w["bias_hh_l0"])
        states.append(h)
    loss = torch.nn.functional.cross_entropy(net.decoder(states[-1]), targets[:, -1])
    expected = [float(g.norm()) for g in reversed(torch.autograd.grad(loss, states))]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(expected))
    assert gates == {}  # a vanilla RNN has none
    assert all(p.grad is None for p in net.parameters())  # training's gradients untouched


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_and_textbook_cells_give_the_same_flow(cell):
    fused, scratch = _net(cell, num_layers=2), _net(cell, impl="scratch", num_layers=2)
    scratch.load_state_dict(fused.state_dict(), strict=False)
    scratch.backbone.load_fused_state_dict(fused.backbone.fused_state_dict())
    inputs, targets = torch.randint(0, 20, (2, 10)), torch.randint(0, 20, (2, 10))
    norms_f, gates_f = gradient_flow(fused, inputs, targets)
    norms_s, gates_s = gradient_flow(scratch, inputs, targets)
    torch.testing.assert_close(torch.tensor(norms_s), torch.tensor(norms_f))
    assert gates_f.keys() == gates_s.keys() == {"lstm": {"input", "forget", "output"}, "gru": {"reset", "update"},
                                                "rnn": set()}[cell]
    for name in gates_f:
        assert gates_f[name].shape == (10, 2, 2, 16)  # steps, layers, rows, units
        torch.testing.assert_close(gates_s[name], gates_f[name])


def test_the_gradient_vanishes_in_a_vanilla_rnn_and_an_open_forget_gate_keeps_it():
    inputs, targets = torch.randint(0, 20, (4, 60)), torch.randint(0, 20, (4, 60))
    rnn_norms, _ = gradient_flow(_net("rnn"), inputs, targets)
    lstm = _net("lstm")
    with torch.no_grad():  # the forget gate wide open: the cell state carries what it was given
        lstm.backbone.rnn.bias_ih_l0[16:32] = 8.0  # torch.nn's order: input, forget, cell, output
    lstm_norms, gates = gradient_flow(lstm, inputs, targets)
    assert rnn_norms[-1] / rnn_norms[0] < 1e-6
    assert lstm_norms[-1] / lstm_norms[0] > 1e-3
    assert float(gates["forget"].min()) > 0.99


def test_training_with_diagnostics_logs_the_flow_and_the_gates(make_cfg, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(f"data.path={tiny_corpus}", "model=lstm", "callbacks=diagnostics",
                   "callbacks.gradient_flow.every_n_steps=2", "test=false", run_dir=run))
    with open(run / "gradient_flow.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4]
    assert [int(r["k"]) for r in rows if r["step"] == "4"] == list(range(16))  # data.seq_len=16 in the tiny runs
    logged = scalars(run)
    assert len(logged["diagnostics/grad_ratio"]) == 2
    assert {f"diagnostics/saturated_{gate}" for gate in ("input", "forget", "output")} <= set(logged)


def test_the_vanishing_experiment_sweeps_three_cells_and_the_report_draws_them(tmp_path, shared_data, cache_dir):
    tiny = ["model.hidden_size=16", "model.embedding_dim=8", "data.seq_len=12", "data.batch_size=4",
            "data.eval_batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "callbacks.gradient_flow.every_n_steps=1", "trainer.accelerator=cpu", "~callbacks.text_samples"]
    done = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), "experiment=vanishing", *tiny,
                           f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}",
                           f"paths.log_dir={tmp_path / 'outputs'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    [sweep] = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    written = write_report(sweep)
    assert [p.name for p in written] == ["summary.csv", "summary.md", "curves.png", "curves_time.png",
                                           "gradient_flow.png"]
    assert "| rnn |" in (sweep / "summary.md").read_text() and "| gru |" in (sweep / "summary.md").read_text()
