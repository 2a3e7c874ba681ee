"""The regularizers of AWD-LSTM (Merity, Keskar and Socher 2017, arXiv 1708.02182), as plain functions:
locked (variational) dropout, embedding dropout, and activation / temporal activation regularization.
Weight drop (DropConnect on the hidden-to-hidden matrices) is ``F.dropout`` applied to those matrices, where each
cell reads them (:meth:`rnnlm.cells.RecurrentCell.drop_recurrent`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with one mask per sequence: x (B, T, F) loses the same features at every time step of a row
    (Gal and Ghahramani 2016), where ordinary dropout draws a new mask at every step."""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p).div_(1 - p)
    return x * mask


def sequence_dropout(x: Tensor, p: float, locked: bool, training: bool) -> Tensor:
    """Locked or ordinary dropout of a batch-first sequence (B, T, F)."""
    return locked_dropout(x, p, training) if locked else F.dropout(x, p, training)


def embedding_dropout(weight: Tensor, p: float, training: bool) -> Tensor:
    """The embedding matrix with whole rows (words) zeroed with probability ``p`` and the rest scaled by
    1/(1-p): a dropped word's every occurrence in the batch reads zeros."""
    if not training or p == 0:
        return weight
    mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p).div_(1 - p)
    return weight * mask


def activation_penalty(outputs: Tensor, dropped: Tensor, scored: Tensor, ar: float, tar: float) -> Tensor:
    """AR and TAR on the top layer's outputs, over the scored time steps (B, T) (padding excluded):

    - AR, ``ar * mean(dropped**2)``: keeps the activations small (on the outputs after dropout, as AWD-LSTM);
    - TAR, ``tar * mean((h_t - h_{t-1})**2)``: keeps them slowly changing (before dropout, so the penalty is
      not about the mask's changes), over steps t whose t-1 is scored too.
    """
    penalty = outputs.new_zeros(())
    if ar:
        penalty = penalty + ar * _masked_mean(dropped.pow(2), scored)
    if tar and outputs.size(1) > 1:
        steps = scored[:, 1:] & scored[:, :-1]
        penalty = penalty + tar * _masked_mean((outputs[:, 1:] - outputs[:, :-1]).pow(2), steps)
    return penalty


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over features and the time steps where ``mask`` (B, T) is true, of values (B, T, F)."""
    weights = mask.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum() / (weights.sum() * values.size(-1)).clamp_min(1)

