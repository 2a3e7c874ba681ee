"""minLSTM (Feng et al. 2024, arXiv 2410.01201): an LSTM whose gates read the input alone, without a cell state::

    f_t = σ(W_xf x_t + b_f)          forget gate
    i_t = σ(W_xi x_t + b_i)          input gate
    h̃_t = g(W_xh x_t + b_h)          candidate (g: :func:`rnnlm.cells.scan.g`)
    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
    h_t = f'_t∘h_{t-1} + i'_t∘h̃_t            a_t = f'_t,  b_t = i'_t∘h̃_t

so that a whole sequence is one linear recurrence (:mod:`rnnlm.cells.scan`). ``f'_t`` and ``i'_t`` come from
``log i_t - log f_t``: σ underflows to 0 below about -88 in float32 (-709 in float64), where ``f / (f + i)`` would be
0/0, and its log does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlm.cells.scan import ScanCell, g, log_g
from rnnlm.state import CellState


def log_i_over_f(k_f: Tensor, k_i: Tensor) -> Tensor:
    """``log i - log f`` from the gates' pre-activations: ``f' = σ(-(log i - log f))`` and ``i' = σ(log i - log f)``.
    With ``log σ(k) = -softplus(-k)`` it stays finite where σ(k_f) and σ(k_i) both round to 0."""
    return F.softplus(-k_f) - F.softplus(-k_i)


class MinLSTM(ScanCell):
    """minLSTM trained by the log-space parallel scan (``impl=fused``)."""

    gate_letters = ("f", "i", "h")  # h: the candidate h̃
    gate_names = ("forget", "input")

    @staticmethod
    def coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = pre.chunk(3, -1)
        diff = log_i_over_f(k_f, k_i)
        return torch.sigmoid(-diff), torch.sigmoid(diff) * g(k_h)  # h_t = f'_t∘h_{t-1} + i'_t∘h̃_t

    @staticmethod
    def log_coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = pre.chunk(3, -1)
        # log f' = log σ(-diff) = -softplus(diff), log i' = -softplus(-diff)
        diff = log_i_over_f(k_f, k_i)
        return -F.softplus(diff), -F.softplus(-diff) + log_g(k_h)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        """The normalised gates f' and i' (they sum to 1)."""
        k_f, k_i, _ = F.linear(x, *self.stacked()).chunk(3, -1)
        diff = log_i_over_f(k_f, k_i)
        return {"forget": torch.sigmoid(-diff), "input": torch.sigmoid(diff)}


class MinLSTMLoop(MinLSTM):
    """minLSTM one step after another (``impl=scratch``): the same parameters and outputs."""

    parallel = False
