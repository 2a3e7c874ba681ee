"""The LSTM (Hochreiter and Schmidhuber 1997, with the forget gate of Gers et al. 2000)::

    i_t = σ(W_xi x_t + W_hi h_{t-1} + b_i)      input gate
    f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)      forget gate
    g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)   candidate
    o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)      output gate
    C_t = f_t∘C_{t-1} + i_t∘g_t                 cell state
    h_t = o_t∘tanh(C_t)

Its state is the pair (h, C); the cell state's additive update carries gradients across many steps.

``model.forget_bias=1`` starts b_f at 1 rather than drawing it like the other biases (as Jozefowicz et al. 2015
advise): f_t starts near σ(1) = 0.73 rather than 0.5, so the cell state keeps more of itself from the first
step, and gradients reach further back while the weights are still small.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlm.cells.fused import ONEDNN_LINEAR, FusedCell
from rnnlm.cells.textbook import TextbookCell
from rnnlm.schema import number
from rnnlm.state import CellState

SETTINGS = {"forget_bias": number(null=True)}


@torch.no_grad()
def start_forget_gate(blocks: list[Tensor], value: float | None) -> None:
    """Start b_f, the forget gate's bias, at ``value`` (None: leave it as drawn). ``blocks`` are the forget-gate
    parts (H,) of the biases whose sum is b_f: the first takes ``value``, the others 0. It runs after every weight
    is drawn, so that a seed draws the same weights with it or without."""
    if value is None:
        return
    blocks[0].fill_(value)
    for block in blocks[1:]:
        block.zero_()


def lstm_update(preactivations: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step's h_t and C_t from ``W_x x + W_h h + b`` (B, 4H), blocks in the order i, f, g, o, and C_{t-1}."""
    i, f, g, o = preactivations.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # C_t = f_t∘C_{t-1} + i_t∘g_t
    return torch.sigmoid(o) * torch.tanh(c), c  # h_t = o_t∘tanh(C_t)


def lstm_gates(preactivations: Tensor) -> dict[str, Tensor]:
    """The sigmoid gates from ``W_x x + W_h h + b`` (B, 4H), blocks in the order i, f, g, o."""
    i, f, _, o = preactivations.chunk(4, -1)
    return {"input": torch.sigmoid(i), "forget": torch.sigmoid(f), "output": torch.sigmoid(o)}


