"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201): recurrent cells whose
gates read the input alone, so that a whole sequence can be computed at once.

Both cells are one linear recurrence per unit, ``h_t = a_t∘h_{t-1} + b_t``, with ``a_t`` and ``b_t`` functions of
``x_t`` only::

    minGRU:  z_t = σ(W_xz x_t + b_z)          update gate
             h̃_t = g(W_xh x_t + b_h)          candidate
             h_t = (1 - z_t)∘h_{t-1} + z_t∘h̃_t                    a_t = 1 - z_t,  b_t = z_t∘h̃_t

    minLSTM: f_t = σ(W_xf x_t + b_f)          forget gate
             i_t = σ(W_xi x_t + b_i)          input gate
             h̃_t = g(W_xh x_t + b_h)          candidate
             f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
             h_t = f'_t∘h_{t-1} + i'_t∘h̃_t                         a_t = f'_t,     b_t = i'_t∘h̃_t

    g(x) = x + 0.5 for x >= 0, σ(x) otherwise: positive, so h stays positive from a positive (or zero) start

Training runs the recurrence as a parallel scan in log space (Heinsen 2023, arXiv 2311.06281): with
``a*_t = Σ_{s<=t} log a_s``, ``log h_t = a*_t + logcumsumexp_t(log b_t - a*_t)`` from a zero start, all steps at
once. Step by step (``parallel=False``, and generation) it is the loop over ``h_t = a_t∘h_{t-1} + b_t`` in
ordinary space. Both read the same parameters, and both take minLSTM's ``f'_t`` and ``i'_t`` from
``log i_t - log f_t``: σ underflows to 0 below about -88 in float32 (-709 in float64), where ``f / (f + i)`` would
be 0/0, and its log does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cells import run_layers, uniform_matrix, uniform_vector
from rnnlm.regularization import sequence_dropout

MIN_CELLS = ("mingru", "minlstm")
GATES = {"mingru": ("z", "h"), "minlstm": ("f", "i", "h")}  # h: the candidate h̃
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


def log_i_over_f(k_f: Tensor, k_i: Tensor) -> Tensor:
    """minLSTM's ``log i - log f`` from the gates' pre-activations: ``f' = f / (f + i) = σ(-(log i - log f))`` and
    ``i' = σ(log i - log f)``. With ``log σ(k) = -softplus(-k)`` it stays finite where σ(k_f) and σ(k_i) both round
    to 0 and ``f / (f + i)`` would be 0/0."""
    return F.softplus(-k_f) - F.softplus(-k_i)


