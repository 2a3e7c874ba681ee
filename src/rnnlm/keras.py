"""The Keras view of a recurrent layer: ``SimpleRNN/LSTM/GRU(units, return_sequences, return_state)``, optionally
inside ``Bidirectional(merge_mode=...)``, over :class:`~rnnlm.stack.RecurrentStack`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnlm.stack import RecurrentStack

MERGE_MODES = ("concat", "sum", "mul", "ave", None)  # None: the two directions' outputs apart, as in Keras
_MERGE_CHOICES = "|".join(str(mode) for mode in MERGE_MODES)


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
                 num_layers: int = 1, impl: str = "fused", **cell_settings):
        super().__init__()
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode={merge_mode} must be one of {_MERGE_CHOICES}")
        self.backbone = RecurrentStack(cell, input_size, units, num_layers, bidirectional=bidirectional, impl=impl,
                                       cell_settings=cell_settings)
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
        directions = self.backbone.directions
        top = [tensor for cell in state[-directions:] for tensor in cell]  # the top layer's h (and c), forward first
        return (*(output if isinstance(output, tuple) else (output,)), *top)
