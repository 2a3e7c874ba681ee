"""The chapter's claims made visible while training: how far back through the hidden states a loss's gradient
reaches (it vanishes in a vanilla RNN), and how open the LSTM and GRU gates are.

:class:`GradientFlow` (``callbacks=diagnostics``) measures, every N steps on a few rows of the current
chunk, the gradient of the chunk's last prediction's loss with respect to every hidden state before it:

    g_k = ‖∂L_T / ∂h_{T-k}‖,  k = 0 .. T-1   (h: every layer's hidden state at one step)

The loss is the network's own (embedding, every layer, the projection if any, the decoder), and ∂L_T/∂h_t of
layer l counts every path from that state to the loss: through layer l's later steps and through the layers
above it at step t and after. A vanilla RNN's g_k falls by orders of magnitude within tens of steps; the gates of
LSTM and GRU keep it. Each layer is stepped one token at a time by its cell's own ``step`` (eval mode, so no
dropout), to make each layer's h_t one node of the graph: this works for every cell and form, a user's too,
and gradients are taken with ``torch.autograd.grad``, so the training's own gradients are never touched. The
gates are what each cell's ``gates`` returns (:class:`rnnlm.cells.RecurrentCell`). A bidirectional model has no
such chain (its backward direction reads the future): the callback refuses it when training starts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from rnnlm.errors import ConfigError
from rnnlm.network import LanguageModel

SATURATED = 0.05  # a sigmoid gate within this of 0 or 1 blocks or passes nearly everything
BIDIRECTIONAL = ("callbacks=diagnostics measures how far back through time a causal model's last prediction "
                 "reaches, and a bidirectional model (model.bidirectional=true) also reads the future: drop "
                 "callbacks=diagnostics for this model")


def gradient_flow(net: LanguageModel, inputs: Tensor, targets: Tensor) -> tuple[list[float], dict[str, Tensor]]:
    """``[g_0, ..., g_{T-1}]`` for the chunk ``inputs`` (B, T), and the gates' activations of every step, layer, row
    and unit by gate name, each (T, layers, B, H) (none for a cell without gates, such as the vanilla RNN; a
    network whose layers differ in width gives the gates of the layers as wide as the first).

    The loss is the network's own: the mean cross-entropy of ``targets[:, -1]`` from the top layer's last output,
    through the projection (if any) and the decoder. ``g_k`` is the norm, over all layers together, of the
    gradient reaching each layer's h_{T-k}: from layer l's own next step and from layer l+1 at the same step
    (each layer is stepped on its own, so that both paths leave one node).

    Raises:
        ValueError: a bidirectional network (its backward direction reads the future: no such chain).
    """
    if net.bidirectional:
        raise ValueError(BIDIRECTIONAL)
    cells = list(net.backbone.cells)  # one per layer: a causal stack has one direction
    was_training = net.training
    net.eval()  # no dropout: between layers and before the projection, what eval mode computes is the identity
    try:
        with torch.enable_grad():
            x = net.embed(inputs)  # (B, T, E)
            hidden, gates = [], {name: [] for name in cells[0].gate_names}
            for outputs, _, opened in net.backbone.trace(x):  # each layer's h at this step: one node each
                hidden.append(outputs)
                for name, values in gates.items():
                    values.append(torch.stack([layer[name] for layer, cell in zip(opened, cells, strict=True)
                                               if cell.hidden_size == cells[0].hidden_size]))  # (layers, B, H)
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
    norms = squares.view(len(hidden), len(cells)).sum(1).sqrt().flip(0)  # k = 0 first
    return norms.tolist(), {name: torch.stack(values) for name, values in gates.items() if values}


class GradientFlow(L.Callback):
    """Every ``every_n_steps`` optimizer steps, :func:`gradient_flow` on the first ``rows`` rows of the chunk just
    trained on. Logged to TensorBoard: ``diagnostics/gradient_flow`` (an image: g_k against k, log scale),
    ``diagnostics/grad_ratio`` (g_{T-1} / g_0), and for a cell with gates (LSTM, GRU, minGRU, minLSTM, a
    user's) a histogram and the saturated fraction (within 0.05 of 0 or 1) of each gate. Written to
    ``gradient_flow.csv`` in ``output_dir`` (step, k, norm), which ``rnnlm-report`` plots for a sweep. One process
    measures (rank 0).
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

    def acts_after_step(self, trainer) -> bool:
        """A training step that trains several chunks (``trainer.chunks_per_call``) ends at the steps measured."""
        return trainer.global_step % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        inputs, targets = (t[: self.rows] for t in outputs["chunks"][-1])  # the chunk of this step
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
