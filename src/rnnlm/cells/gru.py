"""The GRU (Cho et al. 2014)::

    r_t = σ(W_xr x_t + W_hr h_{t-1} + b_r)                reset gate
    z_t = σ(W_xz x_t + W_hz h_{t-1} + b_z)                update gate
    g_t = tanh(W_xg x_t + b_g + r_t∘(W_hg h_{t-1} + b_hg)) reset_after=true (torch.nn.GRU, cuDNN, Keras' default):
                                                           multiply, then reset
    g_t = tanh(W_hg (r_t∘h_{t-1}) + W_xg x_t + b_g)        reset_after=false (the original GRU, Keras
                                                           reset_after=False): reset, then multiply
    h_t = (1-z_t)∘g_t + z_t∘h_{t-1}

The two forms differ only in whether the reset gate scales ``h_{t-1}`` before the recurrent matrix or its product
after it; only the reset-after form is torch.nn.GRU's (which also needs the extra bias ``b_hg`` inside the reset),
so the reset-before form has no fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rnnlm.cells.fused import FusedCell
from rnnlm.cells.protocol import uniform_parameter
from rnnlm.cells.textbook import TextbookCell, run_steps
from rnnlm.schema import flag
from rnnlm.state import CellState

SETTINGS = {"reset_after": flag()}
RESET_BEFORE_HAS_NO_FUSED_FORM = (
    "a reset-before GRU (reset_after=False) has no fused form: torch.nn.GRU computes only the reset-after GRU, so its "
    "weights cannot be converted to or from torch.nn's layout; keep impl=scratch (copy weights with state_dict), or "
    "use reset_after=True"
)


def gru_update(xw: Tensor, hw: Tensor, h: Tensor) -> Tensor:
    """One step's h_t of the reset-after GRU from ``W_x x + b`` and ``W_h h + b_h`` (B, 3H each, blocks in the
    order r, z, g: torch.nn's) and h_{t-1}."""
    # five kernels, where the gates one by one take twelve: at 64 rows each costs about a tenth of a product
    # (2x512, 2 threads: 330 -> 260 us a layer)
    rz = 2 * h.size(-1)
    r, z = torch.sigmoid(xw[:, :rz] + hw[:, :rz]).chunk(2, -1)
    g = torch.tanh(torch.addcmul(xw[:, rz:], r, hw[:, rz:]))  # the reset after the product: r_t∘(W_hg h_{t-1} + b_hg)
    return torch.lerp(g, h, z)  # h_t = (1-z_t)∘g_t + z_t∘h_{t-1}


def gru_gates(r: Tensor, z: Tensor) -> dict[str, Tensor]:
    """The sigmoid gates from their pre-activations (B, H) each."""
    return {"reset": torch.sigmoid(r), "update": torch.sigmoid(z)}


class FusedGRU(FusedCell):
    """The reset-after GRU on torch's kernels (``torch.nn.GRU``'s weights)."""

    settings = SETTINGS
    gate_names = ("reset", "update")
    gate_count = 3
    kernel = torch.gru
    packs = True

    def __init__(self, input_size: int, hidden_size: int, reset_after: bool = True):
        if not reset_after:
            raise ValueError("torch.nn.GRU computes the reset-after GRU: use impl=scratch for reset_after=False")
        super().__init__(input_size, hidden_size)
        self.reset_after = reset_after

    @classmethod
    def setting_problems(cls, settings: dict[str, Any]) -> list[str]:
        if settings.get("reset_after") is False:
            return ["model.reset_after=false (the original GRU) has no fused kernel: add model.impl=scratch"]
        return []

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h = torch.gru_cell(x, state[0], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h, (h,)

    def update(self, xw: Tensor, hw: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h = gru_update(xw, hw, state[0])
        return h, (h,)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        r, z, _ = self.gate_preactivations(x, state[0]).chunk(3, -1)  # reset and update read x and h alike
        return gru_gates(r, z)


class ScratchGRU(TextbookCell):
    """The GRU as written above, in either form, one step after another."""

    settings = SETTINGS
    gate_names = ("reset", "update")
    gate_letters = ("r", "z", "g")

    def __init__(self, input_size: int, hidden_size: int, reset_after: bool = True):
        super().__init__(input_size, hidden_size)
        self.reset_after = reset_after
        if reset_after:
            self.b_hg = uniform_parameter(hidden_size, hidden_size=hidden_size)

    def _step(self, xw: Tensor, h: Tensor, w_h: Tensor) -> Tensor:
        """One step from ``xw = W_x x_t + b`` (B, 3H), h_{t-1} (B, H) and the recurrent matrices (3H, H)."""
        xr, xz, xg = xw.chunk(3, -1)
        hidden = self.hidden_size
        w_hrz, w_hg = w_h[: 2 * hidden], w_h[2 * hidden :]
        hr, hz = (h @ w_hrz.t()).chunk(2, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        if self.reset_after:
            g = torch.tanh(xg + r * (h @ w_hg.t() + self.b_hg))
        else:
            g = torch.tanh((r * h) @ w_hg.t() + xg)
        return (1 - z) * g + z * h  # h_t = (1-z_t)∘g_t + z_t∘h_{t-1}

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        w_h = self.drop_recurrent(w_h)
        outputs, h = run_steps(lambda xw_t, h: self._step(xw_t, h, w_h), xw, state[0])
        return outputs, (h,)

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        h = self._step(xw, state[0], w_h)
        return h, (h,)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        xw, w_h = self.projected(x)
        xr, xz, _ = xw.chunk(3, -1)
        hr, hz = (state[0] @ w_h[: 2 * self.hidden_size].t()).chunk(2, -1)
        return gru_gates(xr + hr, xz + hz)

    def recurrent_bias(self) -> Tensor | None:
        return self.b_hg if self.reset_after else None

    def fused_weights(self) -> dict[str, Tensor]:
        if not self.reset_after:
            raise ValueError(RESET_BEFORE_HAS_NO_FUSED_FORM)
        return super().fused_weights()

    def load_fused_weights(self, weights: dict[str, Tensor]) -> None:
        if not self.reset_after:
            raise ValueError(RESET_BEFORE_HAS_NO_FUSED_FORM)
        super().load_fused_weights(weights)
