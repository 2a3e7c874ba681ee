"""The loss and how it is quoted: summed cross-entropy over the scored targets, in nats, and as bits per
character or perplexity."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

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
