"""What the textbook (``impl=scratch``) forms of rnn, lstm and gru share: one weight matrix per input and gate,
named as in the equation it computes (``W_xi`` multiplies ``x_t`` for the input gate, ``W_hi`` multiplies
``h_{t-1}``), and the conversion to and from torch.nn's layout. Their equations are in each cell's file.

For speed a cell concatenates its per-gate matrices once per call, projects the whole input sequence in one
product, and leaves a single ``h_{t-1}`` product per step in the time loop; the arithmetic is the equations'.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from rnnlm.cells.protocol import RecurrentCell, uniform_parameter


class TextbookCell(RecurrentCell):
    """``W_x<gate>`` (H, I), ``W_h<gate>`` (H, H) and ``b_<gate>`` (H,) for every gate of ``gate_letters`` (in
    torch.nn's order; a vanilla RNN's one block has the empty letter: ``W_x``, ``W_h``, ``b``)."""

    gate_letters: ClassVar[tuple[str, ...]]
    supports = frozenset({"bidirectional", "weight_drop", "cuda_graph", "compile"})

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        for gate in self.gate_letters:
            self.register_parameter(f"W_x{gate}", uniform_parameter(hidden_size, input_size, hidden_size=hidden_size))
            self.register_parameter(f"W_h{gate}", uniform_parameter(hidden_size, hidden_size, hidden_size=hidden_size))
            self.register_parameter(f"b_{gate}" if gate else "b", uniform_parameter(hidden_size,
                                                                                    hidden_size=hidden_size))

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """The per-gate matrices stacked in torch.nn's gate order: W_x (G*H, I), W_h (G*H, H), b (G*H,)."""
        gates = self.gate_letters
        return (
            torch.cat([getattr(self, f"W_x{g}") for g in gates]),
            torch.cat([getattr(self, f"W_h{g}") for g in gates]),
            torch.cat([getattr(self, f"b_{g}" if g else "b") for g in gates]),
        )

    def projected(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``W_x x + b`` for every gate, for all steps at once ((..., I) -> (..., G*H)), and the stacked recurrent
        matrices W_h (G*H, H): the per-gate weights are concatenated once per call."""
        w_x, w_h, b = self.stacked()
        return torch.addmm(b, x.reshape(-1, x.size(-1)), w_x.t()).view(*x.shape[:-1], -1), w_h

    def recurrent_bias(self) -> Tensor | None:
        """A bias added to ``W_h h`` alone (torch.nn's ``bias_hh``), where the equations have one; None here."""
        return None

    @torch.no_grad()
    def fused_weights(self) -> dict[str, Tensor]:
        """The weights in torch.nn's layout, with the same function: the textbook bias ``b`` becomes ``bias_ih``
        and ``bias_hh`` is zero, except where :meth:`recurrent_bias` gives its last block."""
        w_x, w_h, b = self.stacked()
        b_hh = torch.zeros_like(b)
        if (bias := self.recurrent_bias()) is not None:
            b_hh[-self.hidden_size:] = bias
        return {"weight_ih": w_x.clone(), "weight_hh": w_h.clone(), "bias_ih": b.clone(), "bias_hh": b_hh}

    @torch.no_grad()
    def load_fused_weights(self, weights: dict[str, Tensor]) -> None:
        """Take torch.nn's layout (the inverse of :meth:`fused_weights`): ``bias_ih + bias_hh`` becomes ``b``, but
        for the block :meth:`recurrent_bias` keeps apart."""
        hidden, apart = self.hidden_size, self.recurrent_bias()
        for n, gate in enumerate(self.gate_letters):
            rows = slice(n * hidden, (n + 1) * hidden)
            last = n == len(self.gate_letters) - 1
            getattr(self, f"W_x{gate}").copy_(weights["weight_ih"][rows])
            getattr(self, f"W_h{gate}").copy_(weights["weight_hh"][rows])
            recurrent = 0 if (apart is not None and last) else weights["bias_hh"][rows]
            getattr(self, f"b_{gate}" if gate else "b").copy_(weights["bias_ih"][rows] + recurrent)
        if apart is not None:
            apart.copy_(weights["bias_hh"][-hidden:])


def run_steps(step, xw: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``h_t = step(xw_t, h_{t-1})`` for every t: xw (B, T, G*H) holds ``W_x x_t + b`` -> h_1..h_T (B, T, H) and
    h_T."""
    outputs = []
    for xw_t in xw.unbind(1):  # unbound once: indexing xw[:, t] would make a zero-filled gradient at every step
        h = step(xw_t, h)
        outputs.append(h)
    return torch.stack(outputs, 1), h
