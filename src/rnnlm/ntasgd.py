"""NT-ASGD, the optimizer of AWD-LSTM (Merity, Keskar and Socher 2017, arXiv 1708.02182, section 3): plain SGD
until the validation loss stops improving, then SGD whose iterates are averaged, the average being the model
that is validated, checkpointed and used."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


class NTASGD(torch.optim.Optimizer):
    """Non-monotonically triggered averaged SGD.

    Steps are SGD (``p -= lr * (grad + weight_decay * p)``). :meth:`observe` is given each validation loss; once a
    loss is worse than the best of those before the last ``nonmono`` ones, averaging starts: from then on every
    step also updates the running mean of the iterates, ``average += (p - average) / n`` after the n-th step
    (AWD-LSTM's ``ASGD(t0=0, lambd=0)``). The switch and the loss history live in the parameter group and the
    average in the optimizer state, so both are checkpointed and resumed with it.

    Args:
        params: the parameters.
        lr: SGD's learning rate (AWD-LSTM: 30, with gradients clipped at 0.25).
        nonmono: how many of the latest validation losses are left out of the comparison (AWD-LSTM: 5).
        weight_decay: L2 penalty added to the gradient (AWD-LSTM: 1.2e-6).
    """

    def __init__(self, params: Iterable, lr: float, nonmono: int = 5, weight_decay: float = 0.0):
        if lr <= 0 or nonmono < 1 or weight_decay < 0:
            raise ValueError(f"NTASGD needs lr > 0, nonmono >= 1 and weight_decay >= 0 (got {lr}, {nonmono}, "
                             f"{weight_decay})")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        # the switch, for the whole model: in the first group, which state_dict() saves
        self.param_groups[0].update(nonmono=nonmono, val_losses=[], averaged_steps=None)

    @property
    def averaging(self) -> bool:
        return self.param_groups[0]["averaged_steps"] is not None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = self.param_groups[0]
        if self.averaging:
            first["averaged_steps"] += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad if not group["weight_decay"] else p.grad + group["weight_decay"] * p, alpha=-group["lr"])
                if self.averaging:
                    if "average" not in self.state[p]:  # the first averaged step: the average is this iterate
                        self.state[p]["average"] = p.detach().clone()
                    self.state[p]["average"].lerp_(p, 1 / first["averaged_steps"])  # += (p - average) / n
        return loss

    def observe(self, val_loss: float) -> bool:
        """Record a validation loss; True when it starts the averaging."""
        first = self.param_groups[0]
        history, nonmono = first["val_losses"], first["nonmono"]
        starts = not self.averaging and len(history) > nonmono and val_loss > min(history[:-nonmono])
        if starts:
            first["averaged_steps"] = 0
        history.append(float(val_loss))
        return starts

    def averages(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(parameter, its average) for every parameter that has one."""
        for group in self.param_groups:
            for p in group["params"]:
                if "average" in self.state[p]:
                    yield p, self.state[p]["average"]

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange each parameter's values with its average's (twice is a no-op)."""
        for p, average in self.averages():
            scratch = p.detach().clone()
            p.copy_(average)
            average.copy_(scratch)


def find_ntasgd(optimizers: Iterable) -> NTASGD | None:
    """The NT-ASGD among a trainer's optimizers, if any (Lightning may wrap them)."""
    for optimizer in optimizers:
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if isinstance(optimizer, NTASGD):
            return optimizer
    return None
