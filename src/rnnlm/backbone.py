"""The recurrent stack: fused ``torch.nn`` kernels or the textbook cells, and a Keras-style view of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cells import ScratchRecurrent, from_fused, to_fused
from rnnlm.minrnn import MIN_CELLS, MinRecurrent
from rnnlm.regularization import sequence_dropout

FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}  # torch.nn's kernels
# torch.nn's functional kernels, with the weights as arguments (what FUSED's modules call with their own)
_KERNELS = {"lstm": torch.lstm, "gru": torch.gru, ("rnn", "tanh"): torch.rnn_tanh, ("rnn", "relu"): torch.rnn_relu}
CELLS = (*FUSED, *MIN_CELLS)
NONLINEARITIES = ("tanh", "relu")
IMPLS = ("fused", "scratch")
MERGE_MODES = ("concat", "sum", "mul", "ave", None)  # None: the two directions' outputs apart, as in Keras
_MERGE_CHOICES = "|".join(str(mode) for mode in MERGE_MODES)

State = Tensor | tuple[Tensor, Tensor]  # h, or (h, c) for LSTM; each (num_layers * directions, B, H)


def map_state(state: State | None, fn) -> State | None:
    """``fn`` applied to each tensor of a state (h, or the (h, c) pair); None stays None."""
    if state is None:
        return None
    return tuple(fn(s) for s in state) if isinstance(state, (tuple, list)) else fn(state)


def detach_state(state: State | None) -> State | None:
    """Keep the state's values but cut the graph: gradients stop at the chunk boundary (truncated BPTT)."""
    return map_state(state, torch.Tensor.detach)


class RecurrentBackbone(nn.Module):
    """Stacked (and optionally bidirectional) recurrent layers, batch first.

    Args:
        cell: ``rnn`` (``h_t = act(W_x x_t + W_h h_{t-1} + b)``), ``lstm``, ``gru``, or ``mingru`` / ``minlstm``
            (:mod:`rnnlm.minrnn`, gates that read only the input).
        dropout: applied to the outputs of every layer but the last.
        nonlinearity: ``tanh`` or ``relu``; vanilla RNN only.
        bidirectional: a second stack reads the sequence backwards; each layer after the first reads
            both directions' outputs, concatenated (as torch.nn and cuDNN do).
        impl: ``fused`` (torch.nn kernels; for minGRU/minLSTM the parallel scan) or ``scratch``
            (:mod:`rnnlm.cells`; for minGRU/minLSTM the step-by-step loop); same weights, same outputs.
        reset_after: GRU only; ``False`` (the original GRU) exists in the scratch cells alone.
        weight_drop: in training, DropConnect on the hidden-to-hidden matrices: each forward call reads them
            through a new dropout mask (AWD-LSTM), the same for every time step and row.
        locked_dropout: the dropout between layers draws one mask per sequence instead of one per step.

    forward(x (B, T, I), state) -> outputs (B, T, D*H) of the top layer, forward direction first, and
    the final state of every layer and direction, (num_layers * D, B, H) [with the cell state for LSTM].
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 nonlinearity: str = "tanh", bidirectional: bool = False, impl: str = "fused",
                 reset_after: bool = True, weight_drop: float = 0.0, locked_dropout: bool = False):
        super().__init__()
        self.cell, self.impl, self.hidden_size, self.num_layers = cell, impl, hidden_size, num_layers
        self.nonlinearity = nonlinearity
        self.directions = 2 if bidirectional else 1
        self.dropout = dropout = dropout if num_layers > 1 else 0.0
        self.weight_drop, self.locked_dropout = weight_drop, locked_dropout
        if cell in MIN_CELLS:
            if weight_drop:
                raise ValueError(f"{cell} has no hidden-to-hidden matrices for weight_drop to drop")
            self.rnn = MinRecurrent(cell, input_size, hidden_size, num_layers, dropout, bidirectional,
                                    parallel=impl == "fused", locked=locked_dropout)
        elif impl == "scratch":
            self.rnn = ScratchRecurrent(cell, input_size, hidden_size, num_layers, dropout, bidirectional,
                                        nonlinearity, reset_after, weight_drop, locked_dropout)
        elif cell == "gru" and not reset_after:
            raise ValueError("torch.nn.GRU computes the reset-after GRU: use impl=scratch for reset_after=False")
        else:
            extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
            self.rnn = FUSED[cell](input_size, hidden_size, num_layers, batch_first=True, dropout=dropout,
                                   bidirectional=bidirectional, **extra)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        regularized = self.weight_drop or (self.locked_dropout and self.dropout)
        if self.training and regularized and isinstance(self.rnn, nn.RNNBase):
            return self._fused_layer_by_layer(x, state)
        return self.rnn(x, state)

    def _fused_layer_by_layer(self, x: Tensor, state: State | None) -> tuple[Tensor, State]:
        """What ``self.rnn(x, state)`` computes, with dropped hidden-to-hidden weights and locked dropout between
        layers, one layer at a time through torch.nn's own kernel.

        The module's parameters are left as they are (no swapped or re-registered weights, and so none of the
        warnings of replacing an RNN's weights); the kernel gets each layer's weights as arguments, copied into one
        buffer in torch.nn's order on a GPU, so that cuDNN finds them in the single block it expects.
        """
        rnn, lstm = self.rnn, self.cell == "lstm"
        kernel = _KERNELS["lstm" if lstm else self.cell if self.cell == "gru" else ("rnn", self.nonlinearity)]
        if state is None:
            zeros = x.new_zeros(self.num_layers * self.directions, x.size(0), self.hidden_size)
            state = (zeros, zeros) if lstm else zeros
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = sequence_dropout(x, self.dropout, self.locked_dropout, True)
            weights, rows = [], slice(layer * self.directions, (layer + 1) * self.directions)
            for suffix in ["", "_reverse"][: self.directions]:
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    w = getattr(rnn, f"{kind}_l{layer}{suffix}")
                    weights.append(F.dropout(w, self.weight_drop) if kind == "weight_hh" else w)
            if x.is_cuda:
                flat = torch.cat([w.reshape(-1) for w in weights])
                weights = [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]
            start = (state[0][rows], state[1][rows]) if lstm else state[rows]
            x, *final = kernel(x, start, weights, True, 1, 0.0, True, self.directions == 2, True)
            finals.append(final)
        if lstm:
            return x, (torch.cat([h for h, _ in finals]), torch.cat([c for _, c in finals]))
        return x, torch.cat([h for h, in finals])

    def fused_state_dict(self, strict: bool = True) -> dict[str, Tensor]:
        """The weights in torch.nn's layout, whichever implementation holds them (``strict=False`` lets a
        reset-before GRU through, for code that knows to compute that form). minGRU and minLSTM keep one layout
        in both implementations."""
        if self.impl == "scratch" and self.cell not in MIN_CELLS:
            return to_fused(self.rnn, strict)
        return {k: v.detach() for k, v in self.rnn.state_dict().items()}

    def load_fused_state_dict(self, weights: dict[str, Tensor]) -> None:
        """Take weights in torch.nn's layout (e.g. from a backbone of the other implementation)."""
        if self.impl == "scratch" and self.cell not in MIN_CELLS:
            from_fused(self.rnn, weights)
        else:
            self.rnn.load_state_dict(weights)


