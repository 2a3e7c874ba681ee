"""The recurrent cells, and the one table that turns ``model.cell`` into a cell class.

``model.cell`` is a built-in name below, or the class path of a user's :class:`RecurrentCell` subclass
(``mypackage.cells:MyCell``, or ``mypackage.cells.MyCell``). A built-in cell has two forms, picked by
``model.impl``: ``fused`` (torch's kernels; the parallel scan for minGRU/minLSTM) and ``scratch`` (the textbook
equations, step by step). Nothing outside a cell's own file and this table knows a cell by its name.
"""

from __future__ import annotations

import importlib
import os
import sys

from rnnlm.cells.gru import FusedGRU, ScratchGRU
from rnnlm.cells.lstm import FusedLSTM, ScratchLSTM
from rnnlm.cells.mingru import MinGRU, MinGRULoop
from rnnlm.cells.minlstm import MinLSTM, MinLSTMLoop
from rnnlm.cells.protocol import FEATURES, RecurrentCell, protocol_problems, setting_defaults, uniform_parameter
from rnnlm.cells.rnn import FusedRNN, ScratchRNN
from rnnlm.errors import ConfigError

__all__ = ["BUILT_IN", "FEATURES", "IMPLS", "RecurrentCell", "cell_class", "cell_problem", "is_class_path",
           "setting_defaults", "uniform_parameter"]

IMPLS = ("fused", "scratch")
BUILT_IN: dict[str, dict[str, type[RecurrentCell]]] = {
    "rnn": {"fused": FusedRNN, "scratch": ScratchRNN},
    "lstm": {"fused": FusedLSTM, "scratch": ScratchLSTM},
    "gru": {"fused": FusedGRU, "scratch": ScratchGRU},
    "mingru": {"fused": MinGRU, "scratch": MinGRULoop},
    "minlstm": {"fused": MinLSTM, "scratch": MinLSTMLoop},
}
CLASS_PATH_HINT = "or a class path module:Class of a rnnlm.cells.RecurrentCell subclass (docs/cells.md)"


def is_class_path(name: str) -> bool:
    """Whether ``model.cell=name`` names a class (``pkg.module:Class`` or ``pkg.module.Class``), not a built-in."""
    return name not in BUILT_IN and (":" in name or "." in name)


def cell_class(name: str, impl: str = "fused") -> type[RecurrentCell]:
    """The class of ``model.cell=name`` (and ``model.impl=impl`` for a built-in).

    A class path is imported (never unpickled); its module is looked for on ``sys.path`` and in the current folder.

    Raises:
        ConfigError: one line naming the cell, what is wrong and what to give instead.
    """
    if name in BUILT_IN:
        return BUILT_IN[name][impl]
    if not is_class_path(name):
        raise ConfigError(f"model.cell={name} is not a cell: use one of {'|'.join(BUILT_IN)}, {CLASS_PATH_HINT}")
    return _imported(name)


def _imported(path: str) -> type[RecurrentCell]:
    module_name, _, class_name = path.partition(":") if ":" in path else path.rpartition(".")
    if os.getcwd() not in sys.path:  # a cell in a file beside the command line, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure of the user's module is reported in one line
        if isinstance(err, ModuleNotFoundError) and module_name.startswith(str(err.name)):
            raise ConfigError(f"model.cell={path} cannot be imported (no module named {err.name!r} on the Python "
                              "path): install the package, run from the folder that holds the module, or add that "
                              "folder to PYTHONPATH") from None
        raise ConfigError(f"model.cell={path} cannot be imported ({type(err).__name__}: {err}): fix the module "
                          f"{module_name}") from None
    cell = getattr(module, class_name, None)
    if cell is None:
        raise ConfigError(f"model.cell={path}: module {module_name} has no {class_name!r}: check the class name")
    if problems := protocol_problems(cell):
        raise ConfigError(f"model.cell={path} is not a cell: {'; '.join(problems)} (docs/cells.md)")
    return cell


def cell_problem(name, impl: str = "fused") -> str | None:
    """Why ``model.cell=name`` cannot be built, in one line; None if it can."""
    if not isinstance(name, str) or not name.strip():
        return f"model.cell={name!r} must be one of {'|'.join(BUILT_IN)}, {CLASS_PATH_HINT}"
    if is_class_path(name) and impl != "fused":
        return (f"model.impl={impl} picks a form of a built-in cell, and model.cell={name} is one class of its "
                "own: drop model.impl")
    try:
        cell_class(name, impl)
    except ConfigError as err:
        return str(err)
    return None
