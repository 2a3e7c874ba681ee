"""The chapter's claims made visible while training: how far back through the hidden states a loss's gradient
reaches (it vanishes in a vanilla RNN), and how open the LSTM and GRU gates are.

:class:`GradientFlow` (``callbacks=diagnostics``) measures, every N steps on a few rows of the current
chunk, the gradient of the chunk's last prediction's loss with respect to every hidden state before it:

    g_k = ‖∂L_T / ∂h_{T-k}‖,  k = 0 .. T-1   (h: every layer's hidden state at one step)

The loss is the network's own (embedding, every layer, the projection if any, the decoder), and ∂L_T/∂h_t of
layer l counts every path from that state to the loss: through layer l's later steps and through the layers
above it at step t and after. A vanilla RNN's g_k falls by orders of magnitude within tens of steps; the gates of
LSTM and GRU keep it. Each layer is stepped one token at a time on its own (eval mode, so no dropout), with its
own weights and code, to make each layer's h_t one node of the graph: this works for ``impl=fused`` and
``impl=scratch`` alike and for every cell, and gradients are taken with ``torch.autograd.grad``, so the
training's own gradients are never touched. A bidirectional model has no such chain (its backward direction
reads the future): the callback refuses it when training starts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from rnnlm.backbone import RecurrentBackbone
from rnnlm.cells import ScratchRecurrent, run_cell
from rnnlm.errors import ConfigError
from rnnlm.minrnn import MIN_CELLS
from rnnlm.network import LanguageModel

# torch.nn's gate order in the stacked weights; the sigmoid gates are those worth watching
GATES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "candidate")}
SIGMOID_GATES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update")}
SATURATED = 0.05  # a sigmoid gate within this of 0 or 1 blocks or passes nearly everything
BIDIRECTIONAL = ("callbacks=diagnostics measures how far back through time a causal model's last prediction "
                 "reaches, and a bidirectional model (model.bidirectional=true) also reads the future: drop "
                 "callbacks=diagnostics for this model")


def gradient_flow(net: LanguageModel, inputs: Tensor, targets: Tensor) -> tuple[list[float], dict[str, Tensor]]:
    """``[g_0, ..., g_{T-1}]`` for the chunk ``inputs`` (B, T), and the sigmoid gates' activations of every step,
    layer, row and unit by gate name, each (T, layers, B, H) (empty for a vanilla RNN, minGRU and minLSTM: their
    gates are not among those watched).

    The loss is the network's own: the mean cross-entropy of ``targets[:, -1]`` from the top layer's last output,
    through the projection (if any) and the decoder. ``g_k`` is the norm, over all layers together, of the
    gradient reaching each layer's h_{T-k}: from layer l's own next step and from layer l+1 at the same step
    (each layer is stepped on its own, so that both paths leave one node).

    Raises:
        ValueError: a bidirectional network (its backward direction reads the future: no such chain).
    """
    if net.bidirectional:
        raise ValueError(BIDIRECTIONAL)
    backbone, cell = net.backbone, net.config.cell
    was_training = net.training
    net.eval()  # no dropout: between layers and before the projection, what eval mode computes is the identity
    try:
        with torch.enable_grad():
            x = net.embed(inputs)  # (B, T, E)
            weights = backbone.fused_state_dict(strict=False) if cell in GATES else {}
            states = [None] * backbone.num_layers  # each layer's state after the last step: h, or (h, c)
            hidden, gates = [], {name: [] for name in SIGMOID_GATES.get(cell, ())}
            for t in range(inputs.size(1)):
                layer_input, row, opened = x[:, t], [], {name: [] for name in gates}
                for k in range(backbone.num_layers):
                    if weights:
                        with torch.no_grad():
                            for name, value in _gates(cell, weights, k, layer_input, states[k]).items():
                                opened[name].append(value)
                    h, states[k] = _layer_step(backbone, k, layer_input, states[k])  # h: (B, H)
                    row.append(h)
                    layer_input = h  # the one node that layer k+1 reads now and layer k reads at t+1
                hidden.append(row)
                for name, values in opened.items():
                    gates[name].append(torch.stack(values))  # (layers, B, H)
            top = hidden[-1][-1].unsqueeze(1)  # (B, 1, H): the top layer after the last token
            features = top if net.projection is None else net.projection(top)
            total, count = net.summed_loss(features, targets[:, -1:])
            loss = total / count.clamp(min=1)
            states_in_order = [h for row in hidden for h in row]  # step-major: h_0 of every layer, h_1, ...
            grads = torch.autograd.grad(loss, states_in_order, allow_unused=True)
    finally:
        net.train(was_training)
    squares = torch.stack([h.new_zeros((), dtype=torch.float64) if g is None else g.double().square().sum()
                           for g, h in zip(grads, states_in_order, strict=True)])
    norms = squares.view(len(hidden), backbone.num_layers).sum(1).sqrt().flip(0)  # k = 0 first
    return norms.tolist(), {name: torch.stack(values) for name, values in gates.items()}


def _layer_step(backbone: RecurrentBackbone, k: int, x: Tensor, state) -> tuple[Tensor, object]:
    """Layer k of ``backbone`` on one step, with its own weights and code: x (B, I) and the layer's state (None:
    zeros) -> its new h (B, H) and its new state, which holds that same h (and, for an LSTM, the cell state)."""
    rnn, cell = backbone.rnn, backbone.cell
    if state is None:
        zeros = x.new_zeros(x.size(0), backbone.hidden_size)
        state = (zeros, zeros) if cell == "lstm" else zeros
    if cell in MIN_CELLS:  # the scan (impl=fused) or the loop (impl=scratch), over a single step
        layer = rnn.cells[k]
        h = (layer.scan if rnn.parallel else layer.loop)(x.unsqueeze(1), state)[:, 0]
        return h, h
    if isinstance(rnn, ScratchRecurrent):  # the textbook cell, over a single step
        out, final = run_cell(rnn.cells[k], x.unsqueeze(1), state)
        h = out[:, 0]
        return h, ((h, final[1]) if cell == "lstm" else h)
    # torch.nn's one-step kernel (what nn.LSTMCell and its kin call) on the stack's parameters of layer k
    weights = [getattr(rnn, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if cell == "lstm":
        h, c = torch.lstm_cell(x, state, *weights)
        return h, (h, c)
    kernel = {"gru": torch.gru_cell, "tanh": torch.rnn_tanh_cell, "relu": torch.rnn_relu_cell}
    h = kernel["gru" if cell == "gru" else backbone.nonlinearity](x, state, *weights)
    return h, h


def _gates(cell: str, weights: dict[str, Tensor], k: int, x: Tensor, state) -> dict[str, Tensor]:
    """The sigmoid gates of layer k at one step, (B, H) each, from its input x (B, I) and its state before the
    step (None at the chunk's start: zeros)."""
    w_hh = weights[f"weight_hh_l{k}"]
    before = x.new_zeros(x.size(0), w_hh.size(1)) if state is None else (state[0] if cell == "lstm" else state)
    input_part = x @ weights[f"weight_ih_l{k}"].t() + weights[f"bias_ih_l{k}"]
    hidden_part = before @ w_hh.t() + weights[f"bias_hh_l{k}"]
    blocks = dict(zip(GATES[cell], (input_part + hidden_part).chunk(len(GATES[cell]), -1), strict=True))
    # reset and update read x and h alike in both GRU forms
    return {name: torch.sigmoid(blocks[name]) for name in SIGMOID_GATES[cell]}


class GradientFlow(L.Callback):
    """Every ``every_n_steps`` optimizer steps, :func:`gradient_flow` on the first ``rows`` rows of the chunk just
    trained on. Logged to TensorBoard: ``diagnostics/gradient_flow`` (an image: g_k against k, log scale),
    ``diagnostics/grad_ratio`` (g_{T-1} / g_0), and for LSTM and GRU a histogram and the saturated fraction
    (within 0.05 of 0 or 1) of each sigmoid gate. Written to ``gradient_flow.csv`` in ``output_dir`` (step,
    k, norm), which ``rnnlm-report`` plots for a sweep. One process measures (rank 0).
    """

    def __init__(self, output_dir: str, every_n_steps: int = 100, rows: int = 8):
        self.path = Path(output_dir) / "gradient_flow.csv"
        self.every_n_steps, self.rows = every_n_steps, rows

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse a bidirectional model before any step (:func:`gradient_flow` cannot measure it).

        Raises:
            ConfigError: ``model.bidirectional=true``.
        """
        if pl_module.net.bidirectional:
            raise ConfigError(BIDIRECTIONAL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        inputs, targets = (t[: self.rows] for t in batch)
        norms, gates = gradient_flow(pl_module.net, inputs, targets)
        self._write_csv(step, norms)
        ratio = norms[-1] / norms[0] if norms[0] > 0 else math.nan
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_scalar("diagnostics/grad_ratio", ratio, step)
            writer.add_figure("diagnostics/gradient_flow", _figure(norms, pl_module.net.config.cell, step), step)
            for name, values in gates.items():
                writer.add_histogram(f"diagnostics/gate_{name}", values.float().cpu(), step)
                saturated = ((values < SATURATED) | (values > 1 - SATURATED)).float().mean()
                writer.add_scalar(f"diagnostics/saturated_{name}", float(saturated), step)

    def _write_csv(self, step: int, norms: list[float]) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "k", "grad_norm"])
            writer.writerows([step, k, f"{norm:.6g}"] for k, norm in enumerate(norms))


def _figure(norms: list[float], cell: str, step: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(range(len(norms)), [max(n, 1e-30) for n in norms])
    ax.set_xlabel("k (steps back from the prediction)")
    ax.set_ylabel("‖∂L/∂h(T−k)‖")
    ax.set_title(f"{cell}, step {step}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
