"""What the fused forms of rnn, lstm and gru share: torch.nn's weights for one layer and direction, run by torch's
own kernels (cuDNN on a GPU, oneDNN or ATen on a CPU). Their equations are in each cell's file."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from rnnlm.cells.protocol import RecurrentCell, uniform_parameter
from rnnlm.state import CellState


class FusedCell(RecurrentCell):
    """``weight_ih`` (G*H, I), ``weight_hh`` (G*H, H), ``bias_ih`` and ``bias_hh`` (G*H,), named and drawn as
    ``torch.nn.LSTMCell``'s and its kin's, gates in torch.nn's order.

    Subclasses name ``gate_count`` and ``kernel`` (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``: a whole
    sequence of one layer in one call) and define :meth:`step`.
    """

    gate_count: ClassVar[int]
    kernel: ClassVar[Callable]
    supports = frozenset({"bidirectional", "weight_drop", "cuda_graph", "compile"})

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        rows = self.gate_count * hidden_size
        # created in torch.nn's order, so a seed gives the weights torch.nn.LSTM(...) would have
        self.weight_ih = uniform_parameter(rows, input_size, hidden_size=hidden_size)
        self.weight_hh = uniform_parameter(rows, hidden_size, hidden_size=hidden_size)
        self.bias_ih = uniform_parameter(rows, hidden_size=hidden_size)
        self.bias_hh = uniform_parameter(rows, hidden_size=hidden_size)

    def kernel_weights(self) -> list[Tensor]:
        """The four weights as the sequence kernel takes them, ``weight_hh`` through :meth:`drop_recurrent`. On a
        GPU they are copied into one buffer in this order, which is how cuDNN expects them (otherwise it copies
        them itself, with a warning, at every call)."""
        weights = [self.weight_ih, self.drop_recurrent(self.weight_hh), self.bias_ih, self.bias_hh]
        if not self.weight_ih.is_cuda:
            return weights
        flat = torch.cat([w.reshape(-1) for w in weights])
        return [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        # the kernel's arguments: weights, biases, 1 layer, no dropout, train, one direction, batch first
        hx = tuple(s.unsqueeze(0) for s in state)  # (1, B, H): one layer
        outputs, *final = self.kernel(x, hx if len(hx) > 1 else hx[0], self.kernel_weights(), True, 1, 0.0,
                                            self.training, False, True)
        return outputs, tuple(s.squeeze(0) for s in final)

    def fused_weights(self) -> dict[str, Tensor]:
        """The weights in torch.nn's layout (this cell's own; see the textbook cells' conversion)."""
        return {"weight_ih": self.weight_ih, "weight_hh": self.weight_hh, "bias_ih": self.bias_ih,
                "bias_hh": self.bias_hh}

    @torch.no_grad()
    def load_fused_weights(self, weights: dict[str, Tensor]) -> None:
        for name, value in weights.items():
            getattr(self, name).copy_(value)

    def gate_preactivations(self, x: Tensor, h: Tensor) -> Tensor:
        """``W_ih x + b_ih + W_hh h + b_hh`` at one step: x (B, I), h (B, H) -> (B, G*H)."""
        return torch.addmm(self.bias_ih, x, self.weight_ih.t()) + torch.addmm(self.bias_hh, h, self.weight_hh.t())
