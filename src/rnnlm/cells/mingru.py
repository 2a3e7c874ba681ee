"""minGRU (Feng et al. 2024, arXiv 2410.01201): a GRU whose gates read the input alone::

    z_t = σ(W_xz x_t + b_z)          update gate
    h̃_t = g(W_xh x_t + b_h)          candidate (g: :func:`rnnlm.cells.scan.g`)
    h_t = (1 - z_t)∘h_{t-1} + z_t∘h̃_t        a_t = 1 - z_t,  b_t = z_t∘h̃_t

so that a whole sequence is one linear recurrence (:mod:`rnnlm.cells.scan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlm.cells.scan import ScanCell, g, log_g
from rnnlm.state import CellState


class MinGRU(ScanCell):
    """minGRU trained by the log-space parallel scan (``impl=fused``)."""

    gate_letters = ("z", "h")  # h: the candidate h̃
    gate_names = ("update",)

    @staticmethod
    def coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = pre.chunk(2, -1)
        # 1 - σ(k) = σ(-k): exact where σ(k) rounds to 1
        return torch.sigmoid(-k_z), torch.sigmoid(k_z) * g(k_h)  # h_t = (1 - z_t)∘h_{t-1} + z_t∘h̃_t

    @staticmethod
    def log_coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        k_z, k_h = pre.chunk(2, -1)
        # log(1 - σ(k)) = -softplus(k), log σ(k) = -softplus(-k)
        return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        return {"update": torch.sigmoid(F.linear(x, self.W_xz, self.b_z))}


class MinGRULoop(MinGRU):
    """minGRU one step after another (``impl=scratch``): the same parameters and outputs."""

    parallel = False
