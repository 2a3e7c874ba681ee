"""Recurrent cells written from the textbook equations, and the layers that run them over time.

Each cell keeps one weight matrix per input and gate, named as in the equation it computes
(``W_xi`` multiplies ``x_t`` for the input gate, ``W_hi`` multiplies ``h_{t-1}``). For speed the
layer concatenates a cell's per-gate matrices once per call, projects the whole input sequence in
one product, and leaves a single ``h_{t-1}`` product per step in the time loop; the arithmetic is
the same as the equations.

:class:`ScratchRecurrent` has the interface of ``torch.nn.RNN/LSTM/GRU`` (batch first), and
:func:`to_fused` / :func:`from_fused` convert the weights both ways, so the two give the same
outputs for the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.regularization import sequence_dropout

GATES = {"rnn": ("",), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "g")}  # torch.nn's gate order


def uniform_matrix(rows: int, cols: int, hidden_size: int) -> nn.Parameter:
    bound = hidden_size**-0.5  # torch.nn's initialisation: uniform(-1/sqrt(H), 1/sqrt(H))
    return nn.Parameter(torch.empty(rows, cols).uniform_(-bound, bound))


def uniform_vector(size: int, hidden_size: int) -> nn.Parameter:
    bound = hidden_size**-0.5
    return nn.Parameter(torch.empty(size).uniform_(-bound, bound))


class Cell(nn.Module):
    """A cell with ``W_x<gate>`` (H, I), ``W_h<gate>`` (H, H) and ``b_<gate>`` (H,) for every gate."""

    kind = ""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        for gate in GATES[self.kind]:
            self.register_parameter(f"W_x{gate}", uniform_matrix(hidden_size, input_size, hidden_size))
            self.register_parameter(f"W_h{gate}", uniform_matrix(hidden_size, hidden_size, hidden_size))
            self.register_parameter(f"b_{gate}" if gate else "b", uniform_vector(hidden_size, hidden_size))

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """The per-gate matrices stacked in torch.nn's gate order: W_x (G*H, I), W_h (G*H, H), b (G*H,)."""
        gates = GATES[self.kind]
        return (
            torch.cat([getattr(self, f"W_x{g}") for g in gates]),
            torch.cat([getattr(self, f"W_h{g}") for g in gates]),
            torch.cat([getattr(self, f"b_{g}" if g else "b") for g in gates]),
        )

    def input_part(self, x: Tensor) -> Tensor:
        """``W_x x + b`` for every gate, for all steps at once: (..., I) -> (..., G*H)."""
        w_x, _, b = self.stacked()
        return torch.addmm(b, x.reshape(-1, x.size(-1)), w_x.t()).view(*x.shape[:-1], -1)


class RNNCell(Cell):
    """Vanilla RNN: ``h_t = tanh(W_x x_t + W_h h_{t-1} + b)`` (or relu)."""

    kind = "rnn"

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh"):
        super().__init__(input_size, hidden_size)
        self.activation = torch.relu if nonlinearity == "relu" else torch.tanh

    def step(self, xw: Tensor, h: Tensor, w_h: Tensor, b_h: Tensor | None = None) -> Tensor:
        # xw = W_x x_t + b
        return self.activation(xw + h @ w_h.t())


def _probe_onednn_linear():
    """oneDNN's linear kernel, when this torch build has it: at the small batch of a recurrent step it
    multiplies about twice as fast as the default BLAS on the CPUs measured (benchmarks/cells_speed.py)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if torch.equal(op(x, w, None, "none", [], ""), x @ w.t()):
            return op
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _probe_onednn_linear()


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` (no autograd: for code that writes its own backward)."""
    usable = _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
    if usable and not torch.compiler.is_compiling():  # the compiler cannot lower this op: it fuses its own
        return _ONEDNN_LINEAR(x, w, None, "none", [], "")
    return x @ w.t()


