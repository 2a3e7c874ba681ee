"""What the fused forms of rnn, lstm and gru share: torch.nn's weights for one layer and direction, run by torch's
own kernels (cuDNN on a GPU, oneDNN or ATen on a CPU). Their equations are in each cell's file."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from rnnlm.cells.protocol import RecurrentCell, Step, uniform_parameter
from rnnlm.state import CellState


def _probe_onednn() -> tuple[Callable | None, Callable | None]:
    """oneDNN's linear kernel (``x @ w.T + b``) and its weight packing, when this torch build has them and they
    compute the product: at the few rows of a recurrent step oneDNN multiplies faster than the default BLAS on
    the CPUs measured (benchmarks/cells_speed.py, benchmarks/generate_speed.py)."""
    try:
        linear, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if torch.equal(linear(x, w, None, "none", [], ""), x @ w.t()):
            return linear, pack if torch.equal(linear(x, pack(w, 2), None, "none", [], ""), x @ w.t()) else None
    except (AttributeError, RuntimeError):
        pass
    return None, None


ONEDNN_LINEAR, ONEDNN_PACK = _probe_onednn()
# From this many rows on, generation multiplies by oneDNN on weights packed once per text (FusedCell.stepper)
# instead of calling torch's one-step kernels, whose products are the BLAS's. 2x512, 2 threads, rnnlm / the
# plain loop without -> with packing (benchmarks/generate_speed.py --unpacked, two runs): LSTM at 8 rows
# 2.3-2.7x -> 4.5-5.2x, at 64 rows 0.92-0.96x -> 1.15-1.17x; GRU at 8 rows 1.1-1.3x -> 1.4-1.5x, at 64 rows
# 1.01x -> 1.2x. Packing from 2 rows gained too (GRU 1.3x -> 1.7x, LSTM 0.9x -> 2.0x); from 1 row it did not
# (LSTM 2.95x -> 2.87x, GRU 1.28x -> 0.91x).
PACK_FROM_ROWS = 2


class FusedCell(RecurrentCell):
    """``weight_ih`` (G*H, I), ``weight_hh`` (G*H, H), ``bias_ih`` and ``bias_hh`` (G*H,), named and drawn as
    ``torch.nn.LSTMCell``'s and its kin's, gates in torch.nn's order.

    Subclasses name ``gate_count`` and ``kernel`` (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``: a whole
    sequence of one layer in one call) and define :meth:`step`; those that set ``packs`` define :meth:`update`
    too.
    """

    gate_count: ClassVar[int]
    kernel: ClassVar[Callable]
    packs: ClassVar[bool] = False  # whether :meth:`stepper` may pack the weights for oneDNN
    supports = frozenset({"bidirectional", "weight_drop", "cuda_graph", "compile"})

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        rows = self.gate_count * hidden_size
        # created in torch.nn's order, so a seed gives the weights torch.nn.LSTM(...) would have
        self.weight_ih = uniform_parameter(rows, input_size, hidden_size=hidden_size)
        self.weight_hh = uniform_parameter(rows, hidden_size, hidden_size=hidden_size)
        self.bias_ih = uniform_parameter(rows, hidden_size=hidden_size)
        self.bias_hh = uniform_parameter(rows, hidden_size=hidden_size)

    def kernel_weights(self) -> list[Tensor]:
        """The four weights as the sequence kernel takes them, ``weight_hh`` through :meth:`drop_recurrent`. On a
        GPU they are copied into one buffer in this order, which is how cuDNN expects them (otherwise it copies
        them itself, with a warning, at every call)."""
        weights = [self.weight_ih, self.drop_recurrent(self.weight_hh), self.bias_ih, self.bias_hh]
        if not self.weight_ih.is_cuda:
            return weights
        flat = torch.cat([w.reshape(-1) for w in weights])
        return [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]

    def forward(self, x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        # the kernel's arguments: weights, biases, 1 layer, no dropout, train, one direction, batch first
        hx = tuple(s.unsqueeze(0) for s in state)  # (1, B, H): one layer
        outputs, *final = self.kernel(x, hx if len(hx) > 1 else hx[0], self.kernel_weights(), True, 1, 0.0,
                                            self.training, False, True)
        return outputs, tuple(s.squeeze(0) for s in final)

    def fused_weights(self) -> dict[str, Tensor]:
        """The weights in torch.nn's layout (this cell's own; see the textbook cells' conversion)."""
        return {"weight_ih": self.weight_ih, "weight_hh": self.weight_hh, "bias_ih": self.bias_ih,
                "bias_hh": self.bias_hh}

    @torch.no_grad()
    def load_fused_weights(self, weights: dict[str, Tensor]) -> None:
        for name, value in weights.items():
            getattr(self, name).copy_(value)

    def stepper(self, batch: int) -> Step:
        """:meth:`step`; or, for a cell that ``packs``, from :data:`PACK_FROM_ROWS` rows on a CPU in float32 without
        autograd (the packed copies are not the parameters), the same step on oneDNN with both weight matrices
        packed now, once for all the text's steps."""
        w = self.weight_ih
        if (not self.packs or batch < PACK_FROM_ROWS or ONEDNN_PACK is None or w.device.type != "cpu"
                or w.dtype != torch.float32 or torch.is_grad_enabled()):
            return self.step
        w_ih, w_hh = ONEDNN_PACK(self.weight_ih, batch), ONEDNN_PACK(self.weight_hh, batch)

        def step(x: Tensor, state: CellState) -> tuple[Tensor, CellState]:
            xw = ONEDNN_LINEAR(x, w_ih, self.bias_ih, "none", [], "")  # W_ih x + b_ih
            hw = ONEDNN_LINEAR(state[0], w_hh, self.bias_hh, "none", [], "")  # W_hh h + b_hh
            return self.update(xw, hw, state)

        return step

    def update(self, xw: Tensor, hw: Tensor, state: CellState) -> tuple[Tensor, CellState]:
        """The step's equations from its products ``W_ih x + b_ih`` and ``W_hh h + b_hh`` (B, G*H each): -> h and
        the new state."""
        raise NotImplementedError(f"{type(self).__name__}.packs is set: it must define update")

    def gate_preactivations(self, x: Tensor, h: Tensor) -> Tensor:
        """``W_ih x + b_ih + W_hh h + b_hh`` at one step: x (B, I), h (B, H) -> (B, G*H)."""
        return torch.addmm(self.bias_ih, x, self.weight_ih.t()) + torch.addmm(self.bias_hh, h, self.weight_hh.t())