def merge(forward: Tensor, backward: Tensor, mode: str | None) -> Tensor | tuple[Tensor, Tensor]:
    """Combine the two directions' outputs as Keras' ``Bidirectional(merge_mode=...)`` does; ``None`` keeps
    them apart, as the pair ``(forward, backward)``."""
    if mode == "concat":
        return torch.cat([forward, backward], -1)
    if mode == "sum":
        return forward + backward
    if mode == "mul":
        return forward * backward
    if mode == "ave":
        return (forward + backward) / 2
    if mode is None:
        return forward, backward
    raise ValueError(f"merge_mode={mode} must be one of {_MERGE_CHOICES}")


class KerasRecurrent(nn.Module):
    """The Keras view of a recurrent layer: ``SimpleRNN/LSTM/GRU(units, return_sequences, return_state)``,
    optionally inside ``Bidirectional(merge_mode=...)``.

    Returns what Keras 3 returns, with Keras' shapes and Python types, for an input (B, T, I):

    - the output: (B, units) for the last step, or (B, T, units) with ``return_sequences``
      (2*units for a concatenated bidirectional layer); a bidirectional layer's "last step" is the
      forward direction's last step with the backward direction's, which read the sequence to its start;
    - ``merge_mode=None`` (bidirectional): the tuple ``(output_fwd, output_bwd)``, each as above with
      ``units`` features; the backward sequence in input order, as Keras puts it back;
    - with ``return_state``: a tuple ``(output, h)`` (``(output, h, c)`` for LSTM), and for a bidirectional
      layer ``(output, h_fwd, [c_fwd,] h_bwd, [c_bwd])`` — ``(output_fwd, output_bwd, h_fwd, ...)`` with
      ``merge_mode=None`` — each state (B, units), of the top layer.
    """

    def __init__(self, cell: str, input_size: int, units: int, return_sequences: bool = False,
                 return_state: bool = False, bidirectional: bool = False, merge_mode: str | None = "concat",
                 num_layers: int = 1, impl: str = "fused", reset_after: bool = True):
        super().__init__()
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode={merge_mode} must be one of {_MERGE_CHOICES}")
        self.backbone = RecurrentBackbone(cell, input_size, units, num_layers, bidirectional=bidirectional,
                                          impl=impl, reset_after=reset_after)
        self.units, self.return_sequences, self.return_state = units, return_sequences, return_state
        self.merge_mode = merge_mode

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        # Keras 3 (keras-team/keras, keras/src/layers/rnn/bidirectional.py, Bidirectional.call): the backward
        # layer runs with go_backwards=True, `if self.return_sequences: y_rev = ops.flip(y_rev, axis=1)` puts
        # its sequence back in input order before any merge (merge_mode=None too), `output = (y, y_rev)` for
        # merge_mode=None, and with return_state `states = tuple(y[1:] + y_rev[1:])` is returned as
        # `output + states` (None) or `(output,) + states`. keras/src/layers/rnn/rnn.py, RNN.call (LSTM and
        # GRU call it): `return output, *states`. So every multi-part result is a tuple, states forward first.
        outputs, state = self.backbone(x)  # (B, T, D*H), both directions in input order
        if self.backbone.directions == 2:
            forward, backward = outputs.split(self.units, -1)  # (B, T, H) each
            if self.return_sequences:
                output = merge(forward, backward, self.merge_mode)
            else:  # the backward direction's last step is at t=0: it read the sequence from its end
                output = merge(forward[:, -1], backward[:, 0], self.merge_mode)
        else:
            output = outputs if self.return_sequences else outputs[:, -1]
        if not self.return_state:
            return output
        parts = state if isinstance(state, tuple) else (state,)
        top = []  # per direction of the top layer: h (and c)
        for direction in range(self.backbone.directions):
            k = parts[0].size(0) - self.backbone.directions + direction
            top += [p[k] for p in parts]
        return (*(output if isinstance(output, tuple) else (output,)), *top)