def coefficients(cell: str, pre: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` of ``h_t = a_t∘h_{t-1} + b_t`` from the pre-activations ``W_x x + b`` (..., G*H), gates in
    :data:`GATES` order -> two (..., H)."""
    if cell == "mingru":
        k_z, k_h = pre.chunk(2, -1)
        # 1 - σ(k) = σ(-k): exact where σ(k) rounds to 1
        return torch.sigmoid(-k_z), torch.sigmoid(k_z) * g(k_h)  # h_t = (1 - z_t)∘h_{t-1} + z_t∘h̃_t
    k_f, k_i, k_h = pre.chunk(3, -1)
    diff = log_i_over_f(k_f, k_i)
    return torch.sigmoid(-diff), torch.sigmoid(diff) * g(k_h)  # h_t = f'_t∘h_{t-1} + i'_t∘h̃_t


def log_coefficients(cell: str, pre: Tensor) -> tuple[Tensor, Tensor]:
    """``log a`` and ``log b`` of :func:`coefficients`, computed in log space (no log of a rounded-off zero)."""
    if cell == "mingru":
        k_z, k_h = pre.chunk(2, -1)
        # log(1 - σ(k)) = -softplus(k), log σ(k) = -softplus(-k)
        return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)
    k_f, k_i, k_h = pre.chunk(3, -1)
    # log f' = log σ(-diff) = -softplus(diff), log i' = -softplus(-diff)
    diff = log_i_over_f(k_f, k_i)
    return -F.softplus(diff), -F.softplus(-diff) + log_g(k_h)


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


class MinCell(nn.Module):
    """One layer and direction: ``W_x<gate>`` (H, I) and ``b_<gate>`` (H,) for every gate of :data:`GATES`, and
    no hidden-to-hidden matrix."""

    def __init__(self, cell: str, input_size: int, hidden_size: int):
        super().__init__()
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        for gate in GATES[cell]:  # torch.nn's initialisation, as the other cells: uniform(-1/sqrt(H), 1/sqrt(H))
            self.register_parameter(f"W_x{gate}", uniform_matrix(hidden_size, input_size, hidden_size))
            self.register_parameter(f"b_{gate}", uniform_vector(hidden_size, hidden_size))

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The per-gate weights stacked in :data:`GATES` order: W_x (G*H, I), b (G*H,)."""
        gates = GATES[self.cell]
        return (torch.cat([getattr(self, f"W_x{gate}") for gate in gates]),
                torch.cat([getattr(self, f"b_{gate}") for gate in gates]))

    def scan(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (B, T, I) from h_0 (B, H) -> h (B, T, H), all steps at once: the log-space parallel scan."""
        pre = F.linear(x, *self.stacked())  # (B, T, G*H): every gate of every step in one product
        # in float32 at least: the logs and cumulative sums of the scan need more digits than bfloat16's three
        wide = torch.promote_types(pre.dtype, torch.float32)
        log_a, log_b = log_coefficients(self.cell, pre.to(wide))
        return parallel_scan(log_a, log_b, h0.to(wide)).to(pre.dtype)

    def loop(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (B, T, I) from h_0 (B, H) -> h (B, T, H), one step after another, in ordinary space."""
        a, b = coefficients(self.cell, F.linear(x, *self.stacked()))  # the gates read x alone: all steps at once
        h, hs = h0, []
        # unbound once: the backward of indexing a[:, t] would write a zero-filled (B, T, H) gradient at every step
        for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):
            h = a_t * h + b_t  # h_t = a_t∘h_{t-1} + b_t
            hs.append(h)
        return torch.stack(hs, 1)


class MinRecurrent(nn.Module):
    """Stacked, optionally bidirectional layers of minGRU or minLSTM, with ``torch.nn.GRU``'s interface (batch first).

    Args:
        cell: ``mingru`` or ``minlstm``.
        dropout: between layers, in training (``locked``: one mask per sequence).
        bidirectional: a second cell per layer reads the sequence backwards; each later layer reads both
            directions' outputs, concatenated.
        parallel: the log-space parallel scan (``impl=fused``), or the step-by-step loop (``impl=scratch``);
            the same parameters (``cells.<k>.W_x<gate>``, ``cells.<k>.b_<gate>``, k = layer * D + direction).

    forward(x (B, T, I), state (num_layers * D, B, H) or None) -> outputs (B, T, D*H) of the top layer, forward
    direction first, and the final state (num_layers * D, B, H), layer-major, forward direction first. minLSTM has
    no cell state: its state is h alone, as minGRU's.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False, parallel: bool = True, locked: bool = False):
        super().__init__()
        if cell not in MIN_CELLS:
            raise ValueError(f"cell={cell} must be one of {'|'.join(MIN_CELLS)}")
        self.cell, self.input_size, self.hidden_size, self.num_layers = cell, input_size, hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        self.dropout, self.parallel, self.locked = dropout, parallel, locked
        self.cells = nn.ModuleList(
            MinCell(cell, input_size if k < self.directions else hidden_size * self.directions, hidden_size)
            for k in range(num_layers * self.directions)
        )

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if state is None:
            state = x.new_zeros(self.num_layers * self.directions, x.size(0), self.hidden_size)

        def run_direction(k: int, x: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
            run = self.cells[k].scan if self.parallel else self.cells[k].loop
            h = run(x.flip(1) if reverse else x, state[k])  # (B, T, H); reversed, the final state is after x_0
            return (h.flip(1) if reverse else h), h[:, -1]

        x, finals = run_layers(x, self.num_layers, self.directions,
                               lambda x: sequence_dropout(x, self.dropout, self.locked, self.training), run_direction)
        return x, torch.stack(finals)
