"""The cell protocol: what a recurrent cell provides, and what rnnlm does with it.

A cell is one layer of a recurrent stack, in one direction: an ``nn.Module`` subclass of :class:`RecurrentCell`.
rnnlm builds one per layer and direction, stacks them, carries their state between chunks, drops out between
layers, and reverses the input for a backward direction; the cell computes its own equations and nothing else.
The built-in cells (:mod:`rnnlm.cells`) are registrations of this protocol, and a user's cell is given to every
command as a class path: ``model.cell=mypackage.cells:MyCell``. ``docs/cells.md`` is the guide.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.schema import Setting
from rnnlm.state import CellState

Step = Callable[[Tensor, CellState], tuple[Tensor, CellState]]  # x (B, I), state -> h (B, H), new state

# What a cell may say it supports (RecurrentCell.supports): the setting that needs each, and its value without it.
FEATURES = {
    "bidirectional": ("model.bidirectional", "false"),
    "weight_drop": ("model.weight_drop", "0"),
    "cuda_graph": ("model.cuda_graph", "false"),
    "compile": ("model.compile", "false"),
}


class RecurrentCell(nn.Module):
    """One recurrent layer in one direction. Subclass it, and define ``forward`` or ``step`` (or both).

    Class attributes (all optional):
        state_names: the names of the state tensors carried from step to step, each (B, hidden_size); the first
            is the output ``h``. ``("h",)`` by default; an LSTM's is ``("h", "c")``.
        settings: the cell's own settings, ``{name: Setting}`` (:mod:`rnnlm.schema`: ``integer(1)``,
            ``number(0, 1)``, ``flag()``, ``one_of("a", "b")``). Each is a keyword argument of ``__init__``,
            whose default is the setting's default; the user sets it with ``model.<name>=...``, and it is checked
            before any work. The checkpoint stores its value.
        gate_names: the gates :meth:`gates` returns (``callbacks=diagnostics`` draws their histograms).
        supports: what the cell can be used with, from :data:`FEATURES`: ``bidirectional``, ``weight_drop``
            (the cell reads its hidden-to-hidden matrices through :meth:`drop_recurrent`), ``cuda_graph`` (its
            forward never waits for the host) and ``compile`` (``torch.compile`` can trace it). A setting that
            needs a feature the cell lacks is refused in one line before any work.

    Args:
        input_size: the width I of the input at each step (the embedding, or the layer below's outputs).
        hidden_size: the width H of ``h`` (and of every state tensor).
    """

    state_names: ClassVar[tuple[str, ...]] = ("h",)
    settings: ClassVar[Mapping[str, Setting]] = {}
    gate_names: ClassVar[tuple[str, ...]] = ()
    supports: ClassVar[frozenset[str]] = frozenset({"bidirectional", "cuda_graph", "compile"})

    weight_drop: float = 0.0  # set by the stack from model.weight_drop, for cells that support it

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        """Run a whole sequence from a carried state: x (B, T, I) and ``state`` -> outputs h_1..h_T (B, T, H)
        and the state after the last step. By default, :meth:`step` once per time step."""
        if type(self).step is RecurrentCell.step:
            raise NotImplementedError(f"{type(self).__name__} must define forward(x, state) or step(x, state)")
        outputs = []
        for x_t in x.unbind(1):
            h, state = self.step(x_t, state)
            outputs.append(h)
        return torch.stack(outputs, 1), state

    def step(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        """One time step, for generation: x (B, I) and ``state`` -> h (B, H) and the new state. By default,
        :meth:`forward` over a sequence of one step."""
        if type(self).forward is RecurrentCell.forward:
            raise NotImplementedError(f"{type(self).__name__} must define forward(x, state) or step(x, state)")
        outputs, state = self(x.unsqueeze(1), state)
        return outputs[:, 0], state

    def stepper(self, batch: int) -> Step:
        """A function that takes :meth:`step`'s steps for ``batch`` rows, for generating a text: it may prepare
        the weights as they are now, once (make a new one after they change). :meth:`step` itself by default."""
        return self.step

    def zero_state(self, batch: int, like: Tensor) -> CellState:
        """The state a sequence starts from: zeros (batch, H) for each of :attr:`state_names`, with ``like``'s
        dtype and device."""
        return tuple(like.new_zeros(batch, self.hidden_size) for _ in self.state_names)

    def gates(self, x: Tensor, state: CellState) -> dict[str, Tensor]:
        """The gates' activations at one step, each (B, H) in [0, 1], by the names in :attr:`gate_names`:
        x (B, I) and the state before the step. None by default."""
        return {}

    def drop_recurrent(self, weight: Tensor) -> Tensor:
        """``weight`` through DropConnect in training (``model.weight_drop``, AWD-LSTM): call it on each
        hidden-to-hidden matrix once per :meth:`forward`, so that every step of a sequence reads the same mask."""
        return F.dropout(weight, self.weight_drop) if self.training and self.weight_drop else weight

    @classmethod
    def setting_problems(cls, settings: Mapping[str, Any]) -> list[str]:
        """Problems of the cell's own settings together (each one's type and range is checked before this), as
        ``model.<name>=<value> ...: <fix>``. None by default."""
        return []


def setting_defaults(cell: type[RecurrentCell]) -> dict[str, Any]:
    """The default of each of ``cell``'s settings: its ``__init__`` keyword's."""
    parameters = inspect.signature(cell.__init__).parameters
    return {name: parameters[name].default for name in cell.settings}


def protocol_problems(cell: type) -> list[str]:
    """What keeps the class ``cell`` from being a cell (checked once, when a class path is resolved)."""
    name = f"{cell.__module__}.{cell.__qualname__}"
    if not (isinstance(cell, type) and issubclass(cell, RecurrentCell)):
        return [f"{name} is not a subclass of rnnlm.cells.RecurrentCell"]
    problems = []
    if cell.forward is RecurrentCell.forward and cell.step is RecurrentCell.step:
        problems.append(f"{name} defines neither forward(x, state) nor step(x, state)")
    names = cell.state_names
    if not (isinstance(names, tuple) and names and all(isinstance(n, str) and n.isidentifier() for n in names)):
        problems.append(f"{name}.state_names={names!r} must be a non-empty tuple of names")
    unknown = set(cell.supports) - set(FEATURES)
    if unknown:
        problems.append(f"{name}.supports names {sorted(unknown)}, which are not among {sorted(FEATURES)}")
    try:
        parameters = inspect.signature(cell.__init__).parameters
    except (TypeError, ValueError):
        parameters = {}
    for setting, kind in cell.settings.items():
        if not isinstance(kind, Setting):
            problems.append(f"{name}.settings[{setting!r}] must be a rnnlm.schema Setting (integer(...), number(...), "
                            "flag(), one_of(...))")
        if setting not in parameters or parameters[setting].default is inspect.Parameter.empty:
            problems.append(f"{name}.settings declares {setting!r}, which must be a keyword argument of __init__ "
                            "with a default")
    return problems


def uniform_parameter(*shape: int, hidden_size: int) -> nn.Parameter:
    """A parameter drawn as torch.nn draws a recurrent layer's: uniform in ±1/sqrt(hidden_size)."""
    bound = hidden_size**-0.5
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))