class LSTMLoop(torch.autograd.Function):
    """The LSTM recurrence over a whole sequence, with back-propagation through time written out.

    The equations of :class:`LSTMCell`; writing the backward by hand lets every step run as a
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


class LSTMCell(Cell):
    """LSTM::

        i_t = σ(W_xi x_t + W_hi h_{t-1} + b_i)      input gate
        f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)      forget gate
        g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)   candidate
        o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)      output gate
        C_t = f_t∘C_{t-1} + i_t∘g_t
        h_t = o_t∘tanh(C_t)
    """

    kind = "lstm"  # run over time by LSTMLoop, which computes these equations with its own backward


class GRUCell(Cell):
    """GRU::

        r_t = σ(W_xr x_t + W_hr h_{t-1} + b_r)                reset gate
        z_t = σ(W_xz x_t + W_hz h_{t-1} + b_z)                update gate
        g_t = tanh(W_hg (r_t∘h_{t-1}) + W_xg x_t + b_g)        reset_after=False (Cho et al. 2014, Keras
                                                               reset_after=False): reset, then multiply
        g_t = tanh(W_xg x_t + b_g + r_t∘(W_hg h_{t-1} + b_hg)) reset_after=True (torch.nn.GRU, cuDNN,
                                                               Keras' default): multiply, then reset
        h_t = (1-z_t)∘g_t + z_t∘h_{t-1}

    The two forms differ only in whether the reset gate scales ``h_{t-1}`` before the recurrent
    matrix or its product after it; only the reset-after form matches ``torch.nn.GRU`` (which also
    needs the extra bias ``b_hg`` inside the reset).
    """

    kind = "gru"

    def __init__(self, input_size: int, hidden_size: int, reset_after: bool = True):
        super().__init__(input_size, hidden_size)
        self.reset_after = reset_after
        if reset_after:
            self.b_hg = uniform_vector(hidden_size, hidden_size)

    def step(self, xw: Tensor, h: Tensor, w_h: Tensor, b_h: Tensor | None = None) -> Tensor:
        xr, xz, xg = xw.chunk(3, -1)
        hidden = self.hidden_size
        w_hrz, w_hg = w_h[: 2 * hidden], w_h[2 * hidden :]
        hr, hz = (h @ w_hrz.t()).chunk(2, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        if self.reset_after:
            g = torch.tanh(xg + r * (h @ w_hg.t() + b_h))
        else:
            g = torch.tanh((r * h) @ w_hg.t() + xg)
        return (1 - z) * g + z * h


def make_cell(kind: str, input_size: int, hidden_size: int, nonlinearity: str = "tanh",
              reset_after: bool = True) -> Cell:
    if kind == "rnn":
        return RNNCell(input_size, hidden_size, nonlinearity)
    if kind == "lstm":
        return LSTMCell(input_size, hidden_size)
    return GRUCell(input_size, hidden_size, reset_after)


def run_cell(cell: Cell, x: Tensor, state, reverse: bool = False, weight_drop: float = 0.0) -> tuple[Tensor, object]:
    """Run ``cell`` over x (B, T, I) from ``state`` -> outputs (B, T, H) and the final state. ``weight_drop``:
    the recurrent matrices are read through one dropout mask for the whole sequence (DropConnect)."""
    w_h = F.dropout(cell.stacked()[1], weight_drop) if weight_drop else cell.stacked()[1]
    if isinstance(cell, LSTMCell):
        xw = cell.input_part(x.flip(1) if reverse else x).transpose(0, 1).contiguous()  # (T, B, 4H)
        hs, c = LSTMLoop.apply(xw, state[0], state[1], w_h)
        outputs = hs.transpose(0, 1)
        return (outputs.flip(1) if reverse else outputs), (hs[-1], c)
    xws = cell.input_part(x).unbind(1)  # W_x x_t + b for every t, in one product
    b_h = getattr(cell, "b_hg", None)
    steps = range(len(xws) - 1, -1, -1) if reverse else range(len(xws))
    outputs = [None] * len(xws)
    for t in steps:
        state = cell.step(xws[t], state, w_h, b_h)
        outputs[t] = state[0] if isinstance(state, tuple) else state
    return torch.stack(outputs, 1), state


def run_layers(x: Tensor, num_layers: int, directions: int, between, run_direction) -> tuple[Tensor, list]:
    """Walk a stack layer by layer: ``between(x)`` (dropout) before every layer but the first, then each
    direction's ``run_direction(k, x, reverse) -> (outputs (B, T, H) in input order, final state)``, k = layer *
    directions + direction -> the top layer's outputs (B, T, D*H), directions concatenated, and the final states
    in that order (torch.nn's: layer-major, forward direction first)."""
    finals = []
    for layer in range(num_layers):
        if layer > 0:
            x = between(x)
        outputs = []
        for direction in range(directions):
            out, final = run_direction(layer * directions + direction, x, direction == 1)
            outputs.append(out)
            finals.append(final)
        x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
    return x, finals


class ScratchRecurrent(nn.Module):
    """Stacked, optionally bidirectional layers of textbook cells, with ``torch.nn.RNN``'s interface.

    forward(x (B, T, I), state) -> outputs (B, T, D*H) of the top layer (directions concatenated)
    and the final state (num_layers*D, B, H) [and the cell state for LSTM], layer-major, forward
    direction first, as torch.nn returns it. Dropout applies between layers in training (one mask per sequence
    with ``locked``), and ``weight_drop`` to the recurrent matrices (:class:`~rnnlm.backbone.RecurrentBackbone`).
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False, nonlinearity: str = "tanh", reset_after: bool = True,
                 weight_drop: float = 0.0, locked: bool = False):
        super().__init__()
        self.mode, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        self.dropout, self.weight_drop, self.locked = dropout, weight_drop, locked
        self.cells = nn.ModuleList(
            make_cell(cell, input_size if k < self.directions else hidden_size * self.directions, hidden_size,
                      nonlinearity, reset_after)
            for k in range(num_layers * self.directions)
        )

    def forward(self, x: Tensor, state=None):
        batch = x.size(0)
        if state is None:
            zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            state = (zeros, zeros) if self.mode == "lstm" else zeros

        def run_direction(k: int, x: Tensor, reverse: bool):
            start = (state[0][k], state[1][k]) if self.mode == "lstm" else state[k]
            return run_cell(self.cells[k], x, start, reverse, self.weight_drop if self.training else 0.0)

        x, finals = run_layers(x, self.num_layers, self.directions,
                               lambda x: sequence_dropout(x, self.dropout, self.locked, self.training), run_direction)
        if self.mode == "lstm":
            return x, (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        return x, torch.stack(finals)


def _fused_suffix(k: int, directions: int) -> str:
    """torch.nn's parameter suffix of the k-th cell (layer-major, forward direction first)."""
    layer, direction = divmod(k, directions)
    return f"l{layer}" + ("_reverse" if direction else "")


RESET_BEFORE_HAS_NO_FUSED_FORM = (
    "a reset-before GRU (reset_after=False) has no fused form: torch.nn.GRU computes only the reset-after GRU, "
    "so its weights cannot be converted to or from torch.nn's layout; keep impl=scratch (copy weights with "
    "state_dict), or use reset_after=True"
)


def _is_reset_before(cell: Cell) -> bool:
    return cell.kind == "gru" and not cell.reset_after


@torch.no_grad()
def to_fused(scratch: ScratchRecurrent, strict: bool = True) -> dict[str, Tensor]:
    """A ``torch.nn.RNN/LSTM/GRU`` state dict with the same function as ``scratch``.

    The textbook bias ``b`` becomes ``bias_ih`` (``bias_hh`` is zero), except a reset-after GRU's
    candidate, whose recurrent bias ``b_hg`` is ``bias_hh``'s last block.

    Raises:
        ValueError: a reset-before GRU, unless ``strict=False``: then its matrices come in the same layout
            for code that computes that form itself (:class:`rnnlm.sampling.Stepper`); torch.nn.GRU cannot.
    """
    out = {}
    for k, cell in enumerate(scratch.cells):
        if strict and _is_reset_before(cell):
            raise ValueError(RESET_BEFORE_HAS_NO_FUSED_FORM)
        suffix = _fused_suffix(k, scratch.directions)
        w_x, w_h, b = cell.stacked()
        b_hh = torch.zeros_like(b)
        if cell.kind == "gru" and cell.reset_after:
            b_hh[2 * cell.hidden_size :] = cell.b_hg
        out.update({f"weight_ih_{suffix}": w_x.clone(), f"weight_hh_{suffix}": w_h.clone(),
                    f"bias_ih_{suffix}": b.clone(), f"bias_hh_{suffix}": b_hh})
    return out


@torch.no_grad()
def from_fused(scratch: ScratchRecurrent, fused: dict[str, Tensor]) -> None:
    """Load a ``torch.nn.RNN/LSTM/GRU`` state dict into ``scratch`` (the inverse of :func:`to_fused`).

    Raises:
        ValueError: ``scratch`` is a reset-before GRU, which torch.nn's weights cannot describe (nothing is loaded).
    """
    if any(_is_reset_before(cell) for cell in scratch.cells):
        raise ValueError(RESET_BEFORE_HAS_NO_FUSED_FORM)
    for k, cell in enumerate(scratch.cells):
        suffix = _fused_suffix(k, scratch.directions)
        w_x, w_h = fused[f"weight_ih_{suffix}"], fused[f"weight_hh_{suffix}"]
        b_ih, b_hh = fused[f"bias_ih_{suffix}"], fused[f"bias_hh_{suffix}"]
        hidden = cell.hidden_size
        gates = GATES[cell.kind]
        for n, gate in enumerate(gates):
            rows = slice(n * hidden, (n + 1) * hidden)
            getattr(cell, f"W_x{gate}").copy_(w_x[rows])
            getattr(cell, f"W_h{gate}").copy_(w_h[rows])
            recurrent_bias = b_hh[rows] if not (cell.kind == "gru" and gate == "g") else 0
            getattr(cell, f"b_{gate}" if gate else "b").copy_(b_ih[rows] + recurrent_bias)
        if cell.kind == "gru":
            cell.b_hg.copy_(b_hh[2 * hidden :])
