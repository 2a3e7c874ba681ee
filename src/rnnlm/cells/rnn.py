"""The vanilla RNN::

    h_t = act(W_x x_t + W_h h_{t-1} + b),   act = tanh (model.nonlinearity=tanh) or relu

Its gradient through time is a product of ``W_h``'s Jacobians: it vanishes (or explodes) within tens of steps,
which ``callbacks=diagnostics`` shows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlm.cells.fused import FusedCell
from rnnlm.cells.textbook import TextbookCell, run_steps
from rnnlm.schema import one_of
from rnnlm.state import CellState

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu}
SETTINGS = {"nonlinearity": one_of(*NONLINEARITIES)}


class FusedRNN(FusedCell):
    """The vanilla RNN on torch's kernels (``torch.nn.RNN``'s weights; torch.nn keeps two biases, ``b`` is their
    sum)."""

    settings = SETTINGS
    gate_count = 1
    # packs stays False: its products, a quarter of an LSTM's, gained nothing from oneDNN's packed weights
    # (benchmarks/generate_speed.py, 2x512, 2 threads: 8 rows 1.07x -> 0.93x the plain loop, 64 rows 1.01x -> 0.96x)

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh"):
        super().__init__(input_size, hidden_size)
        self.nonlinearity = nonlinearity
        self.kernel = torch.rnn_relu if nonlinearity == "relu" else torch.rnn_tanh
        self.step_kernel = torch.rnn_relu_cell if nonlinearity == "relu" else torch.rnn_tanh_cell

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h = self.step_kernel(x, state[0], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h, (h,)


class ScratchRNN(TextbookCell):
    """The vanilla RNN as written above, one step after another."""

    settings = SETTINGS
    gate_letters = ("",)

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh"):
        super().__init__(input_size, hidden_size)
        self.nonlinearity = nonlinearity
        self.activation = NONLINEARITIES[nonlinearity]

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        w_h = self.drop_recurrent(w_h)
        outputs, h = run_steps(lambda xw_t, h: self.activation(xw_t + h @ w_h.t()), xw, state[0])
        return outputs, (h,)

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        h = self.activation(xw + state[0] @ w_h.t())  # W_x x + b + W_h h
        return h, (h,)