class FusedLSTM(FusedCell):
    """The LSTM on torch's kernels (``torch.nn.LSTM``'s weights; torch.nn keeps two biases, ``b`` is their sum)."""

    settings = SETTINGS
    state_names = ("h", "c")
    gate_names = ("input", "forget", "output")
    gate_count = 4
    kernel = torch.lstm
    packs = True

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float | None = None):
        super().__init__(input_size, hidden_size)
        self.forget_bias = forget_bias
        forget = slice(hidden_size, 2 * hidden_size)  # torch.nn's blocks: i, f, g, o
        start_forget_gate([self.bias_ih[forget], self.bias_hh[forget]], forget_bias)

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h, c = torch.lstm_cell(x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h, (h, c)

    def update(self, xw: Tensor, hw: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        h, c = lstm_update(xw.add_(hw), state[1])
        return h, (h, c)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        return lstm_gates(self.gate_preactivations(x, state[0]))


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` (no autograd: for code that writes its own backward)."""
    usable = ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
    if usable and not torch.compiler.is_compiling():  # the compiler cannot lower this op: it fuses its own
        return ONEDNN_LINEAR(x, w, None, "none", [], "")
    return x @ w.t()


class LSTMLoop(torch.autograd.Function):
    """The LSTM recurrence over a whole sequence, with back-propagation through time written out.

    The equations above; writing the backward by hand lets every step run as a
    handful of kernels and the recurrent weights' gradient as one product over all steps, which
    autograd, recording a dozen small operations per step, cannot.
    """

    @staticmethod
    def forward(ctx, xw: Tensor, h: Tensor, c: Tensor, w_h: Tensor):
        # xw (T, B, 4H): W_x x_t + b for every t, gates in the order i, f, g, o; h, c (B, H); w_h (4H, H)
        steps, hidden = xw.size(0), h.size(1)
        acts = torch.empty_like(xw)  # σ(i), σ(f), tanh(g), σ(o) of every step
        cs = xw.new_empty(steps + 1, *c.shape)  # C_0 .. C_T
        hs = xw.new_empty(steps + 1, *h.shape)  # h_0 .. h_T
        tanh_cs = xw.new_empty(steps, *c.shape)  # tanh(C_1) .. tanh(C_T)
        cs[0], hs[0] = c, h
        for t in range(steps):
            gates = linear(hs[t], w_h).add_(xw[t])  # W_x x_t + W_h h_{t-1} + b
            a = acts[t]
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[:, 2 * hidden : 3 * hidden], out=a[:, 2 * hidden : 3 * hidden])
            i, f, g, o = a.split(hidden, 1)
            torch.addcmul(f * cs[t], i, g, out=cs[t + 1])  # C_t = f_t∘C_{t-1} + i_t∘g_t
            torch.mul(o, torch.tanh(cs[t + 1], out=tanh_cs[t]), out=hs[t + 1])  # h_t = o_t∘tanh(C_t)
        ctx.save_for_backward(acts, cs, tanh_cs, hs, w_h)
        return hs[1:], cs[steps].clone()

    @staticmethod
    def backward(ctx, d_hs: Tensor, d_c_last: Tensor | None):
        acts, cs, tanh_cs, hs, w_h = ctx.saved_tensors
        steps, _, gates = acts.shape
        hidden = gates // 4
        d_gates = torch.empty_like(acts)  # gradients of the gates' pre-activations
        w_h_t = w_h.t().contiguous()
        dh = torch.zeros_like(hs[0])
        dc = d_c_last.clone() if d_c_last is not None else torch.zeros_like(dh)
        for t in range(steps - 1, -1, -1):
            a, tanh_c, d = acts[t], tanh_cs[t], d_gates[t]
            i, f, g, o = a.split(hidden, 1)
            dh = dh + d_hs[t]
            dc = torch.addcmul(dc, dh, o * (1 - tanh_c * tanh_c))  # h_t = o∘tanh(C_t)
            # ∂L/∂gate outputs: i <- dC∘g, f <- dC∘C_{t-1}, g <- dC∘i, o <- dh∘tanh(C_t)
            torch.mul(dc, g, out=d[:, :hidden])
            torch.mul(dc, cs[t], out=d[:, hidden : 2 * hidden])
            torch.mul(dc, i, out=d[:, 2 * hidden : 3 * hidden])
            torch.mul(dh, tanh_c, out=d[:, 3 * hidden :])
            slope = a - a * a  # σ' = σ(1-σ) for i, f, o ...
            slope[:, 2 * hidden : 3 * hidden] = 1 - g * g  # ... and tanh' = 1 - tanh² for g
            d.mul_(slope)
            dh = linear(d, w_h_t)  # into h_{t-1}
            dc = dc * f  # into C_{t-1}
        d_w_h = d_gates.reshape(-1, gates).t() @ hs[:-1].reshape(-1, hidden)  # one product for all steps
        return d_gates, dh, dc, d_w_h


class ScratchLSTM(TextbookCell):
    """The LSTM as written above: :class:`LSTMLoop` runs it over time, with back-propagation through time written
    out."""

    settings = SETTINGS
    state_names = ("h", "c")
    gate_names = ("input", "forget", "output")
    gate_letters = ("i", "f", "g", "o")

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float | None = None):
        super().__init__(input_size, hidden_size)
        self.forget_bias = forget_bias
        start_forget_gate([self.b_f], forget_bias)

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        w_h = self.drop_recurrent(w_h)
        xw = xw.transpose(0, 1).contiguous()  # (T, B, 4H)
        hs, c = LSTMLoop.apply(xw, state[0], state[1], w_h)
        return hs.transpose(0, 1), (hs[-1], c)

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        xw, w_h = self.projected(x)
        h, c = lstm_update(xw + state[0] @ w_h.t(), state[1])
        return h, (h, c)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        xw, w_h = self.projected(x)
        return lstm_gates(xw + state[0] @ w_h.t())
