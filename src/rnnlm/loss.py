"""The loss and how it is quoted: summed cross-entropy over the scored targets (padding never counts), in nats,
and as bits per character or perplexity."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100  # the target id of padding: never scored (cross-entropy's own default)


def sequence_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (nats) of logits (B, T, V) against targets (B, T), and how many targets were scored
    (those not :data:`IGNORE_INDEX`)."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def loss_in_units(loss: float, level: str) -> tuple[str, float]:
    """A mean cross-entropy in nats as people quote it: bits per character for char models,
    perplexity for word models. Returns ``(name, value)``, e.g. ``("bpc", 2.55)``."""
    if level == "char":
        return "bpc", loss / math.log(2)
    return "ppl", math.exp(min(loss, 700.0))  # exp overflows a float beyond ~709


def pad_batch(examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Right-pad (inputs, targets) lines to the longest: inputs with id 0 (never scored), targets with
    :data:`IGNORE_INDEX`, so that padding adds nothing to the loss."""
    inputs = pad_sequence([x for x, _ in examples], batch_first=True, padding_value=0)
    targets = pad_sequence([y for _, y in examples], batch_first=True, padding_value=IGNORE_INDEX)
    return inputs, targets
