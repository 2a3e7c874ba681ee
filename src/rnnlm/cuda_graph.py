"""A training step's forward, loss, backward and gradient clipping recorded once as a CUDA graph and replayed.

With small batches a recurrent LM's step is bound by launch latency: the GPU waits while Python and
the CUDA driver launch hundreds of small kernels (every time step of every layer, forward and
backward). Truncated BPTT gives every chunk but the last of an epoch the same shape, so the kernels
of one step can be recorded once and replayed with a single launch per step.

The optimizer's update runs after the replay, as usual (a few fused ``foreach`` kernels), so learning
rate schedules, resumed optimizer state and Lightning's precision and hooks work unchanged.

A replay writes the gradients into the tensors that the recording allocated, and assigns no ``.grad``: whatever
set a parameter's ``.grad`` to None in between (Lightning does before every validation, and
``zero_grad(set_to_none=True)`` does) would leave the optimizer nothing to read, so each step attaches those
tensors again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from rnnlm.state import State, detach_state, map_state, state_tensors

log = logging.getLogger(__name__)

# forward_loss(inputs, targets, state) -> (objective, mean loss, final state): gradients flow from the objective
# (the loss plus any regularization penalty); the loss is what the step reports
ForwardLoss = Callable[[Tensor, Tensor, State | None], tuple[Tensor, Tensor, State | None]]
# what a step returns: the mean loss, the objective, the gradient norm before clipping and the final state
StepOutputs = tuple[Tensor, Tensor, Tensor, State | None]


class GraphedStep:
    """Runs ``forward_loss``, backward and clipping: eagerly until a shape has come ``warmup_steps`` times in
    a row, then as a CUDA graph recorded for that shape. Other shapes (the last, shorter chunk of an epoch)
    run eagerly. If recording fails, a warning says why and every step runs eagerly.

    Call it with the batch and the carried state; it returns the loss, the objective that was differentiated,
    the gradient norm before clipping and the detached final state, all on the device (a replay's outputs are
    overwritten by the next replay). Parameters' ``.grad`` hold the (clipped) gradients afterwards, ready for
    ``optimizer.step()``, even if something set them to None since the last step.
    """

    def __init__(self, forward_loss: ForwardLoss, params: list[Tensor], clip_val: float | None = None,
                 clip_algorithm: str = "norm", warmup_steps: int = 3, enabled: bool = True):
        self.forward_loss, self.params = forward_loss, params
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.warmup_steps, self.enabled = warmup_steps, enabled
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_shape: tuple | None = None
        self.replays = 0  # steps run from the graph (for tests and logs)
        self._shape: tuple | None = None
        self._repeats = 0
        self._static_in: tuple[Tensor, Tensor, State | None] | None = None
        self._static_out: StepOutputs | None = None
        self._static_grads: list[Tensor | None] = []  # the .grad tensors the recording allocated, one per parameter
        self._stream: torch.cuda.Stream | None = None
        self._last_final: State | None = None  # the state an eager step returned: its shape is the recorded one

    def _body(self, inputs: Tensor, targets: Tensor, state: State | None) -> StepOutputs:
        objective, loss, final = self.forward_loss(inputs, targets, state)
        objective.backward()
        if self.clip_val and self.clip_algorithm == "norm":
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_val, foreach=True)
        else:  # the same norm, measured before any clipping, so the logged curve means one thing
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
            if self.clip_val:
                torch.nn.utils.clip_grad_value_(self.params, self.clip_val, foreach=True)
        return loss.detach(), objective.detach(), norm, detach_state(final)

    def __call__(self, inputs: Tensor, targets: Tensor, state: State | None) -> StepOutputs:
        shape = (tuple(inputs.shape), tuple(targets.shape))
        self._repeats = self._repeats + 1 if shape == self._shape else 1
        self._shape = shape
        if self.graph is not None and shape == self.graph_shape:
            return self._replay(inputs, targets, state)
        if self._can_record(inputs) and self._repeats > self.warmup_steps:
            if self._capture(inputs, targets, state):
                return self._replay(inputs, targets, state)
        return self._eager(inputs, targets, state)

    def _can_record(self, inputs: Tensor) -> bool:
        return self.enabled and inputs.is_cuda

    def _attach_grads(self) -> None:
        """Make the recorded gradient tensors the parameters' ``.grad`` again: the replays write there, and a
        ``.grad`` set to None (or replaced) since would hide them from the optimizer."""
        for p, grad in zip(self.params, self._static_grads, strict=True):
            p.grad = grad

    def _eager(self, inputs: Tensor, targets: Tensor, state: State | None) -> StepOutputs:
        # Once a graph is recorded, .grad are its tensors: zero them in place so that replays and the
        # optimizer keep reading the same memory.
        if self.graph is not None:
            self._attach_grads()
            for grad in self._static_grads:
                if grad is not None:
                    grad.zero_()
            return self._body(inputs, targets, state)
        for p in self.params:
            p.grad = None
        if inputs.is_cuda and self.enabled:
            # Before recording, warm up on a side stream as torch.cuda.graph asks (cuDNN and the allocator
            # settle on what the recording will use).
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                out = self._body(inputs, targets, state)
            torch.cuda.current_stream().wait_stream(self._stream)
        else:
            out = self._body(inputs, targets, state)
        self._last_final = out[3]
        return out

    def _capture(self, inputs: Tensor, targets: Tensor, state: State | None) -> bool:
        # A chunk that starts a pass has no state yet; the warm-up steps of this shape returned one.
        shape_of_state = self._last_final if state is None else state
        self._static_in = (inputs.clone(), targets.clone(), map_state(shape_of_state, torch.zeros_like))
        for p in self.params:
            p.grad = None  # the recorded backward allocates them from the graph's memory
        try:
            graph, self._static_out = self._record()
        except Exception as err:  # e.g. an operation that cannot be recorded
            log.warning("model.cuda_graph: recording the training step failed, so it runs without a graph: %s",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            self.enabled, self.graph, self._static_in, self._static_out = False, None, None, None
            for p in self.params:
                p.grad = None
            return False
        self._static_grads = [p.grad for p in self.params]
        self.graph, self.graph_shape = graph, (tuple(inputs.shape), tuple(targets.shape))
        log.info("model.cuda_graph: recorded the training step for batches of shape %s", list(inputs.shape))
        return True

    def _record(self) -> tuple[torch.cuda.CUDAGraph, StepOutputs]:
        """Record the step on the static inputs -> the graph and its outputs (filled in by each replay)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._body(*self._static_in)
        return graph, outputs

    def _replay(self, inputs: Tensor, targets: Tensor, state: State | None) -> StepOutputs:
        static_inputs, static_targets, static_state = self._static_in
        static_inputs.copy_(inputs)
        static_targets.copy_(targets)
        if state is None:  # the first chunk of a pass starts from zeros
            for s in state_tensors(static_state):
                s.zero_()
        else:
            for s, value in zip(state_tensors(static_state), state_tensors(state), strict=True):
                s.copy_(value)
        self.graph.replay()
        self.replays += 1
        self._attach_grads()
        return self._static_out
