"""The hidden state a recurrent stack carries from one call to the next, and what is done to it between calls.

A state is a tuple with one entry per cell of the stack (layer-major, forward direction first), each entry the
tuple of that cell's state tensors in the order of its ``state_names``, each (B, H) with H that layer's width::

    ((h,), (h,))          two layers of rnn, gru, mingru, minlstm or any cell with state_names = ("h",)
    ((h, c), (h, c))      two layers of lstm: state_names = ("h", "c")

Every cell's state has this one shape, so truncated BPTT, checkpoints, exact resume, DDP gathering and the
CUDA-graph step treat every cell alike, built-in or not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CellState = tuple[Tensor, ...]
State = tuple[CellState, ...]


def map_state(state: State | None, fn: Callable[[Tensor], Tensor]) -> State | None:
    """``fn`` applied to every tensor of ``state``; None stays None."""
    if state is None:
        return None
    return tuple(tuple(fn(tensor) for tensor in cell) for cell in state)


def detach_state(state: State | None) -> State | None:
    """Keep the state's values but cut the graph: gradients stop at the chunk boundary (truncated BPTT)."""
    return map_state(state, torch.Tensor.detach)


def state_tensors(state: State | None) -> list[Tensor]:
    """Every tensor of ``state``, cell after cell (none for None)."""
    return [] if state is None else [tensor for cell in state for tensor in cell]


def batch_rows(state: State) -> int:
    """How many rows (sequences) ``state`` carries."""
    return state[0][0].size(0)


def is_state(value) -> bool:
    """Whether ``value`` has the shape of a :data:`State` (a checkpoint's stored state is checked with this)."""
    return isinstance(value, tuple | list) and len(value) > 0 and all(
        isinstance(cell, tuple | list) and len(cell) > 0 and all(torch.is_tensor(t) for t in cell) for cell in value)
