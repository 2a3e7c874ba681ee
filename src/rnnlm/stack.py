"""The recurrent stack: one cell per layer and direction (any :class:`~rnnlm.cells.RecurrentCell`), dropout
between layers, a backward direction that reads the sequence reversed, and the state they carry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rnnlm.cells import RecurrentCell, cell_class
from rnnlm.cells.protocol import Step
from rnnlm.regularization import sequence_dropout
from rnnlm.state import State


def layer_widths(hidden_size: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Each layer's width: ``hidden_size`` for every layer, or one width per layer."""
    return (hidden_size,) * num_layers if isinstance(hidden_size, int) else tuple(hidden_size)


class RecurrentStack(nn.Module):
    """Stacked, optionally bidirectional recurrent layers, batch first.

    Args:
        cell: a built-in cell's name or a class path (:func:`rnnlm.cells.cell_class`), or the class itself.
        input_size: the width of the inputs x (B, T, input_size).
        hidden_size: every layer's width, or a list with one width per layer.
        num_layers: how many layers.
        dropout: on the outputs of every layer but the last, in training.
        bidirectional: a second cell per layer reads the sequence backwards; each layer after the first reads both
            directions' outputs, concatenated (as torch.nn and cuDNN do).
        impl: a built-in cell's form: ``fused`` or ``scratch``.
        weight_drop: in training, DropConnect on the hidden-to-hidden matrices: each forward call reads them
            through a new dropout mask (AWD-LSTM), the same for every time step and row.
        locked_dropout: the dropout between layers draws one mask per sequence instead of one per step.
        cell_settings: the cell's own settings (``nonlinearity`` of rnn, ``reset_after`` of gru, a user cell's).

    forward(x (B, T, I), state) -> outputs (B, T, D*H) of the top layer, forward direction first, and the final
    state of every cell (:mod:`rnnlm.state`), layer-major, forward direction first.
    """

    def __init__(self, cell: str | type[RecurrentCell], input_size: int, hidden_size: int | Sequence[int],
                 num_layers: int = 1, dropout: float = 0.0, bidirectional: bool = False, impl: str = "fused",
                 weight_drop: float = 0.0, locked_dropout: bool = False, cell_settings: Mapping[str, Any] = {}):
        super().__init__()
        self.cell_type = cell_class(cell, impl) if isinstance(cell, str) else cell
        self.widths = layer_widths(hidden_size, num_layers)
        self.num_layers, self.directions = num_layers, 2 if bidirectional else 1
        self.dropout = dropout if num_layers > 1 else 0.0
        self.locked_dropout = locked_dropout
        cells = []
        for layer, width in enumerate(self.widths):
            reads = input_size if layer == 0 else self.widths[layer - 1] * self.directions
            for _ in range(self.directions):
                built = self.cell_type(reads, width, **cell_settings)
                built.weight_drop = weight_drop
                cells.append(built)
        self.cells = nn.ModuleList(cells)  # k = layer * directions + direction

    @property
    def output_size(self) -> int:
        """The width of the top layer's outputs, both directions."""
        return self.widths[-1] * self.directions

    def zero_state(self, batch: int, like: Tensor) -> State:
        """Every cell's starting state for ``batch`` sequences (dtype and device of ``like``)."""
        return tuple(cell.zero_state(batch, like) for cell in self.cells)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if state is None:
            state = self.zero_state(x.size(0), x)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = sequence_dropout(x, self.dropout, self.locked_dropout, self.training)
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                if direction == 1:  # reads from the end; its outputs go back in input order
                    out, final = self.cells[k](x.flip(1), state[k])
                    out = out.flip(1)
                else:
                    out, final = self.cells[k](x, state[k])
                outputs.append(out)
                finals.append(final)
            x = torch.cat(outputs, -1) if self.directions == 2 else outputs[0]
        return x, tuple(finals)

    def step(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One time step of a one-directional stack (generation): x (B, I) -> the top layer's h (B, H) and the new
        state. Eval mode: no dropout between layers."""
        return self._step([cell.step for cell in self.cells], x, state)

    def stepper(self, batch: int) -> Callable[[Tensor, State | None], tuple[Tensor, State]]:
        """:meth:`step` for generating ``batch`` rows, through each cell's
        :meth:`~rnnlm.cells.RecurrentCell.stepper` (made now, from the weights as they are now)."""
        return partial(self._step, [cell.stepper(batch) for cell in self.cells])

    def trace(self, x: Tensor, state: State | None = None
              ) -> Iterator[tuple[list[Tensor], State, list[dict[str, Tensor]]]]:
        """Step a one-directional stack through x (B, T, I) one time step at a time, every layer by its cell's own
        :meth:`~rnnlm.cells.RecurrentCell.step` (eval mode: no dropout between layers), to look at each layer at
        each step; this works for every cell and form, a user's too.

        Yields, for each step: each layer's output h (B, H), which is the one node that the layer above reads now
        and the layer itself reads at the next step (a gradient through it counts both paths); every cell's state
        after the step (:mod:`rnnlm.state`); and each layer's gates at the step, by name
        (:meth:`~rnnlm.cells.RecurrentCell.gates` of its input and its state before the step, computed without
        gradients: they are looked at, never differentiated).
        """
        if self.directions != 1:
            raise ValueError("a bidirectional stack cannot step: its backward direction reads the sequence's end first")
        states = list(self.zero_state(x.size(0), x) if state is None else state)
        for layer_input in x.unbind(1):
            outputs, opened = [], []
            for k, cell in enumerate(self.cells):
                with torch.no_grad():
                    opened.append(cell.gates(layer_input, states[k]))
                layer_input, states[k] = cell.step(layer_input, states[k])  # (B, H)
                outputs.append(layer_input)
            yield outputs, tuple(states), opened

    def _step(self, steps: list[Step], x: Tensor, state: State | None) -> tuple[Tensor, State]:
        if self.directions != 1:
            raise ValueError("a bidirectional stack cannot step: its backward direction reads the sequence's end first")
        if state is None:
            state = self.zero_state(x.size(0), x)
        finals = []
        for step, cell_state in zip(steps, state, strict=True):
            x, final = step(x, cell_state)
            finals.append(final)
        return x, tuple(finals)

    def fused_state_dict(self) -> dict[str, Tensor]:
        """The weights in the layout of a ``torch.nn.RNN/LSTM/GRU`` of these layers (built-in rnn, lstm and gru,
        either form), to compare the forms with each other and with torch.nn.

        Raises:
            ValueError: a reset-before GRU, which torch.nn's layout cannot describe; or a cell without that layout.
        """
        out = {}
        for k, cell in enumerate(self.cells):
            if not hasattr(cell, "fused_weights"):
                raise ValueError(f"{type(cell).__name__} has no torch.nn layout")
            out.update({name + self._fused_suffix(k): value.detach() for name, value in cell.fused_weights().items()})
        return out

    def load_fused_state_dict(self, weights: dict[str, Tensor]) -> None:
        """Take weights in torch.nn's layout (:meth:`fused_state_dict` of a stack of the other form, or a
        ``torch.nn.LSTM``'s state dict)."""
        for k, cell in enumerate(self.cells):
            cell.load_fused_weights({name: weights[name + self._fused_suffix(k)]
                                     for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})

    def _fused_suffix(self, k: int) -> str:
        """torch.nn's name suffix of cell k's weights: ``_l<layer>``, and ``_reverse`` for a backward direction."""
        layer, direction = divmod(k, self.directions)
        return f"_l{layer}" + ("_reverse" if direction else "")
