"""IndRNN (Li et al. 2018, "Independently Recurrent Neural Network", arXiv 1803.04831), as a user's cell.

Each unit reads its own previous value only, through one recurrent weight per unit::

    h_t = relu(W x_t + u∘h_{t-1} + b),   |u| <= recurrent_max

Train it with ``python src/train.py model.cell=examples.indrnn:IndRNN`` from the repository's folder (or put this
folder on PYTHONPATH); ``model.recurrent_max=...`` sets its own setting. Written only against the cell protocol
(docs/cells.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnlm.cells import RecurrentCell, uniform_parameter
from rnnlm.schema import number


class IndRNN(RecurrentCell):
    """One IndRNN layer: ``W`` (H, I), ``u`` (H,), ``b`` (H,)."""

    settings = {"recurrent_max": number(0, low_open=True)}  # |u| is clipped to this (the paper's constraint)
    gate_names = ()
    supports = frozenset({"bidirectional", "weight_drop", "cuda_graph", "compile"})

    def __init__(self, input_size: int, hidden_size: int, recurrent_max: float = 1.0):
        super().__init__(input_size, hidden_size)
        self.recurrent_max = recurrent_max
        self.W = uniform_parameter(hidden_size, input_size, hidden_size=hidden_size)
        self.b = torch.nn.Parameter(torch.zeros(hidden_size))
        self.u = torch.nn.Parameter(torch.empty(hidden_size).uniform_(0, recurrent_max))

    def recurrent_weight(self) -> torch.Tensor:
        return self.drop_recurrent(self.u.clamp(-self.recurrent_max, self.recurrent_max))

    def forward(self, x, state):
        # x (B, T, I), state (h,) with h (B, H) -> outputs (B, T, H), (h_T,)
        xw = F.linear(x, self.W, self.b)  # W x_t + b for every step at once
        u, (h,) = self.recurrent_weight(), state
        outputs = []
        for xw_t in xw.unbind(1):
            h = torch.relu(xw_t + u * h)
            outputs.append(h)
        return torch.stack(outputs, 1), (h,)

    def step(self, x, state):
        # x (B, I) -> h (B, H), (h,): one step, for generation
        h = torch.relu(F.linear(x, self.W, self.b) + self.recurrent_weight() * state[0])
        return h, (h,)
