"""The chapter's claims made visible while training: how far back through the hidden states a loss's gradient
reaches (it vanishes in a vanilla RNN), and how open the LSTM and GRU gates are.

:class:`GradientFlow` (``callbacks=diagnostics``) measures, every N steps on a few rows of the current
chunk, the gradient of the chunk's last prediction's loss with respect to every hidden state before it:

    g_k = ‖∂L_T / ∂h_{T-k}‖,  k = 0 .. T-1   (h: every layer's hidden state at one step)

A vanilla RNN's g_k falls by orders of magnitude within tens of steps; the gates of LSTM and GRU keep it.
The network is stepped one token at a time (eval mode, so no dropout) to make each h_t a node of the
graph: this works for ``impl=fused`` and ``impl=scratch`` alike, and gradients are taken with
``torch.autograd.grad``, so the training's own gradients are never touched.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from rnnlm.network import LanguageModel

# torch.nn's gate order in the stacked weights; the sigmoid gates are those worth watching
GATES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "candidate")}
SIGMOID_GATES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update")}
SATURATED = 0.05  # a sigmoid gate within this of 0 or 1 blocks or passes nearly everything


def gradient_flow(net: LanguageModel, inputs: Tensor, targets: Tensor) -> tuple[list[float], dict[str, Tensor]]:
    """``[g_0, ..., g_{T-1}]`` for the chunk ``inputs`` (B, T) (the loss: the mean cross-entropy of
    ``targets[:, -1]`` from the top layer's last hidden state), and the sigmoid gates' activations of every
    layer, step, row and unit by gate name (empty for a vanilla RNN, minGRU and minLSTM: their gates are not
    among those watched).

    Raises:
        ValueError: a bidirectional network (its backward direction reads the future: no such chain).
    """
    if net.bidirectional:
        raise ValueError("gradient flow through time is measured for causal models, not bidirectional ones")
    backbone, cell = net.backbone, net.config.cell
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            x = net.embed(inputs)  # (B, T, E)
            weights = backbone.fused_state_dict(strict=False) if cell in GATES else {}
            state, hidden, gates = None, [], {name: [] for name in SIGMOID_GATES.get(cell, ())}
            for t in range(inputs.size(1)):
                previous = state
                _, state = backbone(x[:, t : t + 1], state)
                h = state[0] if cell == "lstm" else state  # (layers, B, H)
                hidden.append(h)
                if weights:
                    with torch.no_grad():
                        for name, value in _gates(cell, weights, x[:, t], h, previous).items():
                            gates[name].append(value)
            top = hidden[-1][-1]  # (B, H): the top layer after the last token
            loss = torch.nn.functional.cross_entropy(net.logits(top), targets[:, -1])
            grads = torch.autograd.grad(loss, hidden, allow_unused=True)
    finally:
        net.train(was_training)
    norms = [0.0 if g is None else float(g.norm()) for g in reversed(grads)]  # k = 0 first
    return norms, {name: torch.stack(values) for name, values in gates.items()}


def _gates(cell: str, weights: dict[str, Tensor], x: Tensor, h: Tensor, previous) -> dict[str, Tensor]:
    """The sigmoid gates of every layer at one step: (layers, B, H) each. Layer k reads layer k-1's new state
    (the layer input) and its own previous one (zeros at the chunk's start)."""
    layers = h.size(0)
    before = torch.zeros_like(h) if previous is None else (previous[0] if cell == "lstm" else previous)
    out = {name: [] for name in SIGMOID_GATES[cell]}
    for k in range(layers):
        layer_input = x if k == 0 else h[k - 1]
        input_part = layer_input @ weights[f"weight_ih_l{k}"].t() + weights[f"bias_ih_l{k}"]
        hidden_part = before[k] @ weights[f"weight_hh_l{k}"].t() + weights[f"bias_hh_l{k}"]
        blocks = dict(zip(GATES[cell], (input_part + hidden_part).chunk(len(GATES[cell]), -1), strict=True))
        for name in SIGMOID_GATES[cell]:  # reset and update read x and h alike in both GRU forms
            out[name].append(torch.sigmoid(blocks[name]))
    return {name: torch.stack(values) for name, values in out.items()}


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or pl_module.net.bidirectional:
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
