"""What minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201) share: gates that read
the input alone, so that each cell is one linear recurrence per unit, ``h_t = a_t∘h_{t-1} + b_t`` with ``a_t`` and
``b_t`` functions of ``x_t`` only, which a whole sequence can compute at once. Their equations are in
:mod:`rnnlm.cells.mingru` and :mod:`rnnlm.cells.minlstm`.

Training runs the recurrence as a parallel scan in log space (Heinsen 2023, arXiv 2311.06281): with
``a*_t = Σ_{s<=t} log a_s``, ``log h_t = a*_t + logcumsumexp_t(log b_t - a*_t)`` from a zero start, all steps at
once (``impl=fused``). Step by step (``impl=scratch``, and generation) it is the loop over ``h_t = a_t∘h_{t-1} + b_t``
in ordinary space. Both read the same parameters.

The candidate's activation ``g(x) = x + 0.5`` for x >= 0, ``σ(x)`` otherwise, is positive, so h stays positive from
a positive (or zero) start.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlm.cells.protocol import RecurrentCell, uniform_parameter
from rnnlm.state import CellState

# The scan runs over chunks of this many steps, each starting from the previous chunk's last state, which keeps
# the prefix sums a*_t of parallel_scan short (see there) and was faster on a CPU than one piece
# (benchmarks/scan_speed.py).
SCAN_CHUNK = 64


def g(x: Tensor) -> Tensor:
    """The candidate's activation: ``x + 0.5`` for x >= 0, ``σ(x)`` below; continuous, positive, unbounded above."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """``log g(x)``, with ``log σ(x) = -softplus(-x)``; relu keeps the unused branch's log finite (no NaN gradient)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def parallel_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """``h_t = a_t∘h_{t-1} + b_t`` for every t at once: log a, log b (B, T, H) and h_0 (B, H) -> h (B, T, H).

    Unrolled, ``h_t = exp(a*_t) h_0 + Σ_{s<=t} exp(a*_t - a*_s) b_s`` with ``a*_t = Σ_{s<=t} log a_s``; the sum is
    ``exp(a*_t + logcumsumexp_t(log b_t - a*_t))`` (Heinsen 2023). h_0 enters linearly, as its own term, so it
    may be zero or negative (no log of it), and its gradient is exact.

    The sum's log is computed in float64 whatever the inputs' dtype: it adds and subtracts prefix sums of size
    |a*_t|, which grows by |log a_s| per step (100 per step for a gate pre-activation of 100), so float32 would lose
    about |a*_t| * 6e-8 of log h_t: h was off by 5e-5 (relative, against a float64 loop) with pre-activations of
    standard deviation 10, and by 2e-3 with 1,000. In float64 the error is that of log a and log b themselves
    (1e-6). MPS has no float64: there the sums stay in the inputs' dtype.
    """
    sums = log_a.dtype if log_a.device.type == "mps" else torch.float64
    hs = []
    for la, lb in zip(log_a.split(SCAN_CHUNK, 1), log_b.split(SCAN_CHUNK, 1), strict=True):
        a_star = la.to(sums).cumsum(1)  # (B, t, H)
        log_sum = (a_star + torch.logcumsumexp(lb.to(sums) - a_star, 1)).to(la.dtype)  # small again: back in dtype
        h = torch.exp(log_sum) + torch.exp(a_star.to(la.dtype)) * h0.unsqueeze(1)
        hs.append(h)
        h0 = h[:, -1]
    return hs[0] if len(hs) == 1 else torch.cat(hs, 1)


class ScanCell(RecurrentCell):
    """``W_x<gate>`` (H, I) and ``b_<gate>`` (H,) for every gate of ``gate_letters``, and no hidden-to-hidden
    matrix. Subclasses give the recurrence's coefficients from the pre-activations ``W_x x + b`` (..., G*H), gates
    in ``gate_letters`` order: :meth:`coefficients` (a, b) and :meth:`log_coefficients` (log a, log b)."""

    gate_letters: ClassVar[tuple[str, ...]]
    parallel: ClassVar[bool] = True  # the log-space scan (impl=fused); False: the loop (impl=scratch)

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        for gate in self.gate_letters:  # torch.nn's initialisation, as the other cells: uniform(-1/sqrt(H), 1/sqrt(H))
            self.register_parameter(f"W_x{gate}", uniform_parameter(hidden_size, input_size, hidden_size=hidden_size))
            self.register_parameter(f"b_{gate}", uniform_parameter(hidden_size, hidden_size=hidden_size))

    @staticmethod
    def coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @staticmethod
    def log_coefficients(pre: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The per-gate weights stacked in ``gate_letters`` order: W_x (G*H, I), b (G*H,)."""
        return (torch.cat([getattr(self, f"W_x{gate}") for gate in self.gate_letters]),
                torch.cat([getattr(self, f"b_{gate}") for gate in self.gate_letters]))

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h = self.scan(x, state[0]) if self.parallel else self.loop(x, state[0])
        return h, (h[:, -1],)

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        a, b = self.coefficients(F.linear(x, *self.stacked()))
        h = torch.addcmul(b, a, state[0])  # h_t = a_t∘h_{t-1} + b_t
        return h, (h,)

    def scan(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (B, T, I) from h_0 (B, H) -> h (B, T, H), all steps at once: the log-space parallel scan."""
        pre = F.linear(x, *self.stacked())  # (B, T, G*H): every gate of every step in one product
        # in float32 at least: the logs and cumulative sums of the scan need more digits than bfloat16's three
        wide = torch.promote_types(pre.dtype, torch.float32)
        log_a, log_b = self.log_coefficients(pre.to(wide))
        return parallel_scan(log_a, log_b, h0.to(wide)).to(pre.dtype)

    def loop(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (B, T, I) from h_0 (B, H) -> h (B, T, H), one step after another, in ordinary space."""
        a, b = self.coefficients(F.linear(x, *self.stacked()))  # the gates read x alone: all steps at once
        h, hs = h0, []
        # unbound once: the backward of indexing a[:, t] would write a zero-filled (B, T, H) gradient at every step
        for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):
            h = a_t * h + b_t  # h_t = a_t∘h_{t-1} + b_t
            hs.append(h)
        return torch.stack(hs, 1)
