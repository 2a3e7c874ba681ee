"""Gradient flow through time and the gates (``callbacks=diagnostics``, ``experiment=vanishing``)."""

import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, scalars
from rnnlm.commands.report import write_report
from rnnlm.commands.train import train
from rnnlm.diagnostics import GradientFlow, gradient_flow
from rnnlm.errors import ConfigError
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


def _stepwise_reference(net: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """g_k by autograd through the network's own forward (``net(inputs)``: embedding, every layer, projection,
    decoder), with each layer of a scratch network stepped one token at a time, so that layer l's h_t is one
    node, read by layer l+1 at step t and by layer l at step t+1; the gradient reaching it is ∂L/∂h_t."""
    recorded: list[list[torch.Tensor]] = []  # per layer, per step

    def by_steps(sequence_call):
        def forward(x, state):  # the cell's own sequence call, over one step at a time
            hs = []
            for t in range(x.size(1)):
                out, state = sequence_call(x[:, t : t + 1], state)
                h = out[:, 0]
                state = (h, *state[1:])  # the next step reads this node (h is a cell's first state), not a copy
                hs.append(h)
            recorded.append(hs)
            return torch.stack(hs, 1), state
        return forward

    with pytest.MonkeyPatch.context() as patch:
        for cell in net.backbone.cells:
            patch.setattr(cell, "forward", by_steps(cell.forward))
        net.eval()
        logits, _ = net(inputs)
    loss = torch.nn.functional.cross_entropy(logits[:, -1], targets[:, -1])
    grads = torch.autograd.grad(loss, [h for layer in recorded for h in layer])
    steps = inputs.size(1)
    per_step = torch.stack([g.square().sum() for g in grads]).view(len(recorded), steps).sum(0).sqrt()
    return per_step.flip(0).tolist()  # k = 0 first


@pytest.mark.parametrize("projection_size", [None, 12, 16], ids=lambda p: f"projection{p}")
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "mingru", "minlstm"])
def test_the_flow_is_the_gradient_through_every_layer_of_the_whole_network(cell, num_layers, projection_size):
    fused = _net(cell, num_layers=num_layers, projection_size=projection_size).double()
    scratch = _net(cell, impl="scratch", num_layers=num_layers, projection_size=projection_size).double()
    scratch.load_state_dict(fused.state_dict(), strict=cell.startswith("min"))  # min cells: one layout
    if not cell.startswith("min"):
        scratch.backbone.load_fused_state_dict(fused.backbone.fused_state_dict())
    inputs, targets = torch.randint(0, 20, (3, 9)), torch.randint(0, 20, (3, 9))
    expected = torch.tensor(_stepwise_reference(scratch, inputs, targets), dtype=torch.float64)
    for net in (fused, scratch):
        norms, _ = gradient_flow(net, inputs, targets)
        torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), expected, rtol=1e-5, atol=1e-12)


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
        lstm.backbone.cells[0].bias_ih[16:32] = 8.0  # torch.nn's order: input, forget, cell, output
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


def test_the_awd_lstm_preset_trains_with_diagnostics(make_cfg, tiny_corpus, tmp_path):
    # its layers differ in width: the top one as wide as the embedding it is tied to
    run = tmp_path / "run"
    train(make_cfg("experiment=ptb_awd_lstm", f"data.path={tiny_corpus}", "model.num_layers=2",
                   "model.hidden_size=[24,16]", "model.embedding_dim=16", "callbacks=diagnostics",
                   "callbacks.gradient_flow.every_n_steps=2",
                   "test=false", run_dir=run))
    with open(run / "gradient_flow.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4]
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_a_bidirectional_model_is_refused_before_any_step(tmp_path):
    net = _net("lstm", bidirectional=True)
    with pytest.raises(ConfigError, match=r"callbacks=diagnostics .*\(model\.bidirectional=true\)"):
        GradientFlow(str(tmp_path)).setup(None, SimpleNamespace(net=net), "fit")
    with pytest.raises(ValueError, match="bidirectional"):
        gradient_flow(net, torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 5)))


def test_the_vanishing_experiment_sweeps_cells_and_depths_and_the_report_draws_them(tmp_path, shared_data, cache_dir):
    # seed=1: one of the preset's three seeds (the command line wins over a preset's sweep)
    tiny = ["seed=1", "model.hidden_size=16", "model.embedding_dim=8", "data.seq_len=12", "data.batch_size=4",
            "data.eval_batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=2",  # not all of tiny Shakespeare's validation text, 6 times
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
    md = (sweep / "summary.md").read_text()
    assert all(f"| {model} | {layers} |" in md for model in ("rnn", "lstm", "gru") for layers in (1, 2))
